"""Decode step time at two positions for every written form of attention, under ``kv_cache``.

    python bench/attention_forms.py [--positions 24,400] [--rounds 21] [--forms a,b]

Each form (``fxforge.examples.attention_forms``: one block, batch 1) runs the user's loop (the
whole sequence every call) compiled with ``kv_cache=True``. Two sequences are decoded side by
side, one from each position, one token per call, alternating (interleaved: a noisy moment of a
shared machine slows both alike); the table gives each one's median step time and their ratio.
With the cache a step costs one token wherever it is (target: ratio <= 1.5); eager, which
recomputes the whole sequence, is timed the same way for contrast.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from fxforge.compiler import recording
from fxforge.examples.attention_forms import FORMS, VOCAB, make_model
from fxforge.kernels.cpu_isa import cpu_features

TARGET = 1.5


def _timed(fn, ids: torch.Tensor) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    logits = fn(ids)
    return time.perf_counter() - start, torch.cat([ids, logits[:, -1:].argmax(-1)], 1)


def interleaved_steps(fn, prompts: list[torch.Tensor], rounds: int) -> list[float]:
    """Median time of one step of each sequence (after an untimed call on each prompt)."""
    sequences = [_timed(fn, p)[1] for p in prompts]
    times: list[list[float]] = [[] for _ in prompts]
    for _ in range(rounds):
        for i, ids in enumerate(sequences):
            elapsed, sequences[i] = _timed(fn, ids)
            times[i].append(elapsed)
    return [statistics.median(t) for t in times]


def bench_form(form: str, positions: list[int], rounds: int) -> dict:
    torch._dynamo.reset()
    model = make_model(form)
    compiled = torch.compile(model, backend="fxforge", options={"kv_cache": True, "max_seq_len": 512})
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, VOCAB, (1, p - 1), generator=gen) for p in positions]
    with torch.no_grad(), recording() as graphs:
        _timed(compiled, prompts[0][:, :4])   # dynamo: the static graph, then the dynamic one
        _timed(compiled, prompts[0][:, :5])
        cached = interleaved_steps(compiled, prompts, rounds)
        eager = interleaved_steps(model, prompts, rounds)
    decoders = [g.kv for g in graphs if g.kv is not None]
    steps = sum(d.stats["steps"] for d in decoders)
    return {"form": form, "cached": cached, "eager": eager, "steps": steps,
            "fused": sum(s.counts.get("attention_fused", 0) for g in graphs
                         for s in g.ir.info["passes"] if s.name == "fuse_attention")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--positions", default="24,400")
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--forms", default=",".join(FORMS))
    args = parser.parse_args(argv)
    positions = [int(p) for p in args.positions.split(",")]
    if len(positions) != 2 or max(positions) + args.rounds + 1 > 512:
        parser.error("--positions takes two positions; the last plus --rounds must stay below 512")
    first, last = positions
    print(f"CPU: {cpu_features().describe()}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"median decode step (ms), batch 1, {args.rounds} interleaved steps per position")
    print(f"| form | fused | cached steps | kv_cache @{first} | kv_cache @{last} | ratio | "
          f"eager @{first} | eager @{last} | eager ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    worst = 0.0
    for form in args.forms.split(","):
        r = bench_form(form, positions, args.rounds)
        (c0, c1), (e0, e1) = r["cached"], r["eager"]
        worst = max(worst, c1 / c0)
        print(f"| {form} | {r['fused']} | {r['steps']} | {c0 * 1e3:.3f} | {c1 * 1e3:.3f} | "
              f"{c1 / c0:.2f} | {e0 * 1e3:.3f} | {e1 * 1e3:.3f} | {e1 / e0:.2f} |", flush=True)
    print(f"worst kv_cache ratio {worst:.2f} (target <= {TARGET})")
    return 0 if worst <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
