"""The C++ GEMV's ISA builds (kernels/gemv_cpp.py: portable, AVX2, AVX-512), each forced with
FXFORGE_CPU_ISA, on fp32 and bf16-stored weights, against ``torch.ops.fxforge.linear``."""
import pytest
import torch

import fxforge.irgraph.ops  # noqa: F401  (registers torch.ops.fxforge.linear)
from fxforge.kernels import cpu_isa, gemv_cpu, quant_gemv_cpu
from fxforge.kernels.gemv_cpp import ISA_LEVEL
from fxforge.kernels.gemv_cpu import GEMV_MAX_M, PARALLEL_MIN_WEIGHTS, GemvLinear
from fxforge.testing import assert_close_to_eager, assert_close_to_sum
# the variants and the hardware check are the quantized GEMV's: both choose the same way
from tests.kernels.test_quant_gemv_cpu import _hardware_has, _seed, variant  # noqa: F401 (fixture)

pytestmark = pytest.mark.skipif(gemv_cpu.gemv_unavailable() is not None,
                                reason="no C++ compiler for the GEMV kernel")
FORMATS = ("dense", "bf16")


def test_the_builds_are_the_quantized_gemvs():
    """The ``variant`` fixture (forcing each build) is the quantized GEMV's: same names."""
    assert gemv_cpu.ISA_VARIANTS == quant_gemv_cpu.ISA_VARIANTS


def _reference(x, weight_nk, bias, activation, residual, fmt):
    return torch.ops.fxforge.linear(x, weight_nk.t(), bias, activation, residual, None, fmt)


def test_the_variant_is_the_build_it_claims(variant):
    """FXFORGE_CPU_ISA picks the build, the library compiled the matching #if block, and a
    kernel object records the build it runs."""
    assert gemv_cpu.choose_isa() == variant
    assert gemv_cpu.built_isa(variant) == ISA_LEVEL[variant]
    assert GemvLinear(torch.randn(8, 8), None, "none").isa == variant
    assert gemv_cpu.runnable_isas()[-1] == variant


# K around the vector steps (the AVX-512 loop takes 8 k, AVX2's 4; the rest are tails), N off
# the 8- and 16-row blocks
@pytest.mark.parametrize("n,k", [(1, 1), (7, 3), (13, 9), (17, 15), (40, 24), (129, 67)])
@pytest.mark.parametrize("fmt", FORMATS)
def test_odd_shapes_every_row_count(variant, fmt, n, k):
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=gen)
    bias = torch.randn(n, generator=gen)
    kernel = GemvLinear(weight, bias, "silu", weight_format=fmt)
    for m in (1, 2, GEMV_MAX_M, GEMV_MAX_M + 3):
        x, res = torch.randn(m, k, generator=gen), torch.randn(m, n, generator=gen)
        assert_close_to_sum(kernel(x, res), _reference(x, weight, bias, "silu", res, fmt),
                            x.abs() @ weight.abs().T, res,
                            f"{variant} {fmt} M={m} N={n} K={k} seed={seed}")


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("fmt", FORMATS)
def test_a_parallel_size_splits_the_blocks(variant, fmt, threads):
    n, k = 301, 203                   # above PARALLEL_MIN_WEIGHTS; N, K odd
    assert n * k >= PARALLEL_MIN_WEIGHTS
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    weight, x = torch.randn(n, k, generator=gen), torch.randn(3, k, generator=gen)
    got = GemvLinear(weight, None, "none", weight_format=fmt)(x, None, threads=threads)
    assert_close_to_sum(got, _reference(x, weight, None, "none", None, fmt),
                        x.abs() @ weight.abs().T, None,
                        f"{variant} {fmt} threads={threads} seed={seed}")


@pytest.mark.parametrize("fmt", FORMATS)
def test_nan_and_inf_propagate_as_in_the_reference(variant, fmt):
    """A NaN or inf in x reaches every output row (inf with the sign of its weight); a NaN or
    inf weight reaches its own row only; in the main loop and in the K tail alike."""
    n, k = 37, 29                     # K = 3 * 8 + 5: the last k sit in every build's tail
    seed = _seed()
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=gen)
    weight[3, 2], weight[20, k - 1] = float("nan"), float("inf")
    weight[31, 10] = float("-inf")
    kernel = GemvLinear(weight, torch.randn(n, generator=gen), "none", weight_format=fmt)
    x = torch.randn(4, k, generator=gen)
    x[0, 5], x[1, k - 2], x[2, 1] = float("nan"), float("inf"), float("-inf")
    got = kernel(x, None)
    ref = _reference(x, weight, kernel.bias, "none", None, fmt)
    what = f"{variant} {fmt} seed={seed}"
    assert torch.equal(got.isnan(), ref.isnan()), what
    assert torch.equal(got.isinf(), ref.isinf()) and torch.equal(got[ref.isinf()],
                                                                  ref[ref.isinf()]), what
    assert ref[0].isnan().all() and ref[3].isfinite().sum() == n - 3   # the cases are exercised
    finite = ref.isfinite()
    assert_close_to_eager(got[finite], ref[finite], what)


def test_a_build_the_cpu_cannot_run_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(cpu_isa.ISA_ENV, "none")
    with pytest.raises(ValueError, match="build 'avx2' cannot run here"):
        GemvLinear(torch.randn(8, 8), None, "none", isa="avx2")
    assert GemvLinear(torch.randn(8, 8), None, "none", isa="portable").isa == "portable"


def test_asking_for_more_than_the_hardware_has_runs_what_it_has(monkeypatch):
    monkeypatch.setenv(cpu_isa.ISA_ENV, "amx")
    best = [v for v in gemv_cpu.ISA_VARIANTS if _hardware_has(v)][-1]
    assert gemv_cpu.choose_isa() == best
