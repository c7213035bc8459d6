"""The Triton flash-attention forward against eager ``F.scaled_dot_product_attention``.

CPU tests run the kernel under ``TRITON_INTERPRET=1`` (how CI runs them) on tiny shapes; tests
marked ``gpu`` run larger shapes on CUDA.
"""
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from fxforge.kernels.attention import (  # noqa: E402
    CONFIGS, TUNING_SPACE, attention_problem, attention_reference, choose_config, prune,
    triton_attention,
)
from fxforge.kernels.matmul import interpreting  # noqa: E402
from fxforge.kernels.tuning import Config  # noqa: E402

TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-3}

needs_interpreter = pytest.mark.skipif(not interpreting(), reason="CPU runs need TRITON_INTERPRET=1")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available() or interpreting(),
                                   reason="needs CUDA (and no TRITON_INTERPRET)")


def _qkv(B, H, Hkv, Lq, Lk, D, dtype=torch.float32, device="cpu"):
    q = torch.randn(B, H, Lq, D, device=device).to(dtype)
    k = torch.randn(B, Hkv, Lk, D, device=device).to(dtype)
    v = torch.randn(B, Hkv, Lk, D, device=device).to(dtype)
    return q, k, v


def _check_against_torch(q, k, v, config=None, **kwargs):
    got = triton_attention(q, k, v, config=config, **kwargs)
    expected = F.scaled_dot_product_attention(q, k, v, **kwargs)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    tol = TOL[q.dtype]
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)


@needs_interpreter
@pytest.mark.parametrize("D", [16, 32, 64])
@pytest.mark.parametrize("is_causal", [False, True])
def test_head_dims_and_causal(D, is_causal):
    _check_against_torch(*_qkv(2, 2, 2, 37, 37, D), is_causal=is_causal)


@needs_interpreter
@pytest.mark.parametrize("D", [128, 80, 8])
def test_head_dim_128_and_padded_head_dims(D):
    _check_against_torch(*_qkv(1, 1, 1, 20, 24, D), is_causal=D != 80)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(dtype):
    _check_against_torch(*_qkv(1, 2, 2, 33, 33, 64, dtype), is_causal=True)
    _check_against_torch(*_qkv(1, 2, 2, 17, 40, 32, dtype))


@needs_interpreter
@pytest.mark.parametrize("Lq,Lk", [(9, 50), (1, 33), (50, 9)])
def test_causal_with_different_query_and_key_lengths(Lq, Lk):
    """torch aligns the causal mask top-left: query i sees keys 0..i whatever Lq and Lk are."""
    _check_against_torch(*_qkv(1, 2, 2, Lq, Lk, 16), is_causal=True)


@needs_interpreter
@pytest.mark.parametrize("Hkv", [1, 2])
def test_grouped_query_attention(Hkv):
    _check_against_torch(*_qkv(2, 4, Hkv, 21, 21, 32), is_causal=True, enable_gqa=True)


@needs_interpreter
@pytest.mark.parametrize("mask_shape", [(19, 27), (2, 1, 19, 27), (2, 3, 19, 27), (1, 3, 1, 27)])
def test_bool_masks_broadcast(mask_shape):
    mask = torch.rand(mask_shape) > 0.4
    _check_against_torch(*_qkv(2, 3, 3, 19, 27, 16), attn_mask=mask)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_additive_float_mask_with_padding(dtype):
    q, k, v = _qkv(2, 2, 2, 18, 30, 32, dtype)
    mask = torch.randn(2, 1, 18, 30).to(dtype)
    mask[1, ..., 25:] = float("-inf")  # right padding of the second sequence
    _check_against_torch(q, k, v, attn_mask=mask)


@needs_interpreter
def test_rows_with_nothing_to_attend_give_zeros():
    q, k, v = _qkv(1, 2, 2, 6, 10, 16)
    keep = torch.rand(6, 10) > 0.3
    keep[2] = False
    additive = torch.zeros(6, 10).masked_fill(~keep, float("-inf"))
    for mask in (keep, additive):
        got = triton_attention(q, k, v, attn_mask=mask)
        assert torch.equal(got[:, :, 2], torch.zeros_like(got[:, :, 2]))
        _check_against_torch(q, k, v, attn_mask=mask)


@needs_interpreter
def test_mask_and_causal_together_apply_both():
    q, k, v = _qkv(1, 2, 2, 12, 12, 16)
    _check_against_torch(q, k, v, attn_mask=torch.rand(12, 12) > 0.3, is_causal=True)


@needs_interpreter
def test_strided_inputs_and_explicit_scale():
    """q/k/v as views of a [B, L, H, D] projection, as models make them."""
    qkv = torch.randn(2, 23, 3, 4, 32)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    _check_against_torch(q, k, v, scale=0.3, is_causal=True)


@needs_interpreter
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.describe())
def test_every_config_is_correct(config):
    q, k, v = _qkv(1, 2, 1, 40, 45, 32)
    _check_against_torch(q, k, v, config=config, is_causal=True, enable_gqa=True)
    _check_against_torch(q, k, v, config=config, attn_mask=torch.rand(40, 45) > 0.3, enable_gqa=True)


@pytest.mark.parametrize("kwargs", [{}, {"is_causal": True}, {"scale": 0.2}])
def test_reference_matches_torch(kwargs):
    q, k, v = _qkv(1, 4, 2, 7, 11, 8)
    mask = torch.rand(7, 11) > 0.5
    for extra in ({}, {"attn_mask": mask}):
        expected = F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kwargs, **extra)
        torch.testing.assert_close(attention_reference(q, k, v, enable_gqa=True, **kwargs, **extra),
                                   expected, rtol=1e-5, atol=1e-5)


def test_prune_rules():
    config = Config.of(num_warps=8, num_stages=3, BLOCK_M=128, BLOCK_N=128)
    long = {"Lq": 4096, "Lk": 4096, "D": 128}
    assert prune(config, {**long, "dtype": torch.bfloat16}) is None
    assert "shared memory" in prune(config, {**long, "dtype": torch.float32, "smem_limit": 166912})
    assert "BLOCK_M" in prune(config, {**long, "Lq": 1, "dtype": torch.bfloat16})
    assert "BLOCK_N" in prune(config, {**long, "Lk": 40, "dtype": torch.bfloat16})
    narrow = Config.of(num_warps=4, num_stages=2, BLOCK_M=128, BLOCK_N=128)
    assert "registers" in prune(narrow, {**long, "dtype": torch.bfloat16})


@pytest.mark.parametrize("Lq,Lk,D", [(1, 1, 16), (1, 4096, 128), (17, 17, 64), (4096, 4096, 256)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_some_config_survives_every_problem(Lq, Lk, D, dtype):
    problem = {"Lq": Lq, "Lk": Lk, "D": D, "dtype": dtype}
    survivors, _ = TUNING_SPACE.survivors(problem)
    assert survivors and choose_config(problem) in survivors


def test_bad_inputs_raise_clear_errors():
    q, k, v = _qkv(1, 4, 2, 5, 6, 16)
    cases = [
        ((q[0], k, v), {}, "4-D"),
        ((q, k, v[:, :, :3]), {}, "differ"),
        ((q[..., :8], k, v), {}, "head dim"),
        ((q, k, v), {}, "enable_gqa"),
        ((q[:, :3], k, v), {"enable_gqa": True}, "divides"),
        ((q, k.half(), v.half()), {"enable_gqa": True}, "share one of"),
        ((q, k, v), {"enable_gqa": True, "attn_mask": torch.ones(3, 6, dtype=torch.bool)}, "broadcast"),
        ((q, k, v), {"enable_gqa": True, "attn_mask": torch.ones(5, 6, dtype=torch.int64)},
         "bool or floating"),
        ((q, k.to("meta"), v.to("meta")), {"enable_gqa": True}, "different devices"),
    ]
    for args, kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            triton_attention(*args, **kwargs)
    big = torch.randn(1, 1, 2, 320)
    with pytest.raises(ValueError, match="head dim 320"):
        triton_attention(big, big, big)


def test_problem_key():
    q, k, _ = _qkv(2, 4, 2, 3, 9, 64, torch.bfloat16)
    assert attention_problem(q, k) == {"B": 2, "H": 4, "Lq": 3, "Lk": 9, "D": 64, "dtype": torch.bfloat16}


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("is_causal", [False, True])
def test_gpu_against_torch(dtype, D, is_causal):
    _check_against_torch(*_qkv(2, 8, 8, 1031, 1031, D, dtype, "cuda"), is_causal=is_causal)


@pytest.mark.gpu
@requires_cuda
def test_gpu_gqa_masks_and_decode():
    q, k, v = _qkv(2, 8, 2, 300, 517, 128, torch.bfloat16, "cuda")
    _check_against_torch(q, k, v, is_causal=True, enable_gqa=True)
    _check_against_torch(q, k, v, attn_mask=torch.rand(2, 1, 300, 517, device="cuda") > 0.2, enable_gqa=True)
    decode_q = q[:, :, -1:]
    _check_against_torch(decode_q, k, v, enable_gqa=True)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("D", [64, 128])
def test_gpu_every_surviving_config(D):
    q, k, v = _qkv(1, 4, 4, 1000, 1000, D, torch.bfloat16, "cuda")
    survivors, _ = TUNING_SPACE.survivors(attention_problem(q, k))
    for config in survivors:
        _check_against_torch(q, k, v, config=config, is_causal=True)
