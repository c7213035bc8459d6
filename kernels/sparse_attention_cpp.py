"""Block-sparse causal attention on the CPU (fp32): one C++ kernel for every sparse prefill mode
(sliding window with sinks, fixed block-sparse patterns, per-head patterns).

Queries and keys go in blocks of ``block`` positions. A *pattern* says which key blocks a query
block ``qb`` reads, as five integers ``(local, global, stride, window, sinks)``:

* block level: the ``local`` blocks ending at the diagonal (``qb - local < kb <= qb``; 0 means
  every block up to the diagonal: dense), the first ``global`` blocks, and every block
  ``stride`` blocks back from the diagonal (``(qb - kb) % stride == 0``; 0: none);
* element level, inside the blocks read: causal (``j <= i``), and when ``window > 0`` only the
  first ``sinks`` keys and the last ``window`` (``j < sinks or i - j < window``).

One pattern serves every head, or one per query head (per-head modes). Blocks a pattern leaves
out are never read: the work per query is the blocks its pattern names, not its whole prefix.

The kernel packs every k/v head's keys transposed and its values in rows once (as the tiled
kernel of ``attention_cpp.py`` does, with the same register tiles: ``attention_tiles_cpp.py``),
then runs one task per (batch, head, query block), dynamically over the threads: a task gathers
the scores of its blocks into one compact row per query, masks them by the element rule, takes
an exact fp32 softmax and accumulates the weighted values block by block.
"""
from __future__ import annotations

import ctypes
import functools
import math
from typing import Callable, Optional, Sequence

import torch

from fxforge.irgraph.sparse_ops import BLOCK_SIZES
from fxforge.kernels.attention_tiles_cpp import TILES
from fxforge.kernels.fused_cpp_math import MATH, PRELUDE
from fxforge.kernels.plan_cache import PlanCache
from fxforge.kernels.replay import launch
from fxforge.kernels.toolchain import build_failure, load_function

MAX_HEAD_DIM = 256
MAX_PACKED_BYTES = 256 << 20   # the per-call copy of K^T and V (every batch and k/v head)
MAX_PLANS = 64

SOURCE = "#include <omp.h>\n#include <stdlib.h>\n" + PRELUDE + MATH + \
    f"#define MAX_HEAD_DIM {MAX_HEAD_DIM}\n" + r"""
#define QB 8           /* query rows per register tile */
""" + TILES + r"""
/* The key blocks query block qb of a pattern reads, in increasing order; returns their count. */
static int64_t key_blocks(const int64_t* pat, int64_t qb, int64_t* kb) {
  const int64_t local = pat[0], global = pat[1], stride = pat[2];
  const int64_t near = local > 0 && qb - local + 1 > 0 ? qb - local + 1 : 0;
  int64_t n = 0;
  for (int64_t b = 0; b <= qb; ++b)
    if (b >= near || b < global || (stride > 0 && (qb - b) % stride == 0)) kb[n++] = b;
  return n;
}

/* Scores of row i outside the element rule become -inf: past the diagonal, past the keys, or
   (window > 0) neither a sink nor among the last `window` keys. */
static void mask_row(float* p, const int64_t* kb, int64_t nb, int64_t block, int64_t i,
                     int64_t L, int64_t window, int64_t sinks) {
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t start = kb[b] * block;
    float* row = p + b * block;
    for (int64_t jj = 0; jj < block; ++jj) {
      const int64_t j = start + jj;
      const bool seen = j <= i && j < L && (window <= 0 || j < sinks || i - j < window);
      if (!seen) row[jj] = -INFINITY;
    }
  }
}

/* o_r[0:W] = inv_r * sum over the blocks' keys of p[r][col] v_j[0:W] */
template <int R, int W>
static inline void value_blocks(const float* p, int64_t np, const float* vp, int64_t Dv,
                                const int64_t* kb, int64_t nb, int64_t block, int64_t L,
                                const float* inv, float* const* o) {
  float acc[R][W];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < W; ++c) acc[r][c] = 0.0f;
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t start = kb[b] * block;
    const int64_t width = start + block <= L ? block : L - start;
    for (int64_t jj = 0; jj < width; ++jj) {
      const float* vr = vp + (start + jj) * Dv;
      for (int r = 0; r < R; ++r) {
        const float x = p[r * np + b * block + jj];
        #pragma omp simd
        for (int c = 0; c < W; ++c) acc[r][c] += x * vr[c];
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < W; ++c) o[r][c] = acc[r][c] * inv[r];
}

/* meta: B, H, Hkv, L, D, Dv, block, patterns (1 or H), then (batch, head, row) strides of
   q [8], k [11], v [14], out [17]. */
template <int R>
static void rows(const int64_t* m, const int64_t* pat, int64_t b, int64_t h, int64_t i0,
                 const int64_t* kb, int64_t nb, const float* q, const float* kt, int64_t kstride,
                 const float* vp, float* out, float scale, float* qs, float* p) {
  const int64_t L = m[3], D = m[4], Dv = m[5], block = m[6];
  const int64_t *sq = m + 8, *so = m + 17;
  const int64_t np = nb * block;
  for (int r = 0; r < R; ++r) {
    const float* qr = q + b * sq[0] + h * sq[1] + (i0 + r) * sq[2];
    for (int64_t d = 0; d < D; ++d) qs[r * D + d] = qr[d] * scale;
  }
  for (int64_t x = 0; x < nb; ++x)
    score_tile<R>(qs, D, kt + kb[x] * block, kstride, block, p + x * block, np);
  float inv[R];
  float* o[R];
  for (int r = 0; r < R; ++r) {
    mask_row(p + r * np, kb, nb, block, i0 + r, L, pat[3], pat[4]);
    inv[r] = softmax_row(p + r * np, np, np, nullptr);
    o[r] = out + b * so[0] + h * so[1] + (i0 + r) * so[2];
  }
  float* cols[R];
  int64_t c = 0;
  for (; c + VW <= Dv; c += VW) {
    for (int r = 0; r < R; ++r) cols[r] = o[r] + c;
    value_blocks<R, VW>(p, np, vp + c, Dv, kb, nb, block, L, inv, cols);
  }
  for (; c < Dv; ++c) {
    for (int r = 0; r < R; ++r) cols[r] = o[r] + c;
    value_blocks<R, 1>(p, np, vp + c, Dv, kb, nb, block, L, inv, cols);
  }
}

extern "C" int fxf_sparse_attention_f32(const int64_t* m, const int64_t* patterns, const float* q,
                                        const float* k, const float* v, float* out, float scale,
                                        int nthreads) {
  const int64_t B = m[0], H = m[1], Hkv = m[2], L = m[3], D = m[4], Dv = m[5], block = m[6];
  const int64_t P = m[7];
  const int64_t *sk = m + 11, *sv = m + 14;
  const int64_t blocks = (L + block - 1) / block, np = blocks * block, heads = B * Hkv;
  const int64_t tasks = B * H * blocks;
  float* kt_all = (float*)malloc((heads * (D * np + L * Dv) + 1) * sizeof(float));
  if (!kt_all) return -1;
  float* vp_all = kt_all + heads * D * np;
  int failed = 0;
  #pragma omp parallel num_threads(nthreads) if (nthreads > 1 && tasks > 1)
  {
    #pragma omp for schedule(static)
    for (int64_t bh = 0; bh < heads; ++bh) {
      pack_keys(k + (bh / Hkv) * sk[0] + (bh % Hkv) * sk[1], sk[2], L, np, D, kt_all + bh * D * np);
      pack_values(v + (bh / Hkv) * sv[0] + (bh % Hkv) * sv[1], sv[2], L, Dv, vp_all + bh * L * Dv);
    }
    float* scratch = (float*)malloc((QB * MAX_HEAD_DIM + QB * np + blocks) * sizeof(float)
                                    + blocks * sizeof(int64_t));
    if (!scratch) {
      #pragma omp atomic write
      failed = 1;
    }
    #pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tasks; ++t) {
      if (!scratch) continue;
      /* the last query blocks first: the causal ones read the most keys */
      const int64_t qb = blocks - 1 - t % blocks, h = (t / blocks) % H, b = t / (blocks * H);
      const int64_t hk = h / (H / Hkv);
      const int64_t* pat = patterns + (P == 1 ? 0 : h) * 5;
      int64_t* kb = (int64_t*)(scratch + QB * MAX_HEAD_DIM + QB * np + blocks);
      const int64_t nb = key_blocks(pat, qb, kb);
      const float* kt = kt_all + (b * Hkv + hk) * D * np;
      const float* vp = vp_all + (b * Hkv + hk) * L * Dv;
      float* qs = scratch;
      float* p = qs + QB * MAX_HEAD_DIM;
      const int64_t i1 = (qb + 1) * block < L ? (qb + 1) * block : L;
      int64_t i = qb * block;
      for (; i + QB <= i1; i += QB)
        rows<QB>(m, pat, b, h, i, kb, nb, q, kt, np, vp, out, scale, qs, p);
      for (; i < i1; ++i)
        rows<1>(m, pat, b, h, i, kb, nb, q, kt, np, vp, out, scale, qs, p);
    }
    free(scratch);
  }
  free(kt_all);
  return failed ? -1 : 0;
}
"""


@functools.lru_cache(maxsize=1)
def _entry() -> Callable:
    fn = load_function(SOURCE, "fxf_sparse_attention_f32", "sparse_attention")
    fn.restype = ctypes.c_int
    fn.argtypes = (ctypes.c_void_p,) * 6 + (ctypes.c_float, ctypes.c_int)
    return fn


@functools.lru_cache(maxsize=1)
def kernel_unavailable() -> Optional[str]:
    return build_failure(_entry, "C++ block-sparse attention kernel")


def kernel_declines(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int) -> Optional[str]:
    """Why the kernel does not take these inputs (the caller then runs the reference), or None."""
    if any(t.dtype != torch.float32 for t in (q, k, v)):
        return "block-sparse C++ attention is fp32 only"
    if not (q.dim() == k.dim() == v.dim() == 4) or any(t.device.type != "cpu" for t in (q, k, v)):
        return "block-sparse C++ attention needs 4-D CPU q/k/v"
    if any(t.stride(-1) != 1 and t.size(-1) > 1 for t in (q, k, v)):
        return "block-sparse C++ attention needs a unit stride in the head dim"
    if q.size(-1) != k.size(-1) or k.size(-1) > MAX_HEAD_DIM or v.size(-1) > MAX_HEAD_DIM:
        return f"block-sparse C++ attention needs q/k of one head dim, head dims <= {MAX_HEAD_DIM}"
    if block not in BLOCK_SIZES:
        return f"block size {block} is not one of {BLOCK_SIZES}"
    padded = -(-k.size(2) // block) * block
    packed = 4 * k.size(0) * k.size(1) * (padded * k.size(-1) + k.size(2) * v.size(-1))
    if packed > MAX_PACKED_BYTES:
        return f"its packed K/V copy would take {packed >> 20} MiB (> {MAX_PACKED_BYTES >> 20})"
    return kernel_unavailable()


class SparseAttention:
    """The kernel's metadata per input layout, block and patterns (built once per layout)."""

    def __init__(self) -> None:
        self.plans = PlanCache(MAX_PLANS)

    def __call__(self, q, k, v, patterns: Sequence[tuple[int, ...]], block: int,
                 scale: Optional[float]) -> torch.Tensor:
        key = (tuple((t.shape, t.stride()) for t in (q, k, v)), tuple(patterns), block, scale)
        plan = self.plans.get(key)
        if plan is None:
            plan = self.plans.add(key, self._plan(q, k, v, patterns, block, scale))
        meta, flat, scale_value = plan
        batch, heads, rows, _ = q.shape
        out = torch.empty(batch, rows, heads, v.size(-1)).transpose(1, 2)  # free reshape after
        status = launch(_entry(), (ctypes.addressof(meta), ctypes.addressof(flat), q.data_ptr(),
                                   k.data_ptr(), v.data_ptr(), out.data_ptr(), scale_value,
                                   torch.get_num_threads()), (plan,))
        if status != 0:
            raise MemoryError("block-sparse C++ attention: out of memory for its buffers")
        return out

    @staticmethod
    def _plan(q, k, v, patterns, block, scale) -> tuple:
        batch, heads, rows, head_dim = q.shape
        if heads % k.size(1) or v.size(1) != k.size(1) or k.size(2) != rows or v.size(2) != rows:
            raise ValueError(f"block-sparse attention: q {list(q.shape)}, k {list(k.shape)}, "
                             f"v {list(v.shape)} disagree on heads or positions")
        if len(patterns) not in (1, heads) or any(len(p) != 5 for p in patterns):
            raise ValueError(f"block-sparse attention: {len(patterns)} patterns of (local, global, "
                             f"stride, window, sinks) for {heads} heads (one, or one per head)")
        out_strides = (rows * heads * v.size(-1), v.size(-1), heads * v.size(-1))
        meta = (ctypes.c_int64 * 20)(batch, heads, k.size(1), rows, head_dim, v.size(-1), block,
                                     len(patterns), *q.stride()[:3], *k.stride()[:3],
                                     *v.stride()[:3], *out_strides)
        flat = (ctypes.c_int64 * (5 * len(patterns)))(*[x for p in patterns for x in p])
        scale_value = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
        return meta, flat, scale_value


_KERNEL = SparseAttention()


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     patterns: Sequence[tuple[int, ...]], block: int,
                     scale: Optional[float] = None) -> torch.Tensor:
    """Causal self-attention over the blocks and keys ``patterns`` allow (module docstring);
    the caller checked :func:`kernel_declines`."""
    return _KERNEL(q, k, v, [tuple(int(x) for x in p) for p in patterns], block, scale)
