"""What this CPU can do, read once: its model name and instruction sets, as the kernels torch calls will use them.

Flags come from /proc/cpuinfo (Linux; elsewhere none are read and every question below answers no, the safe
side). oneDNN, which runs torch's int8 and bf16 matrix products on x86, uses no instruction set above
ONEDNN_MAX_CPU_ISA (or the older DNNL_MAX_CPU_ISA) when that is set, so a flag counts only where oneDNN may
use it; `torch.backends.cpu.get_cpu_capability()` is the vector ISA of ATen's own kernels (ATEN_CPU_CAPABILITY
lowers it). With both variables set to AVX2 an AVX-512 machine behaves like an AVX2-only one (e.g. AMD Zen 3).
"""
from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

# oneDNN's dnnl_cpu_isa_t bit masks: oneDNN may use ISA `a` under the limit `m` when a & m == a.
ONEDNN_ISA = {
    "SSE41": 0x1, "AVX": 0x3, "AVX2": 0x7, "AVX2_VNNI": 0xF, "AVX2_VNNI_2": 0x1F, "AVX512_CORE": 0x27,
    "AVX512_CORE_VNNI": 0x67, "AVX512_CORE_BF16": 0xE7, "AVX10_1_512": 0x1EF, "AVX512_CORE_FP16": 0x1EF,
    "AVX10_1_512_AMX": 0xFEF, "AVX512_CORE_AMX": 0xFEF, "AVX10_1_512_AMX_FP16": 0x1FEF, "AVX512_CORE_AMX_FP16": 0x1FEF,
}
# label -> (the /proc/cpuinfo flags it needs, the oneDNN ISA that uses them)
FEATURES = {
    "AVX2": (("avx2", "fma"), "AVX2"),
    "AVX-512": (("avx512f", "avx512bw", "avx512vl", "avx512dq"), "AVX512_CORE"),
    "AVX-VNNI": (("avx_vnni",), "AVX2_VNNI"),
    "AVX512-VNNI": (("avx512_vnni",), "AVX512_CORE_VNNI"),
    "AVX512-BF16": (("avx512_bf16",), "AVX512_CORE_BF16"),
    "AMX-INT8": (("amx_tile", "amx_int8"), "AVX512_CORE_AMX"),
    "AMX-BF16": (("amx_tile", "amx_bf16"), "AVX512_CORE_AMX"),
}


@dataclass(frozen=True)
class CpuInfo:
    """A CPU's model name and instruction-set flags, torch's vector ISA, and oneDNN's ISA limit (None: none set)."""

    model: str
    flags: frozenset[str]
    capability: str
    onednn_max_isa: str | None = None

    def has(self, feature: str) -> bool:
        """Whether the CPU has `feature` (a FEATURES label) and oneDNN may use it."""
        flags, isa = FEATURES[feature]
        limit = ONEDNN_ISA.get(self.onednn_max_isa or "")  # oneDNN ignores a value it does not know
        allowed = limit is None or ONEDNN_ISA[isa] & limit == ONEDNN_ISA[isa]
        return allowed and all(flag in self.flags for flag in flags)

    @property
    def features(self) -> list[str]:
        """The FEATURES labels this CPU has, as oneDNN may use them."""
        return [label for label in FEATURES if self.has(label)]

    @property
    def vnni(self) -> bool:
        """u8 x s8 dot products without a saturating 16-bit intermediate (AVX512-VNNI, AVX-VNNI or AMX)."""
        return any(self.has(f) for f in ("AVX-VNNI", "AVX512-VNNI", "AMX-INT8"))

    @property
    def native_bf16(self) -> bool:
        """bf16 matrix products in hardware (AVX512-BF16 or AMX); without them oneDNN or ATen emulate bf16."""
        return self.has("AVX512-BF16") or self.has("AMX-BF16")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: what a benchmark or a cache key records about the CPU."""
        return {"model": self.model, "machine": platform.machine(), "features": self.features, "vnni": self.vnni,
                "native_bf16": self.native_bf16, "torch_capability": self.capability,
                "onednn_max_isa": self.onednn_max_isa}

    def describe(self) -> str:
        """One line, e.g. 'AMD EPYC: AVX2, AVX-512, AVX512-VNNI, AVX512-BF16 (torch kernels: AVX512)'."""
        features = ", ".join(self.features) or ("no AVX2, AVX-512, VNNI or AMX" if self.flags else "flags not read")
        limit = f", oneDNN limited to {self.onednn_max_isa}" if self.onednn_max_isa else ""
        return f"{self.model}: {features} (torch kernels: {self.capability}{limit})"


def parse_cpuinfo(text: str) -> tuple[str | None, frozenset[str]]:
    """(model name, flags) of the first processor in a /proc/cpuinfo text (x86 'flags', Arm 'Features')."""
    model, flags = None, None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key == "model name" and model is None:
            model = value.strip() or None
        elif key in ("flags", "features") and flags is None:
            flags = frozenset(value.split())
    return model, flags or frozenset()


def read_cpu(cpuinfo: str | None = None, environ: Mapping[str, str] | None = None) -> CpuInfo:
    """This CPU (or the one a /proc/cpuinfo text describes), under the oneDNN limit in `environ` (default os.environ)."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        try:
            cpuinfo = path.read_text(errors="replace") if path.is_file() else ""
        except OSError:
            cpuinfo = ""
    model, flags = parse_cpuinfo(cpuinfo)
    environ = os.environ if environ is None else environ
    limit = (environ.get("ONEDNN_MAX_CPU_ISA") or environ.get("DNNL_MAX_CPU_ISA") or "").strip().upper() or None
    return CpuInfo(model or platform.processor() or platform.machine() or "unknown CPU", flags,
                   torch.backends.cpu.get_cpu_capability(), limit)


@functools.cache
def cpu_info() -> CpuInfo:
    """This process's CPU, read once."""
    return read_cpu()
