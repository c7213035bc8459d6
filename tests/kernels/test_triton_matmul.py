"""The Triton matmul + epilogue kernel against the eager ``fxforge.linear`` op.

CPU tests run the kernel under ``TRITON_INTERPRET=1`` (how CI runs them) on tiny shapes; tests
marked ``gpu`` run larger shapes on CUDA.
"""
import pytest
import torch

pytest.importorskip("triton")

from fxforge.kernels.matmul import (  # noqa: E402
    CONFIGS, TUNING_SPACE, choose_config, interpreting, linear_problem, linear_reference, prune,
    triton_linear,
)
from fxforge.kernels.tuning import Config  # noqa: E402

# The kernel keeps fp32 through the epilogue; eager rounds to the input dtype after each op.
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-3}
ACTS = ["none", "relu", "gelu", "gelu_tanh", "silu"]

needs_interpreter = pytest.mark.skipif(not interpreting(), reason="CPU runs need TRITON_INTERPRET=1")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available() or interpreting(),
                                   reason="needs CUDA (and no TRITON_INTERPRET)")


def _operands(M, N, K, dtype, device="cpu", bias=True, residual=True, transposed_weight=True):
    """x [M, K]; weight [K, N] as nn.Linear's transposed view, scaled so outputs are O(1)."""
    x = torch.randn(M, K, device=device).to(dtype)
    if transposed_weight:
        weight = (torch.randn(N, K, device=device) / K**0.5).to(dtype).t()
    else:
        weight = (torch.randn(K, N, device=device) / K**0.5).to(dtype)
    b = torch.randn(N, device=device).to(dtype) if bias else None
    r = torch.randn(M, N, device=device).to(dtype) if residual else None
    return x, weight, b, r


def _check(actual, expected):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    tol = TOL[expected.dtype]
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)


def _run_both(x, weight, bias=None, activation="none", residual=None, out_dtype=None, config=None):
    got = triton_linear(x, weight, bias, activation, residual, out_dtype, config=config)
    _check(got, linear_reference(x, weight, bias, activation, residual, out_dtype))


@needs_interpreter
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_activation_with_bias_and_residual(activation, dtype):
    x, weight, bias, residual = _operands(37, 29, 45, dtype)
    _run_both(x, weight, bias, activation, residual)


@needs_interpreter
@pytest.mark.parametrize("bias,residual", [(False, False), (True, False), (False, True)])
def test_epilogue_parts_alone(bias, residual):
    x, weight, b, r = _operands(24, 40, 33, torch.float32, bias=bias, residual=residual)
    _run_both(x, weight, b, "gelu" if bias else "none", r)


@needs_interpreter
def test_float16():
    x, weight, bias, residual = _operands(20, 48, 64, torch.float16)
    _run_both(x, weight, bias, "silu", residual)


@needs_interpreter
@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (5, 7, 3), (33, 17, 65), (64, 64, 64), (2, 96, 40)])
def test_sizes_that_are_not_block_multiples(M, N, K):
    x, weight, bias, residual = _operands(M, N, K, torch.float32)
    _run_both(x, weight, bias, "relu", residual)


@needs_interpreter
def test_arbitrary_strides():
    base = torch.randn(30, 2 * 48)
    x = base[:, ::2]                       # non-contiguous columns
    weight = (torch.randn(48, 36) / 7).t().contiguous().t()  # column-major [K, N]
    residual = torch.randn(36, 30).t()     # transposed residual
    assert not x.is_contiguous() and not residual.is_contiguous()
    strided_bias = torch.randn(72)[::2]
    _run_both(x, weight, strided_bias, "gelu_tanh", residual)
    x2, w2, b2, _ = _operands(30, 36, 48, torch.float32, residual=False, transposed_weight=False)
    _run_both(x2, w2, b2, "silu")


@needs_interpreter
def test_out_dtype_and_residual_promotion():
    x, weight, bias, _ = _operands(16, 24, 32, torch.float32)
    _run_both(x, weight, bias, "relu", None, out_dtype=torch.bfloat16)
    xb, wb, bb, _ = _operands(16, 24, 32, torch.bfloat16)
    residual32 = torch.randn(16, 24)
    got = triton_linear(xb, wb, bb, "none", residual32)
    assert got.dtype == torch.float32  # bf16 + fp32 residual promotes, as eager does
    torch.testing.assert_close(got, linear_reference(xb, wb, bb, "none", residual32), rtol=2e-2, atol=2e-2)


@needs_interpreter
def test_empty_reduction_is_the_epilogue_alone():
    x, weight, bias, residual = _operands(4, 6, 0, torch.float32)
    _run_both(x, weight, bias, "gelu", residual)


@needs_interpreter
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.describe())
def test_every_config_is_correct(config):
    x, weight, bias, residual = _operands(40, 72, 50, torch.float32)
    _run_both(x, weight, bias, "gelu", residual, config=config)


def test_prune_rules():
    big = Config.of(num_warps=8, num_stages=3, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, GROUP_M=8)
    square = {"M": 4096, "N": 4096, "K": 4096}
    assert prune(big, {**square, "dtype": torch.bfloat16}) is None
    assert "shared memory" in prune(big, {**square, "dtype": torch.float32})
    assert "shared memory" in prune(big, {**square, "dtype": torch.bfloat16, "smem_limit": 100_000})
    assert "BLOCK_M" in prune(big, {**square, "M": 1, "dtype": torch.bfloat16})
    spilling = Config.of(num_warps=2, num_stages=2, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8)
    assert "registers" in prune(spilling, {**square, "dtype": torch.bfloat16})


@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (1, 576, 576), (7, 1536, 576), (4096, 4096, 4096)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_some_config_survives_every_problem(M, N, K, dtype):
    problem = {"M": M, "N": N, "K": K, "dtype": dtype}
    survivors, pruned = TUNING_SPACE.survivors(problem)
    assert survivors and all(isinstance(reason, str) for reason in pruned.values())
    assert choose_config(problem) in survivors


def test_bad_inputs_raise_clear_errors():
    x, weight, bias, residual = _operands(4, 6, 8, torch.float32)
    cases = [
        ((x[0], weight), {}, "2-D"),
        ((x, weight[:5]), {}, "K mismatch"),
        ((x, weight), {"activation": "tanh"}, "unknown activation"),
        ((x, weight.double()), {}, "share one of"),
        ((x, weight), {"bias": torch.randn(5)}, "bias"),
        ((x, weight), {"residual": torch.randn(6, 4)}, "residual"),
        ((x, weight.to("meta")), {}, "different devices"),
    ]
    for args, kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            triton_linear(*args, **kwargs)


def test_problem_key():
    x, weight, _, _ = _operands(3, 5, 7, torch.bfloat16)
    assert linear_problem(x, weight) == {"M": 3, "N": 5, "K": 7, "dtype": torch.bfloat16}


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("activation", ["none", "gelu", "silu"])
@pytest.mark.parametrize("M,N,K", [(512, 768, 1024), (3, 1536, 576), (333, 257, 129)])
def test_gpu_against_eager(dtype, activation, M, N, K):
    x, weight, bias, residual = _operands(M, N, K, dtype, device="cuda")
    _run_both(x, weight, bias, activation, residual)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_every_surviving_config(dtype):
    x, weight, bias, residual = _operands(1000, 1000, 1000, dtype, device="cuda")
    survivors, _ = TUNING_SPACE.survivors(linear_problem(x, weight))
    for config in survivors:
        _run_both(x, weight, bias, "gelu_tanh", residual, config=config)
