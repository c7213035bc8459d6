"""``quantize="auto"`` against every fixed scheme on SmolLM2-135M: the speed/accuracy frontier.

    python bench/quant_auto.py --out .bench/quant_auto [--budgets 0.01,0.05] [--windows 4]

Every variant (fp32, int8, int4:g128/g64/g32, and auto at each KL budget) is compiled by fxforge
on the same calibration window of CPython's ``pydoc_data.topics`` (the one after the scored
ones; auto measures its budget there) and scored on ``--windows`` windows of ``--window-len``
tokens: perplexity and mean next-token KL against eager fp32 (``bench/accuracy.py``). Decode
tokens/s: the same formats compiled with ``kv_cache=True`` (auto's plan given layer by layer,
so the decode runs exactly the formats it chose) and ``fxforge.generate`` from a 32-token
prompt; the variants' rounds interleaved, medians. ``us_per_token``: the summed per-layer
M = 1 times of the linears' formats from the speed table auto chooses with.

Writes ``frontier.csv``, ``frontier.png`` and each auto budget's ``layers_<budget>.csv`` to
``--out``, and says whether auto lands on the measured frontier and, for each budget, whether
it is the fastest variant within that budget.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import fxforge
from fxforge.compiler import recording
from fxforge.examples.hf_models import LogitsOnly
from fxforge.passes.quantize_auto import INFO_KEY
from fxforge.passes.quantize_plan import DENSE, formats_for
from fxforge.quant_speed import cpu_layer_seconds
from fxforge.quant_report import (on_frontier, plot_frontier, write_frontier_csv,
                                            write_layers_csv)

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benches
from accuracy import (linear_shapes, next_token_kl, run_windows, score,  # noqa: E402
                      smollm2_windows)

FIXED = ("int8", "int4:g128", "int4:g64", "int4:g32")


def us_per_token(layers) -> float:
    """The summed M = 1 times of the linears (the CPU speed table auto uses; cached)."""
    return sum(cpu_layer_seconds(k, n, formats_for(k))[fmt if fmt in formats_for(k) else DENSE]
               for fmt, k, n, _ in layers) * 1e6


def compile_scored(model, windows, calibration, options):
    """(logits on ``windows``, compiled linears, the auto plan or None, compile seconds)."""
    torch._dynamo.reset()
    start = time.perf_counter()
    with recording() as graphs:
        compiled = fxforge.compile(LogitsOnly(model), (calibration,), **options)
        compiled(calibration)
        seconds = time.perf_counter() - start
        logits, _ = run_windows(compiled, windows)
    plan = next((g.ir.info[INFO_KEY] for g in graphs if INFO_KEY in g.ir.info), None)
    return logits, linear_shapes(graphs), plan, seconds


def explicit_rules(plan: dict) -> dict:
    """auto's choice as per-layer rules (the first weight name of each linear), so another
    compile (the KV-cache one, on a short prompt) runs the same formats without searching."""
    rules = {"skip": [n.split(",")[0] for n, layer in plan["layers"].items()
                      if layer["format"] == DENSE]}
    rules.update({n.split(",")[0]: layer["format"] for n, layer in plan["layers"].items()
                  if layer["format"] != DENSE})
    return rules


def decode_rates(model, prompt, quantize: dict, new_tokens: int, rounds: int) -> dict:
    """Tokens/s of each variant's decode: (time(n) - time(1)) / (n - 1), rounds interleaved."""
    # Every variant compiles the same forward (a prefill and a decode graph each) and all must
    # stay compiled to interleave their rounds: past dynamo's recompile_limit (8) the later
    # variants would run eagerly.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit,
                                               4 * len(quantize))
    runners = {}
    for label, rule in quantize.items():
        options = {"kv_cache": True, "max_seq_len": 512, **({"quantize": rule} if rule else {})}
        compiled = torch.compile(LogitsOnly(model), backend="fxforge", options=options)
        # direct steps, as bench/generate.py runs them (HF wrappers are vouched for there)
        runners[label] = lambda n, c=compiled: fxforge.generate(c, prompt, n, direct_steps=True)
        runners[label](2)   # compiles
    rates: dict[str, list] = {label: [] for label in runners}
    for _ in range(rounds):
        for label, run in runners.items():
            start = time.perf_counter()
            run(1)
            one = time.perf_counter() - start
            start = time.perf_counter()
            run(new_tokens)
            rates[label].append((new_tokens - 1) / max(time.perf_counter() - start - one, 1e-9))
    return {label: statistics.median(r) for label, r in rates.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=".bench/quant_auto")
    p.add_argument("--budgets", default="0.01,0.05", help="KL budgets (nats) for auto")
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--window-len", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args(argv)
    loaded = smollm2_windows(args.windows, args.window_len)
    if loaded is None:
        return 1
    model, windows, calibration = loaded
    budgets = [float(b) for b in args.budgets.split(",") if b]
    from fxforge.kernels.cpu_isa import cpu_features
    print(f"SmolLM2-135M-Instruct, {args.windows} x {args.window_len} tokens scored, "
          f"{args.window_len} calibration; {cpu_features().describe()}; "
          f"{torch.get_num_threads()} threads", flush=True)
    variants = {"fp32": {}, **{s: {"quantize": s} for s in FIXED},
                **{f"auto kl<={b:g}": {"quantize": "auto", "accuracy_budget": {"kl": b}}
                   for b in budgets}}
    points, decode_rules, out = [], {}, Path(args.out)
    with torch.inference_mode():
        eager, _ = run_windows(LogitsOnly(model), windows)
        for label, options in variants.items():
            logits, layers, plan, seconds = compile_scored(model, windows, calibration, options)
            budget = options.get("accuracy_budget", {}).get("kl", "")
            decode_rules[label] = explicit_rules(plan) if plan else options.get("quantize")
            if plan:
                write_layers_csv(plan, out / f"layers_{budget:g}.csv")
            nbytes = sum(k * n * bits / 8 for _, k, n, bits in layers)
            points.append({"scheme": label, "budget": budget, "linear_MB": nbytes / 1e6,
                           "us_per_token": us_per_token(layers),
                           "kl_vs_fp32": next_token_kl(logits, eager),
                           "perplexity": score(logits, windows, eager)["perplexity"],
                           "compile_s": seconds, "calibration_kl": plan["measured"] if plan else "",
                           "calibration_upper": plan["upper"] if plan else ""})
            print(f"{label:<16} ppl {points[-1]['perplexity']:8.3f}  KL {points[-1]['kl_vs_fp32']:.5f}  "
                  f"{points[-1]['linear_MB']:6.1f} MB  {points[-1]['us_per_token']:8.0f} us/token "
                  f"(linears)  compile {seconds:5.1f} s"
                  + (f"  calibration KL {plan['measured']:.5f}, upper bound {plan['upper']:.5f}"
                     if plan else ""), flush=True)
    prompt = windows[0, :32].unsqueeze(0)
    rates = decode_rates(model, prompt, decode_rules, args.new_tokens, args.rounds)
    for point in points:
        point["decode_tok_s"] = rates[point["scheme"]]
    report(points, out)
    return 0


def report(points: list[dict], out: Path) -> None:
    """frontier.csv/png, a table, and the verdict on auto."""
    write_frontier_csv(points, out / "frontier.csv")
    plot_frontier(points, out / "frontier.png", "SmolLM2-135M: decode speed vs KL to fp32")
    flags = on_frontier(points)
    print("\n| scheme | decode tok/s | KL vs fp32 | perplexity | linears MB | us/token (linears) | frontier |")
    print("|---|---|---|---|---|---|---|")
    for p, f in zip(points, flags):
        print(f"| {p['scheme']} | {p['decode_tok_s']:.1f} | {p['kl_vs_fp32']:.5f} | {p['perplexity']:.3f} "
              f"| {p['linear_MB']:.1f} | {p['us_per_token']:.0f} | {'yes' if f else 'no'} |")
    fixed = [p for p in points if not p["scheme"].startswith("auto")]
    for p, f in zip(points, flags):
        if not p["scheme"].startswith("auto"):
            continue
        within = [q for q in fixed if q["kl_vs_fp32"] <= p["budget"]]
        fastest = max(within, key=lambda q: q["decode_tok_s"], default=None)
        beats = p["kl_vs_fp32"] <= p["budget"] and all(
            p["decode_tok_s"] > q["decode_tok_s"] for q in within)
        print(f"{p['scheme']}: on the frontier: {'yes' if f else 'no'}; scored KL "
              f"{p['kl_vs_fp32']:.5f} {'within' if p['kl_vs_fp32'] <= p['budget'] else 'OVER'} "
              f"its budget; fastest fixed scheme within it: "
              f"{fastest['scheme'] if fastest else 'none'}; beats every fixed scheme there: "
              f"{'yes' if beats else 'no'}")
    print(f"wrote {out / 'frontier.csv'}, {out / 'frontier.png'}")


if __name__ == "__main__":
    sys.exit(main())
