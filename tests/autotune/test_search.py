"""The search: real CPU spaces, a known landscape, and every way a candidate can fail.

The known landscape runs on a simulated clock (``conftest.SimulatedClock``): its candidates
take simulated time, so the verdicts check the search logic and hold on a loaded machine."""
import json

import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

from fxforge.autotune import search as search_module
from fxforge.autotune.search import MIN_GAIN, TuningError, TuningResult, neighbours, search
from fxforge.autotune.task import Tunable, TuningTask, make_tunable
from fxforge.irgraph import decomposition_table
from fxforge.kernels.fused import build_program
from fxforge.kernels.fused_cpp_tuning import example_shapes, fused_task
from fxforge.kernels.toolchain import KernelBuildError
from fxforge.kernels.linear_cpu_tuning import linear_task
from fxforge.kernels.tuning import Config, TuningSpace


def layer_norm_task(rows=16, width=64):
    def fn(x, r, w, b):
        return F.layer_norm(x + r, (width,), w, b, 1e-5)
    inputs = (torch.randn(rows, width), torch.randn(rows, width), torch.randn(width),
              torch.randn(width))
    gm = make_fx(fn, decomposition_table=decomposition_table(), tracing_mode="symbolic")(*inputs)
    program = build_program(gm)
    return fused_task(program, example_shapes(program, gm))


def _ok(result):
    return [r for r in result.records if r.status == "ok"]


def test_exhaustive_search_on_a_real_cpu_space_chooses_a_correct_confirmed_config():
    """Real timings, so only what holds whatever they are: every survivor measured, the choice a
    confirmed survivor whose kernel computes the reference, and the result (its JSON too)
    reporting the times and gain of the records it was chosen on."""
    tunable = make_tunable(layer_norm_task())
    result = search(tunable, strategy="exhaustive", rounds=3)
    kept, pruned = tunable.space.survivors(tunable.problem)
    assert result.measured == len(kept) and result.pruned == len(pruned)
    assert all(r.status == "ok" for r in result.records if r.status != "pruned")
    assert result.best in kept
    assert tunable.check(tunable.build(result.best)(), tunable.reference()) is None
    confirmed = {r.config: r.timing.median for r in _ok(result) if r.confirmed}
    assert result.default in confirmed and result.best in confirmed
    assert (result.best_time, result.default_time) == (confirmed[result.best],
                                                       confirmed[result.default])
    assert result.best == result.default or \
        confirmed[result.default] > confirmed[result.best] * (1 + MIN_GAIN)
    again = TuningResult.from_json(json.loads(json.dumps(result.to_json())))
    assert again.best == result.best and again.gain == result.gain > 0
    assert {r.config for r in again.records if r.confirmed} == set(confirmed)


def test_linear_space_is_searched_and_every_candidate_is_checked():
    tunable = make_tunable(linear_task(8, 32, 48, torch.float32, "gelu", True, True))
    result = search(tunable, rounds=3)
    assert {r.status for r in result.records} <= {"ok", "pruned"}
    assert result.best in [r.config for r in _ok(result)]
    assert result.to_json()["records"][0]["config"]  # the space's description of each config


# A known landscape: time grows with the distance (in knob steps) from one optimum.
VALUES = {"a": (1, 2, 4, 8, 16), "b": (0, 1, 2, 3), "c": (1, 2)}
OPTIMUM = {"a": 8, "b": 2, "c": 1}


class Landscape(Tunable):
    parallel_build = False
    STEP_S = 200e-6          # simulated time per call: STEP_S x (1 + steps from the optimum)

    def __init__(self, task, clock, fail=None):
        super().__init__(task)
        self.clock = clock
        configs = tuple(Config.of(a=a, b=b, c=c) for a in VALUES["a"] for b in VALUES["b"]
                        for c in VALUES["c"])
        self.space = TuningSpace("landscape", configs, default=Config.of(a=1, b=0, c=2))
        self.fail = fail or {}
        self.built = []

    def steps(self, config):
        return sum(abs(VALUES[k].index(config[k]) - VALUES[k].index(v)) for k, v in OPTIMUM.items())

    def build(self, config):
        self.built.append(config)
        failure = self.fail.get(config)
        if failure == "build":
            raise KernelBuildError("injected compile failure")
        if failure == "oom":
            raise torch.OutOfMemoryError("injected: out of memory")
        delay = self.STEP_S * (1 + self.steps(config))
        value = torch.full((4,), 7.0 if failure == "wrong" else 1.0)

        def run():
            if failure == "raise_later" and getattr(run, "calls", 0) > 1:  # passes the check
                raise RuntimeError("injected failure while timing")
            run.calls = getattr(run, "calls", 0) + 1
            self.clock.spend(delay)
            return value
        return run

    def reference(self):
        return torch.full((4,), 1.0)

    def cost(self, config):
        return float(sum(abs(VALUES[k].index(config[k]) - 2) for k in ("a",)))  # a rough model


def _landscape(clock, **kwargs):
    return Landscape(TuningTask.make("landscape", __name__, {"n": 1}, "x"), clock, **kwargs)


def test_exhaustive_finds_the_optimum_of_a_known_landscape(clock):
    result = search(_landscape(clock), strategy="exhaustive", rounds=3, clock=clock)
    assert result.best == Config.of(**OPTIMUM)
    assert result.measured == 40 and result.gain == pytest.approx(7.0)   # 7 steps against 1


def test_guided_search_reaches_the_optimum_measuring_a_fraction(clock):
    tunable = _landscape(clock)
    result = search(tunable, strategy="guided", max_fraction=0.4, rounds=3, clock=clock)
    assert result.best == Config.of(**OPTIMUM)
    assert len(set(tunable.built)) <= 16 and result.measured <= 16
    assert result.strategy == "guided"


def test_guided_search_respects_its_budget(clock):
    tunable = _landscape(clock)
    result = search(tunable, strategy="guided", max_fraction=0.1, rounds=3, clock=clock)
    assert result.measured <= 4
    assert tunable.steps(result.best) < tunable.steps(result.default)


def _busy_neighbour(clock):
    """A neighbour starts a job 0.1 s into the search and every duration triples from then on:
    timings taken before and after are not comparable (only the candidates measured in one
    interleaved measurement are), as on a shared machine."""
    clock.load = lambda now: 1.0 if now < 0.1 else 3.0
    return clock


def _ok_records(data):
    return {r["config"]: r for r in data["records"] if r["status"] == "ok"}


@pytest.mark.parametrize("strategy", ["exhaustive", "guided"])
def test_the_choice_the_gain_and_the_plotted_times_are_one_measurement(clock, strategy):
    """The plot shows each record's median_s; the choice and the reported gain must be made on
    exactly those numbers, even when the load drifts during the search: a plot whose chosen
    config looks slower than another shown is a tuner no one can check."""
    result = search(_landscape(_busy_neighbour(clock)), strategy=strategy, max_fraction=0.4,
                    rounds=3, clock=clock)
    data = result.to_json()
    records = _ok_records(data)
    chosen, default = records[data["best"]], records[data["default"]]
    assert chosen["median_s"] == data["best_s"] and default["median_s"] == data["default_s"]
    assert result.gain == data["default_s"] / data["best_s"]
    finalists = [r for r in records.values() if r["confirmed"]]
    assert chosen["confirmed"] and default["confirmed"] and len(finalists) >= 2
    assert chosen["median_s"] <= min(r["median_s"] for r in finalists) * (1 + MIN_GAIN)


def test_confirmation_keeps_the_winner_the_search_measured(clock):
    """Relative speeds never change (the optimum is 7x faster than the default at any one
    moment); only the machine's load does. The winner the search measured must survive the
    final re-timing with the gain that moment shows: a candidate timed at a quieter moment must
    not look faster than it is, and the default must not take over because it was re-timed at
    a busier one."""
    tunable = _landscape(_busy_neighbour(clock))
    result = search(tunable, strategy="exhaustive", rounds=3, clock=clock)
    assert result.best == Config.of(**OPTIMUM)
    assert result.gain == pytest.approx(7.0)


@pytest.mark.parametrize("faster, chosen", [(0.995, 0), (0.95, 1)])
def test_a_config_replaces_the_default_only_when_clearly_faster(fixed_times, clock, faster, chosen):
    """Within MIN_GAIN of the default is a tie (the default stays, gain 1.00); beyond it the
    faster config wins with the gain the confirmation measured."""
    result = search(fixed_times({0: 1.0, 1: faster}), rounds=3, clock=clock)
    assert result.best == Config.of(way=chosen)
    assert result.gain == pytest.approx(1.0 if chosen == 0 else 1 / faster)


@pytest.mark.parametrize("together_from", [0, 1], ids=["every step", "the confirmation"])
def test_timings_taken_apart_are_never_compared_nor_confirmed(fixed_times, clock, monkeypatch,
                                                              together_from):
    """When candidates run alone but fail when timed together, their timings come from separate
    measurements: the search must not rank or confirm them, and the choice keeps the default.
    Way 1 is twice as fast, so comparing the separate timings would choose it."""
    real, together = search_module.measure_interleaved, []

    def fails_in_company(fns, **kwargs):
        if len(fns) > 1:
            together.append(1)
            if len(together) > together_from:
                raise RuntimeError("injected: fails only when timed with other candidates")
        return real(fns, **kwargs)
    monkeypatch.setattr(search_module, "measure_interleaved", fails_in_company)
    result = search(fixed_times({0: 1.0, 1: 0.5}), rounds=3, clock=clock)
    assert result.best == result.default and result.gain == 1.0
    assert not [r for r in result.records if r.confirmed and r.config != result.default]
    way_1 = next(r for r in result.records if r.config == Config.of(way=1))
    if together_from == 0:                       # never timed with the default: not compared
        assert way_1.status == "error" and "timed together" in way_1.reason
    else:                                        # compared in the search, never confirmed
        assert way_1.status == "ok" and not way_1.confirmed


def test_failing_candidates_are_recorded_and_skipped_never_chosen(clock):
    optimum = Config.of(**OPTIMUM)
    near = Config.of(a=8, b=2, c=2)
    fail = {optimum: "wrong", near: "build", Config.of(a=4, b=2, c=1): "oom",
            Config.of(a=16, b=2, c=1): "raise_later"}
    result = search(_landscape(clock, fail=fail), strategy="exhaustive", rounds=3, clock=clock)
    status = {r.config: r.status for r in result.records}
    assert status[optimum] == "wrong" and "max abs diff" in \
        next(r.reason for r in result.records if r.config == optimum)
    assert status[near] == "build_failed"
    assert status[Config.of(a=4, b=2, c=1)] == "oom"
    assert status[Config.of(a=16, b=2, c=1)] == "error"
    assert result.best not in fail and status[result.best] == "ok"


def test_a_pruned_default_or_a_failing_reference_is_a_tuning_error(clock):
    tunable = _landscape(clock)
    tunable.space = TuningSpace("landscape", tunable.space.configs, tunable.space.default,
                                prune=lambda c, p: "too big" if c["a"] == 1 else None)
    with pytest.raises(TuningError, match="default config"):
        search(tunable, clock=clock)
    broken = _landscape(clock)
    broken.reference = lambda: (_ for _ in ()).throw(RuntimeError("no reference"))
    with pytest.raises(TuningError, match="no reference"):
        search(broken, clock=clock)


def test_neighbours_move_one_knob_one_step(clock):
    configs = _landscape(clock).space.configs
    found = neighbours(Config.of(a=4, b=0, c=1), list(configs))
    assert set(found) == {Config.of(a=2, b=0, c=1), Config.of(a=8, b=0, c=1),
                          Config.of(a=4, b=1, c=1), Config.of(a=4, b=0, c=2)}


def test_unknown_strategy_is_a_clear_error(clock):
    with pytest.raises(ValueError, match="strategy"):
        search(_landscape(clock), strategy="random", clock=clock)
