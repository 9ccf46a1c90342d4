"""Blade ops → ONNX: the one place where each blade op gets its ONNX Runtime lowering.

Each entry maps a blade op overload (torch.ops.blade.<op>.default) to an onnxscript function that
builds it — preferably from ONNX Runtime's fused `com.microsoft` contrib ops (Attention,
MultiHeadAttention, SkipLayerNormalization, FastGelu, MatMulNBits, …), else from standard ONNX.
The table is handed to torch.onnx.export as its custom_translation_table; `supports()` accepts a
blade op only when it has an entry here. The passes that introduce blade ops add their entries.
"""
from __future__ import annotations

import onnx
import onnxscript
import torch
from onnxscript import opset20 as op

from blade.backends.onnxruntime.fused import register_schemas
from blade.backends.onnxruntime.quantized import translations as quantized_translations
from blade.ops.attention import FLASH_ATTENTION

msft = onnxscript.values.Opset("com.microsoft", 1)


def register_contrib_schema(name: str, outputs: int = 1, domain: str = "com.microsoft") -> None:
    """Teach onnx (and so onnxscript) the schema of ONNX Runtime's own op `name` (a com.microsoft
    contrib op, or one ONNX Runtime adds to the ONNX domain), read from ONNX Runtime itself (onnx
    ships none of them), declaring only its first `outputs` outputs so that the node blade emits
    has just the ones it reads."""
    try:
        onnx.defs.get_schema(name, 1, domain)
        return
    except onnx.defs.SchemaError:
        pass
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_c

    (ort,) = [s for s in ort_c.get_all_operator_schema() if s.name == name and s.domain == domain]
    formal, option = onnx.defs.OpSchema.FormalParameter, onnx.defs.OpSchema.FormalParameterOption
    options = {"Single": option.Single, "Optional": option.Optional, "Variadic": option.Variadic}

    def params(items):
        return [formal(p.name, p.typeStr, param_option=options[p.option.name]) for p in items]

    attr_types = {"INT": onnx.defs.OpSchema.AttrType.INT, "FLOAT": onnx.defs.OpSchema.AttrType.FLOAT}
    attributes = [onnx.defs.OpSchema.Attribute(key, attr_types[a.type.name], a.description[:200], required=a.required)
                  for key, a in ort.attributes.items() if a.type.name in attr_types]
    onnx.defs.register_schema(onnx.defs.OpSchema(
        name, domain, ort.since_version, inputs=params(ort.inputs), outputs=params(ort.outputs[:outputs]),
        type_constraints=[(t.type_param_str, list(t.allowed_type_strs), "") for t in ort.type_constraints],
        attributes=attributes))


register_contrib_schema("MultiHeadAttention")
register_contrib_schema("GroupQueryAttention", outputs=3)  # with present K/V its CPU kernel holds no scores


def _static(size, what: str) -> int:
    if not isinstance(size, int):
        raise ValueError(f"blade::flash_attention → ONNX Runtime attention needs a static {what}, got {size}")
    return size


def flash_attention(q, k, v, mask=None, scale=None, causal: bool = False):
    """blade::flash_attention as ONNX Runtime's own fused attention.

    Causal self-attention without a mask → com.microsoft.GroupQueryAttention: causal by design,
    K/V heads shared by groups read in place, and on CPU, emitted with its present K/V outputs, it
    never holds the scores. Everything else → com.microsoft.MultiHeadAttention with K/V as
    [B, Sk, H*D]: in that form and with no mask its CPU kernel does not hold them either, while
    [B, H, Sk, D] K/V, a mask or its unidirectional flag make it materialize them (measured by
    bench/ort_attention_ops.py, results in bench/results/ort_attention_ops.md). The mask becomes MHA's 4-D additive
    attention_bias; causal with a mask its unidirectional flag (top-left aligned like the op when q
    and k have the same length); GQA K/V heads are expanded for MHA, which has no GQA form. Both
    take q, K, V as [B, S, H*D], so they are transposed in and the output transposed back.
    """
    heads = _static(q.shape[1], "number of query heads")
    kv_heads = _static(k.shape[1], "number of key/value heads")
    head_dim, v_dim = _static(q.shape[3], "head dim"), _static(v.shape[3], "value head dim")
    same_length = q.shape[2] == k.shape[2]
    if causal and not same_length:
        raise ValueError("blade::flash_attention with causal=True and different q/k lengths has no ONNX Runtime "
                         "attention form here (theirs is bottom-right aligned)")
    scale = float(scale if scale is not None else head_dim ** -0.5)
    query = _to_bsh(q, heads * head_dim)
    key = _to_bsh(k, kv_heads * head_dim)
    if causal and mask is None and head_dim == v_dim:
        out, _, _ = msft.GroupQueryAttention(query, key, _to_bsh(v, kv_heads * v_dim),
                                             None, None, *_key_lengths(query, key), num_heads=heads, kv_num_heads=kv_heads,
                                             scale=scale)
    else:
        if heads != kv_heads:
            k, v = _repeat_heads(k, heads // kv_heads, head_dim), _repeat_heads(v, heads // kv_heads, v_dim)
            key = _to_bsh(k, heads * head_dim)
        bias = None if mask is None else _attention_bias(mask, q, k, query, key)
        out = msft.MultiHeadAttention(query, key, _to_bsh(v, heads * v_dim), None, None,
                                      bias, num_heads=heads, scale=scale, unidirectional=int(bool(causal)))
    out = op.Reshape(out, op.Constant(value_ints=[0, 0, heads, v_dim]))
    out = op.Transpose(out, perm=[0, 2, 1, 3])
    if mask is None:
        return out
    return op.Where(_live_rows(mask, query, key, causal), out, op.CastLike(op.Constant(value_float=0.0), out))


def _live_rows(mask, query, key, causal: bool):
    """True for every query row that may attend some key, False for a row the mask (and the causal triangle)
    close entirely: the op gives such rows zeros, where MultiHeadAttention, whose bias here is finite, averages
    the values (a -inf bias would give NaN, which the next layer spreads to every row). Broadcasts as
    [B|1, H|1, Sq|1, 1] against the [B, H, Sq, Dv] output."""
    if mask.dtype == onnxscript.ir.DataType.BOOL:
        allowed = mask
    else:
        allowed = op.Greater(mask, op.CastLike(op.Constant(value_float=float("-inf")), mask))
    if causal:
        q_len, k_len = op.Shape(query, start=1, end=2), op.Shape(key, start=1, end=2)
        triangle = op.Trilu(op.ConstantOfShape(op.Concat(q_len, k_len, axis=0),
                                               value=onnx.helper.make_tensor("one", onnx.TensorProto.INT64, [1], [1])),
                            upper=0)
        allowed = op.And(allowed, op.Cast(triangle, to=onnx.TensorProto.BOOL))
    live = op.ReduceMax(op.Cast(allowed, to=onnx.TensorProto.INT32), op.Constant(value_ints=[3]), keepdims=1)
    return op.Cast(live, to=onnx.TensorProto.BOOL)


def _to_bsh(x, width: int):
    """[B, H, S, D] → [B, S, H*D]."""
    return op.Reshape(op.Transpose(x, perm=[0, 2, 1, 3]), op.Constant(value_ints=[0, 0, width]))


def _key_lengths(query, key):
    """GroupQueryAttention's seqlens_k ([B] int32, each Sk - 1: no padding) and total_sequence_length,
    read from the [B, S, H*D] query and key (so that no transposed copy of q or k stays alive)."""
    int32 = onnx.TensorProto.INT32
    k_len = op.Shape(key, start=1, end=2)
    batch = op.Shape(query, start=0, end=1)
    seqlens = op.Expand(op.Sub(k_len, op.Constant(value_ints=[1])), batch)
    return op.Cast(seqlens, to=int32), op.Cast(op.Squeeze(k_len, op.Constant(value_ints=[0])), to=int32)


def _repeat_heads(x, groups: int, dim: int):
    """[B, Hkv, S, D] → [B, Hkv*groups, S, D], head h reading h // groups."""
    shape = op.Shape(x)
    batch, kv_heads, seq = (op.Slice(shape, op.Constant(value_ints=[i]), op.Constant(value_ints=[i + 1]))
                            for i in range(3))
    expanded = op.Expand(op.Unsqueeze(x, op.Constant(value_ints=[2])),
                         op.Concat(batch, kv_heads, op.Constant(value_ints=[groups]), seq,
                                   op.Constant(value_ints=[dim]), axis=0))
    return op.Reshape(expanded, op.Concat(batch, op.Constant(value_ints=[-1]), seq,
                                          op.Constant(value_ints=[dim]), axis=0))


# a finite "never attend" bias per dtype: exp of it (less any score) is 0, as -inf's, without NaN on a closed row
_LOWEST = {onnxscript.ir.DataType.FLOAT16: -65000.0, onnxscript.ir.DataType.FLOAT: -3.0e38,
           onnxscript.ir.DataType.BFLOAT16: -3.0e38}


def _attention_bias(mask, q, k, query, key):
    """The 4-D mask (the attention pass emits masks 4-D) as an additive tensor of q's type
    (bool: 0 where allowed, the dtype's lowest where not) that spans the query axis, as MultiHeadAttention
    wants: broadcast up to [1, 1, Sq, 1] (or [1, 1, Sq, Sk]) only where it does not already.
    The lengths are read from `query` and `key`, the [B, S, H*D] inputs (reading them from q and k
    would keep the exporter's transposes alive)."""
    never = op.CastLike(op.Constant(value_float=_LOWEST.get(q.dtype, -3.0e38)), q)
    if mask.dtype == onnxscript.ir.DataType.BOOL:
        mask = op.Where(mask, op.CastLike(op.Constant(value_float=0.0), q), never)
    else:
        mask = op.Max(op.CastLike(mask, q), never)  # -inf as the dtype's lowest: a closed row averages, never NaN
    spans_query = mask.shape is not None and mask.shape[2] == q.shape[2]
    spans_keys = mask.shape is not None and mask.shape[3] == k.shape[2]
    if spans_query and spans_keys:
        return mask
    q_len = op.Shape(query, start=1, end=2)
    k_len = op.Constant(value_ints=[1]) if spans_keys else op.Shape(key, start=1, end=2)
    return op.Expand(mask, op.Concat(op.Constant(value_ints=[1, 1]), q_len, k_len, axis=0))


def scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False,
                                 scale=None, enable_gqa: bool = False):
    """aten's SDPA (a graph the attention pass left alone, or compiled at optimize 0/1) as blade's op: torch.onnx's
    own translation averages the values of a row the mask closes, where PyTorch gives zeros."""
    if dropout_p:
        raise ValueError("scaled_dot_product_attention with dropout has no ONNX Runtime form here")
    if attn_mask is not None:
        while attn_mask.shape is not None and len(attn_mask.shape) < 4:
            attn_mask = op.Unsqueeze(attn_mask, op.Constant(value_ints=[0]))
    return flash_attention(q, k, v, attn_mask, scale, is_causal)


TRANSLATIONS: dict = {FLASH_ATTENTION: flash_attention,
                      torch.ops.aten.scaled_dot_product_attention.default: scaled_dot_product_attention,
                      **register_schemas(register_contrib_schema),
                      **quantized_translations(register_contrib_schema)}
