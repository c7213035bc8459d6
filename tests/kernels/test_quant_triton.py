"""The quantized Triton kernels (dequant-fused matmul, split-K GEMV) against the IR op's reference
(``decode`` then torch's matmul), under ``TRITON_INTERPRET=1`` on tiny shapes: every format, both
paths, odd N, K at group edges, epilogues, strides, half inputs, NaN/inf, bad input."""
import os

import pytest
import torch

pytest.importorskip("triton")

from fxforge.irgraph.weight_format import WeightFormatError, pack_nibbles  # noqa: E402
from fxforge.kernels.matmul import interpreting  # noqa: E402
from fxforge.kernels.quant_triton import FORMATS, triton_quant_linear  # noqa: E402
from fxforge.kernels.quant_triton_space import (GEMV_MAX_ROWS, GEMV_SPACE, MATMUL_CONFIGS,  # noqa: E402
                                                 MATMUL_SPACE, _gemv_config, choose_config,
                                                 gemv_splits, prune_gemv, prune_matmul, space_for)
from fxforge.kernels.quant_triton_tuning import random_quantized  # noqa: E402

needs_interpreter = pytest.mark.skipif(not interpreting(), reason="CPU runs need TRITON_INTERPRET=1")
GROUP = {"int8_channel": 1, "int8_g32": 32, "int4_g32": 32, "int4_g64": 64, "int4_g128": 128}
ACTS = ["none", "relu", "gelu", "gelu_tanh", "silu"]
# fp32 x: IEEE fp32 dots/sums in another order than torch's; half x: the dequantized weight is
# rounded to x's dtype for the dot (the matmul path; the GEMV stays fp32)
TOL = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _generator() -> torch.Generator:
    seed = int.from_bytes(os.urandom(4), "little")
    print("seed", seed)   # shown on failure
    return torch.Generator().manual_seed(seed)


def _operands(fmt, m, k, n, gen, dtype=torch.float32, bias=True, residual=True):
    codes, scales, offsets = random_quantized(k, n, fmt, gen)
    x = torch.randn(m, k, generator=gen).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    r = torch.randn(m, n, generator=gen).to(dtype) if residual else None
    return x, codes, scales, offsets, b, r


def _reference(x, codes, scales, offsets, fmt, bias=None, activation="none", residual=None,
               out_dtype=None):
    """The IR op on fp32 operands: decode(codes) then torch's matmul and the epilogue."""
    up = lambda t: None if t is None else t.float()  # noqa: E731
    y = torch.ops.fxforge.linear(up(x), codes, up(bias), activation, up(residual), None, fmt,
                                 scales, offsets)
    return y.to(out_dtype) if out_dtype is not None else y


def _run_both(x, codes, scales, offsets, fmt, bias=None, activation="none", residual=None,
              out_dtype=None, config=None):
    got = triton_quant_linear(x, codes, scales, offsets, fmt, bias, activation, residual, out_dtype,
                              config=config)
    want = _reference(x, codes, scales, offsets, fmt, bias, activation, residual, out_dtype)
    assert got.shape == want.shape and got.dtype == (out_dtype or torch.float32)
    tol = max(TOL[x.dtype], TOL[got.dtype])   # a half output: one rounding of the result
    torch.testing.assert_close(got, want.to(got.dtype), rtol=tol, atol=tol, equal_nan=True)
    return got


@needs_interpreter
@pytest.mark.parametrize("groups", [1, 2], ids=["K=G", "K=2G"])
@pytest.mark.parametrize("m", [1, 3, 37], ids=["gemv1", "gemv3", "matmul"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_on_both_paths_matches_the_reference(fmt, m, groups):
    k = GROUP[fmt] * groups if fmt != "int8_channel" else 45 * groups   # int8_channel: any K
    x, codes, scales, offsets, bias, residual = _operands(fmt, m, k, 29, _generator())
    _run_both(x, codes, scales, offsets, fmt, bias, "gelu", residual)


@needs_interpreter
@pytest.mark.parametrize("fmt", ["int8_channel", "int8_g32", "int4_g32", "int4_g128"])
@pytest.mark.parametrize("split_k", [1, 2, 4])
def test_split_k_gemv_with_a_short_last_split(fmt, split_k):
    # K = 7 x 32 = 224 (int4_g128: 256): splits of whole 64-blocks, the last one shorter
    k = 256 if fmt == "int4_g128" else 224
    x, codes, scales, offsets, bias, residual = _operands(fmt, 2, k, 37, _generator())
    config = _gemv_config(32, 64, split_k)
    assert gemv_splits(k, 64, split_k)[1] == split_k
    _run_both(x, codes, scales, offsets, fmt, bias, "silu", residual, config=config)


@needs_interpreter
@pytest.mark.parametrize("fmt", ["int8_g32", "int4_g32"])
@pytest.mark.parametrize("config", MATMUL_CONFIGS, ids=lambda c: c.describe())
def test_every_matmul_config_is_correct(fmt, config):
    # BLOCK_K 32: one scale row per block; 64 and 128 span several groups of 32
    x, codes, scales, offsets, bias, residual = _operands(fmt, 40, 128, 72, _generator())
    _run_both(x, codes, scales, offsets, fmt, bias, "gelu_tanh", residual, config=config)


@needs_interpreter
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("m,config", [(1, _gemv_config(32, 64, 2)), (1, None), (20, None)],
                         ids=["split2", "gemv", "matmul"])
def test_every_activation(activation, m, config):
    x, codes, scales, offsets, bias, residual = _operands("int4_g64", m, 128, 40, _generator())
    _run_both(x, codes, scales, offsets, "int4_g64", bias, activation, residual, config=config)


@needs_interpreter
@pytest.mark.parametrize("bias,residual", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("m", [1, 17])
def test_epilogue_parts_alone(bias, residual, m):
    x, codes, scales, offsets, b, r = _operands("int8_channel", m, 64, 33, _generator(),
                                                bias=bias, residual=residual)
    _run_both(x, codes, scales, offsets, "int8_channel", b, "relu" if bias else "none", r)


@needs_interpreter
@pytest.mark.parametrize("m", [1, 19])
def test_out_dtype_strides_and_residual_promotion(m):
    gen = _generator()
    x, codes, scales, offsets, bias, _ = _operands("int4_g32", m, 64, 24, gen, residual=False)
    _run_both(x, codes, scales, offsets, "int4_g32", bias, "none", None, out_dtype=torch.bfloat16)
    # codes stored [K/2, N] row-major (not the pass's transposed view), x and residual strided
    dense_codes = codes.contiguous()
    wide = torch.randn(m, 128, generator=gen)
    residual = torch.randn(24, m, generator=gen).t()
    assert not wide[:, ::2].is_contiguous() and dense_codes.stride(1) == 1
    _run_both(wide[:, ::2], dense_codes, scales, offsets, "int4_g32", bias, "gelu", residual)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 24])
def test_half_inputs_accumulate_in_fp32(dtype, m):
    x, codes, scales, offsets, bias, residual = _operands("int4_g32", m, 96, 40, _generator(), dtype)
    got = _run_both(x, codes, scales, offsets, "int4_g32", bias, "silu", residual)
    assert got.dtype == torch.float32   # the op's fake: decoded codes are fp32 values
    _run_both(x, codes, scales, offsets, "int4_g32", bias, "none", residual, out_dtype=dtype)


@needs_interpreter
@pytest.mark.parametrize("fmt", ["int8_g32", "int4_g32"])
@pytest.mark.parametrize("m", [3, 21])
def test_nan_and_inf_inputs_propagate(fmt, m):
    x, codes, scales, offsets, bias, residual = _operands(fmt, m, 64, 27, _generator())
    x[0, 5] = float("nan")
    x[1, 40] = float("inf")
    got = _run_both(x, codes, scales, offsets, fmt, bias, "none", residual)
    assert got[0].isnan().all() and not got[1].isfinite().any()
    assert got[2:].isfinite().all()


@needs_interpreter
def test_empty_shapes():
    x, codes, scales, _, bias, residual = _operands("int8_channel", 3, 0, 5, _generator())
    _run_both(x, codes, scales, None, "int8_channel", bias, "gelu", residual)   # K = 0: epilogue
    assert triton_quant_linear(x[:0], codes, scales, None, "int8_channel").shape == (0, 5)


def test_bad_inputs_raise_clear_errors():
    gen = _generator()
    x, codes, scales, offsets, _, _ = _operands("int4_g32", 2, 64, 8, gen)
    partial_codes = pack_nibbles(torch.randint(0, 16, (48, 8), generator=gen))   # K = 48
    cases = [
        ((x[:, :48], partial_codes, scales[:1], offsets[:1], "int4_g32"), "multiple of its group of 32"),
        ((x, torch.zeros(32, 8, dtype=torch.int8), scales, None, "int8_g32"), r"int8_g32.*\[1, 8\]"),
        ((x, codes, scales, offsets, "bf16"), "not implemented by this kernel"),
        ((x, codes, scales, offsets, "int3"), "unknown weight format"),
        ((x, codes, scales, None, "int4_g32"), "offsets"),
        ((x, codes, scales[:1], offsets[:1], "int4_g32"), r"scales must be .*\[2, 8\]"),
        ((x[:, :32], codes, scales, offsets, "int4_g32"), "K mismatch"),
        ((x, codes.to("meta"), scales, offsets, "int4_g32"), "meta"),
    ]
    for args, message in cases:
        with pytest.raises((WeightFormatError, ValueError), match=message):
            triton_quant_linear(*args)
    with pytest.raises(ValueError, match="unknown activation"):
        triton_quant_linear(x, codes, scales, offsets, "int4_g32", activation="tanh")


# ------------------------------------------------------------------------------- on a GPU
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available() or interpreting(),
                                   reason="needs CUDA (and no TRITON_INTERPRET)")


def _cuda(*tensors):
    return [t.cuda() if t is not None else None for t in tensors]   # .cuda() keeps the strides


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 4, 128])
@pytest.mark.parametrize("fmt", FORMATS)
def test_on_the_gpu_at_a_smollm2_shape(fmt, m, dtype):
    x, codes, scales, offsets, bias, residual = _cuda(*_operands(fmt, m, 1536, 576, _generator(), dtype))
    _run_both(x, codes, scales, offsets, fmt, bias, "silu", residual)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("m", [1, 128])
def test_every_surviving_config_compiles_and_is_correct_on_the_gpu(m):
    x, codes, scales, offsets, bias, _ = _cuda(*_operands("int4_g32", m, 576, 1536, _generator(),
                                                          torch.float16))
    problem = {"M": m, "N": 1536, "K": 576, "dtype": torch.float16, "format": "int4_g32"}
    survivors, _ = space_for(problem).survivors(problem)
    for config in survivors:
        _run_both(x, codes, scales, offsets, "int4_g32", bias, "gelu", config=config)


# ---------------------------------------------------------------------------- tuning spaces
SMOLLM2 = [(576, 576), (576, 1536), (1536, 576), (576, 49152)]   # (K, N)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("m", [1, 3, 128, 4096])
@pytest.mark.parametrize("k,n", SMOLLM2 + [(32, 1), (128, 7)])
def test_a_config_survives_every_problem(fmt, m, k, n):
    problem = {"M": m, "N": n, "K": k, "dtype": torch.float16, "format": fmt}
    space = space_for(problem)
    assert space is (GEMV_SPACE if m <= GEMV_MAX_ROWS else MATMUL_SPACE)
    survivors, pruned = space.survivors(problem)
    assert survivors and all(isinstance(why, str) and why for why in pruned.values())
    assert choose_config(problem) in survivors


def test_prune_rules():
    square = {"M": 4096, "N": 4096, "K": 4096, "dtype": torch.float16, "format": "int4_g32"}
    big = MATMUL_CONFIGS[0]
    assert prune_matmul(big, square) is None
    assert "shared memory" in prune_matmul(big, {**square, "smem_limit": 50_000})
    assert "BLOCK_M" in prune_matmul(big, {**square, "M": 8})
    # splits are whole blocks: K = 576 is 9 blocks of 64 (SPLIT_K 16 launches 9, 8 launches 5);
    # K = 512 is 8 blocks, which SPLIT_K 8 already launches
    decode = {"M": 1, "N": 576, "K": 576, "dtype": torch.float16, "format": "int8_g32"}
    assert gemv_splits(576, 64, 8) == (128, 5) and gemv_splits(576, 64, 16) == (64, 9)
    assert prune_gemv(_gemv_config(64, 64, 16), decode) is None
    assert "same 8 splits as SPLIT_K=8" in prune_gemv(_gemv_config(64, 64, 16), {**decode, "K": 512})
    assert "registers" in prune_gemv(_gemv_config(256, 256, 1), {**decode, "N": 4096, "K": 4096})


def test_untuned_gemv_splits_k_when_columns_are_few():
    few = choose_config({"M": 1, "N": 576, "K": 1536, "dtype": torch.float16, "format": "int4_g32"})
    many = choose_config({"M": 1, "N": 49152, "K": 576, "dtype": torch.float16, "format": "int4_g32"})
    assert few["SPLIT_K"] > 1 and many["SPLIT_K"] == 1


# --------------------------------------------------------------------- the GPU bench's CPU side
def _gpu_bench():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[2] / "bench" / "gpu_kernels.py"
    spec = importlib.util.spec_from_file_location("fxforge_bench_gpu_kernels", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_bench_dry_run_prepares_every_case(monkeypatch, capsys):
    bench = _gpu_bench()
    monkeypatch.setattr(bench, "QUANT_SHAPES", ((64, 40), (96, 24)))
    assert bench.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    # 5 formats x 2 shapes, less int4_g128 twice and int4_g64 once, x 2 row counts
    assert "14 quantized cases prepared" in out and "int4_g128 96->24: skipped" in out


@needs_interpreter
@pytest.mark.parametrize("fmt", FORMATS)
def test_gpu_bench_operands_run_on_the_kernel(fmt):
    bench = _gpu_bench()
    w = bench.quant_weights(128, 24, fmt, torch.float16, "cpu", _generator())
    assert w["dense"].dtype == torch.float16 and w["dense"].stride(0) == 1   # nn.Linear's view
    x = torch.randn(3, 128, generator=_generator()).half()
    got = triton_quant_linear(x, w["codes"], w["scales"], w["offsets"], fmt, out_dtype=torch.float16)
    torch.testing.assert_close(got, torch.mm(x.float(), w["dense"].float()).half(), rtol=4e-3, atol=4e-3)


# Run in a fresh process without TRITON_INTERPRET (under it, @triton.jit gives interpreted
# functions): the real front end, TTGIR and ptxas, for an sm_90 target, no GPU needed.
_COMPILE_FOR_SM90 = r"""
import triton
from triton.backends.compiler import GPUTarget
from fxforge.kernels import quant_triton as q

def build(fn, pointers, consts):
    signature = {a: "constexpr" if a in consts else pointers.get(a, "i32") for a in fn.arg_names}
    triton.compile(triton.compiler.ASTSource(fn, signature, consts), target=GPUTarget("cuda", 90, 32),
                   options={"num_warps": 4, "num_stages": 3})

epilogue = dict(HAS_BIAS=True, HAS_RESIDUAL=True, ACTIVATION=3)
for codes, x, group, bk in (("u8", "fp16", 32, 64), ("i8", "fp32", 0, 32)):
    pointers = {"x_ptr": "*" + x, "c_ptr": "*" + codes, "s_ptr": "*fp16", "o_ptr": "*fp16",
                "bias_ptr": "*" + x, "res_ptr": "*" + x, "out_ptr": "*fp32", "part_ptr": "*fp32"}
    fmt = dict(INT4=codes == "u8", PER_ROW=2 if codes == "u8" else 1, GROUP=group,
               ONE_SCALE_ROW=False, **epilogue)
    build(q._quant_matmul_kernel, pointers, dict(fmt, FP32_DOT=x == "fp32", BLOCK_M=64,
                                                 BLOCK_N=64, BLOCK_K=bk, GROUP_M=8))
    build(q._quant_gemv_kernel, pointers, dict(fmt, SPLIT_K=4, BLOCK_N=64, BLOCK_K=128))
build(q._split_k_sum_kernel, {n: "*fp32" for n in q._split_k_sum_kernel.arg_names if n.endswith("ptr")},
      dict(CHANNEL_SCALE=True, SPLIT_K=4, BLOCK_N=256, **epilogue))
print("compiled")
"""


@pytest.mark.slow
def test_kernels_compile_for_a_gpu_target_without_a_gpu():
    import subprocess
    import sys
    from triton.backends import backends
    if "nvidia" not in backends:
        pytest.skip("this triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE_FOR_SM90], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]
