"""Block-sparse and per-head streaming attention on the CPU (the ops of
:mod:`fxforge.irgraph.sparse_ops` and :mod:`fxforge.irgraph.per_head_ops`).

Prefill runs the C++ kernel of ``kernels/sparse_attention_cpp.py``, which reads only the key
blocks each query block's pattern names; inputs it declines (not fp32, a block size it was not
built for, a packed copy too large) take the reference op, with the reason logged once per
reason. With a KV cache, the prefill over an empty cache keeps the pattern and writes the cache;
every later call (decode steps, continued chunks) is ``fxforge::cached_attention`` on its CPU
kernels: dense, as the mode defines.

Per-head streaming runs each group of heads on its own kernels: the full heads on the causal CPU
attention (or, cached, ``cpu_cached_attention``), the streaming heads on the sliding-window ones.
"""
from __future__ import annotations

import functools
import logging
from typing import Optional

import torch

from fxforge.irgraph.per_head_ops import head_groups, query_heads, split_heads
from fxforge.irgraph.sparse_ops import DENSE, block_sparse_attention, split_patterns, write_prompt
from fxforge.irgraph.window_ops import like_query
from fxforge.kernels.attention_cpu import cpu_attention
from fxforge.kernels.decode_attention_cpu import cpu_cached_attention
from fxforge.kernels.sparse_attention_cpp import kernel_declines, sparse_attention
from fxforge.kernels.window_attention_cpu import cpu_cached_window_attention, cpu_window_attention

log = logging.getLogger("fxforge.kernels")


@functools.lru_cache(maxsize=64)
def _log_declined(reason: str) -> None:
    log.info("block-sparse attention: reference op (%s)", reason)


def cpu_block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, patterns: list,
                               block: int, scale: Optional[float] = None) -> torch.Tensor:
    """``fxforge::block_sparse_attention`` (module docstring). Heads whose pattern is dense
    run on the causal CPU attention (PyTorch's flash kernel at long lengths is faster per key
    than the block-sparse kernel's dense rows), the others on the block-sparse kernel."""
    declined = kernel_declines(q, k, v, block)
    if declined is not None:
        _log_declined(declined)
        return block_sparse_attention(q, k, v, patterns, block, scale)
    rows = split_patterns(patterns, q.shape[1])
    dense = [h for h, p in enumerate(rows) if p == DENSE]
    if len(rows) == 1 or not dense:
        return sparse_attention(q, k, v, rows, block, scale)
    if len(dense) == len(rows):
        return cpu_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    sparse = [h for h, p in enumerate(rows) if p != DENSE]
    groups, out = q.shape[1] // k.shape[1], like_query(q, v)
    for heads, run in ((dense, lambda *a: cpu_attention(*a, is_causal=True, scale=scale)),
                       (sparse, lambda *a: sparse_attention(*a, [rows[h] for h in sparse], block,
                                                            scale))):
        index, kv = torch.tensor(heads), torch.tensor([h // groups for h in heads])
        out.index_copy_(1, index, run(q.index_select(1, index), k.index_select(1, kv),
                                      v.index_select(1, kv)))
    return out


def cpu_cached_block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                      k_cache: torch.Tensor, v_cache: torch.Tensor,
                                      cache_pos: torch.Tensor, patterns: list, block: int,
                                      scale: Optional[float] = None) -> torch.Tensor:
    """``fxforge::cached_block_sparse_attention`` (module docstring)."""
    if q.shape[2] == 1 or int(cache_pos.reshape(-1)[0]) != 0:
        return cpu_cached_attention(q, k, v, k_cache, v_cache, cache_pos, scale)
    write_prompt(k, v, k_cache, v_cache)
    return cpu_block_sparse_attention(q, k, v, patterns, block, scale)


def cpu_per_head_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, streaming: list,
                           window: int, sinks: int, scale: Optional[float] = None) -> torch.Tensor:
    """``fxforge::per_head_attention``: the full heads on the causal CPU attention, the
    streaming heads on the sliding-window kernel (each group's heads gathered once)."""
    full, stream = head_groups(streaming, k.shape[1])
    gqa = q.shape[1] != k.shape[1]
    if not stream:
        return cpu_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    if not full:
        return cpu_window_attention(q, k, v, window, sinks, scale)
    groups, out = q.shape[1] // k.shape[1], like_query(q, v)
    for kv, run in ((full, lambda *a: cpu_attention(*a, is_causal=True, scale=scale, enable_gqa=gqa)),
                    (stream, lambda *a: cpu_window_attention(*a, window, sinks, scale))):
        rows, index = torch.tensor(query_heads(kv, groups)), torch.tensor(kv)
        out.index_copy_(1, rows, run(q.index_select(1, rows), k.index_select(1, index),
                                     v.index_select(1, index)))
    return out


def cpu_cached_per_head_attention(q, k, v, k_full, v_full, k_stream, v_stream, cache_pos,
                                  streaming: list, window: int, sinks: int,
                                  scale: Optional[float] = None) -> torch.Tensor:
    """``fxforge::cached_per_head_attention``: the CPU cached kernels on each group of heads."""
    return split_heads(q, k, v, k_full, v_full, k_stream, v_stream, cache_pos, streaming, window,
                       sinks, scale, cpu_cached_attention, cpu_cached_window_attention)
