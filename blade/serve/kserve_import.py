"""KServe, imported without letting it read blade's command line (its server module parses sys.argv on import)."""
from __future__ import annotations

import sys

from blade.errors import ConfigError


def _import():
    if "tritonclient.grpc" in sys.modules:
        raise ConfigError("KServe's model server cannot be imported into a process that has imported "
                          "tritonclient.grpc: both register the Open Inference Protocol's protobuf messages "
                          "('inference.*'); run the server in its own process (blade serve)")
    argv = sys.argv
    sys.argv = argv[:1]
    try:
        import kserve
        import kserve.errors
        import kserve.model_server
    except ImportError as exc:
        raise ConfigError(f"blade serve needs KServe's model server ({exc}); install it with "
                          "pip install \"blade-compiler[serve]\" (or pip install kserve)") from None
    finally:
        sys.argv = argv
    return kserve


kserve = _import()
