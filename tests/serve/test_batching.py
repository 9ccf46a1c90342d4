"""The dynamic batcher on its own: joins, splits, bounds its wait, groups by shape, and fails only a bad batch."""
import asyncio
import time

import pytest
import torch

from blade.errors import InputError
from blade.serve.batching import Batcher


class Recorder:
    """A model that doubles its input and remembers the batches it ran; it raises on a row of -1s."""

    def __init__(self, delay: float = 0.0):
        self.calls, self.delay = [], delay

    def __call__(self, tensors):
        self.calls.append([t.shape[0] for t in tensors])
        time.sleep(self.delay)
        if (tensors[0] == -1).all(dim=-1).any():
            raise RuntimeError("poisoned row")
        return [tensors[0] * 2, tensors[0].sum(-1)]


def run(coro):
    return asyncio.run(coro)


def test_concurrent_requests_join_and_each_gets_its_own_rows():
    model = Recorder()
    batcher = Batcher(model, batched=True, max_rows=16, max_delay=0.05)

    async def main():
        inputs = [torch.full((rows, 3), float(i)) for i, rows in enumerate([1, 2, 3, 1])]
        outs = await asyncio.gather(*(batcher.submit([x]) for x in inputs))
        return inputs, outs

    inputs, outs = run(main())
    assert model.calls == [[7]], "the four requests arrived within the delay: one call of 7 rows"
    for x, (doubled, total) in zip(inputs, outs):
        assert torch.equal(doubled, x * 2) and torch.equal(total, x.sum(-1))
    assert batcher.stats.batches == 1 and batcher.stats.requests == 4 and batcher.stats.rows == 7


def test_max_rows_splits_and_shapes_that_differ_past_the_batch_dim_never_join():
    model = Recorder()
    batcher = Batcher(model, batched=True, max_rows=4, max_delay=0.05)

    async def main():
        same = [torch.ones(2, 3) * i for i in range(3)]  # 6 rows: two calls of at most 4
        other = torch.ones(1, 5)  # another width: its own call
        return await asyncio.gather(*(batcher.submit([x]) for x in same + [other]))

    outs = run(main())
    assert sorted(map(tuple, model.calls)) == [(1,), (2,), (4,)]
    assert outs[3][0].shape == (1, 5)


def test_a_lone_request_waits_no_longer_than_the_delay():
    batcher = Batcher(Recorder(), batched=True, max_rows=64, max_delay=0.03)

    async def main():
        start = time.perf_counter()
        await batcher.submit([torch.ones(1, 3)])
        return time.perf_counter() - start

    assert run(main()) < 0.5


def test_a_failing_batch_fails_only_its_own_requests():
    model = Recorder(delay=0.05)
    batcher = Batcher(model, batched=True, max_rows=2, max_delay=0.01)

    async def main():
        poisoned = torch.full((2, 3), -1.0)  # a batch on its own (max_rows 2)
        good = [torch.ones(1, 3) * i for i in range(1, 5)]
        return await asyncio.gather(batcher.submit([poisoned]), *(batcher.submit([x]) for x in good),
                                    return_exceptions=True)

    results = run(main())
    assert isinstance(results[0], RuntimeError) and "poisoned" in str(results[0])
    for i, result in enumerate(results[1:], start=1):
        assert torch.equal(result[0], torch.ones(1, 3) * i * 2)
    assert batcher.stats.failed_batches == 1


def test_a_cancelled_request_does_not_disturb_its_batch():
    model = Recorder(delay=0.05)
    batcher = Batcher(model, batched=True, max_rows=8, max_delay=0.02)

    async def main():
        tasks = [asyncio.ensure_future(batcher.submit([torch.ones(1, 3) * i])) for i in range(4)]
        await asyncio.sleep(0.005)
        tasks[1].cancel()  # its caller went away while the batch was forming
        return await asyncio.gather(*tasks, return_exceptions=True)

    results = run(main())
    assert isinstance(results[1], asyncio.CancelledError)
    for i in (0, 2, 3):
        assert torch.equal(results[i][0], torch.ones(1, 3) * i * 2)


def test_unbatched_runs_each_request_alone_and_drain_answers_what_waits():
    model = Recorder(delay=0.01)
    batcher = Batcher(model, batched=False, max_rows=1, max_delay=0.05)

    async def main():
        tasks = [asyncio.ensure_future(batcher.submit([torch.ones(2, 3)])) for _ in range(3)]
        await asyncio.sleep(0)
        await batcher.drain()
        await asyncio.sleep(0)  # the callers' tasks resume on the loop's next turn
        assert all(t.done() for t in tasks), "drain returned before every waiting request was answered"
        with pytest.raises(RuntimeError, match="shutting down"):
            await batcher.submit([torch.ones(2, 3)])
        return [t.result() for t in tasks]

    outs = run(main())
    assert model.calls == [[2], [2], [2]] and len(outs) == 3


def test_a_request_over_max_rows_is_refused_with_what_to_do():
    batcher = Batcher(Recorder(), batched=True, max_rows=4, max_delay=0.0)
    with pytest.raises(InputError, match="over the server's max batch of 4"):
        run(batcher.submit([torch.ones(5, 3)]))


def test_with_concurrency_two_batches_that_cannot_join_run_at_once():
    model = Recorder(delay=0.2)
    batcher = Batcher(model, batched=True, max_rows=8, max_delay=0.0, concurrency=2)

    async def main():
        start = time.perf_counter()
        await asyncio.gather(batcher.submit([torch.ones(1, 3)]), batcher.submit([torch.ones(1, 4)]))
        return time.perf_counter() - start

    elapsed = run(main())
    assert model.calls == [[1], [1]] and elapsed < 0.35, f"two 0.2 s batches took {elapsed:.2f} s: not at once"
