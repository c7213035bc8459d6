"""The search: real CPU spaces, a known landscape, and every way a candidate can fail."""
import time

import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

from fxforge.autotune.search import TuningError, neighbours, search
from fxforge.autotune.task import Tunable, TuningTask, make_tunable
from fxforge.irgraph import decomposition_table
from fxforge.kernels.fused import KernelBuildError, build_program
from fxforge.kernels.fused_cpp_tuning import example_shapes, fused_task
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


def test_exhaustive_search_on_a_real_cpu_space_keeps_the_fastest_measured():
    tunable = make_tunable(layer_norm_task())
    result = search(tunable, strategy="exhaustive", rounds=3)
    kept, pruned = tunable.space.survivors(tunable.problem)
    assert result.measured == len(kept) and result.pruned == len(pruned)
    assert all(r.status == "ok" for r in result.records if r.status != "pruned")
    fastest = min(_ok(result), key=lambda r: r.timing.median).config
    # the winner is the fastest measured, or the default when it won the final head-to-head
    assert result.best in (fastest, result.default)
    assert result.best_time > 0 and result.default_time > 0


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

    def __init__(self, task, fail=None):
        super().__init__(task)
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
        delay = 200e-6 * (1 + self.steps(config))
        value = torch.full((4,), 7.0 if failure == "wrong" else 1.0)

        def run():
            if failure == "raise_later" and getattr(run, "calls", 0) > 1:  # passes the check
                raise RuntimeError("injected failure while timing")
            run.calls = getattr(run, "calls", 0) + 1
            end = time.perf_counter() + delay
            while time.perf_counter() < end:
                pass
            return value
        return run

    def reference(self):
        return torch.full((4,), 1.0)

    def cost(self, config):
        return float(sum(abs(VALUES[k].index(config[k]) - 2) for k in ("a",)))  # a rough model


def _landscape(**kwargs):
    return Landscape(TuningTask.make("landscape", __name__, {"n": 1}, "x"), **kwargs)


def test_exhaustive_finds_the_optimum_of_a_known_landscape():
    result = search(_landscape(), strategy="exhaustive", rounds=3)
    assert result.best == Config.of(**OPTIMUM)
    assert result.measured == 40 and result.gain > 2


def test_guided_search_reaches_the_optimum_measuring_a_fraction():
    tunable = _landscape()
    result = search(tunable, strategy="guided", max_fraction=0.4, rounds=3)
    assert result.best == Config.of(**OPTIMUM)
    assert len(set(tunable.built)) <= 16 and result.measured <= 16
    assert result.strategy == "guided"


def test_guided_search_respects_its_budget():
    tunable = _landscape()
    result = search(tunable, strategy="guided", max_fraction=0.1, rounds=3)
    assert result.measured <= 4
    assert tunable.steps(result.best) < tunable.steps(result.default)


def test_failing_candidates_are_recorded_and_skipped_never_chosen():
    optimum = Config.of(**OPTIMUM)
    near = Config.of(a=8, b=2, c=2)
    fail = {optimum: "wrong", near: "build", Config.of(a=4, b=2, c=1): "oom",
            Config.of(a=16, b=2, c=1): "raise_later"}
    result = search(_landscape(fail=fail), strategy="exhaustive", rounds=3)
    status = {r.config: r.status for r in result.records}
    assert status[optimum] == "wrong" and "max abs diff" in \
        next(r.reason for r in result.records if r.config == optimum)
    assert status[near] == "build_failed"
    assert status[Config.of(a=4, b=2, c=1)] == "oom"
    assert status[Config.of(a=16, b=2, c=1)] == "error"
    assert result.best not in fail and status[result.best] == "ok"


def test_a_pruned_default_or_a_failing_reference_is_a_tuning_error():
    tunable = _landscape()
    tunable.space = TuningSpace("landscape", tunable.space.configs, tunable.space.default,
                                prune=lambda c, p: "too big" if c["a"] == 1 else None)
    with pytest.raises(TuningError, match="default config"):
        search(tunable)
    broken = _landscape()
    broken.reference = lambda: (_ for _ in ()).throw(RuntimeError("no reference"))
    with pytest.raises(TuningError, match="no reference"):
        search(broken)


def test_neighbours_move_one_knob_one_step():
    configs = _landscape().space.configs
    found = neighbours(Config.of(a=4, b=0, c=1), list(configs))
    assert set(found) == {Config.of(a=2, b=0, c=1), Config.of(a=8, b=0, c=1),
                          Config.of(a=4, b=1, c=1), Config.of(a=4, b=0, c=2)}


def test_unknown_strategy_is_a_clear_error():
    with pytest.raises(ValueError, match="strategy"):
        search(_landscape(), strategy="random")
