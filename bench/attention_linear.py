"""``attention="linear:..."`` on SmolLM2-135M: how much accuracy each linear attention keeps, and
how its prefill time grows with length.

    python bench/attention_linear.py [--tokens 2048] [--specs linear:elu,...] [--parts accuracy,op]
    python bench/attention_linear.py --quick     # 512 tokens, short lengths

1. **Accuracy on real text** (``pydoc_data.topics``: ``--tokens`` positions in one sequence,
   compiled by fxforge on the CPU): perplexity over every position and over those past 2 W (W:
   the hybrid's window; where linear attention carries the older keys), and next-token top-1
   agreement with dense, for dense, each ``--specs`` entry and, for each window a hybrid uses,
   that window alone (``sliding_window:W,sinks:0``: the hybrid without its linear part). Fitted
   maps are fitted on the *next* ``--tokens`` of the text (the compile's example input), never
   on the text they are scored on; the compile time (the fit's, mostly) is reported.
2. **The attention op alone** at SmolLM2's heads (9 query heads, 3 kv heads, head dim 64, batch
   1, fp32) from 256 to 8192 positions: fxforge's dense causal CPU attention against the linear
   kernels (elu; elu with a window of 64; a fitted-shape map), interleaved rounds, medians, and
   each one's log-log slope of time vs length (linear attention should be ~1, dense ~2). On a
   shared host these times are indicative only: rerun ``--parts op`` on a quiet one.

Writes ``--out``/attention_linear.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from attention_window import long_text, nll_and_top1, op_medians, slope   # bench/ is on sys.path as a script
from fxforge.kernels.attention_cpu import cpu_attention
from fxforge.kernels.linear_attention_cpu import cpu_linear_attention

SPECS = "linear:elu,linear:elu,window:64,linear:fitted,linear:fitted,window:64"


def split_specs(text: str) -> list[str]:
    """``"linear:elu,linear:fitted,window:64"`` -> one option per ``mode:`` field (an option's
    own fields follow it)."""
    specs: list[str] = []
    for field in text.split(","):
        if field.split(":")[0].strip() in ("linear", "sliding_window") or not specs:
            specs.append(field)
        else:
            specs[-1] += "," + field
    return specs


def accuracy(model, ids: torch.Tensor, calibration: torch.Tensor, specs: list[str]) -> list[dict]:
    from fxforge.passes.attention_modes import parse_attention
    dense_nll, dense_top = nll_and_top1(model, ids, {})
    rows = [_row("dense", 0, dense_nll, dense_top, dense_nll, dense_top, 0.0)]
    print(_line(rows[-1]), flush=True)
    windows = sorted({getattr(parse_attention(s), "window", 0) for s in specs} - {0})
    for spec in specs + [f"sliding_window:{w},sinks:0" for w in windows]:
        window = getattr(parse_attention(spec), "window", 0)
        start = time.perf_counter()
        nll, top = nll_and_top1(model, ids, {"attention": spec}, calibration)
        rows.append(_row(spec, window, nll, top, dense_nll, dense_top, time.perf_counter() - start))
        print(_line(rows[-1]), flush=True)
    return rows


def _row(label, window, nll, top, dense_nll, dense_top, seconds) -> dict:
    far = slice(2 * window, None)
    return {"attention": label, "window": window, "ppl": float(nll.mean().exp()),
            "ppl_past_2w": float(nll[far].mean().exp()),
            "dense_ppl_past_2w": float(dense_nll[far].mean().exp()),
            "top1_vs_dense": float((top == dense_top).float().mean()),
            "compile_and_run_s": seconds}


def _line(row: dict) -> str:
    return (f"{row['attention']:<34} ppl {row['ppl']:9.3f}  past 2W {row['ppl_past_2w']:9.3f} "
            f"(dense {row['dense_ppl_past_2w']:7.3f})  top-1 vs dense {row['top1_vs_dense']:.2%}  "
            f"compile+run {row['compile_and_run_s']:.0f} s")


def op_times(lengths: list[int], rounds: int) -> list[dict]:
    """Dense causal attention against the linear kernels at SmolLM2's heads."""
    gen, rows = torch.Generator().manual_seed(0), []
    q_map, k_map = torch.randn(9, 64, 64, generator=gen) * 0.1, torch.randn(3, 64, 64, generator=gen) * 0.1
    for length in lengths:
        q = torch.randn(1, 9, length, 64, generator=gen)
        k, v = (torch.randn(1, 3, length, 64, generator=gen) for _ in range(2))
        runs = {"dense_ms": lambda: cpu_attention(q, k, v, is_causal=True, enable_gqa=True),
                "elu_ms": lambda: cpu_linear_attention(q, k, v, "elu", 0),
                "elu_window64_ms": lambda: cpu_linear_attention(q, k, v, "elu", 64),
                "fitted_ms": lambda: cpu_linear_attention(q, k, v, "fitted", 0, None, q_map, k_map)}
        rows.append({"length": length, **op_medians(runs, rounds)})
        print(f"attention op, {length:5d} positions: " + "  ".join(
            f"{n[:-3]} {rows[-1][n]:9.2f} ms" for n in runs), flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--specs", default=SPECS)
    p.add_argument("--lengths", default="256,512,1024,2048,4096,8192")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=".bench/attention_linear")
    p.add_argument("--parts", default="accuracy,op", help="which of the two to run")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.lengths, args.rounds = 512, "256,512,1024", 2
    from fxforge.examples.smollm2 import load_smollm2, smollm2_status
    from fxforge.kernels.cpu_isa import cpu_features
    available, reason = smollm2_status()
    if not available:
        print(f"SmolLM2 unavailable: {reason}", file=sys.stderr)
        return 1
    print(f"SmolLM2-135M-Instruct; {cpu_features().describe()}; {torch.get_num_threads()} threads",
          flush=True)
    results: dict = {"cpu": cpu_features().describe(), "threads": torch.get_num_threads(),
                     "tokens": args.tokens}
    parts = set(args.parts.split(","))
    if "accuracy" in parts:
        model, tokenizer = load_smollm2(progress=False)
        text = long_text(tokenizer, 2 * args.tokens)
        results["accuracy"] = accuracy(model.eval(), text[:, :args.tokens], text[:, args.tokens:],
                                       split_specs(args.specs))
    if "op" in parts:
        results["op"] = op_times([int(n) for n in args.lengths.split(",")], args.rounds)
        keys = [k for k in results["op"][0] if k.endswith("_ms")]
        results["op_slope"] = {k: slope(results["op"], k) for k in keys}
        print("slope of time vs length (log-log): " + ", ".join(
            f"{k[:-3]} {v:.2f}" for k, v in results["op_slope"].items()), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "attention_linear.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {out / 'attention_linear.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
