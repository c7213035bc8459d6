"""``kv_cache_dtype="int8"`` on SmolLM2-135M (real weights): what the int8 KV cache costs in
accuracy and what it saves in bytes.

    python bench/kv_int8.py [--tokens 1024] [--prompt 64] [--chunk 1] [--parts accuracy,decode,op]
    python bench/kv_int8.py --quick          # 512 tokens in chunks of 8, short timing

1. **accuracy** (``pydoc_data.topics``, ``--tokens`` positions in one sequence, compiled by
   fxforge on the CPU with ``kv_cache=True``): a prefill of ``--prompt`` tokens, then the rest
   teacher-forced through the cache ``--chunk`` tokens per call (1: real decode steps), so every
   later position reads the earlier keys and values from the cache as stored. Per cache dtype
   (fp32, int8) and attention (dense; ``sliding_window:256,sinks:4``): perplexity over the
   positions after the prompt, Δppl and next-token top-1 agreement against the fp32 cache of
   the same attention, and the KV bytes per cached position measured from the allocated buffers.
2. **decode** (timing, indicative on a shared host): median whole-model decode step at a few
   positions, fp32 vs int8 cache, interleaved rounds.
3. **op** (timing): the cached attention op alone at SmolLM2's heads (9 query heads, 3 kv
   heads, head dim 64), one new position after L cached ones, fp32 vs int8 cache.

Writes ``--out``/kv_int8.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fxforge.compiler import recording
from fxforge.examples.hf_models import LogitsOnly

WINDOW = "sliding_window:256,sinks:4"
DTYPES = ("auto", "int8")   # the option's values: "auto" is the model's fp32


def _compile(model, max_seq_len: int, kv_dtype: str, attention=None):
    torch._dynamo.reset()
    options = {"kv_cache": True, "kv_cache_dtype": kv_dtype, "max_seq_len": max_seq_len,
               "backend": "cpu"}
    if attention:
        options["attention"] = attention
    return torch.compile(LogitsOnly(model), backend="fxforge", options=options)


def _decoder(graphs):
    decoders = [g.kv for g in graphs if g.kv is not None]
    if len(decoders) != 1:
        raise RuntimeError(f"expected one KV-cached graph, found {len(decoders)}")
    return decoders[0]


def teacher_forced(model, text: torch.Tensor, prompt: int, chunk: int, kv_dtype: str,
                   attention=None) -> dict:
    """Logits of every position after ``prompt``, computed through the cache chunk by chunk."""
    compiled = _compile(model, text.shape[1], kv_dtype, attention)
    with torch.inference_mode(), recording() as graphs:
        compiled(text[:, :8])                 # dynamo's static first graph
        compiled(text[:, :9])                 # the dynamic one, the graph that caches
        logits = compiled(text[:, :prompt])   # a new prompt: a prefill
        for end in range(prompt + chunk, text.shape[1] + chunk, chunk):
            logits = compiled(text[:, :min(end, text.shape[1])])
        logits = logits[0, prompt - 1:-1].float()
    decoder = _decoder(graphs)
    if decoder.stats["uncached"]:
        raise RuntimeError(f"{decoder.stats['uncached']} calls ran uncached: not a cache measurement")
    state = max(decoder.states(), key=lambda s: s.tokens.shape[1] if s.tokens is not None else 0)
    capacity = state.caches[0].shape[2]
    return {"logits": logits, "stats": decoder.stats, "cache_bytes": state.cache_bytes,
            "bytes_per_position": state.cache_bytes / capacity,
            "dtypes": sorted({str(t.dtype) for t in state.caches})}


def accuracy(model, text: torch.Tensor, prompt: int, chunk: int) -> list[dict]:
    rows = []
    targets = text[0, prompt:]
    for attention in (None, WINDOW):
        runs = {d: teacher_forced(model, text, prompt, chunk, d, attention) for d in DTYPES}
        base = runs["auto"]
        base_nll = F.cross_entropy(base["logits"], targets)
        for kv_dtype, run in runs.items():
            nll = F.cross_entropy(run["logits"], targets)
            row = {"attention": attention or "dense", "kv_cache_dtype": kv_dtype,
                   "ppl": float(nll.exp()), "delta_ppl": float(nll.exp() - base_nll.exp()),
                   "top1_vs_fp32_cache": float((run["logits"].argmax(-1) ==
                                                base["logits"].argmax(-1)).float().mean()),
                   "kv_bytes_per_position": run["bytes_per_position"],
                   "kv_cache_bytes": run["cache_bytes"], "cache_dtypes": run["dtypes"],
                   "positions_scored": int(targets.numel()), "calls": run["stats"]}
            rows.append(row)
            print(f"{row['attention']:<28} cache {kv_dtype:<5} ppl {row['ppl']:8.4f} "
                  f"(Δ {row['delta_ppl']:+.4f})  top-1 vs fp32 cache {row['top1_vs_fp32_cache']:.2%}"
                  f"  KV {row['kv_bytes_per_position']:8.0f} B/position", flush=True)
    return rows


def decode_times(model, text: torch.Tensor, positions: list[int], steps: int, rounds: int) -> list[dict]:
    """Median decode step ms at each position, fp32 vs int8 cache (rounds interleaved)."""
    compiled = {d: _compile(model, max(positions) + steps + 16, d) for d in DTYPES}
    times = {(d, p): [] for d in DTYPES for p in positions}
    with torch.inference_mode(), recording() as graphs:
        for fn in compiled.values():
            fn(text[:, :8]), fn(text[:, :9])   # the static graph, then the dynamic one
        for _ in range(rounds):
            for position in positions:
                for d, fn in compiled.items():
                    fn(text[:, :position])                       # prefill (a new prompt)
                    for i in range(2 + steps):                   # 2: recorded, then checked
                        start = time.perf_counter()
                        fn(text[:, :position + i + 1])
                        if i >= 2:
                            times[d, position].append(1e3 * (time.perf_counter() - start))
    decoders = [g.kv for g in graphs if g.kv is not None]
    if len(decoders) != 2 or any(d.stats["steps"] < rounds * len(positions) * steps or
                                 d.stats["uncached"] for d in decoders):
        raise RuntimeError(f"the timed steps did not all run through the caches: "
                           f"{[d.stats for d in decoders]}")
    rows = []
    for position in positions:
        fp32, int8 = (statistics.median(times[d, position]) for d in DTYPES)
        rows.append({"position": position, "fp32_cache_step_ms": fp32, "int8_cache_step_ms": int8,
                     "ratio": int8 / fp32})
        print(f"decode step at position {position:5d}: fp32 cache {fp32:7.2f} ms  int8 cache "
              f"{int8:7.2f} ms  ({int8 / fp32:.2f}x)", flush=True)
    return rows


def op_times(lengths: list[int], rounds: int, threads: int) -> list[dict]:
    """Median us per call on ``threads`` threads (1 by default: on a busy shared host a parallel
    region waits for a descheduled peer, which hides the kernel's own time)."""
    from fxforge.kernels.decode_attention_cpu import cpu_cached_attention
    gen, rows, before = torch.Generator().manual_seed(0), [], torch.get_num_threads()
    torch.set_num_threads(threads)
    for length in lengths:
        q = torch.randn(1, 9, 1, 64, generator=gen)
        k, v = (torch.randn(1, 3, 1, 64, generator=gen) for _ in "kv")
        fp32 = [torch.randn(1, 3, length + 1, 64, generator=gen) for _ in "kv"]
        int8 = [torch.randint(-127, 128, (1, 3, length + 1, 64), dtype=torch.int8, generator=gen)
                for _ in "kv"] + [torch.rand(1, 3, length + 1, 1, generator=gen) / 100 for _ in "kv"]
        position = torch.tensor([length])
        runs = {"fp32": lambda: cpu_cached_attention(q, k, v, *fp32, position),
                "int8": lambda: cpu_cached_attention(q, k, v, int8[0], int8[1], position,
                                                     k_scale=int8[2], v_scale=int8[3])}
        times = {name: [] for name in runs}
        for fn in runs.values():
            fn()
        for _ in range(rounds):
            for name, fn in runs.items():
                start = time.perf_counter()
                for _ in range(20):
                    fn()
                times[name].append(1e6 * (time.perf_counter() - start) / 20)
        a, b = (statistics.median(times[n]) for n in runs)
        rows.append({"cached": length, "threads": threads, "fp32_us": a, "int8_us": b,
                     "ratio": b / a})
        print(f"cached attention op, {length:5d} cached, {threads} thread(s): fp32 {a:8.1f} us  "
              f"int8 {b:8.1f} us  ({b / a:.2f}x)", flush=True)
    torch.set_num_threads(before)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--chunk", type=int, default=1, help="positions per teacher-forced call")
    p.add_argument("--positions", default="256,1024,2048")
    p.add_argument("--lengths", default="256,1024,4096")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--op-threads", type=int, default=1)
    p.add_argument("--parts", default="accuracy", help="accuracy,decode,op (timing: decode, op)")
    p.add_argument("--out", default=".bench/kv_int8")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.chunk, args.positions, args.lengths, args.steps, args.rounds = \
            512, 8, "256", "256,1024", 3, 2
    from fxforge.examples.smollm2 import load_smollm2, smollm2_status
    from fxforge.kernels.cpu_isa import cpu_features
    available, reason = smollm2_status()
    if not available:
        print(f"SmolLM2 unavailable: {reason}", file=sys.stderr)
        return 1
    model, tokenizer = load_smollm2(progress=False)
    sys.path.insert(0, str(Path(__file__).resolve().parent))   # the sibling attention_window.py
    from attention_window import long_text
    positions = [int(n) for n in args.positions.split(",")]
    text = long_text(tokenizer, max(args.tokens, max(positions) + 64))
    results = {"cpu": cpu_features().describe(), "threads": torch.get_num_threads(),
               "args": vars(args)}
    print(f"SmolLM2-135M-Instruct; {results['cpu']}; {results['threads']} threads", flush=True)
    parts = set(args.parts.split(","))
    if "accuracy" in parts:
        results["accuracy"] = accuracy(model, text[:, :args.tokens], args.prompt, args.chunk)
    if "decode" in parts:
        results["decode"] = decode_times(model, text, positions, args.steps, args.rounds)
    if "op" in parts:
        results["op"] = op_times([int(n) for n in args.lengths.split(",")], args.rounds * 3,
                                 args.op_threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kv_int8.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {out / 'kv_int8.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
