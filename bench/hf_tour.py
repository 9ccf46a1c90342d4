"""Tour: compile random-weight Hugging Face models (small configs; MobileViT at its reference size) with blade on
the eager and onnxruntime backends, and record accuracy against eager PyTorch, on the example and a second random
input, and failures; where a compile was repaired by the accuracy bisection, the unrepaired compile is measured too
(check_accuracy=False), and a model off on a backend is compiled with each pass alone to find the culprit.
Batch-norm statistics are calibrated (blade.models.hf.calibrate_batch_norm): HF's random init leaves CNN outputs
subnormal. Text models get a left-padded batch (causal) or a right-padded one.

Usage: python bench/hf_tour.py            -> every model, each in a subprocess (timeout 300 s), then the summary
       python bench/hf_tour.py NAME [...] -> the named models in this process
Results: bench/results/hf_tour.json (every record) and bench/results/hf_tour.md (the table, with the machine).
"""
import json, math, os, subprocess, sys, time, traceback

os.environ.setdefault("BLADE_CACHE", "0")
os.environ.setdefault("BLADE_AUTOTUNE", "0")
HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "hf_tour.json")
SUMMARY = os.path.join(HERE, "results", "hf_tour.md")


def vision(cls_name, cfg_kwargs, size=64, model_cls=None):
    return ("vision", cls_name, cfg_kwargs, size, model_cls)


def text(cls_name, cfg_kwargs, model_cls, causal=False):
    return ("text", cls_name, cfg_kwargs, causal, model_cls)


TXT = dict(vocab_size=128)
MODELS = {
    # ---------------- vision ----------------
    "resnet": vision("ResNet", dict(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1])),
    "resnet_basic": vision("ResNet", dict(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                                          layer_type="basic")),
    "convnext": vision("ConvNext", dict(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 2, 1])),
    "convnext_ls": vision("ConvNext", dict(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 2, 1],
                                           layer_scale_init_value=0.5)),
    "convnext_nols": vision("ConvNext", dict(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 2, 1],
                                             layer_scale_init_value=0.0)),
    "convnextv2": vision("ConvNextV2", dict(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 2, 1])),
    "swin": vision("Swin", dict(image_size=64, patch_size=4, embed_dim=32, depths=[1, 1, 2],
                                num_heads=[1, 2, 4], window_size=4)),
    "swin_shift": vision("Swin", dict(image_size=64, patch_size=4, embed_dim=32, depths=[2, 2, 2],
                                      num_heads=[1, 2, 4], window_size=4)),
    "mobilenet_v2": vision("MobileNetV2", dict(image_size=64, depth_multiplier=0.5)),
    "mobilenet_v1": vision("MobileNetV1", dict(image_size=64, depth_multiplier=0.25)),
    "regnet": vision("RegNet", dict(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                                    groups_width=8)),
    "efficientnet": vision("EfficientNet", dict(image_size=64, width_coefficient=1.0, depth_coefficient=1.0,
                                                hidden_dim=1280)),
    "dinov2": vision("Dinov2", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=128, image_size=64, patch_size=8)),
    "dinov2_interp": vision("Dinov2", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                           intermediate_size=128, image_size=96, patch_size=8)),  # 64px input: pos-emb interpolation
    "mobilevit": vision("MobileViT", dict(), size=256),
    "mobilevitv2": vision("MobileViTV2", dict(width_multiplier=0.5, image_size=128), size=128),
    "vit": vision("ViT", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                              image_size=64, patch_size=8)),
    "deit": vision("DeiT", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                image_size=64, patch_size=8)),
    "beit": vision("Beit", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                image_size=64, patch_size=8, use_relative_position_bias=True)),
    "segformer": vision("Segformer", dict(num_encoder_blocks=4, depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 64, 128],
                                          num_attention_heads=[1, 2, 4, 8], decoder_hidden_size=64)),
    "poolformer": vision("PoolFormer", dict(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1])),
    "levit": vision("Levit", dict(image_size=64, hidden_sizes=[64, 128, 192], num_attention_heads=[2, 4, 6],
                                  depths=[1, 1, 1], key_dim=[16, 16, 16])),
    "bit": vision("Bit", dict(embedding_size=32, hidden_sizes=[128, 256, 512, 1024], depths=[1, 1, 1, 1])),
    "dinat": vision("Dinat", dict(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 2, 4, 8])),
    "hiera": vision("Hiera", dict(embed_dim=16, image_size=[64, 64], num_heads=[1, 2, 4, 8], depths=[1, 1, 1, 1])),
    "pvt": vision("Pvt", dict(image_size=64, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                              num_attention_heads=[1, 2, 4, 8])),
    "pvt_v2": vision("PvtV2", dict(image_size=64, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                                   num_attention_heads=[1, 2, 4, 8])),
    "focalnet": vision("FocalNet", dict(image_size=64, embed_dim=16, depths=[1, 1, 1, 1])),
    "efficientformer": vision("EfficientFormer", dict()),
    # ---------------- text ----------------
    "bert": text("Bert", dict(TXT, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),
                 "BertModel"),
    "roberta": text("Roberta", dict(TXT, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=128), "RobertaModel"),
    "distilbert": text("DistilBert", dict(TXT, dim=64, n_layers=2, n_heads=4, hidden_dim=128), "DistilBertModel"),
    "albert": text("Albert", dict(TXT, embedding_size=32, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128), "AlbertModel"),
    "electra": text("Electra", dict(TXT, embedding_size=32, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=128), "ElectraModel"),
    "gpt2": text("GPT2", dict(TXT, n_embd=64, n_layer=2, n_head=4, n_positions=64, use_cache=False),
                 "GPT2LMHeadModel", causal=True),
    "gpt_neox": text("GPTNeoX", dict(TXT, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, use_cache=False), "GPTNeoXForCausalLM", causal=True),
    "llama": text("Llama", dict(TXT, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                intermediate_size=128, use_cache=False), "LlamaForCausalLM", causal=True),
    "mistral": text("Mistral", dict(TXT, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, intermediate_size=128, use_cache=False),
                    "MistralForCausalLM", causal=True),
    "mistral_sw8": text("Mistral", dict(TXT, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=128, use_cache=False,
                                        sliding_window=8), "MistralForCausalLM", causal=True),
    "qwen2": text("Qwen2", dict(TXT, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                intermediate_size=128, use_cache=False), "Qwen2ForCausalLM", causal=True),
    "phi": text("Phi", dict(TXT, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                            use_cache=False), "PhiForCausalLM", causal=True),
    "opt": text("OPT", dict(TXT, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                            word_embed_proj_dim=64, max_position_embeddings=64, use_cache=False),
                "OPTForCausalLM", causal=True),
    "bloom": text("Bloom", dict(TXT, hidden_size=64, n_layer=2, n_head=4, use_cache=False), "BloomForCausalLM",
                  causal=True),
    "t5_encoder": text("T5", dict(TXT, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, use_cache=False),
                       "T5EncoderModel"),
}
EAGER_ATTN = dict(_attn="eager")
for base in ["bert", "distilbert", "gpt2", "llama", "opt", "vit"]:
    k = MODELS[base]
    MODELS[base + "_eagerattn"] = (k[0], k[1], dict(k[2], **EAGER_ATTN), k[3], k[4])
for base in ["gpt2", "llama", "opt", "phi", "gpt_neox"]:
    k = MODELS[base]
    MODELS[base + "_rpad"] = (k[0], k[1], dict(k[2], _rpad=True), k[3], k[4])
for base in ["bert", "llama"]:
    k = MODELS[base]
    MODELS[base + "_nomask"] = (k[0], k[1], dict(k[2], _nomask=True), k[3], k[4])


# --------------------------------------------------------------------------------------------
def flat_tensors(x):
    import torch
    if isinstance(x, torch.Tensor):
        return [x]
    if hasattr(x, "to_tuple"):
        x = x.to_tuple()
    if isinstance(x, dict):
        x = list(x.values())
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in flat_tensors(v)]
    return []


def rel(a_list, b_list):
    from blade.perf.accuracy import relative_error
    if len(a_list) != len(b_list):
        return math.inf
    worst = 0.0
    for a, b in zip(a_list, b_list):
        if a.shape != b.shape:
            return math.inf
        if not a.is_floating_point():
            r = float((a != b).double().mean())
        else:
            r = relative_error(a, b)
        if math.isnan(r):
            return math.nan
        worst = max(worst, r)
    return worst


def build(name):
    import torch, transformers
    kind, cls_name, cfg_kwargs, extra, model_cls = MODELS[name]
    cfg_kwargs = dict(cfg_kwargs)
    attn = cfg_kwargs.pop("_attn", None)
    rpad = cfg_kwargs.pop("_rpad", False)
    nomask = cfg_kwargs.pop("_nomask", False)
    cfg = getattr(transformers, cls_name + "Config")(**cfg_kwargs)
    if attn:
        cfg._attn_implementation = attn
    torch.manual_seed(0)
    if kind == "vision":
        model = getattr(transformers, model_cls or cls_name + "Model")(cfg).eval()
        size = extra
        ch = getattr(cfg, "num_channels", 3)

        def make_input(seed):
            g = torch.Generator().manual_seed(seed)
            return (torch.randn(2, ch, size, size, generator=g),), {}
    else:
        model = getattr(transformers, model_cls)(cfg).eval()
        causal = extra

        def make_input(seed):
            g = torch.Generator().manual_seed(seed)
            ids = torch.randint(0, 128, (2, 16), generator=g)
            mask = torch.ones(2, 16, dtype=torch.long)
            if causal and not rpad:
                mask[1, :5] = 0  # left padding, as in batched generation
            else:
                mask[1, 11:] = 0  # right padding
            if nomask:
                return (), {"input_ids": ids}
            return (), {"input_ids": ids, "attention_mask": mask}
    return model, make_input


def compile_one(blade, model, args, kwargs, **kw):
    t = time.perf_counter()
    rec = {}
    try:
        cm = blade.compile(model, args, example_kwargs=kwargs or None, **kw)
        rec["compile_s"] = round(time.perf_counter() - t, 2)
        acc = cm.report.accuracy
        rec["rel_err"] = acc.rel_err if acc else None
        rec["ok"] = acc.ok if acc else None
        rec["backend_used"] = cm.report.backend
        if cm.report.bisection:
            b = cm.report.bisection
            rec["bisection"] = {k: b[k] for k in ("error_before", "culprits", "outcome", "error_after")}
        if cm.report.warnings:
            rec["warnings"] = [w[:300] for w in cm.report.warnings]
        return cm, rec
    except Exception as e:  # noqa
        rec["compile_s"] = round(time.perf_counter() - t, 2)
        rec["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        rec["traceback_tail"] = traceback.format_exc()[-1500:]
        return None, rec


def raw_check(blade, model, make_input, ref, args, kwargs, rec, **kw):
    """Compile again with check_accuracy=False (no automatic bisection/repair) and measure ourselves."""
    import torch
    cm, r = compile_one(blade, model, args, kwargs, check_accuracy=False, **kw)
    if cm is None:
        rec["raw_error"] = r.get("error")
        return None
    try:
        with torch.no_grad():
            rec["raw_rel_err"] = rel(flat_tensors(cm(*args, **kwargs)), ref)
    except Exception as e:  # noqa
        rec["raw_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    fresh_check(cm, model, make_input, rec, key="raw_fresh_rel_err")
    return cm


def fresh_check(cm, model, make_input, rec, key="fresh_rel_err"):
    """Run the compiled model on a second random input of the same shape, compare with eager PyTorch."""
    import torch
    args, kwargs = make_input(7)
    try:
        with torch.no_grad():
            ref = flat_tensors(model(*args, **kwargs))
            out = flat_tensors(cm(*args, **kwargs))
        rec[key] = rel(out, ref)
    except Exception as e:  # noqa
        rec["fresh_error"] = f"{type(e).__name__}: {str(e)[:200]}"


def run_model(name):
    import torch
    torch.set_num_threads(1)
    import blade
    from blade.models.hf import calibrate_batch_norm
    from blade.passes import FUSION, cleanup, attention, fold, activations, horizontal
    res = {"model": name}
    t0 = time.perf_counter()
    try:
        model, make_input = build(name)
    except Exception as e:  # noqa
        res["build_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        return res
    res["params"] = sum(p.numel() for p in model.parameters())
    seeds = iter(range(100, 200))
    res["bn_calibrated"] = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if res["bn_calibrated"]:
        calibrate_batch_norm(model, lambda: make_input(next(seeds)), unit_scales=True)
    args, kwargs = make_input(0)
    with torch.no_grad():
        try:
            ref = flat_tensors(model(*args, **kwargs))
        except Exception as e:  # noqa
            res["eager_pytorch_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            return res
    floats = [r for r in ref if r.is_floating_point()]
    res["out_mean_abs"] = float(floats[0].abs().mean()) if floats else None
    res["out_min_mean_abs"] = min(float(r.abs().mean()) for r in floats) if floats else None
    if floats and res["out_mean_abs"] < 1e-30:
        res["flag"] = "output magnitude < 1e-30: rel_err meaningless, skipped"
        return res
    for backend in ("eager", "onnxruntime"):
        cm, rec = compile_one(blade, model, args, kwargs, backend=backend)
        if cm is not None:
            fresh_check(cm, model, make_input, rec)
        if "bisection" in rec or cm is None:  # blade repaired (or failed): measure the unrepaired compile
            raw_check(blade, model, make_input, ref, args, kwargs, rec, backend=backend)
        else:
            rec["raw_rel_err"], rec["raw_fresh_rel_err"] = rec.get("rel_err"), rec.get("fresh_rel_err")
        res[backend] = rec
        save_partial(res)
    # bisect passes when optimize=2 is off on a backend
    for backend in ("eager", "onnxruntime"):
        rb = res[backend]
        bad = rb.get("error") is not None or "bisection" in rb or not (rb.get("rel_err", math.nan) <= 1e-4) or \
            not (rb.get("raw_rel_err", math.nan) <= 1e-4) or not (rb.get("raw_fresh_rel_err", math.nan) <= 1e-4)
        if not bad:
            continue
        cm1, rec1 = compile_one(blade, model, args, kwargs, backend=backend, optimize=1)
        if cm1 is not None:
            fresh_check(cm1, model, make_input, rec1)
        raw_check(blade, model, make_input, ref, args, kwargs, rec1, backend=backend, optimize=1)
        rec0 = {}
        raw_check(blade, model, make_input, ref, args, kwargs, rec0, backend=backend, optimize=0)
        res[backend + "_O0"] = rec0
        res[backend + "_O1"] = rec1
        bis = {}
        for pname, runs in [("attention", [attention.run]), ("fold", [fold.run]), ("activations", [activations.run]),
                            ("horizontal", [horizontal.run]), ("fusion", FUSION)]:
            recp = {}
            cmp_ = raw_check(blade, model, make_input, ref, args, kwargs, recp, backend=backend,
                             passes=[cleanup.run, *runs])
            if cmp_ is not None:
                recp["passes"] = [{"name": d["name"], "counts": d["counts"], "notes": d["notes"][:10]}
                                  for d in cmp_.report.passes]
            recp.pop("traceback_tail", None) if "error" not in recp else None
            bis[pname] = recp
        res[backend + "_bisect"] = bis
        save_partial(res)
    res["total_s"] = round(time.perf_counter() - t0, 1)
    return res


def load():
    if os.path.exists(RESULTS):
        with open(RESULTS) as f:
            return json.load(f)
    return {}


def save_partial(res):
    data = load()
    data[res["model"]] = res
    tmp = RESULTS + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(tmp, RESULTS)




def _cell(rec: dict) -> str:
    if not rec:
        return "-"
    if rec.get("error"):
        return f"error: {rec['error'][:60]}"
    text = f"{rec.get('rel_err', float('nan')):.2g} / {rec.get('fresh_rel_err', float('nan')):.2g}"
    if rec.get("backend_used") and rec["backend_used"] not in ("eager", "onnxruntime"):
        text += f" on {rec['backend_used']}"
    if rec.get("bisection"):
        text += f" (bisected: {rec['bisection']['outcome']}; unrepaired {rec.get('raw_rel_err', float('nan')):.2g})"
    return text


def summarize() -> None:
    """bench/results/hf_tour.md: one row per model, with the machine."""
    import platform

    import onnxruntime
    import torch
    import transformers

    import blade
    from blade.target import detect

    data = load()
    lines = ["# Hugging Face tour: blade against eager PyTorch on random-weight models", "",
             f"- machine: {detect('cpu').describe()}",
             f"- versions: python {platform.python_version()}, torch {torch.__version__}, onnxruntime "
             f"{onnxruntime.__version__}, transformers {transformers.__version__}, blade {blade.__version__}",
             "- command: `python bench/hf_tour.py` (optimize=2; each cell: rel_err on the example / on a second "
             "random input; a bisected compile also shows the unrepaired error)", "",
             "| model | parameters | eager backend | onnxruntime backend | note |", "|---|---:|---|---|---|"]
    for name, res in data.items():
        note = " ".join((res.get("build_error") or res.get("flag") or res.get("process_error", "")[:80]).split())
        lines.append(f"| {name} | {res.get('params', '-')} | {_cell(res.get('eager', {}))} | "
                     f"{_cell(res.get('onnxruntime', {}))} | {note} |")
    worst = [name for name, res in data.items() for b in ("eager", "onnxruntime")
             if b in res and not (res[b].get("raw_rel_err", math.inf) <= 1e-4
                                  and res[b].get("raw_fresh_rel_err", math.inf) <= 1e-4)]
    built = [name for name, res in data.items() if "eager" in res]
    lines += ["", f"{len(built)} of {len(data)} models built and compiled; beyond 1e-4 before any repair: "
              f"{sorted(set(worst)) or 'none'}."]
    with open(SUMMARY, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    if len(sys.argv) > 1:
        for name in sys.argv[1:]:
            res = run_model(name)
            save_partial(res)
            brief = {k: (v if not isinstance(v, dict) else {kk: vv for kk, vv in v.items() if kk in
                     ("rel_err", "ok", "error", "compile_s", "fresh_rel_err", "raw_rel_err", "raw_fresh_rel_err", "backend_used", "bisection")}) for k, v in res.items()
                     if not k.endswith("_bisect")}
            print(json.dumps(brief, default=str), flush=True)
    else:
        names = [n for n in MODELS if n not in load() or "total_s" not in load()[n]]
        for name in names:
            t = time.perf_counter()
            p = subprocess.run(["timeout", "300", sys.executable, __file__, name], capture_output=True, text=True)
            if p.returncode != 0:
                data = load().get(name, {"model": name})
                data["process_error"] = f"rc={p.returncode} " + p.stderr[-600:]
                save_partial(data)
            print(f"{name}: rc={p.returncode} {time.perf_counter() - t:.0f}s", flush=True)
            print(p.stdout[-1500:], flush=True)
        summarize()
