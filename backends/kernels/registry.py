"""The one table of blade's hand-written kernels: which kernel runs a blade op on a device, tried in what order.

The choice order, per (op, device); the first kernel whose condition holds runs the call, else the op's reference
(tests/backends/test_kernel_registry.py checks these lines against KERNELS):

    flash_attention  cpu   decode → native → blocked → reference
    flash_attention  cuda  triton → reference
    qlinear          cpu   skinny → reference
    q4linear         cpu   skinny → reference
    qlinear          cuda  triton → reference
    linear           cpu   skinny → reference

    decode   decode_native.py + decode_attention.cpp: one query per head (a decode step), fp32 or bf16, a bool mask
             or none: reads only the keys the mask lets a row see
    native   attention_native.py + attention_bf16.cpp: the fused bf16 kernel (AVX512-BF16, no AMX), where it builds
             here and takes the call (bf16, contiguous rows, an even head dim)
    blocked  attention_blocked.py: bf16 query blocks through PyTorch's bf16 GEMMs, at MIN_KEYS keys or more (where
             it measured faster than SDPA, bench/results/attention_cpu.md)
    skinny   skinny_native.py + skinny_linear.cpp: linear layers over 1..8 rows (a decode step) at the memory's
             speed, fp32/bf16/int8 weights (qlinear: weight_only), where it builds here (AVX-512), a bf16 model's
             layers through vdpbf16ps (AVX512-BF16); int8 and int4 weights up to 128 rows (a short prefill), 8 a
             pass, where the reference would dequantize first
    triton   attention_triton.py / qgemm_triton.py: Triton kernels, on a CUDA GPU with Triton installed, for the
             dtypes and head sizes they take
    reference  the op's meaning in PyTorch (blade.ops): SDPA for attention, fp32 PyTorch for qlinear, torch's
             linear for aten.linear

How the op finds this table without blade.ops importing a floor above it: `route_ops()` registers `flash_attention`
and `qlinear` below as the ops' CPU and CUDA implementations with torch.library.register_kernel (their default,
CompositeExplicitAutograd implementation stays the reference, for every other device). blade.backends calls it when
it is imported; that is a registration only. Nothing is loaded then: a kernel's module is imported on the first call
it could take (the native kernel is compiled then, the Triton modules import triton then), and a module that fails
to import is warned about once and skipped. Each call looks the kernel function up on its module, so a test may
monkeypatch it. `override(op, device, kernel)` runs a kernel of one's own instead of the whole chain (tests, users);
`describe(op, device)` says in words what runs, for reports. `linear` is aten.linear, which torch does not let
anyone route: the eager backend calls `linear()` below for it.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import threading
import warnings
from dataclasses import dataclass
from types import ModuleType
from typing import Callable, Iterator, Optional

import torch

from blade.ops.attention import attention_reference, check_attention_args, in_output_layout
from blade.ops.quantized import q4linear_reference, qlinear_reference

OpKernel = Callable[..., torch.Tensor]
DEVICES = ("cpu", "cuda")  # the devices route_ops() sends through this table


@functools.lru_cache(maxsize=1)
def cuda_with_triton() -> bool:
    """A CUDA GPU and an installed Triton (asked without importing triton)."""
    return importlib.util.find_spec("triton") is not None and torch.cuda.is_available()


def always() -> bool:
    return True


@dataclass(frozen=True)
class Kernel:
    """One hand-written kernel of an op on a device: `function` of `module` (in blade.backends.kernels) runs the
    call when `when(module, *op_args)` holds; `available()` is asked first, without loading the module."""

    op: str
    device: str
    name: str
    module: str
    function: str
    when: Callable[..., bool]
    description: str  # a format string over the module's globals
    available: Callable[[], bool] = always

    def load(self) -> Optional[ModuleType]:
        """The kernel's module, imported on first use; None where it fails to import (warned once)."""
        return _load(self.module)

    def applies(self, *args) -> bool:
        """Whether this kernel runs a call with these (the op's positional) arguments; loads it."""
        module = self.available() and self.load()
        return bool(module) and self.when(module, *args)

    def __call__(self, *args) -> torch.Tensor:
        return getattr(self.load(), self.function)(*args)

    def describe(self) -> str:
        module = self.load()
        return self.description.format_map(vars(module)) if module else self.description


KERNELS = (
    Kernel("flash_attention", "cpu", "decode", "decode_native", "attention",
           lambda m, q, k, v, mask, scale, causal: m.supports(q, k, v, mask, causal),
           "blade's CPU decode kernel (decode_attention.cpp) for one query per head"),
    Kernel("flash_attention", "cpu", "native", "attention_native", "attention",
           lambda m, q, k, v, mask, scale, causal: m.supports(q, k, v, mask),
           "blade's fused bf16 CPU kernel (attention_bf16.cpp, AVX512-BF16) where it runs"),
    Kernel("flash_attention", "cpu", "blocked", "attention_blocked", "blocked_attention",
           lambda m, q, k, v, mask, scale, causal: m.supports(q, k, v, mask) and m.prefers_blocked(q, k, mask, causal),
           "its blocked bf16 CPU kernel at {MIN_KEYS}+ keys (faster than SDPA there, bench/results/attention_cpu.md)"),
    Kernel("flash_attention", "cuda", "triton", "attention_triton", "flash_attention",
           lambda m, q, k, v, mask, scale, causal: m.supports(q, k, v, mask),
           "blade's Triton FlashAttention kernel (attention_triton.py) where it takes the call",
           available=cuda_with_triton),
    Kernel("qlinear", "cpu", "skinny", "skinny_native", "qlinear",
           lambda m, x, weight, weight_scale, bias, mode, input_scale: mode == "weight_only" and m.supports(
               x, weight, bias, weight_scale),
           "blade's skinny CPU kernel (skinny_linear.cpp) for weight-only int8 over 1..{MAX_QUANTIZED_ROWS} rows"),
    Kernel("q4linear", "cpu", "skinny", "skinny_native", "q4linear",
           lambda m, x, packed, scales, bias: m.supports_q4(x, packed, scales, bias),
           "blade's skinny CPU kernel (skinny_linear.cpp, int4 entry point) over 1..{MAX_QUANTIZED_ROWS} rows"),
    Kernel("linear", "cpu", "skinny", "skinny_native", "linear",
           lambda m, x, weight, bias=None: m.supports(x, weight, bias),
           "blade's skinny CPU kernel (skinny_linear.cpp) over 1..{MAX_ROWS} rows"),
    Kernel("qlinear", "cuda", "triton", "qgemm_triton", "qlinear",
           lambda m, x, weight, weight_scale, bias, mode, input_scale: m.supports(x, weight, weight_scale, bias, mode,
                                                                                 input_scale),
           "blade's Triton quantized GEMMs (qgemm_triton.py) where they take the call", available=cuda_with_triton),
)


@dataclass(frozen=True)
class Reference:
    """An op's reference (blade.ops), run where no kernel applies; named last in a chain, or alone."""

    run: OpKernel
    last: str
    alone: str


REFERENCES = {
    "flash_attention": Reference(attention_reference, "PyTorch's SDPA",
                                 "the reference (PyTorch's scaled_dot_product_attention)"),
    "qlinear": Reference(qlinear_reference, "the reference", "the reference (fp32 PyTorch)"),
    "linear": Reference(torch.nn.functional.linear, "torch's linear", "torch's linear"),
    "q4linear": Reference(q4linear_reference, "the reference", "the reference (dequantize, fp32 PyTorch)"),
}

_CHAINS = {(op, device): tuple(k for k in KERNELS if (k.op, k.device) == (op, device))
           for op, device in {(k.op, k.device) for k in KERNELS}}
_OVERRIDES: dict[tuple[str, str], OpKernel] = {}
_MODULES: dict[str, Optional[ModuleType]] = {}
_LOCK = threading.Lock()


def _load(name: str) -> Optional[ModuleType]:
    module = _MODULES.get(name, False)
    if module is not False:
        return module
    with _LOCK:
        if name not in _MODULES:
            try:
                _MODULES[name] = importlib.import_module(f"blade.backends.kernels.{name}")
            except Exception as exc:  # noqa: BLE001 - a broken kernel (a Triton install, say) must not break the op
                warnings.warn(f"blade: the kernel module {name} does not load ({type(exc).__name__}: {exc}); "
                              "blade's ops run their next kernel or their PyTorch reference instead", RuntimeWarning,
                              stacklevel=4)
                _MODULES[name] = None
    return _MODULES[name]


def declared(op: str, device: str) -> tuple[Kernel, ...]:
    """The kernels declared for `op` on `device`, in the order they are tried."""
    return _CHAINS.get((op, device), ())


def kernel(op: str, device: str, name: str) -> Kernel:
    """The kernel declared as `name` for `op` on `device` (KeyError when there is none)."""
    found = [k for k in declared(op, device) if k.name == name]
    if not found:
        raise KeyError(f"no kernel {name!r} declared for {op} on {device}")
    return found[0]


def order(op: str, device: str) -> list[str]:
    """The names tried for `op` on `device`, the reference last (as the module docstring lists them)."""
    return [k.name for k in declared(op, device)] + ["reference"]


def choose(op: str, device: str, *args) -> OpKernel:
    """What runs `op` with these positional arguments on `device`: an override, else the first kernel that applies,
    else the reference."""
    mine = _OVERRIDES.get((op, device))
    if mine is not None:
        return mine
    for candidate in _CHAINS.get((op, device), ()):  # a loop, not next(genexpr): ~60 calls a decode step
        if candidate.applies(*args):
            return candidate
    return REFERENCES[op].run


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None,
                    scale: Optional[float] = None, causal: bool = False) -> torch.Tensor:
    """blade::flash_attention on a routed device: the arguments checked (an override gets them as they are), then
    the chosen kernel, its result in the op's output layout."""
    device = q.device.type
    chosen = _OVERRIDES.get(("flash_attention", device))
    if chosen is None:
        check_attention_args(q, k, v, mask)
        chosen = choose("flash_attention", device, q, k, v, mask, scale, causal)
    return in_output_layout(chosen(q, k, v, mask, scale, causal))


def qlinear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: Optional[torch.Tensor] = None,
            mode: str = "dynamic", input_scale: Optional[float] = None) -> torch.Tensor:
    """blade::qlinear on a routed device: the chosen kernel (each checks the arguments itself)."""
    args = (x, weight, weight_scale, bias, mode, input_scale)
    return choose("qlinear", x.device.type, *args)(*args)


def q4linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
             bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """blade::q4linear on a routed device: the chosen kernel (the reference checks the arguments)."""
    return choose("q4linear", x.device.type, x, packed, scales, bias)(x, packed, scales, bias)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """aten.linear as the eager backend runs it: the chosen kernel for this call."""
    return choose("linear", x.device.type, x, weight, bias)(x, weight, bias)


_ROUTES = {"flash_attention": ("blade::flash_attention", flash_attention), "qlinear": ("blade::qlinear", qlinear),
           "q4linear": ("blade::q4linear", q4linear)}
_ROUTED: set[tuple[str, str]] = set()


def route(op: str, device: str) -> None:
    """Make this table `op`'s implementation on `device` (torch.library.register_kernel; once per pair)."""
    with _LOCK:
        if (op, device) not in _ROUTED:
            qualname, implementation = _ROUTES[op]
            torch.library.register_kernel(qualname, device, implementation)
            _ROUTED.add((op, device))


def route_ops() -> None:
    """Every op of the table routed through it on DEVICES: a registration, nothing loaded or built."""
    for op in _ROUTES:
        for device in DEVICES:
            route(op, device)


def set_override(op: str, device: str, kernel: OpKernel | None) -> OpKernel | None:
    """Run `op` on `device` through `kernel` (the op's positional arguments) instead of the table, or the table again
    for None; returns the override it replaces."""
    route(op, device)
    old = _OVERRIDES.pop((op, device), None)
    if kernel is not None:
        _OVERRIDES[(op, device)] = kernel
    return old


@contextlib.contextmanager
def override(op: str, device: str, kernel: OpKernel | None) -> Iterator[None]:
    """Within the block, `op` on `device` runs `kernel` (None: the table)."""
    old = set_override(op, device, kernel)
    try:
        yield
    finally:
        set_override(op, device, old)


def overridden(op: str, device: str) -> bool:
    """Whether a kernel of one's own runs `op` on `device` in place of the table."""
    return (op, device) in _OVERRIDES


def candidates(op: str, device: str) -> list[Kernel]:
    """The declared kernels that may run `op` on `device` here (no override; available, asked without loading)."""
    if overridden(op, device):
        return []
    return [k for k in declared(op, device) if k.available()]


def runs(op: str, device: str, name: str) -> bool:
    """Whether the kernel `name` is among what may run `op` on `device` here."""
    return any(k.name == name for k in candidates(op, device))


def describe(op: str, device: str) -> str:
    """In words, what runs `op` on `device`: the override's `description` or name, else the chain (loads the kernels'
    Python modules to name their settings, builds nothing), else the reference."""
    mine = _OVERRIDES.get((op, device))
    if mine is not None:
        return getattr(mine, "description", None) or getattr(mine, "__qualname__", None) or repr(mine)
    chain = candidates(op, device)
    if not chain:
        return REFERENCES[op].alone
    return "; else ".join([k.describe() for k in chain] + [REFERENCES[op].last])


def loaded() -> list[str]:
    """The kernel modules imported so far (their names in this package; those that failed included)."""
    return sorted(_MODULES)
