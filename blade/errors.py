"""The errors blade raises: each says what went wrong, where, and what to do."""


class BladeError(Exception):
    """Base class of every error blade raises on purpose."""


class CaptureError(BladeError):
    """torch.export could not capture the model; carries torch's reason and a hint."""


class ShapeError(BladeError, ValueError):
    """An input does not match the spec the model was compiled for."""


class InputError(BladeError, TypeError):
    """Inputs of the wrong kind or structure (a non-tensor, a missing argument)."""


class ConfigError(BladeError, ValueError):
    """An option to compile, a backend name or a pipeline is invalid."""


class GraphError(BladeError):
    """The IR breaks one of its invariants (see Graph.verify)."""


class BackendError(BladeError):
    """A backend could not compile or run the graph."""


class ArtifactError(BladeError):
    """A saved artifact is damaged, tampered with, or from an incompatible version."""


class AccuracyError(BladeError):
    """A quantized or low-precision compile cannot meet its accuracy budget; `.layers` maps each
    lowered layer to the relative error with it alone lowered."""

    def __init__(self, message: str, layers: dict[str, float] | None = None):
        super().__init__(message)
        self.layers = dict(layers or {})
