"""The ops floor: blade's own operators (attention, quantized) and the op-info table every later floor reads."""
from blade.ops import attention, quantized  # noqa: F401  (importing registers the torch.library ops)
