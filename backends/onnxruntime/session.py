"""ONNX Runtime sessions: providers by target, deliberate session options, torch tensors in and out."""
from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort
import torch

from blade.backends.onnxruntime.fused import DISABLED_OPTIMIZERS
from blade.target import Target

_CUDA_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def providers_for(target: Target) -> list[str]:
    """CPU on a CPU target; TensorRT (if present) and CUDA, then CPU, on a CUDA target."""
    available = ort.get_available_providers()
    if target.device == "cuda":
        chosen = [p for p in _CUDA_PROVIDERS if p in available]
        return chosen + ["CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def cuda_available() -> bool:
    return "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available()


def session_options(target: Target, shares_cores: bool) -> ort.SessionOptions:
    """ORT_ENABLE_ALL, sequential, intra-op threads = cores; spinning only when ORT has the cores alone."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = target.cores or os.cpu_count() or 1  # one op at a time, all cores on it
    options.inter_op_num_threads = 1
    options.enable_mem_pattern = True
    options.enable_cpu_mem_arena = True
    options.log_severity_level = 3  # errors only; blade reports what matters
    if shares_cores:
        # Idle intra-op threads spin for tens of ms after each run (ONNX Runtime's default, a few %
        # faster alone); between PyTorch fallback regions that would steal the cores PyTorch needs.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


_NUMPY_OF = {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64,
             torch.int64: np.int64, torch.int32: np.int32, torch.int8: np.int8, torch.uint8: np.uint8,
             torch.bool: np.bool_}


OPTIMIZED_MODEL = "optimized.onnx"


def record_profile(options: ort.SessionOptions, directory: str) -> None:
    """Per-node kernel times into `directory` (end_profiling returns the file), and the optimized
    graph those nodes belong to as OPTIMIZED_MODEL (its weights beside it, not inline)."""
    options.enable_profiling = True
    options.profile_file_prefix = os.path.join(directory, "ort_profile")
    options.optimized_model_filepath = os.path.join(directory, OPTIMIZED_MODEL)
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                     OPTIMIZED_MODEL + ".data")
    options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")


class OrtRunner:
    """One InferenceSession, created once; called with torch tensors, returns torch tensors."""

    def __init__(self, model_path: str, target: Target, input_names: list[str], output_names: list[str],
                 shares_cores: bool = False, profile_dir: str | None = None):
        self.target = target
        options = session_options(target, shares_cores)
        providers = providers_for(target)
        if profile_dir is not None:
            record_profile(options, profile_dir)
            # TensorRT compiles nodes away: ONNX Runtime cannot save that graph nor time its nodes
            providers = [p for p in providers if p != "TensorrtExecutionProvider"]
        self.session = ort.InferenceSession(model_path, sess_options=options, providers=providers,
                                            disabled_optimizers=DISABLED_OPTIMIZERS.get(target.device, []))
        wanted = {i.name for i in self.session.get_inputs()}  # the exporter drops inputs nothing reads
        self.feeds = [(i, name) for i, name in enumerate(input_names) if name in wanted]
        self.output_names = list(output_names)
        self.on_gpu = self.session.get_providers()[0] != "CPUExecutionProvider"

    def __call__(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.on_gpu:
            return self._run_bound(tensors)
        feeds = {name: tensors[i].detach().contiguous().numpy() for i, name in self.feeds}
        return [torch.from_numpy(out) for out in self.session.run(self.output_names, feeds)]

    def _run_bound(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """I/O binding: inputs stay on the GPU; ONNX Runtime allocates the outputs there."""
        binding = self.session.io_binding()
        device_id = next((tensors[i].device.index or 0 for i, _ in self.feeds), 0)
        kept = []  # ONNX Runtime holds raw pointers: contiguous copies must outlive the run
        for i, name in self.feeds:
            t = tensors[i].contiguous()
            kept.append(t)
            binding.bind_input(name, t.device.type, t.device.index or 0, _NUMPY_OF[t.dtype], list(t.shape), t.data_ptr())
        for name in self.output_names:
            binding.bind_output(name, "cuda", device_id)
        self.session.run_with_iobinding(binding)
        return [torch.from_dlpack(v) if hasattr(v, "__dlpack__") else torch.from_numpy(v.numpy()).cuda()
                for v in binding.get_outputs()]
