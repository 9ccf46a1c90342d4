"""Backends: the registry, and each backend that turns the IR into something that runs."""
from blade.backends.base import AUTO_PREFERENCE, Backend, Executable, get, names, register, resolve
from blade.backends.eager import EagerBackend

register(EagerBackend())

__all__ = ["AUTO_PREFERENCE", "Backend", "Executable", "get", "names", "register", "resolve"]
