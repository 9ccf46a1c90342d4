"""Launching one generated kernel: output shapes from the operands, broadcast strides, the grid, planned buffers."""
from __future__ import annotations

import math
import threading

import torch

from blade import config
from blade.backends.triton.codegen import KernelSource
from blade.backends.triton import codegen

LOOP_BLOCK = 1024
_INTERPRETER = threading.Lock()
MATMUL_BLOCKS = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}


def autotune_enabled() -> bool:
    """Autotuning (CUDA only) unless config.triton_autotune() is off; the interpreter always uses one config."""
    return config.triton_autotune() and not config.triton_interpret()


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class RegionKernel:
    """Called like the fused region (its argument tensors); returns its output(s) computed by one kernel."""

    __module__ = "blade.backends.triton"

    @property
    def __name__(self) -> str:  # noqa: A003 - fx names call targets by it
        return f"triton_{self.source.name}"

    def __init__(self, source: KernelSource, kernel, out_dtypes: list[torch.dtype], out_ranks: list[int],
                 multiple_outputs: bool, tuned: bool):
        self.source, self.kernel = source, kernel
        self.out_dtypes, self.out_ranks = out_dtypes, out_ranks
        self.multiple_outputs, self.tuned = multiple_outputs, tuned
        self._tuning = threading.Lock()
        self.allocate = _fresh  # replaced by the program's buffer plan

    def __call__(self, *tensors):
        launch = {"loop": self._loop, "reduction": self._rows, "matmul_epilogue": self._matmul}[self.source.kind]
        if config.triton_interpret():
            with _INTERPRETER:  # the interpreter keeps the launch grid in global state: one launch at a time
                outputs = launch(list(tensors))
        elif self.tuned:
            with self._tuning:  # Triton's Autotuner keeps per-run state on itself: one tuned launch at a time
                outputs = launch(list(tensors))
        else:
            outputs = launch(list(tensors))
        return tuple(outputs) if self.multiple_outputs else outputs[0]

    def _outputs(self, shapes, device) -> list[torch.Tensor]:
        return [self.allocate(j, shape, dtype, device) for j, (shape, dtype) in enumerate(zip(shapes, self.out_dtypes))]

    def _loop(self, tensors):
        shape = torch.broadcast_shapes(*(t.shape for t in tensors))
        outputs = self._outputs([shape] * len(self.out_dtypes), tensors[0].device)
        numel = math.prod(shape)
        if numel == 0:
            return outputs
        strides = [s for t in tensors for s in t.expand(shape).stride()]
        args = [*tensors, *outputs, *shape, *strides, numel]
        if self.tuned:
            self.kernel[lambda meta: (triton_cdiv(numel, meta["BLOCK"]),)](*args)
        else:
            self.kernel[(triton_cdiv(numel, LOOP_BLOCK),)](*args, BLOCK=LOOP_BLOCK)
        return outputs

    def _rows(self, tensors):
        full = torch.broadcast_shapes(*(t.shape for t in tensors))
        if len(full) != self.source.rank:
            raise RuntimeError(f"{self.source.name}: operands broadcast to rank {len(full)}, the kernel is rank "
                               f"{self.source.rank}")
        rows, n = math.prod(full[:-1]), full[-1]
        shapes = [full if vector else (tuple(full[:-1]) + (1,) * (rank - len(full) + 1))
                  for vector, rank in zip(self.source.out_vector, self.out_ranks)]
        outputs = self._outputs(shapes, tensors[0].device)
        if rows == 0:
            return outputs
        strides = [s for t in tensors for s in t.expand(full).stride()]
        block = min(codegen.LOOP_BLOCK_N, _next_pow2(n)) if self.source.looped else _next_pow2(n)
        self.kernel[(rows,)](*tensors, *outputs, *full, *strides, N=n, BLOCK_N=block)
        return outputs

    def _matmul(self, tensors):
        roles = self.source.matmul
        x, weight = tensors[roles["a"]], tensors[roles["b"]]
        bias = tensors[roles["bias"]] if roles["bias"] >= 0 else None
        k, n = x.shape[-1], weight.shape[0]
        a = x.reshape(-1, k)
        out_shape = tuple(x.shape[:-1]) + (n,)
        (out,) = self._outputs([out_shape], x.device)
        m = a.shape[0]
        if m == 0:
            return [out]
        others = [tensors[i] for i in roles["others"]]
        strides = [s for t in others for s in t.expand(out_shape).stride()]
        precision = "ieee" if x.dtype == torch.float32 else None  # tensor cores decide for 16-bit operands
        args = [a, weight, bias if bias is not None else a, *others, out, m, n, k, a.stride(0), a.stride(1),
                weight.stride(0), weight.stride(1), bias.stride(0) if bias is not None else 0, *out_shape[:-1], *strides]
        if self.tuned:
            grid = lambda meta: (triton_cdiv(m, meta["BLOCK_M"]), triton_cdiv(n, meta["BLOCK_N"]))  # noqa: E731
            self.kernel[grid](*args, HAS_BIAS=bias is not None, PRECISION=precision)
        else:
            grid = (triton_cdiv(m, MATMUL_BLOCKS["BLOCK_M"]), triton_cdiv(n, MATMUL_BLOCKS["BLOCK_N"]))
            self.kernel[grid](*args, HAS_BIAS=bias is not None, PRECISION=precision, **MATMUL_BLOCKS)
        return [out]


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _fresh(index: int, shape, dtype, device) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=device)
