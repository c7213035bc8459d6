"""CPU attention with ``F.scaled_dot_product_attention`` semantics.

``cpu_attention`` takes the first path that applies: fxforge's tiled C++ kernel for short fp32
prefills (``kernels/attention_cpp.py``: causal up to ``MAX_KEYS`` keys, non-causal up to
``NONCAUSAL_MAX_KEYS``, where it measured faster), ``aten._scaled_dot_product_flash_attention_for_cpu``
called directly, or an explicit matmul-softmax-matmul (the "math" path). What the flash kernel
accepts in torch 2.13 (probed, see ``tests/kernels/test_attention_cpu.py``):

* 4-D q/k/v ``[B, H, L, E]`` of one float dtype and one head size E (value's included); 3-D
  inputs are viewed as one batch of ``B`` heads;
* grouped-query attention: fewer k/v heads than q heads, handled inside the kernel, so k/v are
  never expanded or copied;
* ``attn_mask`` of 2 or 4 dims (broadcast dims of size 1 fine) and of the query's dtype only: a
  bool mask becomes an additive 0/-inf mask, a 3-D mask gets a leading 1;
* ``is_causal`` together with a mask (the same top-left-aligned triangle as SDPA).

Fully masked rows give 0 on both paths, as ``F.scaled_dot_product_attention`` does here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from fxforge.kernels.attention_cpp import (additive_mask, kernel_declines, layout_key,
                                           tiled_attention)

# Non-causal, the tiled kernel wins only at short lengths: bench/attention_cpu.py, 2-core Zen 1,
# 8-12 heads of 64: 1.05-1.2x PyTorch's flash kernel at 128 keys, 0.93-0.98x at 256-512, 0.87x
# at 1024 (causal: 1.25-1.9x at every length up to MAX_KEYS).
NONCAUSAL_MAX_KEYS = 128
_FLASH_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class AttentionPath:
    name: str  # "tiled", "flash" or "math"
    reason: str


def _check_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, enable_gqa: bool) -> None:
    """The head-count rule of F.scaled_dot_product_attention (dim -3 holds the heads)."""
    if q.dim() < 3 or k.size(-3) == q.size(-3):
        return
    if not enable_gqa:
        raise ValueError(f"attention: q has {q.size(-3)} heads, k/v {k.size(-3)}; pass "
                         "enable_gqa=True for grouped-query attention")
    if q.size(-3) % k.size(-3) != 0 or k.size(-3) != v.size(-3):
        raise ValueError(f"attention: q heads {q.size(-3)} are not a multiple of k/v heads "
                         f"{k.size(-3)}/{v.size(-3)}")


def choose_attention_path(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          attn_mask: Optional[torch.Tensor] = None,
                          is_causal: bool = False) -> AttentionPath:
    """Which path ``cpu_attention`` takes for these inputs, and why."""
    declined = kernel_declines(q, k, v, attn_mask)
    if declined is None and not is_causal and k.size(-2) > NONCAUSAL_MAX_KEYS:
        declined = f"non-causal with {k.size(-2)} keys (> {NONCAUSAL_MAX_KEYS})"
    if declined is None:
        gqa = ", GQA" if k.size(-3) != q.size(-3) else ""
        mask = "" if attn_mask is None else ", masked"
        return AttentionPath("tiled", f"tiled C++ attention (fp32{gqa}{mask})")
    if not (q.dim() == k.dim() == v.dim() and q.dim() in (3, 4)):
        return AttentionPath("math", f"flash needs 3-D or 4-D q/k/v, got {q.dim()}/{k.dim()}/{v.dim()}")
    if not (q.dtype == k.dtype == v.dtype and q.dtype in _FLASH_DTYPES):
        return AttentionPath("math", f"flash needs one float dtype, got {q.dtype}/{k.dtype}/{v.dtype}")
    if not q.size(-1) == k.size(-1) == v.size(-1):
        return AttentionPath("math", "flash needs one head size for q, k and v")
    if q.device.type != "cpu":
        return AttentionPath("math", f"not a CPU tensor ({q.device})")
    if attn_mask is not None and attn_mask.dim() > q.dim():
        return AttentionPath("math", f"flash takes a mask of at most {q.dim()} dims")
    gqa = ", GQA in-kernel" if q.dim() >= 3 and k.size(-3) != q.size(-3) else ""
    mask = ("" if attn_mask is None else ", bool mask as additive -inf mask"
            if attn_mask.dtype == torch.bool else ", additive float mask")
    return AttentionPath("flash", f"PyTorch CPU flash attention{gqa}{mask}")


def flash_attention(q, k, v, attn_mask=None, is_causal=False, scale=None) -> torch.Tensor:
    """PyTorch's CPU flash kernel (the caller checked that ``choose_attention_path`` allows it)."""
    three_d = q.dim() == 3
    if three_d:  # [B, L, E] -> one batch of B "heads"
        q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
    if attn_mask is not None:
        attn_mask = additive_mask(attn_mask, q.dtype)
        while attn_mask.dim() < 2:
            attn_mask = attn_mask.unsqueeze(0)
        if attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(0)
    out, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, is_causal, attn_mask=attn_mask, scale=scale)
    return out.squeeze(0) if three_d else out


def _group_heads(q: torch.Tensor, k: torch.Tensor, mask: Optional[torch.Tensor]):
    """Views for GQA without copying k/v: q [.., Hkv, G, L, E] against k [.., Hkv, 1, S, E]."""
    heads, kv_heads = q.size(-3), k.size(-3)
    groups = heads // kv_heads
    q = q.unflatten(-3, (kv_heads, groups))
    if mask is not None and mask.dim() >= 3:
        mask = mask.unflatten(-3, (kv_heads, groups)) if mask.size(-3) == heads else mask.unsqueeze(-3)
    return q, mask, groups


def math_attention(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False):
    """Explicit softmax(q kᵀ·scale + mask) v, in q's dtype; fully masked rows give 0."""
    _check_heads(q, k, v, enable_gqa)
    scale = scale if scale is not None else 1.0 / math.sqrt(q.size(-1))
    mask = additive_mask(attn_mask, q.dtype) if attn_mask is not None else None
    if is_causal:
        causal = torch.ones(q.size(-2), k.size(-2), dtype=torch.bool, device=q.device).tril()
        causal = additive_mask(causal, q.dtype)
        mask = causal if mask is None else mask + causal
    grouped = q.dim() >= 3 and k.size(-3) != q.size(-3)
    if grouped:
        q, mask, _ = _group_heads(q, k, mask)
        k, v = k.unsqueeze(-3), v.unsqueeze(-3)
    scores = (q @ k.transpose(-2, -1)) * scale
    if mask is not None:
        scores = scores + mask
    weights = torch.softmax(scores, dim=-1)
    weights = weights.masked_fill(torch.isneginf(scores.amax(dim=-1, keepdim=True)), 0.0)
    out = weights @ v
    return out.flatten(-4, -3) if grouped else out


_PATHS: dict[tuple, str] = {}   # layout_key + enable_gqa -> the path cpu_attention takes


def cpu_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
                  scale: Optional[float] = None, enable_gqa: bool = False) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` (no dropout) on the fastest CPU path that applies
    (decided once per input layout: the checks cost more than a small model's attention)."""
    key = layout_key(q, k, v, attn_mask, is_causal) + (enable_gqa,)
    path = _PATHS.get(key)
    if path is None:
        _check_heads(q, k, v, enable_gqa)
        path = choose_attention_path(q, k, v, attn_mask, is_causal).name
        if len(_PATHS) >= 256:
            _PATHS.clear()
        _PATHS[key] = path
    if path == "tiled":
        return tiled_attention(q, k, v, attn_mask, is_causal, scale, key)
    if path == "flash":
        return flash_attention(q, k, v, attn_mask, is_causal, scale)
    return math_attention(q, k, v, attn_mask, is_causal, scale, enable_gqa)


def describe_attention(q, k, v, attn_mask=None, is_causal=False) -> str:
    """One line for the explain report: the path and what it does with mask and heads."""
    path = choose_attention_path(q, k, v, attn_mask, is_causal)
    text = path.reason if path.name != "math" else f"explicit matmul-softmax-matmul ({path.reason})"
    return text + (", causal" if is_causal else "")
