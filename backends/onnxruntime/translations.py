"""Blade ops → ONNX: the one place where each blade op gets its ONNX Runtime lowering.

Each entry maps a blade op overload (torch.ops.blade.<op>.default) to an onnxscript function that
builds it — preferably from ONNX Runtime's fused `com.microsoft` contrib ops (Attention,
MultiHeadAttention, SkipLayerNormalization, FastGelu, MatMulNBits, …), else from standard ONNX.
The table is handed to torch.onnx.export as its custom_translation_table; `supports()` accepts a
blade op only when it has an entry here. The passes that introduce blade ops add their entries.
"""
from __future__ import annotations

TRANSLATIONS: dict = {}
