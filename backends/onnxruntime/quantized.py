"""blade::qlinear and blade::qembedding → ONNX Runtime, in the forms measured fastest on its CPU kernels.

bench/ort_quant_ops.py times every candidate on one BERT-base sized layer (results in
bench/results/ort_quant_ops.md); the choice per mode:

| mode        | lowering                                                                  |
|-------------|---------------------------------------------------------------------------|
| dynamic     | rows scaled to max |x| = 127, com.microsoft DynamicQuantizeMatMul (its per-tensor uint8 quantization of rows already at full range is per-token 8-bit like the spec's, on a grid of step 254/255 with a half-step offset: not bit-equal to the eager reference, as accurate), rescaled, bias added |
| static      | QDQ: QuantizeLinear/DequantizeLinear on x with the calibrated scale, DequantizeLinear on the int8 weight, MatMul (ONNX Runtime fuses the QDQ group into an integer matmul; x saturates at -128 where the spec clamps at -127, reached only beyond the calibrated range) |
| weight_only | the int8 weight cast and scaled (folded to fp32 when the session loads) + MatMul: DequantizeLinear + MatMul would become MatMulNBits, which quantizes x as well |
| fp8         | x per row scaled to 448 and cast to float8e4m3fn and back, the fp8 weight cast to fp32, MatMul: exact to the spec, but emulated (a CPU has no fp8 matmul) |

On that layer (2-core AMD EPYC, onnxruntime 1.32) DynamicQuantizeMatMul and the fused QDQ group run
2.3-2.6x faster than fp32; MatMulInteger and MatMulIntegerToFloat with int8 activations run at a third
of fp32's speed, and MatMulNBits (8-bit blocks, x quantized per block) at 1.2-1.3x fp32, half the speed
of DynamicQuantizeMatMul, though with 0.7x its error. The per-token scaling costs about 10 % of a layer's time (dqmm_per_token
against dqmm_per_tensor) and lowers its error from 1.29e-2 to 1.09e-2; the per-tensor form is not
used because it is not the op's meaning: one outlier token at serving time would coarsen every other
token's quantization. The int8 weight is stored [N, K]
as in the IR; its transpose is constant and folded when the session loads.
"""
from __future__ import annotations

import onnx
import onnxscript
from onnxscript import opset20 as op

from blade.ops.quantized import FP8_MAX, INT8_MAX, QEMBEDDING, QLINEAR

msft = onnxscript.values.Opset("com.microsoft", 1)


def _row_scale(x, top: float):
    """max |x| over the last axis / top, [..., 1] (from the row's max and min: no |x| copy), at least 1e-30 so
    that a row of zeros divides to zeros."""
    axes = op.Constant(value_ints=[-1])
    largest = op.Max(op.ReduceMax(x, axes, keepdims=1), op.Neg(op.ReduceMin(x, axes, keepdims=1)))
    return op.Max(op.Div(largest, op.CastLike(op.Constant(value_float=top), x)),
                  op.CastLike(op.Constant(value_float=1e-30), x))


def _plus_bias(y, bias):
    return y if bias is None else op.Add(y, op.CastLike(bias, y))


def qlinear(x, weight, weight_scale, bias=None, mode: str = "dynamic", input_scale=None):
    """blade::qlinear in the form chosen per mode (module docstring)."""
    weight_t = op.Transpose(weight, perm=[1, 0])  # [K, N]: constant, folded at load
    if mode == "dynamic":
        scale = _row_scale(x, INT8_MAX)
        y = msft.DynamicQuantizeMatMul(op.Div(x, scale), weight_t, op.CastLike(weight_scale, x))
        return _plus_bias(op.Mul(y, scale), bias)
    if mode == "static":
        s = op.Constant(value_float=float(input_scale))
        zero = op.Constant(value=onnx.helper.make_tensor("zero", onnx.TensorProto.INT8, [], [0]))
        x_dq = op.DequantizeLinear(op.QuantizeLinear(x, s, zero), s, zero)
        w_zero = op.Expand(zero, op.Shape(weight_scale))
        w_dq = op.DequantizeLinear(weight_t, weight_scale, w_zero, axis=1)
        return _plus_bias(op.MatMul(x_dq, w_dq), bias)
    if mode == "weight_only":  # not DequantizeLinear: ONNX Runtime would turn DQ + MatMul into MatMulNBits
        w_dq = op.Mul(op.Cast(weight_t, to=onnx.TensorProto.FLOAT), weight_scale)  # that quantizes x too
        return _plus_bias(op.MatMul(x, op.CastLike(w_dq, x)), bias)
    if mode == "fp8":
        scale = _row_scale(x, FP8_MAX)
        x8 = op.Cast(op.Cast(op.Div(x, scale), to=onnx.TensorProto.FLOAT8E4M3FN), to=onnx.TensorProto.FLOAT)
        y = op.MatMul(x8, op.Cast(weight_t, to=onnx.TensorProto.FLOAT))
        return _plus_bias(op.Mul(op.Mul(y, scale), op.CastLike(weight_scale, x)), bias)
    raise ValueError(f"blade::qlinear mode {mode!r} has no ONNX Runtime lowering")


def qembedding(table, row_scale, indices):
    """The rows read, dequantized: Gather(int8 table) * Gather(scale)."""
    rows = op.Cast(op.Gather(table, indices, axis=0), to=onnx.TensorProto.FLOAT)
    return op.Mul(rows, op.Unsqueeze(op.Gather(row_scale, indices, axis=0), op.Constant(value_ints=[-1])))


def translations(register_contrib_schema) -> dict:
    register_contrib_schema("DynamicQuantizeMatMul")
    return {QLINEAR: qlinear, QEMBEDDING: qembedding}
