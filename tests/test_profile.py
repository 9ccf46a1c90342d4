"""blade profile: region times from each backend's profiler joined to the cost model; MFU/MBU; the roofline."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ElementTree

import pytest
import torch

import blade
import blade.models as zoo
from blade.tools.cli import main
from blade.ir.fused import is_fused
from blade.perf.peaks import Peaks
from blade.runtime.profile import model_work, profile, utilization
from helpers import Apply

FAKE_PEAKS = Peaks("test machine", {"fp32": 100e9, "bf16": 400e9}, 20e9)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def check_profile_json(data: dict) -> None:
    """The JSON keys the README documents, and the model's MFU/MBU from its own figures."""
    model, peaks = data["model"], data["peaks"]
    assert {"time_ms", "flops", "bytes", "mfu", "mbu"} <= model.keys()
    peak = peaks["matmul"][model["dtype"]]
    assert model["mfu"] == pytest.approx(model["flops"] / (model["time_ms"] / 1e3) / peak, rel=1e-9)
    assert model["mbu"] == pytest.approx(model["bytes"] / (model["time_ms"] / 1e3) / peaks["bandwidth"], rel=1e-9)
    assert isinstance(data["machine"], str) and data["regions"]
    for region in data["regions"]:
        assert {"name", "kind", "time_ms", "flops", "bytes", "mfu", "mbu", "bound"} <= region.keys()
        assert region["time_ms"] >= 0 and region["bound"] in ("compute", "memory", "overhead")


# a timing check on base-size models: bert in the default run, gpt (the slower, 50 s of it) with -m slow
@pytest.mark.parametrize("model_name", ["bert", pytest.param("gpt", marks=pytest.mark.slow)])
@pytest.mark.parametrize("backend", ["eager", "onnxruntime"])
@pytest.mark.timing
def test_base_region_times_sum_to_the_end_to_end_time(capsys, model_name, backend):
    # Three tries: on this 2-core VM one profile in ~20 ran 18 % off while its neighbours ran within 3 %, and on a
    # contended CI machine (calls 3x slower than here) two in a row ran 23 % under: a whole call's median takes
    # the host's stalls that the per-node medians filter out. A real gap between regions and the call shows in
    # every try; where every try's end-to-end samples spread by more than 20 % the machine could not time it.
    spreads = []
    for attempt in range(3):
        code, out, err = run_cli(capsys, "profile", model_name, "--size", "base", "--batch", "1", "--seq", "64",
                                 "--backend", backend, "--json", "--repeat", "10", "--warmup", "3")
        assert code == 0, err
        data = json.loads(out)
        model = data["model"]
        if 0.85 <= model["regions_time_ms"] / model["time_ms"] <= 1.15:
            break
        spreads.append(max(model["time_ms_samples"]) / min(model["time_ms_samples"]))
    else:
        if min(spreads) > 1.2:
            pytest.skip(f"the machine was too unsteady to time: each try's end-to-end calls spread by over 20 % "
                        f"(max/min {', '.join(f'{s:.2f}' for s in spreads)})")
    check_profile_json(data)
    assert sum(r["time_ms"] for r in data["regions"]) == pytest.approx(model["regions_time_ms"])
    assert 0.85 <= model["regions_time_ms"] / model["time_ms"] <= 1.15, model
    assert data["dims"] == {"batch": 1, "seq": 64} and data["backend"] == backend
    assert model["flops_in_regions"] >= 0.99 * model["flops"]  # every matmul found its region
    assert not data["unknown_ops"]


@pytest.fixture(scope="module")
def bert_tiny():
    return zoo.get("bert")


def test_onnxruntime_regions_are_its_fused_nodes_with_their_ir_nodes(bert_tiny):
    model, example, dims = bert_tiny
    cm = blade.compile(model, example, dynamic_shapes=dims, backend="onnxruntime")
    result = profile(cm, cm.flat_inputs(*zoo.sample_inputs("bert", batch=3, seq=9)), repeat=3, peaks=FAKE_PEAKS)
    skip_norms = [r for r in result.regions if any(cm.graph.node(n).target.pattern == "skip_layer_norm"
                                                   for n in r.nodes if is_fused(cm.graph.node(n)))]
    assert len(skip_norms) == 5  # blade's bias + residual + layer norm nodes (and the embeddings' sum + norm)
    for region in skip_norms:
        assert "LayerNormalization" in region.ops and region.kind == "reduction"
        assert region.bytes < region.bytes_unfused  # the biased sum no longer crosses a boundary
    attention = [r for r in result.regions if r.kind == "attention"]
    assert len(attention) == 2 and all("MultiHeadAttention" in r.ops for r in attention)
    assert result.model["flops_in_regions"] == result.model["flops"]
    assert result.model["bytes_saved_by_fusion"] > 0


def test_eager_regions_are_the_ir_nodes(bert_tiny):
    model, example, dims = bert_tiny
    cm = blade.compile(model, example, dynamic_shapes=dims, backend="eager")
    result = cm.profile(*zoo.sample_inputs("bert", batch=2, seq=7), repeat=3)
    assert [r.name for r in result.regions] == [n.name for n in cm.graph.call_nodes]
    qkv = next(r for r in result.regions if r.name == "linear_wide")  # Q, K, V projections as one
    assert qkv.flops == 3 * (2 * 2 * 7 * 32 * 32 + 2 * 7 * 32)
    assert result.model["flops_in_regions"] == result.model["flops"]


def test_model_mfu_mbu_and_bound_follow_from_the_peaks(bert_tiny):
    model, example, dims = bert_tiny
    cm = blade.compile(model, example, dynamic_shapes=dims, backend="eager")
    flat = cm.flat_inputs(*example)
    result = profile(cm, flat, repeat=3, peaks=FAKE_PEAKS)
    flops, least, dtype = model_work(cm.graph, {"batch": 2, "seq": 12})
    seconds = result.model["time_ms"] / 1e3
    assert (result.model["flops"], result.model["bytes"], dtype) == (flops, least, "fp32")
    assert result.model["mfu"] == pytest.approx(flops / seconds / 100e9)
    assert result.model["mbu"] == pytest.approx(least / seconds / 20e9)
    ridge = 100e9 / 20e9
    for region in result.regions:
        if region.flops and region.bytes:
            assert region.bound == ("compute" if region.flops / region.bytes >= ridge else "memory")
    text = str(result)
    assert "MFU" in text and "MBU" in text and "lost ms" in text


@pytest.mark.parametrize("flops, moved, seconds, bound, lost_ms", [
    (100e9, 1e9, 2.0, "compute", 1000.0),  # 10 FLOP/B above the ridge of 5: the compute roof is 1 s
    (10e9, 20e9, 2.0, "memory", 1000.0),  # 0.5 FLOP/B: the bandwidth roof is 1 s
    (0, 20e9, 1.0, "memory", 0.0),  # a copy at full bandwidth loses nothing
    (0, 0, 1e-3, "overhead", 1.0),  # no work at all: all of its time is lost
    (1e9, 0, 1.0, "compute", 990.0),
])
def test_utilization_against_hand_computed_roofs(flops, moved, seconds, bound, lost_ms):
    figures = utilization(flops, moved, seconds, FAKE_PEAKS, "fp32")
    assert figures["bound"] == bound and figures["lost_ms"] == pytest.approx(lost_ms)
    assert figures["mfu"] == pytest.approx(flops / seconds / 100e9) and figures["mbu"] == pytest.approx(moved / seconds / 20e9)
    assert figures["peak_dtype"] == "fp32"
    assert utilization(flops, moved, seconds, FAKE_PEAKS, "fp8_e4m3")["peak_dtype"] == "fp32"  # unmeasured: fp32's
    assert utilization(400e9, 1e9, 1.0, FAKE_PEAKS, "bf16")["mfu"] == pytest.approx(1.0)


def test_plot_and_count_errors_come_before_any_work(capsys, tmp_path):
    code, _, err = run_cli(capsys, "profile", "mlp", "--plot", str(tmp_path / "roofline.gif"))
    assert code == 1 and "give a file ending in .svg, .png, .pdf" in err and "capturing" not in err
    code, _, err = run_cli(capsys, "profile", "mlp", "--plot", str(tmp_path / "no" / "such" / "dir.svg"))
    assert code == 1 and "does not exist" in err
    with pytest.raises(SystemExit) as usage:
        main(["profile", "mlp", "--repeat", "0"])
    assert usage.value.code == 2 and "must be at least 1" in capsys.readouterr().err


def test_an_unknown_op_is_listed_not_guessed():
    cm = blade.compile(Apply(lambda x: torch.fft.fft(x).real * 2), (torch.randn(4, 8),), backend="eager")
    result = cm.profile(torch.randn(4, 8), repeat=2)
    assert any("fft" in op for op in result.unknown_ops), result.unknown_ops
    assert any(r.kind == "unknown" for r in result.regions)
    assert "unknown" in str(result) and "counted as 0" in str(result)


def test_gpt_decode_profile_reports_mbu(capsys):
    code, out, err = run_cli(capsys, "profile", "gpt_decode", "--batch", "2", "--past", "5", "--json", "--repeat", "3",
                             "--backend", "onnxruntime")
    assert code == 0, err
    data = json.loads(out)
    check_profile_json(data)
    assert data["model"]["mbu"] > 0 and data["model"]["bound"] == "memory"
    assert data["dims"] == {"batch": 2, "past": 5}


def test_plot_writes_a_valid_svg(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "roofline.svg"
    code, out, err = run_cli(capsys, "profile", "mlp", "--backend", "onnxruntime", "--plot", str(path), "--repeat", "3")
    assert code == 0, err
    root = ElementTree.parse(path).getroot()
    assert root.tag.endswith("svg")
    assert "MFU" in out and "regions" in out


def test_profile_of_an_artifact_and_bad_targets(capsys, tmp_path):
    model, example, dims = zoo.get("mlp")
    blade.compile(model, example, dynamic_shapes=dims, backend="onnxruntime").save(tmp_path / "m.blade")
    code, out, err = run_cli(capsys, "profile", str(tmp_path / "m.blade"), "--json", "--repeat", "2")
    assert code == 0, err
    assert json.loads(out)["backend"] == "onnxruntime"
    code, _, err = run_cli(capsys, "profile", str(tmp_path / "m.blade"), "--seq", "5")
    assert code == 1 and "--batch/--seq/--past size zoo models only" in err
    code, _, err = run_cli(capsys, "profile", str(tmp_path / "m.blade"), "--backend", "eager")
    assert code == 1 and "compiled for backend 'onnxruntime'" in err
    program = torch.export.export(model, example, dynamic_shapes=dims)
    torch.export.save(program, tmp_path / "m.pt2")
    code, out, err = run_cli(capsys, "profile", str(tmp_path / "m.pt2"), "--backend", "eager", "--json", "--repeat", "2")
    assert code == 0, err
    data = json.loads(out)  # a .pt2 keeps no Dim names: blade names the dim after the input
    assert data["backend"] == "eager" and list(data["dims"].values()) == [2] and data["model"]["flops"] > 0
    code, _, err = run_cli(capsys, "profile", "no_such_model")
    assert code == 1 and "give a zoo model" in err
    code, _, err = run_cli(capsys, "profile", "mlp", "--seq", "5")
    assert code == 1 and "unknown dim(s) ['seq']" in err


def test_a_backend_without_a_profiler_is_refused_before_any_call():
    from blade.backends.eager import EagerExecutable

    class Unprofiled(EagerExecutable):
        backend = "unprofiled"

        def has_profiler(self) -> bool:
            return False

        def __call__(self, *tensors):
            raise AssertionError("called before the refusal")

    model, example, dims = zoo.get("mlp")
    cm = blade.compile(model, example, dynamic_shapes=dims, backend="eager")
    cm.executable = Unprofiled(cm.graph)
    with pytest.raises(blade.errors.BackendError, match="cannot profile its regions"):
        profile(cm, cm.flat_inputs(*example), repeat=2, peaks=FAKE_PEAKS)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_eager_profile_on_cuda_times_the_kernels():
    model, example, dims = zoo.get("mlp")
    model = model.cuda()
    cm = blade.compile(model, tuple(t.cuda() for t in example), dynamic_shapes=dims, backend="eager")
    result = profile(cm, cm.flat_inputs(*(t.cuda() for t in example)), repeat=5, peaks=FAKE_PEAKS)
    linear = [r for r in result.regions if r.kind == "matmul"]
    assert linear and all(r.time_ms > 0 for r in linear)
    assert result.model["flops_in_regions"] == result.model["flops"]
