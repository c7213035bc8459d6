"""fxforge's feature-map linear attention ops, what ``attention="linear:..."``
(``passes/attention_linear.py``) and the KV-cache pass put where a causal
``scaled_dot_product_attention`` was.

The definition, one rule used everywhere (:func:`attention_weights`): the query at position ``i``
gives the key at ``j <= i`` the weight

* ``exp(s_ij - m_i)`` when ``i - j < window`` (a softmax over the last ``window`` keys, itself
  included; ``s = q.k * scale``, ``m_i`` the largest such score), and
* ``phi_q(q_i) . phi_k(k_j)`` for the older keys (linear attention),

and its output is ``sum_j w_ij v_j / sum_j w_ij``: one normalisation over both parts (LoLCATs).
With ``window = 0`` it is plain causal linear attention (Katharopoulos et al.). The feature map
``phi``: ``elu`` is ``elu(x) + 1`` (F = D); ``fitted`` is Hedgehog's ``[softmax(x W),
softmax(-x W)]`` with one ``W [D, M]`` per head (F = 2 M), fitted per layer
(``passes/attention_linear_fit.py``): ``q_map [H, D, M]`` and ``k_map [Hkv, D, M]``.

Because the older keys enter through ``phi_k(k_j) [v_j, 1]^T`` summed, they fold into fixed-size
*sums* ``[B, Hkv, F, Dv + 1]`` (the ones column is the normaliser): that is what the cached op
keeps, with a ring of the last ``window`` keys and values (slot ``p % window``), so a cache never
grows. Its *state* is ``[B, Hkv, F + 1, Dv + 1]``: the sums, then a row holding how many keys
they hold (``folded``), so a decode step run twice (the runtime validates a replayed step that
way) folds each key once. A count in fp32 is exact to 2^24 positions. GQA: query head ``h``
reads kv head ``h // (H // Hkv)``.

``fxforge::linear_attention(q, k, v, feature, window, scale, q_map, k_map)``: one sequence,
q ``[B, H, L, D]``, k/v ``[B, Hkv, L, D]``. Reference: the explicit ``O(L^2)`` weights.

``fxforge::cached_linear_attention(q, k, v, state, k_cache, v_cache, cache_pos, ...)``: ``t`` new
positions after ``L = cache_pos`` cached ones. Invariant: the sums hold the keys before
``max(0, L - window)``, the ring those from there to ``L - 1`` (``k_cache``/``v_cache`` are None
when ``window`` is 0). At ``L = 0`` the state is reset (a reused cache may hold an old sequence).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from fxforge.irgraph.window_ops import like_query

FEATURES = ("elu", "fitted")


def feature_map(x: torch.Tensor, feature: str, maps: Optional[torch.Tensor]) -> torch.Tensor:
    """``phi(x)``: ``[B, heads, L, D] -> [B, heads, L, F]`` (``maps``: ``[heads, D, M]``)."""
    if feature == "elu":
        return F.elu(x) + 1
    y = torch.einsum("bhld,hdm->bhlm", x, maps.to(x.dtype))
    return torch.cat([y.softmax(-1), (-y).softmax(-1)], dim=-1)


def features_of(feature: str, head_dim: int, maps: Optional[torch.Tensor]) -> int:
    """F, the sums' rows per head (the state has one more: the count)."""
    return head_dim if feature == "elu" else 2 * maps.shape[-1]


def check_linear(name: str, q, k, v, feature: str, window: int, q_map, k_map) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"fxforge::{name}: q, k, v must be 4-D [batch, heads, positions, head_dim]")
    if q.shape[0] != k.shape[0] or k.shape[:3] != v.shape[:3] or q.shape[1] % k.shape[1] \
            or q.shape[2] != k.shape[2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"fxforge::{name}: q {list(q.shape)}, k {list(k.shape)}, v "
                         f"{list(v.shape)} do not match (batch, positions, GQA groups)")
    if feature not in FEATURES or window < 0:
        raise ValueError(f"fxforge::{name}: feature must be one of {FEATURES} and window >= 0, "
                         f"got {feature!r}, {window}")
    if feature == "fitted":
        if q_map is None or k_map is None or q_map.dim() != 3 or k_map.shape[1:] != q_map.shape[1:] \
                or q_map.shape[:2] != (q.shape[1], q.shape[3]) or k_map.shape[0] != k.shape[1]:
            raise ValueError(f"fxforge::{name}: fitted maps must be q_map [H, D, M] and k_map "
                             f"[Hkv, D, M] for q {list(q.shape)}, k {list(k.shape)}")


def grouped(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """``[B, H, L, X] -> [B, Hkv, G, L, X]``: each kv head's query group (a view)."""
    return x.unflatten(1, (kv_heads, x.shape[1] // kv_heads))


def attention_weights(q, k, qf, kf, query_pos, key_pos, window: int, scale: float) -> torch.Tensor:
    """The unnormalised weights ``[B, Hkv, G, t, n]`` of queries at ``query_pos`` (their ``q``
    ``[B, H, t, D]`` and features ``qf``) for keys at ``key_pos`` (``k``, ``kf``: ``[B, Hkv, n, .]``)."""
    gap = query_pos[:, None] - key_pos[None, :]
    recent = (gap >= 0) & (gap < window)
    weights = torch.where(gap >= window, grouped(qf, kf.shape[1]) @ kf.unsqueeze(2).transpose(-1, -2), 0)
    if window:
        scores = (grouped(q, k.shape[1]) @ k.unsqueeze(2).transpose(-1, -2)) * scale
        scores = scores.masked_fill(~recent, float("-inf"))
        # a query sees at least itself in its window, so the max is finite
        weights = weights + (scores - scores.amax(-1, keepdim=True)).exp()
    return weights


def with_ones(v: torch.Tensor) -> torch.Tensor:
    """``[v, 1]``: the values with the normaliser's column."""
    return torch.cat([v, v.new_ones(v.shape[:-1] + (1,))], dim=-1)


def normalise(numerator_and_sum: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, Hkv, G, t, Dv + 1] -> [B, H, t, Dv]``: the output, divided by the weights' sum."""
    out = numerator_and_sum[..., :-1] / numerator_and_sum[..., -1:]
    return out.flatten(1, 2)


def default_scale(q: torch.Tensor, scale: Optional[float]) -> float:
    return q.shape[-1] ** -0.5 if scale is None else scale


@torch.library.custom_op("fxforge::linear_attention", mutates_args=())
def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, feature: str, window: int,
                     scale: Optional[float] = None, q_map: Optional[torch.Tensor] = None,
                     k_map: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Reference (the test oracle's twin): the explicit weights of every pair, O(L^2)."""
    check_linear("linear_attention", q, k, v, feature, window, q_map, k_map)
    positions = torch.arange(q.shape[2], device=q.device)
    weights = attention_weights(q, k, feature_map(q, feature, q_map), feature_map(k, feature, k_map),
                                positions, positions, window, default_scale(q, scale))
    out = normalise(weights @ with_ones(v).unsqueeze(2), q.shape[1])
    return like_query(q, v).copy_(out)


@linear_attention.register_fake
def _linear_attention_fake(q, k, v, feature, window, scale=None, q_map=None, k_map=None):
    check_linear("linear_attention", q, k, v, feature, window, q_map, k_map)
    return like_query(q, v)


def run_chunks(q, keys, values, sums, key_start: int, query_start: int, feature: str,
               window: int, scale: float, q_map, k_map, chunk: int) -> torch.Tensor:
    """The outputs ``[B, H, t, Dv]`` of queries ``query_start ..`` over ``keys``/``values`` (at
    positions ``key_start ..``, the last ``t`` of them the queries' own) and ``sums`` (the keys
    before ``key_start``, folded), ``chunk`` queries at a time: each chunk weighs its band (the
    keys from ``window`` before its first query to its last one) explicitly and the older keys
    through the sums, then folds the keys its successor sees only linearly into them (in
    place). Time ``O(t (window + chunk))``."""
    dtype = sums.dtype
    q, keys = q.to(dtype), keys.to(dtype)
    qf, kf = feature_map(q, feature, q_map), feature_map(keys, feature, k_map)
    ones = with_ones(values.to(dtype))
    parts = []
    for c0 in range(0, q.shape[2], chunk):
        c1 = min(c0 + chunk, q.shape[2])
        first, last = query_start + c0, query_start + c1
        b0 = max(key_start, first - window) - key_start
        band = slice(b0, last - key_start)
        weights = attention_weights(q[:, :, c0:c1], keys[:, :, band], qf[:, :, c0:c1],
                                    kf[:, :, band], torch.arange(first, last, device=q.device),
                                    torch.arange(key_start + b0, last, device=q.device), window, scale)
        parts.append(weights @ ones[:, :, band].unsqueeze(2)
                     + grouped(qf[:, :, c0:c1], sums.shape[1]) @ sums.unsqueeze(2))
        folded = slice(b0, max(key_start, last - window) - key_start)
        sums += kf[:, :, folded].transpose(-1, -2) @ ones[:, :, folded]
    return normalise(torch.cat(parts, dim=3), q.shape[1])


def extend(q, k, v, state, k_cache, v_cache, length: int, feature: str, window: int, scale,
           q_map, k_map, chunk: int) -> torch.Tensor:
    """``cached_linear_attention`` with ``chunk`` queries at a time (module docstring): the
    outputs of the new positions; the state and the ring updated in place."""
    if length < 0:
        raise ValueError(f"fxforge::cached_linear_attention: negative cache length {length}")
    if length == 0:
        state.zero_()
    key_start = max(0, length - window)
    keys, values = k, v
    if window:
        slots = torch.arange(key_start, length, device=q.device) % window
        keys = torch.cat([k_cache.index_select(2, slots).to(k.dtype), k], dim=2)
        values = torch.cat([v_cache.index_select(2, slots).to(v.dtype), v], dim=2)
    out = run_chunks(q, keys, values, state[:, :, :-1], key_start, length, feature, window,
                     default_scale(q, scale), q_map, k_map, chunk)
    state[:, :, -1].fill_(max(0, length + k.shape[2] - window))
    if window:
        end = length + k.shape[2]
        kept = torch.arange(max(length, end - window), end, device=q.device)
        k_cache.index_copy_(2, kept % window, k.index_select(2, kept - length).to(k_cache.dtype))
        v_cache.index_copy_(2, kept % window, v.index_select(2, kept - length).to(v_cache.dtype))
    return like_query(q, v).copy_(out)


def check_cached(q, k, v, state, k_cache, v_cache, cache_pos, feature, window, q_map, k_map):
    name = "cached_linear_attention"
    check_linear(name, q, k, v, feature, window, q_map, k_map)
    rows = features_of(feature, q.shape[-1], q_map)
    if state.dim() != 4 or tuple(state.shape) != (k.shape[0], k.shape[1], rows + 1, v.shape[-1] + 1):
        raise ValueError(f"fxforge::{name}: state {list(state.shape)} must be [batch, kv heads, "
                         f"features + 1 = {rows + 1}, head_dim + 1 = {v.shape[-1] + 1}]")
    ring = (k.shape[0], k.shape[1], window)
    if window and (k_cache is None or v_cache is None or tuple(k_cache.shape[:3]) != ring
                   or tuple(v_cache.shape[:3]) != ring):
        raise ValueError(f"fxforge::{name}: window {window} needs k_cache/v_cache "
                         f"[batch, kv heads, {window}, head_dim]")
    if cache_pos.numel() != 1:
        raise ValueError(f"fxforge::{name}: cache_pos must hold one integer")


@torch.library.custom_op("fxforge::cached_linear_attention",
                         mutates_args=("state", "k_cache", "v_cache"))
def cached_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: torch.Tensor,
                            k_cache: Optional[torch.Tensor], v_cache: Optional[torch.Tensor],
                            cache_pos: torch.Tensor, feature: str, window: int,
                            scale: Optional[float] = None, q_map: Optional[torch.Tensor] = None,
                            k_map: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Reference: all new queries as one band over the ring and the new keys, plus the state."""
    check_cached(q, k, v, state, k_cache, v_cache, cache_pos, feature, window, q_map, k_map)
    return extend(q, k, v, state, k_cache, v_cache, int(cache_pos.reshape(-1)[0]), feature, window,
                  scale, q_map, k_map, chunk=max(1, q.shape[2]))


@cached_linear_attention.register_fake
def _cached_linear_attention_fake(q, k, v, state, k_cache, v_cache, cache_pos, feature, window,
                                  scale=None, q_map=None, k_map=None):
    check_cached(q, k, v, state, k_cache, v_cache, cache_pos, feature, window, q_map, k_map)
    return like_query(q, v)
