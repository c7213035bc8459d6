"""Timing candidates properly: warm-up, several repeats, medians; device events on a GPU.

Candidates of one search step are measured *interleaved*: each round times every candidate once,
in a shuffled order, and a candidate's time is the median over rounds. A noisy neighbour or a
frequency change then hits all candidates alike instead of whichever one ran during it. A call
shorter than ``MIN_SAMPLE_S`` is repeated inside one sample, so the timer's resolution and
Python's own overhead do not decide the ranking.

The CPU clock is injectable (``clock``: any zero-argument function returning seconds, default
``time.perf_counter``), so that tests drive the protocol with simulated times instead of
busy-waiting against a real clock that a loaded machine slows down unevenly.
"""
from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Mapping

import torch

from fxforge.irgraph.compile_profile import phase

MIN_SAMPLE_S = 2e-3      # one timed sample lasts at least this long
MAX_INNER = 1000         # at most this many calls per sample

Clock = Callable[[], float]   # seconds, monotonic


@dataclass(frozen=True)
class Timing:
    median: float        # seconds per call
    p20: float
    p80: float
    samples: int


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def summarize(per_call: list[float]) -> Timing:
    return Timing(statistics.median(per_call), _quantile(per_call, 0.2), _quantile(per_call, 0.8),
                  len(per_call))


def _cuda(device: str) -> bool:
    return device.startswith("cuda") and torch.cuda.is_available()


def _time_once(fn: Callable[[], Any], inner: int, device: str,
               clock: Clock = time.perf_counter) -> float:
    """Seconds per call over ``inner`` back-to-back calls (CUDA events on a GPU, else ``clock``)."""
    if _cuda(device):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / inner
    t0 = clock()
    for _ in range(inner):
        fn()
    return (clock() - t0) / inner


def inner_calls(fn: Callable[[], Any], device: str = "cpu",
                clock: Clock = time.perf_counter) -> int:
    """How many calls make one sample of at least ``MIN_SAMPLE_S`` (after one warm call)."""
    fn()
    if _cuda(device):
        torch.cuda.synchronize()
    one = max(_time_once(fn, 1, device, clock), 1e-7)
    return max(1, min(MAX_INNER, int(MIN_SAMPLE_S / one) + 1))


def measure_interleaved(fns: Mapping[Hashable, Callable[[], Any]], *, device: str = "cpu",
                        warmup: int = 2, rounds: int = 7, seed: int = 0,
                        clock: Clock = time.perf_counter) -> dict[Hashable, Timing]:
    """Time every callable in ``fns``; exceptions propagate (the caller decides what they mean)."""
    with phase("autotune measurements"):
        return _measure_interleaved(fns, device, warmup, rounds, seed, clock)


def _measure_interleaved(fns: Mapping[Hashable, Callable[[], Any]], device: str, warmup: int,
                         rounds: int, seed: int, clock: Clock) -> dict[Hashable, Timing]:
    inner = {key: inner_calls(fn, device, clock) for key, fn in fns.items()}
    for key, fn in fns.items():
        _time_once(fn, max(1, warmup * inner[key] // 2), device, clock)
    samples: dict[Hashable, list[float]] = {key: [] for key in fns}
    order = list(fns)
    shuffle = random.Random(seed)
    for _ in range(rounds):
        shuffle.shuffle(order)
        for key in order:
            samples[key].append(_time_once(fns[key], inner[key], device, clock))
    return {key: summarize(values) for key, values in samples.items()}


def measure(fn: Callable[[], Any], *, device: str = "cpu", warmup: int = 2,
            rounds: int = 7, clock: Clock = time.perf_counter) -> Timing:
    return measure_interleaved({0: fn}, device=device, warmup=warmup, rounds=rounds,
                               clock=clock)[0]
