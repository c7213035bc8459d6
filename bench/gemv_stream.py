"""One batch-1 decode token's linears with their weights coming from DRAM, as in a real decode
step: SmolLM2-135M's projections as fxforge compiles them (q/k/v and gate/up merged by
``fuse_projections``: four linears a layer, 30 layers, then the tied LM head), each a weight of
its own, called in order through the kernels' C entry points with prepared arguments (as the
replay loop calls them). ``bench/quant_gemv.py`` times one shape at a time, so its weights sit in
L3; this bench is what a token pays for them.

    python bench/gemv_stream.py [--threads 2] [--rounds 15] [--formats fp32,bf16,int8_channel,int4_g32]

Each round times a few tokens per format, in turn (``quant_gemv.time_interleaved``), and a
torch ``sum`` over as many bytes as the int8 weights (the read bandwidth a decode step can hope
for); medians over rounds.
"""
from __future__ import annotations

import argparse

import torch

from fxforge.kernels import cpu_isa
from fxforge.kernels.gemv_cpu import GemvLinear
from fxforge.kernels.quant_gemv_cpu import QuantGemv

from quant_gemv import _quantized, time_interleaved  # bench/ is on sys.path as a script

LAYER = ((576, 960), (576, 576), (576, 3072), (1536, 576))   # (K, N): qkv, o, gate/up, down
SHAPES = LAYER * 30 + ((576, 49152),)


class Token:
    """Every linear of one token in ``fmt``: ``run()`` calls them in order at M = 1."""

    def __init__(self, fmt: str, threads: int, gen: torch.Generator):
        self.fmt, self.calls = fmt, []
        xs = {k: torch.randn(1, k, generator=gen) for k, _ in SHAPES}
        self._keep = [xs]
        self.nbytes = 0
        for k, n in SHAPES:
            y = torch.empty(1, n)
            if fmt in ("fp32", "bf16"):
                kernel = GemvLinear(torch.randn(n, k, generator=gen), None, "none",
                                    weight_format="bf16" if fmt == "bf16" else "dense")
                args = (xs[k].data_ptr(), k, 1, k, kernel.weight.data_ptr(), int(fmt == "bf16"),
                        n, None, None, 0, 0, y.data_ptr(), threads)
            else:
                kernel = QuantGemv(fmt, *_quantized(fmt, n, k, gen), None, "none")
                args = (xs[k].data_ptr(), k, 1, k, kernel.weight.data_ptr(), kernel.fmt_code,
                        kernel.group, n, None, None, 0, 0, y.data_ptr(), threads)
            self._keep += [kernel, y]
            self.nbytes += kernel.weight.numel() * kernel.weight.element_size()
            self.calls.append((kernel.fn, args))

    def run(self) -> None:
        for fn, args in self.calls:
            fn(*args)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--formats", default="fp32,bf16,int8_channel,int4_g32")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    tokens = [Token(fmt, args.threads, gen) for fmt in args.formats.split(",")]
    buffer = torch.rand(sum(k * n for k, n in SHAPES) // 4)   # the int8 weights' bytes
    runners = {token.fmt: (lambda _x, t=token: t.run()) for token in tokens}
    runners["torch sum"] = lambda _x: buffer.sum()
    medians = time_interleaved(runners, None, args.rounds)
    read = buffer.numel() * 4 / medians["torch sum"]
    print(f"CPU: {cpu_isa.hardware().describe()}; {args.threads} threads, torch {torch.__version__}; "
          f"{len(SHAPES)} linears a token; medians of {args.rounds} interleaved rounds of 5; torch sum "
          f"reads {read / 1e9:.1f} GB/s\n")
    print("| weights | MB a token | ms a token | GB/s | of the sum's GB/s |")
    print("|---|---|---|---|---|")
    for token in tokens:
        seconds = medians[token.fmt]
        rate = token.nbytes / seconds
        print(f"| {token.fmt} | {token.nbytes / 1e6:.0f} | {seconds * 1e3:.2f} | {rate / 1e9:.1f} "
              f"| {rate / read:.0%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
