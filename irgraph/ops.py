"""fxforge's own IR ops: fused operations that passes create and backends lower.

Each is a ``torch.library.custom_op`` with a fake (meta) implementation, so a rewritten graph
still runs eagerly (the reference implementation here is the test oracle), propagates fake
tensors, and serializes by name (``torch.ops.fxforge.*``).

``fxforge::linear(x, weight, bias, activation, residual, out_dtype, weight_format, scales,
offsets)`` is a matmul
with its epilogue folded in::

    y = act(x @ W + bias) + residual        # then cast to out_dtype (default x.dtype)

``x`` is ``[M, K]``, ``weight`` is ``[K, N]`` (the second operand of ``mm``, usually a
transposed view of an ``nn.Linear`` weight), ``bias`` ``[N]``, ``residual`` ``[M, N]``;
``W`` is the weight in its ``weight_format`` (:mod:`fxforge.irgraph.weight_format`; "dense": the
weight as it is, "bf16": its values rounded to bf16; the quantized formats: codes, with their
``scales`` and ``offsets`` tensors), which kernels read from here.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from fxforge.irgraph.kv_quant import check_pair, load, store
from fxforge.irgraph.op_compat import tolerate_omitted_mutated_args
from fxforge.irgraph.weight_format import DENSE, decode, implemented_format, weight_format as format_named

# activation name -> function; the names are part of the IR (serialized as strings).
ACTIVATIONS = {
    "none": lambda y: y,
    "relu": torch.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda y: F.gelu(y, approximate="tanh"),
    "silu": F.silu,
}


def _check(x, weight, bias, activation, residual, weight_format=DENSE, scales=None,
           offsets=None) -> None:
    fmt = implemented_format(weight_format) if weight_format != DENSE else format_named(DENSE)
    fmt.check_extras(weight, (scales, offsets))   # an unknown format, a declared slot: clear errors
    if activation not in ACTIVATIONS:
        raise ValueError(f"fxforge::linear: unknown activation {activation!r}; one of {sorted(ACTIVATIONS)}")
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != fmt.in_features(weight):
        raise ValueError(f"fxforge::linear: x {list(x.shape)} and weight {list(weight.shape)} "
                         "do not form [M, K] @ [K, N]")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[1]):
        raise ValueError(f"fxforge::linear: bias {list(bias.shape)} is not [N={weight.shape[1]}]")
    if residual is not None and list(residual.shape) != [x.shape[0], weight.shape[1]]:
        raise ValueError(f"fxforge::linear: residual {list(residual.shape)} is not "
                         f"[{x.shape[0]}, {weight.shape[1]}]")


@torch.library.custom_op("fxforge::linear", mutates_args=())
def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], activation: str,
           residual: Optional[torch.Tensor], out_dtype: Optional[torch.dtype] = None,
           weight_format: str = DENSE, scales: Optional[torch.Tensor] = None,
           offsets: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Reference: the same ATen ops, in the same order, as the unfused graph (bit-exact), on
    the weight decoded from its format."""
    _check(x, weight, bias, activation, residual, weight_format, scales, offsets)
    quantized_math = format_named(weight_format).matmul   # w8a8: the activations quantized too
    if quantized_math is not None:
        y = quantized_math(x, weight, scales, offsets)
        y = y + bias if bias is not None else y
    else:
        if weight_format != DENSE:
            weight = decode(weight, weight_format, scales, offsets)
        y = torch.addmm(bias, x, weight) if bias is not None else torch.mm(x, weight)
    y = ACTIVATIONS[activation](y)
    if residual is not None:
        y = y + residual
    return y.to(out_dtype) if out_dtype is not None else y.clone() if y is x else y


@linear.register_fake
def _linear_fake(x, weight, bias, activation, residual, out_dtype=None, weight_format=DENSE,
                 scales=None, offsets=None):
    _check(x, weight, bias, activation, residual, weight_format, scales, offsets)
    stored = weight.dtype if weight.dtype.is_floating_point else torch.float32   # codes: fp32 values
    dtype = out_dtype if out_dtype is not None else torch.promote_types(x.dtype, stored)
    if residual is not None and out_dtype is None:
        dtype = torch.promote_types(dtype, residual.dtype)
    return x.new_empty((x.shape[0], weight.shape[1]), dtype=dtype)


fxforge_linear = torch.ops.fxforge.linear.default


# ``fxforge::cached_attention``: causal attention of ``t`` new positions against a static KV
# cache, the op the KV-cache pass puts where a causal ``scaled_dot_product_attention`` was.
#
#   q [B, H, t, D]; k, v [B, Hkv, t, D] (the new positions' keys/values); k_cache, v_cache
#   [B, Hkv, Lmax, D]; cache_pos: int64 tensor, one element: L, positions already cached.
#   Writes k, v into k_cache/v_cache[:, :, L:L+t], then query i (absolute position L+i) attends
#   keys 0..L+i of the cache. GQA: query head h reads kv head h // (H // Hkv).
#   Returns [B, H, t, Dv] in q's dtype. L + t > Lmax is an error naming the cache size.
#   k_scale, v_scale [B, Hkv, Lmax, 1] fp32 (kv_cache_dtype="int8"): the caches hold int8 codes
#   and these their per-row scales (irgraph/kv_quant.py); attention reads the dequantized rows.

def _check_cached(q, k, v, k_cache, v_cache, cache_pos, k_scale=None, v_scale=None) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or k_cache.dim() != 4 or v_cache.dim() != 4:
        raise ValueError("fxforge::cached_attention: q, k, v and the caches must be 4-D "
                         "[batch, heads, positions, head_dim]")
    if k.shape[:2] != k_cache.shape[:2] or v.shape[:2] != v_cache.shape[:2] or \
            q.shape[0] != k.shape[0] or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"fxforge::cached_attention: q {list(q.shape)}, k {list(k.shape)}, "
                         f"cache {list(k_cache.shape)} do not match (batch, kv heads, GQA groups)")
    if cache_pos.numel() != 1:
        raise ValueError("fxforge::cached_attention: cache_pos must hold one integer")
    check_pair("cached_attention", k_cache, v_cache, k_scale, v_scale)


def cache_overflow(length: int, new: int, capacity: int) -> ValueError:
    return ValueError(f"KV cache full: {length} cached + {new} new positions exceed its "
                      f"{capacity} positions (raise the max_seq_len option)")


@torch.library.custom_op("fxforge::cached_attention",
                         mutates_args=("k_cache", "v_cache", "k_scale", "v_scale"))
def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, cache_pos: torch.Tensor, scale: Optional[float] = None,
                     k_scale: Optional[torch.Tensor] = None,
                     v_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Reference (the test oracle): write the new positions, then SDPA with an offset mask."""
    _check_cached(q, k, v, k_cache, v_cache, cache_pos, k_scale, v_scale)
    length, new = int(cache_pos.reshape(-1)[0]), k.shape[2]
    if length < 0 or length + new > k_cache.shape[2]:
        raise cache_overflow(length, new, k_cache.shape[2])
    store(k_cache, k_scale, k, slice(length, length + new))
    store(v_cache, v_scale, v, slice(length, length + new))
    keys = load(k_cache, k_scale, q.dtype, slice(0, length + new))
    values = load(v_cache, v_scale, q.dtype, slice(0, length + new))
    rows = torch.arange(q.shape[2], device=q.device)[:, None] + length
    mask = torch.arange(length + new, device=q.device)[None, :] <= rows
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask,
                                          scale=scale, enable_gqa=q.shape[1] != k.shape[1])


@cached_attention.register_fake
def _cached_attention_fake(q, k, v, k_cache, v_cache, cache_pos, scale=None, k_scale=None,
                           v_scale=None):
    _check_cached(q, k, v, k_cache, v_cache, cache_pos, k_scale, v_scale)
    # The output's layout is q's, as the kernels and the reference (SDPA) give it: q usually
    # arrives as a transposed [B, t, H, D] projection, and the graph's permute + view after the
    # attention it replaced is only valid on that layout (an AOT artifact's step graph is
    # propagated again on load, and a contiguous result made that view fail there).
    if v.shape[-1] == q.shape[-1]:
        like = torch.empty_like(q)
        if like.stride(-1) == 1:
            return like
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


# torch 2.11: a call without k_scale/v_scale fails in the op's ADInplaceOrView kernel (op_compat).
tolerate_omitted_mutated_args(torch.ops.fxforge.cached_attention.default)
