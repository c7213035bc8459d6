"""The ``attention`` modes side by side on SmolLM2-135M: accuracy on long real text, and the
attention op's time and the KV cache's memory against sequence length.

    python bench/attention_modes.py [--tokens 4096] [--lengths 256,...,8192] [--parts accuracy,op]
    python bench/attention_modes.py --quick      # 1024 tokens, short lengths

1. **Accuracy** (``pydoc_data.topics``: the first ``--tokens`` tokens are evaluated, the next
   ``--tokens`` are the calibration text the measured modes choose their heads on, so no mode
   sees the text it is scored on): perplexity over every position and over the positions past
   1024 (where every mode's sparsity binds), next-token top-1 agreement with dense, and what
   the measured modes chose (sparse/streaming heads, work against dense).
2. **The attention op** at SmolLM2's heads (9 query heads, 3 k/v heads, head dim 64, batch 1,
   fp32), ``--lengths`` positions, interleaved rounds, medians: dense causal, sliding window,
   block-sparse (fixed pattern, and the auto patterns and per-head split measured in part 1,
   averaged over three sampled layers), linear attention (elu, and elu with a 64-key softmax
   window; a fitted map costs the same per position: ``bench/attention_linear.py``). The slope of
   time against length (log-log) per mode, and each mode's KV-cache bytes for the whole model
   at that length (decode keeps: dense and block-sparse every position, the window ``W + S``
   slots, per-head the full heads' positions plus the streaming heads' slots, linear its
   fixed-size state plus its window's ring).

Writes ``--out``/attention_modes.json, a markdown table and a PNG of time and memory.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from attention_window import long_text, nll_and_top1, op_medians, slope
from fxforge.compiler import recording
from fxforge.irgraph.views import BlockSparseAttention, PerHeadAttention
from fxforge.kernels.attention_cpu import cpu_attention
from fxforge.kernels.linear_attention_cpu import cpu_linear_attention
from fxforge.kernels.sparse_attention_cpu import cpu_block_sparse_attention, cpu_per_head_attention
from fxforge.kernels.window_attention_cpu import cpu_window_attention

WINDOW, SINKS = 256, 4
FAR = 1024              # perplexity past this position: where every mode's sparsity binds
MODES = ["sliding_window:256,sinks:4", "block_sparse:64", "block_sparse:64,local:4,global:1,stride:8",
         "block_sparse:auto,block:64,mass:0.95", "block_sparse:auto,block:64,mass:0.9",
         "per_head:256,sinks:4,mass:0.95", "per_head:256,sinks:4,mass:0.9"]
LAYERS, KV_HEADS, HEAD_DIM = 30, 3, 64
KV_BYTES = 2 * LAYERS * KV_HEADS * HEAD_DIM * 4      # per cached position, fp32 keys and values


def accuracy(model, text: torch.Tensor, calibration: torch.Tensor, modes: list[str]) -> tuple:
    dense_nll, dense_top = nll_and_top1(model, text, {})
    rows, measured = [_row("dense", dense_nll, dense_top, dense_nll, dense_top, {})], {}
    print(_line(rows[-1]), flush=True)
    for spec in modes:
        with recording() as graphs:
            nll, top = nll_and_top1(model, text, {"attention": spec}, calibration)
        ir = graphs[0].ir
        counts = {k: v for p in ir.info["passes"] if p.name.startswith("attention_")
                  for k, v in p.counts.items()}
        rows.append(_row(spec, nll, top, dense_nll, dense_top, counts))
        print(_line(rows[-1]), flush=True)
        nodes = list(ir.gm.graph.nodes)
        if spec.startswith("block_sparse:auto"):
            measured[spec] = [BlockSparseAttention.of(n).patterns for n in nodes
                              if BlockSparseAttention.matches(n)]
        if spec.startswith("per_head"):
            measured[spec] = [PerHeadAttention.of(n).streaming for n in nodes
                              if PerHeadAttention.matches(n)]
    return rows, measured


def _row(label, nll, top, dense_nll, dense_top, counts) -> dict:
    return {"attention": label, "ppl": float(nll.mean().exp()),
            "ppl_past_1024": float(nll[FAR:].mean().exp()),
            "dense_ppl_past_1024": float(dense_nll[FAR:].mean().exp()),
            "top1_vs_dense": float((top == dense_top).float().mean()), "counts": counts}


def _line(row: dict) -> str:
    chose = ", ".join(f"{k} {v}" for k, v in row["counts"].items() if k != "dense_sites")
    return (f"{row['attention']:<44} ppl {row['ppl']:8.3f}  past 1024 {row['ppl_past_1024']:8.3f}"
            f"  top-1 vs dense {row['top1_vs_dense']:.2%}  {chose}")


def _sampled(per_site: list) -> list:
    """First, middle and last layer."""
    return [per_site[0], per_site[len(per_site) // 2], per_site[-1]] if per_site else []


def op_runs(q, k, v, measured: dict) -> dict:
    """name -> a callable per mode (measured modes: their sampled layers run in turn)."""
    runs = {"dense": lambda: cpu_attention(q, k, v, is_causal=True, enable_gqa=True),
            f"window {WINDOW}+{SINKS}": lambda: cpu_window_attention(q, k, v, WINDOW, SINKS),
            "block_sparse:64": lambda: cpu_block_sparse_attention(q, k, v, [4, 1, 0, 0, 0], 64),
            "block_sparse:64,stride:8":
                lambda: cpu_block_sparse_attention(q, k, v, [4, 1, 8, 0, 0], 64),
            "linear:elu": lambda: cpu_linear_attention(q, k, v, "elu", 0),
            "linear:elu,window:64": lambda: cpu_linear_attention(q, k, v, "elu", 64)}
    for spec, per_site in measured.items():
        sites = _sampled(per_site)
        if spec.startswith("block_sparse"):
            runs[spec] = lambda sites=sites: [cpu_block_sparse_attention(q, k, v, p, 64) for p in sites]
        else:
            runs[spec] = lambda sites=sites: [cpu_per_head_attention(q, k, v, f, WINDOW, SINKS)
                                              for f in sites]
    return runs


def kv_bytes(name: str, length: int, measured: dict) -> int:
    """The whole model's KV-cache bytes after ``length`` positions in decode."""
    if name.startswith("window"):
        return min(length, WINDOW + SINKS) * KV_BYTES
    if name.startswith("linear"):
        window = int(name.split("window:")[1]) if "window:" in name else 0
        state = (HEAD_DIM + 1) * (HEAD_DIM + 1) * 4 * KV_HEADS * LAYERS   # elu: F = head dim
        return state + min(length, window) * KV_BYTES
    if name.startswith("per_head"):
        flags = [f for site in measured[name] for f in site]
        streaming = sum(flags) / len(flags)
        return int(((1 - streaming) * length + streaming * min(length, WINDOW + SINKS)) * KV_BYTES)
    return length * KV_BYTES


def op_times(lengths: list[int], rounds: int, measured: dict) -> list[dict]:
    gen, rows = torch.Generator().manual_seed(0), []
    for length in lengths:
        q = torch.randn(1, 9, length, 64, generator=gen)
        k, v = (torch.randn(1, KV_HEADS, length, 64, generator=gen) for _ in range(2))
        runs = op_runs(q, k, v, measured)
        calls = {name: len(_sampled(per_site)) for name, per_site in measured.items()}
        medians = op_medians(runs, rounds, calls)
        for name, ms in medians.items():
            rows.append({"mode": name, "length": length, "ms": ms,
                         "kv_MB": kv_bytes(name, length, measured) / 1e6})
        print(f"{length:5d} positions: " + "  ".join(
            f"{n} {ms:.1f} ms ({medians['dense'] / ms:.1f}x)" for n, ms in medians.items()),
            flush=True)
    return rows


def table(rows: list[dict]) -> str:
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    lengths = sorted({r["length"] for r in rows})
    at = {(r["mode"], r["length"]): r for r in rows}
    lines = ["| mode | " + " | ".join(f"{n}: ms (x dense), KV MB" for n in lengths) + " | slope |",
             "|---|" + "---|" * (len(lengths) + 1)]
    for mode in modes:
        cells = [f"{at[mode, n]['ms']:.1f} ({at['dense', n]['ms'] / at[mode, n]['ms']:.1f}x), "
                 f"{at[mode, n]['kv_MB']:.0f}" for n in lengths]
        fit = slope([{"length": n, "ms": at[mode, n]["ms"]} for n in lengths], "ms")
        lines.append(f"| {mode} | " + " | ".join(cells) + f" | {fit:.2f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    from fxforge.autotune.plots import _pyplot, _save
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for mode in dict.fromkeys(r["mode"] for r in rows):
        mine = [r for r in rows if r["mode"] == mode]
        left.plot([r["length"] for r in mine], [r["ms"] for r in mine], "o-", label=mode)
        right.plot([r["length"] for r in mine], [r["kv_MB"] for r in mine], "o-", label=mode)
    for ax, what in ((left, "attention op, one layer (ms)"), (right, "KV cache, whole model (MB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length")
        ax.set_ylabel(what)
        ax.legend(fontsize=7)
    fig.suptitle("SmolLM2-135M heads, batch 1, fp32: attention modes against length")
    _save(fig, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--lengths", default="256,512,1024,2048,4096,8192")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--modes", default=";".join(MODES),
                   help="attention options for the accuracy part, separated by ';'")
    p.add_argument("--parts", default="accuracy,op")
    p.add_argument("--measured", help="a JSON of an earlier run: its measured patterns for --parts op")
    p.add_argument("--out", default=".bench/attention_modes")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.lengths, args.rounds = 1280, "256,1024", 2
    from fxforge.examples.smollm2 import load_smollm2, smollm2_status
    from fxforge.kernels.cpu_isa import cpu_features
    available, reason = smollm2_status()
    if not available:
        print(f"SmolLM2 unavailable: {reason}", file=sys.stderr)
        return 1
    model, tokenizer = load_smollm2(progress=False)
    print(f"SmolLM2-135M-Instruct; {cpu_features().describe()}; {torch.get_num_threads()} threads",
          flush=True)
    results = {"cpu": cpu_features().describe(), "threads": torch.get_num_threads()}
    parts, measured = set(args.parts.split(",")), {}
    if args.measured:
        measured = json.loads(Path(args.measured).read_text())["measured"]
    if "accuracy" in parts:
        text = long_text(tokenizer, 2 * args.tokens)
        results["accuracy"], measured = accuracy(model.eval(), text[:, :args.tokens],
                                                 text[:, args.tokens:], args.modes.split(";"))
    results["measured"] = measured
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if "op" in parts:
        results["op"] = op_times([int(n) for n in args.lengths.split(",")], args.rounds, measured)
        (out / "attention_modes.md").write_text(table(results["op"]) + "\n")
        print(table(results["op"]), flush=True)
        plot(results["op"], out / "attention_modes.png")
    (out / "attention_modes.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {out}/attention_modes.json, .md, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
