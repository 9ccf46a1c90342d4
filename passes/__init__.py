"""Graph passes and the pipelines that order them, one plain list per optimization level."""
from blade.config import OPTIMIZE_LEVELS
from blade.errors import ConfigError
from blade.passes import activations, attention, cleanup, fold, fusion, horizontal
from blade.passes.manager import Pass, PassContext, PassRecord, run_pipeline

PIPELINES: dict[int, list[Pass]] = {
    0: [],
    1: [cleanup.run],
    2: [cleanup.run, attention.run, fold.run, activations.run, horizontal.run, fusion.run],
}


def pipeline_for(level: int) -> list[Pass]:
    """The passes run at optimization level `level` (0: none, 1: cleanup, 2: everything)."""
    if level not in PIPELINES:
        raise ConfigError(f"optimize={level!r} is not a level; choose one of {list(OPTIMIZE_LEVELS)}")
    return list(PIPELINES[level])


__all__ = ["PIPELINES", "Pass", "PassContext", "PassRecord", "pipeline_for", "run_pipeline"]
