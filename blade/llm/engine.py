"""In-flight (continuous) batching on a CompiledLM: requests of any prompt and output length share the decode batch;
between decode steps a finished request's cache row is handed to the next waiting request, whose prefill runs then.

Each request is prefilled alone (a [1, prompt] call) and decoded in its own cache row, so its tokens are the ones
lm.generate gives it alone (greedy; tests/llm/test_engine.py checks this on a mixed trace): rows never mix.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch

from blade.errors import InputError
from blade.llm.sampling import Sampling


@dataclass
class Request:
    """One generation request and what it has made so far."""

    id: int
    prompt: torch.Tensor  # [n] int64
    max_new_tokens: int
    eos: tuple[int, ...]
    tokens: list[int] = field(default_factory=list)
    row: int | None = None
    sampling: Sampling | None = None  # None: the engine's
    generator: torch.Generator | None = None
    submitted: float = 0.0
    finished: float | None = None

    @property
    def done(self) -> bool:
        return len(self.tokens) >= self.max_new_tokens or bool(self.tokens and self.tokens[-1] in self.eos)

    def output(self) -> torch.Tensor:
        """The prompt then the new tokens, [n + new] int64 (as lm.generate's row without padding)."""
        return torch.cat([self.prompt, torch.tensor(self.tokens, dtype=torch.long)])


class Engine:
    """Continuous batching over `lm`'s cache rows: submit() requests, then step() or run() them."""

    def __init__(self, lm, *, sampling: Sampling | None = None, generator: torch.Generator | None = None):
        self.lm = lm
        self.sampling = sampling or Sampling()
        self.generator = generator
        self.waiting: deque[Request] = deque()
        self.rows: list[Request | None] = [None] * lm.max_batch
        self.finished: dict[int, Request] = {}
        self._next_id = 0
        self.decode_steps = 0

    def submit(self, prompt, max_new_tokens: int, eos_token_id=None, *, sampling: Sampling | None = None,
               generator: torch.Generator | None = None) -> int:
        """Queue a request (a 1-D prompt of token ids), optionally with its own sampling and generator; its id."""
        prompt = torch.as_tensor(prompt, dtype=torch.long).reshape(-1)
        if prompt.numel() == 0 or max_new_tokens < 1:
            raise InputError(f"a request needs at least one prompt token and max_new_tokens >= 1, got "
                             f"{prompt.numel()} and {max_new_tokens}")
        if prompt.numel() + max_new_tokens > self.lm.max_length:
            raise InputError(f"request of {prompt.numel()} prompt tokens + {max_new_tokens} new exceeds max_length "
                             f"{self.lm.max_length} the model was compiled for")
        eos = self.lm._eos(eos_token_id)
        request = Request(self._next_id, prompt, max_new_tokens, eos, sampling=sampling, generator=generator,
                          submitted=time.perf_counter())
        self._next_id += 1
        self.waiting.append(request)
        return request.id

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or any(r is not None for r in self.rows)

    def step(self) -> list[int]:
        """Admit waiting requests into free rows (prefilling each), then one decode step for every busy row; the
        ids of the requests that finished."""
        done = []
        with torch.no_grad():
            for row, slot in enumerate(self.rows):
                if slot is None and self.waiting:
                    request = self.waiting.popleft()
                    request.row = row
                    self.rows[row] = request
                    logits = self.lm.prefill(request.prompt[None], torch.tensor([row]),
                                             torch.tensor([request.prompt.numel() - 1]))
                    self._append(request, logits[0])
            for row, request in enumerate(self.rows):
                if request is not None and request.done:
                    done.append(self._retire(row))
            live = [row for row, r in enumerate(self.rows) if r is not None]
            if not live:
                return done
            width = live[-1] + 1  # decode runs rows 0..width-1: idle rows below it decode a dummy token at slot 0
            tokens = torch.zeros(width, dtype=torch.long)
            positions = torch.zeros(width, dtype=torch.long)
            for row in live:
                request = self.rows[row]
                tokens[row] = request.tokens[-1]
                positions[row] = request.prompt.numel() + len(request.tokens) - 1
            logits = self.lm.decode(tokens, positions)
            self.decode_steps += 1
            for row in live:
                request = self.rows[row]
                self._append(request, logits[row])
                if request.done:
                    done.append(self._retire(row))
        return done

    def run(self) -> dict[int, torch.Tensor]:
        """Step until every request has finished; request id -> its output."""
        while self.busy:
            self.step()
        return {i: r.output() for i, r in sorted(self.finished.items())}

    def cancel(self, request_id: int) -> bool:
        """Stop a waiting or running request (its caller went away); whether it was still there."""
        for request in self.waiting:
            if request.id == request_id:
                self.waiting.remove(request)
                return True
        for row, request in enumerate(self.rows):
            if request is not None and request.id == request_id:
                self.rows[row] = None
                return True
        return False

    def _append(self, request: Request, logits: torch.Tensor) -> None:
        sampling = request.sampling or self.sampling
        generator = request.generator if request.generator is not None else self.generator
        token = sampling.choose(logits[None], len(request.tokens), generator)
        request.tokens.append(int(token))

    def _retire(self, row: int) -> int:
        request = self.rows[row]
        request.finished = time.perf_counter()
        self.rows[row] = None
        self.finished[request.id] = request
        return request.id
