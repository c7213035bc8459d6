"""The W8A8 linear (kernels/w8a8_cpu.py) against fxforge's fp32 linear (the packed oneDNN/MKL path
the CPU backend picks, ``linear_cpu_tuning.tuned_linear``) and fp32 ``torch.mm``, on SmolLM2-135M's
linear shapes at M = 1 (decode), 128 and 512 (prefill), every W8A8 ISA build this CPU has.

    python bench/w8a8.py [--threads 2] [--rounds 9] [--m 1,128,512]

Medians over interleaved rounds (``bench/quant_gemv.time_interleaved``); the W8A8 time includes
the per-row activation quantization (it is inside the kernel call).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from fxforge.kernels import cpu_isa
from fxforge.kernels.linear_cpu_tuning import tuned_linear
from fxforge.kernels.w8a8_cpu import ISA_VARIANTS, W8A8Gemm

sys.path.insert(0, str(Path(__file__).resolve().parent))   # the sibling quant_gemv.py
from quant_gemv import SHAPES, time_interleaved  # noqa: E402

ISA_ENV_OF = {"portable": "none", "avx2": "avx2", "avx512_vnni": "avx512_vnni"}


def _variants() -> list[str]:
    hw = cpu_isa.hardware()
    has = {"portable": True, "avx2": hw.avx2 and hw.fma, "avx512_vnni": hw.avx512_vnni}
    return [v for v in ISA_VARIANTS if has[v]]


def _w8a8(isa: str, codes, scales, smooth) -> W8A8Gemm:
    os.environ[cpu_isa.ISA_ENV] = ISA_ENV_OF[isa]
    try:
        kernel = W8A8Gemm(codes, scales, smooth, None, "none")
    finally:
        del os.environ[cpu_isa.ISA_ENV]
    assert kernel.isa == isa, (kernel.isa, isa)
    return kernel


def bench_shape(k, n, m, threads, rounds, variants, gen):
    w = torch.randn(n, k, generator=gen) * 0.02
    w_kn = w.t().contiguous()
    fp32 = tuned_linear(w.t(), None, "none", False, None, m)
    runners = {"fp32 fxforge": lambda x: fp32(x, None), "fp32 torch.mm": lambda x: torch.mm(x, w_kn)}
    codes = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
    scales = (torch.rand(n, 1, generator=gen) * 0.01).half()
    smooth = torch.rand(k, generator=gen) + 0.5
    for isa in variants:
        if isa == "portable" and m > 1:
            continue   # scalar int32 loops: minutes at M = 512, and no CPU here lacks AVX2
        kernel = _w8a8(isa, codes, scales, smooth)
        runners[f"w8a8 {isa}"] = lambda x, q=kernel: q(x, None, threads)
    medians = time_interleaved(runners, torch.randn(m, k, generator=gen), rounds)
    base = medians["fp32 fxforge"]
    return [(name, t * 1e6, base / t) for name, t in medians.items()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--m", default="1,128,512")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    variants = _variants()
    print(f"CPU: {cpu_isa.hardware().describe()}; {args.threads} threads, torch "
          f"{torch.__version__}; median of {args.rounds} interleaved rounds\n")
    print("| shape (K x N) | M | kernel | us/call | speed vs fp32 fxforge |")
    print("|---|---|---|---|---|")
    for m in map(int, args.m.split(",")):
        for label, k, n in SHAPES:
            for name, us, speed in bench_shape(k, n, m, args.threads, args.rounds, variants, gen):
                print(f"| {label} {k}x{n} | {m} | {name} | {us:.1f} | {speed:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
