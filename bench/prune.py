"""Structured pruning (option ``prune``) on SmolLM2-135M: what it removes, what it costs in
perplexity, what it gains in speed.

    python bench/prune.py [--windows 4] [--window-len 512] [--rounds 5] [--new-tokens 32]
    python bench/prune.py --quick      # 2 windows, 3 rounds, no Inductor row

Every variant is compiled by fxforge (``kv_cache=True``, dynamic shapes) on one calibration
window of ``pydoc_data.topics`` that is never scored, then
1. **accuracy**: perplexity on ``--windows`` later windows, Δ against unpruned fxforge, mean
   next-token KL against eager; the magnitude-only baseline at the same sparsity beside Wanda;
2. **speed**, interleaved rounds, medians: batch-1 greedy decode of ``--new-tokens`` tokens
   after a chat prompt (``fxforge.generate``; (time(n) - time(1)) / (n - 1)) and the prefill of a
   ``--prefill``-token prompt, as ratios over unpruned fxforge; Hugging Face eager and its
   Inductor static-cache decode as the references a user compares against;
3. **the per-layer report** (``fxforge/prune_report.py``) of each variant: what went, MB and
   MFLOP per token saved, each block's measured influence, each MLP's compensation.
Writes ``--json`` (default ``.bench/prune.json``).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import fxforge
from fxforge.compiler import recording
from fxforge.examples.hf_models import LogitsOnly
from fxforge.prune_report import markdown, report_rows

from accuracy import next_token_kl, run_windows, score, smollm2_windows   # bench/ on sys.path
from generate import hf_runners
from quant_accuracy import linear_bytes

VARIANTS = {"unpruned": None,
            "mlp 25% wanda": {"mlp": 0.25},
            "mlp 25% wanda, no compensation": {"mlp": 0.25, "compensate": "off"},
            "mlp 25% magnitude": {"mlp": 0.25, "score": "magnitude", "compensate": "off"},
            "heads 1/3": {"heads": 0.34},
            "layers 2": {"layers": 2},
            "layers 4": {"layers": 4},
            "mlp 25% + layers 2": {"mlp": 0.25, "layers": 2}}


def compile_variant(model, prune, calibration):
    """fxforge with the KV cache and ``prune``, compiled (and calibrated) on ``calibration``."""
    options = {"kv_cache": True, "max_seq_len": 1024, **({"prune": prune} if prune else {})}
    start = time.perf_counter()
    with recording() as graphs:
        compiled = fxforge.compile(LogitsOnly(model), (calibration,), dynamic=True, **options)
    return compiled, graphs[0], time.perf_counter() - start


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def speed(runners: dict, prompt, long_prompt, new_tokens: int, rounds: int) -> dict:
    """label -> (decode tok/s, prefill s): interleaved rounds, medians."""
    decode, prefill = {k: [] for k in runners}, {k: [] for k in runners}
    for label, (gen, pre) in runners.items():   # warm-up: compiles, recordings, packing
        gen(2)
        pre()
    for _ in range(rounds):
        for label, (gen, pre) in runners.items():
            one, full = timed(lambda: gen(1)), timed(lambda: gen(new_tokens))
            decode[label].append((new_tokens - 1) / max(full - one, 1e-9))
            prefill[label].append(timed(pre))
    return {k: (statistics.median(decode[k]), statistics.median(prefill[k])) for k in runners}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--window-len", type=int, default=512)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prefill", type=int, default=256)
    p.add_argument("--no-inductor", action="store_true")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="comma-separated names of VARIANTS to run ('unpruned' always runs)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", default=".bench/prune.json")
    args = p.parse_args(argv)
    if args.quick:
        args.windows, args.rounds, args.no_inductor = 2, 3, True
    torch._dynamo.config.cache_size_limit = 64   # one graph per variant, all kept
    loaded = smollm2_windows(args.windows, args.window_len)
    if loaded is None:
        return 1
    model, windows, calibration = loaded
    from fxforge.examples.smollm2 import chat_prompt, load_smollm2
    from fxforge.kernels.cpu_isa import cpu_features
    prompt = chat_prompt(load_smollm2(progress=False)[1])
    long_prompt = windows[0, :args.prefill].unsqueeze(0)
    cpu = f"{cpu_features().describe()}; {torch.get_num_threads()} threads"
    print(f"SmolLM2-135M-Instruct, fp32; {args.windows} x {args.window_len} tokens of "
          f"pydoc_data.topics; {cpu}", flush=True)
    rows, runners, reports = [], {}, {}
    with torch.inference_mode():
        eager_logits, _ = run_windows(LogitsOnly(model), windows)
        wanted = {"unpruned", *args.variants.split(",")}
        for label, prune in ((k, v) for k, v in VARIANTS.items() if k in wanted):
            compiled, graph, compile_s = compile_variant(model, prune, calibration)
            logits, _ = run_windows(compiled, windows)
            rows.append({"variant": label, "prune": prune, "compile_s": compile_s,
                         "linear_MB": linear_bytes([graph]) / 1e6,
                         "kl_vs_eager": next_token_kl(logits, eager_logits),
                         **score(logits, windows, eager_logits)})
            reports[label] = report_rows(graph.ir.info.get("prune", {}))
            runners[f"fxforge {label}"] = (
                lambda n, c=compiled: fxforge.generate(c, prompt, n, direct_steps=True),
                lambda c=compiled: fxforge.generate(c, long_prompt, 1, direct_steps=True))
            print(f"{label:<32} ppl {rows[-1]['perplexity']:8.3f}  KL {rows[-1]['kl_vs_eager']:.4f}"
                  f"  linears {rows[-1]['linear_MB']:6.1f} MB  compile {compile_s:5.1f} s", flush=True)
        for name, fn in hf_runners(model, prompt, static=not args.no_inductor).items():
            runners[name] = (fn, lambda: model(long_prompt))
        rates = speed(runners, prompt, long_prompt, args.new_tokens, args.rounds)
    print_tables(rows, rates, reports)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": "SmolLM2-135M-Instruct", "cpu": cpu, "rows": rows,
                               "speed": {k: {"decode_tok_s": d, "prefill_s": s}
                                         for k, (d, s) in rates.items()},
                               "reports": reports}, indent=2))
    return 0


def print_tables(rows: list[dict], rates: dict, reports: dict) -> None:
    base_ppl = rows[0]["perplexity"]
    base_decode, base_prefill = rates["fxforge unpruned"]
    print("\n| variant | perplexity | Δ ppl | KL vs eager | linear MB | decode tok/s | × unpruned "
          "| prefill ms | × unpruned |\n|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        decode, prefill = rates[f"fxforge {row['variant']}"]
        print(f"| fxforge {row['variant']} | {row['perplexity']:.3f} | "
              f"{100 * (row['perplexity'] / base_ppl - 1):+.2f}% | {row['kl_vs_eager']:.4f} | "
              f"{row['linear_MB']:.1f} | {decode:.1f} | {decode / base_decode:.2f} | "
              f"{prefill * 1e3:.1f} | {base_prefill / prefill:.2f} |")
    for name, (decode, prefill) in rates.items():
        if not name.startswith("fxforge"):
            print(f"| {name} (unpruned) | | | | | {decode:.1f} | {decode / base_decode:.2f} | "
                  f"{prefill * 1e3:.1f} | {base_prefill / prefill:.2f} |")
    for label, report in reports.items():
        if report:
            print(f"\n{label}:\n{markdown(report)}")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
