"""Which dtype the engine runs best in on this CPU (``--dtype auto``), decided by measurement.

On a CPU with native bf16 dot products (``avx512_bf16`` or AMX ``amx_bf16`` in the kernel's CPU
flags, as on AMD Zen 4+/Intel Sapphire Rapids+) bfloat16 is the faster dtype: on this project's
AMD EPYC (avx512_bf16, no AMX; 1 thread, small model) a decode step at batch 8 / context 512 took
16.9 ms in bf16 against 29.7 ms in fp32 (bench/engine_profile.py), and bf16 matmuls at 512 rows ran
13x fp32. Without native bf16 the matmuls are emulated and slower than fp32, so fp32 stays.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The flags of the first processor in a /proc/cpuinfo text (empty if there is none)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


@functools.cache
def native_bf16() -> bool:
    """True iff this CPU does bf16 dot products in hardware and torch's kernels use AVX-512."""
    try:
        flags = cpu_flags(Path("/proc/cpuinfo").read_text())
    except OSError:
        return False
    capability = torch.backends.cpu.get_cpu_capability()
    return bool(flags & NATIVE_BF16_FLAGS) and capability.startswith("AVX512")


def auto_cpu_dtype() -> str:
    """``--dtype auto`` on CPU: bfloat16 where it is native (and measured faster), else float32."""
    return "bfloat16" if native_bf16() else "float32"


def resolve_dtype(dtype: str, device: str) -> str:
    """A --dtype value with ``auto`` resolved for ``device`` (GPUs: bfloat16)."""
    if dtype != "auto":
        return dtype
    return auto_cpu_dtype() if device == "cpu" else "bfloat16"
