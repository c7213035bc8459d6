"""Speculative decoding on SmolLM2-135M with drafts fxforge derives from the model itself.

    python bench/speculative.py [--new-tokens 64] [--rounds 3] [--drafts "int4:g128;..."]
    python bench/speculative.py --quick     # one prompt, 2 rounds, 2 drafts

The target is SmolLM2 compiled by fxforge in fp32 with ``kv_cache=True``; its plain greedy
``fxforge.generate`` decode is the baseline. Each draft is ``draft="self"`` with
``draft_options`` (a quantize scheme and/or ``prune``: the draft is the target's own module
compiled again by fxforge's lossy passes). Per draft, over several chat prompts, in interleaved
rounds with medians: decode tokens/s ((time(n) - time(1)) / (n - 1)), its ratio over the
baseline, whether the tokens are identical to the baseline's (they must be), the acceptance
rate (accepted / drafted) and the draft lengths the adaptive ``k`` chose. SmolLM2's weights sit
on a 4-bit group-32 grid, so an int4 g32 draft would agree almost always and flatter the
figure: the drafts here are int8 (``draft="self"``'s default: per-channel int8 is not SmolLM2's
grid, a quarter of fp32's bytes), int4 g128, and each with pruned layers. The references in the
same rounds: Hugging Face ``generate()`` eager, and with its prompt-lookup drafting
(``prompt_lookup_num_tokens``: n-gram drafts from the prompt, the speculative mode HF offers
without a second model); their tokens are checked against HF eager's. llama.cpp's speculative
decoding is not exposed by ``llama-cpp-python``.
Writes ``--json`` (default ``.bench/speculative.json``).
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
from fxforge.examples.hf_models import LogitsOnly

QUESTIONS = ("What is the capital of France, and what is it known for?",
             "Explain what a Python list comprehension is, with an example.",
             "Write a short story about a robot who learns to paint.")
DRAFTS = ("int8", "int8;prune=layers:4", "int4:g128", "int4:g128;prune=layers:4")


def draft_options(text: str) -> dict:
    """``"int4:g128;prune=layers:4"`` -> ``{"quantize": "int4:g128", "prune": "layers:4"}``."""
    scheme, *rest = text.split(";")
    options = {"quantize": scheme} if scheme else {}
    for part in rest:
        key, _, value = part.partition("=")
        options[key] = value
    return options


def decode_rate(generate_n, new_tokens: int) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    generate_n(1)
    one = time.perf_counter() - start
    start = time.perf_counter()
    out = generate_n(new_tokens)
    full = time.perf_counter() - start
    return (new_tokens - 1) / max(full - one, 1e-9), out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--drafts", default="|".join(DRAFTS), help="'|'-separated draft option sets")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", default=".bench/speculative.json")
    args = p.parse_args(argv)
    from fxforge.examples.smollm2 import chat_prompt, load_smollm2, smollm2_status
    available, why = smollm2_status()
    if not available:
        print(f"SmolLM2 unavailable: {why}", file=sys.stderr)
        return 1
    drafts = [d for d in args.drafts.split("|") if d]
    questions = QUESTIONS
    if args.quick:
        args.rounds, drafts, questions = 2, drafts[:2], QUESTIONS[:1]
    torch._dynamo.config.cache_size_limit = 64
    model, tokenizer = load_smollm2(progress=False)
    prompts = [chat_prompt(tokenizer, q) for q in questions]
    from fxforge.kernels.cpu_isa import cpu_features
    cpu = f"{cpu_features().describe()}; {torch.get_num_threads()} threads"
    print(f"SmolLM2-135M-Instruct fp32 target, greedy, {args.new_tokens} new tokens; {cpu}",
          flush=True)
    n = args.new_tokens
    with torch.inference_mode():
        target = fxforge.compile(LogitsOnly(model), (prompts[0],), dynamic=True, kv_cache=True,
                                 max_seq_len=1024)
        runs = {"baseline": lambda prompt, k: fxforge.generate(target, prompt, k, direct_steps=True)}
        for text in drafts:
            runs[text] = (lambda prompt, k, o=draft_options(text): fxforge.generate(
                target, prompt, k, draft="self", draft_options=o, direct_steps=True))
        hf = {"do_sample": False, "attention_mask": None}
        runs["hf eager"] = lambda prompt, k: model.generate(prompt, max_new_tokens=k,
                                                            min_new_tokens=k, **hf)
        runs["hf prompt lookup"] = lambda prompt, k: model.generate(
            prompt, max_new_tokens=k, min_new_tokens=k, prompt_lookup_num_tokens=4, **hf)
        rates = {name: [] for name in runs}
        tokens = {}
        for name, run in runs.items():   # warm-up: compiles the drafts
            run(prompts[0], 4)
        for _ in range(args.rounds):
            for name, run in runs.items():
                for i, prompt in enumerate(prompts):
                    rate, out = decode_rate(lambda k: run(prompt, k), n)
                    rates[name].append(rate)
                    tokens.setdefault((name, i), out)
        rows = summarize(runs, rates, tokens, prompts, target, n)
    print_table(rows)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": "SmolLM2-135M-Instruct", "cpu": cpu, "new_tokens": n,
                               "rows": rows}, indent=2))
    return 0 if all(r["identical"] for r in rows if not r["draft"].startswith("hf")) else 2


def summarize(runs, rates, tokens, prompts, target, n) -> list[dict]:
    base = statistics.median(rates["baseline"])
    rows = []
    for name in runs:
        reference = "hf eager" if name.startswith("hf") else "baseline"
        same = all(torch.equal(tokens[(name, i)], tokens[(reference, i)]) for i in range(len(prompts)))
        row = {"draft": name, "decode_tok_s": statistics.median(rates[name]),
               "x_baseline": statistics.median(rates[name]) / base, "identical": same}
        if name != "baseline" and not name.startswith("hf"):
            stats = [fxforge.generate(target, prompt, n, draft="self", return_stats=True,
                                      draft_options=draft_options(name))[1]["speculative"]
                     for prompt in prompts]
            drafted = sum(s["drafted"] for s in stats)
            row["acceptance_rate"] = sum(s["accepted"] for s in stats) / max(drafted, 1)
            row["k_chosen"] = {}
            for s in stats:
                for k, count in s["k_chosen"].items():
                    row["k_chosen"][k] = row["k_chosen"].get(k, 0) + count
        rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    print("\n| draft | decode tok/s | × fxforge fp32 kv_cache | identical tokens (hf rows: to hf "
          "eager) | acceptance | "
          "k chosen (rounds) |\n|---|---|---|---|---|---|")
    for r in rows:
        ks = ", ".join(f"{k}: {c}" for k, c in sorted(r.get("k_chosen", {}).items()))
        acc = f"{r['acceptance_rate']:.2f}" if "acceptance_rate" in r else "-"
        print(f"| {r['draft']} | {r['decode_tok_s']:.1f} | {r['x_baseline']:.2f} | "
              f"{r['identical']} | {acc} | {ks or '-'} |")


if __name__ == "__main__":
    sys.exit(main())
