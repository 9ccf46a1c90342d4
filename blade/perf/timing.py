"""Timing for bench and demo: contenders interleaved (A B A B …), median after warm-up, device-synced."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_interleaved(contenders: dict[str, Callable[[], object]], *, warmup: int = 3, repeat: int = 20,
                     device: str = "cpu") -> dict[str, float]:
    """Median seconds per call of each contender, timed in alternation so drift hits all alike."""
    samples = sample_interleaved(contenders, warmup=warmup, repeat=repeat, device=device)
    return {name: statistics.median(times) for name, times in samples.items()}


def sample_interleaved(contenders: dict[str, Callable[[], object]], *, warmup: int = 3, repeat: int = 20,
                       device: str = "cpu") -> dict[str, list[float]]:
    """Seconds of every timed call of each contender, in alternation, after `warmup` untimed rounds."""
    for _ in range(warmup):
        for fn in contenders.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeat):
        for name, fn in contenders.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            samples[name].append(time.perf_counter() - start)
    return samples
