"""Benchmark fxforge against eager PyTorch and TorchInductor.

    python bench/run.py                         # everything, CPU
    python bench/run.py --quick                 # fewer repeats, shorter sequences
    python bench/run.py --models mlp,small_gpt --compilers eager,fxforge
    python bench/run.py --device cuda --json out.json

Prints per-case timings as they finish, then a table of medians with speedups
(baseline ms / compiler ms), and writes all results as JSON.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sibling harness.py and report.py, however we are launched

import harness  # noqa: E402
import report  # noqa: E402
import torch  # noqa: E402


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=_csv, default=list(harness.MODELS),
                   help=f"comma-separated subset of {','.join(harness.MODELS)}")
    p.add_argument("--compilers", type=_csv, default=list(harness.COMPILERS),
                   help=f"comma-separated subset of {','.join(harness.COMPILERS)}")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per case (default 20, quick 5)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls after compilation (default 3, quick 1)")
    p.add_argument("--seq", type=int, default=None, help="prefill length / decode cache length (default 128, quick 64)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds of timed calls per case before stopping early (default 5, quick 2)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="fewer repeats and shorter sequences")
    p.add_argument("--json", type=Path, default=Path(".bench/results.json"), help="where to write results")
    args = p.parse_args(argv)
    quick = args.quick
    args.repeats = args.repeats or (5 if quick else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if quick else 3)
    args.seq = args.seq or (64 if quick else 128)
    args.budget = args.budget if args.budget is not None else (2.0 if quick else 5.0)
    for m in args.models:
        if m not in harness.MODELS:
            p.error(f"unknown model {m!r}; choose from {','.join(harness.MODELS)}")
    for c in args.compilers:
        if c not in harness.COMPILERS:
            p.error(f"unknown compiler {c!r}; choose from {','.join(harness.COMPILERS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = harness.environment(args.device)
    print(f"torch {env['torch']} on {args.device} ({env['threads']} threads); models={','.join(args.models)} "
          f"compilers={','.join(args.compilers)} seq={args.seq} repeats={args.repeats}", flush=True)
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if args.device == "cpu" and load > 0.5 * cores:
        # An OpenMP barrier waits for its slowest thread: one thread descheduled by
        # another process can slow a small op tenfold. One thread sidesteps that.
        hint = " (try --threads 1)" if torch.get_num_threads() > 1 else ""
        print(f"WARNING: load average {load:.1f} on {cores} cores; timings will be noisy{hint}")
    start = time.perf_counter()
    results = harness.run_all(
        args.models, args.compilers, device=args.device, seq=args.seq, warmup=args.warmup,
        repeats=args.repeats, budget_s=args.budget, log=lambda s: print(s, flush=True),
    )
    elapsed = time.perf_counter() - start
    print()
    print(report.format_table(results, args.compilers))
    print("(speedup = baseline ms / compiler ms, above 1 is faster; '!' = output differs from eager)")
    kernels = report.format_kernels(results)
    if kernels:
        print("\n" + kernels)
    errors = report.format_errors(results)
    if errors:
        print("\nfailures:\n" + errors)
    print(f"\ntotal {elapsed:.0f} s")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "environment": env,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "elapsed_s": elapsed,
        "results": [dataclasses.asdict(r) for r in results],
    }
    args.json.write_text(json.dumps(payload, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
