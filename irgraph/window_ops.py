"""fxforge's sliding-window attention ops (StreamingLLM: a window of recent keys plus the first
"sink" keys), the ops the ``attention="sliding_window:W,sinks:S"`` rewrite
(``passes/attention_window.py``) and the KV-cache pass put where a causal
``scaled_dot_product_attention`` was.

The pattern, one rule used everywhere (:func:`visible`): the query at position ``i`` sees the key
at position ``j`` when ``j <= i`` and (``j < S`` or ``i - j < W``): the first ``S`` positions and
the last ``W`` ones, itself included.

``fxforge::window_attention(q, k, v, window, sinks, scale)``: the pattern over one sequence,
q ``[B, H, L, D]``, k/v ``[B, Hkv, L, D]`` (GQA: query head h reads kv head h // (H // Hkv)).

``fxforge::cached_window_attention(q, k, v, k_cache, v_cache, cache_pos, window, sinks, scale)``:
the same over a bounded cache of ``S + W`` slots per layer: slot ``p`` holds position ``p < S``
(a sink); position ``p >= S`` lives in ring slot ``S + (p - S) % W`` (:func:`slot_of`), so the
cache never grows and generation can run past any length. ``cache_pos`` holds L, the positions
seen before the ``t`` new ones. The new queries attend to the cached keys they can see plus the
new keys (before any is overwritten), then the new keys are written to their slots. Keys are
cached as the model computed them, at their original positions (rotary embeddings included).
With ``k_scale``/``v_scale`` (``kv_cache_dtype="int8"``, :mod:`fxforge.irgraph.kv_quant`) the
slots hold int8 codes and every key and value attended to is its int8 round trip, new ones too.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from fxforge.irgraph.kv_quant import check_pair, load, round_trip, store
from fxforge.irgraph.op_compat import tolerate_omitted_mutated_args


def visible(query_pos: torch.Tensor, key_pos: torch.Tensor, window: int, sinks: int) -> torch.Tensor:
    """bool ``[len(query_pos), len(key_pos)]``: which keys each query sees."""
    q, k = query_pos[:, None], key_pos[None, :]
    return (k <= q) & ((k < sinks) | (q - k < window))


def slot_of(position: int, window: int, sinks: int) -> int:
    """The cache slot of ``position``."""
    return position if position < sinks else sinks + (position - sinks) % window


def cached_positions(length: int, window: int, sinks: int) -> list[int]:
    """The positions the cache holds after ``length`` positions were written (oldest first):
    the sinks, then the last ``window`` positions past them."""
    return list(range(min(length, sinks))) + list(range(max(sinks, length - window), length))


def check_window(window: int, sinks: int) -> None:
    if window < 1 or sinks < 0:
        raise ValueError(f"sliding-window attention needs window >= 1 and sinks >= 0, got "
                         f"window={window}, sinks={sinks}")


def _check_qkv(name: str, q, k, v) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"fxforge::{name}: q, k, v must be 4-D [batch, heads, positions, head_dim]")
    if q.shape[0] != k.shape[0] or k.shape[:3] != v.shape[:3] or q.shape[1] % k.shape[1] \
            or q.shape[2] != k.shape[2]:
        raise ValueError(f"fxforge::{name}: q {list(q.shape)}, k {list(k.shape)}, v "
                         f"{list(v.shape)} do not match (batch, positions, GQA groups)")


@torch.library.custom_op("fxforge::window_attention", mutates_args=())
def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, sinks: int,
                     scale: Optional[float] = None) -> torch.Tensor:
    """Reference (the test oracle's twin): SDPA with the pattern's full mask."""
    check_window(window, sinks)
    _check_qkv("window_attention", q, k, v)
    positions = torch.arange(q.shape[2], device=q.device)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible(positions, positions, window, sinks),
                                         scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return like_query(q, v).copy_(out)


def like_query(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """An empty output in q's layout when it can (as SDPA and the kernels give it: the graph's
    permute + view after the attention may only be valid on that layout), else contiguous."""
    if v.shape[-1] == q.shape[-1]:
        like = torch.empty_like(q)
        if like.stride(-1) == 1:
            return like
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


@window_attention.register_fake
def _window_attention_fake(q, k, v, window, sinks, scale=None):
    _check_qkv("window_attention", q, k, v)
    return like_query(q, v)


def _check_cached_window(q, k, v, k_cache, v_cache, cache_pos, window, sinks, k_scale=None,
                         v_scale=None) -> None:
    check_window(window, sinks)
    _check_qkv("cached_window_attention", q, k, v)
    if k_cache.dim() != 4 or v_cache.dim() != 4 or k_cache.shape[:2] != k.shape[:2] \
            or v_cache.shape[:2] != v.shape[:2] or k_cache.shape[2] != window + sinks \
            or v_cache.shape[2] != window + sinks:
        raise ValueError(f"fxforge::cached_window_attention: caches {list(k_cache.shape)}/"
                         f"{list(v_cache.shape)} must be [batch, kv heads, window + sinks = "
                         f"{window + sinks}, head_dim] for k {list(k.shape)}")
    if cache_pos.numel() != 1:
        raise ValueError("fxforge::cached_window_attention: cache_pos must hold one integer")
    check_pair("cached_window_attention", k_cache, v_cache, k_scale, v_scale)


def write_window(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 length: int, window: int, sinks: int, k_scale: Optional[torch.Tensor] = None,
                 v_scale: Optional[torch.Tensor] = None) -> None:
    """Store the new positions ``length .. length + t - 1`` in their slots (those a later one
    would overwrite are skipped)."""
    end = length + k.shape[2]
    kept = [*range(length, min(end, sinks)), *range(max(length, sinks, end - window), end)]
    if not kept:
        return
    slots = torch.tensor([slot_of(p, window, sinks) for p in kept], device=k.device)
    rows = torch.tensor(kept, device=k.device) - length
    store(k_cache, k_scale, k.index_select(2, rows), slots)
    store(v_cache, v_scale, v.index_select(2, rows), slots)


@torch.library.custom_op("fxforge::cached_window_attention",
                         mutates_args=("k_cache", "v_cache", "k_scale", "v_scale"))
def cached_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            k_cache: torch.Tensor, v_cache: torch.Tensor, cache_pos: torch.Tensor,
                            window: int, sinks: int, scale: Optional[float] = None,
                            k_scale: Optional[torch.Tensor] = None,
                            v_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Reference: the cached keys it can see plus the new ones, a mask by position, SDPA; then
    the new keys and values written to their slots."""
    _check_cached_window(q, k, v, k_cache, v_cache, cache_pos, window, sinks, k_scale, v_scale)
    length = int(cache_pos.reshape(-1)[0])
    if length < 0:
        raise ValueError(f"fxforge::cached_window_attention: negative cache length {length}")
    old = cached_positions(length, window, sinks)
    slots = torch.tensor([slot_of(p, window, sinks) for p in old], dtype=torch.long, device=q.device)
    # int8: the new rows as the cache will give them back (the originals are what gets stored)
    seen_k, seen_v = (round_trip(k), round_trip(v)) if k_scale is not None else (k, v)
    keys = torch.cat([load(k_cache, k_scale, q.dtype, slots), seen_k.to(q.dtype)], dim=2)
    values = torch.cat([load(v_cache, v_scale, q.dtype, slots), seen_v.to(q.dtype)], dim=2)
    new = torch.arange(length, length + q.shape[2], device=q.device)
    key_pos = torch.cat([torch.tensor(old, dtype=torch.long, device=q.device), new])
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=visible(new, key_pos, window, sinks),
                                         scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    write_window(k, v, k_cache, v_cache, length, window, sinks, k_scale, v_scale)
    return like_query(q, v).copy_(out)


@cached_window_attention.register_fake
def _cached_window_attention_fake(q, k, v, k_cache, v_cache, cache_pos, window, sinks, scale=None,
                                  k_scale=None, v_scale=None):
    _check_cached_window(q, k, v, k_cache, v_cache, cache_pos, window, sinks, k_scale, v_scale)
    return like_query(q, v)


# torch 2.11: a call without k_scale/v_scale fails in the op's ADInplaceOrView kernel (op_compat).
tolerate_omitted_mutated_args(torch.ops.fxforge.cached_window_attention.default)
