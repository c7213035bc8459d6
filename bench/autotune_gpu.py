"""Autotuner figures on a CUDA GPU (issue 4): the Triton matmul and attention templates.

    python bench/autotune_gpu.py [--json out.json]

For each problem: an exhaustive search (every config that survives pruning, timed with CUDA
events), the guided search (at most ``--max-fraction`` of the space), the two winners re-timed
head to head, and the tuned config's gain over the template's default config. Run by
``make gpu-check``; without CUDA it says so and exits 0.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from fxforge.autotune.measure import measure_interleaved
from fxforge.autotune.search import search
from fxforge.autotune.task import make_tunable


def problems() -> dict:
    from fxforge.kernels.triton_tuning import attention_task, linear_task
    bf16 = torch.bfloat16
    return {
        "matmul 4096^3 bf16": linear_task(4096, 4096, 4096, bf16, "none", False, False, "cuda"),
        "linear+gelu 2048x2048x8192 bf16": linear_task(2048, 2048, 8192, bf16, "gelu", True, False,
                                                       "cuda"),
        "linear 16x4096x4096 bf16 (decode)": linear_task(16, 4096, 4096, bf16, "none", False,
                                                         False, "cuda"),
        "attention (1,16,4096,128) causal bf16": attention_task(1, 16, 16, 4096, 4096, 128, bf16,
                                                                True, device="cuda"),
        "attention (4,32/8 GQA,1024,64) bf16": attention_task(4, 32, 8, 1024, 1024, 64, bf16,
                                                              False, device="cuda"),
    }


def run(max_fraction: float) -> list[dict]:
    rows = []
    for name, task in problems().items():
        tunable = make_tunable(task)
        full = search(tunable, strategy="exhaustive")
        guided = search(tunable, strategy="guided", max_fraction=max_fraction)
        final = measure_interleaved({"exhaustive": tunable.build(full.best),
                                     "guided": tunable.build(guided.best),
                                     "default": tunable.build(full.default)},
                                    device="cuda", rounds=15)
        row = {"problem": name, "space": full.total, "survivors": full.total - full.pruned,
               "exhaustive_measured": full.measured, "guided_measured": guided.measured,
               "exhaustive_best": full.describe(full.best), "guided_best": guided.describe(guided.best),
               "default": full.describe(full.default),
               "guided_over_exhaustive": final["guided"].median / final["exhaustive"].median,
               "tuned_gain_over_default": final["default"].median / final["exhaustive"].median,
               "exhaustive_ms": final["exhaustive"].median * 1e3,
               "exhaustive_s": full.seconds, "guided_s": guided.seconds}
        rows.append(row)
        print(f"{name}: space {row['space']} ({row['survivors']} survive pruning); exhaustive "
              f"{row['exhaustive_measured']} measured in {row['exhaustive_s']:.0f} s -> "
              f"{row['exhaustive_best']} ({row['exhaustive_ms']:.3f} ms); guided "
              f"{row['guided_measured']} ({row['guided_measured'] / row['space']:.0%}) in "
              f"{row['guided_s']:.0f} s -> {row['guided_best']}; guided/exhaustive "
              f"{row['guided_over_exhaustive']:.3f}; tuned vs default "
              f"{row['tuned_gain_over_default']:.2f}x", flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-fraction", type=float, default=0.25)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/autotune_gpu.py: no CUDA device; nothing measured")
        return 0
    print(f"device: {torch.cuda.get_device_name()}", flush=True)
    rows = run(args.max_fraction)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
