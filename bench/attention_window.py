"""``attention="sliding_window:W,sinks:S"`` on SmolLM2-135M: what it costs and what it saves.

    python bench/attention_window.py [--tokens 4096] [--windows 256,1024] [--lengths 512,...,8192]
    python bench/attention_window.py --quick     # 1024 tokens, one window, short lengths

1. **Accuracy on long real text** (``pydoc_data.topics``, ``--tokens`` positions in one
   sequence, compiled by fxforge on the CPU): perplexity over every position and over the
   positions past ``2 W`` (where the window binds), and next-token top-1 agreement with dense,
   for dense attention, window only (sinks 0) and window + sinks (StreamingLLM), per window.
2. **The attention op alone** at SmolLM2's heads (9 query heads, 3 kv heads, head dim 64,
   batch 1, fp32) from 256 to 8192 positions: fxforge's dense causal CPU attention against its
   window kernel, interleaved rounds, medians; the ratio, and the dense time's slope.
3. **Decode step time and KV-cache bytes vs position**: the model compiled with ``kv_cache``
   (dense: ``max_seq_len`` past the longest; window: ``max_seq_len=512``, so the longer prompts
   also run past it), a prompt of P tokens, then ``--steps`` timed decode steps (median; the
   two before them, recorded and checked for replay, are not counted).

Writes ``--out``/attention_window.json and a PNG of step time and cache bytes vs position.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

import fxforge
from fxforge.compiler import recording
from fxforge.examples.hf_models import LogitsOnly
from fxforge.kernels.attention_cpu import cpu_attention
from fxforge.kernels.window_attention_cpu import cpu_window_attention

SINKS = 4
WARM_STEPS = 2   # a new sequence's first decode step is recorded, the second checked against it


def long_text(tokenizer, tokens: int) -> torch.Tensor:
    from fxforge.calibration import calibration_text
    ids = calibration_text(tokenizer, tokens, 1)
    if ids.shape[1] < tokens:
        raise SystemExit(f"pydoc_data.topics gave {ids.shape[1]} tokens, fewer than {tokens}")
    return ids


def nll_and_top1(model, ids: torch.Tensor, options: dict,
                 calibration: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position the next token's NLL and the argmax, from one fxforge-compiled forward;
    ``calibration``: other text of the same shape to compile (and measure heads) on."""
    torch._dynamo.reset()
    example = ids if calibration is None else calibration
    compiled = fxforge.compile(LogitsOnly(model), (example,), backend="cpu", **options)
    with torch.inference_mode():
        logits = compiled(ids)[0, :-1].float()
        return F.cross_entropy(logits, ids[0, 1:], reduction="none"), logits.argmax(-1)


def accuracy(model, ids, windows: list[int]) -> list[dict]:
    dense_nll, dense_top = nll_and_top1(model, ids, {})
    rows = [_row("dense", None, dense_nll, dense_top, dense_nll, dense_top)]
    print(_line(rows[-1]), flush=True)
    for window in windows:
        for sinks in (0, SINKS):
            spec = f"sliding_window:{window},sinks:{sinks}"
            nll, top = nll_and_top1(model, ids, {"attention": spec})
            rows.append(_row(spec, window, nll, top, dense_nll, dense_top))
            print(_line(rows[-1]), flush=True)
    return rows


def _row(label, window, nll, top, dense_nll, dense_top) -> dict:
    """Perplexity over every position, and over those past 2 W (where the window binds) next
    to dense's over the same positions."""
    far = slice(2 * window if window else 0, None)
    return {"attention": label, "window": window, "ppl": float(nll.mean().exp()),
            "ppl_past_2w": float(nll[far].mean().exp()) if nll[far].numel() else None,
            "dense_ppl_past_2w": float(dense_nll[far].mean().exp()) if nll[far].numel() else None,
            "top1_vs_dense": float((top == dense_top).float().mean())}


def _line(row: dict) -> str:
    past = (f"{row['ppl_past_2w']:.3f} (dense {row['dense_ppl_past_2w']:.3f})"
            if row["ppl_past_2w"] is not None else "-")
    return (f"{row['attention']:<32} ppl {row['ppl']:8.3f}  past 2W {past:>20}  "
            f"top-1 vs dense {row['top1_vs_dense']:.2%}")


def op_times(lengths: list[int], window: int, rounds: int) -> list[dict]:
    """Dense causal attention against the window kernel at SmolLM2's heads."""
    gen, rows = torch.Generator().manual_seed(0), []
    for length in lengths:
        q = torch.randn(1, 9, length, 64, generator=gen)
        k, v = (torch.randn(1, 3, length, 64, generator=gen) for _ in range(2))
        runs = {"dense": lambda: cpu_attention(q, k, v, is_causal=True, enable_gqa=True),
                "window": lambda: cpu_window_attention(q, k, v, window, SINKS)}
        medians = op_medians(runs, rounds)
        dense, windowed = medians["dense"], medians["window"]
        rows.append({"length": length, "dense_ms": dense, "window_ms": windowed,
                     "speedup": dense / windowed})
        print(f"attention op, {length:5d} positions: dense {dense:9.2f} ms  window {window} + "
              f"{SINKS} sinks {windowed:8.2f} ms  ({dense / windowed:.1f}x)", flush=True)
    return rows


def op_medians(runs: dict, rounds: int, calls: Optional[dict] = None) -> dict:
    """name -> median ms of ``runs[name]()`` over ``rounds`` rounds, each round in a rotated
    order (a drifting host then weighs on every run alike), each run warmed once;
    ``calls[name]``: how many calls one run makes (several layers), divided out."""
    times: dict = {name: [] for name in runs}
    for fn in runs.values():
        fn()
    order = list(runs.items())
    for r in range(rounds):
        for name, fn in order[r % len(order):] + order[:r % len(order)]:
            start = time.perf_counter()
            fn()
            times[name].append(1e3 * (time.perf_counter() - start) / (calls or {}).get(name, 1))
    return {name: statistics.median(t) for name, t in times.items()}


def slope(rows: list[dict], key: str) -> float:
    """The exponent b of time ~ length^b, fitted over the rows (log-log least squares)."""
    x = torch.tensor([float(r["length"]) for r in rows]).log()
    y = torch.tensor([r[key] for r in rows]).log()
    x = x - x.mean()
    return float((x * (y - y.mean())).sum() / (x * x).sum())


def decode_steps(model, text: torch.Tensor, positions: list[int], window: int, steps: int) -> list[dict]:
    """Median decode step ms and KV-cache bytes after a prompt of each length."""
    rows = []
    variants = {"dense": {"max_seq_len": max(positions) + steps + WARM_STEPS + 1},
                f"window {window} + {SINKS} sinks": {
                    "max_seq_len": 512, "attention": f"sliding_window:{window},sinks:{SINKS}"}}
    for label, options in variants.items():
        torch._dynamo.reset()
        compiled = torch.compile(LogitsOnly(model), backend="fxforge",
                                 options={"kv_cache": True, **options})
        with torch.inference_mode(), recording() as graphs:
            compiled(text[:, :8])           # the static first graph
            compiled(text[:, :9])           # the dynamic one
            for position in positions:
                ids = text[:, :position]
                compiled(ids)
                times = []
                for i in range(steps + WARM_STEPS):
                    ids = text[:, :position + i + 1]
                    start = time.perf_counter()
                    compiled(ids)
                    times.append(1e3 * (time.perf_counter() - start))
                times = times[WARM_STEPS:]   # the recording and its check
                cache = _cache_bytes(graphs)
                rows.append({"attention": label, "position": position,
                             "step_ms": statistics.median(times), "cache_MB": cache / 1e6})
                print(f"{label:<24} position {position:5d}: step {rows[-1]['step_ms']:7.2f} ms  "
                      f"KV cache {cache / 1e6:7.1f} MB", flush=True)
    return rows


def _cache_bytes(graphs) -> int:
    """The KV-cache bytes of the sequence being decoded (the largest live state)."""
    states = [s for g in graphs if g.kv is not None for s in g.kv.states()]
    return max((sum(c.numel() * c.element_size() for c in s.caches) for s in states), default=0)


def plot(steps: list[dict], path: Path) -> None:
    from fxforge.autotune.plots import _pyplot, _save
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for label in dict.fromkeys(r["attention"] for r in steps):
        rows = [r for r in steps if r["attention"] == label]
        left.plot([r["position"] for r in rows], [r["step_ms"] for r in rows], "o-", label=label)
        right.plot([r["position"] for r in rows], [r["cache_MB"] for r in rows], "o-", label=label)
    for ax, what in ((left, "decode step (ms)"), (right, "KV cache (MB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("position")
        ax.set_ylabel(what)
        ax.legend(fontsize=8)
    fig.suptitle("SmolLM2-135M, batch 1: sliding window + sinks vs dense")
    _save(fig, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--windows", default="256,1024")
    p.add_argument("--lengths", default="256,512,1024,2048,4096,8192")
    p.add_argument("--positions", default="512,2048,8192")
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default=".bench/attention_window")
    p.add_argument("--parts", default="accuracy,op,decode", help="which of the three to run")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.windows, args.lengths, args.positions, args.steps, args.rounds = \
            1024, "128", "256,1024", "256,1024", 3, 2
    from fxforge.examples.smollm2 import load_smollm2, smollm2_status
    from fxforge.kernels.cpu_isa import cpu_features
    available, reason = smollm2_status()
    if not available:
        print(f"SmolLM2 unavailable: {reason}", file=sys.stderr)
        return 1
    model, tokenizer = load_smollm2(progress=False)
    windows = [int(w) for w in args.windows.split(",")]
    positions = [int(n) for n in args.positions.split(",")]
    print(f"SmolLM2-135M-Instruct; {cpu_features().describe()}; {torch.get_num_threads()} threads",
          flush=True)
    text = long_text(tokenizer, max(args.tokens, max(positions) + args.steps + WARM_STEPS + 1))
    results = {"cpu": cpu_features().describe(), "threads": torch.get_num_threads()}
    parts = set(args.parts.split(","))
    if "accuracy" in parts:
        results["accuracy"] = accuracy(model.eval(), text[:, :args.tokens], windows)
    if "op" in parts:
        results["op"] = op_times([int(n) for n in args.lengths.split(",")], windows[0], args.rounds)
        results["op_slope"] = {k: slope(results["op"], k) for k in ("dense_ms", "window_ms")}
        print(f"slope of time vs length (log-log): dense {results['op_slope']['dense_ms']:.2f}, "
              f"window {results['op_slope']['window_ms']:.2f}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if "decode" in parts:
        results["decode"] = decode_steps(model, text, positions, windows[0], args.steps)
        plot(results["decode"], out / "attention_window.png")
    (out / "attention_window.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {out / 'attention_window.json'}, {out / 'attention_window.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
