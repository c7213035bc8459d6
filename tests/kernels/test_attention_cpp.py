"""The tiled C++ prefill attention kernel against F.scaled_dot_product_attention: the sizes
that exercise its tiles and tails, strided views, GQA, masks, edge rows, and when it declines."""
import pytest
import torch
import torch.nn.functional as F

import fxforge.kernels.attention_cpp as attention_cpp
from fxforge.kernels.toolchain import KernelBuildError
from fxforge.kernels.attention_cpp import MAX_HEAD_DIM, MAX_KEYS, kernel_declines, tiled_attention
from fxforge.testing import assert_close_to_eager


def _fused_projection(batch, rows, heads, kv_heads, dim, value_dim, seed):
    """q/k/v as the [B, H, L, D] views of one fused qkv projection (what a model passes)."""
    g = torch.Generator().manual_seed(seed)
    width = heads * dim + kv_heads * dim + kv_heads * value_dim
    qkv = torch.randn(batch, rows, width, generator=g)
    q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * value_dim], dim=-1)
    return (q.unflatten(-1, (heads, dim)).transpose(1, 2),
            k.unflatten(-1, (kv_heads, dim)).transpose(1, 2),
            v.unflatten(-1, (kv_heads, value_dim)).transpose(1, 2))


# rows past TASK_ROWS (32) and not a multiple of the 4-row tile; head dims off the 16-wide tiles
@pytest.mark.parametrize("batch,rows,heads,kv_heads,dim,value_dim", [
    (1, 128, 4, 4, 32, 32), (2, 37, 6, 2, 24, 24), (1, 70, 3, 1, 40, 8), (3, 5, 2, 2, 64, 80),
    (1, 1, 2, 1, 16, 16)])
@pytest.mark.parametrize("is_causal", [False, True])
def test_matches_sdpa(batch, rows, heads, kv_heads, dim, value_dim, is_causal):
    seed = torch.seed() % (1 << 31)
    q, k, v = _fused_projection(batch, rows, heads, kv_heads, dim, value_dim, seed)
    assert kernel_declines(q, k, v) is None
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal,
                                              enable_gqa=heads != kv_heads)
    out = tiled_attention(q, k, v, is_causal=is_causal)
    assert_close_to_eager(out, expected, f"seed {seed}")
    assert out.shape == (batch, heads, rows, value_dim)
    # the output is laid out [B, L, H, Dv], so the usual transpose-reshape after it is free
    assert out.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("rows,keys", [(12, 5), (5, 12)])
def test_causal_is_top_left_aligned_like_sdpa(rows, keys):
    """Query i sees keys j <= i (SDPA's is_causal with L != S): rows past the last key see all."""
    q = torch.randn(2, 3, rows, 16)
    k, v = torch.randn(2, 3, keys, 16), torch.randn(2, 3, keys, 16)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert_close_to_eager(tiled_attention(q, k, v, is_causal=True), expected)


@pytest.mark.parametrize("rows,keys,offset", [(40, 45, 5), (9, 50, 41), (6, 20, 30), (33, 33, 3)])
def test_causal_offset_shifts_the_diagonal(rows, keys, offset):
    """Query i sees keys j <= i + offset (a KV cache's prefill after ``offset`` cached keys; an
    offset past the last key sees all of them), against SDPA with that mask written out."""
    q, k, v = _fused_projection(2, rows, 4, 2, 24, 24, seed=rows * 100 + offset)
    k = torch.cat([k, torch.randn(2, 2, keys - rows, 24)], 2) if keys > rows else k[:, :, :keys]
    v = torch.cat([v, torch.randn(2, 2, keys - rows, 24)], 2) if keys > rows else v[:, :, :keys]
    visible = torch.ones(rows, keys, dtype=torch.bool).tril(offset)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, enable_gqa=True)
    assert_close_to_eager(tiled_attention(q, k, v, is_causal=True, causal_offset=offset), expected)
    with pytest.raises(ValueError, match="causal_offset"):
        tiled_attention(q, k, v, is_causal=True, causal_offset=-1)


@pytest.mark.parametrize("mask_shape", [(7, 9), (2, 1, 1, 9), (3, 7, 9), (2, 3, 7, 9), (7, 1), (1, 9)])
@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("is_causal", [False, True])
def test_masks(mask_shape, kind, is_causal):
    q, k, v = torch.randn(2, 3, 7, 16), torch.randn(2, 3, 9, 16), torch.randn(2, 3, 9, 16)
    mask = torch.rand(mask_shape) > 0.3 if kind == "bool" else torch.randn(mask_shape)
    reference = mask
    if is_causal:   # F.sdpa refuses a mask with is_causal: fold the triangle in
        keep = torch.ones(7, 9, dtype=torch.bool).tril()
        reference = mask & keep if kind == "bool" else mask.masked_fill(~keep, float("-inf"))
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=reference)
    assert_close_to_eager(tiled_attention(q, k, v, attn_mask=mask, is_causal=is_causal), expected)


@pytest.mark.parametrize("hidden", [float("-inf"), torch.finfo(torch.float32).min, -1e30])
def test_masks_that_hide_trailing_keys(hidden):
    """Causal and padding masks written out as values (an ONNX export's, a BERT's): the kernel
    leaves out the keys past a row's last visible one; rows hidden throughout keep SDPA's
    result (uniform for a finite fill, 0 for -inf, as the kernel's no-visible-key rows)."""
    seed = torch.seed() % (1 << 31)
    q, k, v = _fused_projection(3, 45, 4, 2, 24, 24, seed)
    causal = torch.zeros(45, 45).masked_fill(torch.ones(45, 45, dtype=torch.bool).triu(1), hidden)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=causal, enable_gqa=True)
    assert_close_to_eager(tiled_attention(q, k, v, attn_mask=causal), expected, f"seed {seed}")
    padding = torch.zeros(3, 1, 1, 45)
    padding[1, ..., 30:] = hidden            # a shorter sentence
    padding[2, ..., 10:20] = hidden          # hidden keys before visible ones stay in
    padding[2, ..., 40:] = hidden
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=padding, enable_gqa=True)
    assert_close_to_eager(tiled_attention(q, k, v, attn_mask=padding), expected, f"seed {seed}")
    rows = torch.zeros(45, 45)
    rows[7] = hidden                          # a row hidden throughout
    rows[8, 3:] = hidden
    out = tiled_attention(q, k, v, attn_mask=rows)
    if hidden == float("-inf"):
        assert out[:, :, 7].abs().max() == 0
        rows[7] = 0     # SDPA gives NaN there; compare the other rows
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=rows, enable_gqa=True)
        expected[:, :, 7] = 0
    else:
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=rows, enable_gqa=True)
    assert_close_to_eager(out, expected, f"seed {seed}")


def test_fully_masked_rows_give_zero_and_nan_propagates():
    q, k, v = torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    mask = torch.rand(6, 6) > 0.3
    mask[4] = False
    out = tiled_attention(q, k, v, attn_mask=mask)
    assert out[:, :, 4].abs().max() == 0
    assert_close_to_eager(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    q[0, 1, 2] = float("nan")
    out = tiled_attention(q, k, v, is_causal=True)
    assert out[0, 1, 2].isnan().all() and not out[0, 0].isnan().any()


def test_scale_and_scores_beyond_exp_range():
    """Scores up to a few hundred (exp overflows past 88: the max shift must hold). Integer q/k
    and power-of-two scales make every score exact in fp32, so the comparison measures the
    softmax and the weighted sum, not how two dot-product orders round an ill-conditioned row."""
    g = torch.Generator().manual_seed(torch.seed() % (1 << 31))
    q = torch.randint(-4, 5, (1, 2, 40, 32), generator=g).float()
    k = torch.randint(-4, 5, (1, 2, 40, 32), generator=g).float()
    v = torch.randn(1, 2, 40, 32, generator=g)
    for scale in (0.25, 1.0, 2.0):
        expected = F.scaled_dot_product_attention(q, k, v, scale=scale, is_causal=True)
        assert_close_to_eager(tiled_attention(q, k, v, is_causal=True, scale=scale), expected)
    default = F.scaled_dot_product_attention(q / 8, k, v, is_causal=True)  # 1/sqrt(32) scale
    assert_close_to_eager(tiled_attention(q / 8, k, v, is_causal=True), default)


def test_declines_with_reasons():
    q = k = v = torch.randn(1, 2, 4, 8)
    assert "fp32" in kernel_declines(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert "fp32" in kernel_declines(q, k, v, torch.zeros(4, 4, dtype=torch.float64))
    assert "4-D" in kernel_declines(q[0], k[0], v[0])
    assert "unit stride" in kernel_declines(q.transpose(2, 3), k, v)
    wide = torch.randn(1, 1, 2, MAX_HEAD_DIM + 1)
    assert "head dim" in kernel_declines(wide, wide, wide)
    long_k = torch.randn(1, 1, MAX_KEYS + 1, 8)
    assert "keys" in kernel_declines(torch.randn(1, 1, 1, 8), long_k, long_k)
    assert "mask" in kernel_declines(q, k, v, torch.zeros(1, 1, 1, 4, 4))
    huge = torch.empty(1, 1, 1, 128).expand(64, 64, 1024, 128)   # 2 GiB as views: no memory
    assert "MiB" in kernel_declines(torch.empty(1, 1, 1, 128).expand(64, 64, 1, 128), huge, huge)


def test_unavailable_kernel_is_a_reason_not_an_error(monkeypatch):
    """No compiler or a failed build: kernel_declines names it and callers take PyTorch's path."""
    from fxforge.kernels import attention_cpu
    from fxforge.kernels.attention_cpu import choose_attention_path, cpu_attention

    def no_compiler(*args, **kwargs):
        raise KernelBuildError("no C++ compiler here")

    monkeypatch.setattr(attention_cpp, "load_function", no_compiler)
    monkeypatch.setattr(attention_cpu, "_PATHS", {})   # decisions made with the kernel built
    attention_cpp._entry.cache_clear()
    attention_cpp.kernel_unavailable.cache_clear()
    try:
        q = k = v = torch.randn(1, 2, 6, 8)
        assert "unavailable" in kernel_declines(q, k, v)
        assert choose_attention_path(q, k, v, is_causal=True).name == "flash"
        assert_close_to_eager(cpu_attention(q, k, v, is_causal=True),
                              F.scaled_dot_product_attention(q, k, v, is_causal=True))
    finally:
        attention_cpp._entry.cache_clear()
        attention_cpp.kernel_unavailable.cache_clear()
