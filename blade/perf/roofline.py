"""The roofline picture of a profile: each region at its arithmetic intensity and achieved FLOP/s,
sized by its time, under the machine's measured roofs (matplotlib, an optional extra)."""
from __future__ import annotations

from pathlib import Path

from blade.errors import ConfigError


SUFFIXES = (".svg", ".png", ".pdf")


def check_plot_path(path) -> None:
    """Refuse a path the plot cannot be written to, or a missing matplotlib, before any work is done."""
    if Path(path).suffix.lower() not in SUFFIXES:
        raise ConfigError(f"cannot draw the roofline as {path!r}: give a file ending in {', '.join(SUFFIXES)}")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ConfigError("the roofline plot needs matplotlib: pip install 'blade-compiler[plot]'") from None
    if not Path(path).resolve().parent.is_dir():
        raise ConfigError(f"cannot write the roofline to {path}: folder {Path(path).parent} does not exist")


def plot(profile, path) -> None:
    """Write the picture to `path` (.svg, .png or .pdf); regions without FLOPs or bytes cannot sit on
    log axes and are counted in the title instead."""
    check_plot_path(path)
    from matplotlib.figure import Figure  # no pyplot: the caller's plotting backend stays as it was

    peaks = profile.peaks
    placed = [r for r in profile.regions if r.flops > 0 and r.bytes > 0 and r.time_ms > 0]
    figure = Figure(figsize=(8, 5.5))
    axes = figure.subplots()
    low = min([r.intensity for r in placed] + [0.1]) / 2
    high = max([r.intensity for r in placed] + [peaks.ridge(d) for d in peaks.matmul]) * 4
    for dtype, peak in sorted(peaks.matmul.items(), key=lambda item: item[1]):
        ridge = peak / peaks.bandwidth
        xs = [low, ridge, high]
        axes.plot(xs, [low * peaks.bandwidth, peak, peak], linewidth=1.2, label=f"{dtype} roof {peak / 1e9:,.0f} GFLOP/s")
    total_ms = sum(r.time_ms for r in placed) or 1.0
    kinds = sorted({r.kind for r in placed})
    for kind in kinds:
        mine = [r for r in placed if r.kind == kind]
        axes.scatter([r.intensity for r in mine], [r.flops / (r.time_ms / 1e3) for r in mine],
                     s=[20 + 2000 * r.time_ms / total_ms for r in mine], alpha=0.55, label=kind)
    model = profile.model
    if model["flops"] and model["bytes"]:
        axes.scatter([model["intensity"]], [model["flops"] / (model["time_ms"] / 1e3)], marker="*", s=250,
                     color="black", label=f"model (MFU {100 * model['mfu']:.1f}%)")
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("arithmetic intensity (FLOP / byte crossing the region)")
    axes.set_ylabel("achieved FLOP/s")
    skipped = len(profile.regions) - len(placed)
    axes.set_title(f"{profile.model_name} on {profile.backend}: {profile.machine}\n"
                   f"memory {peaks.bandwidth / 1e9:,.0f} GB/s; {len(placed)} regions"
                   + (f" ({skipped} without FLOPs or bytes not shown)" if skipped else ""), fontsize=9)
    axes.legend(fontsize=7, loc="lower right")
    axes.grid(True, which="both", linewidth=0.3, alpha=0.5)
    figure.tight_layout()
    figure.savefig(Path(path))
