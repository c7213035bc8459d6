"""An int8 KV cache (``options={"kv_cache": True, "kv_cache_dtype": "int8"}``): the rule, once.

Each cached key (and value) row -- one (batch, kv head, position) -- is stored as ``head_dim``
int8 codes plus one fp32 scale: symmetric, ``scale = absmax / 127`` and ``code = round(x /
scale)`` (half to even, as ``torch.round`` and C's ``nearbyintf``; an all-zero row has scale 0
and codes 0). Reading gives ``code * scale``. Symmetric per-row scales keep the kernel's inner
loops free of offsets: a key's scale multiplies its score once, a value's scale its softmax
weight once. A row of a head is 64-128 numbers, and one scale over them costs 4 bytes per row.

The cached attention ops (``irgraph/ops.py``, ``irgraph/window_ops.py``) take the scales as two
extra buffers, ``k_scale``/``v_scale`` ``[B, Hkv, capacity, 1]``; with them the caches hold
codes, and attention sees every key and value as its int8 round trip, the new positions' own
included (so a prefill and the decode steps after it read the same numbers).
"""
from __future__ import annotations

from typing import Optional

import torch

QMAX = 127
KV_CACHE_DTYPES = ("auto", "int8")   # "auto": the model's dtype (the cache stores k, v as they are)


def parse_kv_cache_dtype(value) -> str:
    """The option's canonical value (None means "auto"); ValueError naming the choices."""
    if value is None:
        return "auto"
    if not isinstance(value, str) or value not in KV_CACHE_DTYPES:
        raise ValueError(f"option kv_cache_dtype must be one of {KV_CACHE_DTYPES} (or None), "
                         f"got {value!r}")
    return value


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes shaped like ``x``, fp32 scales ``[..., 1]``) of ``x``'s last-dim rows."""
    xf = x.float()
    scales = xf.abs().amax(-1, keepdim=True) / QMAX
    ratio = torch.where(scales > 0, xf / scales, torch.zeros_like(xf))
    return ratio.round().clamp_(-QMAX, QMAX).to(torch.int8), scales


def dequantize(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (codes.float() * scales).to(dtype)


def round_trip(x: torch.Tensor) -> torch.Tensor:
    """What an int8 cache gives back for ``x`` (in ``x``'s dtype)."""
    return dequantize(*quantize_rows(x), x.dtype)


def check_scales(name: str, cache: torch.Tensor, scales: Optional[torch.Tensor]) -> None:
    """A quantized cache is int8 with fp32 scales ``[B, Hkv, capacity, 1]``; a plain one has none."""
    if scales is None:
        if cache.dtype == torch.int8:
            raise ValueError(f"fxforge::{name}: an int8 cache needs its scales (k_scale, v_scale)")
        return
    if cache.dtype != torch.int8 or scales.dtype != torch.float32 or scales.dim() != 4 \
            or tuple(scales.shape) != (*cache.shape[:3], 1):
        raise ValueError(f"fxforge::{name}: scales {scales.dtype} {list(scales.shape)} must be "
                         f"float32 [batch, kv heads, capacity, 1] for an int8 cache "
                         f"{cache.dtype} {list(cache.shape)}")


def check_pair(name: str, k_cache, v_cache, k_scale, v_scale) -> None:
    if (k_scale is None) != (v_scale is None):
        raise ValueError(f"fxforge::{name}: k_scale and v_scale come together")
    check_scales(name, k_cache, k_scale)
    check_scales(name, v_cache, v_scale)


def store(cache: torch.Tensor, scales: Optional[torch.Tensor], x: torch.Tensor,
          slots: slice | torch.Tensor) -> None:
    """Write rows ``x`` ``[B, Hkv, t, D]`` at ``slots`` (a slice or an index tensor along dim 2)
    of ``cache``: as they are, or as codes and scales."""
    if scales is None:
        values, row_scales = x.to(cache.dtype), None
    else:
        values, row_scales = quantize_rows(x)
    if isinstance(slots, slice):
        cache[:, :, slots].copy_(values)
        if row_scales is not None:
            scales[:, :, slots].copy_(row_scales)
    else:
        cache.index_copy_(2, slots, values)
        if row_scales is not None:
            scales.index_copy_(2, slots, row_scales)


def load(cache: torch.Tensor, scales: Optional[torch.Tensor], dtype: torch.dtype,
         slots: slice | torch.Tensor) -> torch.Tensor:
    """The rows at ``slots`` as attention reads them, in ``dtype``."""
    if isinstance(slots, slice):
        rows = cache[:, :, slots]
        row_scales = scales[:, :, slots] if scales is not None else None
    else:
        rows = cache.index_select(2, slots)
        row_scales = scales.index_select(2, slots) if scales is not None else None
    return rows.to(dtype) if row_scales is None else dequantize(rows, row_scales, dtype)
