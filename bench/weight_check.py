"""Per-call cost of the frozen-weight check (``fxforge/weight_sets.py``) on a SmolLM2-135M-shaped
weight list (272 tensors, 513 MB fp32), without loading the model.

    OMP_NUM_THREADS=1 python bench/weight_check.py [--calls 20000]

Reports the CPU time per call of: the check as it runs (identity, version counters, data pointers, sampled
words), each part alone, and the identity-and-version loop fxforge ran before the pointer and
content checks existed. A decode step of this model takes milliseconds, so microseconds here
are what matter.
"""
from __future__ import annotations

import argparse
import time

import torch

from fxforge.weight_sets import SAMPLED_WORDS, FrozenWeights

HIDDEN, INTERMEDIATE, LAYERS, VOCAB, KV = 576, 1536, 30, 49152, 192   # SmolLM2-135M


def smollm2_weights() -> list[torch.Tensor]:
    shapes = [(VOCAB, HIDDEN)]
    for _ in range(LAYERS):
        shapes += [(HIDDEN, HIDDEN), (KV, HIDDEN), (KV, HIDDEN), (HIDDEN, HIDDEN),
                   (INTERMEDIATE, HIDDEN), (INTERMEDIATE, HIDDEN), (HIDDEN, INTERMEDIATE),
                   (HIDDEN,), (HIDDEN,)]
    shapes.append((HIDDEN,))
    return [torch.nn.Parameter(torch.randn(s), requires_grad=False) for s in shapes]


def per_call_us(fn, calls: int) -> float:
    """CPU time of this thread per call (not wall time: waiting for a busy core is not the
    check's cost), best of 5 runs."""
    fn()
    best = float("inf")
    for _ in range(5):
        start = time.thread_time()
        for _ in range(calls):
            fn()
        best = min(best, (time.thread_time() - start) / calls * 1e6)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20000)
    calls = parser.parse_args().calls
    weights = smollm2_weights()
    frozen = FrozenWeights(weights)
    versions = [w._version for w in weights]

    def before():   # the check fxforge ran before: identity and version counter only
        return any(a is not w or a._version != v for a, w, v in zip(weights, weights, versions))

    def check():
        return frozen.holds(weights) and frozen.change(weights) is None

    assert check()
    megabytes = sum(w.numel() * w.element_size() for w in weights) / 2**20
    print(f"{len(weights)} weights, {megabytes:.0f} MB, {SAMPLED_WORDS} sampled words each, "
          f"torch.get_num_threads()={torch.get_num_threads()}")
    rows = [("check per call (as run)", check),
            ("  identity", lambda: frozen.holds(weights)),
            ("  sampled words alone", lambda: frozen._words.first_change()),
            ("identity + version loop (before)", before)]
    for name, fn in rows:
        print(f"{name:36s} {per_call_us(fn, calls):8.1f} us")


if __name__ == "__main__":
    main()
