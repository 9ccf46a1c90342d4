"""Backends: the registry, and each backend that turns the IR into something that runs."""
from blade.backends.base import (AUTO_PREFERENCE, MEASURED_CANDIDATES, Backend, Executable, RegionTiming, get, names,
                                 register, resolve, unregister)
from blade.backends.eager import EagerBackend
from blade.backends.inductor import InductorBackend
from blade.backends.inductor.step import StepBackend
from blade.backends.kernels import registry as kernel_registry
from blade.backends.onnxruntime import OnnxRuntimeBackend
from blade.backends.onnxruntime import peak_probe
from blade.backends.triton import TritonBackend

register(EagerBackend())
register(OnnxRuntimeBackend())
register(TritonBackend())
register(InductorBackend())
register(StepBackend())
peak_probe.install()  # ONNX Runtime's MLAS matmul competes for the machine's measured peak
kernel_registry.route_ops()  # blade's ops on CPU and CUDA ask the kernel registry per call (nothing loads until then)

__all__ = ["AUTO_PREFERENCE", "MEASURED_CANDIDATES", "Backend", "Executable", "RegionTiming", "get", "names",
           "register", "resolve", "unregister"]
