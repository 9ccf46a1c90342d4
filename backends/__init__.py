"""Backends: the registry, and each backend that turns the IR into something that runs."""
from blade.backends.base import (AUTO_PREFERENCE, MEASURED_CANDIDATES, Backend, Executable, Profiled, RegionTiming, get, names, register,
                                 resolve, unregister)
from blade.backends.eager import EagerBackend, attention_cpu
from blade.backends.inductor import InductorBackend
from blade.backends.onnxruntime import OnnxRuntimeBackend
from blade.backends.onnxruntime import peak_probe
from blade.backends.triton import TritonBackend, install_kernels

register(EagerBackend())
register(OnnxRuntimeBackend())
register(TritonBackend())
register(InductorBackend())
peak_probe.install()  # ONNX Runtime's MLAS matmul competes for the machine's measured peak
attention_cpu.install()  # blade::flash_attention on CPU in bf16: query blocks through bf16 GEMMs (bench/attention_cpu.py)
install_kernels()  # blade::flash_attention on CUDA runs the Triton kernel (1.1-1.3x SDPA flash on an H100)

__all__ = ["AUTO_PREFERENCE", "MEASURED_CANDIDATES", "Backend", "Executable", "Profiled", "RegionTiming", "get", "names", "register",
           "resolve", "unregister"]
