"""Quantized weight-only GEMV (kernels/quant_gemv_cpu.py) against the fp32 and bf16 GEMV on
SmolLM2-135M's linear shapes, every ISA variant this CPU has; and M = 128 (prefill): the
quantized kernel's GEMM path (the tiled GEMM dequantizing as it goes), its GEMV path forced,
fp32 ``torch.mm`` and the fp32 tiled GEMM.

    python bench/quant_gemv.py [--threads 2] [--rounds 15] [--m 1,128] [--formats int8_channel,...]

Time per call is the median over interleaved rounds (each round runs every kernel of a shape
for a short block of calls, so a noisy moment of a shared machine slows all alike). GB/s is the
bytes of weight the kernel reads (its pack: codes, scales and offsets) per second.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from fxforge.kernels import cpu_isa, quant_gemv_cpu
from fxforge.kernels.gemm_cpu import TiledLinear
from fxforge.kernels.gemv_cpu import GemvLinear
from fxforge.kernels.quant_gemv_cpu import QUANT_FORMATS, QuantGemv, quant_format

# (name, K, N): SmolLM2-135M (hidden 576, 3 KV heads x 64, MLP 1536, vocab 49152)
SHAPES = (("q/o proj", 576, 576), ("k/v proj", 576, 192), ("gate/up", 576, 1536),
          ("down", 1536, 576), ("lm head", 576, 49152))
BLOCK = 5
ISA_ENV_OF = {"portable": "none", "avx2": "avx2", "avx512": "avx512"}


def _variants() -> list[str]:
    hw = cpu_isa.hardware()
    has = {"portable": True, "avx2": hw.avx2 and hw.fma,
           "avx512": hw.avx512f and quant_gemv_cpu._avx512_bw_vl_dq()}
    return [v for v in quant_gemv_cpu.ISA_VARIANTS if has[v]]


def _quantized(fmt: str, n: int, k: int, gen: torch.Generator):
    f = quant_format(fmt)
    groups = k // (f.group or k)
    codes = (torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=gen) if f.int4
             else torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=gen))
    scales = (torch.rand(n, groups, generator=gen) * 0.01).half()
    offsets = (torch.randn(n, groups, generator=gen) * 0.01).half() if f.int4 else None
    return codes, scales, offsets


def _kernel(fmt, isa, weights):
    os.environ[cpu_isa.ISA_ENV] = ISA_ENV_OF[isa]
    try:
        kernel = QuantGemv(fmt, *weights, None, "none")
    finally:
        del os.environ[cpu_isa.ISA_ENV]
    assert kernel.isa == isa
    return kernel


def _forced(kernel, threads, gemm_min_m):
    """The kernel with its large-M path forced (None: GEMV tiles, 1: the dequantizing GEMM): the
    comparison behind quant_gemv_cpu.GEMM_MIN_M."""
    def run(x):
        kernel.gemm_min_m = gemm_min_m
        return kernel(x, None, threads)
    return run


def time_interleaved(runners: dict, x: torch.Tensor, rounds: int) -> dict[str, float]:
    for fn in runners.values():          # warm-up: builds, page faults, caches
        for _ in range(2):
            fn(x)
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, fn in runners.items():
            start = time.perf_counter()
            for _ in range(BLOCK):
                fn(x)
            times[name].append((time.perf_counter() - start) / BLOCK)
    return {name: statistics.median(t) for name, t in times.items()}


def bench_shape(label, k, n, m, threads, rounds, variants, gen, formats=QUANT_FORMATS):
    w = torch.randn(n, k, generator=gen) * 0.02
    runners, nbytes = {}, {}
    if m == 1:
        runners["fp32 GemvLinear"] = lambda x, g=GemvLinear(w, None, "none"): g(x, None, threads)
        runners["bf16 GemvLinear"] = lambda x, g=GemvLinear(w, None, "none", weight_format="bf16"): \
            g(x, None, threads)
        nbytes.update({"fp32 GemvLinear": 4 * n * k, "bf16 GemvLinear": 2 * n * k})
    else:
        w_kn = w.t().contiguous()
        runners["fp32 torch.mm"] = lambda x: torch.mm(x, w_kn)
        # the fp32 GEMM fxforge runs a dense prefill on (the quantized GEMM is the same kernel)
        runners["fp32 tiled"] = lambda x, t=TiledLinear(w, None, "none"): t(x, None, threads)
        nbytes["fp32 torch.mm"] = nbytes["fp32 tiled"] = 4 * n * k
    for fmt in formats:
        if k % (quant_format(fmt).group or k):
            continue   # e.g. int4_g128 on K=576: the group must divide K (said under the table)
        weights = _quantized(fmt, n, k, gen)
        for isa in variants:
            kernel = _kernel(fmt, isa, weights)
            if m > 1 and isa == "portable":
                continue   # its GEMV tiles take 6-15x the GEMM's time: not worth the minutes
            name = f"{fmt} {isa}"
            nbytes[name] = kernel.weight.numel()
            if m == 1:
                runners[name] = lambda x, q=kernel: q(x, None, threads)
            else:
                runners[name + " GEMM"] = _forced(kernel, threads, 1)
                runners[name + " GEMV"] = _forced(kernel, threads, None)
                nbytes[name + " GEMM"] = nbytes[name + " GEMV"] = nbytes.pop(name)
    x = torch.randn(m, k, generator=gen)
    medians = time_interleaved(runners, x, rounds)
    base = medians["fp32 GemvLinear" if m == 1 else "fp32 tiled"]
    return [(label, k, n, m, name, t * 1e6, nbytes[name] / t / 1e9, base / t)
            for name, t in medians.items()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--m", default="1,128", help="rows per call (1: decode; more: prefill)")
    ap.add_argument("--formats", default=",".join(QUANT_FORMATS))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    variants = _variants()
    print(f"CPU: {cpu_isa.hardware().describe()}; {args.threads} threads, torch "
          f"{torch.__version__}; median of {args.rounds} interleaved rounds of {BLOCK} calls\n")
    print("| shape (K x N) | M | kernel | us/call | weight GB/s | speed vs fp32 |")
    print("|---|---|---|---|---|---|")
    for m in (int(v) for v in args.m.split(",")):
        for label, k, n in SHAPES:
            if m > 1 and label == "lm head":
                continue   # prefill computes logits of the last position only
            for row in bench_shape(label, k, n, m, args.threads, args.rounds, variants, gen,
                                   args.formats.split(",")):
                print(f"| {row[0]} {row[1]}x{row[2]} | {row[3]} | {row[4]} | {row[5]:.1f} | "
                      f"{row[6]:.1f} | {row[7]:.2f}x |", flush=True)
    print("\nFormats whose group does not divide K are left out (int4_g128 needs K % 128 == 0).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
