"""The accuracy cost of fxforge's weight-only quantization on the real SmolLM2-135M, per scheme.

    python bench/quant_accuracy.py                                  # 8 windows x 512 tokens
    python bench/quant_accuracy.py --schemes int8,int4:g64:rtn,int4:g64 --windows 2 --window-len 256
    python bench/quant_accuracy.py --minilm                         # the encoder: embedding cosine

Perplexity over fixed non-overlapping windows of CPython's ``pydoc_data.topics`` (the first
``windows x window-len`` tokens), the mean next-token KL divergence against eager fp32, top-1
agreement, the weight bytes the linears read per token, and each variant's compile seconds.
Every variant is compiled by fxforge (the cpu backend: the quantized GEMV and its prefill path
run on the real weights). ``:rtn`` is round to nearest (the default), ``:mse`` the clip search
(``passes/quantize_math.py``), ``:gptq`` GPTQ (``passes/gptq.py``) calibrated on one more window
of the same text, after the scored ones (never on scored text); ``w8a8`` (activations in int8
too, ``passes/smoothquant.py``) calibrates its smoothing and outlier guard on that window as well.

Peers: ``--torchao`` adds torchao's int8 weight-only, int4 weight-only (group 64) and W8A8
rows on the same windows (``bench/peers.py`` says which torchao configs run on a CPU).

Caveat: SmolLM2's released weights sit on a 4-bit group-32 grid (the package ships Q4_1), which
flatters int4 g32; g64 and g128 are the informative rows. Writes ``--json``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import fxforge
from fxforge.compiler import recording
from fxforge.examples.hf_models import LogitsOnly

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling accuracy.py
from accuracy import (linear_shapes, next_token_kl, run_windows, score,  # noqa: E402
                      smollm2_windows)

DEFAULT_SCHEMES = ("int8,int8:gptq,int4:g32,int4:g32:mse,int4:g32:gptq,int4:g64,int4:g64:mse,"
                   "int4:g64:gptq,int4:g128,int4:g128:gptq,w8a8,w8a8:noguard,w8a8:nosmooth:noguard")


def linear_bytes(graphs) -> int:
    """Bytes of weights (codes, scales, offsets) the linears of the compiled graphs hold."""
    return sum(int(k * n * bits / 8) for _, k, n, bits in linear_shapes(graphs))


def run_variant(model, windows, calibration, scheme):
    """Compiled on ``calibration`` (a window after the scored ones: gptq calibrates on the
    compile's example and must not see the text it is scored on), then run on ``windows``."""
    torch._dynamo.reset()
    options = {"quantize": scheme} if scheme != "fp32" else {}
    start = time.perf_counter()
    with recording() as graphs:
        compiled = fxforge.compile(LogitsOnly(model), (calibration,), **options)
        logits, first_s = run_windows(compiled, windows)
    if len(graphs) != 1:
        raise RuntimeError(f"{scheme}: {len(graphs)} graphs compiled; a recompile on a scored "
                           "window would calibrate on it")
    return logits, first_s, linear_bytes(graphs), time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--schemes", default=DEFAULT_SCHEMES)
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--window-len", type=int, default=512)
    p.add_argument("--torchao", default="int8wo,int4wo:g64,w8a8", help="torchao peer rows "
                   "(bench/peers.py; eager, on the same windows; '' for none)")
    p.add_argument("--json", default=".bench/quant_accuracy.json")
    p.add_argument("--minilm", action="store_true", help="the MiniLM encoder's embedding cosine "
                   "instead of SmolLM2's perplexity")
    args = p.parse_args(argv)
    if args.minilm:
        return minilm_main(args)
    loaded = smollm2_windows(args.windows, args.window_len)
    if loaded is None:
        return 1
    model, windows, calibration = loaded
    from fxforge.kernels.cpu_isa import cpu_features
    print(f"SmolLM2-135M-Instruct, {args.windows} x {args.window_len} tokens of pydoc_data.topics; "
          f"{cpu_features().describe()}; {torch.get_num_threads()} threads", flush=True)
    rows = []
    with torch.inference_mode():
        eager, _ = run_windows(LogitsOnly(model), windows)
        for scheme in ["fp32", *[s for s in args.schemes.split(",") if s]]:
            logits, first_s, nbytes, seconds = run_variant(model, windows, calibration, scheme)
            row = {"scheme": f"fxforge {scheme}", "linear_MB": nbytes / 1e6,
                   "kl_vs_fp32": next_token_kl(logits, eager), "compile_and_run_s": seconds,
                   **score(logits, windows, eager)}
            rows.append(row)
            print(f"{row['scheme']:<24} ppl {row['perplexity']:8.3f}  KL {row['kl_vs_fp32']:.5f}  "
                  f"top-1 {row['top1_agreement']:.2%}  linears {row['linear_MB']:7.1f} MB  "
                  f"{seconds:6.1f} s", flush=True)
        rows += torchao_rows(model, windows, eager, [s for s in args.torchao.split(",") if s])
    base = rows[0]["perplexity"]
    print("\n| scheme | perplexity | Δ vs fp32 | mean next-token KL | top-1 agree | linear weights MB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['scheme']} | {r['perplexity']:.3f} | {100 * (r['perplexity'] / base - 1):+.2f}% | "
              f"{r['kl_vs_fp32']:.5f} | {r['top1_agreement']:.2%} | "
              f"{'-' if r['linear_MB'] is None else format(r['linear_MB'], '.1f')} |")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": "SmolLM2-135M-Instruct", "text": "pydoc_data.topics",
                               "windows": args.windows, "window_len": args.window_len,
                               "cpu": cpu_features().describe(), "rows": rows}, indent=2))
    return 0


def torchao_rows(model, windows, eager, schemes) -> list[dict]:
    """The torchao peers on the same windows (``bench/peers.py``; run eagerly: the same
    numbers as compiled, without the compile); a scheme that cannot run here is printed with
    its error. Bytes: not counted (torchao's tensor subclasses hold them), shown as -."""
    from peers import torchao_model
    rows = []
    for scheme in schemes:
        start = time.perf_counter()
        quantized, why = torchao_model(LogitsOnly(model), scheme, compile=False)
        if quantized is None:
            print(f"torchao {scheme}: cannot run here: {why}", flush=True)
            continue
        try:
            logits, _ = run_windows(quantized, windows)
        except Exception as exc:   # a config this CPU/build cannot run: reported, not a crash
            print(f"torchao {scheme}: cannot run here: {type(exc).__name__}: {exc}", flush=True)
            continue
        rows.append({"scheme": f"torchao {scheme}", "linear_MB": None,
                     "kl_vs_fp32": next_token_kl(logits, eager),
                     "compile_and_run_s": time.perf_counter() - start,
                     **score(logits, windows, eager)})
        print(f"{rows[-1]['scheme']:<24} ppl {rows[-1]['perplexity']:8.3f}  "
              f"KL {rows[-1]['kl_vs_fp32']:.5f}  top-1 {rows[-1]['top1_agreement']:.2%}", flush=True)
    return rows


def minilm_sentences(tokenizer, count: int = 64, length: int = 128):
    """(calibration batch, scored batch): paragraphs of pydoc_data.topics, ``count`` each,
    padded to ``length`` tokens; the calibration ones come after the scored ones."""
    from fxforge.examples.smollm2 import reference_text
    paragraphs = [p.strip() for p in reference_text().split("\n\n") if len(p.strip()) > 80]
    batches = []
    for chunk in (paragraphs[:count], paragraphs[count:2 * count]):
        encoded = tokenizer(chunk, padding="max_length", truncation=True, max_length=length,
                            return_tensors="pt")
        batches.append((encoded["input_ids"], encoded["attention_mask"]))
    return batches[1], batches[0]


def minilm_main(args) -> int:
    """Cosine between each scored paragraph's fp32 eager embedding and the variant's."""
    from fxforge.examples.minilm import Embedder, load_minilm
    from fxforge.kernels.cpu_isa import cpu_features
    encoder, tokenizer = load_minilm()
    model = Embedder(encoder)
    calibration, scored = minilm_sentences(tokenizer)
    schemes = ["fp32", *[s for s in args.schemes.split(",") if s]]
    print(f"all-MiniLM-L6-v2, 64 paragraphs x 128 tokens of pydoc_data.topics; "
          f"{cpu_features().describe()}; {torch.get_num_threads()} threads", flush=True)
    rows = []
    with torch.inference_mode():
        eager = model(*scored)
        for scheme in schemes:
            torch._dynamo.reset()
            options = {"quantize": scheme} if scheme != "fp32" else {}
            with recording() as graphs:
                compiled = fxforge.compile(model, calibration, **options)
                cosine = (compiled(*scored) * eager).sum(-1)
            rows.append({"scheme": f"fxforge {scheme}", "mean_cosine": float(cosine.mean()),
                         "min_cosine": float(cosine.min()), "linear_MB": linear_bytes(graphs) / 1e6,
                         "graphs": len(graphs)})
            print(f"| {rows[-1]['scheme']} | {rows[-1]['mean_cosine']:.6f} | "
                  f"{rows[-1]['min_cosine']:.6f} | {rows[-1]['linear_MB']:.1f} |", flush=True)
    out = Path(args.json).with_name("quant_accuracy_minilm.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": "all-MiniLM-L6-v2", "text": "pydoc_data.topics",
                               "cpu": cpu_features().describe(), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
