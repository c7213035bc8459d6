"""Sliding-window attention with sinks on the CPU (the ops of :mod:`fxforge.irgraph.window_ops`).

Prefill (``fxforge::window_attention``, and a cached prompt), by length:

* up to ``window + sinks`` positions every query sees its whole prefix: plain causal attention;
* a few windows long, where blocks would cost more: one causal call with the pattern as its
  mask (:func:`_one_call` weighs the two);
* longer: the queries go in blocks of ``QUERY_BLOCK``; a block attends only to the keys some
  query of it can see (the sinks and the ``window + block - 1`` positions ending at the block's
  last query), on the tiled C++ kernel with the causal diagonal skipped and the window's far
  edge masked (``cpu_attention`` past the tiled kernel's limits). The work per query is
  ``sinks + window + block`` keys instead of its whole prefix.

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
from fxforge.irgraph.window_ops import (cached_window_attention, check_window, like_query,
                                        visible, write_window)
from fxforge.kernels.attention_cpp import kernel_declines as tiled_declines
from fxforge.kernels.attention_cpp import tiled_attention
from fxforge.kernels.attention_cpu import cpu_attention
from fxforge.kernels.decode_attention_cpu import _KERNEL as DECODE

QUERY_BLOCK = 64
BLOCK_OVERHEAD = QUERY_BLOCK * 64   # key pairs: the gather, the mask and the call of a block


def key_span(start: int, end: int, window: int, sinks: int) -> tuple[range, range]:
    """The key positions queries ``start .. end - 1`` can see, as two ranges (sinks, recent);
    the first is empty when the recent range reaches back to the sinks."""
    recent = max(0, start - window + 1)
    if recent <= sinks:
        return range(0), range(0, end)
    return range(0, sinks), range(recent, end)


def _gather(t: torch.Tensor, sink: range, recent: range) -> torch.Tensor:
    part = t[:, :, recent.start:recent.stop]
    return torch.cat([t[:, :, :sink.stop], part], dim=2) if len(sink) else part


def _blocks(length: int, window: int, sinks: int) -> list[tuple[int, int, range, range]]:
    """(start, end, sink keys, recent keys) of each block of queries."""
    return [(start, min(start + QUERY_BLOCK, length),
             *key_span(start, min(start + QUERY_BLOCK, length), window, sinks))
            for start in range(0, length, QUERY_BLOCK)]


def _one_call(length: int, blocks: list) -> bool:
    """Whether the whole causal triangle with the pattern as a mask costs less than the blocks:
    a block's call costs about BLOCK_OVERHEAD key pairs beyond its work, and its keys reach back
    a block further than its first query needs."""
    blocked = sum((end - start) * (len(sink) + len(recent)) + BLOCK_OVERHEAD
                  for start, end, sink, recent in blocks)
    return length * (length + 1) // 2 <= blocked


def cpu_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                         sinks: int, scale: Optional[float] = None) -> torch.Tensor:
    """``fxforge::window_attention`` (module docstring)."""
    check_window(window, sinks)
    length, gqa = q.shape[2], q.shape[1] != k.shape[1]
    if length <= window + sinks:
        return cpu_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    blocks = _blocks(length, window, sinks)
    if _one_call(length, blocks):
        mask = visible(torch.arange(length), torch.arange(length), window, sinks)
        if tiled_declines(q, k, v, mask) is None:
            return tiled_attention(q, k, v, mask, True, scale)
    out = like_query(q, v)
    for start, end, sink, recent in blocks:
        keys, values = _gather(k, sink, recent), _gather(v, sink, recent)
        mask = visible(torch.arange(start, end), torch.tensor([*sink, *recent]), window, sinks)
        block = q[:, :, start:end]
        if tiled_declines(block, keys, values, mask) is None:
            # the causal diagonal ends the visible keys (the kernel skips what lies past it);
            # the mask adds the window's far edge
            out[:, :, start:end] = tiled_attention(block, keys, values, mask, True, scale,
                                                   causal_offset=len(sink) + start - recent.start)
        else:
            out[:, :, start:end] = cpu_attention(block, keys, values, mask, scale=scale,
                                                 enable_gqa=gqa)
    return out


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
