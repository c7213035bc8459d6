"""The W8A8 kernel (kernels/w8a8_cpu.py) on every ISA build this machine's hardware has, against the
format's reference (``irgraph.weight_format.w8a8_matmul``): the activation codes and scales bit
for bit, the outputs to the last bit without an activation (the int32 sums are exact and the
scaling rounds as the reference's ops), within fp32 rounding of the activation otherwise."""
import os

import pytest
import torch

from fxforge.irgraph.weight_format import w8a8_matmul, w8a8_quantize_rows
from fxforge.kernels import cpu_isa, w8a8_cpu
from fxforge.kernels.activations import ACTIVATION_CODES, REGISTRY
from fxforge.kernels.gemv_cpu import PARALLEL_MIN_WEIGHTS
from fxforge.kernels.replay import Recording
from fxforge.kernels.w8a8_cpu import W8A8Gemm, W8A8Linear

pytestmark = pytest.mark.skipif(w8a8_cpu.w8a8_unavailable() is not None,
                                reason="no C++ compiler for the W8A8 kernel")

ISA_ENV_OF = {"portable": "none", "avx2": "avx2", "avx512_vnni": "avx512_vnni"}
MACRO_LEVEL = {"portable": 0, "avx2": 1, "avx512_vnni": 2}   # what fxf_w8a8_isa reports


@pytest.fixture(params=w8a8_cpu.ISA_VARIANTS)
def variant(request, monkeypatch):
    hw = cpu_isa.hardware()
    has = {"portable": True, "avx2": hw.avx2 and hw.fma,
           "avx512_vnni": hw.avx512_vnni and hw.avx512f}[request.param]
    if not has:
        pytest.skip(f"this CPU lacks {request.param} ({hw.describe()})")
    monkeypatch.setenv(cpu_isa.ISA_ENV, ISA_ENV_OF[request.param])
    return request.param


def _gen() -> torch.Generator:
    seed = int.from_bytes(os.urandom(4), "little")
    print("seed", seed)   # shown on failure
    return torch.Generator().manual_seed(seed)


def _weight(n: int, k: int, gen: torch.Generator):
    """Codes over the whole symmetric range (-127..127, never -128), fp16 scales, a smoothing
    vector spread over two decades."""
    codes = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
    scales = (torch.rand(n, 1, generator=gen) * 0.02 + 1e-3).half()
    smooth = torch.exp(torch.randn(k, generator=gen))
    return codes, scales, smooth


def _reference(codes, scales, smooth, x, bias, activation, residual):
    y = w8a8_matmul(x, codes.t(), scales.t(), smooth.reshape(-1, 1))
    if bias is not None:
        y = y + bias
    y = REGISTRY[ACTIVATION_CODES[activation]].aten_(y.clone())
    return y + residual if residual is not None else y


def test_each_variant_is_the_build_it_claims(variant):
    codes, scales, smooth = _weight(16, 8, _gen())
    kernel = W8A8Gemm(codes, scales, smooth, None, "none")
    assert kernel.isa == variant
    assert w8a8_cpu.entries(variant)[2]() == MACRO_LEVEL[variant]


@pytest.mark.parametrize("m,k,n", [(1, 64, 16), (2, 67, 33), (3, 5, 1), (17, 130, 47),
                                   (130, 96, 20), (4, 1031, 35)])
def test_outputs_equal_the_reference(variant, m, k, n):
    gen = _gen()
    codes, scales, smooth = _weight(n, k, gen)
    x = torch.randn(m, k, generator=gen) * 3
    bias = torch.randn(n, generator=gen)
    kernel = W8A8Gemm(codes, scales, smooth, bias, "none")
    got_codes, got_scales = kernel.quantize(x)
    want_codes, want_scales = w8a8_quantize_rows(x, smooth)
    assert torch.equal(got_codes, want_codes) and torch.equal(got_scales, want_scales)
    want = _reference(codes, scales, smooth, x, bias, "none", None)
    assert torch.equal(kernel(x, None, 1), want)
    assert torch.equal(kernel(x, None, 2), want)


@pytest.mark.parametrize("activation", ["silu", "gelu", "relu"])
def test_epilogue_activation_and_residual(variant, activation):
    gen = _gen()
    m, k, n = 5, 200, 37
    codes, scales, smooth = _weight(n, k, gen)
    x, residual = torch.randn(m, k, generator=gen), torch.randn(m, n, generator=gen)
    bias = torch.randn(n, generator=gen)
    kernel = W8A8Gemm(codes, scales, smooth, bias, activation)
    want = _reference(codes, scales, smooth, x, bias, activation, residual)
    # the C++ activation (exp/erf) and ATen's differ in the last bits of the pre-activation's scale
    scale = float(_reference(codes, scales, smooth, x, bias, "none", None).abs().max())
    torch.testing.assert_close(kernel(x, residual), want, rtol=1e-5, atol=1e-6 * scale)


def test_a_large_call_runs_in_parallel_with_the_same_result(variant):
    gen = _gen()
    m, k, n = 40, 256, 200   # M * N * K above PARALLEL_MIN_WEIGHTS: work items over rows and columns
    assert m * n * k >= PARALLEL_MIN_WEIGHTS
    codes, scales, smooth = _weight(n, k, gen)
    x = torch.randn(m, k, generator=gen)
    kernel = W8A8Gemm(codes, scales, smooth, None, "none")
    want = _reference(codes, scales, smooth, x, None, "none", None)
    assert torch.equal(kernel(x, None, 2), want) and torch.equal(kernel(x, None, 1), want)


def test_a_row_with_nan_or_inf_gives_nan_outputs_and_leaves_other_rows_alone(variant):
    gen = _gen()
    codes, scales, smooth = _weight(24, 70, gen)
    x = torch.randn(4, 70, generator=gen)
    x[1, 3], x[2, 69] = float("nan"), float("inf")
    x[3] = 0   # all zeros: scale 0, outputs the bias
    bias = torch.randn(24, generator=gen)
    kernel = W8A8Gemm(codes, scales, smooth, bias, "none")
    got = kernel(x)
    assert torch.isnan(got[1]).all() and torch.isnan(got[2]).all()
    assert torch.equal(got[3], bias) and torch.isfinite(got[0]).all()
    want = _reference(codes, scales, smooth, x, bias, "none", None)
    assert torch.equal(got[0], want[0]) and torch.isnan(want[1:3]).all()
    assert torch.equal(kernel.quantize(x)[0], w8a8_quantize_rows(x, smooth)[0])


def test_extreme_codes_do_not_saturate(variant):
    """All codes at +-127 (the AVX2 build's i16 pairs at their largest, the VNNI build's biased
    activations at 1 and 255): still the exact sums."""
    k, n = 260, 16
    codes = torch.full((n, k), 127, dtype=torch.int8)
    codes[1::2] = -127
    scales = torch.full((n, 1), 0.5).half()
    smooth = torch.ones(k)
    x = torch.ones(3, k)
    x[1] = -1
    x[2, ::2] = -1
    kernel = W8A8Gemm(codes, scales, smooth, None, "none")
    assert torch.equal(kernel(x), _reference(codes, scales, smooth, x, None, "none", None))
    assert kernel(x)[0, 0] == k * 127 * 127 * 0.5 / 127


def test_bad_tensors_are_named():
    codes, scales, smooth = _weight(8, 16, _gen())
    with pytest.raises(ValueError, match="codes must be"):
        W8A8Gemm(codes.float(), scales, smooth, None, "none")
    with pytest.raises(ValueError, match=r"scales must be torch.float16 \[8, 1\]"):
        W8A8Gemm(codes, scales.float(), smooth, None, "none")
    with pytest.raises(ValueError, match=r"smooth must be torch.float32 \[16\]"):
        W8A8Gemm(codes, scales, smooth[:4], None, "none")
    kernel = W8A8Gemm(codes, scales, smooth, None, "none")
    with pytest.raises(ValueError, match=r"x must be fp32 \[M, K=16\]"):
        kernel(torch.randn(2, 15))


def test_the_linear_keeps_the_op_dtype_rules_and_is_replayable():
    gen = _gen()
    codes, scales, smooth = _weight(40, 64, gen)
    linear = W8A8Linear(codes.t(), scales.t(), smooth.reshape(-1, 1), torch.randn(40, generator=gen),
                        "silu", True, None)
    x, residual = torch.randn(1, 64, generator=gen), torch.randn(1, 40, generator=gen)
    assert linear(x.bfloat16(), residual).dtype == torch.float32
    recording = Recording(lambda a, r: linear(a, r), [x, residual])
    x2, residual2 = torch.randn(1, 64, generator=gen), torch.randn(1, 40, generator=gen)
    torch.testing.assert_close(recording.replay([x2, residual2]), linear(x2, residual2),
                               rtol=0, atol=0)
