"""PNG plots: a batch curve with ok/over-budget/oom points, and configs of three kernels."""
from __future__ import annotations

import pytest

pytest.importorskip("matplotlib")

from fxforge.autotune.batch import BatchCurve, BatchPoint
from fxforge.autotune.plots import SEARCH_STEP_LABEL, _plot_kernel, plot_batch_curve, plot_configs
from fxforge.autotune.search import search

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path) -> bool:
    data = path.read_bytes()
    return len(data) > 1000 and data.startswith(PNG_MAGIC)


def _point(b: int, status: str = "ok", ms: float = 1.0) -> BatchPoint:
    s = ms * 1e-3
    return BatchPoint(b, status, s, 0.9 * s, 1.1 * s, b / s, b << 20)


def test_plot_batch_curve_writes_png(tmp_path):
    points = [_point(1, ms=1.0), _point(2, ms=1.5), _point(4, ms=2.5), _point(8, "over_latency", ms=12.0),
              BatchPoint(16, "oom", reason="OutOfMemoryError: CUDA out of memory")]
    curve = BatchCurve(points, points[2], budget_ms=10.0, budget_mb=None, device="cpu")
    out = plot_batch_curve(curve, tmp_path / "nested" / "batch.png")
    assert out == tmp_path / "nested" / "batch.png" and _is_png(out)


def test_plot_batch_curve_without_any_ok_point(tmp_path):
    curve = BatchCurve([BatchPoint(1, "oom", reason="boom")], None, None, 100.0, "cuda:0")
    assert _is_png(plot_batch_curve(curve, tmp_path / "oom.png"))


def _record(config: str, status: str = "ok", ms=None, reason: str = "") -> dict:
    s = None if ms is None else ms * 1e-3
    return {"config": config, "status": status, "median_s": s, "p20_s": None if s is None else 0.95 * s,
            "p80_s": None if s is None else 1.1 * s, "reason": reason}


def _result(kernel: str, n_ok: int, failures: list[str]) -> dict:
    records = [_record(f"BLOCK_M={16 << i}, warps=4, stages=2", ms=1.0 + (i * 7) % 5) for i in range(n_ok)]
    records += [_record(f"BLOCK_M={4096 << i}, warps=8, stages=3", status, reason=f"{status} here")
                for i, status in enumerate(failures)]
    return {"kernel": kernel, "label": f"{kernel} M=128 K=576 N=1728", "best": records[0]["config"] if n_ok
            else None, "default": records[min(1, len(records) - 1)]["config"], "records": records}


def test_plot_configs_writes_png_for_three_kernels(tmp_path):
    results = [_result("linear_cpu", 6, ["pruned", "pruned", "wrong"]),
               _result("matmul", 30, ["build_failed", "oom", "error"]),
               _result("attention", 0, ["pruned", "error"])]
    out = plot_configs(results, tmp_path / "plots" / "configs.png")
    assert out == tmp_path / "plots" / "configs.png" and _is_png(out)


def test_plot_configs_caps_the_number_of_subplots(tmp_path):
    results = [_result(f"k{i}", 3, []) for i in range(15)]
    assert _is_png(plot_configs(results, tmp_path / "many.png"))


def test_the_plot_shows_the_times_the_choice_was_made_on(clock, fixed_times):
    """The chosen star and the default's diamond sit at the times the choice and the reported
    gain come from, even when a neighbour's job makes every duration 3x longer mid-search."""
    import matplotlib.pyplot as plt
    clock.load = lambda now: 1.0 if now < 0.04 else 3.0     # the search's step takes ~35 ms
    result = search(fixed_times({0: 1.0, 1: 0.5, 2: 0.8}), rounds=3, clock=clock).to_json()
    assert result["best"] == "way 1"
    assert result["default_s"] / result["best_s"] == pytest.approx(2.0)
    fig, ax = plt.subplots()
    try:
        _plot_kernel(ax, result)
        marks = {line.get_label(): line.get_xdata()[0] for line in ax.get_lines()
                 if line.get_label() in ("chosen", "default")}
        timed = {c.get_label(): sorted(c.lines[0].get_xdata()) for c in ax.containers}
        searched = [sorted(line.get_xdata()) for line in ax.get_lines()
                    if line.get_label() == SEARCH_STEP_LABEL]
    finally:
        plt.close(fig)
    assert marks == {"chosen": pytest.approx(result["best_s"] * 1e3),
                     "default": pytest.approx(result["default_s"] * 1e3)}
    assert timed == {"re-timed together": pytest.approx(sorted(
        r["median_s"] * 1e3 for r in result["records"] if r["confirmed"]))}
    assert "chosen among 3 re-timed together" in ax.get_title()
    # beside each finalist, its time in the search step (before the load changed: 3x less)
    search_ms = sorted(r["search_median_s"] * 1e3 for r in result["records"] if r["confirmed"])
    assert searched == [pytest.approx(search_ms)] and search_ms == pytest.approx(
        [t / 3 for t in timed["re-timed together"]])
