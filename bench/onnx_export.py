"""SmolLM2-135M to ONNX: ``fxforge.export_onnx`` against ``torch.onnx.export(dynamo=True)``.

Both export the logits of a prompt with the sequence length dynamic; both files run in ONNX
Runtime's CPU provider at two lengths against eager. ``fxforge.export_onnx`` writes the
optimized graph (fused attention as ONNX's ``Attention``, opset 23) and has run onnx's full
checker and strict shape inference before it writes; torch's file is checked here the same
way. Then the quantized variants (``int8``: QDQ, ``int4:g64``: MatMulNBits) are compiled to
artifacts, exported from them and run against fxforge's own quantized output (and eager, for
the quantization's own error). Run it alone (2 busy cores skew
times)::

    PYTHONSAFEPATH=1 OMP_NUM_THREADS=2 python bench/onnx_export.py
"""
from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

import fxforge
from fxforge.examples.hf_models import LogitsOnly

sys.path.insert(0, str(Path(__file__).resolve().parent))   # the sibling peers.py
from peers import _export as torch_onnx_export  # noqa: E402

SEQ = torch.export.Dim("seq", min=2, max=4096)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def session(path: Path, threads: int):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def logits(sess, ids: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: ids.numpy()})[0])


def compare(sess, model, lengths, vocab: int) -> list[tuple[int, float, float]]:
    """(length, max |ORT - eager|, top-1 agreement) per length."""
    rows = []
    for length in lengths:
        ids = torch.randint(3, vocab, (1, length))
        with torch.no_grad():
            expected = model(ids)
        got = logits(sess, ids)
        agree = (got.argmax(-1) == expected.argmax(-1)).float().mean().item()
        rows.append((length, (got - expected).abs().max().item(), agree))
    return rows


def quantized(model, example, folder: Path, scheme: str, lengths, threads: int, vocab: int):
    """The quantized graph as an artifact (reference backend: fxforge's own quantized output),
    exported from it: ORT against that output (the export's error) and against eager fp32
    (the quantization's)."""
    name = scheme.replace(":", "-")
    artifact, compile_s = timed(lambda: fxforge.aot_compile(
        model, example, folder / f"art-{name}", dynamic_shapes=({1: SEQ},), quantize=scheme,
        backend="reference"))
    path = folder / f"fxforge-{name}.onnx"
    exported, seconds = timed(lambda: fxforge.export_onnx(artifact, path))
    ops = sorted({n.op_type for n in exported.graph.node} & {"DequantizeLinear", "MatMulNBits"})
    print(f"quantize={scheme}: aot_compile {compile_s:.1f} s, export_onnx of the artifact "
          f"{seconds:.1f} s, {path.stat().st_size / 2**20:.0f} MB, {ops}")
    sess = session(path, threads)
    for length in lengths:
        ids = torch.randint(3, vocab, (1, length))
        got, ours = logits(sess, ids), artifact(ids)
        with torch.no_grad():
            eager = model(ids)
        print(f"  {length} tokens: max |ORT - fxforge {scheme}| {(got - ours).abs().max().item():.2e}"
              f" (logits up to {ours.abs().max().item():.1f}); vs eager fp32 "
              f"{(got - eager).abs().max().item():.2e}, top-1 "
              f"{(got.argmax(-1) == eager.argmax(-1)).float().mean().item():.3f}")


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lengths", type=int, nargs=2, default=(17, 96))
    p.add_argument("--no-torch", action="store_true", help="leave torch.onnx.export out")
    args = p.parse_args(argv)
    import onnx
    import onnxruntime
    from fxforge.examples.smollm2 import load_smollm2, smollm2_status
    available, reason = smollm2_status()
    if not available:
        print(f"SmolLM2 not available: {reason}")
        return 0
    torch.set_num_threads(args.threads)
    model = LogitsOnly(load_smollm2(progress=False)[0].eval()).eval()
    vocab = model.model.config.vocab_size
    example = (torch.randint(3, vocab, (1, 32)),)
    folder = Path(tempfile.mkdtemp(prefix="fxforge-onnx-bench-"))
    print(f"CPU: {cpu_model()}; torch {torch.__version__}, onnx {onnx.__version__}, "
          f"onnxruntime {onnxruntime.__version__}, {args.threads} threads; files in {folder}")

    exported, seconds = timed(lambda: fxforge.export_onnx(
        model, folder / "fxforge.onnx", example_inputs=example, dynamic_shapes=({1: SEQ},)))
    ops = {n.op_type for n in exported.graph.node}
    print(f"fxforge.export_onnx: {seconds:.1f} s (capture, passes, conversion, full check, "
          f"strict shape inference, write); {len(exported.graph.node)} nodes; Attention: "
          f"{'Attention' in ops}")
    for length, diff, agree in compare(session(folder / "fxforge.onnx", args.threads), model,
                                       args.lengths, vocab):
        print(f"  fxforge file, {length} tokens: max |logit diff| {diff:.2e}, top-1 {agree:.3f}")

    if not args.no_torch:
        _, seconds = timed(lambda: torch_onnx_export(model, example[0], folder / "torch.onnx", True))
        torch_model = onnx.load(str(folder / "torch.onnx"))
        _, check = timed(lambda: onnx.checker.check_model(torch_model, full_check=True))
        print(f"torch.onnx.export(dynamo=True): {seconds:.1f} s (+ {check:.1f} s full check "
              f"here); {len(torch_model.graph.node)} nodes")
        for length, diff, agree in compare(session(folder / "torch.onnx", args.threads), model,
                                           args.lengths, vocab):
            print(f"  torch file, {length} tokens: max |logit diff| {diff:.2e}, top-1 {agree:.3f}")

    for scheme in ("int8", "int4:g64"):
        quantized(model, example, folder, scheme, args.lengths, args.threads, vocab)
    return 0


if __name__ == "__main__":
    sys.exit(main())
