"""The inductor backend: the optimized IR handed to torch.compile (Inductor, with freezing) as one fx module.

What blade's passes decided stays decided (attention as blade::flash_attention, which Inductor runs
as the op's CPU/CUDA kernel: in bf16 on the CPU blade's fused native kernel, or where that cannot run
(no AVX512-BF16, AMX, no C++ compiler, head sizes it does not take) plain ops to fuse over at most 128
keys, short_attention.py; precision casts; quantized ops as their kernels); Inductor then fuses the
elementwise work around the matmuls (e.g. a mixed-precision cast into the layer norm before it)
and picks its GEMMs. Where it packs a linear for oneDNN (bf16/fp16 weights, or a symbolic batch; an
all-static fp32 linear goes to MKL instead) it folds the bias and activation, GPT-2's tanh GELU included,
into the GEMM's epilogue. blade hands over aten.gelu as it is for that reason: the fusion matches
Inductor's own decomposition of the op, and an earlier blade lowering of tanh GELU as x·sigmoid(2u) hid
it, leaving a separate GELU kernel of about 2 ms per call in GPT-2 base at seq 256
(bench/results/bf16_profile.md). An all-static fp32 graph runs Inductor's tanh GELU kernel instead.
Shapes named dynamic compile once with symbolic sizes (dynamic=True), so a new batch or length does not
recompile, except a size of 1, which dynamo specializes: the first call with a dim of 1 compiles once more (as
does, without the native kernel, the first whose bf16 CPU attention crosses SHORT_KEYS keys). It is compiled on
the first call (or at compile time, when blade.compile runs the accuracy check or measures it): tens of seconds
for a base-size model; an artifact saves nothing of it and compiles again when loaded. Not in the fixed rule of
backend="auto": it is one of the candidates auto measures.
"""
from __future__ import annotations

import contextlib
import threading

import torch

from blade.backends.base import Backend, Executable, placement
from blade.backends.inductor import short_attention
from blade.errors import BackendError
from blade.ir.fused import is_fused
from blade.ir.graph import Graph, Node
from blade.backends.kernels import registry
from blade.ops.attention import FLASH_ATTENTION
from blade.target import Target


def inductor_with_freezing(gm: torch.fx.GraphModule, example_inputs):
    """torch.compile's Inductor with freezing (weights as constants: folded, GEMMs prepacked and fused with their
    epilogues)."""
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs, config_patches={"freezing": True})


def _short_attention_nodes(graph: Graph, device: str) -> set[str]:
    """The attention nodes short_attention lowers: bf16 on the CPU, where the kernel registry runs the op (an override
    for "cpu" keeps every call), that blade's fused native kernel does not take (it runs every length with no guard
    on it)."""
    if device != "cpu" or registry.overridden("flash_attention", "cpu"):
        return set()
    native = registry.kernel("flash_attention", "cpu", "native").load()
    names = set()
    for node in graph.call_nodes:
        if node.target == FLASH_ATTENTION and getattr(node.val, "dtype", None) == torch.bfloat16:
            q, k, v = (arg.val.shape for arg in node.args[:3])
            if native is None or not native.takes_shapes(torch.bfloat16, q[-1], v[-1], q[1], k[1]):
                names.add(node.name)
    return names


def _attention_runs(device: str) -> str:
    return (f"{registry.describe('flash_attention', device)}; in bf16 where blade's fused kernel does not take the "
            f"call, over 1 to {short_attention.SHORT_KEYS} keys as plain ops in Inductor's kernels")


def _with_short_attention_as_ops(module: torch.fx.GraphModule, names: set[str]) -> torch.fx.GraphModule:
    """The named blade::flash_attention calls become attention_for_inductor (short bf16 CPU attention as plain ops)."""
    for node in module.graph.nodes:
        if node.op == "call_function" and node.target is FLASH_ATTENTION and node.name in names:
            node.target = short_attention.attention_for_inductor
    module.recompile()
    return module


_FREEZING_LOCK = threading.Lock()
_FREEZING_USERS = [0, False]  # calls inside _freezing(), the user's own setting to restore after the last


@contextlib.contextmanager
def _freezing():
    """Inductor's freezing on while blade's compiled graphs run (any call may trace or recompile). Dynamo reads
    torch._inductor.config.freezing when it traces, to treat the weights as constants; compile_fx's
    config_patches come too late for that, so without this the weights stay graph inputs: no constant folding,
    no prepacked oneDNN GEMMs. Counted, so that overlapping calls from several threads restore the user's
    setting once, after the last. The flag is process-wide: another thread's own torch.compile that traces
    during a blade call sees freezing on too (its weights become constants)."""
    import torch._inductor.config as inductor_config

    with _FREEZING_LOCK:
        if _FREEZING_USERS[0] == 0:
            _FREEZING_USERS[1] = inductor_config.freezing
            inductor_config.freezing = True
        _FREEZING_USERS[0] += 1
    try:
        yield
    finally:
        with _FREEZING_LOCK:
            _FREEZING_USERS[0] -= 1
            if _FREEZING_USERS[0] == 0:
                inductor_config.freezing = _FREEZING_USERS[1]


class InductorExecutable(Executable):
    """torch.compile of the graph's fx module (freezing on), called under no_grad."""

    backend = "inductor"

    def __init__(self, graph: Graph, device: str = "cpu"):
        self.name = graph.name
        lowered = _short_attention_nodes(graph, device)
        self.placement = placement(graph, "inductor (its generated kernels; matmuls as extern library calls)", device,
                                   _attention_runs(device) if lowered else None)
        for node in graph.call_nodes:  # regions' bodies built now, not inside the trace
            if is_fused(node):
                node.target.module()
        self.module = graph.to_fx()
        if lowered:
            self.module = _with_short_attention_as_ops(self.module, lowered)
        dynamic = any(not isinstance(size, int) for n in graph.inputs for size in n.val.shape)
        self.compiled = torch.compile(self.module, dynamic=dynamic, backend=inductor_with_freezing)
        self._lock = threading.Lock()

    def __call__(self, *tensors) -> list:
        with torch.no_grad(), _freezing():
            try:
                return list(self.compiled(*tensors))
            except Exception as exc:  # noqa: BLE001 - Inductor's own failures, named as blade's
                reason = str(exc).strip().splitlines()
                raise BackendError(f"torch.compile (inductor) could not compile or run {self.name}: "
                                   f"{type(exc).__name__}: {reason[0][:300] if reason else ''}; use "
                                   "backend='onnxruntime' or 'eager'") from exc

    def describe(self) -> dict:
        return {"compiler": f"torch.compile (inductor, freezing), torch {torch.__version__}", **self.placement}

    def save(self, directory: str) -> None:
        """Nothing beyond the IR and weights: loading compiles again."""


class InductorBackend(Backend):
    name = "inductor"

    def available(self, target: Target) -> bool:
        return target.device in ("cpu", "cuda")

    def supports(self, node: Node) -> bool:
        return True

    def refuses(self, graph: Graph, target: Target) -> str | None:
        """Measured auto tries Inductor for low-precision graphs only: in fp32, ONNX Runtime is the faster CPU
        engine (bench/results/ort_cpu.md) and every Inductor compile holds on to memory of the process."""
        if not any(getattr(n.val, "dtype", None) in (torch.bfloat16, torch.float16) for n in graph.call_nodes):
            return "tried for bf16/fp16 graphs only (in fp32 ONNX Runtime is faster, and each compile holds memory)"
        return None

    def compile(self, graph: Graph, target: Target, example_inputs=None) -> InductorExecutable:
        """Compiles now, on the example inputs when given (so that a failure is a compile-time BackendError)."""
        executable = InductorExecutable(graph, target.device)
        if example_inputs is not None:
            with executable._lock:
                executable(*example_inputs)
        return executable

    def load(self, directory: str, graph: Graph, target: Target) -> InductorExecutable:
        return InductorExecutable(graph, target.device)
