"""``quantize="auto"``'s report as files: the per-layer plan (``ir.info["quantize_auto"]``,
written by ``passes/quantize_auto.py``) as CSV, and a speed/accuracy frontier (one point per
scheme or budget) as CSV and PNG. ``bench/quant_auto.py`` measures SmolLM2's points."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

LAYER_COLUMNS = ("layer", "K", "N", "format", "bytes", "delta", "us_per_token", "dense_us_per_token")
FRONTIER_COLUMNS = ("scheme", "budget", "linear_MB", "us_per_token", "decode_tok_s",
                    "perplexity", "kl_vs_fp32", "on_frontier")
PathLike = Union[str, Path]


def layer_rows(info: Mapping[str, Any]) -> list[dict]:
    """One row per layer of a plan, in graph order."""
    return [{"layer": name, "K": layer["K"], "N": layer["N"], "format": layer["format"],
             "bytes": layer["bytes"], "delta": layer["delta"], "us_per_token": layer["us"],
             "dense_us_per_token": layer["dense_us"]} for name, layer in info["layers"].items()]


def write_layers_csv(info: Mapping[str, Any], path: PathLike) -> Path:
    return _write_csv(path, LAYER_COLUMNS, layer_rows(info))


def on_frontier(points: Sequence[Mapping[str, float]], speed: str = "decode_tok_s",
                error: str = "kl_vs_fp32") -> list[bool]:
    """Per point: no other point is at least as fast and at least as accurate, and strictly
    better in one of the two (the Pareto frontier of higher ``speed``, lower ``error``)."""
    def dominated(p: Mapping[str, float]) -> bool:
        return any(q[speed] >= p[speed] and q[error] <= p[error]
                   and (q[speed] > p[speed] or q[error] < p[error]) for q in points)
    return [not dominated(p) for p in points]


def write_frontier_csv(points: Sequence[Mapping[str, Any]], path: PathLike) -> Path:
    """The points with their ``on_frontier`` flag (:func:`on_frontier`)."""
    flags = on_frontier(points)
    return _write_csv(path, FRONTIER_COLUMNS, [{**p, "on_frontier": int(f)}
                                               for p, f in zip(points, flags)])


def read_csv(path: PathLike) -> list[dict]:
    """Rows as dicts, numbers as floats (the inverse of the writers)."""
    with open(path, newline="") as f:
        return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(f)]


def plot_frontier(points: Sequence[Mapping[str, Any]], path: PathLike,
                  title: str = "speed / accuracy") -> Path:
    """Decode tokens/s against KL vs fp32 (log x), each point labelled; the frontier joined."""
    from fxforge.autotune.plots import _pyplot, _save
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    flags = on_frontier(points)
    best = sorted((p for p, f in zip(points, flags) if f), key=lambda p: p["kl_vs_fp32"])
    ax.plot([max(p["kl_vs_fp32"], 1e-6) for p in best], [p["decode_tok_s"] for p in best], "-",
            color="tab:gray", alpha=0.5, label="frontier")
    for p, flag in zip(points, flags):
        auto = str(p["scheme"]).startswith("auto")
        ax.plot(max(p["kl_vs_fp32"], 1e-6), p["decode_tok_s"], "*" if auto else "o",
                color="tab:red" if auto else "tab:blue", markersize=12 if auto else 7,
                mfc=None if flag else "none")
        ax.annotate(str(p["scheme"]), (max(p["kl_vs_fp32"], 1e-6), p["decode_tok_s"]),
                    textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("mean next-token KL vs fp32 (nats, log)")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def explain_header(auto) -> tuple:
    return (f"Δ {auto['metric']}", "us/token") if auto else ()


def explain_cells(auto, name: str) -> tuple:
    """quantize="auto"'s measured change and per-token time of a linear (``-``: not a candidate)."""
    if not auto:
        return ()
    layer = auto["layers"].get(name)
    return (f"{layer['delta']:.3g}", round(layer["us"], 1)) if layer else ("-", "-")


def explain_summary(auto) -> list[str]:
    if not auto:
        return []
    grouped = "per block" if auto["units"] < len(auto["layers"]) else "per linear"
    return [f"quantize auto: {auto['metric']} budget {auto['budget']:g}, measured "
            f"{auto['measured']:.4g}, 90% upper bound {auto['upper']:.4g} (sum of the {grouped} changes: "
            f"{auto['predicted']:.4g}) after {auto['rounds']} round{'s' * (auto['rounds'] != 1)}; "
            "us/token measured at M=1 here"]


def _write_csv(path: PathLike, columns: Sequence[str], rows: Sequence[Mapping]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def _number(text: str) -> Any:
    try:
        return float(text)
    except ValueError:
        return text
