"""The C++ few-row linear (kernels/gemv_cpu.py) and how PackedLinear dispatches to it."""
import pytest
import torch

import fxforge.irgraph.ops  # noqa: F401  (registers torch.ops.fxforge.linear)
from fxforge.kernels import gemv_cpu, linear_cpu
from fxforge.kernels.gemv_cpu import GEMV_MAX_M, PARALLEL_MIN_WEIGHTS, GemvLinear, pack_weight
from fxforge.kernels.linear_cpu import PackedLinear, config_for, linear_cpu_space
from fxforge.testing import assert_close_to_eager

pytestmark = pytest.mark.skipif(gemv_cpu.gemv_unavailable() is not None,
                                reason="no C++ compiler for the GEMV kernel")


def _reference(x, weight_kn, bias, activation, residual):
    return torch.ops.fxforge.linear(x, weight_kn, bias, activation, residual, None)


@pytest.mark.parametrize("n,k", [(1, 1), (7, 3), (8, 16), (13, 17), (579, 100), (200, 300)])
@pytest.mark.parametrize("m", [1, 2, 3, GEMV_MAX_M, 6])
def test_shapes_off_the_block_and_vector_sizes(n, k, m):
    torch.manual_seed(n * 1000 + k * 10 + m)
    weight = torch.randn(n, k)
    bias, x, res = torch.randn(n), torch.randn(m, k), torch.randn(m, n)
    got = GemvLinear(weight, bias, "gelu")(x, res)
    assert_close_to_eager(got, _reference(x, weight.t(), bias, "gelu", res), f"M={m} N={n} K={k}")


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("activation", sorted(gemv_cpu.ACTIVATION_CODES))
def test_threads_and_activations_on_a_parallel_size(threads, activation):
    n, k = 333, 257                   # above PARALLEL_MIN_WEIGHTS, N not a multiple of 8
    assert n * k >= PARALLEL_MIN_WEIGHTS
    torch.manual_seed(threads)
    weight, bias, x = torch.randn(n, k), torch.randn(n), torch.randn(2, k)
    kernel = GemvLinear(weight, bias, activation)
    assert_close_to_eager(kernel(x, None, threads=threads),
                          _reference(x, weight.t(), bias, activation, None))


def test_strided_rows_and_residual():
    torch.manual_seed(7)
    weight = torch.randn(40, 24)
    wide = torch.randn(3, 50)
    x = wide[:, 5:29]                                 # row stride 50, unit stride in K
    residual = torch.randn(3, 80)[:, ::2]             # non-unit stride in N: made contiguous
    got = GemvLinear(weight, None, "none")(x, residual)
    assert_close_to_eager(got, _reference(x, weight.t(), None, "none", residual))
    x_t = torch.randn(24, 3).t()                      # unit stride along M only
    assert_close_to_eager(GemvLinear(weight, None, "relu")(x_t, None),
                          _reference(x_t, weight.t(), None, "relu", None))


def _bf16_valued(*shape):
    return torch.randn(*shape).to(torch.bfloat16).float()


@pytest.mark.parametrize("n,k", [(1, 1), (13, 17), (16, 8), (579, 100), (333, 257)])
@pytest.mark.parametrize("m", [1, 3, GEMV_MAX_M])
@pytest.mark.parametrize("threads", [1, 2])
def test_bf16_valued_weights_are_stored_in_bf16_and_stay_exact(n, k, m, threads):
    """Weights of format bf16 (on bf16 values: lossless) are stored in bf16, half the bytes a
    decode step reads; the math is fp32 on the same values, so the result is the fp32 linear's."""
    torch.manual_seed(n + 7 * k + m)
    weight, bias = _bf16_valued(n, k), torch.randn(n)
    x, res = torch.randn(m, k), torch.randn(m, n)
    kernel = GemvLinear(weight, bias, "silu", weight_format="bf16")
    assert kernel.storage == torch.bfloat16 and kernel.weight.dtype == torch.bfloat16
    assert "weights stored in bf16" in kernel.describe("fp32", True)
    assert_close_to_eager(kernel(x, res, threads=threads),
                          _reference(x, weight.t(), bias, "silu", res), f"M={m} N={n} K={k}")


def test_the_format_decides_the_storage_not_the_values():
    weight = _bf16_valued(20, 30)
    assert GemvLinear(weight, None, "none").storage == torch.float32      # dense: as it is
    torch.manual_seed(5)
    weight, x = torch.randn(20, 30), torch.randn(2, 30)                   # off the bf16 grid
    kernel = GemvLinear(weight, None, "gelu", weight_format="bf16")
    assert kernel.storage == torch.bfloat16                               # rounded, as the op
    want = torch.ops.fxforge.linear(x, weight.t(), None, "gelu", None, None, "bf16")
    assert_close_to_eager(kernel(x, None), want)


@pytest.mark.parametrize("name", ["int8_g32", "int4_g64"])
def test_a_format_the_gemv_does_not_store_is_a_clear_error(name):
    with pytest.raises(ValueError, match=f"gemv: weight format '{name}'.*not implemented"):
        GemvLinear(torch.randn(8, 16), None, "none", weight_format=name)
    with pytest.raises(ValueError, match=f"PackedLinear.*'{name}'.*runs dense, bf16"):
        PackedLinear(torch.randn(16, 8), weight_format=name)


def test_bf16_pack_layout():
    weight = torch.arange(18 * 3, dtype=torch.float32).reshape(18, 3)   # small ints: exact bf16
    packed = pack_weight(weight, torch.bfloat16)
    assert packed.shape == (2, 3, 8, 2)             # blocks of 16 rows, pairs (r_i, r_(8+i))
    assert torch.equal(packed[0, :, 2, 0].float(), weight[2])
    assert torch.equal(packed[0, :, 2, 1].float(), weight[10])
    assert torch.equal(packed[1, :, 1, 0].float(), weight[17])
    assert torch.count_nonzero(packed[1, :, 2:].float()) == 0   # rows past N are zero padding


def test_pack_weight_layout():
    weight = torch.arange(10 * 3, dtype=torch.float32).reshape(10, 3)
    packed = pack_weight(weight)
    assert packed.shape == (2, 3, 8)
    assert torch.equal(packed[0, :, 2], weight[2]) and torch.equal(packed[1, :, 1], weight[9])
    assert torch.count_nonzero(packed[1, :, 2:]) == 0    # rows past N are zero padding


def _count_gemv_calls(monkeypatch, weight, bias) -> list:
    calls = []
    monkeypatch.setattr(GemvLinear, "__call__", lambda self, x, r: calls.append(x.shape[0]) or
                        torch.ops.fxforge.linear(x, weight, bias, "silu", r, None))
    return calls


def test_varying_rows_fp32_weights_run_the_tiled_gemm_only(monkeypatch):
    """One fp32 copy: the tiled GEMM serves the decode steps too (it ties the GEMV at one row)."""
    torch.manual_seed(3)
    weight, bias = torch.randn(64, 48), torch.randn(48)     # [K, N]
    linear = PackedLinear(weight, bias, "silu", batch_hint=128, varying_rows=True)
    assert linear.candidate == "tiled" and linear.few_rows is None
    calls = _count_gemv_calls(monkeypatch, weight, bias)
    for m in (1, 2, GEMV_MAX_M + 1, 32):
        x = torch.randn(m, 64)
        assert_close_to_eager(linear(x), _reference(x, weight, bias, "silu", None), f"M={m}")
    assert calls == []


def test_varying_rows_bf16_weights_share_one_pack(monkeypatch):
    """bf16-valued weights: the tiled GEMM and the GEMV read the same packed tensor; the GEMV
    takes single-row calls."""
    torch.manual_seed(4)
    weight, bias = _bf16_valued(48, 64).t(), torch.randn(48)    # [K, N]
    linear = PackedLinear(weight, bias, "silu", batch_hint=128, varying_rows=True,
                          weight_format="bf16")
    assert linear.candidate == "tiled" and linear.impl.storage == torch.bfloat16
    assert linear.few_rows is not None and linear.few_rows.weight is linear.impl.panels
    assert "calls of <= 1 rows: C++ GEMV" in linear.describe()
    for m in (1, 3, 32):   # the real kernels on the shared pack
        x = torch.randn(m, 64)
        assert_close_to_eager(linear(x), _reference(x, weight, bias, "silu", None), f"M={m}")
    calls = _count_gemv_calls(monkeypatch, weight, bias)
    for m in (1, 2, 7):
        linear(torch.randn(m, 64))
    assert calls == [1]


def test_varying_rows_beside_aten_take_the_gemv_up_to_its_limit(monkeypatch):
    torch.manual_seed(5)
    weight, bias = torch.randn(64, 48), torch.randn(48)
    linear = PackedLinear(weight, bias, "silu", candidate="aten", batch_hint=128, varying_rows=True)
    assert linear.few_rows is not None and linear.few_rows_max == GEMV_MAX_M
    calls = _count_gemv_calls(monkeypatch, weight, bias)
    for m in (1, GEMV_MAX_M, GEMV_MAX_M + 1, 32):
        x = torch.randn(m, 64)
        assert_close_to_eager(linear(x), _reference(x, weight, bias, "silu", None), f"M={m}")
    assert calls == [1, GEMV_MAX_M]


def test_without_a_compiler_nothing_chooses_the_gemv(monkeypatch):
    monkeypatch.setattr(linear_cpu, "gemv_unavailable", lambda: "gemv: no compiler (test)")
    assert linear_cpu.default_candidate(1, 64, 64) == "aten"
    linear = PackedLinear(torch.randn(64, 32), batch_hint=128, varying_rows=True)
    assert linear.few_rows is None
    with pytest.raises(ValueError, match="no compiler"):
        PackedLinear(torch.randn(64, 32), candidate="gemv")
    kept, pruned = linear_cpu_space(1, 64, 32).survivors({"M": 1, "K": 64, "N": 32,
                                                          "dtype": "float32"})
    assert config_for("gemv") in pruned


def test_tuning_space_offers_the_gemv_for_few_rows_only():
    space = linear_cpu_space(1, 576, 1536)
    assert linear_cpu.candidate_of(space.default) == "gemv"
    kept, _ = space.survivors({"M": 1, "K": 576, "N": 1536, "dtype": "float32"})
    assert config_for("gemv") in kept
    _, pruned = space.survivors({"M": 128, "K": 576, "N": 1536, "dtype": "float32"})
    assert "more than" in pruned[config_for("gemv")]


def test_portable_build_matches(monkeypatch):
    """The loops a CPU without AVX2 runs (the same source built without -march=native)."""
    from fxforge.kernels import toolchain
    monkeypatch.setattr(toolchain, "FLAGS", tuple(f for f in toolchain.FLAGS if not f.startswith("-march")))
    monkeypatch.setattr(gemv_cpu, "_entry", gemv_cpu._entry.__wrapped__)
    torch.manual_seed(3)
    for weight, fmt in ((torch.randn(37, 21), "dense"), (_bf16_valued(37, 21), "bf16")):
        kernel = GemvLinear(weight, None, "relu", weight_format=fmt)
        assert kernel.storage == (torch.bfloat16 if fmt == "bf16" else torch.float32)
        x = torch.randn(2, 21)
        assert_close_to_eager(kernel(x, None), _reference(x, weight.t(), None, "relu", None))
