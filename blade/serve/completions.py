"""An LLM behind an OpenAI-style `/v1/completions` (streaming or not), token ids in and out, on blade.llm's
in-flight batching engine; one thread steps the engine while requests come and go between its decode steps."""
from __future__ import annotations

import asyncio
import importlib
import json
import queue
import threading
import time
import uuid

import torch
from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from blade.errors import BladeError, InputError
from blade.llm.engine import Engine
from blade.llm.sampling import Sampling
from blade.serve.kserve_import import kserve

ROUTES = ("/v1/completions", "/openai/v1/completions")


def _factory(spec: str):
    module, _, name = spec.partition(":")
    if not module or not name:
        raise InputError(f"--lm {spec!r} is not 'module:factory' (a function returning a Hugging Face causal LM)")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise InputError(f"cannot load --lm {spec!r}: {exc}") from None


def lm_model(spec: str, *, name: str = "lm", max_batch: int = 8, max_length: int = 512):
    """The KServe model of `spec`: a blade.llm artifact directory (loaded as saved: no model code) or
    'module:factory' (compiled with max_batch and max_length when the server loads it)."""
    from pathlib import Path

    if Path(spec).is_dir():
        import blade.llm
        from blade.llm.saved import read_lm_manifest

        read_lm_manifest(spec)  # a damaged artifact fails here, before the server starts
        return CompletionsModel(name, lambda: blade.llm.load(spec))
    build = _factory(spec)

    def compile_lm():
        import blade.llm

        built = build()
        model = built[0] if isinstance(built, tuple) else built
        return blade.llm.compile(model, max_batch=max_batch, max_length=max_length)

    return CompletionsModel(name, compile_lm)


class _Stream:
    """One request's tokens as the engine makes them, handed to its asyncio task."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.tokens, self.done = loop, asyncio.Queue(), False

    def put(self, item) -> None:
        self.loop.call_soon_threadsafe(self.tokens.put_nowait, item)


class CompletionsModel(kserve.Model):
    """A causal LM compiled with blade.llm at load, answering OpenAI completions requests with token ids."""

    def __init__(self, name: str, build_lm):
        super().__init__(name)
        self.build_lm = build_lm
        self.ready = False
        self._inbox: queue.Queue = queue.Queue()
        self._wake = threading.Event()
        self._streams: dict[int, _Stream] = {}
        self._sent: dict[int, int] = {}

    def load(self) -> bool:
        self.lm = self.build_lm()
        self.max_length = self.lm.max_length
        self.vocab = self.lm.decode_program.graph.outputs[0].val.shape[-1]  # the logits' last dim
        self.engine = Engine(self.lm)
        threading.Thread(target=self._drive, name=f"blade-lm-{self.name}", daemon=True).start()
        self.ready = True
        return True

    async def predict(self, payload, headers=None, response_headers=None):
        raise kserve.errors.InvalidInput(f"model {self.name} is a language model: POST token ids to /v1/completions")

    # the engine thread -------------------------------------------------------------------------------------
    def _drive(self) -> None:
        while True:
            self._take_inbox()
            if not self.engine.busy:
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                finished = set(self.engine.step())
            except Exception as exc:  # a failed step fails the requests in it; the engine starts clean
                for request_id, stream in list(self._streams.items()):
                    self.engine.cancel(request_id)
                    stream.put(exc)
                self._streams.clear()
                self._sent.clear()
                continue
            self._deliver(finished)

    def _take_inbox(self) -> None:
        while True:
            try:
                action, *args = self._inbox.get_nowait()
            except queue.Empty:
                return
            if action == "submit":
                stream, prompt, new, eos, sampling, generator = args
                try:
                    request_id = self.engine.submit(prompt, new, eos, sampling=sampling, generator=generator)
                except BladeError as exc:
                    stream.put(exc)
                    continue
                self._streams[request_id] = stream
                self._sent[request_id] = 0
                stream.put(("id", request_id))
            else:
                (request_id,) = args
                if self._streams.pop(request_id, None) is not None:
                    self.engine.cancel(request_id)
                    self._sent.pop(request_id, None)

    def _deliver(self, finished: set[int]) -> None:
        live = {r.id: r for r in self.engine.rows if r is not None}
        live.update({i: self.engine.finished[i] for i in finished})
        for request_id, stream in list(self._streams.items()):
            request = live.get(request_id)
            if request is None:
                continue
            new = request.tokens[self._sent[request_id]:]
            self._sent[request_id] = len(request.tokens)
            if new:
                stream.put(("tokens", new))
            if request_id in finished:
                reason = "stop" if request.tokens and request.tokens[-1] in request.eos else "length"
                stream.put(("done", reason))
                del self._streams[request_id], self._sent[request_id]
                self.engine.finished.pop(request_id, None)

    # the request side --------------------------------------------------------------------------------------
    def parse(self, body: dict) -> tuple[list[torch.Tensor], dict]:
        """The prompts (token ids) and generation settings of an OpenAI completions request; InvalidInput if bad."""
        if not isinstance(body, dict):
            raise kserve.errors.InvalidInput("the body must be a JSON object")
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            prompts = [prompt]
        elif (isinstance(prompt, list) and prompt and all(isinstance(p, list) and p and
                                                          all(isinstance(t, int) for t in p) for p in prompt)):
            prompts = prompt
        else:
            raise kserve.errors.InvalidInput("prompt must be token ids: a list of ints, or a list of such lists "
                                             "(this server has no tokenizer; text prompts are not accepted)")
        new = body.get("max_tokens", 16)
        if not isinstance(new, int) or new < 1:
            raise kserve.errors.InvalidInput(f"max_tokens must be an int >= 1, got {new!r}")
        if body.get("n", 1) != 1 or body.get("best_of", 1) != 1 or body.get("echo") or body.get("logprobs"):
            raise kserve.errors.InvalidInput("n, best_of, echo and logprobs are not supported (n=1 only)")
        temperature = body.get("temperature", 1.0)
        top_p = body.get("top_p")
        if not isinstance(temperature, (int, float)) or temperature < 0:
            raise kserve.errors.InvalidInput(f"temperature must be a number >= 0, got {temperature!r}")
        try:
            sampling = (Sampling() if temperature == 0 else
                        Sampling(do_sample=True, temperature=float(temperature), top_p=top_p,
                                 top_k=body.get("top_k")))
        except BladeError as exc:
            raise kserve.errors.InvalidInput(str(exc)) from None
        seed = body.get("seed")
        stop = body.get("stop_token_ids")
        if stop is not None and not (isinstance(stop, list) and all(isinstance(t, int) for t in stop)):
            raise kserve.errors.InvalidInput("stop_token_ids must be a list of token ids")
        vocab = self.vocab
        tensors = []
        for ids in prompts:
            if vocab is not None and any(not 0 <= t < vocab for t in ids):
                raise kserve.errors.InvalidInput(f"prompt token ids must be in [0, {vocab})")
            if len(ids) + new > self.max_length:
                raise kserve.errors.InvalidInput(f"{len(ids)} prompt tokens + max_tokens {new} exceed this model's "
                                                 f"max length {self.max_length}")
            tensors.append(torch.tensor(ids, dtype=torch.long))
        return tensors, {"max_tokens": new, "sampling": sampling, "seed": seed, "eos": stop,
                         "stream": bool(body.get("stream", False))}

    async def generate(self, prompt: torch.Tensor, settings: dict, index: int):
        """Yield ("tokens", [ids]) as they come, then ("done", finish_reason); cancels the request if abandoned."""
        stream = _Stream(asyncio.get_running_loop())
        generator = None
        if settings["seed"] is not None:
            generator = torch.Generator().manual_seed(int(settings["seed"]) + index)
        self._inbox.put(("submit", stream, prompt, settings["max_tokens"], settings["eos"], settings["sampling"],
                         generator))
        self._wake.set()
        request_id = None
        try:
            while True:
                item = await stream.tokens.get()
                if isinstance(item, Exception):
                    raise item
                if item[0] == "id":
                    request_id = item[1]
                    continue
                yield item
                if item[0] == "done":
                    return
        finally:
            if request_id is not None:
                self._inbox.put(("cancel", request_id))  # a no-op once it has finished
                self._wake.set()


def _error(status: int, message: str):
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "code": status}},
                        status_code=status)


def register_routes(app, models: list[CompletionsModel]) -> None:
    """POST /v1/completions (and /openai/v1/completions) on KServe's app for these models."""
    by_name = {m.name: m for m in models}

    async def completions(request: Request):
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return _error(400, f"the body is not JSON ({exc})")
        name = body.get("model") if isinstance(body, dict) else None
        model = by_name.get(name) if name is not None else (next(iter(by_name.values())) if len(by_name) == 1
                                                             else None)
        if model is None:
            return _error(404, f"no language model {name!r}; this server has {sorted(by_name)}")
        if not model.ready:
            return _error(503, f"model {model.name} is loading; retry when /v2/models/{model.name}/ready answers")
        try:
            prompts, settings = model.parse(body)
        except kserve.errors.InvalidInput as exc:
            return _error(400, str(exc))
        completion_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": completion_id, "object": "text_completion", "created": created, "model": model.name}
        if settings["stream"]:
            return StreamingResponse(_stream(model, prompts, settings, head), media_type="text/event-stream")
        choices = await asyncio.gather(*(_collect(model, p, settings, i) for i, p in enumerate(prompts)),
                                       return_exceptions=True)
        failed = [c for c in choices if isinstance(c, Exception)]
        if failed:
            return _error(400 if isinstance(failed[0], BladeError) else 500, str(failed[0]))
        used = sum(len(c["token_ids"]) for c in choices)
        given = sum(len(p) for p in prompts)
        return {**head, "choices": choices,
                "usage": {"prompt_tokens": given, "completion_tokens": used, "total_tokens": given + used}}

    for route in ROUTES:
        app.add_api_route(route, completions, methods=["POST"])


async def _collect(model: CompletionsModel, prompt, settings: dict, index: int) -> dict:
    tokens, reason = [], None
    async for kind, value in model.generate(prompt, settings, index):
        if kind == "tokens":
            tokens += value
        else:
            reason = value
    return {"index": index, "text": "", "token_ids": tokens, "finish_reason": reason, "logprobs": None}


async def _stream(model: CompletionsModel, prompts, settings: dict, head: dict):
    """Server-sent events: a chunk per new token of each prompt, then [DONE]."""
    merged: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, prompt):
        try:
            async for item in model.generate(prompt, settings, index):
                await merged.put((index, item))
        except Exception as exc:
            await merged.put((index, ("error", str(exc))))

    tasks = [asyncio.ensure_future(pump(i, p)) for i, p in enumerate(prompts)]
    open_ = len(tasks)
    try:
        while open_:
            index, (kind, value) = await merged.get()
            if kind == "error":
                yield f"data: {json.dumps({'error': {'message': value}})}\n\n"
                open_ -= 1
                continue
            choice = {"index": index, "text": "", "token_ids": value if kind == "tokens" else [],
                      "finish_reason": value if kind == "done" else None, "logprobs": None}
            open_ -= kind == "done"
            yield f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        for task in tasks:
            task.cancel()
