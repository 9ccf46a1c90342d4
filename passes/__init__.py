"""Graph passes and the pipelines that order them, one plain list per optimization level."""
from blade.config import OPTIMIZE_LEVELS
from blade.errors import ConfigError
from blade.passes import activations, attention, cleanup, fold, fusion, horizontal, precision, quantize
from blade.passes.manager import Pass, PassContext, PassRecord, run_pipeline

PIPELINES: dict[int, list[Pass]] = {
    0: [],
    1: [cleanup.run],
    2: [cleanup.run, attention.run, fold.run, activations.run, horizontal.run, fusion.run],
}


def pipeline_for(level: int, lowers_precision: bool = False) -> list[Pass]:
    """The passes run at optimization level `level` (0: none, 1: cleanup, 2: everything); with
    `lowers_precision` (quantize or precision asked for) quantization and mixed precision run after
    the graph-level rewrites and before fusion, which then fuses around what they produced."""
    if level not in PIPELINES:
        raise ConfigError(f"optimize={level!r} is not a level; choose one of {list(OPTIMIZE_LEVELS)}")
    passes = list(PIPELINES[level])
    if lowers_precision:
        at = passes.index(fusion.run) if fusion.run in passes else len(passes)
        passes[at:at] = [quantize.run, precision.run]
    return passes


__all__ = ["PIPELINES", "Pass", "PassContext", "PassRecord", "pipeline_for", "run_pipeline"]
