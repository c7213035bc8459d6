"""A simulated clock for the autotuner's tests: verdicts never depend on real time.

A simulated kernel calls ``clock.spend(seconds)`` instead of running; the measurement code reads
``clock()`` where it would read ``time.perf_counter()``. ``load`` models the machine: a factor
on every duration as a function of the simulated time (1: a quiet machine), so a test can make
the load drift during a search as a busy neighbour does, and still get the same result on every
run, on any machine.
"""
from __future__ import annotations

from typing import Callable

import pytest
import torch

from fxforge.autotune.task import Tunable, TuningTask
from fxforge.kernels.tuning import Config, TuningSpace


class SimulatedClock:
    def __init__(self, load: Callable[[float], float] = lambda now: 1.0):
        self.now, self.load = 0.0, load

    def __call__(self) -> float:
        return self.now

    def spend(self, seconds: float) -> None:
        self.now += seconds * self.load(self.now)


@pytest.fixture
def clock() -> SimulatedClock:
    return SimulatedClock()


class FixedTimes(Tunable):
    """Configs ``way=0, 1, ...`` whose calls take fixed simulated times (ms); ``way=0`` is the
    default. Every candidate computes the same (correct) value."""

    parallel_build = False

    def __init__(self, clock: SimulatedClock, ms: dict[int, float]):
        super().__init__(TuningTask.make("fixed_times", __name__, {"n": len(ms)}, "x"))
        configs = tuple(Config.of(way=w) for w in sorted(ms))
        self.space = TuningSpace("fixed_times", configs, default=Config.of(way=0),
                                 describe=lambda c: f"way {c['way']}")
        self.clock, self.ms = clock, ms

    def build(self, config: Config):
        seconds = self.ms[config["way"]] * 1e-3

        def run():
            self.clock.spend(seconds)
            return torch.ones(2)
        return run


@pytest.fixture
def fixed_times(clock) -> Callable[[dict[int, float]], FixedTimes]:
    return lambda ms: FixedTimes(clock, ms)
