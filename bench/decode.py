"""Decode step time against the position: the KV cache makes a step cost one token.

    python bench/decode.py [--positions 32,512] [--steps 16] [--rounds 5]

The small GPT (4 layers, 1024 positions) runs the classic generation loop (the whole sequence
every call). For each starting position P: eager without a cache, and fxforge with
``kv_cache=True`` (transparent mode) after a prefill of P tokens; the median time of one step
over ``--steps`` consecutive steps, in ``--rounds`` rounds. Reports step time at the last
position over step time at the first (the issue's target: at most 1.3 with the cache).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from fxforge.examples.small_gpt import make_model


def step_times(fn, prompt: torch.Tensor, steps: int) -> list[float]:
    """Times of ``steps`` loop iterations after a first (untimed) call on ``prompt``."""
    ids = prompt
    logits = fn(ids)
    times = []
    for _ in range(steps):
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], 1)
        start = time.perf_counter()
        logits = fn(ids)
        times.append(time.perf_counter() - start)
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--positions", default="32,512")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    positions = [int(p) for p in args.positions.split(",")]
    model = make_model(block_size=1024).eval()
    compiled = torch.compile(model, backend="fxforge",
                             options={"kv_cache": True, "max_seq_len": 1024})
    runners = {"eager (no cache)": model, "fxforge kv_cache": compiled}
    gen = torch.Generator().manual_seed(0)
    prompts = {p: torch.randint(0, 512, (1, p), generator=gen) for p in positions}
    results: dict[str, dict[int, float]] = {name: {} for name in runners}
    with torch.no_grad():
        step_times(compiled, prompts[positions[0]][:, :-1], 2)   # compile: static + dynamic
        for name, fn in runners.items():
            for p in positions:
                samples = [statistics.median(step_times(fn, prompts[p], args.steps))
                           for _ in range(args.rounds)]
                results[name][p] = statistics.median(samples)
    print(f"torch threads {torch.get_num_threads()}; small GPT, batch 1, median step time (ms)")
    first, last = positions[0], positions[-1]
    for name, by_pos in results.items():
        cells = "  ".join(f"pos {p}: {t * 1e3:7.3f}" for p, t in by_pos.items())
        print(f"{name:<18} {cells}   ratio {last}/{first}: {by_pos[last] / by_pos[first]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
