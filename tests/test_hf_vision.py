"""The real vision and diffusion networks of blade.models.hf_vision (tiny variants of each architecture): each
compiles on eager and on onnxruntime and matches eager at a batch size it was not compiled for."""
import pytest
import torch

import blade
from blade.perf.accuracy import relative_error

pytest.importorskip("transformers")
pytest.importorskip("diffusers")

from blade.models import hf_vision  # noqa: E402


def _main_output(out) -> torch.Tensor:
    return out.to_tuple()[0] if hasattr(out, "to_tuple") else out[0] if isinstance(out, (tuple, list)) else out


@pytest.mark.parametrize("backend", ["eager", "onnxruntime"])
@pytest.mark.parametrize("name", hf_vision.NAMES)
def test_network_compiles_and_matches_eager_at_a_fresh_batch(name, backend):
    model, example, dynamic_shapes = hf_vision.get(name, "tiny", batch=2)
    compiled = blade.compile(model, example, dynamic_shapes=dynamic_shapes, backend=backend, cache=False)
    assert compiled.backend == backend and compiled.report.accuracy.ok
    fresh = hf_vision.sample_inputs(name, "tiny", batch=3, seed=7)
    with torch.no_grad():
        want = _main_output(model(*fresh))
    got = _main_output(compiled(*fresh))
    assert got.shape == want.shape and not got.isnan().any()
    assert relative_error(got, want) <= 1e-4


def test_reference_sizes_are_the_published_networks():
    """Parameter counts of the reference configurations (the published models' sizes, in millions)."""
    published = {"resnet50": 25.6, "convnext_tiny": 28.6, "swin_tiny": 28.3, "mobilenet_v2": 3.5,
                 "efficientnet_b0": 5.3, "mobilevit_small": 5.6, "ddpm_unet": 35.7}
    for name, millions in published.items():
        model = hf_vision.get(name, "reference")[0]
        assert abs(sum(p.numel() for p in model.parameters()) / 1e6 - millions) < 0.1, name


def test_unknown_network_or_size_is_named():
    with pytest.raises(ValueError, match="unknown network 'resnet'.*resnet50"):
        hf_vision.get("resnet")
    with pytest.raises(ValueError, match="unknown size 'base'"):
        hf_vision.get("resnet50", "base")


def test_a_factory_at_its_defaults_captures_as_a_cli_source():
    """`blade compile blade.models.hf_vision:NAME` calls the factory with batch 1: a static batch, not a dynamic one
    torch.export would refuse to specialize."""
    import blade

    model, example, dynamic_shapes = hf_vision.mobilenet_v2("tiny")
    assert example[0].shape[0] == 1 and dynamic_shapes is None
    cm = blade.compile(model, example, backend="eager", cache=False)
    fresh = hf_vision.sample_inputs("mobilenet_v2", "tiny", batch=1, seed=3)
    with torch.no_grad():
        assert relative_error(_main_output(cm(*fresh)), _main_output(model(*fresh))) <= 1e-5
