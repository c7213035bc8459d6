"""The C++ GEMV (``kernels/gemv_cpu.py``) alone against the memory-bandwidth limit.

A batch-1 decode step is bound by the bytes of its weights: a GEMV call at M = 1 should read its
packed weight at the machine's read bandwidth. For SmolLM2-135M's decode shapes (fused qkv,
q/o, k/v, fused gate_up, down, the tied lm_head), fp32 and bf16-stored weights, each ISA build
this CPU runs (``gemv_cpu.runnable_isas``) and ``F.linear`` on the fp32 weight, this prints the
GB/s of weight read per call and that as a fraction of the read bandwidth measured the way
``bench/decode_budget.py`` measures it (a torch ``sum`` over a 512 MiB buffer), timed in the same
rounds at the same thread count. Weights are cycled over copies whose bf16 packs together exceed
``--working-set-mb`` (default 4x a 32 MiB L3; the fp32 ones twice that), as in a model, where
each layer's weight arrives from memory. The variants (and the sum) are timed alternately for
``--rounds`` rounds; the table shows medians and the best round (on a shared machine the best
round is the better estimate of what the kernel can do).

    .venv/bin/python bench/gemv_bandwidth.py [--threads 1,2] [--rounds 5] [--shapes qkv,down]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from fxforge.kernels.gemv_cpu import GemvLinear, runnable_isas

# SmolLM2-135M's decode linears: name -> (K, N)
SHAPES = {"qkv": (576, 960), "q/o": (576, 576), "k/v": (576, 192), "gate_up": (576, 3072),
          "down": (1536, 576), "lm_head": (576, 49152)}


def _variants(k: int, n: int, copies: int) -> dict[str, tuple[int, list]]:
    """label -> (bytes read per call, one callable per weight copy)."""
    g = torch.Generator().manual_seed(k * 7 + n)
    weights = [torch.randn(n, k, generator=g) / k ** 0.5 for _ in range(copies)]
    x = torch.randn(1, k, generator=g)
    out = {"F.linear fp32": (4 * n * k, [lambda w=w: F.linear(x, w) for w in weights])}
    for fmt in ("dense", "bf16"):
        for isa in runnable_isas():
            kernels = [GemvLinear(w, None, "none", weight_format=fmt, isa=isa) for w in weights]
            nbytes = kernels[0].weight.numel() * kernels[0].weight.element_size()
            out[f"gemv {'fp32' if fmt == 'dense' else 'bf16'} {isa}"] = (
                nbytes, [lambda kern=kern: kern(x, None) for kern in kernels])
    return out


def _seconds_per_call(calls: list, sweeps: int) -> float:
    start = time.perf_counter()
    for _ in range(sweeps):
        for call in calls:
            call()
    return (time.perf_counter() - start) / (sweeps * len(calls))


READ = "torch sum (read bw)"


def run(threads: list[int], rounds: int, shapes: list[str], working_set_mb: int) -> list[dict]:
    rows = []
    before = torch.get_num_threads()
    buffer = torch.rand(512 * 2 ** 20 // 4)   # decode_budget.read_bandwidth's measure
    try:
        for t in threads:
            torch.set_num_threads(t)
            for name in shapes:
                k, n = SHAPES[name]
                copies = max(2, (working_set_mb << 20) // (2 * k * n))
                variants = {READ: (buffer.numel() * 4, [buffer.sum]), **_variants(k, n, copies)}
                sweeps = {label: max(1, int(20e6 // (nbytes * len(calls))))   # ~20 MB a sample
                          for label, (nbytes, calls) in variants.items()}
                samples: dict[str, list[float]] = {label: [] for label in variants}
                for label, (_, calls) in variants.items():
                    _seconds_per_call(calls, 1)   # warm-up: builds, first touches
                for _ in range(rounds):   # interleaved: a noisy moment hits every variant alike
                    for label, (_, calls) in variants.items():
                        samples[label].append(_seconds_per_call(calls, sweeps[label]))
                read = variants[READ][0] / statistics.median(samples[READ]) / 1e9
                for label, (nbytes, _) in variants.items():
                    median, best = statistics.median(samples[label]), min(samples[label])
                    rows.append({"shape": name, "K": k, "N": n, "threads": t, "variant": label,
                                 "bytes": nbytes, "us": median * 1e6, "best_us": best * 1e6,
                                 "GBps": nbytes / median / 1e9, "best_GBps": nbytes / best / 1e9,
                                 "read_GBps": read})
    finally:
        torch.set_num_threads(before)
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'shape':<8} {'K x N':<11} {'thr':>3} {'variant':<20} {'us':>8} {'GB/s':>6} "
             f"{'of bw':>6} {'best GB/s':>9} {'of bw':>6} {'read bw':>7}"]
    for r in rows:
        lines.append(f"{r['shape']:<8} {r['K']}x{r['N']:<7} {r['threads']:>3} {r['variant']:<20} "
                     f"{r['us']:>8.1f} {r['GBps']:>6.1f} {r['GBps'] / r['read_GBps']:>6.0%} "
                     f"{r['best_GBps']:>9.1f} {r['best_GBps'] / r['read_GBps']:>6.0%} "
                     f"{r['read_GBps']:>7.1f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved samples per variant")
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"some of {list(SHAPES)}")
    parser.add_argument("--working-set-mb", type=int, default=128,
                        help="weight copies cycled per shape: more than the last-level cache")
    args = parser.parse_args(argv)
    shapes = [s for s in args.shapes.split(",") if s]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        parser.error(f"unknown shapes {unknown}; choose from {list(SHAPES)}")
    print(format_table(run([int(t) for t in args.threads.split(",")], args.rounds, shapes,
                           args.working_set_mb)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
