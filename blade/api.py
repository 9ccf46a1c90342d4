"""blade.compile: capture → passes → backend → CompiledModel, with the report of every step."""
from __future__ import annotations

from blade.config import DEFAULT_OPTIMIZE
from blade.driver.pipeline import Compilation
from blade.runtime.compiled import CompiledModel


def compile(model, example_inputs=(), *, example_kwargs=None, dynamic_shapes=None, backend: str = "auto",
            optimize: int = DEFAULT_OPTIMIZE, passes=None, check_accuracy: bool = True,
            debug: bool = False, name: str | None = None, cache: bool | None = None,
            precision: str | None = None, quantize: str | None = None, calibration_data=None,
            accuracy_budget: float | None = None, autotune: bool | None = None,
            keep_output_dtype: bool = True) -> CompiledModel:
    """Compile `model` (nn.Module, ExportedProgram or .pt2 path) for inference.

    `dynamic_shapes` follows torch.export's convention; `backend` is a registered name or "auto";
    `optimize` picks the pass pipeline (0 none, 1 cleanup, 2 all); `passes` (a list) replaces it.
    `cache` (default $BLADE_CACHE, on) reuses an equal earlier compile from the on-disk cache.
    `precision` ("fp32", "fp16", "bf16") is what matmuls, convolutions and attention compute in;
    `quantize` ("int8_weight_only", "int8_dynamic", "int8_static", "fp8", "int4_weight_only") quantizes linear layers and
    embedding tables; `calibration_data` (an iterable of example inputs, each a tuple of arguments, a
    dict of keyword arguments or one tensor) calibrates int8_static and joins the accuracy check;
    `accuracy_budget` (max relative error vs fp32) keeps the most sensitive layers in fp32 until it
    holds, or raises blade.errors.AccuracyError. With backend="auto" and `autotune` (default
    $BLADE_AUTOTUNE, on) the backends that can run the graph are compiled and timed on the example
    inputs and the fastest is kept (the report lists every candidate's time); autotune=False follows
    the fixed rule (Triton on a CUDA GPU, else ONNX Runtime). `keep_output_dtype=False` (with precision
    "fp16"/"bf16") returns floating outputs in that precision, as `model.to(dtype)` would, instead of the
    model's fp32: no cast back, half the output bytes.
    """
    return Compilation(model, example_inputs, example_kwargs, dynamic_shapes, backend=backend, optimize=optimize,
                       passes=passes, check_accuracy=check_accuracy, debug=debug, name=name, cache=cache,
                       precision=precision, quantize=quantize, calibration_data=calibration_data,
                       accuracy_budget=accuracy_budget, autotune=autotune, keep_output_dtype=keep_output_dtype).run()
