"""Per-head streaming attention (DuoAttention's idea, training-free): some key/value heads keep
full causal attention, the others ("streaming" heads) see only the first ``sinks`` positions and
the last ``window`` (the rule of :mod:`fxforge.irgraph.window_ops`). The ops the
``attention="per_head:..."`` rewrite (``passes/attention_per_head.py``) and the KV-cache pass
put where a causal ``scaled_dot_product_attention`` was.

``streaming`` holds one flag per k/v head; a query head follows its k/v head (GQA), so a group
of query heads is never split.

``fxforge::per_head_attention(q, k, v, streaming, window, sinks, scale)``: one sequence.

``fxforge::cached_per_head_attention(q, k, v, k_full, v_full, k_stream, v_stream, cache_pos,
streaming, window, sinks, scale)``: the full heads' keys in a cache of ``max_seq_len`` positions
(``fxforge::cached_attention``), the streaming heads' in a bounded cache of ``sinks + window``
slots (``fxforge::cached_window_attention``): the streaming heads' memory stays flat.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from fxforge.irgraph.window_ops import check_window, like_query, visible


def head_groups(streaming: list[int], kv_heads: int) -> tuple[list[int], list[int]]:
    """(full, streaming) k/v head indices."""
    if len(streaming) != kv_heads or any(f not in (0, 1) for f in streaming):
        raise ValueError(f"per-head attention: streaming must hold one 0/1 flag per k/v head "
                         f"({kv_heads}), got {streaming}")
    return ([h for h, f in enumerate(streaming) if not f], [h for h, f in enumerate(streaming) if f])


def query_heads(kv: list[int], groups: int) -> list[int]:
    """The query heads that read k/v heads ``kv``."""
    return [kv_head * groups + g for kv_head in kv for g in range(groups)]


@torch.library.custom_op("fxforge::per_head_attention", mutates_args=())
def per_head_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, streaming: list[int],
                       window: int, sinks: int, scale: Optional[float] = None) -> torch.Tensor:
    """Reference: SDPA with a per-head mask (causal, or the window's pattern)."""
    check_window(window, sinks)
    _, stream = head_groups(streaming, k.shape[1])
    positions = torch.arange(q.shape[2], device=q.device)
    causal = positions[None, :] <= positions[:, None]
    pattern = visible(positions, positions, window, sinks)
    streamed = set(query_heads(stream, q.shape[1] // k.shape[1]))
    mask = torch.stack([pattern if h in streamed else causal for h in range(q.shape[1])])
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[None], scale=scale,
                                         enable_gqa=q.shape[1] != k.shape[1])
    return like_query(q, v).copy_(out)


@per_head_attention.register_fake
def _per_head_attention_fake(q, k, v, streaming, window, sinks, scale=None):
    head_groups(streaming, k.shape[1])
    return like_query(q, v)


def split_heads(q, k, v, k_full, v_full, k_stream, v_stream, cache_pos, streaming, window, sinks,
                scale, full_fn: Callable, stream_fn: Callable) -> torch.Tensor:
    """The cached op with ``full_fn`` (a ``cached_attention``) on the full heads and
    ``stream_fn`` (a ``cached_window_attention``) on the streaming ones; the outputs go back to
    their query heads."""
    full, stream = head_groups(streaming, k.shape[1])
    groups = q.shape[1] // k.shape[1]
    out = like_query(q, v)
    for kv, caches, call in ((full, (k_full, v_full), lambda *a: full_fn(*a, cache_pos, scale)),
                             (stream, (k_stream, v_stream),
                              lambda *a: stream_fn(*a, cache_pos, window, sinks, scale))):
        if not kv:
            continue
        if caches[0].shape[1] != len(kv):
            raise ValueError(f"per-head attention: a cache of {caches[0].shape[1]} heads for "
                             f"{len(kv)} k/v heads")
        heads, index = query_heads(kv, groups), torch.tensor(kv, device=k.device)
        rows = torch.tensor(heads, device=q.device)
        part = call(q.index_select(1, rows), k.index_select(1, index), v.index_select(1, index),
                    *caches)
        out.index_copy_(1, rows, part.to(out.dtype))
    return out


@torch.library.custom_op("fxforge::cached_per_head_attention",
                         mutates_args=("k_full", "v_full", "k_stream", "v_stream"))
def cached_per_head_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              k_full: torch.Tensor, v_full: torch.Tensor, k_stream: torch.Tensor,
                              v_stream: torch.Tensor, cache_pos: torch.Tensor,
                              streaming: list[int], window: int, sinks: int,
                              scale: Optional[float] = None) -> torch.Tensor:
    """Reference: the reference cached ops on each group of heads."""
    from fxforge.irgraph.ops import cached_attention
    from fxforge.irgraph.window_ops import cached_window_attention
    return split_heads(q, k, v, k_full, v_full, k_stream, v_stream, cache_pos, streaming, window,
                       sinks, scale, cached_attention, cached_window_attention)


@cached_per_head_attention.register_fake
def _cached_per_head_fake(q, k, v, k_full, v_full, k_stream, v_stream, cache_pos, streaming,
                          window, sinks, scale=None):
    head_groups(streaming, k.shape[1])
    return like_query(q, v)
