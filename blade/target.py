"""The machine a model is compiled for: device kind, its name and the features backends care about."""
from __future__ import annotations

import functools
import os
import platform
from dataclasses import asdict, dataclass

import torch

_CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16",
              "amx_int8", "amx_fp16", "asimd", "sve")


@dataclass(frozen=True)
class Target:
    device: str  # "cpu" or "cuda" (never a device index: artifacts must move between GPUs)
    name: str
    arch: str  # x86_64 / aarch64, or sm_90 for a GPU
    features: tuple[str, ...] = ()
    cores: int = 0

    def describe(self) -> str:
        extra = f", {self.cores} cores" if self.cores else ""
        flags = f" [{' '.join(self.features)}]" if self.features else ""
        return f"{self.device} {self.name} ({self.arch}{extra}){flags}"

    def as_dict(self) -> dict:
        data = asdict(self)
        data["features"] = list(self.features)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "Target":
        return cls(data["device"], data["name"], data["arch"], tuple(data.get("features", ())), data.get("cores", 0))


@functools.lru_cache(maxsize=None)
def _cpu_info() -> tuple[str, tuple[str, ...]]:
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and name in ("", platform.machine(), platform.processor()):
                    name = value.strip()
                elif key.strip() in ("flags", "Features"):
                    flags.update(value.split())
    except OSError:
        pass
    return name, tuple(f for f in _CPU_FLAGS if f in flags)


def detect(device: str = "cpu") -> Target:
    """Describe this machine's CPU, or its current CUDA GPU when device is 'cuda'."""
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' was asked for but torch sees no CUDA GPU")
        major, minor = torch.cuda.get_device_capability()
        return Target("cuda", torch.cuda.get_device_name(), f"sm_{major}{minor}", ())
    name, flags = _cpu_info()
    return Target("cpu", name, platform.machine(), flags, os.cpu_count() or 0)


def supports_bf16(target) -> bool:
    """Whether bf16 matmuls run natively: a CPU with AVX512-BF16, AMX or Arm's BF16, a CUDA GPU of sm_80+."""
    if target.device == "cuda":
        digits = "".join(c for c in target.arch.removeprefix("sm_") if c.isdigit())
        return not digits or int(digits[:-1] or 0) >= 8
    return bool(set(target.features) & {"avx512_bf16", "amx_bf16", "bf16", "svebf16"})
