"""Batch-size search: the batch that maximizes throughput within a latency and/or memory budget.

Doubles the batch from 1 until a budget is exceeded, memory runs out or ``max_batch`` is
reached, then binary-searches between the last good and the first bad size. Out-of-memory is
a result (an ``"oom"`` point), not a crash: memory is freed and the search ends with what it
found. Memory is the peak of one call: CUDA's allocator peak on GPU; on Linux CPU the peak
RSS, reset through ``/proc/self/clear_refs`` (writing "5" resets VmHWM, Linux >= 4.0).
CPU time comes from ``clock`` (``time.perf_counter`` unless a test injects a simulated one).
"""
from __future__ import annotations

import ctypes
import gc
import logging
import re
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from fxforge.autotune.measure import Clock

log = logging.getLogger("fxforge.autotune")

MB = 1 << 20
STATUSES = ("ok", "over_latency", "over_memory", "oom", "error")
REFINE_STEPS = 4  # binary-search steps between the last good and the first bad batch size


@dataclass
class BatchPoint:
    batch_size: int
    status: str  # one of STATUSES
    median_s: Optional[float] = None
    p20_s: Optional[float] = None
    p80_s: Optional[float] = None
    throughput: Optional[float] = None  # items per second: batch_size / median_s
    peak_bytes: Optional[int] = None  # peak memory of one call; None where not measurable
    reason: str = ""


@dataclass
class BatchCurve:
    points: list[BatchPoint]
    best: Optional[BatchPoint]
    budget_ms: Optional[float]
    budget_mb: Optional[float]
    device: str

    def to_json(self) -> dict:
        return {"points": [asdict(p) for p in self.points],
                "best": None if self.best is None else self.best.batch_size,
                "budget_ms": self.budget_ms, "budget_mb": self.budget_mb, "device": self.device}

    @staticmethod
    def from_json(d: dict) -> "BatchCurve":
        points = [BatchPoint(**p) for p in d["points"]]
        best = next((p for p in points if p.batch_size == d["best"]), None)
        return BatchCurve(points, best, d.get("budget_ms"), d.get("budget_mb"), d.get("device", "cpu"))

    def table(self) -> str:
        """A plain-text table of the curve; the best point is marked with ``*``."""
        def num(value: Optional[float], fmt: str) -> str:
            return "-" if value is None else format(value, fmt)
        rows = [("batch", "status", "median ms", "p20 ms", "p80 ms", "items/s", "peak MB", "")]
        for p in self.points:
            ms = [None if v is None else v * 1e3 for v in (p.median_s, p.p20_s, p.p80_s)]
            mark = "*" if p is self.best else ""
            peak = None if p.peak_bytes is None else p.peak_bytes / MB
            rows.append((f"{p.batch_size}{mark}", p.status, *(num(v, ".3f") for v in ms),
                         num(p.throughput, ".1f"), num(peak, ".1f"), p.reason))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
        limits = [f"{v} {unit}" for v, unit in ((self.budget_ms, "ms"), (self.budget_mb, "MB")) if v is not None]
        budget = f"device {self.device}, budget: {', '.join(limits) or 'none'}"
        return "\n".join([budget, *lines])


def _is_oom(exc: BaseException) -> bool:
    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    if isinstance(exc, (MemoryError, oom_type)):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _trim_malloc() -> None:
    """Give freed heap memory back to the OS so that the next call's peak shows in VmHWM."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss_status() -> tuple[int, int]:
    """(VmHWM, VmRSS) of this process in bytes."""
    with open("/proc/self/status") as f:
        text = f.read()
    def field(name: str) -> int:
        return int(re.search(rf"^{name}:\s+(\d+) kB", text, re.M).group(1)) * 1024
    return field("VmHWM"), field("VmRSS")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_bytes(run: Callable, inputs: tuple, cuda: bool, cpu_peak_ok: bool) -> Optional[int]:
    """Peak memory of one (untimed) call, above what was allocated before it."""
    if cuda:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run(*inputs)
        torch.cuda.synchronize()
        return max(0, torch.cuda.max_memory_allocated() - before)
    if not cpu_peak_ok:
        run(*inputs)
        return None
    gc.collect()
    _trim_malloc()
    _reset_peak_rss()
    _, rss_before = _rss_status()
    out = run(*inputs)
    hwm_after, _ = _rss_status()
    del out
    return max(0, hwm_after - rss_before)


def _time_calls(run: Callable, inputs: tuple, repeats: int, cuda: bool,
                clock: Clock) -> list[float]:
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            run(*inputs)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = clock()
            run(*inputs)
            times.append(clock() - t0)
    return times


def _measure(run, make_inputs, b: int, *, warmup: int, repeats: int, cuda: bool, clock: Clock,
             cpu_peak_ok: bool, budget_ms: Optional[float], budget_mb: Optional[float]) -> BatchPoint:
    """One batch size: warm-up (absorbs recompilation), one memory call, then timed calls.

    Raises whatever ``run`` raises except out-of-memory, which becomes an ``"oom"`` point."""
    oom_reason, inputs = None, None
    try:
        with torch.no_grad():
            inputs = tuple(make_inputs(b))
            for _ in range(warmup):
                run(*inputs)
            peak = _peak_bytes(run, inputs, cuda, cpu_peak_ok)
            times = _time_calls(run, inputs, repeats, cuda, clock)
        del inputs
    except Exception as exc:  # noqa: BLE001 - only OOM is swallowed; the rest is re-raised
        if not _is_oom(exc):
            raise
        oom_reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if oom_reason is not None:  # outside the except block: the traceback no longer pins tensors
        inputs = None
        _free_memory()
        return BatchPoint(b, "oom", reason=oom_reason)
    median = statistics.median(times)
    deciles = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else [median] * 9
    p20, p80 = deciles[1], deciles[7]
    point = BatchPoint(b, "ok", median, p20, p80, b / median if median > 0 else None, peak)
    if budget_mb is not None and peak is not None and peak > budget_mb * MB:
        point.status, point.reason = "over_memory", f"peak {peak / MB:.1f} MB > {budget_mb} MB"
    elif budget_ms is not None and median * 1e3 > budget_ms:
        point.status, point.reason = "over_latency", f"median {median * 1e3:.3f} ms > {budget_ms} ms"
    return point


def _doubling(max_batch: int) -> list[int]:
    sizes = [1 << i for i in range(max_batch.bit_length()) if (1 << i) <= max_batch]
    return sizes if sizes[-1] == max_batch else sizes + [max_batch]


def find_batch_size(run: Callable[..., Any], make_inputs: Callable[[int], tuple], *,
                    batch_sizes: Optional[Sequence[int]] = None, budget_ms: Optional[float] = None,
                    budget_mb: Optional[float] = None, max_batch: int = 4096, device: str = "cpu",
                    warmup: int = 2, repeats: int = 5, refine: bool = True,
                    progress: Optional[Callable[[BatchPoint], Any]] = None,
                    clock: Clock = time.perf_counter) -> BatchCurve:
    """Measure ``run(*make_inputs(b))`` over batch sizes and pick the best throughput in budget.

    With ``batch_sizes`` those sizes are measured (ascending); otherwise 1, 2, 4, ... up to
    ``max_batch``, then (``refine``) a binary search between the last good and first bad size.
    Growth stops at the first failure (explicit sizes: at the first oom/error; over-budget
    sizes are still measured). ``progress(point)`` is called after each measured point.
    """
    if repeats < 1 or warmup < 0 or max_batch < 1:
        raise ValueError(f"need repeats >= 1, warmup >= 0, max_batch >= 1; got {repeats}, {warmup}, {max_batch}")
    cuda = device.startswith("cuda")
    cpu_peak_ok = not cuda and _reset_peak_rss()
    if budget_mb is not None and not cuda and not cpu_peak_ok:
        raise ValueError(f"a memory budget ({budget_mb} MB) cannot be enforced on this platform: "
                         "/proc/self/clear_refs is not writable, so peak CPU memory is not measurable")
    explicit = batch_sizes is not None
    sizes = sorted(set(int(b) for b in batch_sizes)) if explicit else _doubling(max_batch)
    if not sizes or sizes[0] < 1:
        raise ValueError(f"batch sizes must be positive integers, got {batch_sizes!r}")
    points: list[BatchPoint] = []

    def measure(b: int) -> BatchPoint:
        try:
            point = _measure(run, make_inputs, b, warmup=warmup, repeats=repeats, cuda=cuda,
                             clock=clock, cpu_peak_ok=cpu_peak_ok, budget_ms=budget_ms,
                             budget_mb=budget_mb)
        except Exception as exc:  # noqa: BLE001 - a failing size is recorded, not raised
            if not points:
                raise RuntimeError(f"find_batch_size: the model fails at batch size {b}, the first "
                                   f"size tried: {type(exc).__name__}: {exc}") from exc
            point = BatchPoint(b, "error", reason=f"{type(exc).__name__}: {exc}")
        log.info("batch %d: %s %s", b, point.status, point.reason)
        points.append(point)
        if progress is not None:
            progress(point)
        return point

    for b in sizes:
        point = measure(b)
        if point.status in ("oom", "error") or (point.status != "ok" and not explicit):
            break
    if refine and not explicit:
        _refine(points, measure)
    points.sort(key=lambda p: p.batch_size)
    ok = [p for p in points if p.status == "ok" and p.throughput is not None]
    best = max(ok, key=lambda p: p.throughput) if ok else None
    return BatchCurve(points, best, budget_ms, budget_mb, device)


def _refine(points: list[BatchPoint], measure: Callable[[int], BatchPoint]) -> None:
    """Binary-search the largest in-budget size between the last good and the first bad one."""
    bad = points[-1]
    if bad.status not in ("over_latency", "over_memory", "oom") or len(points) < 2:
        return
    good, bad_size = points[-2].batch_size, bad.batch_size
    for _ in range(REFINE_STEPS):
        mid = (good + bad_size) // 2
        if mid <= good:
            return
        point = measure(mid)
        if point.status == "ok":
            good = mid
        elif point.status == "error":
            return
        else:
            bad_size = mid
