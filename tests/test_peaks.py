"""Machine peaks: measured per dtype with every probe, cached by device and versions; datasheets for GPUs."""
from __future__ import annotations

import json

import pytest
import torch

import blade.backends  # noqa: F401  (registers ONNX Runtime's probe)
import blade.perf.peaks as peaks
from blade.target import Target, detect


@pytest.mark.parametrize("device, sheet", [
    ("NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM"), ("NVIDIA H100 PCIe", "NVIDIA H100 PCIe"),
    ("NVIDIA H100 NVL", "NVIDIA H100 NVL"), ("NVIDIA H200", "NVIDIA H200 SXM"),
    ("NVIDIA A100-SXM4-80GB", "NVIDIA A100 SXM 80GB"), ("NVIDIA A100 80GB PCIe", "NVIDIA A100 80GB PCIe"),
    ("NVIDIA A100-SXM4-40GB", "NVIDIA A100 40GB"), ("NVIDIA L4", "NVIDIA L4"), ("NVIDIA A10", "NVIDIA A10"),
    ("NVIDIA A10G", None), ("NVIDIA L40S", None), ("NVIDIA GeForce RTX 4090", None),
])
def test_datasheets_of_known_gpus(device, sheet):
    found = peaks.datasheet_for(device)
    assert (found["name"] if found else None) == sheet
    if found:
        assert found["matmul"]["bf16"] > found["matmul"]["tf32"] > found["matmul"]["fp32"] and found["bandwidth"] > 1e11


@pytest.fixture
def quick(monkeypatch, tmp_path):
    monkeypatch.setenv("BLADE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(peaks, "CPU_SIZES", (128, 256))
    monkeypatch.setattr(peaks, "REPEATS", 2)
    return tmp_path / "peaks.json"


def test_measured_once_then_read_from_the_cache(quick, monkeypatch):
    target = detect()
    first = peaks.machine_peaks(target)
    assert first.matmul["fp32"] > 1e9 and first.bandwidth > 1e9
    assert set(first.detail["fp32"]) == {"torch", "onnxruntime"}  # both libraries competed for the fp32 peak
    assert first.matmul["fp32"] == max(first.detail["fp32"].values())
    entries = json.loads(quick.read_text())
    assert list(entries) == [first.key] and f"torch {torch.__version__}" in first.key and target.name in first.key

    monkeypatch.setattr(peaks, "measure", lambda *a, **k: pytest.fail("measured again despite the cache"))
    assert peaks.machine_peaks(target) == first


def test_a_new_library_version_or_a_damaged_cache_measures_again(quick, monkeypatch):
    target = detect()
    first = peaks.machine_peaks(target)
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    second = peaks.machine_peaks(target)
    assert second.key != first.key and len(json.loads(quick.read_text())) == 2
    quick.write_text("{not json")
    third = peaks.machine_peaks(target)
    assert third.key == second.key and json.loads(quick.read_text()).keys() == {third.key}
    quick.write_text(json.dumps({third.key: {"device": "an entry of another shape"}}))
    assert peaks.machine_peaks(target).matmul["fp32"] > 0


def test_every_dtype_the_cpu_has_is_measured(quick):
    target = detect()
    measured = peaks.measure(target, sizes=(128,), repeats=1)
    assert set(measured.matmul) == set(peaks.supported_dtypes(target))
    flagged = Target("cpu", "x", "x86_64", ("avx512f", "avx512_bf16", "avx512_vnni"), 2)
    assert peaks.supported_dtypes(flagged) == ["fp32", "bf16", "int8"]
    assert peaks.supported_dtypes(Target("cpu", "x", "x86_64", ("avx2",), 2)) == ["fp32"]
    assert "fp8_e4m3" in peaks.supported_dtypes(Target("cuda", "NVIDIA H100", "sm_90"))
    assert "fp8_e4m3" not in peaks.supported_dtypes(Target("cuda", "NVIDIA A100", "sm_80"))
    assert "fp8_e4m3" in peaks.supported_dtypes(Target("cuda", "NVIDIA B200", "sm_100"))
    assert "fp8_e4m3" in peaks.supported_dtypes(Target("cuda", "NVIDIA H100", "sm_90a"))


def test_no_fp32_peak_is_a_clear_error_not_a_cache_entry(quick, monkeypatch):
    monkeypatch.setattr(peaks, "_torch_probe", lambda device, dtype, n: None)
    monkeypatch.setattr(peaks, "_PROBES", {})
    with pytest.raises(peaks.BackendError, match="no probe could run an fp32 matmul"):
        peaks.machine_peaks(detect())
    assert not quick.exists()


def test_a_probe_that_fails_does_not_stop_the_others(quick):
    def broken(device, dtype, n):
        raise RuntimeError("no kernel for this")

    peaks.register_matmul_probe("broken", "0", broken)
    try:
        measured = peaks.measure(detect(), sizes=(128,), repeats=1)
        assert "broken" not in measured.detail["fp32"] and measured.matmul["fp32"] > 0
    finally:
        peaks._PROBES.pop("broken")


def test_an_unmeasured_dtype_falls_back_to_fp32():
    p = peaks.Peaks("m", {"fp32": 10.0}, 5.0)
    assert p.flops_peak("fp8_e4m3") == (10.0, "fp32") and p.ridge() == 2.0
    assert peaks.Peaks.from_dict(p.as_dict()) == p


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_peaks_cover_every_dtype_and_sit_under_the_datasheet(quick, monkeypatch):
    monkeypatch.setattr(peaks, "GPU_SIZES", (2048, 4096))
    target = detect("cuda")
    measured = peaks.measure(target, repeats=3)
    assert set(measured.matmul) == set(peaks.supported_dtypes(target))
    assert measured.matmul["bf16"] > measured.matmul["fp32"] and measured.bandwidth > 1e11
    sheet = measured.datasheet
    if sheet:
        for dtype, rate in measured.matmul.items():
            assert rate < 1.1 * sheet["matmul"][dtype], (dtype, rate)


def test_memory_bandwidth_is_the_better_of_measures_copy_and_read(monkeypatch):
    monkeypatch.setattr(peaks, "_bandwidths", lambda device, repeats: {"copy": 30e9, "read": 45e9})
    assert peaks.memory_bandwidth("cpu") == 45e9
    monkeypatch.undo()
    rate = peaks.memory_bandwidth("cpu", repeats=1)
    assert 1e9 < rate < 1e13  # a real measurement of this machine's memory, in bytes/s
