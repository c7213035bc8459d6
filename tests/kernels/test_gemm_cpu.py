"""The register-tiled C++ GEMM (kernels/gemm_cpu.py) against the fxforge::linear reference, and
how PackedLinear and the default rule pick it."""
import pytest
import torch

import fxforge.irgraph.ops  # noqa: F401  (registers torch.ops.fxforge.linear)
from fxforge.kernels import gemm_cpu, linear_cpu
from fxforge.kernels.gemm_cpu import (BLOCKS, PANEL, PARALLEL_MIN_MACS, TiledLinear, pack_panels,
                                      tile_rows)
from fxforge.kernels.gemv_cpu import ACTIVATION_CODES, GEMV_MAX_M
from fxforge.kernels.linear_cpu import (PackedLinear, config_for, default_candidate,
                                        linear_cpu_space, unavailable_reason)
from fxforge.testing import assert_close_to_eager

pytestmark = pytest.mark.skipif(gemm_cpu.gemm_unavailable() is not None,
                                reason="no C++ compiler for the tiled GEMM")


# the weight format (irgraph/weight_format.py) that makes the kernel store its weight so
FORMAT = {torch.float32: "dense", torch.bfloat16: "bf16"}


def _operands(m, k, n, seed, residual=True, storage=torch.float32):
    """x, weight [K, N] scaled like nn.Linear's init (sums stay O(1): fp32 tolerances fit any K),
    bias, residual; fresh values per shape. ``storage`` bf16: weights with bf16 values (format
    "bf16" then keeps them in bf16 panels, with the fp32 reference's results)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    weight = (torch.randn(k, n, generator=g) / max(k, 1) ** 0.5).to(storage).float()
    bias = torch.randn(n, generator=g)
    res = torch.randn(m, n, generator=g) if residual else None
    return x, weight, bias, res


def _reference(x, weight_kn, bias, activation, residual):
    return torch.ops.fxforge.linear(x, weight_kn, bias, activation, residual, None)


# rows around the 6- and 12-row tiles (tile_rows(): which one this build has), the 24-row
# strips and the 96/120/240-row blocks; columns around the 16-wide panels; K around the
# 256/1024 chunks
@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (5, 3, 17), (6, 16, 16), (7, 257, 15), (9, 33, 31),
                                   (12, 20, 16), (13, 17, 40), (25, 40, 33), (97, 64, 48),
                                   (121, 20, 20), (250, 64, 100), (3, 1025, 18)])
@pytest.mark.parametrize("block", range(len(BLOCKS)))
@pytest.mark.parametrize("storage", [torch.float32, torch.bfloat16])
def test_shapes_across_tile_and_block_edges(m, k, n, block, storage):
    x, weight, bias, res = _operands(m, k, n, seed=m * 7919 + k * 31 + n + block, storage=storage)
    kernel = TiledLinear(weight.t().contiguous(), bias, "gelu", block, FORMAT[storage])
    assert kernel.storage == storage
    assert_close_to_eager(kernel(x, res), _reference(x, weight, bias, "gelu", res),
                          f"{m}x{k}x{n} block {block} {storage}")


@pytest.mark.parametrize("activation", sorted(ACTIVATION_CODES))
@pytest.mark.parametrize("bias,residual", [(True, False), (False, True), (False, False)])
@pytest.mark.parametrize("threads", [1, 2])
def test_epilogues_and_threads(activation, bias, residual, threads):
    m, k, n = 37, 128, 70
    assert m * k * n >= PARALLEL_MIN_MACS                  # a size that runs the parallel region
    seed = sorted(ACTIVATION_CODES).index(activation) * 8 + bias * 4 + residual * 2 + threads
    storage = torch.bfloat16 if seed % 2 else torch.float32   # half the cases on bf16 panels
    x, weight, b, res = _operands(m, k, n, seed=seed, residual=residual, storage=storage)
    b = b if bias else None
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = TiledLinear(weight.t().contiguous(), b, activation,
                          weight_format=FORMAT[storage])(x, res)
    finally:
        torch.set_num_threads(before)
    assert_close_to_eager(got, _reference(x, weight, b, activation, res), activation)


def test_strided_inputs():
    x, weight, bias, _ = _operands(9, 24, 40, seed=11)
    kernel = TiledLinear(weight.t().contiguous(), bias, "relu")
    rows_of_a_wider_tensor = torch.randn(9, 50)[:, 5:29]           # row stride 50
    residual_every_other = torch.randn(9, 80)[:, ::2]              # non-unit stride: copied
    transposed = torch.randn(24, 9).t()                            # unit stride along M only
    for a, r in ((rows_of_a_wider_tensor, residual_every_other), (transposed, None)):
        assert_close_to_eager(kernel(a, r), _reference(a, weight, bias, "relu", r))


@pytest.mark.parametrize("storage", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", ["tile", "more"])   # bf16: inline widening, the widened chunk
def test_nonfinite_values_propagate_as_in_the_reference(storage, rows):
    m = tile_rows() - 3 if rows == "tile" else tile_rows() + 2
    x, weight, bias, res = _operands(m, 20, 18, seed=5, storage=storage)
    x[1, 3], x[m - 1, 0], weight[2, 17], weight[5, 3] = (float("nan"), float("inf"), float("-inf"),
                                                         float("nan"))
    kernel = TiledLinear(weight.t().contiguous(), bias, "none", weight_format=FORMAT[storage])
    assert kernel.storage == storage
    got = kernel(x, res)
    assert_close_to_eager(got, _reference(x, weight, bias, "none", res))
    assert got.isnan().any() and got.isinf().any()


def test_empty_rows_and_zero_k():
    x, weight, bias, res = _operands(0, 8, 5, seed=1)
    assert TiledLinear(weight.t().contiguous(), bias, "none")(x, res).shape == (0, 5)
    x, weight, bias, res = _operands(3, 0, 5, seed=2)
    got = TiledLinear(weight.t().contiguous(), bias, "silu")(x, res)
    assert_close_to_eager(got, _reference(x, weight, bias, "silu", res))


def test_bf16_panels_are_the_gemvs_pack_and_shared():
    """Format bf16: half the bytes, in the GEMV's bf16 layout, one tensor for both kernels
    and for every kernel made from equal weights (kernels/shared_packs.py)."""
    from fxforge.kernels.gemv_cpu import GemvLinear, pack_weight
    _, weight, bias, _ = _operands(1, 40, 37, seed=21, storage=torch.bfloat16)
    weight_nk = weight.t().contiguous()
    tiled = TiledLinear(weight_nk, bias, "none", weight_format="bf16")
    assert tiled.panels.dtype == torch.bfloat16
    assert torch.equal(tiled.panels, pack_weight(weight_nk, torch.bfloat16))
    assert GemvLinear(weight_nk.clone(), None, "relu", weight_format="bf16").weight is tiled.panels
    assert TiledLinear(weight_nk.clone(), None, "silu", block=1,
                       weight_format="bf16").panels is tiled.panels
    other = weight_nk.clone()
    other[3, 4] = other[3, 4] * 2 + 1
    assert TiledLinear(other, bias, "none", weight_format="bf16").panels is not tiled.panels
    # the format decides, not the values: the same bf16 values, dense, stay fp32 panels
    assert TiledLinear(weight_nk, bias, "none").panels.dtype == torch.float32


def test_format_bf16_rounds_any_fp32_weight_as_the_reference_does():
    """Format bf16 on weights off the bf16 grid: the kernel stores them rounded to nearest even,
    exactly as the op's reference decodes them, so results match it and not the fp32 linear."""
    x, weight, bias, res = _operands(7, 48, 37, seed=33)
    assert not torch.equal(weight.to(torch.bfloat16).float(), weight)
    kernel = TiledLinear(weight.t().contiguous(), bias, "silu", weight_format="bf16")
    assert kernel.storage == torch.bfloat16 and "weight format bf16" in kernel.describe("fp32", True)
    want = torch.ops.fxforge.linear(x, weight, bias, "silu", res, None, "bf16")
    assert_close_to_eager(kernel(x, res), want)
    assert not torch.allclose(want, _reference(x, weight, bias, "silu", res), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["int8_g32", "int8_channel"])
def test_a_format_the_kernel_does_not_store_is_a_clear_error(name):
    _, weight, bias, _ = _operands(1, 16, 8, seed=3)
    with pytest.raises(ValueError, match=f"tiled GEMM: weight format '{name}'.*not implemented"):
        TiledLinear(weight.t().contiguous(), bias, "none", weight_format=name)
    with pytest.raises(ValueError, match="unknown weight format 'bf17'"):
        TiledLinear(weight.t().contiguous(), bias, "none", weight_format="bf17")


def test_panels_hold_the_weight_in_kernel_order():
    weight_nk = torch.randn(21, 5)
    panels = pack_panels(weight_nk)
    assert panels.shape == (2, 5, PANEL) and panels.is_contiguous()
    assert torch.equal(panels[1, :, :5], weight_nk[16:].t()) and not panels[1, :, 5:].any()
    with pytest.raises(ValueError, match="fp32"):
        TiledLinear(weight_nk.double(), None, "none")
    with pytest.raises(ValueError, match="fp32 x"):
        TiledLinear(weight_nk, None, "none")(torch.randn(3, 5, dtype=torch.float64), None)


@pytest.mark.parametrize("m,k,n,expected", [
    (1, 256, 256, "gemv"), (1, 256, 8192, "gemv"), (2, 256, 8192, "tiled"),
    (GEMV_MAX_M, 256, 256, "tiled"),
    (128, 1024, 256, "tiled"), (128, 256, 8192, "tiled"), (512, 576, 3072, "tiled")])
def test_default_rule(m, k, n, expected):
    if expected == "gemv" and unavailable_reason("gemv", torch.float32) is not None:
        pytest.skip("the GEMV cannot run here")
    assert default_candidate(m, k, n) == expected
    linear = PackedLinear(torch.randn(k, n), batch_hint=m)
    assert linear.candidate == expected
    if expected == "tiled":
        assert (linear.impl.kc, linear.impl.mc) == BLOCKS[0]
        assert "C++ tiled GEMM" in linear.describe()
    assert default_candidate(m, k, n, torch.bfloat16) in ("onednn", "aten")   # fp32-only kernel


def test_tuning_space_offers_each_blocking_for_the_tiled_candidate_only():
    space = linear_cpu_space(128, 128, 384)
    tiled = [c for c in space.configs if linear_cpu.candidate_of(c) == "tiled"]
    assert {c["block"] for c in tiled} == set(range(len(BLOCKS)))
    assert linear_cpu.candidate_of(space.default) == "tiled"
    kept, pruned = space.survivors({"M": 128, "K": 128, "N": 384, "dtype": "float32"})
    assert set(tiled) <= set(kept)
    _, pruned16 = space.survivors({"M": 128, "K": 128, "N": 384, "dtype": "bfloat16"})
    assert "fp32 only" in pruned16[config_for("tiled")]
    odd = config_for("aten", block=1)
    assert "tiled candidate only" in linear_cpu._prune(odd, {"dtype": torch.float32})


def test_without_a_compiler_the_libraries_run(monkeypatch):
    monkeypatch.setattr(linear_cpu, "gemm_unavailable", lambda: "tiled: no compiler (test)")
    assert default_candidate(128, 128, 384) == "aten"
    with pytest.raises(ValueError, match="no compiler"):
        PackedLinear(torch.randn(16, 8), candidate="tiled")


def test_portable_build_matches(monkeypatch):
    """The code a CPU without AVX2 runs (the same source built without -march=native)."""
    from fxforge.kernels import toolchain
    monkeypatch.setattr(toolchain, "FLAGS", tuple(f for f in toolchain.FLAGS if not f.startswith("-march")))
    monkeypatch.setattr(gemm_cpu, "_entry", gemm_cpu._entry.__wrapped__)
    x, weight, bias, res = _operands(13, 33, 40, seed=9)
    got = TiledLinear(weight.t().contiguous(), bias, "gelu_tanh")(x, res)
    assert_close_to_eager(got, _reference(x, weight, bias, "gelu_tanh", res))


def test_tile_rows_follow_the_vector_registers_of_the_build():
    """12-row tiles exactly where the build targets AVX-512VL (32 vector registers), else 6;
    a build for another -march (FXFORGE_CXXFLAGS) decides for itself."""
    import os
    if os.environ.get("FXFORGE_CXXFLAGS"):
        assert tile_rows() in (6, 12)
        return
    with open("/proc/cpuinfo") as f:
        has_vl = "avx512vl" in f.read().split()
    assert tile_rows() == (12 if has_vl else 6)
    assert f"{tile_rows()}-row tiles" in TiledLinear(torch.randn(4, 3), None, "none").describe("fp32", False)
