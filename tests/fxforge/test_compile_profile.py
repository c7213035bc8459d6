"""The compile-time profile: every stage of a real compile lands in the graph's table, phases nest,
FXFORGE_PROFILE prints it, and a nested compile adds to its parent's profile."""
import torch

import fxforge
from fxforge.examples.small_gpt import example_inputs, make_model
from fxforge.irgraph import compile_profile
from fxforge.irgraph.compile_profile import CompileProfile, phase, profiling, record


def _compiled_graphs(module):
    from fxforge.compiler import recording
    with recording() as graphs:
        with torch.no_grad():
            module(*example_inputs(seq=8))
    return graphs


def test_a_compile_records_every_stage(monkeypatch, capsys):
    monkeypatch.setenv(compile_profile.ENV, "1")
    graphs = _compiled_graphs(fxforge.compile(make_model(seed=3).eval()))
    profile = graphs[0].profile
    top = [path[0] for path in profile.phases if len(path) == 1]
    for stage in ("capture: dynamo tracing", "capture: aot_autograd", "capture: build IR",
                  "freeze", "passes", "lower"):
        assert stage in top, stage
    passes = {path[1] for path in profile.phases if path[0] == "passes" and len(path) == 2}
    assert {"cse", "dce", "fuse_attention", "graph copies", "recompile"} <= passes
    assert profile.seconds("passes", "graph copies") > 0
    lowered = {path[-1] for path in profile.phases if path[:2] == ("lower", "graph")}
    assert {"copy", "fusion groups", "kernel rules"} <= lowered
    # parts fit in their phase, top-level phases in the total
    for path, part in profile.phases.items():
        if len(path) > 1:
            assert part.seconds <= profile.seconds(*path[:-1]) + 1e-9, path
    assert sum(p.seconds for path, p in profile.phases.items() if len(path) == 1) \
        <= profile.total + 1e-9
    printed = capsys.readouterr().err
    assert "fxforge compile profile" in printed and "fuse_attention" in printed


def test_no_profile_is_kept_or_printed_outside_a_compile(capsys):
    with phase("outside"):
        record("nothing", 1.0)
    assert compile_profile.current() is None
    assert capsys.readouterr().err == ""


def test_phases_nest_and_an_inner_compile_joins_the_outer_profile(monkeypatch):
    monkeypatch.delenv(compile_profile.ENV, raising=False)
    ticks = iter(range(100))
    monkeypatch.setattr(compile_profile.time, "perf_counter", lambda: float(next(ticks)))
    with profiling("outer") as outer:
        compile_profile.record_before("tracing", 5.0)
        with phase("lower"):
            with phase("build"):
                pass
            with profiling("inner") as inner:   # a nested compile (the KV step's graph)
                record("step", 2.0)
    assert inner is outer
    assert list(outer.phases) == [("tracing",), ("lower",), ("lower", "build"), ("lower", "step")]
    assert outer.seconds("lower", "build") == 1.0 and outer.seconds("lower", "step") == 2.0
    assert outer.seconds("lower") == 3.0            # ticks 1 -> 4 around the block
    assert outer.total == 5.0 + 5.0                 # ticks 0 -> 5, plus the tracing before
    table = outer.table()
    assert "    build" in table and "(not in a phase)" in table


def test_the_table_of_an_empty_profile_is_still_a_table():
    assert "0 ms in all" in CompileProfile("empty").table()
