"""A CompiledLM saved and loaded: both programs, the weights once on disk, the same tokens, damage refused."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

import blade  # noqa: E402
import blade.llm  # noqa: E402
from blade.errors import ArtifactError  # noqa: E402
from llm_models import family, left_padded  # noqa: E402


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_loaded_lm_generates_what_the_compiled_one_does_with_the_weights_stored_once(name, tmp_path):
    model = family(name)
    lm = blade.llm.compile(model, max_batch=2, max_length=48)
    lm.save(tmp_path / "lm.blade")
    weights = {p: (tmp_path / "lm.blade" / p / "weights.safetensors").stat().st_size for p in ("decode", "prefill")}
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert weights["prefill"] < 1000, f"the prefill program stores its own weights (or the cache): {weights}"
    assert weights["decode"] < 1.1 * model_bytes, f"the decode program stores more than the weights: {weights}"
    ids, mask = left_padded(2, [6, 3], 512, 11)
    # a fresh process: no model code, nothing from this compile
    script = (f"import torch, blade.llm; lm = blade.llm.load({str(tmp_path / 'lm.blade')!r}); "
              f"ids = torch.tensor({ids.tolist()}); mask = torch.tensor({mask.tolist()}); "
              "print(lm.generate(ids, mask, max_new_tokens=10, pad_token_id=0).tolist())")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    loaded = torch.tensor(json.loads(run.stdout.strip().splitlines()[-1]))
    assert torch.equal(loaded, lm.generate(ids, mask, max_new_tokens=10, pad_token_id=0))
    with torch.no_grad():
        want = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(loaded, want)


def test_a_loaded_decode_step_compiles_at_load_and_not_in_generate(tmp_path):
    model = family("llama")
    blade.llm.compile(model, max_batch=2, max_length=32).save(tmp_path / "lm.blade")
    loaded = blade.llm.load(tmp_path / "lm.blade")
    assert loaded.decode_program.backend == "inductor_step"
    assert all(t.abs().sum() == 0 for t in loaded.cache.values()), "the load's compiling calls leave no trace"
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for batch in (1, 2):
        ids, mask = left_padded(batch, [5, 3][:batch], 512, 7)
        with torch.no_grad():
            want = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(loaded.generate(ids, mask, max_new_tokens=6, pad_token_id=0), want)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == before


def test_damage_and_the_wrong_loader_are_refused(tmp_path):
    lm = blade.llm.compile(family("gpt2"), max_batch=1, max_length=32)
    root = tmp_path / "lm.blade"
    lm.save(root)
    with pytest.raises(ArtifactError, match="saved without .* constants .* blade.llm.load"):
        blade.load(root / "prefill")
    with pytest.raises(ArtifactError, match="not a blade.llm artifact"):
        blade.llm.load(root / "decode")
    loaded = blade.llm.load(root)
    assert all(t.abs().sum() == 0 for t in loaded.cache.values()), "a loaded cache starts zeroed"
    lm_json = root / "lm.json"
    data = json.loads(lm_json.read_text())
    data["max_length"] = 4096
    lm_json.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="modified after it was written"):
        blade.llm.load(root)
