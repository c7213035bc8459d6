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

It applies when q, k, v and both caches share one of fp32/bf16/fp16, every tensor is on the CPU
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

from fxforge.irgraph.ops import _check_cached, cache_overflow
from fxforge.kernels.attention_cpp import kernel_declines as tiled_declines
from fxforge.kernels.attention_cpp import tiled_attention
from fxforge.kernels.fused_cpp_math import MATH, PRELUDE
from fxforge.kernels.plan_cache import PlanCache
from fxforge.kernels.replay import launch
from fxforge.kernels.toolchain import load_function

log = logging.getLogger("fxforge.kernels")

MAX_HEAD_DIM = 256
PARALLEL_MIN_WORK = 1 << 16   # rows x visible keys x (D + Dv) below which one thread is faster
MAX_PLANS = 64
# From this many new positions (a prompt's prefill through the cache) the tiled prefill kernel
# of attention_cpp.py beats this one's row-at-a-time loops. SmolLM2's heads, fp32, 2 threads:
# the op alone (cache copies included) ties at 64 rows and wins 1.15x at 128, 1.5x at 256, 1.7x
# at 1000; the whole 30-layer prefill through the cache ties at 200 tokens (857 vs 874 ms) and
# gains 5% at 500 (2385 vs 2275 ms).
TILED_MIN_ROWS = 256
SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}

SOURCE = PRELUDE + MATH + f"#define MAX_HEAD_DIM {MAX_HEAD_DIM}\n" \
    f"#define PARALLEL_MIN_WORK {PARALLEL_MIN_WORK}\n#define STACK_KEYS 2048\n" + r"""
#include <stdlib.h>
static inline float ld(float x) { return x; }
static inline float ld(uint16_t x) { return bf16_load(x); }
static inline float ld(_Float16 x) { return (float)x; }
static inline void st(float* p, float x) { *p = x; }
static inline void st(uint16_t* p, float x) { *p = bf16_store(x); }
static inline void st(_Float16* p, float x) { *p = (_Float16)x; }

/* p[j] = q . k_j for j < n, several keys at a time (independent FMA chains): eight for fp32,
   four for 16-bit types (whose conversions need registers too; AVX2 has sixteen) */
template <typename T>
static inline void scores(const float* qf, const T* kb, int64_t stride, int64_t n, int64_t D, float* p) {
  int64_t j = 0;
  if constexpr (sizeof(T) == 4) {
    for (; j + 8 <= n; j += 8) {
      const T* k0 = kb + j * stride;
      float s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0, s5 = 0, s6 = 0, s7 = 0;
      #pragma omp simd reduction(+:s0, s1, s2, s3, s4, s5, s6, s7)
      for (int64_t d = 0; d < D; ++d) {
        const float x = qf[d];
        s0 += x * ld(k0[d]); s1 += x * ld(k0[stride + d]); s2 += x * ld(k0[2 * stride + d]);
        s3 += x * ld(k0[3 * stride + d]); s4 += x * ld(k0[4 * stride + d]);
        s5 += x * ld(k0[5 * stride + d]); s6 += x * ld(k0[6 * stride + d]);
        s7 += x * ld(k0[7 * stride + d]);
      }
      p[j] = s0; p[j + 1] = s1; p[j + 2] = s2; p[j + 3] = s3;
      p[j + 4] = s4; p[j + 5] = s5; p[j + 6] = s6; p[j + 7] = s7;
    }
  }
  for (; j + 4 <= n; j += 4) {
    const T* k0 = kb + j * stride;
    float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    #pragma omp simd reduction(+:s0, s1, s2, s3)
    for (int64_t d = 0; d < D; ++d) {
      const float x = qf[d];
      s0 += x * ld(k0[d]); s1 += x * ld(k0[stride + d]); s2 += x * ld(k0[2 * stride + d]);
      s3 += x * ld(k0[3 * stride + d]);
    }
    p[j] = s0; p[j + 1] = s1; p[j + 2] = s2; p[j + 3] = s3;
  }
  for (; j < n; ++j) {
    const T* kr = kb + j * stride;
    float s = 0.0f;
    #pragma omp simd reduction(+:s)
    for (int64_t d = 0; d < D; ++d) s += qf[d] * ld(kr[d]);
    p[j] = s;
  }
}

/* acc[0:W] = sum_j p[j] v_j[0:W], the W accumulators held in registers across the keys */
template <int W, typename T>
static inline void weighted_sum(const float* p, const T* vb, int64_t stride, int64_t n, float* acc) {
  float a[W];
  for (int w = 0; w < W; ++w) a[w] = 0.0f;
  for (int64_t j = 0; j < n; ++j) {
    const T* vr = vb + j * stride;
    const float x = p[j];
    #pragma omp simd
    for (int w = 0; w < W; ++w) a[w] += x * ld(vr[w]);
  }
  for (int w = 0; w < W; ++w) acc[w] = a[w];
}

/* One (batch, head, new position) row: softmax(q k^T * scale) v over cache slots 0..L+i. */
template <typename T>
static void attend_row(const int64_t* m, int64_t r, int64_t L, const T* q, const T* kc,
                       const T* vc, T* out, float scale) {
  const int64_t H = m[1], Hkv = m[2], NT = m[3], D = m[4], Dv = m[5];
  const int64_t *sq = m + 7, *skc = m + 16, *svc = m + 19, *so = m + 22;
  const int64_t i = r % NT, h = (r / NT) % H, b = r / (NT * H), hk = h / (H / Hkv), n = L + i + 1;
  const T* qr = q + b * sq[0] + h * sq[1] + i * sq[2];
  const T* kb = kc + b * skc[0] + hk * skc[1];
  const T* vb = vc + b * svc[0] + hk * svc[1];
  float qf[MAX_HEAD_DIM], acc[MAX_HEAD_DIM], small[STACK_KEYS];
  float* p = n <= STACK_KEYS ? small : (float*)malloc(n * sizeof(float));
  for (int64_t d = 0; d < D; ++d) qf[d] = ld(qr[d]) * scale;
  scores(qf, kb, skc[2], n, D, p);
  float top = -INFINITY, total = 0.0f;
  for (int64_t j = 0; j < n; ++j) top = p[j] > top ? p[j] : top;
  #pragma omp simd reduction(+:total)
  for (int64_t j = 0; j < n; ++j) { const float e = fxf_exp(p[j] - top); p[j] = e; total += e; }
  int64_t d = 0;
  constexpr int WIDE = sizeof(T) == 4 ? 64 : 32;  /* accumulators + conversions in 16 registers */
  for (; d + WIDE <= Dv; d += WIDE) weighted_sum<WIDE>(p, vb + d, svc[2], n, acc + d);
  for (; d + 16 <= Dv; d += 16) weighted_sum<16>(p, vb + d, svc[2], n, acc + d);
  for (; d < Dv; ++d) weighted_sum<1>(p, vb + d, svc[2], n, acc + d);
  if (p != small) free(p);
  T* o = out + b * so[0] + h * so[1] + i * so[2];
  const float inv = 1.0f / total;
  for (int64_t e = 0; e < Dv; ++e) st(o + e, acc[e] * inv);
}

/* meta: B, H, Hkv, T, D, Dv, Lmax, then the (batch, head, position) strides of q, k, v,
   k_cache, v_cache and out (last dims have stride 1), then W, S: a sliding window of W slots
   past S sinks (irgraph/window_ops.py; W = 0: the plain cache). Plain: position L + i goes to
   slot L + i and row i sees slots 0..L+i. Window (one new position, T = 1): position L goes to
   its slot (L below S, else the ring slot S + (L - S) % W), then the row sees every filled slot:
   min(L + 1, S + W) of them, all within its window (softmax does not care in which order).
   Returns 0, or -1 if L < 0, L + T > Lmax (plain) or T != 1 (window). */
template <typename T>
static int decode_attention(const int64_t* m, const T* q, const T* k, const T* v, T* kc, T* vc,
                            const int64_t* pos, T* out, float scale, int nthreads) {
  const int64_t B = m[0], H = m[1], Hkv = m[2], NT = m[3], D = m[4], Dv = m[5], Lmax = m[6];
  const int64_t *sk = m + 10, *sv = m + 13, *skc = m + 16, *svc = m + 19, W = m[25], S = m[26];
  const int64_t L = pos[0];
  if (L < 0 || (W == 0 && L + NT > Lmax) || (W > 0 && NT != 1)) return -1;
  const int64_t first = W == 0 || L < S ? L : S + (L - S) % W;   /* the first new slot */
  const int64_t seen = W == 0 ? L : (L + 1 < S + W ? L + 1 : S + W) - 1;   /* rows see seen+i+1 */
  for (int64_t b = 0; b < B; ++b)            /* the new positions first: every row reads them */
    for (int64_t h = 0; h < Hkv; ++h)
      for (int64_t i = 0; i < NT; ++i) {
        memcpy(kc + b * skc[0] + h * skc[1] + (first + i) * skc[2],
               k + b * sk[0] + h * sk[1] + i * sk[2], D * sizeof(T));
        memcpy(vc + b * svc[0] + h * svc[1] + (first + i) * svc[2],
               v + b * sv[0] + h * sv[1] + i * sv[2], Dv * sizeof(T));
      }
  const int64_t rows = B * H * NT;
  if (nthreads > 1 && rows > 1 && rows * (seen + NT) * (D + Dv) >= PARALLEL_MIN_WORK) {
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t r = 0; r < rows; ++r) attend_row(m, r, seen, q, kc, vc, out, scale);
  } else {
    for (int64_t r = 0; r < rows; ++r) attend_row(m, r, seen, q, kc, vc, out, scale);
  }
  return 0;
}

#define ENTRY(NAME, T) extern "C" int NAME(const int64_t* m, const T* q, const T* k, const T* v, \
    T* kc, T* vc, const int64_t* pos, T* out, float scale, int nthreads) { \
  return decode_attention<T>(m, q, k, v, kc, vc, pos, out, scale, nthreads); }
ENTRY(fxf_decode_attention_f32, float)
ENTRY(fxf_decode_attention_bf16, uint16_t)
ENTRY(fxf_decode_attention_f16, _Float16)
"""


@functools.lru_cache(maxsize=None)
def _entry(dtype: torch.dtype) -> Callable:
    """The compiled entry point for ``dtype`` (built once into the kernel cache, ~2 s)."""
    fn = load_function(SOURCE, f"fxf_decode_attention_{SUFFIX[dtype]}", "decode_attention")
    fn.restype = ctypes.c_int
    fn.argtypes = (ctypes.c_void_p,) * 8 + (ctypes.c_float, ctypes.c_int)
    return fn


def kernel_declines(q, k, v, k_cache, v_cache, cache_pos) -> Optional[str]:
    """Why the C++ kernel cannot run these inputs (after the op's own checks), or None."""
    tensors = (q, k, v, k_cache, v_cache)
    if q.dtype not in SUFFIX or any(t.dtype != q.dtype for t in tensors):
        return f"q, k, v and the caches in one of fp32/bf16/fp16, got {[t.dtype for t in tensors]}"
    if not all(t.is_cpu for t in (*tensors, cache_pos)) or cache_pos.dtype != torch.int64:
        return "needs CPU tensors and an int64 cache_pos"
    if any(t.stride(-1) != 1 and t.shape[-1] > 1 for t in tensors):
        return "needs a unit stride in the head dim"
    if q.shape[-1] != k.shape[-1] or k.shape[-1] > MAX_HEAD_DIM or v.shape[-1] > MAX_HEAD_DIM:
        return f"needs q and k of one head dim and head dims of at most {MAX_HEAD_DIM}"
    return None


def _check_shapes(q, k, v, k_cache, v_cache, cache_pos) -> None:
    """The op's shape contract (``fxforge::cached_attention``) plus what the copies need."""
    _check_cached(q, k, v, k_cache, v_cache, cache_pos)
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


def sdpa_cached_attention(q, k, v, k_cache, v_cache, cache_pos, scale=None) -> torch.Tensor:
    """The op on ATen: slice copies into the caches, then SDPA on the cache views (no mask at
    t == 1: the one query sees every cached key; a causal triangle when the cache was empty; an
    offset causal mask otherwise)."""
    length, end = _cache_span(k, k_cache, cache_pos)
    new = k.shape[2]
    k_cache[:, :, length:end].copy_(k)
    v_cache[:, :, length:end].copy_(v)
    keys, values = k_cache[:, :, :end], v_cache[:, :, :end]
    if keys.dtype != q.dtype or values.dtype != q.dtype:
        keys, values = keys.to(q.dtype), values.to(q.dtype)
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
                 sinks: int = 0) -> torch.Tensor:
        """``window`` > 0: ``fxforge::cached_window_attention`` of one new position (its
        caller, kernels/window_attention_cpu.py, takes longer spans)."""
        key = (q.shape, q.stride(), q.dtype, q.is_cpu, k.shape, k.stride(), k.dtype, k.is_cpu,
               v.shape, v.stride(), v.dtype, v.is_cpu, k_cache.shape, k_cache.stride(),
               k_cache.dtype, k_cache.is_cpu, v_cache.shape, v_cache.stride(), v_cache.dtype,
               v_cache.is_cpu, cache_pos.dtype, cache_pos.is_cpu, scale, window, sinks)
        plan = self.plans.get(key)
        if plan is None:
            plan = self._plan(key, q, k, v, k_cache, v_cache, cache_pos, scale, window, sinks)
        fn, meta_address, scale_value, out_shape, _ = plan
        if fn is None and window:
            from fxforge.irgraph.window_ops import cached_window_attention
            return cached_window_attention(q, k, v, k_cache, v_cache, cache_pos, window, sinks, scale)
        if fn is None:
            return sdpa_cached_attention(q, k, v, k_cache, v_cache, cache_pos, scale)
        if not window and _prefill_sized(q):
            out = _tiled_prefill(q, k, v, k_cache, v_cache, cache_pos, scale)
            if out is not None:
                return out
        out = torch.empty_like(q) if out_shape is None else torch.empty(out_shape, dtype=q.dtype)
        status = launch(fn, (meta_address, q.data_ptr(), k.data_ptr(), v.data_ptr(),
                             k_cache.data_ptr(), v_cache.data_ptr(), cache_pos.data_ptr(),
                             out.data_ptr(), scale_value, torch.get_num_threads()), plan)
        if status != 0 and window:   # its plan took one new position: the length was < 0
            raise ValueError(f"cached_window_attention: negative cache length "
                             f"{int(cache_pos.reshape(-1)[0])}")
        if status != 0:
            raise cache_overflow(int(cache_pos.reshape(-1)[0]), k.shape[2], k_cache.shape[2])
        return out

    def _plan(self, key, q, k, v, k_cache, v_cache, cache_pos, scale, window, sinks) -> tuple:
        _check_shapes(q, k, v, k_cache, v_cache, cache_pos)
        reason = kernel_declines(q, k, v, k_cache, v_cache, cache_pos)
        if reason is None and window and (q.shape[2] != 1 or k_cache.shape[2] != window + sinks):
            reason = "a sliding window takes one new position over window + sinks slots"
        fn = None
        if reason is None:
            try:
                fn = _entry(q.dtype)
            except Exception as exc:  # no compiler, a failed build: ATen computes the same
                log.warning("cached_attention: C++ decode kernel unavailable, using SDPA: %s", exc)
        if fn is None:
            plan = (None, 0, 0.0, None, None)
        else:
            plan = self._kernel_plan(fn, q, k, v, k_cache, v_cache, scale, window, sinks)
        return self.plans.add(key, plan)

    @staticmethod
    def _kernel_plan(fn, q, k, v, k_cache, v_cache, scale, window=0, sinks=0) -> tuple:
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
        meta = (ctypes.c_int64 * 27)(
            batch, heads, k.shape[1], new, head_dim, value_dim, k_cache.shape[2],
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *k_cache.stride()[:3],
            *v_cache.stride()[:3], *out_strides, window, sinks)
        scale_value = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
        return fn, ctypes.addressof(meta), scale_value, out_shape, meta  # meta: kept alive


def _prefill_sized(q: torch.Tensor) -> bool:
    """Enough new fp32 positions for the tiled prefill kernel to be worth trying."""
    return q.shape[2] >= TILED_MIN_ROWS and q.dtype == torch.float32


def _tiled_prefill(q, k, v, k_cache, v_cache, cache_pos, scale) -> Optional[torch.Tensor]:
    """Many new positions at once: write them into the caches, then the tiled prefill kernel
    over the cache views with the causal diagonal shifted by the cache length; None (nothing
    written) where that kernel declines (not fp32, more keys than it takes, ...). Reads the
    length into Python: a decode-step replay never records this path (it is for prompts)."""
    length, end = _cache_span(k, k_cache, cache_pos)
    keys, values = k_cache[:, :, :end], v_cache[:, :, :end]
    if tiled_declines(q, keys, values) is not None:
        return None
    keys[:, :, length:].copy_(k)
    values[:, :, length:].copy_(v)
    return tiled_attention(q, keys, values, None, True, scale, causal_offset=length)


_KERNEL = CpuDecodeAttention()


def cpu_cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                         v_cache: torch.Tensor, cache_pos: torch.Tensor,
                         scale: Optional[float] = None) -> torch.Tensor:
    """``fxforge::cached_attention`` on the CPU: writes k/v into the caches at ``cache_pos``
    and returns the new positions' attention over the cache (the module docstring has how)."""
    return _KERNEL(q, k, v, k_cache, v_cache, cache_pos, scale)


def cpu_decode_path(q, k, v, k_cache, v_cache, cache_pos) -> str:
    """Which path :func:`cpu_cached_attention` takes for inputs like these, for reports."""
    reason = kernel_declines(q, k, v, k_cache, v_cache, cache_pos)
    if reason is not None:
        return f"SDPA on the cache views ({reason})"
    if _prefill_sized(q):
        return "tiled C++ prefill attention over the cache"
    return "C++ decode kernel"
