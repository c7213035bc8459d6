"""Feature-map linear attention on the CPU (the ops of :mod:`fxforge.irgraph.linear_ops`).

Prefill (``fxforge::linear_attention``, and a cached span of new positions): the chunked causal
prefix-sum form (:func:`fxforge.irgraph.linear_ops.run_chunks`) with ``CHUNK`` queries at a time:
each chunk weighs the keys of its band explicitly (its own and the window before it) on ATen's
matmuls and reads the older ones from the running state, so time grows as ``O(L (W + CHUNK))``,
not ``O(L^2)``.

Decode (``fxforge::cached_linear_attention`` of one new position): :func:`_decode_step`, the
recurrent step in ``O(window + F Dv)`` per head, written with tensor ops only (the cache length
is never read into Python), so a recorded step replays (``kernels/replay.py``): the state is reset
where the length is 0, the ring's slots know their positions from the length, keys the sums hold
already (by their count: a step run twice) are left out of the band, the key leaving the window
is folded into the sums and the new key takes its slot.
"""
from __future__ import annotations

from typing import Optional

import torch

from fxforge.irgraph.linear_ops import (attention_weights, check_cached, check_linear,
                                        default_scale, extend, feature_map, features_of, grouped,
                                        like_query, normalise, run_chunks, with_ones)

CHUNK = 64   # queries per chunk: big enough for the matmuls to be efficient, small for the band


def cpu_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, feature: str,
                         window: int, scale: Optional[float] = None,
                         q_map: Optional[torch.Tensor] = None,
                         k_map: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``fxforge::linear_attention`` in chunks (module docstring)."""
    check_linear("linear_attention", q, k, v, feature, window, q_map, k_map)
    rows = features_of(feature, q.shape[-1], q_map)
    sums = q.new_zeros((k.shape[0], k.shape[1], rows, v.shape[-1] + 1),
                       dtype=torch.promote_types(q.dtype, torch.float32))
    out = run_chunks(q, k, v, sums, 0, 0, feature, window, default_scale(q, scale), q_map, k_map,
                     CHUNK)
    return like_query(q, v).copy_(out)


def cpu_cached_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                state: torch.Tensor, k_cache: Optional[torch.Tensor],
                                v_cache: Optional[torch.Tensor], cache_pos: torch.Tensor,
                                feature: str, window: int, scale: Optional[float] = None,
                                q_map: Optional[torch.Tensor] = None,
                                k_map: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``fxforge::cached_linear_attention``: the decode step for one new position, else chunks."""
    check_cached(q, k, v, state, k_cache, v_cache, cache_pos, feature, window, q_map, k_map)
    if q.shape[2] == 1:
        return _decode_step(q, k, v, state, k_cache, v_cache, cache_pos, feature, window,
                            default_scale(q, scale), q_map, k_map)
    return extend(q, k, v, state, k_cache, v_cache, int(cache_pos.reshape(-1)[0]), feature,
                  window, scale, q_map, k_map, CHUNK)


def _decode_step(q, k, v, state, k_cache, v_cache, cache_pos, feature, window, scale, q_map,
                 k_map) -> torch.Tensor:
    dtype, length = state.dtype, cache_pos.reshape(1).to(q.device)
    state.copy_(torch.where(length > 0, state, 0))    # a new sequence: a reused cache's old state
    keys, values, key_pos = k.to(dtype), v.to(dtype), length
    if window:
        slots = torch.arange(window, device=q.device)
        held = length - 1 - torch.remainder(length - 1 - slots, window)   # slot s's position
        filled = (held >= 0)[None, None, :, None]
        # unfilled slots hold whatever the memory held (NaN included): zeroed, and placed after
        # the query so that neither part of the weights reads them
        keys = torch.cat([torch.where(filled, k_cache.to(dtype), 0), keys], dim=2)
        values = torch.cat([torch.where(filled, v_cache.to(dtype), 0), values], dim=2)
        key_pos = torch.cat([torch.where(held >= 0, held, length + 1), length])
    # keys the sums hold already (a second run of this step) are read through the sums only
    sums, folded = state[:, :, :-1], state[0, 0, -1, 0]
    key_pos = torch.where(key_pos < folded, length + 1, key_pos)
    qf, kf, ones = feature_map(q.to(dtype), feature, q_map), feature_map(keys, feature, k_map), \
        with_ones(values)
    weights = attention_weights(q.to(dtype), keys, qf, kf, length, key_pos, window, scale)
    out = normalise(weights @ ones.unsqueeze(2) + grouped(qf, sums.shape[1]) @ sums.unsqueeze(2),
                    q.shape[1])
    # the key the next query sees only linearly (position L - window) joins the sums
    leaving = (key_pos <= length - window)[:, None]
    sums += torch.where(leaving, kf, 0).transpose(-1, -2) @ ones
    state[:, :, -1] = torch.maximum(folded, (length + 1 - window).clamp(min=0).to(dtype))
    if window:
        slot = torch.remainder(length, window)
        k_cache.index_copy_(2, slot, k.to(k_cache.dtype))
        v_cache.index_copy_(2, slot, v.to(v_cache.dtype))
    return like_query(q, v).copy_(out)
