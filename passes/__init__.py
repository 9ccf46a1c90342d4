"""Graph passes and the pipelines that order them, one plain list per optimization level."""
from blade.config import OPTIMIZE_LEVELS
from blade.errors import ConfigError
from blade.passes import (activations, attention, cleanup, conv_bn, fold, fuse_epilogues, fuse_loops, fuse_norms, global_pool,
                          horizontal, precision, quantize)
from blade.passes.manager import Pass, PassContext, PassRecord, run_pipeline

# The fusion passes, in the order they must run: named norm shapes, then matmul epilogues, then the
# chains of elementwise ops and row reductions that are left.
FUSION: list[Pass] = [fuse_norms.run, fuse_epilogues.run, fuse_loops.run]

PIPELINES: dict[int, list[Pass]] = {
    0: [],
    1: [cleanup.run],
    2: [cleanup.run, conv_bn.run, global_pool.run, attention.run, fold.run, activations.run, horizontal.run, *FUSION],
}


def before_fusion(passes: list[Pass]) -> int:
    """Where passes that must run before fusion go in `passes`: before its first fusion pass, else at the end."""
    return next((i for i, p in enumerate(passes) if p in FUSION), len(passes))


def pipeline_for(level: int, lowers_precision: bool = False) -> list[Pass]:
    """The passes run at optimization level `level` (0: none, 1: cleanup, 2: everything); with
    `lowers_precision` (quantize or precision asked for) quantization and mixed precision run after
    the graph-level rewrites and before fusion, which then fuses around what they produced."""
    if level not in PIPELINES:
        raise ConfigError(f"optimize={level!r} is not a level; choose one of {list(OPTIMIZE_LEVELS)}")
    passes = list(PIPELINES[level])
    if lowers_precision:
        at = before_fusion(passes)
        passes[at:at] = [quantize.run, precision.run]
    return passes


__all__ = ["FUSION", "PIPELINES", "Pass", "PassContext", "PassRecord", "before_fusion", "pipeline_for",
           "run_pipeline"]
