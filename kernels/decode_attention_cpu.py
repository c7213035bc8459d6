"""``fxforge::cached_attention`` on the CPU: a small C++ kernel for the decode step, SDPA otherwise.

The op runs once per layer per generated token, so its fixed cost matters as much as its
bandwidth. Measured on a 2-core Zen 1 (AVX2, one thread, SmolLM2's H=9, Hkv=3, D=64, fp32, q/k/v as
views of [B, t, H, D] projections), the ATen composition :func:`sdpa_cached_attention` -- two
slice ``copy_`` into the caches, two cache views, ``F.scaled_dot_product_attention`` (its flash
path with ``enable_gqa``, the fastest SDPA variant there) -- costs ~80 us a call at L=32 (each torch
call paid ~4-8 us of dispatch in that process) and ~170 us at L=512 (PyTorch's CPU kernels run
GEMMs with one query row). The C++ kernel does the whole op in one ctypes call, ~18 us at L=32
and ~78 us at L=512 (~58 us on two threads): it reads the cache length from ``cache_pos`` itself
(no ``.item()``), writes the new keys/values into the caches, and for each (batch, query head,
new position) row computes the scores of its visible keys (``j <= L + i``), an exact softmax in
fp32 and the weighted sum of values. The dot products run several keys at a time (independent
FMA chains), the weighted sum keeps its accumulators in registers, and rows spread over threads
once the work pays for a parallel region. ``/tmp/scratch/decode_attention_bench.py`` measures.

With ``kv_cache_dtype="int8"`` the caches hold int8 codes and per-row scales
(:mod:`fxforge.irgraph.kv_quant`); the kernel quantizes the new rows as it writes them and
dequantizes as it reads (``kernels/decode_attention_cpp.py``), a prefill through the cache writes
codes and attends to the dequantized prefix.

It applies when q, k, v and both caches share one of fp32/bf16/fp16 (or the caches are int8 with
scales), every tensor is on the CPU
with a unit stride in its last dim, ``cache_pos`` is int64 and q/k share a head dim of at most
256; anything else (or a machine without a C++ compiler) takes :func:`sdpa_cached_attention`,
which follows the reference op step by step. Layout checks are cached per (shape, stride, dtype,
device) key, so a decode loop pays them once.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import math
from typing import Callable, Optional

import torch

from fxforge.irgraph.kv_quant import load, store
from fxforge.irgraph.ops import _check_cached, cache_overflow
from fxforge.kernels.attention_cpp import kernel_declines as tiled_declines
from fxforge.kernels.attention_cpp import tiled_attention
from fxforge.kernels.decode_attention_cpp import MAX_HEAD_DIM, META_LEN, SOURCE, SUFFIX
from fxforge.kernels.plan_cache import PlanCache
from fxforge.kernels.replay import launch
from fxforge.kernels.toolchain import load_function

log = logging.getLogger("fxforge.kernels")

MAX_PLANS = 64
# From this many new positions (a prompt's prefill through the cache) the tiled prefill kernel
# of attention_cpp.py beats this one's row-at-a-time loops. SmolLM2's heads, fp32, 2 threads:
# the op alone (cache copies included) ties at 64 rows and wins 1.15x at 128, 1.5x at 256, 1.7x
# at 1000; the whole 30-layer prefill through the cache ties at 200 tokens (857 vs 874 ms) and
# gains 5% at 500 (2385 vs 2275 ms).
TILED_MIN_ROWS = 256


def _typed(fn) -> Callable:
    fn.restype = ctypes.c_int
    fn.argtypes = (ctypes.c_void_p,) * 8 + (ctypes.c_float, ctypes.c_int) + (ctypes.c_void_p,) * 2
    return fn


@functools.lru_cache(maxsize=None)
def entry(dtype: torch.dtype, int8_cache: bool = False) -> Callable:
    """The compiled entry point for q/k/v of ``dtype`` over caches of that dtype or int8 (built
    once into the kernel cache, ~2 s; the int8 ones in the ISA variant :func:`q8_isa` picks)."""
    if not int8_cache:
        return _typed(load_function(SOURCE, f"fxf_decode_attention_{SUFFIX[dtype]}", "decode_attention"))
    isa = q8_isa()
    return _typed(load_function(SOURCE, f"fxf_decode_attention_{SUFFIX[dtype]}_q8",
                                f"decode_attention_{isa}", isa=isa))


def q8_isa() -> str:
    from fxforge.kernels.quant_gemv_cpu import choose_isa
    return choose_isa()


def built_q8_isa(isa: str) -> int:
    """What the ``isa`` build of the int8 entries compiled: 2 for the AVX2 loops, 0 portable."""
    fn = load_function(SOURCE, "fxf_decode_q8_isa", f"decode_attention_{isa}", isa=isa)
    fn.restype, fn.argtypes = ctypes.c_int, ()
    return int(fn())


def kernel_declines(q, k, v, k_cache, v_cache, cache_pos, k_scale=None,
                    v_scale=None) -> Optional[str]:
    """Why the C++ kernel cannot run these inputs (after the op's own checks), or None."""
    tensors = (q, k, v, k_cache, v_cache)
    cache_dtype = torch.int8 if k_scale is not None else q.dtype   # int8: the scales are checked
    if q.dtype not in SUFFIX or any(t.dtype != q.dtype for t in (k, v)) \
            or any(t.dtype != cache_dtype for t in (k_cache, v_cache)):
        return (f"q, k, v and the caches in one of fp32/bf16/fp16 (the caches may be int8), got "
                f"{[t.dtype for t in tensors]}")
    scales = (k_scale, v_scale) if k_scale is not None else ()
    if not all(t.is_cpu for t in (*tensors, *scales, cache_pos)) or cache_pos.dtype != torch.int64:
        return "needs CPU tensors and an int64 cache_pos"
    if any(t.stride(-1) != 1 and t.shape[-1] > 1 for t in tensors):
        return "needs a unit stride in the head dim"
    if q.shape[-1] != k.shape[-1] or k.shape[-1] > MAX_HEAD_DIM or v.shape[-1] > MAX_HEAD_DIM:
        return f"needs q and k of one head dim and head dims of at most {MAX_HEAD_DIM}"
    return None


def _check_shapes(q, k, v, k_cache, v_cache, cache_pos, k_scale=None, v_scale=None) -> None:
    """The op's shape contract (``fxforge::cached_attention``) plus what the copies need."""
    _check_cached(q, k, v, k_cache, v_cache, cache_pos, k_scale, v_scale)
    if k.shape[2] != v.shape[2] or q.shape[2] != k.shape[2] or k.shape[3] != k_cache.shape[3] \
            or v.shape[3] != v_cache.shape[3] or k_cache.shape[2] != v_cache.shape[2]:
        raise ValueError(f"cached_attention: q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}, "
                         f"caches {list(k_cache.shape)}/{list(v_cache.shape)} disagree on new "
                         "positions, head dims or capacity")


def _cache_span(k, k_cache, cache_pos) -> tuple[int, int]:
    """(cached length, end after the new positions), read into Python; ValueError naming the
    cache size when the new positions do not fit."""
    length, new = int(cache_pos.reshape(-1)[0]), k.shape[2]
    end = length + new
    if length < 0 or end > k_cache.shape[2]:
        raise cache_overflow(length, new, k_cache.shape[2])
    return length, end


def sdpa_cached_attention(q, k, v, k_cache, v_cache, cache_pos, scale=None, k_scale=None,
                          v_scale=None) -> torch.Tensor:
    """The op on ATen: slice copies into the caches, then SDPA on the cache views (no mask at
    t == 1: the one query sees every cached key; a causal triangle when the cache was empty; an
    offset causal mask otherwise). int8 caches: codes written, the prefix dequantized."""
    length, end = _cache_span(k, k_cache, cache_pos)
    new = k.shape[2]
    store(k_cache, k_scale, k, slice(length, end))
    store(v_cache, v_scale, v, slice(length, end))
    keys, values = k_cache[:, :, :end], v_cache[:, :, :end]
    if keys.dtype != q.dtype or values.dtype != q.dtype:
        keys = load(k_cache, k_scale, q.dtype, slice(0, end))
        values = load(v_cache, v_scale, q.dtype, slice(0, end))
    gqa = q.shape[1] != k.shape[1]
    if new == 1 or length == 0:
        return torch.nn.functional.scaled_dot_product_attention(
            q, keys, values, is_causal=new > 1, scale=scale, enable_gqa=gqa)
    # query i sees keys j <= length + i: -inf strictly above the diagonal shifted by `length`
    mask = torch.full((new, end), float("-inf"), dtype=q.dtype, device=q.device).triu_(length + 1)
    return torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask,
                                                            scale=scale, enable_gqa=gqa)


class CpuDecodeAttention:
    """``fxforge::cached_attention`` with the C++ kernel where it applies. One plan per input
    layout (shapes, strides, dtypes, devices): the kernel's metadata, or the reason it declined."""

    def __init__(self) -> None:
        self.plans = PlanCache(MAX_PLANS)   # shared by every thread (kernels/plan_cache.py)

    def __call__(self, q, k, v, k_cache, v_cache, cache_pos, scale=None, window: int = 0,
                 sinks: int = 0, k_scale=None, v_scale=None) -> torch.Tensor:
        """``window`` > 0: ``fxforge::cached_window_attention`` of one new position (its
        caller, kernels/window_attention_cpu.py, takes longer spans); ``k_scale``/``v_scale``:
        int8 caches' scales (irgraph/kv_quant.py)."""
        scales = (k_scale, v_scale) if k_scale is not None else ()
        key = tuple(x for t in (q, k, v, k_cache, v_cache, *scales)
                    for x in (t.shape, t.stride(), t.dtype, t.is_cpu)) + \
            (cache_pos.dtype, cache_pos.is_cpu, scale, window, sinks, len(scales))
        plan = self.plans.get(key)
        if plan is None:
            plan = self._plan(key, q, k, v, k_cache, v_cache, cache_pos, scale, window, sinks,
                              k_scale, v_scale)
        fn, meta_address, scale_value, out_shape, _ = plan
        if fn is None and window:
            from fxforge.irgraph.window_ops import cached_window_attention
            return cached_window_attention(q, k, v, k_cache, v_cache, cache_pos, window, sinks,
                                           scale, k_scale, v_scale)
        if fn is None:
            return sdpa_cached_attention(q, k, v, k_cache, v_cache, cache_pos, scale, k_scale, v_scale)
        if not window and _prefill_sized(q):
            out = _tiled_prefill(q, k, v, k_cache, v_cache, cache_pos, scale, k_scale, v_scale)
            if out is not None:
                return out
        out = torch.empty_like(q) if out_shape is None else torch.empty(out_shape, dtype=q.dtype)
        pointers = (k_scale.data_ptr(), v_scale.data_ptr()) if scales else (None, None)
        status = launch(fn, (meta_address, q.data_ptr(), k.data_ptr(), v.data_ptr(),
                             k_cache.data_ptr(), v_cache.data_ptr(), cache_pos.data_ptr(),
                             out.data_ptr(), scale_value, torch.get_num_threads(), *pointers), plan)
        if status != 0 and window:   # its plan took one new position: the length was < 0
            raise ValueError(f"cached_window_attention: negative cache length "
                             f"{int(cache_pos.reshape(-1)[0])}")
        if status != 0:
            raise cache_overflow(int(cache_pos.reshape(-1)[0]), k.shape[2], k_cache.shape[2])
        return out

    def _plan(self, key, q, k, v, k_cache, v_cache, cache_pos, scale, window, sinks, k_scale,
              v_scale) -> tuple:
        _check_shapes(q, k, v, k_cache, v_cache, cache_pos, k_scale, v_scale)
        reason = kernel_declines(q, k, v, k_cache, v_cache, cache_pos, k_scale, v_scale)
        if reason is None and window and (q.shape[2] != 1 or k_cache.shape[2] != window + sinks):
            reason = "a sliding window takes one new position over window + sinks slots"
        fn = None
        if reason is None:
            try:
                fn = entry(q.dtype, k_scale is not None)
            except Exception as exc:  # no compiler, a failed build: ATen computes the same
                log.warning("cached_attention: C++ decode kernel unavailable, using SDPA: %s", exc)
        if fn is None:
            plan = (None, 0, 0.0, None, None)
        else:
            plan = self._kernel_plan(fn, q, k, v, k_cache, v_cache, scale, window, sinks,
                                     k_scale, v_scale)
        return self.plans.add(key, plan)

    @staticmethod
    def _kernel_plan(fn, q, k, v, k_cache, v_cache, scale, window=0, sinks=0, k_scale=None,
                     v_scale=None) -> tuple:
        batch, heads, new, head_dim = q.shape
        value_dim = v.shape[3]
        # The output takes q's layout when it can (empty_like is the cheapest allocation, and
        # q's usual [B, t, H, D] layout makes the transpose-reshape after attention free).
        out_shape = (batch, heads, new, value_dim)
        out_strides = (heads * new * value_dim, new * value_dim, value_dim)
        if value_dim == head_dim:
            like = torch.empty_like(q)
            if like.stride(3) == 1:
                out_shape, out_strides = None, like.stride()[:3]
        scale_strides = (*k_scale.stride()[:3], *v_scale.stride()[:3]) if k_scale is not None \
            else (0,) * 6
        meta = (ctypes.c_int64 * META_LEN)(
            batch, heads, k.shape[1], new, head_dim, value_dim, k_cache.shape[2],
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *k_cache.stride()[:3],
            *v_cache.stride()[:3], *out_strides, window, sinks, *scale_strides)
        scale_value = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
        return fn, ctypes.addressof(meta), scale_value, out_shape, meta  # meta: kept alive


def _prefill_sized(q: torch.Tensor) -> bool:
    """Enough new fp32 positions for the tiled prefill kernel to be worth trying."""
    return q.shape[2] >= TILED_MIN_ROWS and q.dtype == torch.float32


def _tiled_prefill(q, k, v, k_cache, v_cache, cache_pos, scale, k_scale=None,
                   v_scale=None) -> Optional[torch.Tensor]:
    """Many new positions at once: write them into the caches, then the tiled prefill kernel
    over the cache views (int8 caches: over their dequantized prefix) with the causal diagonal
    shifted by the cache length; None (nothing written) where that kernel declines (not fp32,
    more keys than it takes, ...). Reads the length into Python: a decode-step replay never
    records this path (it is for prompts)."""
    length, end = _cache_span(k, k_cache, cache_pos)
    keys, values = k_cache[:, :, :end], v_cache[:, :, :end]
    if k_scale is not None:   # what it would read: the dequantized prefix (contiguous, q's dtype)
        keys, values = torch.empty(keys.shape, dtype=q.dtype), torch.empty(values.shape, dtype=q.dtype)
    if tiled_declines(q, keys, values) is not None:
        return None
    store(k_cache, k_scale, k, slice(length, end))
    store(v_cache, v_scale, v, slice(length, end))
    if k_scale is not None:
        keys = load(k_cache, k_scale, q.dtype, slice(0, end))
        values = load(v_cache, v_scale, q.dtype, slice(0, end))
    return tiled_attention(q, keys, values, None, True, scale, causal_offset=length)


_KERNEL = CpuDecodeAttention()


def cpu_cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                         v_cache: torch.Tensor, cache_pos: torch.Tensor,
                         scale: Optional[float] = None, k_scale: Optional[torch.Tensor] = None,
                         v_scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``fxforge::cached_attention`` on the CPU: writes k/v into the caches at ``cache_pos``
    and returns the new positions' attention over the cache (the module docstring has how)."""
    return _KERNEL(q, k, v, k_cache, v_cache, cache_pos, scale, k_scale=k_scale, v_scale=v_scale)


def cpu_decode_path(q, k, v, k_cache, v_cache, cache_pos, k_scale=None, v_scale=None) -> str:
    """Which path :func:`cpu_cached_attention` takes for inputs like these, for reports."""
    reason = kernel_declines(q, k, v, k_cache, v_cache, cache_pos, k_scale, v_scale)
    if reason is not None:
        return f"SDPA on the cache views ({reason})"
    if _prefill_sized(q):
        return "tiled C++ prefill attention over the cache"
    return "C++ decode kernel" + (" (int8 cache)" if k_scale is not None else "")
