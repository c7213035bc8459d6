"""fxforge's Triton kernels against the vendor libraries, on one CUDA GPU.

    python bench/gpu_kernels.py                 # every benchmark
    python bench/gpu_kernels.py --json out.json
    python bench/gpu_kernels.py --only quant     # one benchmark

- matmul: ``triton_linear`` (every config of its tuning space that survives pruning) against
  ``torch.mm`` (cuBLAS) at 4096^3 bf16, then the fused epilogue (bias, GELU, residual) against
  the same epilogue run eagerly after ``torch.addmm``;
- attention: ``triton_attention`` (every surviving config) against
  ``F.scaled_dot_product_attention`` at (1, 16, 4096, 128) bf16, causal;
- quant: the quantized kernels (``kernels/quant_triton.py``, every format) on SmolLM2's linear
  shapes at M=1 and M=128, as ratios against the dense Triton matmul and ``torch.mm`` on the
  dequantized fp16 weight (``--dry-run`` prepares these operands on the CPU, no GPU needed).

Times are medians from ``triton.testing.do_bench``. Each config is checked against torch before
it is timed; a config that fails to compile or gives a wrong answer is listed, not timed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F


def _median_ms(fn) -> float:
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def copy_bandwidth(src: torch.Tensor) -> float:
    """Bytes/s (read + written) of copying ``src`` into another tensor on its device (median)."""
    dst = torch.empty_like(src)
    return 2 * src.numel() * src.element_size() / (_median_ms(lambda: dst.copy_(src)) * 1e-3)


def _smem_limit(default: int) -> int:
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return int(getattr(props, "shared_memory_per_block_optin", default))


def _best_config(space, problem, run, reference, tol):
    """Time every surviving config of ``space``; returns (best config, best ms, per-config lines)."""
    survivors, pruned = space.survivors(problem)
    lines = [f"  pruned  {c.describe()}: {why}" for c, why in pruned.items()]
    best, best_ms = None, float("inf")
    for config in survivors:
        try:
            out = run(config)
        except Exception as exc:  # a config the compiler rejects (out of resources, ...)
            lines.append(f"  failed  {config.describe()}: {type(exc).__name__}: {str(exc)[:100]}")
            continue
        if not torch.allclose(out.float(), reference.float(), rtol=tol, atol=tol):
            error = (out.float() - reference.float()).abs().max().item()
            lines.append(f"  WRONG   {config.describe()}: max abs error {error:.3g} (rtol=atol={tol})")
            continue
        ms = _median_ms(lambda: run(config))
        lines.append(f"  {ms:7.3f} ms  {config.describe()}")
        if ms < best_ms:
            best, best_ms = config, ms
    return best, best_ms, lines


def bench_matmul(M=4096, N=4096, K=4096, dtype=torch.bfloat16) -> dict:
    from fxforge.kernels.matmul import DEFAULT_SMEM_LIMIT, TUNING_SPACE, linear_problem, triton_linear

    x = torch.randn(M, K, device="cuda", dtype=dtype)
    weight = (torch.randn(N, K, device="cuda", dtype=dtype) / K**0.5).t()  # nn.Linear's view
    problem = {**linear_problem(x, weight), "smem_limit": _smem_limit(DEFAULT_SMEM_LIMIT)}
    reference = torch.mm(x, weight)
    best, triton_ms, lines = _best_config(TUNING_SPACE, problem,
                                          lambda c: triton_linear(x, weight, config=c), reference, 5e-2)
    print(f"matmul {M}x{N}x{K} {dtype}: configs\n" + "\n".join(lines))
    if best is None:
        raise RuntimeError("no matmul config ran correctly")
    cublas_ms = _median_ms(lambda: torch.mm(x, weight))
    bias = torch.randn(N, device="cuda", dtype=dtype)
    residual = torch.randn(M, N, device="cuda", dtype=dtype)
    fused_ms = _median_ms(lambda: triton_linear(x, weight, bias, "gelu", residual, config=best))
    eager_ms = _median_ms(lambda: F.gelu(torch.addmm(bias, x, weight)) + residual)
    tflops = lambda ms: 2 * M * N * K / (ms * 1e-3) / 1e12  # noqa: E731
    print(f"  best {best.describe()}\n"
          f"  triton {triton_ms:.3f} ms ({tflops(triton_ms):.0f} TFLOP/s) vs cuBLAS {cublas_ms:.3f} ms "
          f"({tflops(cublas_ms):.0f} TFLOP/s): {cublas_ms / triton_ms:.2f}x of cuBLAS speed\n"
          f"  bias+gelu+residual fused {fused_ms:.3f} ms vs addmm+gelu+add {eager_ms:.3f} ms: "
          f"{eager_ms / fused_ms:.2f}x")
    return {"config": best.describe(), "triton_ms": triton_ms, "cublas_ms": cublas_ms,
            "triton_tflops": tflops(triton_ms), "cublas_tflops": tflops(cublas_ms),
            "speed_vs_cublas": cublas_ms / triton_ms, "fused_epilogue_ms": fused_ms,
            "eager_epilogue_ms": eager_ms}


def bench_attention(B=1, H=16, L=4096, D=128, dtype=torch.bfloat16) -> dict:
    from fxforge.kernels.attention import (DEFAULT_SMEM_LIMIT, TUNING_SPACE, attention_problem,
                                           triton_attention)

    q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=dtype) for _ in range(3))
    problem = {**attention_problem(q, k), "smem_limit": _smem_limit(DEFAULT_SMEM_LIMIT)}
    reference = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    best, triton_ms, lines = _best_config(
        TUNING_SPACE, problem, lambda c: triton_attention(q, k, v, is_causal=True, config=c),
        reference, 5e-2)
    print(f"attention {(B, H, L, D)} {dtype} causal: configs\n" + "\n".join(lines))
    if best is None:
        raise RuntimeError("no attention config ran correctly")
    torch_ms = _median_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    tflops = lambda ms: 4 * B * H * L * L * D * 0.5 / (ms * 1e-3) / 1e12  # noqa: E731  (causal: half)
    print(f"  best {best.describe()}\n"
          f"  triton {triton_ms:.3f} ms ({tflops(triton_ms):.0f} TFLOP/s) vs torch SDPA {torch_ms:.3f} ms "
          f"({tflops(torch_ms):.0f} TFLOP/s): {torch_ms / triton_ms:.2f}x of SDPA speed")
    return {"config": best.describe(), "triton_ms": triton_ms, "sdpa_ms": torch_ms,
            "triton_tflops": tflops(triton_ms), "sdpa_tflops": tflops(torch_ms),
            "speed_vs_sdpa": torch_ms / triton_ms}


def _group(fn, *examples):
    """The fusion-group graph of ``fn`` as the backend hands it to the kernel generator."""
    from torch.fx.experimental.proxy_tensor import make_fx
    from fxforge.irgraph import decomposition_table
    return make_fx(lambda *a: (fn(*a),), decomposition_table=decomposition_table())(*examples)


def bench_fused_pointwise(rows=16384, cols=8192, dtype=torch.bfloat16) -> dict:
    """Generated Triton kernels for fused groups vs the device's copy bandwidth (bytes moved /
    time: a memory-bound kernel should reach most of what a plain copy reaches)."""
    from fxforge.kernels.fused_triton import compile_fused_triton

    x, r = (torch.randn(rows, cols, device="cuda", dtype=dtype) for _ in range(2))
    w = torch.randn(cols, device="cuda", dtype=dtype)
    copy_gbs = copy_bandwidth(x) / 1e9
    copy_ms = 2 * x.numel() * x.element_size() / copy_gbs / 1e6
    print(f"fused pointwise [{rows}, {cols}] {dtype}: copy {copy_ms:.3f} ms = {copy_gbs:.0f} GB/s")

    def rms(a, b, c):
        h = (a + b).float()
        return c * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(a.dtype)

    cases = {"gelu(x)": (lambda a, b, c: F.gelu(a), 2), "x * silu(r)": (lambda a, b, c: a * F.silu(b), 3),
             "rmsnorm(x + r) * w": (rms, 3),
             "softmax(x * 0.1 + r)": (lambda a, b, c: torch.softmax(a * 0.1 + b, -1), 3)}
    out = {"copy_gbs": copy_gbs}
    for name, (fn, tensors) in cases.items():
        kernel = compile_fused_triton(_group(fn, x, r, w))
        torch.testing.assert_close(kernel(x, r, w)[0], fn(x, r, w), rtol=2e-2, atol=2e-2)
        ms = _median_ms(lambda: kernel(x, r, w))
        eager_ms = _median_ms(lambda: fn(x, r, w))
        gbs = tensors * x.numel() * x.element_size() / (ms * 1e-3) / 1e9
        print(f"  {name:24s} {ms:.3f} ms = {gbs:.0f} GB/s = {gbs / copy_gbs:.0%} of copy; eager {eager_ms:.3f} ms "
              f"({eager_ms / ms:.2f}x)")
        out[name] = {"ms": ms, "gbs": gbs, "fraction_of_copy": gbs / copy_gbs, "eager_ms": eager_ms}
    return out


QUANT_SHAPES = ((576, 576), (576, 1536), (1536, 576), (576, 49152))   # SmolLM2-135M's (K, N)
QUANT_ROWS = (1, 128)                                                  # decode, prefill


def quant_weights(k: int, n: int, fmt: str, dtype: torch.dtype, device: str,
                  generator: torch.Generator) -> dict:
    """One quantized weight as the quantize pass stores it (codes/scales/offsets, transposed
    views), made on the CPU (seeded) and moved to ``device``, with its dequantized values in
    ``dtype`` as nn.Linear's transposed view (what the dense Triton matmul and torch.mm run)."""
    from fxforge.irgraph.weight_format import decode
    from fxforge.kernels.quant_triton import checked_format
    from fxforge.kernels.quant_triton_tuning import random_quantized
    codes, scales, offsets = random_quantized(k, n, fmt, generator)
    checked_format(fmt, codes, scales, offsets)
    dense = decode(codes, fmt, scales, offsets).t().contiguous().t().to(dtype)
    move = lambda t: None if t is None else t.to(device)  # noqa: E731  (keeps the strides)
    return {"codes": move(codes), "scales": move(scales), "offsets": move(offsets),
            "dense": move(dense)}


def bench_quant(dtype=torch.float16, device="cuda", dry_run=False) -> dict:
    """The quantized kernels (untuned configs: the GEMV at M=1, the dequant-fused matmul at
    M=128) on SmolLM2's linear shapes, as speed ratios against the dense Triton matmul and
    torch.mm on the dequantized weight (>1: the quantized kernel is faster). ``dry_run``: only
    prepare the operands (on the CPU), checking their layout; nothing runs or is timed."""
    from fxforge.irgraph.weight_format import weight_format
    from fxforge.kernels.matmul import triton_linear
    from fxforge.kernels.quant_triton import FORMATS, triton_quant_linear
    generator = torch.Generator().manual_seed(0)
    out = {}
    print(f"quantized linears, x {dtype}, times in ms (ratio = other kernel's time / quantized's)")
    for k, n in QUANT_SHAPES:
        for fmt in FORMATS:
            group = weight_format(fmt).group
            if group and k % group:   # the quantize pass takes a smaller group there
                print(f"  {fmt} {k}->{n}: skipped, K={k} is not a multiple of {group}")
                continue
            w = quant_weights(k, n, fmt, dtype, device, generator)
            for m in QUANT_ROWS:
                x = torch.randn(m, k, generator=generator).to(dtype).to(device)
                label = f"{fmt} M={m} {k}->{n}"
                if dry_run:
                    assert w["dense"].shape == (k, n) and w["codes"].shape[1] == n
                    out[label] = {"prepared": True}
                    continue
                run = lambda: triton_quant_linear(x, w["codes"], w["scales"], w["offsets"], fmt,  # noqa: E731
                                                  out_dtype=dtype)
                want = torch.mm(x, w["dense"])
                error = ((run().float() - want.float()).abs().max() / want.float().abs().max()).item()
                quant_ms = _median_ms(run)
                dense_ms = _median_ms(lambda: triton_linear(x, w["dense"]))
                torch_ms = _median_ms(lambda: torch.mm(x, w["dense"]))
                read = sum(t.numel() * t.element_size() for t in (w["codes"], w["scales"], x)) + \
                    (w["offsets"].numel() * 2 if w["offsets"] is not None else 0)
                gbs = read / (quant_ms * 1e-3) / 1e9
                print(f"  {label:28s} {quant_ms:.4f}  vs dense triton {dense_ms:.4f} "
                      f"({dense_ms / quant_ms:.2f}x)  vs torch.mm {torch_ms:.4f} "
                      f"({torch_ms / quant_ms:.2f}x)  {gbs:.0f} GB/s read  rel.err {error:.1e}")
                out[label] = {"ms": quant_ms, "dense_triton_ms": dense_ms, "torch_mm_ms": torch_ms,
                              "vs_dense_triton": dense_ms / quant_ms, "vs_torch_mm": torch_ms / quant_ms,
                              "read_gbs": gbs, "relative_error": error}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--only", choices=("fused", "matmul", "attention", "quant"),
                        help="run one benchmark")
    parser.add_argument("--dry-run", action="store_true",
                        help="prepare the quantized benchmark's operands on the CPU and exit "
                             "(no GPU needed; nothing is timed)")
    args = parser.parse_args(argv)
    if args.dry_run:
        prepared = bench_quant(device="cpu", dry_run=True)
        print(f"bench/gpu_kernels.py: {len(prepared)} quantized cases prepared (dry run)")
        return 0
    if not torch.cuda.is_available():
        print("bench/gpu_kernels.py: no CUDA device (torch.cuda.is_available() is False); "
              "these benchmarks need a GPU.", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("bench/gpu_kernels.py: unset TRITON_INTERPRET; the interpreter would time the CPU.",
              file=sys.stderr)
        return 2
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    benches = {"fused_pointwise": bench_fused_pointwise, "matmul": bench_matmul,
               "attention": bench_attention, "quant": bench_quant}
    only = {"fused": "fused_pointwise"}.get(args.only, args.only)
    results = {"device": torch.cuda.get_device_name(),
               **{name: run() for name, run in benches.items() if only in (None, name)}}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
