"""What `blade serve` is asked to serve, checked before KServe is imported: options, artifact paths, model names."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from blade.errors import InputError


@dataclass
class ServeOptions:
    """How each artifact is served."""

    max_batch: int | None = None  # rows joined into one call; None: the artifact's batch range (capped at 64)
    max_delay_ms: float = 5.0
    batch_dim: str | None = None
    warmup: int = 1  # calls run on the saved example inputs before the model reports ready
    max_request_bytes: int = 64 << 20

    def __post_init__(self):
        if self.max_delay_ms < 0 or self.warmup < 0 or self.max_request_bytes < 1:
            raise InputError(f"max delay, warm-up calls and request limit must be >= 0, got {self.max_delay_ms} ms, "
                             f"{self.warmup}, {self.max_request_bytes} bytes")


def checked_artifacts(artifacts, names: list[str] | None) -> list[tuple[str, Path]]:
    """(served name, path) of each artifact: each path a readable blade artifact, names unique and URL-safe."""
    from blade.runtime.artifact import read_manifest

    paths = [Path(a) for a in artifacts]
    if names is not None and len(names) != len(paths):
        raise InputError(f"{len(names)} --name for {len(paths)} artifacts; give one name per artifact, or none")
    for path in paths:
        read_manifest(path)
    chosen = names or [p.name.removesuffix(".blade") or "model" for p in paths]
    for name in chosen:
        if not name.replace("_", "").replace("-", "").isalnum():
            raise InputError(f"model name {name!r} may hold only letters, digits, '_' and '-' (it is part of the URL)")
    if len(set(chosen)) != len(chosen):
        raise InputError(f"model names {chosen} repeat; pass --name for each artifact")
    return list(zip(chosen, paths))
