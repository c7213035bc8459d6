"""How fast each weight format's CPU kernel runs on this machine, for ``quantize="auto"``.

The pass (``passes/quantize_plan.py``) asks for seconds per M = 1 call through its
``measuring_speed`` hook and knows nothing of kernels; the compile driver installs
:func:`cpu_layer_seconds` there when the graph goes to the CPU backend. It times the kernels that
backend runs (the C++ fp32 GEMV and the quantized GEMV), with the weights arriving from memory as
in a decode step (:func:`_copies`), and keeps the result in the tuning cache
(``autotune/cache.py``; the key holds the CPU, ISA, thread count and the kernels' sources), so the
second compile measures nothing. Tests inject their own measurement and never time anything.
"""
from __future__ import annotations

import hashlib
import itertools
from typing import Any, Callable, Sequence

import torch

from fxforge.passes.quantize_plan import DENSE, Seconds, formats_for

SPEED_KERNEL = "quant_auto_speed"
MEASURE_REPEATS = 3


def _random_weight(k: int, n: int) -> torch.Tensor:
    """A weight of the shape (speed does not depend on the values; a fixed seed keeps the
    measurement free of the global RNG)."""
    return torch.randn(n, k, generator=torch.Generator().manual_seed(k * 131 + n)) * 0.05


def _copies(fmt: str, weight: torch.Tensor) -> list:
    """Kernels of ``fmt`` on distinct weights of ``weight``'s shape (packs are shared by content,
    so each copy's rows are rolled), together at least WORKING_SET_BYTES of weight data: a call
    cycling through them reads its weight from memory, as a decode step does. Timed on one
    weight, the weight stays in the caches and the speed is the kernel's arithmetic: there the
    AVX2 int4 GEMV measured slower than int8 (Zen 3), though streamed it reads fewer bytes and
    decodes faster, so auto's plans chose int8 where int4 met the budget faster."""
    from fxforge.kernels.gemv_cpu import GemvLinear
    from fxforge.kernels.linear_cpu_tuning import WORKING_SET_BYTES
    from fxforge.kernels.quant_gemv_cpu import QuantGemv
    from fxforge.passes.quantize import _encode
    n, k = weight.shape
    if fmt == DENSE:
        def make(i):
            return GemvLinear(weight.roll(i, 0), None, "none")
    else:
        encoded, codes, scales, offsets = _encode(weight, f"{fmt}:rtn", f"speed {k}x{n}")

        def make(i):
            return QuantGemv(encoded, codes.roll(i, 0), scales.roll(i, 0),
                             offsets.roll(i, 0) if offsets is not None else None, None, "none")
    first = make(0)
    pack_bytes = first.weight.numel() * first.weight.element_size()
    count = min(n, -(-WORKING_SET_BYTES // pack_bytes))   # rolled past n rows: a repeat
    return [first] + [make(i) for i in range(1, count)]


def _kernels(k: int, n: int, formats: Sequence[str]) -> dict[str, Callable[[], Any]]:
    """One M = 1 call of each format's CPU kernel on a ``K x N`` weight streamed from memory
    (fmt -> runnable; each call takes the next of :func:`_copies`)."""
    weight, x = _random_weight(k, n), torch.randn(1, k)
    runs = {}
    for fmt in formats:
        if fmt not in formats_for(k):
            raise ValueError(f"quantize auto: format {fmt!r} does not fit K={k}")
        kernels, turn = _copies(fmt, weight), itertools.count()
        runs[fmt] = (lambda kernels=kernels, turn=turn:
                     kernels[next(turn) % len(kernels)](x, None))
    return runs


def measure_kernels(k: int, n: int, formats: Sequence[str]) -> Seconds:
    """Seconds per M = 1 call of each format's kernel, interleaved (autotune/measure.py): the
    20th percentile of the rounds, not the median, since another process's load only ever adds
    time (on a 2-core Zen 4 host shared with other compiles, rounds of these microsecond calls
    took up to milliseconds when a thread was descheduled mid-call); the least of
    :data:`MEASURE_REPEATS` such measurements, as a stall can span a whole one."""
    from fxforge.autotune.measure import measure_interleaved
    runs = _kernels(k, n, formats)
    repeats = [measure_interleaved(runs, rounds=15, seed=seed) for seed in range(MEASURE_REPEATS)]
    return {fmt: min(timings[fmt].p20 for timings in repeats) for fmt in runs}


def _speed_source() -> str:
    """The kernels' identity in the cache key: their sources and the ISA builds chosen."""
    from fxforge.kernels import gemv_cpu, quant_gemv_cpu
    text = "\n".join((quant_gemv_cpu.SOURCE, gemv_cpu.SOURCE, quant_gemv_cpu.choose_isa(),
                      gemv_cpu.choose_isa()))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def kernels_unavailable():
    from fxforge.kernels.gemv_cpu import gemv_unavailable
    from fxforge.kernels.quant_gemv_cpu import quant_gemv_unavailable
    return gemv_unavailable() or quant_gemv_unavailable()


def cpu_layer_seconds(k: int, n: int, formats: Sequence[str], cache: Any = None) -> Seconds:
    """Seconds per M = 1 call of each of ``formats`` on a ``K x N`` weight: the tuning cache's
    record, else measured now and stored. Without a C++ compiler: the bytes read stand in
    (``quantize_plan.bytes_seconds``, logged)."""
    from fxforge.passes.quantize_plan import bytes_seconds
    missing = kernels_unavailable()
    if missing is not None:
        return bytes_seconds(k, n, formats, missing)
    from fxforge.autotune.cache import CacheKey, TuningCache
    from fxforge.kernels.tuning import Config
    cache = cache if cache is not None else TuningCache()
    key = CacheKey.make(SPEED_KERNEL, _speed_source(),
                        {"K": k, "N": n, "M": 1, "formats": sorted(formats), "weights": "streamed"})
    record = cache.get(key)
    stored = record.get("seconds") if isinstance(record, dict) else None
    if isinstance(stored, dict) and set(stored) == set(formats) and all(
            isinstance(t, float) and t > 0 for t in stored.values()):
        return stored
    seconds = measure_kernels(k, n, formats)
    cache.put(key, {"config": Config.of().to_json(), "seconds": seconds})
    return seconds
