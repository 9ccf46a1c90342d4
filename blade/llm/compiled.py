"""CompiledLM: a causal LM's prefill and decode programs over one static KV cache, and generate() on them."""
from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch

import blade
from blade.errors import InputError
from blade.llm.hf_step import DecodeStep, PrefillStep, cache_layout
from blade.llm.sampling import Sampling
from blade.runtime.compiled import CompiledModel

PRECISIONS = {None: None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class GenerationStats:
    """What the last generate() did: token counts and seconds, split into prefill and decode."""

    batch: int = 0
    prompt_tokens: int = 0
    new_tokens: int = 0  # tokens chosen, all rows (finished rows' padding excluded)
    decode_steps: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    step_bytes: list = field(default_factory=list)  # bytes each decode step read: weights + filled cache

    @property
    def tokens_per_s(self) -> float:
        total = self.prefill_s + self.decode_s
        return self.new_tokens / total if total else 0.0

    def decode_bandwidth(self) -> float:
        """Bytes/s the decode steps moved (weights and the cache they read)."""
        return sum(self.step_bytes) / self.decode_s if self.decode_s else 0.0


class CompiledLM:
    """A causal LM compiled for generation: .generate(...) as transformers' generate; .prefill/.decode the steps."""

    def __init__(self, prefill: CompiledModel, decode: CompiledModel, cache: dict[str, torch.Tensor], *,
                 max_batch: int, max_length: int, eos_token_ids: tuple[int, ...], pad_token_id: int | None,
                 weight_bytes: int, name: str):
        self.prefill_program, self.decode_program = prefill, decode
        self.cache = cache
        self.max_batch, self.max_length = max_batch, max_length
        self.eos_token_ids, self.pad_token_id = eos_token_ids, pad_token_id
        self.weight_bytes = weight_bytes
        self.name = name
        self.stats = GenerationStats()
        self._slot_bytes = sum(t[0, 0].numel() * t.element_size() for t in cache.values())  # one token, all layers

    def prefill(self, input_ids: torch.Tensor, rows: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """Write each prompt (left-aligned, right-padded) into its cache row; the logits at each row's `last`."""
        return self.prefill_program(input_ids, rows, last)

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """One token for each of cache rows 0..B-1 at its position; the logits [B, vocab]."""
        return self.decode_program(tokens[:, None], positions[:, None])

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *, max_new_tokens: int,
                 min_new_tokens: int = 0, do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, eos_token_id=None, pad_token_id: int | None = None,
                 generator: torch.Generator | None = None,
                 on_step: Callable[[int], None] | None = None) -> torch.Tensor:
        """[B, prompt + new] int64: the prompt as given, then the new tokens (rows that stopped early padded with
        pad_token_id), as transformers' generate returns for the same arguments. `on_step(n)` is called after
        every new token."""
        eos = self._eos(eos_token_id)
        pad = pad_token_id if pad_token_id is not None else (self.pad_token_id if self.pad_token_id is not None
                                                              else (eos[0] if eos else 0))
        sampling = Sampling(do_sample, temperature, top_k, top_p, min_new_tokens, eos)
        prompts, lengths = self._prompts(input_ids, attention_mask, max_new_tokens, pad)
        batch = prompts.shape[0]
        stats = self.stats = GenerationStats(batch=batch, prompt_tokens=int(lengths.sum()))
        with torch.no_grad():
            start = time.perf_counter()
            logits = self.prefill(prompts, torch.arange(batch), lengths - 1)
            stats.prefill_s = time.perf_counter() - start
            unfinished = torch.ones(batch, dtype=torch.bool)
            chosen = []
            start = time.perf_counter()
            for step in range(max_new_tokens):
                token = sampling.choose(logits, step, generator)
                if eos:
                    token = torch.where(unfinished, token, torch.full_like(token, pad))
                stats.new_tokens += int(unfinished.sum())
                chosen.append(token)
                if on_step is not None:
                    on_step(step + 1)
                if eos:
                    unfinished &= ~torch.isin(token, torch.tensor(eos))
                if step + 1 == max_new_tokens or not unfinished.any():
                    break
                positions = lengths + step
                logits = self.decode(token, positions)
                stats.decode_steps += 1
                stats.step_bytes.append(self.weight_bytes + self._slot_bytes * int((positions + 1).sum()))
            stats.decode_s = time.perf_counter() - start
        return torch.cat([input_ids, torch.stack(chosen, 1)], 1)

    def serve(self, requests, *, eos_token_id=None) -> list[torch.Tensor]:
        """Run (prompt, max_new_tokens) requests with in-flight batching (blade.llm.Engine); each output is the prompt
        then its new tokens, in request order."""
        from blade.llm.engine import Engine

        engine = Engine(self)
        ids = [engine.submit(prompt, new, eos_token_id) for prompt, new in requests]
        outputs = engine.run()
        return [outputs[i] for i in ids]

    def _eos(self, eos_token_id) -> tuple[int, ...]:
        if eos_token_id is None:
            return self.eos_token_ids
        return tuple(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else (int(eos_token_id),)

    def _prompts(self, input_ids, attention_mask, max_new_tokens: int, pad: int):
        """Each row's real tokens moved to the left (positions 0..n-1, as generate numbers them), and n."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
            raise InputError(f"input_ids must be an int64 tensor [batch, prompt], got "
                             f"{getattr(input_ids, 'dtype', type(input_ids).__name__)} "
                             f"{list(getattr(input_ids, 'shape', []))}")
        batch, width = input_ids.shape
        if not 1 <= batch <= self.max_batch:
            raise InputError(f"input_ids has batch {batch}; {self.name} was compiled for 1..{self.max_batch} "
                             f"(blade.llm.compile(max_batch=...))")
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        if mask.shape != input_ids.shape:
            raise InputError(f"attention_mask has shape {list(mask.shape)}; it must match input_ids "
                             f"{list(input_ids.shape)}")
        lengths = mask.sum(1)
        if int(lengths.min()) < 1:
            raise InputError("a row of attention_mask is all zeros: every prompt needs at least one token")
        if int(lengths.max()) + max_new_tokens > self.max_length:
            raise InputError(f"prompt ({int(lengths.max())} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                             f"max_length {self.max_length} this model was compiled for")
        prompts = torch.full((batch, int(lengths.max())), pad, dtype=torch.long)
        for row in range(batch):
            prompts[row, :lengths[row]] = input_ids[row][mask[row]]
        return prompts, lengths

    def save(self, path) -> None:
        """Write both programs and the weights once to the directory `path`; blade.llm.load reads it back."""
        from blade.llm.saved import save

        save(self, path)

    def __repr__(self) -> str:
        return (f"CompiledLM({self.name}, max_batch={self.max_batch}, max_length={self.max_length}, "
                f"backend={self.decode_program.backend})")


def compile_lm(model: torch.nn.Module, *, max_batch: int = 1, max_length: int = 512, precision: str | None = None,
               quantize: str | None = None, accuracy_budget: float | None = None, backend: str = "auto",
               check_accuracy: bool = True, cache: bool | None = None) -> CompiledLM:
    """Compile a Hugging Face causal LM for generation: a prefill and a decode program over a static KV cache
    [max_batch, max_length] per layer, written in place. `precision` "bf16"/"fp16" runs weights and cache in
    that dtype (a copy of the model; yours is untouched); `quantize` and `accuracy_budget` (the largest relative
    error of the logits vs fp32) are blade.compile's: int8_weight_only is what decoding gains from."""
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {sorted(p for p in PRECISIONS if p)} or None, got {precision!r}")
    if max_batch < 1 or max_length < 2:
        raise InputError(f"max_batch must be >= 1 and max_length >= 2, got {max_batch} and {max_length}")
    cache_layout(model)  # a clear error before anything is copied
    dtype = PRECISIONS[precision] or next(model.parameters()).dtype
    if dtype != next(model.parameters()).dtype:
        model = copy.deepcopy(model).to(dtype)
    model = model.eval()
    name = type(model).__name__
    options = dict(quantize=quantize, accuracy_budget=accuracy_budget, check_accuracy=check_accuracy, cache=cache,
                   passes=decode_passes())
    prefill_step = PrefillStep(model, max_batch, max_length, dtype)
    decode_step = DecodeStep(model, max_batch, max_length, dtype)
    prefill, decode = _programs(prefill_step, decode_step, model, max_batch, max_length, name, options, backend)
    share_constants(decode.graph, prefill.graph, keep_out={p.untyped_storage().data_ptr() for p in model.parameters()})
    shared = {n: torch.zeros_like(t) for n, t in decode.graph.state.items()}
    for program in (prefill, decode):
        if set(program.graph.state) != set(shared):
            raise RuntimeError(f"prefill and decode of {name} keep different state: "
                               f"{sorted(program.graph.state)} vs {sorted(shared)}")
        program.graph.state.update(shared)
    config = model.generation_config if getattr(model, "generation_config", None) is not None else model.config
    eos = getattr(config, "eos_token_id", None)
    eos = () if eos is None else (tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),))
    weight_bytes = streamed_bytes(decode.graph)
    return CompiledLM(prefill, decode, shared, max_batch=max_batch, max_length=max_length, eos_token_ids=eos,
                      pad_token_id=getattr(config, "pad_token_id", None), weight_bytes=weight_bytes, name=name)


def share_constants(keep, other, keep_out: set[int] = frozenset()) -> int:
    """Point each constant of graph `other` at an equal one of graph `keep` (same shape, dtype, strides and values),
    so that two programs of one model hold one copy of the weights (the transposed ones each compile makes
    included); the bytes freed. Tensors whose storage is in `keep_out` (the user's own parameters) are left alone."""
    def key(t: torch.Tensor) -> tuple:
        flat = t.reshape(-1)
        sample = flat[:: max(1, flat.numel() // 64)][:64]
        return tuple(t.shape), t.dtype, tuple(t.stride()), sample.double().sum().item()

    by_key: dict[tuple, list[torch.Tensor]] = {}
    for tensor in keep.constants.values():
        if tensor.numel():
            by_key.setdefault(key(tensor), []).append(tensor)
    freed = 0
    with torch.no_grad():
        for tensor in other.constants.values():
            ptr = tensor.untyped_storage().data_ptr()
            if not tensor.numel() or ptr in keep_out:
                continue
            for candidate in by_key.get(key(tensor), []):
                if candidate.untyped_storage().data_ptr() == ptr:
                    break  # already one storage
                if torch.equal(candidate, tensor):
                    freed += tensor.numel() * tensor.element_size()
                    # set_ re-points this very tensor object, so the backend's program that holds it reads the
                    # kept copy too; its own storage is freed with the last reference
                    tensor.set_(candidate)
                    break
    return freed


def streamed_bytes(graph) -> int:
    """Bytes of the constants a step reads whole: all but those only gathered from (an embedding reads a row)."""
    from blade.ops.info import GATHERS
    from blade.ops.quantized import QEMBEDDING

    total = 0
    for node in graph.constant_nodes:
        if any(user.target not in GATHERS and user.target != QEMBEDDING for user in graph.users(node)):
            tensor = graph.constants[node.name]
            total += tensor.numel() * tensor.element_size()
    return total


def decode_passes() -> list:
    """blade's graph rewrites without the fusion passes: every layer as aten.linear (linear_form), so the eager
    backend's skinny kernel reads each weight once a step and quantize (added by blade.compile when asked) sees
    each one; a fused region would hide its layer from the backend. RoPE's rotate_half becomes a roll (rotary):
    the eager backend pays for ops by their count."""
    from blade.passes import activations, attention, cleanup, fold, horizontal, linear_form, rotary

    return [cleanup.run, linear_form.run, attention.run, rotary.run, fold.run, activations.run, horizontal.run]


def step_backends(backend: str, model: torch.nn.Module) -> tuple[str, str]:
    """The backends of the prefill and decode programs: `backend` for both when named; for "auto", the eager backend
    (it writes the cache in place and runs blade's kernels per call) for the prefill, and for the decode step the
    same program with its glue compiled by Inductor (inductor_step) where that runs (a CPU with a C++ compiler),
    else eager."""
    if backend != "auto":
        return backend, backend
    from blade.backends import get
    from blade.target import detect

    device = next(model.parameters()).device.type
    return "eager", "inductor_step" if get("inductor_step").available(detect(device)) else "eager"


def compile_decode_shapes(decode, max_batch: int) -> None:
    """Call a decode program on inductor_step at batch 2 (where max_batch allows) and at batch 1, token 0 into slot
    0, so that Inductor compiles both kinds of batch now rather than in a generate; the cache is zeroed after."""
    if decode.backend != "inductor_step":
        return
    with torch.no_grad():
        for rows in sorted({min(2, max_batch), 1}):
            # two tensors (dynamo guards on aliasing), laid out as decode() passes them
            decode(torch.zeros((rows,), dtype=torch.long)[:, None], torch.zeros((rows,), dtype=torch.long)[:, None])
        for tensor in decode.graph.state.values():
            tensor.zero_()


def _programs(prefill_step, decode_step, model, max_batch: int, max_length: int, name: str, options: dict,
              backend: str = "auto"):
    """blade.compile of both steps, batch (and prompt length) dynamic; an auto decode step that Inductor cannot
    compile here falls back to the eager backend (warned). A decode step on Inductor compiles for batch 1 and for
    more before it is returned (compile_decode_shapes)."""
    from torch.export import Dim

    from blade.errors import BackendError

    prefill_backend, decode_backend = step_backends(backend, model)

    batch = Dim("batch", min=1, max=max_batch) if max_batch > 1 else None
    length = Dim("length", min=1, max=max_length)
    example_batch = 2 if max_batch > 1 else 1
    vocab = model.get_output_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (example_batch, min(8, max_length)))
    rows = torch.arange(example_batch)
    prefill = blade.compile(prefill_step, (ids, rows, torch.full((example_batch,), ids.shape[1] - 1)),
                            dynamic_shapes=({0: batch, 1: length}, {0: batch}, {0: batch}),
                            name=f"{name}.prefill", backend=prefill_backend, **options)
    # laid out as decode() passes them (dynamo compiles again for other strides)
    tokens, positions = ids[:, 0].clone()[:, None], torch.full((example_batch,), ids.shape[1])[:, None]

    def compile_decode(chosen: str):
        decode = blade.compile(decode_step, (tokens, positions), dynamic_shapes=({0: batch}, {0: batch}),
                               name=f"{name}.decode", backend=chosen, **options)
        compile_decode_shapes(decode, max_batch)  # a program from blade's compile cache compiles here
        return decode

    try:
        decode = compile_decode(decode_backend)
    except BackendError as exc:
        if backend != "auto" or decode_backend == "eager":
            raise
        warnings.warn(f"blade.llm: Inductor could not compile the decode step of {name} ({exc}); it runs on the "
                      "eager backend instead", RuntimeWarning, stacklevel=3)
        decode = compile_decode("eager")
    return prefill, decode
