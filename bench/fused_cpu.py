"""Eager op-by-op vs the generated C++ fusion kernel, on typical transformer fusion groups.

Each group is traced the way the tests build them (``make_fx`` with fxforge's decomposition
table, symbolic shapes), compiled with ``compile_fused_cpu`` and checked against eager once.
Timing: for each thread count, eager and fused are timed alternately for several rounds (each
round a batch of calls sized to ~``--sample-ms``), and the medians of the per-call times are
reported, so the noise of this shared machine hits both sides alike.

    .venv/bin/python bench/fused_cpu.py [--threads 1,2] [--rounds 9] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

from fxforge.irgraph import decomposition_table
from fxforge.kernels.fused_cpp import compile_fused_cpu
from fxforge.testing import assert_close_to_eager


def residual_layer_norm(width: int):
    def fn(x, r, w, b):   # a literal normalized_shape: no size read inside the group
        return F.layer_norm(x + r, (width,), w, b, 1e-5)
    return fn


def hf_rms_norm(x, w):
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    return w * (h * torch.rsqrt(variance + 1e-6)).to(w.dtype)


def gelu_new(x):
    return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * (x + 0.044715 * torch.pow(x, 3.0))))


def silu_mul(gate, up):
    return F.silu(gate) * up


def masked_softmax(scores, mask):
    return torch.softmax(scores * 0.125 + mask, -1)


def _causal_mask(n: int) -> torch.Tensor:
    return torch.full((n, n), float("-inf")).triu(1)[None, None]


CASES = {
    "residual+LayerNorm [128,256]": (residual_layer_norm(256), lambda: (
        torch.randn(128, 256), torch.randn(128, 256), torch.randn(256), torch.randn(256))),
    "residual+LayerNorm [128,768]": (residual_layer_norm(768), lambda: (
        torch.randn(128, 768), torch.randn(128, 768), torch.randn(768), torch.randn(768))),
    "HF RMSNorm [128,256]": (hf_rms_norm, lambda: (torch.randn(128, 256), torch.randn(256))),
    "GELU(erf) [128,1024]": (F.gelu, lambda: (torch.randn(128, 1024),)),
    "gelu_new(tanh) [128,1024]": (gelu_new, lambda: (torch.randn(128, 1024),)),
    "SiLU*mul [128,704]": (silu_mul, lambda: (torch.randn(128, 704), torch.randn(128, 704))),
    "masked softmax [4,128,128]": (masked_softmax, lambda: (
        torch.randn(4, 128, 128) * 3, _causal_mask(128))),
}


def build(fn, inputs):
    gm = make_fx(fn, decomposition_table=decomposition_table(), tracing_mode="symbolic")(*inputs)
    kernel = compile_fused_cpu(gm)
    got = kernel(*inputs)
    want = fn(*inputs)
    assert_close_to_eager(list(got), list(want) if isinstance(want, tuple) else [want])
    return kernel


def per_call_us(fn, inputs, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn(*inputs)
    return (time.perf_counter() - start) / calls * 1e6


def calibrate(fn, inputs, sample_ms: float) -> int:
    """Calls per sample so that one sample lasts about ``sample_ms``."""
    for _ in range(3):
        fn(*inputs)
    once = per_call_us(fn, inputs, 5)
    return max(3, int(sample_ms * 1e3 / max(once, 1e-3)))


def time_pair(eager, fused, inputs, rounds: int, sample_ms: float) -> tuple[float, float]:
    eager_calls = calibrate(eager, inputs, sample_ms)
    fused_calls = calibrate(fused, inputs, sample_ms)
    eager_us, fused_us = [], []
    for _ in range(rounds):   # interleaved: a noisy moment hits both sides
        eager_us.append(per_call_us(eager, inputs, eager_calls))
        fused_us.append(per_call_us(fused, inputs, fused_calls))
    return statistics.median(eager_us), statistics.median(fused_us)


def run(threads: list[int], rounds: int, sample_ms: float) -> list[dict]:
    rows = []
    before = torch.get_num_threads()
    try:
        for name, (fn, make_inputs) in CASES.items():
            inputs = make_inputs()
            kernel = build(fn, inputs)
            for n in threads:
                torch.set_num_threads(n)
                eager_us, fused_us = time_pair(fn, kernel, inputs, rounds, sample_ms)
                rows.append({"case": name, "threads": n, "eager_us": eager_us,
                             "fused_us": fused_us, "eager_over_fused": eager_us / fused_us})
    finally:
        torch.set_num_threads(before)
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'case':<30} {'thr':>3} {'eager us':>10} {'fused us':>10} {'eager/fused':>12}"]
    for r in rows:
        lines.append(f"{r['case']:<30} {r['threads']:>3} {r['eager_us']:>10.1f} "
                     f"{r['fused_us']:>10.1f} {r['eager_over_fused']:>11.2f}x")
    return "\n".join(lines)


def sampled_cli(doc: str, run, format_table, rounds: int, sample_ms: float, argv=None) -> int:
    """The command line both sampled CPU benches share: thread counts, rounds, sample length,
    an optional JSON file; ``run(threads, rounds, sample_ms)`` makes the rows."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--rounds", type=int, default=rounds, help="interleaved samples per side")
    parser.add_argument("--sample-ms", type=float, default=sample_ms, help="length of one sample")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    rows = run([int(t) for t in args.threads.split(",")], args.rounds, args.sample_ms)
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


def main(argv=None) -> int:
    return sampled_cli(__doc__, run, format_table, rounds=9, sample_ms=6.0, argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
