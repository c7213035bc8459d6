"""Autotuner figures (issue 4): search quality and the warm-cache compile.

    python bench/autotune.py search      # guided vs exhaustive search on real kernels
    python bench/autotune.py warm-cache  # compile with autotune=True: cold cache, then warm

``search``: for each kernel, an exhaustive search (every surviving config measured) and the
guided search (cost-model seeds + local search, at most ``--max-fraction`` of the space), then
the two winners re-timed head to head (interleaved, medians): the guided winner's time over
the exhaustive winner's, and the fraction of the space each measured.

``warm-cache``: two fresh processes compile and run the same model with ``autotune=True`` on
the same, initially empty ``FXFORGE_CACHE_DIR`` (tuning configs and generated-kernel binaries):
the first tunes and builds everything, the second must measure nothing; their compile times
(torch.compile's first call) and the ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

from fxforge.autotune.measure import measure_interleaved
from fxforge.autotune.search import search
from fxforge.autotune.task import make_tunable
from fxforge.irgraph import decomposition_table
from fxforge.kernels.fused import build_program
from fxforge.kernels.fused_cpp_tuning import example_shapes, fused_task
from fxforge.kernels.linear_cpu_tuning import linear_task


def _group_task(fn, *inputs):
    gm = make_fx(fn, decomposition_table=decomposition_table(), tracing_mode="symbolic")(*inputs)
    program = build_program(gm)
    return fused_task(program, example_shapes(program, gm))


def kernels() -> dict:
    """Kernels with the shapes of the bench models' prefill (128 tokens)."""
    def residual_ln(x, r, w, b):
        return F.layer_norm(x + r, (768,), w, b, 1e-5)

    def masked_softmax(scores, mask):
        return torch.softmax(scores * 0.125 + mask, -1)

    def swiglu(gate, up):
        return F.silu(gate) * up
    mask = torch.full((128, 128), float("-inf")).triu(1)[None, None]
    return {
        "residual+LayerNorm [128,768]": _group_task(residual_ln, torch.randn(128, 768),
                                                    torch.randn(128, 768), torch.randn(768),
                                                    torch.randn(768)),
        "masked softmax [12,128,128]": _group_task(masked_softmax, torch.randn(1, 12, 128, 128), mask),
        "SiLU*mul [128,1536]": _group_task(swiglu, torch.randn(128, 1536), torch.randn(128, 1536)),
        "linear gelu 128x768x3072": linear_task(128, 768, 3072, torch.float32, "gelu", True, False),
        "linear 1x576x1536 (decode)": linear_task(1, 576, 1536, torch.float32, "none", False, False),
    }


def search_quality(max_fraction: float, rounds: int) -> list[dict]:
    rows = []
    for name, task in kernels().items():
        tunable = make_tunable(task)
        full = search(tunable, strategy="exhaustive", rounds=rounds)
        guided = search(tunable, strategy="guided", max_fraction=max_fraction, rounds=rounds)
        pair = {"exhaustive": full.best, "guided": guided.best}
        runnables = {k: tunable.build(c) for k, c in pair.items()}
        final = measure_interleaved(runnables, rounds=max(rounds, 15))
        rows.append({"kernel": name, "space": full.total,
                     "exhaustive_measured": full.measured, "guided_measured": guided.measured,
                     "guided_strategy": guided.strategy,
                     "exhaustive_best": full.describe(full.best),
                     "guided_best": guided.describe(guided.best),
                     "default": full.describe(full.default),
                     "guided_over_exhaustive": final["guided"].median / final["exhaustive"].median,
                     "tuned_gain_over_default": full.gain,
                     "exhaustive_s": full.seconds, "guided_s": guided.seconds})
        r = rows[-1]
        print(f"{name:<30} space {r['space']:>3}  exhaustive {r['exhaustive_measured']:>3} "
              f"({r['exhaustive_s']:.1f} s) -> {r['exhaustive_best']}  |  {r['guided_strategy']} "
              f"{r['guided_measured']:>2} ({r['guided_measured'] / r['space']:.0%}, "
              f"{r['guided_s']:.1f} s) -> {r['guided_best']}  |  guided/exhaustive time "
              f"{r['guided_over_exhaustive']:.3f}  |  best vs default {r['tuned_gain_over_default']:.2f}x",
              flush=True)
    return rows


_CHILD = """
import time, torch, sys
from fxforge.autotune import session as s
import fxforge.compiler as c
model_name = sys.argv[1]
sys.path.insert(0, "bench")
import harness
case = harness.MODELS[model_name](128)[0]
start = time.perf_counter()
with c.recording() as graphs, torch.no_grad():
    torch.compile(case.module, backend="fxforge", options={"autotune": True})(*case.inputs)
seconds = time.perf_counter() - start
picks = [p for g in graphs for p in g.tuning]
print("RESULT", seconds, sum(p.source == "tuned" for p in picks), sum(p.source == "cache" for p in picks),
      sum(g.compile_seconds for g in graphs))
"""


def warm_cache(model: str) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "FXFORGE_CACHE_DIR": cache}
        runs = []
        for _ in range(2):
            done = subprocess.run([sys.executable, "-c", _CHILD, model], env=env, text=True,
                                  capture_output=True, timeout=3600)
            line = [l for l in done.stdout.splitlines() if l.startswith("RESULT")]
            if done.returncode != 0 or not line:
                raise RuntimeError(f"child failed: {done.stderr[-2000:]}")
            _, seconds, tuned, cached, own = line[0].split()
            runs.append((float(seconds), int(tuned), int(cached), float(own)))
    (cold, tuned, _, cold_own), (warm, retuned, hits, warm_own) = runs
    row = {"model": model, "cold_compile_s": cold, "kernels_tuned": tuned,
           "warm_compile_s": warm, "warm_tuned": retuned, "warm_cache_hits": hits,
           "speedup": cold / warm, "cold_fxforge_s": cold_own, "warm_fxforge_s": warm_own,
           "fxforge_speedup": cold_own / warm_own}
    print(f"{model}: torch.compile first call: cold cache {cold:.1f} s ({tuned} kernels tuned), "
          f"warm cache {warm:.1f} s ({hits} from the cache, {retuned} tuned): {cold / warm:.1f}x "
          f"faster; fxforge's part (passes + lowering + tuning): {cold_own:.2f} s -> "
          f"{warm_own:.2f} s, {cold_own / warm_own:.1f}x", flush=True)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("search", "warm-cache", "all"))
    parser.add_argument("--max-fraction", type=float, default=0.25)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--models", default="small_gpt,gpt2", help="for warm-cache")
    parser.add_argument("--json", help="write the rows here too")
    args = parser.parse_args(argv)
    print(f"torch threads {torch.get_num_threads()}", flush=True)
    out = {}
    if args.what in ("search", "all"):
        out["search"] = search_quality(args.max_fraction, args.rounds)
    if args.what in ("warm-cache", "all"):
        out["warm_cache"] = [warm_cache(m) for m in args.models.split(",")]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
