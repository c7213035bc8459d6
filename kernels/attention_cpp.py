"""Prefill attention on the CPU for short sequences: a register-tiled C++ kernel (fp32).

PyTorch's CPU flash kernel is built for long sequences: it splits queries and keys into blocks of
hundreds and runs each block product as a library GEMM call. At the lengths a prefill of a small
model has (tens to a few hundred tokens, head dims 32-128) those calls are tiny, and it runs at
15-25 GFLOP/s on the 2-core Zen 1 dev box where a GEMM reaches ~65. This kernel does the whole
op in one call:

1. every k/v head's keys are packed once, transposed (``kt[d][j]``), so score tiles read keys
   contiguously, and its values into contiguous rows (a strided view of a fused projection puts
   every row on another page);
2. a task is (batch, head, block of up to ``TASK_ROWS`` query rows); for each micro-tile of
   ``QB`` query rows (pre-scaled by ``scale``) the scores of ``KW`` keys at a time accumulate in
   QB x KW registers over the head dim, for the keys the tile can see;
3. per row: the mask is added, the visible keys (``j <= i`` when causal, top-left aligned as in
   SDPA) get an exact fp32 softmax (the exp of a shifted score below 2^-125 is 0); a row with
   nothing visible gives 0, as SDPA does on the CPU, and a NaN score a NaN row;
4. the weighted sum of values accumulates in QB x 16 registers per 16 value columns.

Both loops are spread over the threads (tasks dynamically: causal blocks differ in work). It
applies to fp32 q/k/v of 4 dims with a unit stride in the head dim, head dims of at most
``MAX_HEAD_DIM``, grouped-query attention (k/v heads dividing q heads), no mask or an fp32/bool
mask broadcastable to [B, H, L, S], and up to ``MAX_KEYS`` keys. :func:`kernel_declines` says
why it does not apply otherwise. ``bench/attention_cpu.py`` measures it against PyTorch's
kernels.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import math
from typing import Callable, Optional

import torch

from fxforge.kernels.attention_tiles_cpp import TILES
from fxforge.kernels.fused_cpp_math import MATH, PRELUDE
from fxforge.kernels.plan_cache import PlanCache
from fxforge.kernels.replay import launch
from fxforge.kernels.toolchain import load_function

log = logging.getLogger("fxforge.kernels")

MAX_HEAD_DIM = 256
# Measured against PyTorch's CPU flash kernel (bench/attention_cpu.py, 2-core Zen 1): causal,
# 1.6-1.9x as fast up to 512 keys and 1.25x at 1024; the working set grows with the keys (the
# packed K/V of every head, a score row per query), so longer sequences stay on PyTorch's kernel.
MAX_KEYS = 1024
MAX_PACKED_BYTES = 64 << 20   # the per-call copy of K^T and V (every batch and k/v head)
PARALLEL_MIN_WORK = 1 << 17   # query rows x visible keys x (D + Dv) below which one thread wins
MAX_PLANS = 64

SOURCE = "#include <omp.h>\n#include <stdlib.h>\n" + PRELUDE + MATH + \
    f"#define MAX_HEAD_DIM {MAX_HEAD_DIM}\n#define PARALLEL_MIN_WORK {PARALLEL_MIN_WORK}\n" + r"""
/* QB: query rows per register tile. A QB x KW score tile takes 2*QB accumulators: 8 of
   AVX2's 16 registers at 4 rows, 16 of AVX-512's 32 at 8, where 8 rows ran SmolLM2's layer
   (9 heads, 128 rows, head dim 64) in 0.70-0.75x the time of 4 (2-core Zen 4); 12 ran slower. */
#if defined(__AVX512VL__)
#define QB 8
#else
#define QB 4
#endif
#define TASK_ROWS 32   /* query rows per task (the unit of work the threads share) */
""" + TILES + r"""
/* A row's keys up to the last its mask does not hide: an explicit causal or padding mask (an
   ONNX export's, a BERT's) then costs what is_causal or shorter keys would. Hidden: -inf or at
   most MASK_HIDDEN (a finfo.min mask): with any key not hidden, such a key's exp(score + mask -
   max) is 0 for finite scores, so leaving it out changes nothing. A row hidden throughout keeps
   its keys (a finfo.min row's softmax is uniform; an all -inf row's output is 0 either way). */
#define MASK_HIDDEN -1e30f
static inline int64_t visible_keys(int64_t keys, const float* mask_row) {
  if (!mask_row) return keys;
  int64_t last = keys;
  while (last > 0 && mask_row[last - 1] <= MASK_HIDDEN) --last;
  return last > 0 ? last : keys;
}

/* meta: B, H, Hkv, L, S, D, Dv, causal, has_mask, then (batch, head, row) strides of q [9],
   k [12], v [15], out [18] and the mask [21] (every last dim has stride 1). */
template <int R>
static void micro_tile(const int64_t* m, int64_t b, int64_t h, int64_t i0, int64_t nk,
                       int64_t np, const float* q, const float* vb, const float* mask, float* out,
                       float scale, const float* kt, float* qs, float* p, int64_t off) {
  const int64_t D = m[5], Dv = m[6], causal = m[7];
  const int64_t *sq = m + 9, *so = m + 18, *sm = m + 21;
  for (int r = 0; r < R; ++r) {
    const float* qr = q + b * sq[0] + h * sq[1] + (i0 + r) * sq[2];
    for (int64_t d = 0; d < D; ++d) qs[r * D + d] = qr[d] * scale;
  }
  int64_t visible[R], tile_keys = 0;
  const float* mrow[R];
  for (int r = 0; r < R; ++r) {
    const int64_t i = i0 + r;
    mrow[r] = mask ? mask + b * sm[0] + h * sm[1] + i * sm[2] : nullptr;
    visible[r] = visible_keys(causal ? (i + 1 + off < nk ? i + 1 + off : nk) : nk, mrow[r]);
    tile_keys = visible[r] > tile_keys ? visible[r] : tile_keys;
  }
  const int64_t tp = round_up(tile_keys, KW);
  score_tile<R>(qs, D, kt, np, tp, p, np);   /* columns past a row's visible keys are zeroed below */
  float inv[R];
  float* o[R];
  for (int r = 0; r < R; ++r) {
    inv[r] = softmax_row(p + r * np, visible[r], tp, mrow[r]);
    o[r] = out + b * so[0] + h * so[1] + (i0 + r) * so[2];
  }
  float* cols[R];
  int64_t c = 0;
  for (; c + VW <= Dv; c += VW) {
    for (int r = 0; r < R; ++r) cols[r] = o[r] + c;
    value_tile<R, VW>(p, np, vb + c, Dv, tile_keys, inv, cols);
  }
  for (; c < Dv; ++c) {
    for (int r = 0; r < R; ++r) cols[r] = o[r] + c;
    value_tile<R, 1>(p, np, vb + c, Dv, tile_keys, inv, cols);
  }
}

/* One task: a block of up to TASK_ROWS query rows of one (batch, head), against the keys packed
   for its k/v head (kt: rows of np floats). */
static void run_task(const int64_t* m, int64_t task, const float* q, const float* kt_all,
                     const float* vp_all, const float* mask, float* out, float scale,
                     float* scratch, int64_t off) {
  const int64_t H = m[1], Hkv = m[2], L = m[3], S = m[4], D = m[5], Dv = m[6], causal = m[7];
  const int64_t blocks = (L + TASK_ROWS - 1) / TASK_ROWS, np = round_up(S, KW);
  const int64_t blk = task % blocks, h = (task / blocks) % H, b = task / (blocks * H);
  const int64_t hk = h / (H / Hkv), i0 = blk * TASK_ROWS;
  const int64_t i1 = i0 + TASK_ROWS < L ? i0 + TASK_ROWS : L;
  const int64_t nk = causal ? (i1 + off < S ? i1 + off : S) : S;   /* keys the block sees */
  if (nk <= 0) {                                             /* no keys at all */
    const int64_t* so = m + 18;
    for (int64_t i = i0; i < i1; ++i)
      for (int64_t c = 0; c < Dv; ++c) out[b * so[0] + h * so[1] + i * so[2] + c] = 0.0f;
    return;
  }
  const float* kt = kt_all + (b * Hkv + hk) * D * np;
  const float* vb = vp_all + (b * Hkv + hk) * S * Dv;
  float* qs = scratch;
  float* p = qs + QB * MAX_HEAD_DIM;
  int64_t i = i0;
  for (; i + QB <= i1; i += QB)
    micro_tile<QB>(m, b, h, i, nk, np, q, vb, mask, out, scale, kt, qs, p, off);
#if QB > 4
  for (; i + 4 <= i1; i += 4)
    micro_tile<4>(m, b, h, i, nk, np, q, vb, mask, out, scale, kt, qs, p, off);
#endif
  for (; i < i1; ++i)
    micro_tile<1>(m, b, h, i, nk, np, q, vb, mask, out, scale, kt, qs, p, off);
}

/* Every k/v head's keys are packed (transposed) once, then the tasks run; both loops are spread
   over the threads when the work pays for a parallel region. Causal: row i sees keys
   j <= i + off (off = 0: SDPA's top-left alignment; a KV cache's prefill passes its length). */
extern "C" int fxf_prefill_attention_f32(const int64_t* m, const float* q, const float* k,
                                         const float* v, const float* mask, float* out,
                                         float scale, int nthreads, int64_t off) {
  const int64_t B = m[0], H = m[1], Hkv = m[2], L = m[3], S = m[4], D = m[5], Dv = m[6];
  const int64_t *sk = m + 12, *sv = m + 15;
  const int64_t np = round_up(S, KW), heads = B * Hkv;
  const int64_t tasks = B * H * ((L + TASK_ROWS - 1) / TASK_ROWS);
  const int parallel = nthreads > 1 && tasks > 1 && B * H * L * S * (D + Dv) >= PARALLEL_MIN_WORK;
  float* kt_all = (float*)malloc((heads * (D * np + S * Dv) + 1) * sizeof(float));
  if (!kt_all) return -1;
  float* vp_all = kt_all + heads * D * np;
  int failed = 0;
  #pragma omp parallel num_threads(nthreads) if (parallel)
  {
    #pragma omp for schedule(static)
    for (int64_t bh = 0; bh < heads; ++bh) {
      pack_keys(k + (bh / Hkv) * sk[0] + (bh % Hkv) * sk[1], sk[2], S, np, D, kt_all + bh * D * np);
      pack_values(v + (bh / Hkv) * sv[0] + (bh % Hkv) * sv[1], sv[2], S, Dv, vp_all + bh * S * Dv);
    }
    float* scratch = (float*)malloc((QB * MAX_HEAD_DIM + QB * np) * sizeof(float));
    if (!scratch) {
      #pragma omp atomic write
      failed = 1;
    }
    #pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tasks; ++t)
      if (scratch) run_task(m, t, q, kt_all, vp_all, mask, out, scale, scratch, off);
    free(scratch);
  }
  free(kt_all);
  return failed ? -1 : 0;
}
"""


@functools.lru_cache(maxsize=1)
def _entry() -> Callable:
    """The compiled kernel (built once into the kernel cache, ~2 s)."""
    fn = load_function(SOURCE, "fxf_prefill_attention_f32", "prefill_attention")
    fn.restype = ctypes.c_int
    fn.argtypes = (ctypes.c_void_p,) * 6 + (ctypes.c_float, ctypes.c_int, ctypes.c_int64)
    return fn


@functools.lru_cache(maxsize=1)
def kernel_unavailable() -> Optional[str]:
    """Why the kernel cannot be built or loaded here (no compiler, a failed build), or None."""
    try:
        _entry()
    except Exception as exc:  # noqa: BLE001 - any build failure means: use PyTorch's kernel
        log.warning("attention: C++ prefill kernel unavailable, using PyTorch's: %s", exc)
        return f"C++ attention kernel unavailable ({type(exc).__name__})"
    return None


def kernel_declines(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    attn_mask: Optional[torch.Tensor] = None) -> Optional[str]:
    """Why the tiled kernel does not take these inputs, or None when it does."""
    tensors = (q, k, v) if attn_mask is None else (q, k, v, attn_mask)
    if any(t.dtype != torch.float32 for t in (q, k, v)) or \
            (attn_mask is not None and attn_mask.dtype not in (torch.float32, torch.bool)):
        return "tiled C++ attention is fp32 only (with an fp32 or bool mask)"
    if not (q.dim() == k.dim() == v.dim() == 4):
        return "tiled C++ attention needs 4-D q/k/v"
    if any(t.device.type != "cpu" for t in tensors):
        return "tiled C++ attention needs CPU tensors"
    if any(t.stride(-1) != 1 and t.size(-1) > 1 for t in (q, k, v)):
        return "tiled C++ attention needs a unit stride in the head dim"
    if q.size(-1) != k.size(-1) or k.size(-1) > MAX_HEAD_DIM or v.size(-1) > MAX_HEAD_DIM:
        return f"tiled C++ attention needs q/k of one head dim and head dims <= {MAX_HEAD_DIM}"
    if k.size(-2) > MAX_KEYS:
        return f"{k.size(-2)} keys: beyond {MAX_KEYS}, PyTorch's flash kernel is as fast"
    packed = 4 * k.size(0) * k.size(1) * (k.size(-2) + 16) * (k.size(-1) + v.size(-1))
    if packed > MAX_PACKED_BYTES:
        return (f"its packed K/V copy would take {packed >> 20} MiB (> {MAX_PACKED_BYTES >> 20}): "
                "PyTorch's kernel works in place")
    if attn_mask is not None and attn_mask.dim() > 4:
        return "tiled C++ attention takes a mask of at most 4 dims"
    return kernel_unavailable()


def layout_key(q, k, v, attn_mask, is_causal) -> tuple:
    """What a path decision or a kernel plan depends on: shapes, strides, dtypes and devices of
    the inputs (the mask's too), and causality. Callers cache per key, so a model pays each
    check once per input layout."""
    tensors = (q, k, v) if attn_mask is None else (q, k, v, attn_mask)
    return tuple((t.shape, t.stride(), t.dtype, t.device) for t in tensors) + (is_causal,)


class TiledAttention:
    """The kernel's metadata per input layout (:func:`layout_key` and the scale): a prefill
    loop pays for building it once."""

    def __init__(self) -> None:
        self.plans = PlanCache(MAX_PLANS)   # shared by every thread (kernels/plan_cache.py)

    def __call__(self, q, k, v, attn_mask, is_causal, scale, key: Optional[tuple] = None,
                 causal_offset: int = 0):
        mask = _mask_4d(attn_mask, q, k) if attn_mask is not None else None
        key = (key or layout_key(q, k, v, attn_mask, is_causal), scale)
        plan = self.plans.get(key)
        if plan is None:
            plan = self.plans.add(key, self._plan(q, k, v, mask, is_causal, scale))
        meta_address, scale_value, _ = plan
        batch, heads, rows, _ = q.shape
        out = torch.empty(batch, rows, heads, v.size(-1)).transpose(1, 2)  # free reshape after
        status = launch(_entry(), (meta_address, q.data_ptr(), k.data_ptr(), v.data_ptr(),
                                   0 if mask is None else mask.data_ptr(), out.data_ptr(),
                                   scale_value, torch.get_num_threads(), causal_offset), (plan, mask))
        if status != 0:
            raise MemoryError("tiled C++ attention: out of memory for its scratch buffers")
        return out

    @staticmethod
    def _plan(q, k, v, mask, is_causal, scale) -> tuple:
        batch, heads, rows, head_dim = q.shape
        kv_heads, keys = k.size(1), k.size(2)
        if heads % kv_heads or v.size(1) != kv_heads or v.size(2) != keys or k.size(0) != batch:
            raise ValueError(f"attention: q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)} "
                             "disagree on batch, heads or keys")
        out_strides = (rows * heads * v.size(-1), v.size(-1), heads * v.size(-1))
        mask_strides = mask.stride()[:3] if mask is not None else (0, 0, 0)
        meta = (ctypes.c_int64 * 24)(
            batch, heads, kv_heads, rows, keys, head_dim, v.size(-1), int(bool(is_causal)),
            int(mask is not None), *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
            *out_strides, *mask_strides)
        scale_value = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
        return ctypes.addressof(meta), scale_value, meta   # meta: kept alive with the plan


def additive_mask(attn_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask (True: attend) as 0/-inf in ``dtype``, a float mask in ``dtype``."""
    if attn_mask.dtype == torch.bool:
        zeros = torch.zeros((), dtype=dtype)
        return zeros.masked_fill(~attn_mask, float("-inf"))  # broadcasts to the mask's shape
    return attn_mask if attn_mask.dtype == dtype else attn_mask.to(dtype)


def _mask_4d(attn_mask: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """An fp32 additive mask broadcast to [B, H, L, S]: a view where broadcast dims get stride 0,
    except the key dim, which the kernel reads with a unit stride (materialized if need be)."""
    attn_mask = additive_mask(attn_mask, q.dtype)
    keys = k.size(2)
    if attn_mask.dim() == 0:
        attn_mask = attn_mask.reshape(1)
    if attn_mask.stride(-1) != 1 or attn_mask.size(-1) != keys:
        attn_mask = attn_mask.expand(*attn_mask.shape[:-1], keys).contiguous()
    return attn_mask.expand(q.size(0), q.size(1), q.size(2), keys)


_KERNEL = TiledAttention()


def tiled_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
                    scale: Optional[float] = None, key: Optional[tuple] = None,
                    causal_offset: int = 0) -> torch.Tensor:
    """SDPA (no dropout) with the tiled kernel; the caller checked :func:`kernel_declines`.
    ``attn_mask`` is additive fp32 or bool (True: attend), broadcastable to [B, H, L, S];
    ``key``: the inputs' :func:`layout_key`, when the caller has it already. Causal: query i
    sees keys ``j <= i + causal_offset`` (0: SDPA's top-left alignment; a KV cache's prefill
    over ``length`` cached keys passes ``length``)."""
    if causal_offset < 0:
        raise ValueError(f"tiled attention: causal_offset {causal_offset} < 0")
    return _KERNEL(q, k, v, attn_mask, is_causal, scale, key, causal_offset)
