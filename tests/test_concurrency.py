"""A compiled model called from many threads at once gives every call its own, correct result."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import blade
import blade.models as zoo

THREADS, CALLS = 8, 50
# Triton's CPU interpreter runs one kernel launch at a time and ~50x slower: fewer calls there (all 50 on a GPU)
INTERPRETED_CALLS = 2


@pytest.mark.parametrize("backend", ["eager", "onnxruntime", "triton"])
def test_threads_get_the_serial_results(backend):
    model, example, dims = zoo.get("bert")
    cm = blade.compile(model, example, dynamic_shapes=dims, backend=backend)
    calls = INTERPRETED_CALLS if backend == "triton" and not torch.cuda.is_available() else CALLS
    inputs = [zoo.sample_inputs("bert", seed=i, batch=1 + i % 4, seq=3 + i % 9) for i in range(THREADS * calls)]
    serial = [cm(*x) for x in inputs]

    def call(i):
        return i, cm(*inputs[i])

    with ThreadPoolExecutor(THREADS) as pool:
        results = list(pool.map(call, range(len(inputs))))
    for i, out in results:
        for got, want in zip(out, serial[i]):
            assert torch.equal(got, want), f"call {i} (batch {inputs[i][0].shape[0]}) differs from its serial run"
