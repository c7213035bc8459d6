"""The CPU linear's implementations side by side: aten addmm, oneDNN, fxforge's tiled C++ GEMM.

Each is timed as the tuner times it (``LinearCpuTunable``): cycling over copies of the weight
that together exceed the last-level cache, as in a model, where each layer's weight arrives
from memory. The implementations are timed alternately for several rounds (each round a batch
of calls sized to ~``--sample-ms``) and the medians reported, so the noise of this shared
machine hits each alike. Shapes: the linears of the small GPT, the GPT-2/Llama bench configs and
SmolLM2 at a 37-token prompt and a 128-token prefill, and a long 512-row prefill.

    .venv/bin/python bench/linear_cpu.py [--threads 1,2] [--rounds 7] [--json out.json]
"""
from __future__ import annotations

import statistics

import torch

from fxforge.kernels.linear_cpu import (config_for, default_candidate, unavailable_reason)
from fxforge.kernels.linear_cpu_tuning import LinearCpuTunable, linear_task

try:   # run as a script (bench/ on sys.path) or as bench.linear_cpu
    from fused_cpu import calibrate, per_call_us, sampled_cli
except ImportError:  # pragma: no cover
    from bench.fused_cpu import calibrate, per_call_us, sampled_cli

# (name, M, K, N, activation, residual)
SHAPES = [
    ("small GPT qkv", 128, 128, 384, "none", False),
    ("small GPT out proj", 128, 128, 128, "none", True),
    ("small GPT fc + gelu", 128, 128, 512, "gelu", False),
    ("small GPT proj", 128, 512, 128, "none", True),
    ("GPT-2 cfg fc + gelu_tanh", 128, 256, 1024, "gelu_tanh", False),
    ("Llama cfg gate/up", 128, 256, 1408, "none", False),
    ("Llama cfg down", 128, 704, 256, "none", True),
    ("Llama cfg lm head", 128, 256, 8192, "none", False),
    ("SmolLM2 gate/up, 37 rows", 37, 576, 3072, "none", False),
    ("SmolLM2 down, 37 rows", 37, 1536, 576, "none", True),
    ("SmolLM2 qkv, 128 rows", 128, 576, 960, "none", False),
    ("SmolLM2 gate/up, 512 rows", 512, 576, 3072, "none", False),
    ("GPT-2 cfg fc, 256 rows", 256, 256, 1024, "gelu_tanh", False),
    ("small GPT qkv, 512 rows", 512, 128, 384, "none", False),
    ("8 rows, 1024x1024", 8, 1024, 1024, "none", False),
]
IMPLEMENTATIONS = ("aten", "onednn", "tiled")


def run(threads: list[int], rounds: int, sample_ms: float) -> list[dict]:
    rows = []
    before = torch.get_num_threads()
    try:
        for name, m, k, n, activation, residual in SHAPES:
            tunable = LinearCpuTunable(linear_task(m, k, n, torch.float32, activation, True, residual))
            names = [c for c in IMPLEMENTATIONS if unavailable_reason(c, torch.float32) is None]
            for t in threads:
                torch.set_num_threads(t)
                fns = {c: tunable.build(config_for(c, t)) for c in names}
                calls = {c: calibrate(fn, (), sample_ms) for c, fn in fns.items()}
                samples: dict[str, list[float]] = {c: [] for c in names}
                for _ in range(rounds):
                    for c, fn in fns.items():
                        samples[c].append(per_call_us(fn, (), calls[c]))
                row = {"case": name, "M": m, "K": k, "N": n, "threads": t,
                       "default": default_candidate(m, k, n)}
                row.update({f"{c}_us": statistics.median(v) for c, v in samples.items()})
                rows.append(row)
    finally:
        torch.set_num_threads(before)
    return rows


def format_table(rows: list[dict]) -> str:
    head = f"{'case':<28} {'M,K,N':<15} {'thr':>3}" + "".join(f" {c + ' us':>11}" for c in IMPLEMENTATIONS)
    lines = [head + f" {'aten/tiled':>11} {'default':>8}"]
    for r in rows:
        times = "".join(f" {r.get(c + '_us', float('nan')):>11.1f}" for c in IMPLEMENTATIONS)
        ratio = r["aten_us"] / r["tiled_us"] if "tiled_us" in r else float("nan")
        shape = f"{r['M']},{r['K']},{r['N']}"
        lines.append(f"{r['case']:<28} {shape:<15} {r['threads']:>3}"
                     f"{times} {ratio:>10.2f}x {r['default']:>8}")
    return "\n".join(lines)


def main(argv=None) -> int:
    return sampled_cli(__doc__, run, format_table, rounds=7, sample_ms=8.0, argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
