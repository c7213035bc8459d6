"""Batch-size search: explicit sizes, doubling with OOM recovery, latency and memory budgets.

The latency budget is checked against a simulated clock (``conftest.SimulatedClock``), so that
which sizes fit does not depend on how busy the machine is."""
from __future__ import annotations

import json

import pytest
import torch

from fxforge.autotune.batch import BatchCurve, BatchPoint, find_batch_size

FAST = dict(warmup=1, repeats=3)


def _mlp():
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).eval()
    return model, lambda b: (torch.randn(b, 16),)


def _failing_above(limit: int, exc: Exception):
    model, make_inputs = _mlp()
    def run(x):
        if x.shape[0] > limit:
            raise exc
        return model(x)
    return run, make_inputs


def test_explicit_sizes_one_ok_point_each_and_best_is_max_throughput():
    model, make_inputs = _mlp()
    seen = []
    curve = find_batch_size(model, make_inputs, batch_sizes=[8, 1, 4], progress=seen.append, **FAST)
    assert [p.batch_size for p in curve.points] == [1, 4, 8]
    assert all(p.status == "ok" and p.median_s > 0 for p in curve.points)
    assert all(p.p20_s <= p.median_s <= p.p80_s for p in curve.points)
    assert curve.best.throughput == max(p.throughput for p in curve.points)
    assert len(seen) == 3 and all(isinstance(p, BatchPoint) for p in seen)


@pytest.mark.parametrize("exc", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"),
                                 RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"),
                                 MemoryError()])
def test_doubling_stops_at_oom_without_raising(exc):
    run, make_inputs = _failing_above(8, exc)
    curve = find_batch_size(run, make_inputs, max_batch=1024, **FAST)
    sizes = [p.batch_size for p in curve.points]
    assert [p.status for p in curve.points if p.batch_size <= 8] == ["ok"] * 4
    assert all(p.status == "oom" for p in curve.points if p.batch_size > 8)
    assert 16 in sizes and max(sizes) == 16  # nothing beyond the first OOM
    assert any(b in sizes for b in (9, 10, 12))  # refinement looked between 8 and 16
    assert curve.best is not None and curve.best.batch_size <= 8


def test_non_oom_error_after_first_size_is_recorded_and_stops_growth():
    run, make_inputs = _failing_above(4, ValueError("shape mismatch"))
    curve = find_batch_size(run, make_inputs, max_batch=64, **FAST)
    assert [p.status for p in curve.points] == ["ok", "ok", "ok", "error"]
    assert "ValueError: shape mismatch" in curve.points[-1].reason
    assert curve.best.batch_size <= 4


def test_first_size_failing_raises_naming_the_batch_size():
    run, make_inputs = _failing_above(0, ValueError("broken model"))
    with pytest.raises(RuntimeError, match=r"batch size 2.*ValueError: broken model"):
        find_batch_size(run, make_inputs, batch_sizes=[2, 4], **FAST)


def test_latency_budget_marks_over_latency_and_picks_within_budget(clock):
    def run(x):
        clock.spend(2.5e-3 + x.shape[0] * 1e-3)    # sizes up to 7 fit in 10 ms
        return x
    curve = find_batch_size(run, lambda b: (torch.zeros(b),), budget_ms=10, max_batch=64,
                            clock=clock, **FAST)
    # doubling stops at the first bad size (8), then the refinement tries 6 and 7 (both fit)
    assert [(p.batch_size, p.status) for p in curve.points] == [
        (1, "ok"), (2, "ok"), (4, "ok"), (6, "ok"), (7, "ok"), (8, "over_latency")]
    assert curve.best.batch_size == 7 and curve.best.median_s == pytest.approx(9.5e-3)
    assert curve.points[-1].median_s == pytest.approx(10.5e-3) and "> 10" in curve.points[-1].reason


def test_memory_budget_without_clear_refs_is_refused_up_front(monkeypatch):
    import fxforge.autotune.batch as batch
    monkeypatch.setattr(batch, "_reset_peak_rss", lambda: False)
    model, make_inputs = _mlp()
    with pytest.raises(ValueError, match="memory budget .* cannot be enforced"):
        batch.find_batch_size(model, make_inputs, budget_mb=100)
    curve = batch.find_batch_size(model, make_inputs, batch_sizes=[2], **FAST)  # no budget: runs
    assert curve.points[0].status == "ok" and curve.points[0].peak_bytes is None


def test_memory_budget_on_cpu_marks_over_memory():
    def run(x):
        temporary = torch.ones(x.shape[0], 1 << 20, dtype=torch.float64)  # batch * 8 MB, touched
        return temporary.sum()
    curve = find_batch_size(run, lambda b: (torch.zeros(b),), budget_mb=100, max_batch=256, **FAST)
    over = [p for p in curve.points if p.status == "over_memory"]
    assert over and min(p.batch_size for p in over) >= 8
    assert max(p.batch_size for p in curve.points) <= 32
    assert over[0].peak_bytes > 100 << 20
    ok = [p for p in curve.points if p.status == "ok"]
    assert all(p.peak_bytes <= 100 << 20 for p in ok)
    assert max(p.batch_size for p in ok) >= 8 and curve.best in ok


def test_json_round_trip_and_table():
    model, make_inputs = _mlp()
    curve = find_batch_size(model, make_inputs, batch_sizes=[1, 2], budget_ms=1e6, **FAST)
    curve.points.append(BatchPoint(4, "oom", reason="OutOfMemoryError: boom"))
    again = BatchCurve.from_json(json.loads(json.dumps(curve.to_json())))
    assert again == curve and again.best.batch_size == curve.best.batch_size
    table = curve.table()
    for size in ("1", "2", "4"):
        assert any(line.split()[0].rstrip("*") == size for line in table.splitlines()[2:])
    assert "oom" in table and "*" in table
