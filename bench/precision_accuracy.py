"""The accuracy cost of fxforge's ``precision="bf16"`` / ``"fp16"`` on the real SmolLM2-135M.

    python bench/precision_accuracy.py                          # 2 windows of 64 tokens (~3 min here)
    python bench/precision_accuracy.py --windows 8 --window-len 256 --precisions fp32,bf16

Perplexity over N non-overlapping windows of L tokens of real English text (CPython's
``pydoc_data.topics``), for eager fp32 and fxforge at each precision, plus per variant: the
largest |logit - eager logit| relative to the largest |eager logit|, and how often the
next-token prediction (top-1) agrees with eager's.

Low precision on this CPU: the cpu backend runs bf16 math only where the CPU has AMX, and
otherwise bf16-stored weights with fp32 math (``fxforge.orchestrate.effective_options``). To
measure bf16 math's accuracy anyway, this script sets ``FXFORGE_CPU_ISA=amx`` before fxforge
compiles, so the precision pass really runs (on a CPU without bf16 units ATen's bf16 matmul is
very slow: the bf16 rows' seconds say nothing about speed). The cpu backend has no fp16 matmul path on
any ISA, so fp16 runs on the ``reference`` backend (the pass's IR op by op on ATen).

``bf16_weights`` is what ``precision="bf16"`` runs on a CPU without bf16 units (compiled with
``FXFORGE_CPU_ISA=avx2``, as this CPU really is): weights rounded to bf16, math in fp32.

Exit code 1 if a low-precision variant did not run its pass (every compiled graph's
``ir.info["precision"]`` must be the requested one) or fxforge fp32 is not within 1e-3
(relative to the largest eager logit) of eager.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ISA_OVERRIDE = "amx"
# Before fxforge is imported or compiles anything: dispatch as if this CPU had AMX-BF16 (the
# one ISA where precision="bf16" runs bf16 math; backends/cpu.py says why).
os.environ["FXFORGE_CPU_ISA"] = ISA_OVERRIDE

import torch  # noqa: E402

import fxforge  # noqa: E402
from fxforge.compiler import recording  # noqa: E402
from fxforge.examples.hf_models import LogitsOnly  # noqa: E402
from fxforge.examples.smollm2 import load_smollm2, smollm2_status  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling accuracy.py
from accuracy import run_windows, score, token_windows  # noqa: E402

FP32_MAX_REL_DIFF = 1e-3
# precision -> extra fxforge options (see the module docstring for why fp16 is on "reference")
PRECISION_OPTIONS = {"fp32": {}, "bf16": {"precision": "bf16"},
                     "bf16_weights": {"precision": "bf16"},
                     "fp16": {"precision": "fp16", "backend": "reference"}}
# bf16_weights is what precision="bf16" runs on a CPU without bf16 units (this one, dispatched as
# it is): weights rounded to bf16 and stored so for the C++ GEMM/GEMV, math in fp32.
VARIANT_ISA = {"bf16_weights": "avx2"}


class PrecisionNotApplied(RuntimeError):
    """fxforge compiled a low-precision variant in another precision (its pass did not run)."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Small defaults: bf16 costs ~0.5 s a token here (no bf16 units) and each compile ~25 s;
    # 4 windows x 128 tokens take ~7 minutes.
    p.add_argument("--windows", type=int, default=2, help="number of windows (default 2)")
    p.add_argument("--window-len", type=int, default=64, help="tokens per window (default 64)")
    p.add_argument("--precisions", default="fp32,bf16,bf16_weights,fp16",
                   help="comma-separated fxforge precisions out of fp32,bf16,bf16_weights,fp16")
    p.add_argument("--json", default=".bench/precision_accuracy.json", help="where to write the results")
    args = p.parse_args(argv)
    args.precisions = [s.strip() for s in args.precisions.split(",") if s.strip()]
    unknown = [s for s in args.precisions if s not in PRECISION_OPTIONS]
    if unknown or args.windows < 1 or args.window_len < 2:
        p.error(f"bad arguments: precisions {unknown or 'ok'}, windows {args.windows}, "
                f"window-len {args.window_len}")
    return args


def run_fxforge(model, windows, precision: str) -> tuple:
    """(logits, first-call seconds, notes) for fxforge at ``precision``; checks the pass ran.

    Compiles on the first window (so no forward is spent on an example input alone)."""
    torch._dynamo.reset()
    options = PRECISION_OPTIONS[precision]
    os.environ["FXFORGE_CPU_ISA"] = VARIANT_ISA.get(precision, ISA_OVERRIDE)
    try:
        with recording() as graphs:
            logits, first_s = run_windows(fxforge.compile(LogitsOnly(model), **options), windows)
    finally:
        os.environ["FXFORGE_CPU_ISA"] = ISA_OVERRIDE
    ran = [g.ir.info.get("precision") for g in graphs]
    if not ran or any(p != precision for p in ran):
        raise PrecisionNotApplied(f"fxforge precision={precision!r} compiled {len(ran)} graph(s) with "
                                  f"precision {ran}: the {precision} pass did not run "
                                  f"(FXFORGE_CPU_ISA={os.environ.get('FXFORGE_CPU_ISA')!r})")
    return logits, first_s, f"{len(graphs)} graph(s), backend {options.get('backend', 'auto')}"


def measure(model, windows, precisions) -> list[dict]:
    """One row per variant: eager fp32 first (the reference), then fxforge at each precision."""
    rows = []
    with torch.inference_mode():
        start = time.perf_counter()
        eager, first_s = run_windows(LogitsOnly(model), windows)
        rows.append({"variant": "eager fp32", "seconds": time.perf_counter() - start,
                     "first_call_s": first_s, "notes": "", **score(eager, windows, eager)})
        for precision in precisions:
            start = time.perf_counter()
            logits, first_s, notes = run_fxforge(model, windows, precision)
            rows.append({"variant": f"fxforge {precision}", "seconds": time.perf_counter() - start,
                         "first_call_s": first_s, "notes": notes, **score(logits, windows, eager)})
            print(f"  {rows[-1]['variant']}: done in {rows[-1]['seconds']:.1f} s", flush=True)
    base = rows[0]["perplexity"]
    for row in rows:
        row["perplexity_delta"] = row["perplexity"] - base
    return rows


def print_table(rows: list[dict]) -> None:
    header = (f"{'variant':<20} {'perplexity':>10} {'delta':>9} {'max rel logit diff':>18} "
              f"{'top-1 agree':>11} {'seconds':>8} {'1st call':>8}  notes")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['variant']:<20} {r['perplexity']:>10.3f} {r['perplexity_delta']:>+9.4f} "
              f"{r['max_rel_logit_diff']:>18.2e} {r['top1_agreement']:>10.2%} "
              f"{r['seconds']:>8.1f} {r['first_call_s']:>8.1f}  {r['notes']}")


def failures(rows: list[dict]) -> list[str]:
    """fxforge fp32 must match eager up to reassociation (the low precisions are only reported)."""
    return [f"{r['variant']}: max rel logit diff {r['max_rel_logit_diff']:.2e} > {FP32_MAX_REL_DIFF:g}"
            for r in rows if r["variant"] == "fxforge fp32" and not r["max_rel_logit_diff"] <= FP32_MAX_REL_DIFF]


def main(argv=None) -> int:
    args = parse_args(argv)
    wall_start = time.perf_counter()

    available, reason = smollm2_status()
    if not available:
        print(f"SmolLM2 unavailable: {reason}", file=sys.stderr)
        return 1
    print(f"FXFORGE_CPU_ISA={ISA_OVERRIDE} set before compiling: fxforge dispatches as if this CPU "
          "had AMX-BF16, so precision=bf16 really runs in bf16 (slowly: no bf16 units here); "
          "bf16_weights is precision=bf16 compiled as this CPU is (FXFORGE_CPU_ISA=avx2); "
          "fp16 runs on the reference backend (the cpu backend has no fp16 path)")
    model, tokenizer = load_smollm2(progress=False)
    print(f"model loaded in {time.perf_counter() - wall_start:.1f} s")
    windows = token_windows(tokenizer, args.windows, args.window_len)
    print(f"SmolLM2-135M-Instruct, {args.windows} windows x {args.window_len} tokens of pydoc_data.topics, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    try:
        rows = measure(model, windows, args.precisions)
    except PrecisionNotApplied as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    print_table(rows)
    problems = failures(rows)
    wall_s = time.perf_counter() - wall_start
    print(f"wall time {wall_s:.1f} s (including model loading)")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": "SmolLM2-135M-Instruct", "text": "pydoc_data.topics",
                               "windows": args.windows, "window_len": args.window_len,
                               "cpu_isa_override": ISA_OVERRIDE, "wall_s": wall_s,
                               "rows": rows, "failures": problems}, indent=2))
    print(f"wrote {out}")
    for problem in problems:
        print(f"FAILED: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
