"""Sliding-window attention with sinks on the CPU (the ops of :mod:`fxforge.irgraph.window_ops`).

Prefill (``fxforge::window_attention``, and a cached prompt), by length:

* up to ``window + sinks`` positions every query sees its whole prefix: plain causal attention;
* longer: the block-sparse kernel of ``kernels/sparse_attention_cpp.py`` with the pattern
  :func:`window_pattern`: each block of ``BLOCK`` queries reads the sink blocks and the blocks
  its window reaches back to, the element rule keeps exactly the sinks and the last ``window``
  keys. The work per query is about ``sinks + window + BLOCK`` keys instead of its prefix.
  Inputs the kernel declines (not fp32, huge batches) take the reference op.

Decode (``fxforge::cached_window_attention`` of one new position): the C++ decode kernel of
``kernels/decode_attention_cpu.py`` writes the key to its ring slot and attends to every filled
slot, reading the cache length itself (a replayed step sees the new length). Other spans of new
positions over a non-empty cache (a prompt continued in chunks) take the reference op. int8
caches (``kv_cache_dtype="int8"``) take the same paths, the decode kernel's int8 entry.
"""
from __future__ import annotations

from typing import Optional

import torch

from fxforge.irgraph.kv_quant import round_trip
from fxforge.irgraph.window_ops import (cached_window_attention, check_window, window_attention,
                                        write_window)
from fxforge.kernels.attention_cpu import cpu_attention
from fxforge.kernels.decode_attention_cpu import _KERNEL as DECODE
from fxforge.kernels.sparse_attention_cpp import kernel_declines, sparse_attention

BLOCK = 64


def window_pattern(window: int, sinks: int, block: int = BLOCK) -> tuple[int, ...]:
    """The block-sparse pattern ``(local, global, stride, window, sinks)`` of a window with
    sinks: the blocks holding the sinks, and the blocks from the diagonal back to the one the
    window of the block's first query starts in."""
    local = -(-(window - 1) // block) + 1
    return (local, -(-sinks // block), 0, window, sinks)


def cpu_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                         sinks: int, scale: Optional[float] = None) -> torch.Tensor:
    """``fxforge::window_attention`` (module docstring)."""
    check_window(window, sinks)
    if q.shape[2] <= window + sinks:
        return cpu_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    if kernel_declines(q, k, v, BLOCK) is None:
        return sparse_attention(q, k, v, [window_pattern(window, sinks, BLOCK)], BLOCK, scale)
    return window_attention(q, k, v, window, sinks, scale)


def cpu_cached_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                k_cache: torch.Tensor, v_cache: torch.Tensor,
                                cache_pos: torch.Tensor, window: int, sinks: int,
                                scale: Optional[float] = None, k_scale: Optional[torch.Tensor] = None,
                                v_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``fxforge::cached_window_attention`` (module docstring); ``k_scale``/``v_scale``: int8
    caches' scales (a prompt then attends to its keys' and values' int8 round trips)."""
    if q.shape[2] == 1:
        return DECODE(q, k, v, k_cache, v_cache, cache_pos, scale, window, sinks, k_scale, v_scale)
    if int(cache_pos.reshape(-1)[0]) == 0 and k_cache.shape[2] == window + sinks:
        seen_k, seen_v = (round_trip(k), round_trip(v)) if k_scale is not None else (k, v)
        out = cpu_window_attention(q, seen_k, seen_v, window, sinks, scale)
        write_window(k, v, k_cache, v_cache, 0, window, sinks, k_scale, v_scale)
        return out
    return cached_window_attention(q, k, v, k_cache, v_cache, cache_pos, window, sinks, scale,
                                   k_scale, v_scale)
