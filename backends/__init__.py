"""Backends: the registry, and each backend that turns the IR into something that runs."""
from blade.backends.base import AUTO_PREFERENCE, Backend, Executable, get, names, register, resolve
from blade.backends.eager import EagerBackend
from blade.backends.onnxruntime import OnnxRuntimeBackend

register(EagerBackend())
register(OnnxRuntimeBackend())

__all__ = ["AUTO_PREFERENCE", "Backend", "Executable", "get", "names", "register", "resolve"]
