"""Which matrix-multiply instructions this CPU has, and which matmul path that allows.

``cpu_features()`` reads ``torch.cpu.get_capabilities()`` (torch >= 2.7: the flags PyTorch's own
CPU dispatch sees, AMX included) and falls back to the ``flags`` line of ``/proc/cpuinfo``.
``FXFORGE_CPU_ISA`` replaces the detected ISA with a named one (``"amx"``, ``"avx512_bf16"``,
``"avx2"``, ...; several may be joined with commas), so tests can drive the dispatch of paths this
CPU lacks. ``choose_matmul_path`` turns the features and a requested dtype into a
:class:`MatmulPath` with a sentence that says why.

Why fp32 unless the hardware has bf16 units: without AMX-BF16 or AVX512-BF16, ATen's bf16 GEMM
converts element by element and runs ~8x (``F.linear``) to ~18x (``mm`` on a contiguous [K, N]
weight) slower than fp32 on the AVX2 Zen 1 CPU this was measured on; oneDNN refuses bf16 there
("bf16 path needs the cpu support avx_ne_convert or avx512bw, avx512vl and avx512dq").
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, replace
from typing import Optional

import torch

ISA_ENV = "FXFORGE_CPU_ISA"

_ISA_FLAGS = ("amx_tile", "amx_bf16", "amx_int8", "avx512f", "avx512_bf16", "avx512_vnni",
              "avx_vnni", "avx2", "fma")

# our flag -> the key in torch.cpu.get_capabilities()
_CAPABILITY_KEYS = {"amx_tile": "amx_tile", "amx_bf16": "amx_bf16", "amx_int8": "amx_int8",
                    "avx512f": "avx512_f", "avx512_bf16": "avx512_bf16",
                    "avx512_vnni": "avx512_vnni", "avx_vnni": "avx_vnni", "avx2": "avx2",
                    "fma": "fma3"}

# our flag -> the word in /proc/cpuinfo's flags line
_CPUINFO_FLAGS = {"amx_tile": "amx_tile", "amx_bf16": "amx_bf16", "amx_int8": "amx_int8",
                  "avx512f": "avx512f", "avx512_bf16": "avx512_bf16",
                  "avx512_vnni": "avx512_vnni", "avx_vnni": "avx_vnni", "avx2": "avx2",
                  "fma": "fma"}

_AVX2 = frozenset({"avx2", "fma"})
_AVX512 = _AVX2 | {"avx512f"}
_AVX512_VNNI = _AVX512 | {"avx512_vnni"}
_AVX512_BF16 = _AVX512_VNNI | {"avx512_bf16"}
# FXFORGE_CPU_ISA name -> the flags such a CPU has (each level includes the ones below it)
ISA_LEVELS: dict[str, frozenset[str]] = {
    "none": frozenset(),
    "avx2": _AVX2,
    "avx_vnni": _AVX2 | {"avx_vnni"},
    "avx512": _AVX512,
    "avx512_vnni": _AVX512_VNNI,
    "avx512_bf16": _AVX512_BF16,
    "amx": _AVX512_BF16 | {"amx_tile", "amx_bf16", "amx_int8"},
}


@dataclass(frozen=True)
class CPUFeatures:
    amx_tile: bool = False
    amx_bf16: bool = False
    amx_int8: bool = False
    avx512f: bool = False
    avx512_bf16: bool = False
    avx512_vnni: bool = False
    avx_vnni: bool = False
    avx2: bool = False
    fma: bool = False
    cpu_name: str = "unknown"
    cores: int = 1

    def isa_flags(self) -> tuple[str, ...]:
        """The ISA flags that are set, in a fixed order (part of the autotune cache key)."""
        return tuple(name for name in _ISA_FLAGS if getattr(self, name))

    def describe(self) -> str:
        return f"{self.cpu_name}, {self.cores} cores, ISA: {'+'.join(self.isa_flags()) or 'baseline'}"


@dataclass(frozen=True)
class MatmulPath:
    name: str  # one of MATMUL_PATHS
    reason: str
    compute_dtype: torch.dtype


MATMUL_PATHS = ("amx_bf16", "avx512_bf16", "amx_int8", "avx512_vnni", "fp32")


def _from_capabilities(capabilities: dict) -> dict:
    found = {flag: bool(capabilities.get(key, False)) for flag, key in _CAPABILITY_KEYS.items()}
    found["cpu_name"] = str(capabilities.get("cpu_name") or "unknown")
    found["cores"] = int(capabilities.get("num_physical_cores") or os.cpu_count() or 1)
    return found


def _from_cpuinfo(text: str) -> dict:
    """Flags and model name from /proc/cpuinfo's text (the first processor's entry)."""
    words: set[str] = set()
    name = "unknown"
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "flags" and not words:
            words = set(value.split())
        elif key == "model name" and name == "unknown":
            name = value.strip()
    found = {flag: word in words for flag, word in _CPUINFO_FLAGS.items()}
    found.update(cpu_name=name, cores=os.cpu_count() or 1)
    return found


def detect_hardware(cpuinfo_path: str = "/proc/cpuinfo") -> CPUFeatures:
    """The features of the CPU we run on (no override), from torch if it can tell, else cpuinfo."""
    get_capabilities = getattr(getattr(torch, "cpu", None), "get_capabilities", None)
    if get_capabilities is not None:
        try:
            return CPUFeatures(**_from_capabilities(get_capabilities()))
        except (RuntimeError, TypeError, ValueError):
            pass  # an old torch with another key set: fall through to cpuinfo
    try:
        with open(cpuinfo_path) as f:
            return CPUFeatures(**_from_cpuinfo(f.read()))
    except OSError:
        return CPUFeatures(cores=os.cpu_count() or 1)


@functools.lru_cache(maxsize=1)
def hardware() -> CPUFeatures:
    """The CPU as detected (cached), ignoring ``FXFORGE_CPU_ISA``: what ``-march=native`` builds for."""
    return detect_hardware()


def apply_isa_override(features: CPUFeatures, spec: str) -> CPUFeatures:
    """``features`` with its ISA flags replaced by those ``spec`` names (levels or flag names)."""
    flags: set[str] = set()
    for token in (t.strip().lower() for t in spec.split(",") if t.strip()):
        if token in ISA_LEVELS:
            flags |= ISA_LEVELS[token]
        elif token in _ISA_FLAGS:
            flags.add(token)
        else:
            raise ValueError(f"{ISA_ENV}={spec!r}: unknown ISA {token!r}; one of "
                             f"{sorted(ISA_LEVELS)} or a flag in {list(_ISA_FLAGS)}")
    return replace(features, cpu_name=f"{features.cpu_name} (as {ISA_ENV}={spec})",
                   **{name: name in flags for name in _ISA_FLAGS})


def cpu_features() -> CPUFeatures:
    """This CPU's features, with ``FXFORGE_CPU_ISA`` applied when it is set."""
    spec: Optional[str] = os.environ.get(ISA_ENV)
    return apply_isa_override(hardware(), spec) if spec else hardware()


def _is_int8(dtype: torch.dtype) -> bool:
    return dtype in (torch.int8, torch.uint8, torch.qint8, torch.quint8)


def choose_matmul_path(dtype: torch.dtype, features: Optional[CPUFeatures] = None) -> MatmulPath:
    """The matmul path for a requested ``dtype``: low precision only where the CPU has the units.

    bf16 runs as bf16 only with AMX-BF16 (preferred) or AVX512-BF16; int8 only with AMX-INT8 or
    AVX512-VNNI (AVX-VNNI alone is not used: no kernel here targets it); everything else is fp32.
    """
    features = features if features is not None else cpu_features()
    if dtype == torch.float32:
        return MatmulPath("fp32", "fp32 requested: fp32 GEMM", torch.float32)
    if dtype == torch.bfloat16:
        if features.amx_bf16 and features.amx_tile:
            return MatmulPath("amx_bf16", "bf16 requested and this CPU has AMX-BF16 tiles",
                              torch.bfloat16)
        if features.avx512_bf16:
            return MatmulPath("avx512_bf16", "bf16 requested and this CPU has AVX512-BF16 "
                              "(no AMX)", torch.bfloat16)
        return MatmulPath("fp32", "bf16 requested but this CPU has neither AMX-BF16 nor "
                          "AVX512-BF16: fp32", torch.float32)
    if dtype == torch.float16:
        return MatmulPath("fp32", "fp16 requested: no fp16 CPU matmul path here (AMX-FP16 "
                          "is not used): fp32", torch.float32)
    if _is_int8(dtype):
        if features.amx_int8 and features.amx_tile:
            return MatmulPath("amx_int8", "int8 requested and this CPU has AMX-INT8 tiles",
                              torch.int8)
        if features.avx512_vnni:
            return MatmulPath("avx512_vnni", "int8 requested and this CPU has AVX512-VNNI "
                              "(no AMX)", torch.int8)
        return MatmulPath("fp32", "int8 requested but this CPU has neither AMX-INT8 nor "
                          "AVX512-VNNI: dequantize to fp32", torch.float32)
    raise ValueError(f"no CPU matmul path for {dtype}; request one of float32, bfloat16, "
                     "float16 or an int8 type")


__all__ = ["CPUFeatures", "MatmulPath", "MATMUL_PATHS", "ISA_ENV", "ISA_LEVELS", "cpu_features",
           "detect_hardware", "apply_isa_override", "choose_matmul_path"]
