"""blade's kernel calls as torch.library ops with plain CPU implementations, for Inductor-generated code to call.

Inductor keeps a custom op as an extern call in the code it generates and reaches it through the dispatcher. A
torch.library.custom_op (how blade's own ops are declared) adds its Python wrapper to that: ~7 µs a call on the
2-core CPU, where a decode step makes ~60 of them; an op defined on a torch.library.Library with a CPU impl costs
~1.5 µs (bench/llm_decode_inductor_probe.py). The ops below (namespace `blade_kernels`) run exactly what the eager
backend runs for the same node (`DIRECT`: the kernel registry's choice per call); their fake implementations are
the original ops' own, so the shapes and strides Inductor plans with are the ones the kernels return.
"""
from __future__ import annotations

import threading

import torch

from blade.backends.eager import DIRECT
from blade.ops.attention import FLASH_ATTENTION
from blade.ops.quantized import Q4LINEAR, QEMBEDDING, QLINEAR

SCHEMAS = {
    torch.ops.aten.linear.default: "linear(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor",
    FLASH_ATTENTION: "flash_attention(Tensor q, Tensor k, Tensor v, Tensor? mask=None, float? scale=None, "
                     "bool causal=False) -> Tensor",
    QLINEAR: "qlinear(Tensor x, Tensor weight, Tensor weight_scale, Tensor? bias=None, str mode='dynamic', "
             "float? input_scale=None) -> Tensor",
    Q4LINEAR: "q4linear(Tensor x, Tensor packed, Tensor scales, Tensor? bias=None) -> Tensor",
    QEMBEDDING: "qembedding(Tensor table, Tensor row_scale, Tensor indices) -> Tensor",
}
_LOCK = threading.Lock()
_OPS: dict = {}
_LIBRARY: list = []


def kernel_ops() -> dict:
    """blade op (or aten.linear) -> its blade_kernels op; defined once per process."""
    with _LOCK:
        if not _OPS:
            library = torch.library.Library("blade_kernels", "DEF")
            for op, schema in SCHEMAS.items():
                name = schema.split("(")[0]
                library.define(schema)
                library.impl(name, DIRECT[op], "CPU")
                meta = torch.nn.functional.linear if op is torch.ops.aten.linear.default else op
                torch.library.register_fake(f"blade_kernels::{name}", _fake(meta), lib=library)
                _OPS[op] = getattr(torch.ops.blade_kernels, name).default
            _LIBRARY.append(library)  # the registrations live as long as the library object
    return dict(_OPS)


def _fake(meta):
    def fake(*args, **kwargs):
        return meta(*args, **kwargs)

    return fake
