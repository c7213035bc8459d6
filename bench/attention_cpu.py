"""Prefill attention on the CPU: fxforge's tiled C++ kernel vs PyTorch's flash kernel vs eager math.

Shapes are those of the models fxforge benches (small GPT: 4 heads of 32; GPT-2 config: 12 of
64; SmolLM2: 9 query heads over 3 k/v heads of 64) at the prefill length, then longer sequences,
causal and not. q/k/v are the strided [B, H, L, D] views of one fused projection, as a compiled
model passes them. Each case is checked against ``F.scaled_dot_product_attention`` once, then
the three are timed alternately for several rounds (``bench/fused_cpu.py``'s sampling) and the
medians reported. ``MAX_KEYS``/``NONCAUSAL_MAX_KEYS`` in ``kernels/attention_cp{p,u}.py`` come
from this table.

    .venv/bin/python bench/attention_cpu.py [--threads 1,2] [--rounds 7] [--json out.json]
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fused_cpu import calibrate, per_call_us, sampled_cli  # noqa: E402

from fxforge.kernels.attention_cpp import kernel_declines, tiled_attention  # noqa: E402
from fxforge.kernels.attention_cpu import flash_attention, math_attention  # noqa: E402
from fxforge.testing import assert_close_to_eager  # noqa: E402

# name: (heads, kv_heads, head_dim, sequence length)
SHAPES = {"small GPT": (4, 4, 32, 128), "GPT-2 config": (12, 12, 64, 128),
          "SmolLM2 (GQA)": (9, 3, 64, 128), "8x64, L=256": (8, 8, 64, 256),
          "8x64, L=512": (8, 8, 64, 512), "8x64, L=1024": (8, 8, 64, 1024)}


def projection_views(heads: int, kv_heads: int, dim: int, length: int):
    qkv = torch.randn(1, length, (heads + 2 * kv_heads) * dim)
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    return tuple(t.unflatten(-1, (-1, dim)).transpose(1, 2) for t in (q, k, v))


def run(threads: list[int], rounds: int, sample_ms: float) -> list[dict]:
    rows = []
    before = torch.get_num_threads()
    try:
        for name, (heads, kv_heads, dim, length) in SHAPES.items():
            q, k, v = projection_views(heads, kv_heads, dim, length)
            assert kernel_declines(q, k, v) is None, kernel_declines(q, k, v)
            gqa = heads != kv_heads
            for causal in (True, False):
                paths = {"tiled": lambda: tiled_attention(q, k, v, is_causal=causal),
                         "flash": lambda: flash_attention(q, k, v, is_causal=causal),
                         "math": lambda: math_attention(q, k, v, is_causal=causal, enable_gqa=gqa)}
                want = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
                for label, fn in paths.items():
                    assert_close_to_eager(fn(), want, f"{name} {label}")
                for n in threads:
                    torch.set_num_threads(n)
                    rows.append({"case": name, "causal": causal, "threads": n,
                                 **_time_paths(paths, rounds, sample_ms)})
    finally:
        torch.set_num_threads(before)
    return rows


def _time_paths(paths: dict, rounds: int, sample_ms: float) -> dict:
    calls = {label: calibrate(fn, (), sample_ms) for label, fn in paths.items()}
    samples: dict[str, list[float]] = {label: [] for label in paths}
    for _ in range(rounds):   # interleaved: a noisy moment hits every path alike
        for label, fn in paths.items():
            samples[label].append(per_call_us(fn, (), calls[label]))
    return {f"{label}_us": statistics.median(s) for label, s in samples.items()}


def format_table(rows: list[dict]) -> str:
    lines = [f"{'case':<16} {'causal':>6} {'thr':>3} {'tiled us':>9} {'flash us':>9} "
             f"{'math us':>9} {'flash/tiled':>11}"]
    for r in rows:
        lines.append(f"{r['case']:<16} {str(r['causal']):>6} {r['threads']:>3} "
                     f"{r['tiled_us']:>9.0f} {r['flash_us']:>9.0f} {r['math_us']:>9.0f} "
                     f"{r['flash_us'] / r['tiled_us']:>10.2f}x")
    return "\n".join(lines)


def main(argv=None) -> int:
    return sampled_cli(__doc__, run, format_table, rounds=7, sample_ms=20.0, argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
