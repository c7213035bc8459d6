"""PackedLinear: every candidate and epilogue against the fxforge::linear reference."""
import pytest
import torch

import fxforge.irgraph.ops  # noqa: F401  (registers torch.ops.fxforge.linear)
from fxforge.irgraph.ops import ACTIVATIONS
from fxforge.kernels.cpu_isa import CPUFeatures, choose_matmul_path
from fxforge.kernels.linear_cpu import (CANDIDATES, LAYOUTS, LINEAR_CPU_SPACE, ONEDNN_MIN_M,
                                        ONEDNN_MIN_N, PackedLinear, _prune, candidate_of,
                                        config_for, default_candidate, linear_cpu_space,
                                        thread_counts,
                                        unavailable_reason, activate_)
from fxforge.kernels.gemm_cpu import BLOCKS
from fxforge.kernels.gemv_cpu import epilogue_available
from fxforge.kernels.tuning import Config
from fxforge.compiler import tolerance
from fxforge.testing import assert_close_to_eager

FP32_CANDIDATES = [c for c in CANDIDATES if unavailable_reason(c, torch.float32) is None]


def _reference(x, weight, bias, activation, residual, out_dtype=None):
    return torch.ops.fxforge.linear(x, weight, bias, activation, residual, out_dtype)


def _problem(m, k, n, bias=True, residual=False, dtype=torch.float32):
    x = torch.randn(m, k, dtype=dtype)
    weight = torch.randn(n, k, dtype=dtype).t()  # [K, N], as nn.Linear's weight arrives
    b = torch.randn(n, dtype=dtype) if bias else None
    r = torch.randn(m, n, dtype=dtype) if residual else None
    return x, weight, b, r


@pytest.mark.parametrize("candidate", FP32_CANDIDATES)
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("bias,residual", [(True, False), (False, False), (True, True), (False, True)])
def test_every_candidate_and_epilogue(candidate, activation, bias, residual):
    x, weight, b, r = _problem(5, 24, 40, bias, residual)
    linear = PackedLinear(weight, b, activation, residual, candidate=candidate, batch_hint=5)
    assert_close_to_eager(linear(x, r), _reference(x, weight, b, activation, r))


@pytest.mark.parametrize("candidate", FP32_CANDIDATES)
@pytest.mark.parametrize("m,k,n", [(1, 37, 29), (3, 1, 7), (17, 37, 29), (2, 64, 1)])
def test_odd_sizes_and_m1(candidate, m, k, n):
    x, weight, b, r = _problem(m, k, n, residual=True)
    linear = PackedLinear(weight, b, "gelu", True, candidate=candidate, batch_hint=m)
    assert_close_to_eager(linear(x, r), _reference(x, weight, b, "gelu", r))


@pytest.mark.parametrize("candidate", FP32_CANDIDATES)
def test_one_pack_serves_every_m(candidate):
    _, weight, b, _ = _problem(1, 24, 16)
    linear = PackedLinear(weight, b, "silu", candidate=candidate, batch_hint=8)
    for m in (8, 1, 13):
        x = torch.randn(m, 24)
        assert_close_to_eager(linear(x), _reference(x, weight, b, "silu", None), f"M={m}")


@pytest.mark.parametrize("candidate", FP32_CANDIDATES)
def test_non_contiguous_inputs(candidate):
    _, weight, b, _ = _problem(1, 24, 16)
    x_transposed = torch.randn(24, 6).t()
    x_strided = torch.randn(6, 48)[:, ::2]
    residual = torch.randn(16, 6).t()
    linear = PackedLinear(weight, b, "relu", True, candidate=candidate, batch_hint=6)
    for x in (x_transposed, x_strided):
        assert not x.is_contiguous()
        assert_close_to_eager(linear(x, residual), _reference(x, weight, b, "relu", residual))


@pytest.mark.parametrize("candidate", FP32_CANDIDATES)
def test_non_contiguous_weight_and_residual_without_activation(candidate):
    weight = torch.randn(20, 12)[:, ::2][:, :5]  # [K=20, N=5] with strides (12, 2)
    x, r, b = torch.randn(3, 20), torch.randn(5, 3).t(), torch.randn(5)
    linear = PackedLinear(weight, b, "none", True, candidate=candidate)
    assert_close_to_eager(linear(x, r), _reference(x, weight, b, "none", r))


@pytest.mark.parametrize("candidate,op", [("onednn", ("mkldnn", "_reorder_linear_weight")),
                                          ("mkl", ("mkl", "_mkl_reorder_linear_weight"))])
def test_weight_is_packed_once(monkeypatch, candidate, op):
    if unavailable_reason(candidate, torch.float32):
        pytest.skip(unavailable_reason(candidate, torch.float32))
    namespace = getattr(torch.ops, op[0])
    real, calls = getattr(namespace, op[1]), []
    monkeypatch.setattr(namespace, op[1], lambda *a, **kw: calls.append(a) or real(*a, **kw))
    x, weight, b, _ = _problem(4, 16, 8)
    linear = PackedLinear(weight, b, "gelu", candidate=candidate, batch_hint=4)
    assert len(calls) == 1
    for _ in range(3):
        linear(x)
    assert len(calls) == 1


@pytest.mark.parametrize("candidate", FP32_CANDIDATES)
def test_weight_is_snapshotted_at_build(candidate):
    x, weight, b, _ = _problem(3, 16, 8)
    expected = _reference(x, weight, b, "none", None)
    linear = PackedLinear(weight, b, candidate=candidate, batch_hint=3)
    weight.mul_(2.0)  # a later change to the source tensor never reaches the prepared weight
    assert_close_to_eager(linear(x), expected)


def test_out_dtype_and_bf16_inputs_on_the_fp32_path():
    x, weight, b, r = _problem(4, 16, 8, residual=True, dtype=torch.bfloat16)
    no_bf16 = CPUFeatures(avx2=True, fma=True)
    linear = PackedLinear(weight, b, "gelu_tanh", True, path=choose_matmul_path(torch.bfloat16, no_bf16))
    assert linear.compute_dtype == torch.float32
    y = linear(x, r)
    assert y.dtype == torch.bfloat16
    assert_close_to_eager(y, _reference(x.float(), weight.float(), b.float(), "gelu_tanh",
                                        r.float()).bfloat16())
    assert "neither AMX-BF16 nor AVX512-BF16" in linear.describe()
    x32, w32, b32, _ = _problem(4, 16, 8)
    cast = PackedLinear(w32, b32, "relu", out_dtype=torch.bfloat16)
    assert_close_to_eager(cast(x32), _reference(x32, w32, b32, "relu", None, torch.bfloat16))


def _assert_close_in_bf16(got, x, weight, bias, residual, what):
    """``silu(x @ weight + bias) + residual`` computed in bf16 by any order of roundings: each
    addend is rounded to bf16 on one path and not on another, so the error bound scales with the
    addends' magnitudes, not with their sum's (which cancellation can make tiny)."""
    rtol, atol = tolerance(torch.bfloat16)
    activated = torch.nn.functional.silu(x.double() @ weight.double() + bias.double())
    exact = activated + residual.double()
    bound = rtol * (activated.abs() + residual.abs()) + atol
    error = (got.double() - exact).abs()
    assert got.dtype == torch.bfloat16 and bool((error <= bound).all()), \
        f"{what}: max error {error.max().item():.3g}, over the bound by {(error - bound).max().item():.3g}"


def test_bf16_path_as_if_on_an_amx_cpu():
    """FXFORGE_CPU_ISA-style dispatch to bf16: the candidates that run bf16 here compute it."""
    amx = choose_matmul_path(torch.bfloat16, CPUFeatures(amx_tile=True, amx_bf16=True, avx2=True))
    x, weight, b, r = _problem(3, 16, 8, residual=True, dtype=torch.bfloat16)
    runnable = [c for c in CANDIDATES if unavailable_reason(c, torch.bfloat16) is None]
    assert "aten" in runnable and "mkl" not in runnable
    for candidate in runnable:
        linear = PackedLinear(weight, b, "silu", True, path=amx, candidate=candidate)
        assert linear.compute_dtype == torch.bfloat16
        _assert_close_in_bf16(linear(x, r), x, weight, b, r, candidate)
    for candidate in set(CANDIDATES) - set(runnable):
        with pytest.raises(ValueError, match=candidate):
            PackedLinear(weight, b, path=amx, candidate=candidate)


def test_tuning_space_prunes_what_cannot_run():
    threads = thread_counts()
    assert threads[-1] == torch.get_num_threads() and threads == sorted(set(threads))
    # every candidate at every thread count, aten in both weight layouts, tiled in each blocking
    assert len(LINEAR_CPU_SPACE.configs) == (len(CANDIDATES) + 1 + len(BLOCKS) - 1) * len(threads)
    assert {candidate_of(c) for c in LINEAR_CPU_SPACE.configs} == set(CANDIDATES)
    kept, pruned = LINEAR_CPU_SPACE.survivors({"M": 4, "K": 16, "N": 8, "dtype": torch.bfloat16})
    assert config_for("mkl") in pruned and config_for("aten") in kept
    assert "fp32 only" in pruned[config_for("mkl")]
    kept32, _ = LINEAR_CPU_SPACE.survivors({"M": 4, "K": 16, "N": 8, "dtype": "float32"})
    assert {candidate_of(c) for c in kept32} == set(FP32_CANDIDATES)
    assert LINEAR_CPU_SPACE.default in LINEAR_CPU_SPACE.configs
    bad_layout = Config.of(candidate=CANDIDATES.index("onednn"), threads=1, layout=1)
    assert "aten" in _prune(bad_layout, {"dtype": torch.float32})


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("threads", [1, 2])
def test_aten_layouts_and_thread_knob_match_reference(layout, threads):
    x, weight, b, res = _problem(7, 48, 40, residual=True)
    linear = PackedLinear(weight, b, "silu", True, candidate="aten", batch_hint=7, threads=threads,
                          layout=layout)
    before = torch.get_num_threads()
    assert_close_to_eager([linear(x, res)], [_reference(x, weight, b, "silu", res)])
    assert torch.get_num_threads() == before   # the knob never leaks out of the call


@pytest.mark.parametrize("m,k,n", [(1, 256, 256), (1, 256, 8192), (128, 1024, 256), (128, 256, 8192)])
def test_default_candidate_without_the_cpp_kernels_is_the_library_rule(monkeypatch, m, k, n):
    """The rule where fxforge's C++ GEMV/GEMM cannot be built (the rule with them: test_gemm_cpu)."""
    from fxforge.kernels import linear_cpu
    monkeypatch.setattr(linear_cpu, "gemv_unavailable", lambda: "gemv: no compiler (test)")
    monkeypatch.setattr(linear_cpu, "gemm_unavailable", lambda: "tiled: no compiler (test)")
    name = default_candidate(m, k, n)
    onednn_runs = unavailable_reason("onednn", torch.float32) is None
    assert name == ("onednn" if m >= ONEDNN_MIN_M and n >= ONEDNN_MIN_N and onednn_runs else "aten")
    assert default_candidate(m, k, n, torch.bfloat16) in ("onednn", "aten")
    assert PackedLinear(torch.randn(k, n), batch_hint=m).candidate == name


def test_describe_names_the_path():
    _, weight, b, _ = _problem(1, 8, 4)
    texts = {c: PackedLinear(weight, b, "gelu", candidate=c).describe() for c in FP32_CANDIDATES}
    if "onednn" in texts:
        assert texts["onednn"] == "oneDNN fp32 linear, prepacked, post-op gelu"
        fused_add = PackedLinear(weight, b, "none", True, candidate="onednn").describe()
        assert fused_add == "oneDNN fp32 linear, prepacked, residual: binary post-op add"
    where = "one vectorized C++ pass" if epilogue_available() else "in place"
    assert texts["aten"] == f"aten addmm fp32, weight pre-transposed contiguous [K,N], epilogue {where}: gelu"
    no_bias = PackedLinear(weight, None, "none", True, candidate="aten").describe()
    assert no_bias == "aten mm fp32, weight pre-transposed contiguous [K,N], epilogue in place: residual add_"


def test_bad_inputs_are_clear_errors():
    x, weight, b, r = _problem(2, 8, 4, residual=True)
    with pytest.raises(ValueError, match="activation"):
        PackedLinear(weight, b, "tanh")
    linear = PackedLinear(weight, b, "none", True)
    with pytest.raises(ValueError, match="K=8"):
        linear(torch.randn(2, 9), r)
    with pytest.raises(ValueError, match="has_residual"):
        linear(x)
    with pytest.raises(ValueError, match="residual"):
        linear(x, torch.randn(2, 5))
    with pytest.raises(ValueError, match="quantized"):
        PackedLinear(weight, path=choose_matmul_path(torch.int8, CPUFeatures(avx512_vnni=True)))


def test_bf16_linears_can_be_tuned_to_an_fp32_gemm(monkeypatch):
    """On a CPU with a bf16 path the space offers the fp32 GEMM too; a search over it (forced
    here through FXFORGE_CPU_ISA, measured with this CPU's kernels) checks every candidate
    against the bf16 reference and picks a valid one."""
    from fxforge.autotune.search import search
    from fxforge.autotune.task import make_tunable
    from fxforge.kernels.linear_cpu_tuning import linear_task

    monkeypatch.setenv("FXFORGE_CPU_ISA", "avx512_bf16")
    assert choose_matmul_path(torch.bfloat16).compute_dtype == torch.bfloat16
    space = linear_cpu_space(4, 32, 24, torch.bfloat16)
    assert {c["fp32"] for c in space.configs} == {0, 1}
    assert {c["fp32"] for c in linear_cpu_space(4, 32, 24, torch.float32).configs} == {0}
    result = search(make_tunable(linear_task(4, 32, 24, torch.bfloat16, "silu", True, False)),
                    strategy="exhaustive", rounds=2)
    statuses = {r.config: r.status for r in result.records}
    assert all(statuses[c] == "ok" for c in space.configs if c["fp32"] and
               statuses[c] != "pruned"), result.records
    assert statuses[result.best] == "ok"


@pytest.mark.skipif(not epilogue_available(), reason="no C++ compiler for the epilogue kernel")
@pytest.mark.parametrize("activation", ["relu", "silu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("m,n", [(1, 1), (3, 17), (128, 300)])
def test_library_gemm_epilogue_kernel_matches_aten(activation, residual, m, n):
    """The vectorized C++ epilogue after a library GEMM gives ATen's activation (+ residual)."""
    from fxforge.kernels.gemv_cpu import epilogue_
    wide = torch.randn(m, n + 5)
    y = wide[:, 2:n + 2]                                   # row stride n + 5, unit stride in N
    res = torch.randn(m, n) if residual else None
    want = activate_(y.clone(), activation) + (res if residual else 0)
    assert epilogue_(y, activation, res)
    assert_close_to_eager(y, want, f"{activation} M={m} N={n}")


def test_epilogue_kernel_declines_what_it_cannot_take():
    from fxforge.kernels.gemv_cpu import epilogue_
    assert not epilogue_(torch.randn(4, 6).t(), "gelu", None)          # N not unit-stride
    assert not epilogue_(torch.randn(4, 6, dtype=torch.float64), "gelu", None)
    assert not epilogue_(torch.randn(2, 4, 6), "gelu", None)
    assert not epilogue_(torch.randn(4, 6), "gelu", torch.randn(6))     # a broadcast residual


@pytest.mark.parametrize("candidate", [c for c in ("tiled", "gemv", "aten") if c in FP32_CANDIDATES])
def test_a_tuned_thread_count_reaches_the_cpp_kernels_as_an_argument(monkeypatch, candidate):
    """Several Python threads may call one compiled graph: a C++ kernel gets its tuned thread
    count as an argument and leaves torch's setting alone (which is also the count threads that
    have not run a parallel op yet start with); only a library path sets it around its call."""
    torch.manual_seed(0)
    weight, b = torch.randn(64, 48), torch.randn(48)
    threads = torch.get_num_threads() + 1
    linear = PackedLinear(weight, b, "relu", candidate=candidate, batch_hint=4, threads=threads)
    settings = []
    real_set = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (settings.append(n), real_set(n)))
    x = torch.randn(4, 64)
    assert_close_to_eager(linear(x), torch.relu(x @ weight + b))
    assert settings == ([] if candidate != "aten" else [threads, threads - 1])


@pytest.mark.parametrize("candidate", CANDIDATES)
@pytest.mark.parametrize("m", [1, 9])
def test_weight_format_bf16_on_every_candidate_matches_the_reference(candidate, m):
    """The format comes from the op: the C++ kernels store the weight in bf16, the libraries get
    its bf16-rounded values; every one computes the op's reference on the rounded weight."""
    if unavailable_reason(candidate, torch.float32) is not None:
        pytest.skip(unavailable_reason(candidate, torch.float32))
    if candidate == "gemv" and m > 4:
        pytest.skip("the GEMV takes few rows")
    g = torch.Generator().manual_seed(len(candidate) * 10 + m)
    x, weight = torch.randn(m, 48, generator=g), torch.randn(48, 40, generator=g) / 7
    bias, residual = torch.randn(40, generator=g), torch.randn(m, 40, generator=g)
    linear = PackedLinear(weight, bias, "silu", True, candidate=candidate, batch_hint=m,
                          weight_format="bf16")
    want = torch.ops.fxforge.linear(x, weight, bias, "silu", residual, None, "bf16")
    assert_close_to_eager(linear(x, residual), want, candidate)
    if candidate in ("gemv", "tiled"):
        assert linear.impl.storage == torch.bfloat16
