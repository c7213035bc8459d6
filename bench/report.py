"""The tables ``bench/run.py`` prints from ``harness.Result`` rows: median ms and speedups per
(model, workload), kernels launched per forward, and the cases that failed or differ from eager."""
from __future__ import annotations

from harness import COMPILERS, FXFORGE_OPTIONS, Result


def _fmt_ms(r: Result | None) -> str:
    if r is None:
        return "-"
    if r.status != "ok":
        return r.status.upper()
    return f"{r.median_ms:.3f}" + ("!" if r.matches is False else "")


def _speedup(baseline: Result | None, other: Result | None) -> str:
    """``baseline_ms / other_ms``: above 1 means ``other`` is faster."""
    if baseline is None or other is None or baseline.status != "ok" or other.status != "ok" or not other.median_ms:
        return "-"
    return f"{baseline.median_ms / other.median_ms:.2f}x"


def format_table(results: list[Result], compilers: list[str]) -> str:
    """One row per (model, workload): median ms per compiler and speedups.

    Speedup columns are ``baseline_ms / compiler_ms`` (above 1 means faster).
    """
    index = {(r.model, r.workload, r.compiler): r for r in results}
    rows = list(dict.fromkeys((r.model, r.workload) for r in results))  # keep run order
    header = ["model", "workload"] + [f"{c} ms" for c in compilers]
    ratio_cols = [(c, "eager") for c in compilers if c != "eager"]
    if "inductor" in compilers:
        ratio_cols += [(c, "inductor") for c in compilers if c in FXFORGE_OPTIONS]
    header += [f"{c} vs {b}" for c, b in ratio_cols]
    lines = [header]
    for model, wl in rows:
        row = [model, wl] + [_fmt_ms(index.get((model, wl, c))) for c in compilers]
        row += [_speedup(index.get((model, wl, b)), index.get((model, wl, c))) for c, b in ratio_cols]
        lines.append(row)
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    out = ["  ".join(str(v).rjust(w) if i > 1 else str(v).ljust(w) for i, (v, w) in enumerate(zip(line, widths)))
           for line in lines]
    out.insert(1, "-" * len(out[0]))
    return "\n".join(out)


def format_kernels(results: list[Result]) -> str:
    """Kernels launched per forward, eager vs each fxforge variant."""
    index = {(r.model, r.workload, r.compiler): r.kernels for r in results if r.kernels is not None}
    rows = list(dict.fromkeys((r.model, r.workload) for r in results))
    lines = []
    for model, wl in rows:
        counts = [f"{c} {index[(model, wl, c)]}" for c in COMPILERS if (model, wl, c) in index]
        if counts:
            lines.append(f"  {model}/{wl}: " + ", ".join(counts))
    return "kernels per forward:\n" + "\n".join(lines) if lines else ""


def format_errors(results: list[Result]) -> str:
    """Failed cases, and (marked ``!`` in the table) outputs that differ from eager."""
    lines = []
    for r in results:
        where = f"  {r.model}/{r.workload}/{r.compiler}"
        if r.status != "ok":
            lines.append(f"{where}: {r.error.splitlines()[0][:300] if r.error else r.status}")
        elif r.matches is False:
            lines.append(f"{where}: output differs from eager (max abs diff {r.max_abs_diff:.3e})")
    return "\n".join(lines)
