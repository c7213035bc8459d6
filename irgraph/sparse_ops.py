"""fxforge's block-sparse attention op, the op the ``attention="block_sparse:..."`` rewrite
(``passes/attention_sparse.py``) puts where a causal ``scaled_dot_product_attention`` was.

``fxforge::block_sparse_attention(q, k, v, patterns, block, scale)``: causal self-attention in
which query block ``qb`` (positions ``qb*block .. qb*block + block - 1``) reads only the key blocks
its pattern names. ``patterns`` is flat: five integers per pattern, one pattern for every head or
one per query head, each ``(local, global, stride, window, sinks)``:

* the ``local`` key blocks ending at the diagonal (0: every block up to it, i.e. dense), the
  first ``global`` blocks, and every ``stride``-th block back from the diagonal (0: none);
* inside those blocks, causal (``j <= i``) and, when ``window > 0``, only the first ``sinks``
  keys and the last ``window`` (the sliding-window rule of :mod:`fxforge.irgraph.window_ops`).

:func:`visible` is the rule, used by the reference op (the tests' oracle computes it anew from
this definition) and by calibration. q ``[B, H, L, D]``, k/v ``[B, Hkv, L, D]`` (GQA).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from fxforge.irgraph.window_ops import like_query

PATTERN_FIELDS = ("local", "global", "stride", "window", "sinks")
DENSE = (0, 0, 0, 0, 0)   # every block up to the diagonal, no window: causal attention
# The block sizes the kernels take (the reference takes any); the option offers these.
BLOCK_SIZES = (16, 32, 64, 128, 256)


def split_patterns(patterns: Sequence[int], heads: int) -> list[tuple[int, ...]]:
    """The flat ``patterns`` argument as 5-tuples: one for all heads, or one per query head."""
    if len(patterns) % 5 or len(patterns) // 5 not in (1, heads):
        raise ValueError(f"fxforge::block_sparse_attention: patterns hold {len(patterns)} "
                         f"integers; expected 5 ({', '.join(PATTERN_FIELDS)}) for all heads or "
                         f"5 per head ({5 * heads})")
    rows = [tuple(int(x) for x in patterns[i:i + 5]) for i in range(0, len(patterns), 5)]
    if any(min(p) < 0 for p in rows):
        raise ValueError(f"fxforge::block_sparse_attention: negative pattern field in {rows}")
    return rows


def block_layout(pattern: Sequence[int], blocks: int) -> torch.Tensor:
    """bool ``[blocks, blocks]``: which key blocks each query block reads."""
    local, global_, stride = pattern[:3]
    qb, kb = torch.arange(blocks)[:, None], torch.arange(blocks)[None, :]
    near = (qb - kb < local) if local > 0 else torch.ones(blocks, blocks, dtype=torch.bool)
    strided = ((qb - kb) % stride == 0) if stride > 0 else \
        torch.zeros(blocks, blocks, dtype=torch.bool)
    return (kb <= qb) & (near | (kb < global_) | strided)


def visible(pattern: Sequence[int], block: int, length: int) -> torch.Tensor:
    """bool ``[length, length]``: which keys each query sees under ``pattern``."""
    blocks = -(-length // block)
    pos = torch.arange(length)
    layout = block_layout(pattern, blocks)[pos[:, None] // block, pos[None, :] // block]
    i, j = pos[:, None], pos[None, :]
    allowed = layout & (j <= i)
    window, sinks = pattern[3], pattern[4]
    if window > 0:
        allowed &= (j < sinks) | (i - j < window)
    return allowed


def pattern_mask(patterns: Sequence[int], block: int, length: int, heads: int) -> torch.Tensor:
    """bool ``[1 or heads, length, length]``: :func:`visible` for each pattern."""
    return torch.stack([visible(p, block, length) for p in split_patterns(patterns, heads)])


def check_block(block: int) -> None:
    if block < 1:
        raise ValueError(f"fxforge::block_sparse_attention: block must be >= 1, got {block}")


@torch.library.custom_op("fxforge::block_sparse_attention", mutates_args=())
def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, patterns: list[int],
                           block: int, scale: Optional[float] = None) -> torch.Tensor:
    """Reference: SDPA with the patterns' full mask."""
    check_block(block)
    _check(q, k, v)
    mask = pattern_mask(patterns, block, q.shape[2], q.shape[1]).to(q.device)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[None], scale=scale,
                                         enable_gqa=q.shape[1] != k.shape[1])
    return like_query(q, v).copy_(out)


def _check(q, k, v) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or q.shape[0] != k.shape[0] or \
            k.shape[:3] != v.shape[:3] or q.shape[1] % k.shape[1] or q.shape[2] != k.shape[2]:
        raise ValueError(f"fxforge::block_sparse_attention: q {list(q.shape)}, k {list(k.shape)}, "
                         f"v {list(v.shape)} must be [batch, heads, positions, head_dim] with "
                         "k/v heads dividing q heads")


@block_sparse_attention.register_fake
def _block_sparse_attention_fake(q, k, v, patterns, block, scale=None):
    _check(q, k, v)
    split_patterns(patterns, q.shape[1])
    return like_query(q, v)


@torch.library.custom_op("fxforge::cached_block_sparse_attention", mutates_args=("k_cache", "v_cache"))
def cached_block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                  k_cache: torch.Tensor, v_cache: torch.Tensor,
                                  cache_pos: torch.Tensor, patterns: list[int], block: int,
                                  scale: Optional[float] = None) -> torch.Tensor:
    """``fxforge::cached_attention`` whose prefill over an empty cache keeps the block-sparse
    pattern; later positions (decode steps, continued chunks) attend densely, as MInference
    does: the pattern is a prompt-processing approximation."""
    from fxforge.irgraph.ops import cached_attention
    if int(cache_pos.reshape(-1)[0]) != 0 or q.shape[2] == 1:
        return cached_attention(q, k, v, k_cache, v_cache, cache_pos, scale)
    write_prompt(k, v, k_cache, v_cache)
    return block_sparse_attention(q, k, v, patterns, block, scale)


def write_prompt(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor) -> None:
    """A prompt's keys and values into an empty cache's first positions."""
    from fxforge.irgraph.ops import cache_overflow
    if k.shape[2] > k_cache.shape[2]:
        raise cache_overflow(0, k.shape[2], k_cache.shape[2])
    k_cache[:, :, :k.shape[2]].copy_(k)
    v_cache[:, :, :v.shape[2]].copy_(v)


@cached_block_sparse_attention.register_fake
def _cached_block_sparse_fake(q, k, v, k_cache, v_cache, cache_pos, patterns, block, scale=None):
    from fxforge.irgraph.ops import _check_cached
    _check_cached(q, k, v, k_cache, v_cache, cache_pos)
    split_patterns(patterns, q.shape[1])
    return like_query(q, v)
