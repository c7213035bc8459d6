"""Prefill speed on SmolLM2-135M, side by side in one run: the logits of every position of a
batch-1 prompt of 128 and 512 tokens (no KV cache), by

  * ``hf eager`` and ``torch.compile`` (its default backend, inductor);
  * ``fxforge fp32`` and ``fxforge <scheme>`` per quantize scheme (``int8``, ``int4:g32``,
    ``gguf``: the SmolLM2 file's own blocks), each also compiled with ``FXFORGE_CPU_ISA=avx2``
    (``--isa``; on a CPU with AVX-512 that is a forced path, not an AVX2 CPU's speed);
  * ``onnxruntime fp32``: the model exported by ``torch.onnx.export(dynamo=True)`` (the legacy
    exporter when that fails; the bench says which), logits of every position, no cache outputs;
  * ``torchao <scheme>`` with ``--torchao`` (``bench/peers.py``).

    python bench/prefill.py [--lengths 128,512] [--threads 2] [--rounds 5] [--quick]

Every runner is timed once per round, in turn, the order rotated each round, after a pause
(``harness.round_robin``: the worker threads of the runner before stop spinning; interleaved: a
noisy neighbour slows all of them alike); medians of ``--rounds``. Prints each runner's ms and
its speed against ONNX Runtime and against fxforge fp32, each the median of the per-round ratios
with their range (the issue's acceptance: fxforge fp32 >= 1.0x ONNX Runtime; quantized
not slower than fp32). ``--quick``: 32 tokens, 2 rounds, fp32 and int8 only (a smoke run).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import types
from pathlib import Path

import torch

import fxforge
from fxforge.examples.hf_models import LogitsOnly

sys.path.insert(0, str(Path(__file__).resolve().parent))   # the sibling peers.py
from harness import paired, round_robin  # noqa: E402
from peers import TORCHAO_SCHEMES, onnx_runner, torchao_check, torchao_model  # noqa: E402

ISA_ENV = "FXFORGE_CPU_ISA"


@contextlib.contextmanager
def forced_isa(isa: str | None):
    """``FXFORGE_CPU_ISA=isa`` while the block runs (None: as the process was started)."""
    if isa is None:
        yield
        return
    before = os.environ.get(ISA_ENV)
    os.environ[ISA_ENV] = isa
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(ISA_ENV, None)
        else:
            os.environ[ISA_ENV] = before


def fxforge_runner(model, ids, scheme: str, isa: str | None):
    """fxforge compiled for ``ids``' shape (``scheme`` "fp32": no quantization), its kernels
    chosen (and called) under ``FXFORGE_CPU_ISA=isa``."""
    options = {} if scheme == "fp32" else {"quantize": scheme}
    with forced_isa(isa):
        compiled = fxforge.compile(own_code(LogitsOnly)(model), (ids,), **options)

    def run(x):
        with forced_isa(isa):
            return compiled(x)
    return run


def own_code(cls: type) -> type:
    """A subclass of ``cls`` whose ``forward`` is a copy with its own code object. Dynamo caches
    compiled graphs per code object and reuses one for an equal backend (fxforge's is equal for
    equal options), so ``fxforge fp32`` and ``fxforge fp32 [FXFORGE_CPU_ISA=avx2]`` would share
    the graph (and kernels) compiled first; a code object of its own keeps each runner's."""
    forward = cls.forward
    copy = types.FunctionType(forward.__code__.replace(), forward.__globals__, forward.__name__,
                              forward.__defaults__, forward.__closure__)
    return type(cls.__name__, (cls,), {"forward": copy})


def _scheme(name: str) -> str:
    if name != "gguf":
        return name
    from fxforge.examples.smollm2 import gguf_path
    return f"gguf:{gguf_path()}"


def runners(model, ids, args, onnx) -> dict:
    """label -> fn(ids) -> logits, every one run once (compiled) on ``ids``; a runner that
    cannot run here is printed with its reason and left out. Dynamo is reset once per length,
    never between runners: a reset drops the compiled runners' caches, and they would compile
    again (in the timed rounds, or twice per run)."""
    torch._dynamo.reset()
    plain = LogitsOnly(model)
    out = {"hf eager": plain}
    if not args.quick:
        inductor = torch.compile(own_code(LogitsOnly)(model))
        inductor(ids)
        out["torch.compile default"] = inductor
    for isa in [None, *[i for i in args.isa.split(",") if i]]:
        for scheme in ["fp32", *[s for s in args.schemes.split(",") if s]]:
            suffix = f" [{ISA_ENV}={isa}]" if isa else ""
            out[f"fxforge {scheme}{suffix}"] = fxforge_runner(model, ids, _scheme(scheme), isa)
    if onnx is not None:
        out["onnxruntime fp32"] = onnx
    for scheme in [s for s in args.torchao.split(",") if s]:
        module, why = torchao_model(own_code(LogitsOnly)(model), scheme)
        why = why or torchao_check(module, (ids,))
        if why:
            print(f"  torchao {scheme}: cannot run here: {why}", flush=True)
        else:
            out[f"torchao {scheme}"] = module
    return out


def check_logits(runs: dict, ids) -> None:
    """Each runner's largest logit difference from eager's, relative to eager's largest logit."""
    with torch.no_grad():
        ref = runs["hf eager"](ids)
        for label, fn in runs.items():
            got = fn(ids)
            if got.shape != ref.shape:
                print(f"  {label}: logits {list(got.shape)}, eager's {list(ref.shape)}")
                continue
            rel = float((got.float() - ref).abs().max() / ref.abs().max())
            print(f"  {label:<42} max |logit - eager| / max |eager| {rel:.2e}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="128,512")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--schemes", default="int8,int4:g32,gguf", help="fxforge quantize schemes")
    p.add_argument("--isa", default="avx2", help="FXFORGE_CPU_ISA values to add fxforge runs for")
    p.add_argument("--torchao", default="", help="torchao runners (comma-separated: "
                   + ",".join(TORCHAO_SCHEMES) + "; needs torchao)")
    p.add_argument("--no-onnx", action="store_true", help="leave ONNX Runtime out")
    p.add_argument("--quick", action="store_true", help="32 tokens, 2 rounds, fp32 + int8")
    args = p.parse_args(argv)
    if args.quick:
        args.lengths, args.rounds, args.schemes, args.isa = "32", 2, "int8", ""
    from fxforge.examples.smollm2 import load_smollm2, smollm2_status
    from fxforge.kernels.cpu_isa import cpu_features
    available, reason = smollm2_status()
    if not available:
        print(f"SmolLM2 unavailable: {reason}", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    model = load_smollm2(progress=False)[0].eval()
    print(f"SmolLM2-135M prefill, batch 1, logits of every position; {cpu_features().describe()}; "
          f"{args.threads} threads; medians of {args.rounds} interleaved rounds", flush=True)
    lengths = [int(n) for n in args.lengths.split(",")]
    onnx = None
    with torch.no_grad():
        if not args.no_onnx:
            first = torch.randint(3, 30000, (1, lengths[0]))
            onnx, why, how = onnx_runner(LogitsOnly(model), first, args.threads,
                                         Path(".bench/onnx/smollm2"))
            print(f"  onnxruntime: {how or 'skipped: ' + why}", flush=True)
        for length in lengths:
            ids = torch.randint(3, 30000, (1, length), generator=torch.Generator().manual_seed(0))
            runs = runners(model, ids, args, onnx)
            check_logits(runs, ids)
            report(length, round_robin(runs, (ids,), args.rounds))
    return 0


def report(length: int, times: dict) -> None:
    """Each runner's median ms, and its speed against ONNX Runtime and against fxforge fp32 of
    the same ISA, as medians of per-round ratios with their range."""
    ort, fp32 = "onnxruntime fp32", "fxforge fp32"
    print(f"\n| {length} tokens | ms (median) | vs onnxruntime | vs fxforge fp32 (same ISA) |")
    print("|---|---|---|---|")
    for label, ms in times.items():
        isa = label[label.index(" ["):] if " [" in label else ""
        base = f"{fp32}{isa}" if f"{fp32}{isa}" in times else fp32
        vs_ort = paired(times, label, ort) if ort in times else "-"
        vs_fp32 = paired(times, label, base) if base in times and label.startswith("fxforge") else "-"
        print(f"| {label} | {statistics.median(ms):.1f} | {vs_ort} | {vs_fp32} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
