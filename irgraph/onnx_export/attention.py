"""Fused attention (``aten.scaled_dot_product_attention``): ONNX's ``Attention`` op where the
opset has it (23 on), else its decomposition: ``softmax(q kᵀ * scale + mask) v``.

Both take 4-D ``[batch, heads, positions, head_dim]`` operands. Grouped k/v heads (GQA): the
``Attention`` op groups them itself; the decomposition repeats each k/v head for its group of
query heads (``repeat_interleave`` on the head dim, as torch's ``enable_gqa`` reads them).
The causal mask is upper-left aligned in both, as torch's ``is_causal`` is.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from fxforge.irgraph.onnx_export.table import Unsupported, converts
from fxforge.irgraph.views import Sdpa, SdpaFlashCpu

aten = torch.ops.aten
ATTENTION_OPSET = 23


@converts(aten.scaled_dot_product_attention.default)
def sdpa(ctx, node):
    return attention(ctx, node, Sdpa.of(node))


@converts(aten._scaled_dot_product_flash_attention_for_cpu.default)
def sdpa_flash_cpu(ctx, node):
    return attention(ctx, node, SdpaFlashCpu.of(node)), None   # no logsumexp


def attention(ctx, node, view) -> str:
    if view.dropout_p:
        raise Unsupported("attention with dropout")
    q_meta, k_meta = ctx.meta(view.query), ctx.meta(view.key)
    if q_meta.rank != 4 or k_meta.rank != 4:
        raise Unsupported("attention on operands that are not 4-D [batch, heads, seq, dim]")
    dtype = ctx.meta(node).dtype
    head_dim = q_meta.shape[-1]
    if view.scale is None and not isinstance(head_dim, int):
        raise Unsupported("attention with a symbolic head size and no explicit scale")
    scale = float(view.scale) if view.scale is not None else 1.0 / math.sqrt(head_dim)
    q, k, v = (ctx.tensor(t, dtype) for t in (view.query, view.key, view.value))
    mask, boolean = _mask(ctx, view.attn_mask, dtype)
    if ctx.opset >= ATTENTION_OPSET:
        return ctx.builder.op("Attention", [q, k, v, mask], is_causal=int(bool(view.is_causal)),
                              scale=scale)
    groups = _groups(q_meta.shape[1], k_meta.shape[1])
    if groups > 1:
        k, v = (_repeat_heads(ctx, t, groups, q_meta.shape[1], head_dim_of(ctx, s))
                for t, s in ((k, view.key), (v, view.value)))
    if view.is_causal:
        mask, boolean = _causal_mask(ctx, q, k), True
    return _decomposed(ctx, q, k, v, mask, boolean, scale, dtype)


def head_dim_of(ctx, node) -> int:
    dim = ctx.meta(node).shape[-1]
    if not isinstance(dim, int):
        raise Unsupported("grouped attention with a symbolic head size")
    return dim


def _mask(ctx, mask, dtype) -> tuple[Optional[str], bool]:
    """(the mask, whether it is bool): a bool mask says where to attend; any other is added to
    the scores, in q's dtype."""
    if mask is None:
        return None, False
    boolean = ctx.dtype(mask) == torch.bool
    return ctx.tensor(mask, torch.bool if boolean else dtype), boolean


def _groups(q_heads, kv_heads) -> int:
    if not isinstance(q_heads, int) or not isinstance(kv_heads, int) or q_heads % kv_heads:
        raise Unsupported(f"attention with {q_heads} query heads over {kv_heads} k/v heads")
    return q_heads // kv_heads


def _repeat_heads(ctx, x: str, groups: int, heads: int, head_dim: int) -> str:
    """[B, Hkv, S, D] -> [B, Hkv * groups, S, D], each k/v head repeated for its group."""
    b = ctx.builder
    grown = b.op("Expand", [b.unsqueeze(x, [2]), b.ints([1, 1, groups, 1, 1])])
    return b.op("Reshape", [grown, b.ints([0, heads, -1, head_dim])])


def _decomposed(ctx, q: str, k: str, v: str, mask: Optional[str], boolean: bool, scale: float,
                dtype: torch.dtype) -> str:
    b = ctx.builder
    scores = b.op("MatMul", [q, b.op("Transpose", [k], perm=[0, 1, 3, 2])])
    scores = b.op("Mul", [scores, b.const(scale, dtype)])
    if mask is not None and boolean:   # masked out: -inf, as torch's math attention does
        scores = b.op("Where", [mask, scores, b.const(float("-inf"), dtype)])
    elif mask is not None:
        scores = b.op("Add", [scores, mask])
    return b.op("MatMul", [b.op("Softmax", [scores], axis=-1), v])


def _causal_mask(ctx, q: str, k: str) -> str:
    """Bool [L, S]: key j is visible to query i when j <= i (upper-left aligned)."""
    b = ctx.builder
    length = b.scalar_of(b.op("Shape", [q], start=2, end=3))
    source = b.scalar_of(b.op("Shape", [k], start=2, end=3))
    one, zero = b.const(1, torch.int64), b.const(0, torch.int64)
    rows = b.unsqueeze(b.op("Range", [zero, length, one]), [1])
    cols = b.unsqueeze(b.op("Range", [zero, source, one]), [0])
    return b.op("LessOrEqual", [cols, rows])
