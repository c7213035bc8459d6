"""PNG plots of tuning results: a batch-size curve, and the measured configurations per kernel.

matplotlib is optional (the ``tune`` extra); it is imported inside the functions, with the
non-interactive Agg backend so that plots work on machines without a display.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

if TYPE_CHECKING:
    from fxforge.autotune.batch import BatchCurve

MAX_SUBPLOTS = 12
MAX_TICK_LABELS = 20  # more candidates than this: the config descriptions are left off the axis
SEARCH_STEP_LABEL = "finalist in its search step"


def require_matplotlib():
    """The matplotlib module, or an ImportError that says what to install (the CLI calls this
    before a tuning run, so that a missing package does not surface only at its end)."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError("plotting needs matplotlib: pip install 'fxforge[tune]' "
                          "(or pip install matplotlib)") from exc
    return matplotlib


def _pyplot():
    require_matplotlib().use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Union[str, Path]) -> Path:
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(path, format="png", dpi=100, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def plot_batch_curve(curve: "BatchCurve", path: Union[str, Path]) -> Path:
    """Throughput (items/s) and median latency (ms) against the batch size, log2 x axis.

    Points that failed (oom, error, over a budget) are red crosses: on the throughput curve
    where they were timed, at the foot of the axis where they were not."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    timed = [p for p in curve.points if p.throughput is not None]
    ok = [p for p in timed if p.status == "ok"]
    ax.plot([p.batch_size for p in timed], [p.throughput for p in timed], "-", color="tab:blue", alpha=0.4)
    ax.plot([p.batch_size for p in ok], [p.throughput for p in ok], "o", color="tab:blue", label="throughput")
    failed_timed = [p for p in timed if p.status != "ok"]
    if failed_timed:
        ax.plot([p.batch_size for p in failed_timed], [p.throughput for p in failed_timed], "x", color="red",
                markersize=9, mew=2, label="over budget")
    untimed = [p for p in curve.points if p.throughput is None]
    for i, p in enumerate(untimed):
        ax.plot(p.batch_size, 0.03, "x", color="red", markersize=9, mew=2, transform=ax.get_xaxis_transform(),
                label="failed (oom / error)" if i == 0 else None)
        ax.annotate(p.status, (p.batch_size, 0.03), xycoords=ax.get_xaxis_transform(), color="red",
                    textcoords="offset points", xytext=(4, 6), fontsize=8)
    if curve.best is not None and curve.best.throughput is not None:
        ax.plot(curve.best.batch_size, curve.best.throughput, "*", color="gold", markersize=16, mec="black",
                label=f"best: batch {curve.best.batch_size}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("throughput (items/s)", color="tab:blue")
    ax.set_ylim(0, 1.15 * max([p.throughput for p in timed], default=1.0))
    latency = ax.twinx()
    latency.plot([p.batch_size for p in timed], [p.median_s * 1e3 for p in timed], "s--", color="tab:orange",
                 markersize=4, label="median latency")
    if curve.budget_ms is not None:
        latency.axhline(curve.budget_ms, color="tab:orange", linestyle=":", label=f"budget {curve.budget_ms} ms")
    latency.set_ylabel("median latency (ms)", color="tab:orange")
    latency.set_ylim(bottom=0)
    handles = ax.get_legend_handles_labels()[0] + latency.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="center left", fontsize=8, framealpha=0.8)
    budget_mb = f", memory budget {curve.budget_mb} MB" if curve.budget_mb is not None else ""
    ax.set_title(f"batch-size search on {curve.device}{budget_mb}")
    return _save(fig, path)


def _failure_counts(records: list[dict]) -> str:
    counts: dict[str, int] = {}
    for r in records:
        if r.get("status") != "ok" or r.get("median_s") is None:
            counts[r.get("status", "?")] = counts.get(r.get("status", "?"), 0) + 1
    return ", ".join(f"{status} {n}" for status, n in sorted(counts.items()))


def _plot_kernel(ax, result: dict[str, Any]) -> None:
    """One kernel: measured candidates sorted by median time with p20-p80 bars, best and default
    marked. The finalists' times come from the one measurement the choice was made on (blue);
    the other candidates' from the search step that ruled them out (grey: another moment). A
    hollow circle shows a finalist's time in its last search step: near its blue point when the
    search and the confirmation agree; all shifted alike when the machine's load changed."""
    records = result.get("records", [])
    measured = sorted((r for r in records if r.get("status") == "ok" and r.get("median_s") is not None),
                      key=lambda r: r["median_s"])
    others = _failure_counts(records)
    finalists = sum(bool(r.get("confirmed")) for r in measured)
    ax.set_title(f"{result.get('label') or result.get('kernel', '?')}\n{len(measured)} measured"
                 + (f", chosen among {finalists} re-timed together" if finalists else "")
                 + (f"; {others}" if others else ""), fontsize=8)
    if not measured:
        ax.text(0.5, 0.5, "no successful measurement", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
        return
    ms = [r["median_s"] * 1e3 for r in measured]
    for confirmed, style in ((True, dict(color="tab:blue", label="re-timed together")),
                             (False, dict(color="tab:gray", label="search step only"))):
        rows = [i for i, r in enumerate(measured) if bool(r.get("confirmed")) == confirmed]
        if rows:
            ax.errorbar([ms[i] for i in rows], rows, xerr=_spread([measured[i] for i in rows]),
                        fmt="o", markersize=3, elinewidth=1, capsize=2, **style)
    searched = [(r["search_median_s"] * 1e3, i) for i, r in enumerate(measured)
                if r.get("confirmed") and r.get("search_median_s") is not None]
    if searched:
        ax.plot(*zip(*searched), linestyle="none", marker="o", markersize=6, mfc="none",
                color="tab:blue", alpha=0.6, label=SEARCH_STEP_LABEL)
    for key, style in (("default", dict(marker="D", color="tab:orange", label="default")),
                       ("best", dict(marker="*", color="tab:green", label="chosen", markersize=12))):
        hits = [i for i, r in enumerate(measured) if r["config"] == result.get(key)]
        if hits:
            ax.plot([ms[i] for i in hits], hits, linestyle="none", **{"markersize": 7, **style})
    ax.set_yticks(list(range(len(measured))) if len(measured) <= MAX_TICK_LABELS else [])
    if len(measured) <= MAX_TICK_LABELS:
        ax.set_yticklabels([r["config"] for r in measured], fontsize=6)
    ax.invert_yaxis()  # fastest on top
    ax.set_xlabel("median time (ms)", fontsize=8)
    ax.legend(fontsize=6, loc="lower right")


def _spread(records: list[dict]) -> list[list[float]]:
    """Error-bar lengths (ms) from each record's median down to p20 and up to p80."""
    def ms(r: dict, key: str) -> float:
        return (r.get(key) if r.get(key) is not None else r["median_s"]) * 1e3
    return [[max(0.0, ms(r, "median_s") - ms(r, "p20_s")) for r in records],
            [max(0.0, ms(r, "p80_s") - ms(r, "median_s")) for r in records]]


def plot_configs(results: list[dict], path: Union[str, Path], title: Optional[str] = None) -> Path:
    """The measured configurations: one subplot per tuned kernel (at most ``MAX_SUBPLOTS``)."""
    plt = _pyplot()
    shown = results[:MAX_SUBPLOTS]
    ncols = min(3, max(1, len(shown)))
    nrows = max(1, math.ceil(len(shown) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(6 * ncols, 4 * nrows), squeeze=False)
    for ax, result in zip(axes.flat, shown):
        _plot_kernel(ax, result)
    for ax in list(axes.flat)[len(shown):]:
        ax.set_axis_off()
    if not shown:
        axes[0][0].text(0.5, 0.5, "no tuning results", ha="center", va="center")
    header = title or "measured configurations"
    if len(results) > len(shown):
        header += f" (first {len(shown)} of {len(results)} kernels)"
    fig.suptitle(header)
    fig.tight_layout()
    return _save(fig, path)
