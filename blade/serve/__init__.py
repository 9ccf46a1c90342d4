"""Serving: blade artifacts on KServe's model server (Open Inference Protocol v2 over REST and gRPC), dynamically
batched; `blade serve` on the command line, `blade.serve.start(...)` from Python. Needs the serve extra."""
from __future__ import annotations


def start(artifacts, **kwargs) -> int:
    """Serve the artifact directory (or list of them) until SIGTERM/SIGINT; see blade.serve.server.serve."""
    from blade.serve.server import serve

    return serve([artifacts] if isinstance(artifacts, (str, bytes)) or hasattr(artifacts, "__fspath__")
                 else list(artifacts), **kwargs)
