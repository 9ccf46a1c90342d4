"""The blade command line: compile, run, verify, export, bench, profile, inspect, demo (`blade …` or `python -m blade …`)."""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import warnings
from pathlib import Path

import torch

from blade.config import DEFAULT_OPTIMIZE, OPTIMIZE_LEVELS
from blade.errors import BladeError, InputError


class Progress:
    """One line per long step on stderr, with the time since start (quiet with --json)."""

    def __init__(self, quiet: bool):
        self.quiet, self.start = quiet, time.perf_counter()

    def __call__(self, text: str) -> None:
        if not self.quiet:
            print(f"[blade {time.perf_counter() - self.start:6.1f}s] {text}", file=sys.stderr, flush=True)


def load_source(spec: str):
    """(model, example_args, dynamic_shapes) from 'pkg.module:factory' or a .pt2 file."""
    if spec.endswith(".pt2"):
        return spec, (), None
    module_name, sep, attr = spec.partition(":")
    if not sep:
        raise InputError(f"source {spec!r} is neither a .pt2 file nor 'module:factory' "
                         "(e.g. blade.models.bert:tiny)")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise InputError(f"cannot load factory {spec!r}: {exc}") from exc
    built = factory()
    if isinstance(built, torch.nn.Module):
        raise InputError(f"factory {spec!r} returned only a module; return (model, example_inputs[, dynamic_shapes])")
    model, example_inputs, *rest = built
    return model, example_inputs, rest[0] if rest else None


def _compile(spec: str, args, progress):
    import blade

    model, example_inputs, dynamic_shapes = load_source(spec)
    if getattr(args, "dynamic", None):
        from blade.frontend.dynamic import apply_ranges, parse_ranges

        if isinstance(model, str):
            raise InputError(f"--dynamic applies to a module:factory source; {spec} carries the dynamic dims it was "
                             "exported with (see them with torch.export.load) — export it again to change them")
        dynamic_shapes = apply_ranges(parse_ranges(args.dynamic), example_inputs, dynamic_shapes)
    progress(f"capturing and compiling {spec} (backend {args.backend}, O{args.optimize})")
    compiled = blade.compile(model, example_inputs, dynamic_shapes=dynamic_shapes, backend=args.backend,
                             optimize=args.optimize, cache=False if args.no_cache else None, **_compile_options(args))
    return model, example_inputs, compiled


def _compile_options(args) -> dict:
    """precision/quantize/calibration/accuracy_budget/autotune/keep_output_dtype from the command line (absent
    ones left out)."""
    options = {"precision": args.precision, "quantize": args.quantize, "accuracy_budget": args.accuracy_budget,
               "autotune": False if args.no_autotune else None,
               "keep_output_dtype": False if args.low_precision_outputs else None}
    if args.calibration:
        options["calibration_data"] = read_calibration(args.calibration)
    if getattr(args, "passes", None):
        options["passes"] = load_passes(args.passes)
    return {k: v for k, v in options.items() if v is not None}


def load_passes(spec: str) -> list:
    """A pass pipeline from 'pkg.module:NAME': a list of passes, or a function that returns one."""
    module_name, sep, attr = spec.partition(":")
    if not sep:
        raise InputError(f"--passes {spec!r} is not 'module:name' (a list of passes, or a function returning one)")
    try:
        found = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise InputError(f"cannot load --passes {spec!r}: {exc}") from exc
    passes = found() if callable(found) and not isinstance(found, (list, tuple)) else found
    if not isinstance(passes, (list, tuple)) or not all(callable(p) for p in passes):
        raise InputError(f"--passes {spec!r} is not a list of passes (functions graph, ctx -> graph)")
    return list(passes)


def read_calibration(path: str) -> list[dict]:
    """Samples as keyword arguments, one per safetensors file (a file, or every *.safetensors in a directory)."""
    import safetensors.torch

    root = Path(path)
    files = sorted(root.glob("*.safetensors")) if root.is_dir() else [root]
    if not files or not all(f.is_file() for f in files):
        raise InputError(f"--calibration {path}: no safetensors file there; give a file or a directory of "
                         "*.safetensors, each one sample with one tensor per input name")
    try:
        return [safetensors.torch.load_file(str(f)) for f in files]
    except Exception as exc:  # noqa: BLE001 - a damaged file names itself
        raise InputError(f"--calibration {path}: cannot read {exc}") from exc


def _bench(model, example_inputs, compiled, args, progress) -> dict:
    from blade.runtime.guards import check_inputs
    from blade.perf.peaks import machine_peaks
    from blade.runtime.profile import model_work, utilization
    from blade.perf.timing import time_interleaved

    if isinstance(model, str):
        model = torch.export.load(model).module()
        example_inputs = compiled.example_inputs
    progress(f"timing eager vs blade ({args.warmup} warm-up, {args.repeat} runs each, interleaved)")
    flat = compiled.flat_inputs(*example_inputs)
    with torch.no_grad():
        medians = time_interleaved({"eager": lambda: model(*example_inputs), "blade": lambda: compiled.run_flat(flat)},
                                   warmup=args.warmup, repeat=args.repeat, device=compiled.target.device)
    dims = check_inputs(compiled.graph.user_inputs, compiled.graph.dims, flat)
    flops, least, dtype = model_work(compiled.graph, dims, device=compiled.target.device)
    progress("utilization against this machine's peaks (measured once, about 10 s, then cached)")
    peaks = machine_peaks(compiled.target, refresh=args.remeasure_peaks)
    # eager runs the model as written: a quantized or low-precision compile's dtype is not eager's
    from blade.perf.peaks import peak_dtype

    weights = [w for w in model.parameters() if w.is_floating_point()] if isinstance(model, torch.nn.Module) else []
    eager_dtype = peak_dtype(weights[0].dtype) if compiled.report.quantization and weights else dtype
    figures = {name: utilization(flops, least, seconds, peaks, eager_dtype if name == "eager" else dtype)
               for name, seconds in medians.items()}
    return {"eager_ms": medians["eager"] * 1e3, "blade_ms": medians["blade"] * 1e3,
            "speedup": medians["eager"] / medians["blade"], "target": compiled.target.describe(),
            "flops": flops, "bytes": least, "dtype": dtype, "peak_flops": peaks.flops_peak(dtype)[0],
            "bandwidth": peaks.bandwidth, **{f"{name}_{key}": figures[name][key] for name in medians
                                             for key in ("mfu", "mbu")}}


def _print_bench(result: dict) -> None:
    print(f"eager {result['eager_ms']:.3f} ms (MFU {100 * result['eager_mfu']:.1f}%, MBU "
          f"{100 * result['eager_mbu']:.1f}%), blade {result['blade_ms']:.3f} ms (MFU {100 * result['blade_mfu']:.1f}%, "
          f"MBU {100 * result['blade_mbu']:.1f}%) (median): speedup x{result['speedup']:.2f} on {result['target']}")
    print(f"  {result['flops'] / 1e9:.3f} GFLOP and {result['bytes'] / 1e6:.2f} MB per call (from the IR) against "
          f"measured peaks {result['peak_flops'] / 1e9:.0f} GFLOP/s {result['dtype']}, "
          f"{result['bandwidth'] / 1e9:.0f} GB/s")


def cmd_compile(args, progress) -> int:
    if args.onnx and args.backend == "auto":
        args.backend = "onnxruntime"  # a plain .onnx needs the ONNX Runtime backend, whatever auto would measure
    _, _, compiled = _compile(args.source, args, progress)
    if args.onnx and compiled.backend != "onnxruntime":
        raise InputError(f"--onnx needs --backend onnxruntime (this compile used {compiled.backend})")
    progress(f"saving {args.output}")
    compiled.save(args.output)
    if args.onnx:
        progress(f"writing plain ONNX {args.onnx}")
        compiled.executable.to_onnx(args.onnx)
    if args.json:
        print(json.dumps({"artifact": str(args.output), "report": compiled.report.as_dict()}))
    else:
        print(compiled.report)
        print(f"saved {args.output}")
    return 0 if compiled.report.accuracy is None or compiled.report.accuracy.ok else 1


def cmd_run(args, progress) -> int:
    import safetensors.torch

    import blade

    progress(f"loading {args.artifact}")
    compiled = blade.load(args.artifact)
    flat = _inputs_file(compiled, args.inputs) if args.inputs else compiled.example_inputs
    progress("running")
    outputs = compiled.run_flat(flat)
    tensors = {f"output_{i}": o.contiguous() for i, o in enumerate(outputs) if isinstance(o, torch.Tensor)}
    if args.output:
        safetensors.torch.save_file(tensors, args.output)
    summary = {f"output_{i}": {"shape": list(o.shape), "dtype": str(o.dtype).removeprefix("torch.")}
               if isinstance(o, torch.Tensor) else {"value": o} for i, o in enumerate(outputs)}
    if args.json:
        print(json.dumps({"outputs": summary, "file": args.output}))
    else:
        for name, info in summary.items():
            print(f"{name}: {info['dtype']}{info['shape']}" if "dtype" in info else f"{name}: {info['value']}")
    return 0


def cmd_verify(args, progress) -> int:
    import blade
    from blade.tools.verify import fresh_inputs, verify

    progress(f"loading {args.artifact}")
    compiled = blade.load(args.artifact)
    source = load_source(args.against)
    model = source[0]
    if isinstance(model, str):
        model = torch.export.load(model).module()
    else:
        model.eval()
    if args.inputs:
        input_sets = [(args.inputs, _inputs_file(compiled, args.inputs))]
    else:
        generator = torch.Generator().manual_seed(args.seed)
        input_sets = [("saved examples", list(compiled.example_inputs))]
        input_sets += [(f"fresh #{i + 1}", fresh_inputs(compiled.graph, compiled.example_inputs, generator))
                       for i in range(args.samples)]
    progress(f"running the artifact and {args.against} on {len(input_sets)} input set(s)")
    if args.tol is None:
        from blade.driver.layer_guard import tolerance_of

        args.tol = tolerance_of(compiled.report.quantization) or 1e-4
    result = verify(compiled, model, input_sets, args.tol)
    if args.output and not args.bisect:
        raise InputError("verify -o writes the repaired artifact that --bisect compiles; add --bisect")
    if args.bisect and not result["ok"]:
        result["bisection"] = _bisect_artifact(compiled, source, input_sets, result, args, progress)
    if args.json:
        print(json.dumps(result, default=str))
    else:
        for sample in result["samples"]:
            errs = ", ".join(f"output {r['index']} rel_err {r['rel_err']:.2e}" for r in sample["outputs"])
            print(f"{'ok  ' if sample['ok'] else 'FAIL'} {sample['inputs']} {sample['shapes']}: {errs}")
        print(f"{'passed' if result['ok'] else 'FAILED'}: tolerance {args.tol:g} (relative error per output)")
        if "bisection" in result:
            from blade.perf.report import describe_bisection

            print(f"bisection: {describe_bisection(result['bisection'])}")
            if args.output:
                print(f"saved the repaired compile {args.output}")
    return 0 if result["ok"] else 1


def _bisect_artifact(compiled, source, input_sets, result, args, progress) -> dict:
    """verify --bisect: compile the source again with the rewrites at fault held back, on the worst failing inputs."""
    from blade.tools.verify import bisect_artifact

    worst = max((i for i, s in enumerate(result["samples"]) if not s["ok"]),
                key=lambda i: result["samples"][i]["worst_rel_err"])
    name, inputs = input_sets[worst]
    progress(f"bisecting the passes on the inputs '{name}' (each trial compiles the source again)")
    passes = load_passes(args.passes) if args.passes else None
    found, fixed = bisect_artifact(compiled, source, inputs, args.tol, passes)
    if args.output:
        progress(f"saving the repaired compile to {args.output}")
        fixed.save(args.output)
    return {**found.as_dict(), "inputs": name, "repaired": str(args.output) if args.output else None}


def _inputs_file(compiled, path: str) -> list[torch.Tensor]:
    """The graph's inputs, by name, from a safetensors file, checked against the spec."""
    import safetensors.torch

    if not Path(path).is_file():
        raise InputError(f"inputs file {path} does not exist")
    return compiled.named_inputs(safetensors.torch.load_file(path), path)


def cmd_bench(args, progress) -> int:
    model, example_inputs, compiled = _compile(args.source, args, progress)
    result = _bench(model, example_inputs, compiled, args, progress)
    print(json.dumps(result) if args.json else "", end="\n" if args.json else "")
    if not args.json:
        _print_bench(result)
    return 0


def cmd_profile(args, progress) -> int:
    from blade.perf.peaks import machine_peaks
    from blade.runtime.profile import profile, render
    from blade.perf.roofline import check_plot_path

    if args.plot:
        check_plot_path(args.plot)  # before minutes of profiling, not after
    compiled, flat = _profile_target(args, progress)
    progress("this machine's peaks (measured once, about 10 s, then cached)")
    peaks = machine_peaks(compiled.target, refresh=args.remeasure_peaks)
    progress(f"profiling on {compiled.backend} ({args.warmup} warm-up, {args.repeat} timed runs)")
    result = profile(compiled, flat, warmup=args.warmup, repeat=args.repeat, peaks=peaks)
    if args.plot:
        result.plot(args.plot)
        progress(f"wrote roofline {args.plot}")
    print(result.to_json() if args.json else render(result, args.top))
    return 0


def _profile_target(args, progress):
    """(compiled model, flat inputs) for a zoo model name, an artifact directory, a .pt2 or module:factory."""
    import blade
    import blade.models

    dims = {k: v for k, v in (("batch", args.batch), ("seq", args.seq), ("past", args.past)) if v is not None}
    target = args.target
    if target in blade.models.names():
        workload = blade.models.workload(target, args.size)
        try:
            inputs = workload.sample_inputs(seed=0, **dims)
        except ValueError as exc:
            raise InputError(f"zoo model {target}: {exc}") from None
        progress(f"capturing and compiling zoo {target} ({args.size}) (backend {args.backend}, O{args.optimize})")
        model, example_inputs, dynamic_shapes = workload.triple()
        compiled = blade.compile(model, example_inputs, dynamic_shapes=dynamic_shapes, backend=args.backend,
                                 optimize=args.optimize, **_compile_options(args))
        return compiled, compiled.flat_inputs(*inputs)
    if dims:
        raise InputError(f"--batch/--seq/--past size zoo models only; {target} is profiled on its example inputs")
    if Path(target).is_dir():
        progress(f"loading {target}")
        compiled = blade.load(target)
        if args.backend not in ("auto", compiled.backend):
            raise InputError(f"artifact {target} was compiled for backend {compiled.backend!r}, not {args.backend!r}; "
                             "recompile it to profile another backend")
        return compiled, compiled.example_inputs
    if target.endswith(".pt2") or ":" in target:
        _, _, compiled = _compile(target, args, progress)
        return compiled, compiled.example_inputs
    raise InputError(f"cannot profile {target!r}: give a zoo model ({', '.join(blade.models.names())}), an artifact "
                     "directory, a .pt2 file or 'module:factory'")


def cmd_inspect(args, progress) -> int:
    from blade.runtime.artifact import read_manifest, verify_files

    manifest = read_manifest(args.artifact)
    verify_files(Path(args.artifact), manifest)
    if args.json:
        print(json.dumps(manifest, indent=2))
        return 0
    io = manifest["io"]
    print(f"blade artifact {args.artifact} (format {manifest['format_version']}, blade {manifest['blade_version']}, "
          f"torch {manifest['versions']['torch']})")
    print(f"  backend {manifest['backend']} for {manifest['target']['device']} {manifest['target']['name']}")
    requires = manifest.get("requires") or {}
    print("  target  " + (f"needs {json.dumps(requires)}" if requires else
                          f"portable: runs on any {manifest['target']['device']} with its backend"))
    blade_ops = {op: n for op, n in manifest["report"].get("ops_after", {}).items() if op.startswith(("blade", "fused"))}
    if blade_ops:
        print("  ops     " + ", ".join(f"{op} ×{n}" for op, n in sorted(blade_ops.items())))
    print("  dims    " + ", ".join(f"{k} in [{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]" for k, (lo, hi) in io["dims"].items()))
    for spec in io["inputs"]:
        state = f"  (state: buffer {spec['state']}, kept by the model)" if spec.get("state") else ""
        print(f"  input   {spec['name']}: {spec['dtype']}{_shape_text(spec['shape'])}{state}")
    for i, spec in enumerate(io["outputs"]):
        text = f"{spec['dtype']}{_shape_text(spec['shape'])}" if spec and "shape" in spec else json.dumps(spec)
        writes = f"  (written back into {spec['writes']})" if spec.get("writes") else ""
        print(f"  output  {i}: {text}{writes}")
    for relpath, digest in sorted(manifest["files"].items()):
        print(f"  file    {relpath}  sha256 {digest[:16]}…")
    from blade.perf.report import CompileReport

    print(CompileReport.from_dict(manifest["report"]))
    if args.graph or args.source:
        import blade

        loaded = blade.load(args.artifact)
        if args.graph:
            print(loaded.graph)
        if args.source:
            sources = loaded.executable.sources()
            print(sources if sources is not None else
                  f"the {loaded.backend} backend generates no source; --graph shows the IR")
    return 0


def cmd_cache(args, progress) -> int:
    from blade.runtime import cache

    if args.action == "clear":
        removed = cache.clear()
        print(json.dumps({"removed": removed, "directory": str(cache.directory())}) if args.json
              else f"removed {removed} entries from {cache.directory()}")
        return 0
    listed = cache.entries()
    if args.json:
        print(json.dumps({"directory": str(cache.directory()), "limit_bytes": cache.limit_bytes(), "entries": listed}))
        return 0
    total = sum(e["bytes"] for e in listed)
    print(f"{cache.directory()}: {len(listed)} entries, {total / 1e6:.1f} MB (limit {cache.limit_bytes() / 1e9:g} GB)")
    for e in sorted(listed, key=lambda e: -e["last_used"]):
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e["last_used"]))
        print(f"  {e['key']}  {e['model']:<16} {e['backend']:<12} {e['bytes'] / 1e6:9.1f} MB  last used {used}")
    return 0


def cmd_export(args, progress) -> int:
    if (args.triton_repo is None) == (args.kserve is None):
        raise InputError("export needs one of --triton-repo DIR (Triton Inference Server) or --kserve DIR (KServe)")
    if args.kserve is not None:
        return _export_kserve(args, progress)
    from blade.tools.serving import export_triton_repo

    progress(f"writing a Triton Inference Server model for {args.artifact} into {args.triton_repo}")
    result = export_triton_repo(args.artifact, args.triton_repo, name=args.name, max_batch=args.max_batch,
                                batch_dim=args.batch_dim)
    if args.json:
        print(json.dumps(result.as_dict()))
        return 0
    print(f"wrote {result.model_dir} ({result.kind} model, max_batch_size {result.max_batch_size})")
    for note in result.notes:
        print(f"  note: {note}")
    return 0


def cmd_serve(args, progress) -> int:
    from blade.serve.options import ServeOptions, checked_artifacts

    options = ServeOptions(max_batch=args.max_batch, max_delay_ms=args.max_delay_ms, batch_dim=args.batch_dim,
                           warmup=args.warmup, max_request_bytes=int(args.max_request_mb * (1 << 20)))
    if not args.artifacts and not args.lm:
        raise InputError("nothing to serve: give artifact directories, or --lm MODULE:FACTORY")
    checked_artifacts(args.artifacts, args.name)  # before KServe is imported: a wrong path fails at once
    from blade.serve.server import serve

    extra = []
    if args.lm:
        from blade.serve.completions import lm_model

        extra.append(lm_model(args.lm, name=args.lm_name, max_batch=args.lm_max_batch, max_length=args.lm_max_length))
    progress(f"serving {', '.join(map(str, args.artifacts + [m.name for m in extra]))} on http://0.0.0.0:"
             f"{args.http_port}" + ("" if args.no_grpc else f" and grpc :{args.grpc_port}"))
    return serve(args.artifacts, names=args.name, http_port=args.http_port,
                 grpc_port=None if args.no_grpc else args.grpc_port, options=options, workers=args.workers,
                 grace_period=args.grace_period, extra_models=extra)


def _export_kserve(args, progress) -> int:
    from blade.tools.kserve_export import export_kserve

    progress(f"writing KServe deployment files for {args.artifact} into {args.kserve}")
    serve_args = [*(["--max-batch", str(args.max_batch)] if args.max_batch else []),
                  *(["--batch-dim", args.batch_dim] if args.batch_dim else []),
                  *(["--max-delay-ms", str(args.max_delay_ms)] if args.max_delay_ms is not None else [])]
    result = export_kserve(args.artifact, args.kserve, name=args.name, image=args.image, storage_uri=args.storage_uri,
                           min_replicas=args.min_replicas, max_replicas=args.max_replicas, cpu=args.cpu,
                           memory=args.memory, gpus=args.gpus, serve_args=serve_args)
    if args.json:
        print(json.dumps(result.as_dict()))
        return 0
    print(f"wrote {result.manifest} (InferenceService {result.service_name}) and {result.dockerfile}")
    for note in result.notes:
        print(f"  note: {note}")
    return 0


def _shape_text(shape) -> str:
    from blade.ir.shapes import size_from_json, dim_symbol

    def show(size):
        if isinstance(size, int):
            return str(size)
        names = _dim_names(size["expr"])
        return str(size_from_json(size, {n: dim_symbol(n) for n in names}))
    return "[" + ", ".join(show(s) for s in shape) + "]"


def _dim_names(expr) -> set[str]:
    if isinstance(expr, dict):
        if "dim" in expr:
            return {expr["dim"]}
        return set().union(*(_dim_names(a) for a in expr.get("args", [])))
    return set()


def cmd_generate(args, progress) -> int:
    """Compile a causal LM (a factory returning it) with blade.llm, generate, print tokens/s and decode MBU."""
    import blade.llm
    from blade.perf.peaks import machine_peaks
    from blade.target import detect

    module_name, sep, attr = args.source.partition(":")
    if not sep:
        raise InputError(f"source {args.source!r} must be 'module:factory' returning a causal LM "
                         "(e.g. blade.models.hf_lm:gpt2)")
    try:
        model = getattr(importlib.import_module(module_name), attr)()
    except (ImportError, AttributeError) as exc:
        raise InputError(f"cannot load factory {args.source!r}: {exc}") from exc
    progress(f"compiling {type(model).__name__} for generation (batch {args.batch}, max_length "
             f"{args.prompt_length + args.max_new_tokens})")
    lm = blade.llm.compile(model, max_batch=args.batch, max_length=args.prompt_length + args.max_new_tokens,
                           precision=args.precision, quantize=args.quantize, backend=args.backend,
                           cache=not args.no_cache)
    vocab = model.get_output_embeddings().weight.shape[0]
    if args.prompt:
        ids = torch.tensor([[int(t) for t in args.prompt.split(",")]] * args.batch)
    else:
        ids = torch.randint(0, vocab, (args.batch, args.prompt_length), generator=torch.Generator().manual_seed(0))
    every = max(1, args.max_new_tokens // 10)

    def on_step(n: int) -> None:
        if n % every == 0 or n == args.max_new_tokens:
            progress(f"generated {n}/{args.max_new_tokens}")

    tokens = lm.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                         temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                         eos_token_id=[] if args.ignore_eos else None, on_step=None if args.json else on_step,
                         generator=torch.Generator().manual_seed(args.seed))
    stats, bandwidth = lm.stats, machine_peaks(detect()).bandwidth
    result = {"model": type(model).__name__, "backend": lm.decode_program.backend, "batch": args.batch,
              "prompt_tokens": stats.prompt_tokens, "new_tokens": stats.new_tokens, "prefill_s": stats.prefill_s,
              "decode_s": stats.decode_s, "tokens_per_s": stats.tokens_per_s,
              "decode_ms_per_step": 1e3 * stats.decode_s / max(stats.decode_steps, 1),
              "decode_bandwidth_gbs": stats.decode_bandwidth() / 1e9, "machine_bandwidth_gbs": bandwidth / 1e9,
              "decode_mbu": stats.decode_bandwidth() / bandwidth, "tokens": tokens[:, ids.shape[1]:].tolist()}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['model']} on {result['backend']}: {stats.new_tokens} new tokens (batch {args.batch}) in "
              f"{stats.prefill_s + stats.decode_s:.2f} s = {stats.tokens_per_s:.1f} tok/s; decode "
              f"{result['decode_ms_per_step']:.1f} ms a step, {result['decode_bandwidth_gbs']:.1f} GB/s = "
              f"{100 * result['decode_mbu']:.0f}% MBU of {bandwidth / 1e9:.0f} GB/s")
        print("row 0:", ",".join(str(t) for t in result["tokens"][0]))
    return 0


def cmd_demo(args, progress) -> int:
    import blade.models

    if args.model not in blade.models.names():
        raise InputError(f"--model {args.model!r} is not a zoo model; choose one of {blade.models.names()}")
    source = f"blade.models.{args.model}:{args.size}"
    model, example_inputs, compiled = _compile(source, args, progress)
    result = _bench(model, example_inputs, compiled, args, progress)
    ok = compiled.report.accuracy.ok
    if args.json:
        print(json.dumps({"model": args.model, "size": args.size, "report": compiled.report.as_dict(),
                          "bench": result, "ok": ok}))
    else:
        print(compiled.report)
        _print_bench(result)
        print("demo passed: outputs match eager" if ok else "demo FAILED: outputs differ from eager")
    return 0 if ok else 1


def _count(least: int):
    """An argparse type: an int of at least `least`."""
    def parse(text: str) -> int:
        value = int(text)
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}, got {value}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    import blade
    import blade.backends

    # blade.models (the zoo) is imported only by the commands that use it: `blade run` of an artifact never does
    parser = argparse.ArgumentParser(prog="blade", description="blade: a graph-level compiler for PyTorch inference")
    parser.add_argument("--version", action="version", version=f"blade {blade.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p, compile_options=False, bench_options=False):
        p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
        if compile_options:
            p.add_argument("--backend", default="auto", help=f"auto or one of {blade.backends.names()}")
            p.add_argument("--optimize", "-O", type=int, default=DEFAULT_OPTIMIZE, choices=OPTIMIZE_LEVELS,
                           help="pass pipeline level")
            p.add_argument("--no-cache", action="store_true", help="compile afresh; neither read nor write the "
                           "compile cache")
            p.add_argument("--no-autotune", action="store_true", help="--backend auto follows the fixed rule "
                           "(Triton on a CUDA GPU, else ONNX Runtime) instead of timing the candidates")
            p.add_argument("--precision", choices=["fp32", "fp16", "bf16"],
                           help="what matmuls, convolutions and attention compute in (norms and softmax stay fp32)")
            p.add_argument("--low-precision-outputs", action="store_true", help="with --precision fp16/bf16: return "
                           "outputs in that precision, as model.to(dtype) would (keep_output_dtype=False)")
            p.add_argument("--quantize", choices=["int8_weight_only", "int8_dynamic", "int8_static", "fp8",
                                                  "int4_weight_only"],
                           help="quantize linear layers and embedding tables")
            p.add_argument("--calibration", metavar="PATH", help="int8_static calibration: a safetensors file, or a "
                           "directory of them, each one sample with one tensor per input name (as `run --inputs`)")
            p.add_argument("--accuracy-budget", type=float, metavar="REL_ERR", help="largest relative error vs "
                           "fp32; the most sensitive layers stay fp32 until it holds, else the compile fails")
            p.add_argument("--passes", metavar="MODULE:NAME", help="replace the pass pipeline with your own: a list "
                           "of passes (functions graph, ctx -> graph), or a function returning one")
        if bench_options:
            p.add_argument("--warmup", type=_count(0), default=3)
            p.add_argument("--repeat", type=_count(1), default=20)
            p.add_argument("--remeasure-peaks", action="store_true",
                           help="measure this machine's matmul and copy peaks again instead of using the cache")
        return p

    p = common(sub.add_parser("compile", help="compile a model into an artifact"), compile_options=True)
    p.add_argument("source", help="'module:factory' returning (model, example_inputs[, dynamic_shapes]), or a .pt2")
    p.add_argument("-o", "--output", required=True, help="artifact directory to write (e.g. model.blade)")
    p.add_argument("--dynamic", metavar="NAME=MIN:MAX,...", help="dynamic dim ranges, e.g. batch=1:64,seq=1:2048: "
                   "the factory's dims of those names get these ranges; without dims from the factory, batch is "
                   "axis 0 and seq axis 1 of every input")
    p.add_argument("--onnx", help="also write a plain .onnx (onnxruntime backend, no PyTorch fallback) for any "
                                  "ONNX consumer")
    p.set_defaults(func=cmd_compile)

    p = common(sub.add_parser("run", help="run an artifact on inputs from a safetensors file"))
    p.add_argument("artifact")
    p.add_argument("--inputs", help="safetensors file with one tensor per input name (default: the saved examples)")
    p.add_argument("-o", "--output", help="safetensors file to write the outputs to")
    p.set_defaults(func=cmd_run)

    p = common(sub.add_parser("verify", help="check an artifact against its source model; fail beyond a tolerance"))
    p.add_argument("artifact")
    p.add_argument("--against", required=True, help="the source: 'module:factory' or the .pt2 it was compiled from")
    p.add_argument("--inputs", help="safetensors file with one tensor per input name (default: the saved examples "
                                    "and --samples fresh random inputs inside the dynamic ranges)")
    p.add_argument("--samples", type=_count(0), default=3, help="fresh random input sets (default 3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fresh inputs")
    p.add_argument("--tol", type=float, help="largest relative error allowed per output (default 1e-4; for a "
                   "quantized or low-precision artifact its accuracy budget, else its mode's tolerance)")
    p.add_argument("--bisect", action="store_true", help="when the artifact fails: compile the source again as the "
                   "artifact was, find the pass and the rewrite at fault and hold them back; prints what it found")
    p.add_argument("--passes", metavar="MODULE:NAME", help="with --bisect: the pass pipeline the artifact was compiled "
                   "with, when it was not blade's own (as compile --passes)")
    p.add_argument("-o", "--output", help="with --bisect: write the repaired compile as an artifact here")
    p.set_defaults(func=cmd_verify)

    p = common(sub.add_parser("bench", help="time eager vs compiled in one run"), True, True)
    p.add_argument("source", help="'module:factory' or a .pt2")
    p.set_defaults(func=cmd_bench)

    p = common(sub.add_parser("profile", help="time every region; MFU and MBU per region and for the model"),
               True, True)
    p.set_defaults(repeat=10)
    p.add_argument("target", help="a zoo model name, an artifact directory, a .pt2 file or 'module:factory'")
    p.add_argument("--size", default="tiny", choices=["tiny", "base"], help="zoo model size")
    p.add_argument("--batch", type=int, help="zoo model batch size")
    p.add_argument("--seq", type=int, help="zoo model sequence length")
    p.add_argument("--past", type=int, help="zoo gpt_decode: cached positions")
    p.add_argument("--top", type=int, default=15, help="regions to list (the whole list is in --json)")
    p.add_argument("--plot", help="write a roofline picture (.svg, .png or .pdf; needs matplotlib: "
                                  "pip install 'blade-compiler[plot]')")
    p.set_defaults(func=cmd_profile)

    p = common(sub.add_parser("inspect", help="show an artifact's manifest, specs, hashes and report"))
    p.add_argument("artifact")
    p.add_argument("--graph", action="store_true", help="also print the IR")
    p.add_argument("--source", action="store_true", help="also print the generated program (triton backend: the "
                   "host program and every kernel)")
    p.set_defaults(func=cmd_inspect)

    p = common(sub.add_parser("cache", help="list or clear the compile cache ($BLADE_CACHE_DIR/compiled)"))
    p.add_argument("action", choices=["list", "clear"])
    p.set_defaults(func=cmd_cache)

    p = common(sub.add_parser("export", help="write a Triton Inference Server model repository, or KServe "
                                             "deployment files, from an artifact"))
    p.add_argument("artifact")
    p.add_argument("--triton-repo", help="model repository directory (created if absent)")
    p.add_argument("--kserve", metavar="DIR", help="write an InferenceService manifest running blade serve, a "
                   "Dockerfile and (without --storage-uri) the artifact into DIR")
    p.add_argument("--name", help="model name (default: Triton, the graph's name; KServe, the artifact's directory)")
    p.add_argument("--max-batch", type=_count(1), help="max_batch_size (default: the batch dim's upper bound)")
    p.add_argument("--batch-dim", help="the dynamic dim requests are joined along (default: the one named "
                   "batch, when it leads every input and output)")
    p.add_argument("--max-delay-ms", type=float, help="KServe: blade serve's batching window")
    p.add_argument("--image", help="KServe: the container image (default blade-serve-NAME:VERSION)")
    p.add_argument("--storage-uri", help="KServe: where the storage initializer fetches the artifact from (s3://, "
                   "gs://, pvc://...); without it the artifact is copied into the image")
    p.add_argument("--min-replicas", type=_count(0), default=1)
    p.add_argument("--max-replicas", type=_count(1), default=1)
    p.add_argument("--cpu", default="2", help="KServe: CPU request and limit (default 2)")
    p.add_argument("--memory", default="4Gi", help="KServe: memory request and limit (default 4Gi)")
    p.add_argument("--gpus", type=_count(0), help="KServe: nvidia.com/gpu limit (default 1 for a cuda artifact)")
    p.set_defaults(func=cmd_export)

    p = common(sub.add_parser("serve", help="serve artifacts over the Open Inference Protocol (KServe; REST and "
                                            "gRPC) with dynamic batching; needs the serve extra"))
    p.add_argument("artifacts", nargs="*", help="artifact directories (each a model named after its directory)")
    p.add_argument("--name", action="append", help="the served name of each artifact, in order (repeat it)")
    p.add_argument("--http-port", type=int, default=8080)
    p.add_argument("--grpc-port", type=int, default=8081)
    p.add_argument("--no-grpc", action="store_true", help="serve REST only")
    p.add_argument("--max-batch", type=_count(1), help="rows joined into one call (default: the batch dim's upper "
                   "bound, at most 64)")
    p.add_argument("--max-delay-ms", type=float, default=5.0, help="how long the first request of a batch waits "
                   "for others to join it (default 5)")
    p.add_argument("--batch-dim", help="the dynamic dim requests are joined along (default: the one named batch, "
                   "when it leads every input and output)")
    p.add_argument("--workers", type=_count(1), default=1, help="batches run at once (model instances; default 1)")
    p.add_argument("--warmup", type=_count(0), default=1, help="calls on the saved examples before a model reports "
                   "ready (default 1)")
    p.add_argument("--max-request-mb", type=float, default=64.0, help="larger requests are refused (default 64)")
    p.add_argument("--grace-period", type=int, default=30, help="seconds in-flight requests get on shutdown")
    p.add_argument("--lm", metavar="LM.blade|MODULE:FACTORY", help="also serve a causal LM on /v1/completions, "
                   "OpenAI-style, token ids in and out: a blade.llm artifact (lm.save), or a factory returning a "
                   "Hugging Face model (compiled with blade.llm at start)")
    p.add_argument("--lm-name", default="lm", help="the LM's model name in requests (default lm)")
    p.add_argument("--lm-max-batch", type=_count(1), default=8, help="a factory LM's in-flight batch (default 8)")
    p.add_argument("--lm-max-length", type=_count(2), default=512, help="a factory LM's prompt plus new tokens "
                   "(default 512)")
    p.set_defaults(func=cmd_serve)

    p = common(sub.add_parser("generate", help="compile a causal LM with blade.llm and generate; tokens/s and MBU"))
    p.add_argument("source", help="'module:factory' returning a Hugging Face causal LM (e.g. "
                                  "blade.models.hf_lm:gpt2)")
    p.add_argument("--batch", type=_count(1), default=1)
    p.add_argument("--prompt", help="comma-separated token ids (default: --prompt-length random ids)")
    p.add_argument("--prompt-length", type=_count(1), default=32)
    p.add_argument("--max-new-tokens", type=_count(1), default=128)
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    p.add_argument("--sample", action="store_true", help="sample (default greedy)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int, default=0, help="the sampling generator's seed")
    p.add_argument("--backend", default="auto", help="auto (eager, which writes the cache in place) or a backend")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="weights and KV cache in this dtype")
    p.add_argument("--quantize", choices=["int8_weight_only", "int4_weight_only"],
                   help="weight-only int8 (per channel) or int4 (groups of 32) linear layers")
    p.add_argument("--no-cache", action="store_true", help="compile afresh (no compile cache)")
    p.set_defaults(func=cmd_generate)

    p = common(sub.add_parser("demo", help="compile a zoo model, check accuracy, compare speed with eager"), True, True)
    p.add_argument("--model", default="bert", help="a zoo model, e.g. bert or gpt (an unknown name lists them all)")
    p.add_argument("--size", default="tiny", choices=["tiny", "base"])
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    # torch's own pytree deprecation notice, raised inside ExportedProgram.module(); not actionable here.
    warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
    args = build_parser().parse_args(argv)
    progress = Progress(quiet=args.json)
    try:
        return args.func(args, progress)
    except BladeError as exc:
        print(f"blade: error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # a bug or an environment problem: still one line and a failing exit code
        print(f"blade: internal error ({type(exc).__name__}): {exc}\n"
              "please report it with the command that caused it", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
