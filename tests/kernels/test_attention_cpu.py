"""cpu_attention against F.scaled_dot_product_attention: every path, masks, GQA, decode."""
import pytest
import torch
import torch.nn.functional as F

from fxforge.kernels.attention_cpp import kernel_declines, tiled_attention
from fxforge.kernels.attention_cpu import (choose_attention_path, cpu_attention,
                                           describe_attention, flash_attention, math_attention)
from fxforge.testing import assert_close_to_eager

B, H, L, S, E = 2, 4, 7, 9, 16


def _qkv(l=L, s=S, heads=H, kv_heads=H, e=E, ev=E, dtype=torch.float32):
    return (torch.randn(B, heads, l, e, dtype=dtype), torch.randn(B, kv_heads, s, e, dtype=dtype),
            torch.randn(B, kv_heads, s, ev, dtype=dtype))


def _masks(l=L, s=S):
    return {"none": None,
            "bool 2d": torch.rand(l, s) > 0.3,
            "float 2d": torch.randn(l, s),
            "bool padding [B,1,1,S]": torch.rand(B, 1, 1, s) > 0.2,
            "float [B,H,L,S]": torch.randn(B, H, l, s),
            "float 3d [H,L,S]": torch.randn(H, l, s),
            "bool [L,1]": torch.rand(l, 1) > 0.2}


def _with_causal(mask):
    """SDPA's causal triangle folded into ``mask`` (F.sdpa's math path refuses both at once)."""
    if mask is None:
        return None
    keep = torch.ones(L, S, dtype=torch.bool).tril()
    return mask & keep if mask.dtype == torch.bool else mask.masked_fill(~keep, float("-inf"))


def _both_paths(q, k, v, **kwargs):
    """cpu_attention, and each of its paths called directly where it takes the inputs (the
    tiled kernel takes fp32 prefills of these sizes, so cpu_attention alone would not reach
    the flash kernel)."""
    outs = {"cpu_attention": cpu_attention(q, k, v, **kwargs),
            "math_attention": math_attention(q, k, v, **kwargs)}
    mask = kwargs.get("attn_mask")
    call = {key: kwargs[key] for key in ("attn_mask", "is_causal", "scale") if key in kwargs}
    if kernel_declines(q, k, v, mask) is None:
        outs["tiled_attention"] = tiled_attention(q, k, v, **call)
    if q.dim() == 4 and q.size(-1) == v.size(-1):
        outs["flash_attention"] = flash_attention(q, k, v, **call)
    return outs


@pytest.mark.parametrize("mask_name", list(_masks()))
@pytest.mark.parametrize("is_causal", [False, True])
def test_masks_and_causal(mask_name, is_causal):
    q, k, v = _qkv()
    mask = _masks()[mask_name]
    reference_mask = _with_causal(mask) if is_causal else mask
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=reference_mask,
                                              is_causal=is_causal and mask is None)
    for name, out in _both_paths(q, k, v, attn_mask=mask, is_causal=is_causal).items():
        assert_close_to_eager(out, expected, f"{name} {mask_name}")


@pytest.mark.parametrize("kv_heads", [1, 2])
@pytest.mark.parametrize("mask_name", ["none", "bool 2d", "float [B,H,L,S]", "float 3d [H,L,S]"])
def test_grouped_query_attention(kv_heads, mask_name):
    q, k, v = _qkv(kv_heads=kv_heads)
    mask = _masks()[mask_name]
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    for name, out in _both_paths(q, k, v, attn_mask=mask, enable_gqa=True).items():
        assert_close_to_eager(out, expected, f"{name} kv_heads={kv_heads}")
    assert "GQA" in describe_attention(q, k, v, mask)
    assert "GQA in-kernel" in describe_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask)


def test_gqa_needs_the_flag_and_a_divisor():
    q, k, v = _qkv(kv_heads=2)
    with pytest.raises(ValueError, match="enable_gqa"):
        cpu_attention(q, k, v)
    q3, k3, v3 = _qkv(heads=4, kv_heads=3)
    with pytest.raises(ValueError, match="multiple"):
        cpu_attention(q3, k3, v3, enable_gqa=True)


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("kv_heads", [H, 2])
def test_decode_one_query(is_causal, kv_heads):
    q, k, v = _qkv(l=1, s=33, kv_heads=kv_heads)
    padding = torch.rand(B, 1, 1, 33) > 0.2
    for mask in (None, padding):
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                                   enable_gqa=True)
        for name, out in _both_paths(q, k, v, attn_mask=mask, is_causal=is_causal,
                                     enable_gqa=True).items():
            assert_close_to_eager(out, expected, name)


def test_scale_three_d_inputs_and_non_contiguous_q():
    q, k, v = _qkv()
    q_strided = torch.randn(B, L, H, E).transpose(1, 2)
    for query in (q, q_strided):
        expected = F.scaled_dot_product_attention(query, k, v, scale=0.3, is_causal=True)
        assert_close_to_eager(cpu_attention(query, k, v, scale=0.3, is_causal=True), expected)
    q3, k3, v3 = q[0], k[0], v[0]
    mask3 = torch.randn(H, L, S)
    expected3 = F.scaled_dot_product_attention(q3, k3, v3, attn_mask=mask3)
    assert choose_attention_path(q3, k3, v3, mask3).name == "flash"
    assert_close_to_eager(cpu_attention(q3, k3, v3, attn_mask=mask3), expected3)


def test_fully_masked_rows_give_zero_like_sdpa():
    q, k, v = _qkv()
    mask = torch.rand(L, S) > 0.3
    mask[2] = False
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    for name, out in _both_paths(q, k, v, attn_mask=mask).items():
        assert_close_to_eager(out, expected, name)
        assert out[:, :, 2].abs().max() == 0


def test_math_path_when_flash_does_not_apply():
    q, k, v = _qkv(ev=24, dtype=torch.float64)  # value head size differs: flash refuses
    assert choose_attention_path(q, k, v).name == "math"
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert_close_to_eager(cpu_attention(q, k, v, is_causal=True), expected)
    q5, k5, v5 = (t.unsqueeze(0) for t in _qkv())  # 5-D
    assert choose_attention_path(q5, k5, v5).name == "math"
    assert "explicit matmul-softmax-matmul" in describe_attention(q5, k5, v5)
    assert_close_to_eager(cpu_attention(q5, k5, v5), F.scaled_dot_product_attention(q5, k5, v5))


def test_bf16():
    q, k, v = _qkv(dtype=torch.bfloat16)
    mask = torch.rand(L, S) > 0.3
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=True)
    assert_close_to_eager(cpu_attention(q, k, v, attn_mask=mask, is_causal=True), expected)


def test_describe():
    q, k, v = _qkv()
    assert describe_attention(q, k, v, torch.rand(L, S) > 0.5, is_causal=True) == (
        "tiled C++ attention (fp32, masked), causal")
    assert describe_attention(q, k, v) == "tiled C++ attention (fp32)"
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))
    assert describe_attention(qb, kb, vb, torch.rand(L, S) > 0.5, is_causal=True) == (
        "PyTorch CPU flash attention, bool mask as additive -inf mask, causal")
    assert describe_attention(qb, kb, vb) == "PyTorch CPU flash attention"


def test_value_head_size_of_its_own_takes_the_tiled_kernel():
    q, k, v = _qkv(ev=24)   # flash refuses a value head size of its own; the tiled kernel not
    assert choose_attention_path(q, k, v).name == "tiled"
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert_close_to_eager(cpu_attention(q, k, v, is_causal=True), expected)


def test_long_non_causal_attention_stays_on_flash():
    from fxforge.kernels.attention_cpu import NONCAUSAL_MAX_KEYS
    q, k, v = _qkv(l=2, s=NONCAUSAL_MAX_KEYS + 1, e=8, ev=8)
    assert choose_attention_path(q, k, v).name == "flash"
    assert choose_attention_path(q, k, v, is_causal=True).name == "tiled"
