"""Machine peaks: measured dense-matmul throughput per dtype and memory bandwidth, cached on disk.

A peak is the best rate any probe reaches over several large square shapes and repeats: torch's
own matmul, plus whatever probes backends register (ONNX Runtime's MLAS kernels beat oneDNN on
some CPUs; a utilization figure against the slower library's roof would read above 100 %).
Bandwidth is the better of a large copy (read + write) and a large read. On known GPUs the
datasheet peaks are kept beside.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from blade.config import cache_root
from blade.errors import BackendError
from blade.ir.graph import dtype_name, dtype_named
from blade.target import Target

FORMAT = 3  # bump when what is measured changes: old cache entries are then measured again

# A probe: (device, dtype name, n) -> a callable that runs one n x n x n matmul, or None if it cannot.
MatmulProbe = Callable[[str, str, int], "Callable[[], object] | None"]
_PROBES: dict[str, tuple[MatmulProbe, str]] = {}  # library -> (probe, version)

def torch_dtype(name: str) -> torch.dtype:
    """The tensors' dtype for a peak row (tf32 is fp32 with TF32 tensor cores switched on)."""
    return torch.float32 if name == "tf32" else dtype_named(name)


def peak_dtype(dtype: torch.dtype) -> str:
    """The peak row a matmul on `dtype` tensors runs at: fp32, bf16, fp16 or int8 (uint8 too); fp32 for any other."""
    name = "int8" if dtype == torch.uint8 else dtype_name(dtype)
    return name if name in ("fp32", "bf16", "fp16", "int8") else "fp32"

# Dense (no sparsity) datasheet peaks, FLOP/s and bytes/s, by a substring of torch's device name.
_T = 1e12
DATASHEETS = [
    ("H200", {"name": "NVIDIA H200 SXM", "matmul": {"fp32": 67 * _T, "tf32": 494.7 * _T, "bf16": 989.4 * _T,
              "fp16": 989.4 * _T, "int8": 1978.9 * _T, "fp8_e4m3": 1978.9 * _T}, "bandwidth": 4.8e12}),
    ("H100 NVL", {"name": "NVIDIA H100 NVL", "matmul": {"fp32": 60 * _T, "tf32": 417.5 * _T, "bf16": 835.5 * _T,
                  "fp16": 835.5 * _T, "int8": 1670.5 * _T, "fp8_e4m3": 1670.5 * _T}, "bandwidth": 3.9e12}),
    ("H100 PCIe", {"name": "NVIDIA H100 PCIe", "matmul": {"fp32": 51 * _T, "tf32": 378 * _T, "bf16": 756 * _T,
                   "fp16": 756 * _T, "int8": 1513 * _T, "fp8_e4m3": 1513 * _T}, "bandwidth": 2.0e12}),
    ("H100", {"name": "NVIDIA H100 SXM", "matmul": {"fp32": 67 * _T, "tf32": 494.7 * _T, "bf16": 989.4 * _T,
              "fp16": 989.4 * _T, "int8": 1978.9 * _T, "fp8_e4m3": 1978.9 * _T}, "bandwidth": 3.35e12}),
    ("A100 80GB PCIe", {"name": "NVIDIA A100 80GB PCIe", "matmul": {"fp32": 19.5 * _T, "tf32": 156 * _T,
                        "bf16": 312 * _T, "fp16": 312 * _T, "int8": 624 * _T}, "bandwidth": 1.935e12}),
    ("A100-SXM4-80GB", {"name": "NVIDIA A100 SXM 80GB", "matmul": {"fp32": 19.5 * _T, "tf32": 156 * _T,
                        "bf16": 312 * _T, "fp16": 312 * _T, "int8": 624 * _T}, "bandwidth": 2.039e12}),
    ("A100", {"name": "NVIDIA A100 40GB", "matmul": {"fp32": 19.5 * _T, "tf32": 156 * _T, "bf16": 312 * _T,
              "fp16": 312 * _T, "int8": 624 * _T}, "bandwidth": 1.555e12}),
    ("L4", {"name": "NVIDIA L4", "matmul": {"fp32": 30.3 * _T, "tf32": 60 * _T, "bf16": 121 * _T, "fp16": 121 * _T,
            "int8": 242.5 * _T, "fp8_e4m3": 242.5 * _T}, "bandwidth": 0.3e12}),
    ("A10", {"name": "NVIDIA A10", "matmul": {"fp32": 31.2 * _T, "tf32": 62.5 * _T, "bf16": 125 * _T,
             "fp16": 125 * _T, "int8": 250 * _T}, "bandwidth": 0.6e12}),
]


def datasheet_for(device_name: str) -> dict | None:
    """The first datasheet entry whose key is a whole word run of the device name (A10 is not A10G)."""
    for key, sheet in DATASHEETS:
        if re.search(rf"(?<![0-9A-Za-z]){re.escape(key)}(?![0-9A-Za-z])", device_name, re.IGNORECASE):
            return sheet
    return None


def register_matmul_probe(library: str, version: str, probe: MatmulProbe) -> None:
    """Let a backend's library compete for the peak (its version joins the cache key)."""
    _PROBES[library] = (probe, version)


@dataclass
class Peaks:
    """Best measured FLOP/s per dtype and bytes/s, with where each came from."""

    device: str
    matmul: dict[str, float]  # dtype name -> FLOP/s (the best over probes, shapes and repeats)
    bandwidth: float  # bytes/s: the better of a large copy (bytes read + written) and a large read
    detail: dict = field(default_factory=dict)  # dtype -> {library: FLOP/s}; "sizes", "seconds"
    datasheet: dict | None = None
    key: str = ""
    measured_at: str = ""

    def flops_peak(self, dtype: str) -> tuple[float, str]:
        """The peak for `dtype`, or fp32's when that dtype was not measured; with the dtype used."""
        if dtype in self.matmul:
            return self.matmul[dtype], dtype
        return self.matmul["fp32"], "fp32"

    def ridge(self, dtype: str = "fp32") -> float:
        """Arithmetic intensity (FLOP/byte) where the compute roof meets the bandwidth roof."""
        return self.flops_peak(dtype)[0] / self.bandwidth

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Peaks":
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})

    def describe(self) -> str:
        rates = ", ".join(f"{k} {v / 1e9:,.0f}" for k, v in self.matmul.items())
        return f"{self.device}: matmul GFLOP/s {rates}; memory {self.bandwidth / 1e9:,.0f} GB/s"


def device_label(target: Target) -> str:
    return f"{target.device} {target.name}" + (f" ({target.cores} cores)" if target.cores else "")


def cache_key(target: Target) -> str:
    """Device, threads and library versions: a change in any of them measures again."""
    libraries = ",".join(f"{lib} {version}" for lib, (_, version) in sorted(_PROBES.items()))
    threads = f"{torch.get_num_threads()} threads" if target.device == "cpu" else ""
    return f"v{FORMAT}|{device_label(target)}|{threads}|torch {torch.__version__}|{libraries}"


def cache_path() -> Path:
    return cache_root() / "peaks.json"


def machine_peaks(target: Target, *, refresh: bool = False) -> Peaks:
    """This machine's peaks from the cache, measured (a few seconds) and stored when absent."""
    path, key = cache_path(), cache_key(target)
    entries = _read_cache(path)
    if not refresh and key in entries:
        try:
            return Peaks.from_dict(entries[key])
        except (TypeError, KeyError):
            pass  # an entry of another shape (edited by hand, older blade): measure again
    peaks = measure(target)
    entries[key] = peaks.as_dict()
    _write_cache(path, entries)
    return peaks


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, json.JSONDecodeError):
        return {}  # no cache or a damaged one: measure again


def _write_cache(path: Path, entries: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps(entries, indent=1))
        temporary.replace(path)  # atomic: a concurrent reader sees the old file or the new one
    except OSError:
        pass  # a read-only home still profiles; it measures again next time


# -- measuring --------------------------------------------------------------------------------

CPU_SIZES = (1024, 2048, 3072)
GPU_SIZES = (4096, 8192)
REPEATS = 5


def measure(target: Target, sizes: tuple[int, ...] | None = None, repeats: int | None = None) -> Peaks:
    """Measure every dtype the device supports with every probe; keep the best of each."""
    start = time.perf_counter()
    sizes = sizes or (GPU_SIZES if target.device == "cuda" else CPU_SIZES)
    repeats = repeats or REPEATS
    matmul, detail = {}, {}
    for dtype in supported_dtypes(target):
        rates = {}
        for library, probe in [("torch", _torch_probe)] + [(lib, p) for lib, (p, _) in sorted(_PROBES.items())]:
            rate = _best_rate(probe, target.device, dtype, sizes, repeats)
            if rate:
                rates[library] = rate
        if rates:
            detail[dtype] = rates
            matmul[dtype] = max(rates.values())
    if "fp32" not in matmul:
        raise BackendError(f"no probe could run an fp32 matmul on {device_label(target)}: the peaks cannot be "
                           "measured; check that torch runs on this device")
    detail["bandwidth"] = _bandwidths(target.device, repeats)
    bandwidth = max(detail["bandwidth"].values())
    detail["sizes"], detail["seconds"] = list(sizes), time.perf_counter() - start
    return Peaks(device_label(target), matmul, bandwidth, detail,
                 datasheet_for(target.name) if target.device == "cuda" else None, cache_key(target),
                 time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


def supported_dtypes(target: Target) -> list[str]:
    """fp32 always; bf16/int8 where the CPU has the instructions; tf32/fp16/bf16/int8 (fp8 on sm_89+) on GPUs."""
    if target.device == "cuda":
        dtypes = ["fp32", "tf32", "bf16", "fp16", "int8"]
        digits = re.fullmatch(r"sm_(\d+)(\d)[a-z]?", target.arch)
        major, minor = (int(digits.group(1)), int(digits.group(2))) if digits else (0, 0)
        if (major, minor) >= (8, 9):
            dtypes.append("fp8_e4m3")
        return dtypes
    features = set(target.features)
    dtypes = ["fp32"]
    if features & {"avx512_bf16", "amx_bf16"}:
        dtypes.append("bf16")
    if features & {"avx512_fp16", "amx_fp16"}:
        dtypes.append("fp16")
    if features & {"avx512_vnni", "amx_int8", "asimd"}:
        dtypes.append("int8")
    return dtypes


def _best_rate(probe: MatmulProbe, device: str, dtype: str, sizes, repeats: int) -> float:
    best = 0.0
    for n in sizes:
        try:
            call = probe(device, dtype, n)
            if call is None:
                return 0.0
            best = max(best, 2 * n ** 3 / _best_seconds(call, device, repeats))
        except (RuntimeError, NotImplementedError, MemoryError):
            return best  # the library lacks this dtype here (or the shape): what it reached counts
    return best


def _best_seconds(call: Callable[[], object], device: str, repeats: int) -> float:
    """Fastest of `repeats` calls after one warm-up (thread pool, packing buffers, kernel selection)."""
    call()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            call()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end) / 1e3)
        else:
            begin = time.perf_counter()
            call()
            times.append(time.perf_counter() - begin)
    return min(times)


def _torch_probe(device: str, dtype: str, n: int):
    """torch.matmul for floats (tf32 switched on only for 'tf32'), _int_mm for int8, _scaled_mm for fp8."""
    if dtype == "int8":
        a = torch.randint(-64, 64, (n, n), dtype=torch.int8, device=device)
        b = torch.randint(-64, 64, (n, n), dtype=torch.int8, device=device)
        return lambda: torch._int_mm(a, b)
    if dtype == "fp8_e4m3":
        a = torch.randn(n, n, device=device).to(torch_dtype(dtype))
        b = torch.randn(n, n, device=device).to(torch_dtype(dtype)).t()  # _scaled_mm wants column-major b
        one = torch.ones((), device=device)
        return lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16, use_fast_accum=True)
    a = torch.randn(n, n, device=device, dtype=torch_dtype(dtype))
    b = torch.randn(n, n, device=device, dtype=torch_dtype(dtype))
    if device != "cuda":
        return lambda: torch.matmul(a, b)

    def run():
        with _tf32(dtype == "tf32"):
            return torch.matmul(a, b)
    return run


@contextlib.contextmanager
def _tf32(allowed: bool):
    """TF32 on or off for CUDA fp32 matmuls, through whichever API this torch has (mixing the legacy
    allow_tf32 flag with fp32_precision raises in new versions)."""
    settings = torch.backends.cuda.matmul
    if hasattr(settings, "fp32_precision"):
        name, value = "fp32_precision", "tf32" if allowed else "ieee"
    else:
        name, value = "allow_tf32", allowed
    previous = getattr(settings, name)
    setattr(settings, name, value)
    try:
        yield
    finally:
        setattr(settings, name, previous)


def memory_bandwidth(device: str, repeats: int | None = None) -> float:
    """Bytes/s of the memory now: the better of a large copy and a large read (measure's figure, without the
    matmuls), for a benchmark that measures its roof beside each round where the memory's speed moves."""
    return max(_bandwidths(device, repeats or REPEATS).values())


def _bandwidths(device: str, repeats: int) -> dict[str, float]:
    """Bytes/s of a large copy ((read + written) / time) and of a large read (a sum): work that mostly
    reads, such as a decoding step streaming its weights, can beat a copy, which also pays for writing."""
    nbytes = (1 << 30) if device == "cuda" else (256 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    return {"copy": 2 * nbytes / _best_seconds(lambda: dst.copy_(src), device, repeats),
            "read": nbytes / _best_seconds(lambda: src.sum(), device, repeats)}
