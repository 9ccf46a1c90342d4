"""Dynamic batching: requests that arrive within a delay are joined along the batch dim, run as one call, split back."""
from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import sympy
import torch

from blade.errors import InputError


def batch_dim(graph, asked: str | None = None) -> tuple[str | None, str | None]:
    """The dynamic dim requests may be joined over — named `batch` (or `asked`), leading every input and output,
    starting at 1 — and, when there is none, why not (a sentence for the user)."""
    tensors = [n.val for n in graph.inputs] + [out.val for out in graph.outputs]
    leads = [meta.shape[:1] for meta in tensors]
    first = leads[0][0] if leads and leads[0] else None
    if asked is not None and asked not in graph.dims:
        raise InputError(f"--batch-dim {asked} is not a dynamic dim of {graph.name}; it has {sorted(graph.dims)}")
    if not isinstance(first, sympy.Symbol) or any(lead != (first,) for lead in leads):
        if asked is not None:
            raise InputError(f"--batch-dim {asked} does not lead every input and output of {graph.name}, so "
                             "requests cannot be joined over it")
        return None, ("no dynamic batch: the leading dims of the inputs and outputs are not one dynamic dim, "
                      "so requests carry full shapes and are not joined")
    if first.name != (asked or "batch"):
        if asked is not None:
            raise InputError(f"--batch-dim {asked} does not lead every input and output; {first.name} does")
        return None, (f"leading dim {first.name} is not named batch, so requests are not joined along it; "
                      f"pass --batch-dim {first.name} if it is a batch of independent items")
    low = graph.dims[first.name].min
    if low > 1:
        return None, f"batch dim {first.name} starts at {low}, so a request of one item could not run; not joined"
    return first.name, None


@dataclass
class _Pending:
    """One request waiting for its batch."""

    key: tuple  # what must agree for requests to join: every input's shape past the batch dim, and dtype
    tensors: list[torch.Tensor]
    rows: int
    arrived: float
    future: asyncio.Future = field(repr=False)


@dataclass
class BatchStats:
    """What the batcher has done: calls run, requests and rows in them."""

    batches: int = 0
    requests: int = 0
    rows: int = 0
    failed_batches: int = 0


class Batcher:
    """Joins concurrent `submit` calls into calls of `run` (flat tensors in, flat tensors out).

    With `batched` False every request is one call. Otherwise requests whose inputs agree past the leading dim
    are concatenated along it, up to `max_rows` rows, waiting at most `max_delay` seconds after the oldest one
    arrived; outputs are split back by each request's rows. Up to `concurrency` batches run at once in
    `executor` threads (`run` is blocking; a compiled model may be called from several threads); the oldest
    waiting request's group always goes next, so none waits longer than the delay plus the batches ahead of it.
    An exception from `run` fails only the requests of that batch.
    """

    def __init__(self, run: Callable[[list[torch.Tensor]], list[torch.Tensor]], *, batched: bool, max_rows: int,
                 max_delay: float, executor=None, on_batch: Callable[[int, int], None] | None = None,
                 concurrency: int = 1):
        if max_rows < 1 or max_delay < 0 or concurrency < 1:
            raise InputError(f"max batch and concurrency must be >= 1 and max delay >= 0, got {max_rows}, "
                             f"{concurrency} and {max_delay}")
        self.concurrency = concurrency
        self.run, self.batched, self.max_rows, self.max_delay = run, batched, max_rows, max_delay
        self.executor = executor
        self.on_batch = on_batch
        self.stats = BatchStats()
        self._waiting: deque[_Pending] = deque()
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._closing = False
        self._outstanding: set[asyncio.Future] = set()

    async def submit(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """The outputs for this request's flat inputs, once its batch has run."""
        if self._closing:
            raise RuntimeError("the server is shutting down; it takes no new requests")
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done():
            self._wake = asyncio.Event()
            self._worker = loop.create_task(self._serve())
        rows = int(tensors[0].shape[0]) if self.batched and tensors and tensors[0].dim() else 1
        if self.batched and rows > self.max_rows:
            raise InputError(f"a request of {rows} rows is over the server's max batch of {self.max_rows}; "
                             "split it, or start the server with a larger --max-batch")
        key = tuple((tuple(t.shape[1:]), t.dtype) for t in tensors) if self.batched else ()
        pending = _Pending(key, tensors, rows, time.monotonic(), loop.create_future())
        self._outstanding.add(pending.future)
        pending.future.add_done_callback(self._outstanding.discard)
        self._waiting.append(pending)
        self._wake.set()
        return await pending.future

    async def drain(self) -> None:
        """Refuse new requests and wait until every waiting one has been answered."""
        self._closing = True
        if self._wake is not None:
            self._wake.set()
        while self._outstanding:
            await asyncio.wait(list(self._outstanding))

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        slots = asyncio.Semaphore(self.concurrency)
        running: set[asyncio.Task] = set()
        while True:
            self._drop_cancelled()
            if not self._waiting:
                self._wake.clear()
                await self._wake.wait()
                continue
            await slots.acquire()  # while every slot is busy, requests keep arriving and join the next group
            group = await self._next_group()
            if not group:
                slots.release()
                continue
            task = loop.create_task(self._run_group(loop, group))
            running.add(task)
            task.add_done_callback(lambda t: (running.discard(t), slots.release()))

    def _drop_cancelled(self) -> None:
        self._waiting = deque(p for p in self._waiting if not p.future.done())

    async def _next_group(self) -> list[_Pending]:
        """The oldest request and those that can join it, once the group is full or the oldest has waited enough."""
        oldest = self._waiting[0]
        if self.batched:
            deadline = oldest.arrived + self.max_delay
            while self._rows_like(oldest.key) < self.max_rows and not self._closing:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), left)
                except asyncio.TimeoutError:
                    break
        self._drop_cancelled()
        if not self._waiting:
            return []
        oldest = self._waiting[0]
        group, rows, rest = [], 0, deque()
        for pending in self._waiting:
            fits = pending.key == oldest.key and rows + pending.rows <= self.max_rows
            if fits and (self.batched or not group):
                group.append(pending)
                rows += pending.rows
            else:
                rest.append(pending)
        self._waiting = rest
        return group

    def _rows_like(self, key: tuple) -> int:
        return sum(p.rows for p in self._waiting if p.key == key and not p.future.done())

    async def _run_group(self, loop, group: list[_Pending]) -> None:
        inputs = (group[0].tensors if len(group) == 1 else
                  [torch.cat(parts) for parts in zip(*(p.tensors for p in group))])
        rows = sum(p.rows for p in group)
        try:
            outputs = await loop.run_in_executor(self.executor, self.run, inputs)
        except Exception as exc:  # one batch's failure is its requests' answer, not the server's end
            self.stats.failed_batches += 1
            for pending in group:
                if not pending.future.done():
                    pending.future.set_exception(exc)
            return
        finally:
            self.stats.batches += 1
            self.stats.requests += len(group)
            self.stats.rows += rows
            if self.on_batch is not None:
                self.on_batch(len(group), rows)
        start = 0
        for pending in group:
            part = (outputs if len(group) == 1 else
                    [out.narrow(0, start, pending.rows) for out in outputs])
            start += pending.rows
            if not pending.future.done():  # a caller that went away gets nothing; the others are unaffected
                pending.future.set_result(part)
