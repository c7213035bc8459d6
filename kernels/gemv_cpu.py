"""Few-row fp32 linear on the CPU (``y = act(x @ W^T + bias) + residual`` for M <= GEMV_MAX_M).

A decode step multiplies one (or a few) activation rows by every weight matrix of the model, so
its time is the weights' bytes over the memory bandwidth. PyTorch's CPU GEMM does not reach that
bandwidth at M=1: measured on a 2-core Zen 1 (AVX2, 2 threads, fp32, weights larger than the LLC),
``F.linear``/``mm`` read 12-16 GB/s of weights, against ~30 GB/s for a plain ``sum``. This kernel
streams the [N, K] weight once, four output rows at a time (eight independent AVX2 FMA chains,
the activation rows reread from L1), splits N across threads, and applies bias, activation and
residual while the outputs are still in registers: 22-27 GB/s on the same shapes
(``python bench/decode.py --gemv`` prints the table), with one ctypes call instead of
``addmm`` + in-place epilogue ops.

Weights of format "bf16" (``irgraph/weight_format.py``: set by ``precision="bf16"`` on a CPU
without bf16 math, and on fp32 weights whose values are all bf16) are stored in bf16, in blocks
of sixteen rows, and widened to fp32 in registers (a shift and a mask per sixteen weights); the
math stays fp32, so the result is the fp32 linear's on the bf16-rounded values. Half the bytes: measured on the same Zen 1 at M=1, 2 threads,
1.66-1.89x the fp32 kernel's speed on SmolLM2's and a 2048x8192 shape (20-24 GB/s of bf16).

The AVX2 path is compiled where the compiler targets AVX2 (``-march=native``); elsewhere the same
loops run as portable ``omp simd`` code. The reference is ``torch.ops.fxforge.linear``.
"""
from __future__ import annotations

import ctypes
import functools
import logging
from typing import Callable, Optional

import torch

from fxforge.irgraph.weight_format import not_implemented_by
from fxforge.kernels.activations import ACT_OF_CPP, ACTIVATION_CODES, REGISTRY, cpp_act_switch
from fxforge.kernels.fused_cpp_math import MATH, PRELUDE
from fxforge.kernels.replay import launch
from fxforge.kernels.shared_packs import shared_pack
from fxforge.kernels.toolchain import build_failure, load_function

log = logging.getLogger("fxforge.kernels")

GEMV_MAX_M = 4                  # above this many rows the GEMM libraries win (measured, see below)
PARALLEL_MIN_WEIGHTS = 1 << 15  # N x K below which one thread is faster than a parallel region
# The activation switches come from the registry; the parentheses make .replace cover every piece.
SOURCE = ("#include <omp.h>\n#include <immintrin.h>\n" + PRELUDE + MATH + ACT_OF_CPP + r"""

static inline float activate(float v, int act) {
""" + cpp_act_switch("return act_of<{act}>(v);") + r"""}

/* y = act(y) (+ residual) in place, over M rows of N (row strides sy, sr): the epilogue of a GEMM
   from a library (ATen/MKL addmm). One templated loop per activation, so each vectorizes
   (fxf_erf/fxf_exp are branch-free): measured on a 2-core Zen 1 at 2 threads, silu 0.5x and gelu 0.85-0.9x
   the time of ATen's in-place kernels, with the residual add in the same pass. */
template <int ACT>
static void epilogue_rows(float* y, int64_t M, int64_t N, int64_t sy, const float* res, int64_t sr,
                          int nthreads) {
  #pragma omp parallel for num_threads(nthreads) if (nthreads > 1 && M * N >= PARALLEL_MIN_WEIGHTS)
  for (int64_t m = 0; m < M; ++m) {
    float* row = y + m * sy;
    if (res) {
      const float* r = res + m * sr;
      #pragma omp simd
      for (int64_t n = 0; n < N; ++n) row[n] = act_of<ACT>(row[n]) + r[n];
    } else {
      #pragma omp simd
      for (int64_t n = 0; n < N; ++n) row[n] = act_of<ACT>(row[n]);
    }
  }
}

extern "C" void fxf_epilogue(float* y, int64_t M, int64_t N, int64_t sy, int act, const float* res,
                             int64_t sr, int nthreads) {
""" + cpp_act_switch("epilogue_rows<{act}>(y, M, N, sy, res, sr, nthreads);") + r"""}

/* acc[0:8] = x . w_(8b+i) for the eight rows of one packed block ([K][8]: one sequential stream) */
static inline void block_dots(const float* x, const float* wb, int64_t K, float* acc) {
  int64_t k = 0;
#ifdef __AVX2__
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(),
         a3 = _mm256_setzero_ps();
  for (; k + 4 <= K; k += 4) {  /* four accumulators: FMA latency, not bandwidth, would bind */
    a0 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + k), _mm256_loadu_ps(wb + k * 8), a0);
    a1 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + k + 1), _mm256_loadu_ps(wb + k * 8 + 8), a1);
    a2 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + k + 2), _mm256_loadu_ps(wb + k * 8 + 16), a2);
    a3 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + k + 3), _mm256_loadu_ps(wb + k * 8 + 24), a3);
  }
  _mm256_storeu_ps(acc, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
#else
  for (int i = 0; i < 8; ++i) acc[i] = 0.0f;
#endif
  for (; k < K; ++k) {
    #pragma omp simd
    for (int i = 0; i < 8; ++i) acc[i] += x[k] * wb[k * 8 + i];
  }
}

/* acc[0:16] = x . w_(16b+i) for the sixteen rows of one bf16 block ([K][16] uint16, each k's
   rows stored as pairs (r_i, r_(8+i)): one 32-bit lane holds two weights, so a shift gives row i
   and a mask gives row 8+i as fp32, and one broadcast of x[k] serves sixteen rows) */
static inline void block_dots_bf16(const float* x, const uint16_t* wb, int64_t K, float* acc) {
  int64_t k = 0;
#ifdef __AVX2__
  const __m256i high = _mm256_set1_epi32((int)0xFFFF0000u);
  __m256 lo[4], hi[4];
  for (int j = 0; j < 4; ++j) lo[j] = hi[j] = _mm256_setzero_ps();
  for (; k + 4 <= K; k += 4)
    for (int j = 0; j < 4; ++j) {   /* unrolled by the compiler: eight independent FMA chains */
      const __m256i v = _mm256_loadu_si256((const __m256i*)(wb + (k + j) * 16));
      const __m256 xk = _mm256_broadcast_ss(x + k + j);
      lo[j] = _mm256_fmadd_ps(xk, _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)), lo[j]);
      hi[j] = _mm256_fmadd_ps(xk, _mm256_castsi256_ps(_mm256_and_si256(v, high)), hi[j]);
    }
  _mm256_storeu_ps(acc, _mm256_add_ps(_mm256_add_ps(lo[0], lo[1]), _mm256_add_ps(lo[2], lo[3])));
  _mm256_storeu_ps(acc + 8, _mm256_add_ps(_mm256_add_ps(hi[0], hi[1]), _mm256_add_ps(hi[2], hi[3])));
#else
  for (int i = 0; i < 16; ++i) acc[i] = 0.0f;
#endif
  for (; k < K; ++k)
    for (int i = 0; i < 8; ++i) {
      acc[i] += x[k] * bf16_load(wb[k * 16 + 2 * i]);
      acc[8 + i] += x[k] * bf16_load(wb[k * 16 + 2 * i + 1]);
    }
}

/* blocks b0..b1 of the output (R rows each: 8 fp32 or 16 bf16) for every activation row
   (x, residual rows: strides sx, sr) */
static void gemv_blocks(const float* x, int64_t sx, int64_t M, int64_t K, const void* w, int bf16,
                        int64_t N, const float* bias, const float* res, int64_t sr, int act,
                        float* y, int64_t b0, int64_t b1) {
  const int64_t R = bf16 ? 16 : 8;
  float acc[16];
  for (int64_t b = b0; b < b1; ++b)
    for (int64_t m = 0; m < M; ++m) {   /* later rows reread the block from L1/L2 */
      if (bf16) block_dots_bf16(x + m * sx, (const uint16_t*)w + b * K * 16, K, acc);
      else block_dots(x + m * sx, (const float*)w + b * K * 8, K, acc);
      for (int64_t i = 0, n = b * R; i < R && n < N; ++i, ++n) {
        const float v = activate(acc[i] + (bias ? bias[n] : 0.0f), act);
        y[m * N + n] = res ? v + res[m * sr + n] : v;
      }
    }
}

/* w: the [N, K] weight packed by pack_weight: fp32 [ceil(N/8)][K][8], or bf16 (bf16 != 0)
   [ceil(N/16)][K][16] (rows past N zero) */
extern "C" void fxf_gemv(const float* x, int64_t sx, int64_t M, int64_t K, const void* w, int bf16,
                         int64_t N, const float* bias, const float* res, int64_t sr, int act,
                         float* y, int nthreads) {
  const int64_t R = bf16 ? 16 : 8, B = (N + R - 1) / R;
  if (nthreads <= 1 || N * K < PARALLEL_MIN_WEIGHTS) {
    gemv_blocks(x, sx, M, K, w, bf16, N, bias, res, sr, act, y, 0, B);
    return;
  }
  #pragma omp parallel num_threads(nthreads)
  {
    const int64_t t = omp_get_thread_num(), T = omp_get_num_threads(), per = (B + T - 1) / T;
    const int64_t b0 = t * per < B ? t * per : B, b1 = (t + 1) * per < B ? (t + 1) * per : B;
    gemv_blocks(x, sx, M, K, w, bf16, N, bias, res, sr, act, y, b0, b1);
  }
}
""").replace("PARALLEL_MIN_WEIGHTS", str(PARALLEL_MIN_WEIGHTS))


@functools.lru_cache(maxsize=None)
def _entry() -> Callable:
    """The compiled kernel (built once into the kernel cache, ~2 s)."""
    fn = load_function(SOURCE, "fxf_gemv", "gemv")
    fn.restype = None
    fn.argtypes = (ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                   ctypes.c_int, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                   ctypes.c_int, ctypes.c_void_p, ctypes.c_int)
    return fn


@functools.lru_cache(maxsize=None)
def _epilogue_entry() -> Optional[Callable]:
    """The compiled epilogue, or None where it cannot be built (no C++ compiler, a failed
    build): tried once per process, not at every GEMM."""
    try:
        fn = load_function(SOURCE, "fxf_epilogue", "gemv")
    except Exception as exc:  # noqa: BLE001  (KernelBuildError, OSError: ATen does the same)
        log.info("fxforge: GEMM epilogues run on ATen: %s: %s", type(exc).__name__, exc)
        return None
    fn.restype = None
    fn.argtypes = (ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int,
                   ctypes.c_void_p, ctypes.c_int64, ctypes.c_int)
    return fn


def epilogue_available() -> bool:
    """Whether :func:`epilogue_` runs the compiled pass here (else the caller's ATen ops)."""
    return _epilogue_entry() is not None


def epilogue_(y: torch.Tensor, activation: str, residual: Optional[torch.Tensor]) -> bool:
    """``y = act(y) (+ residual)`` in place, in one vectorized pass, for a 2-D fp32 ``y`` (and
    residual) with unit stride along N; False (nothing done) for anything else, or without the
    compiled kernel: the caller then runs ATen's ops."""
    if y.dtype != torch.float32 or y.dim() != 2 or y.stride(1) != 1 or (
            residual is not None and (residual.dtype != torch.float32 or residual.shape != y.shape
                                      or residual.stride(1) != 1)):
        return False
    fn = _epilogue_entry()
    if fn is None:
        return False
    launch(fn, (y.data_ptr(), y.shape[0], y.shape[1], y.stride(0), ACTIVATION_CODES[activation],
                residual.data_ptr() if residual is not None else None,
                residual.stride(0) if residual is not None else 0, torch.get_num_threads()))
    return True


def gemv_unavailable() -> Optional[str]:
    """Why the kernel cannot run here (no C++ compiler, a failed build), or None."""
    return build_failure(_entry, "gemv: C++ kernel")


# Layout names for kernels/shared_packs.py (the tiled GEMM reads the bf16 layout too)
BF16_PACK_KIND = "bf16 pairs (c_j, c_8+j) [N/16][K][16]"
PACK_KINDS = {torch.float32: "gemv fp32 [N/8][K][8]", torch.bfloat16: BF16_PACK_KIND}
# The weight formats (irgraph/weight_format.py) the C++ GEMV and tiled GEMM store, and how
STORAGE = {"dense": torch.float32, "bf16": torch.bfloat16}


def storage_of(weight_format: str, kernel: str) -> torch.dtype:
    """The dtype ``kernel`` keeps a weight of ``weight_format`` in (read from the op, never
    from the values), or the error naming a format it does not implement."""
    if weight_format not in STORAGE:
        raise not_implemented_by(kernel, weight_format, STORAGE)
    return STORAGE[weight_format]


def pack_weight(weight_nk: torch.Tensor, dtype: torch.dtype = torch.float32,
                fp32_rows: int = 8) -> torch.Tensor:
    """[N, K] -> fp32 [ceil(N/R), K, R] with R = ``fp32_rows`` (each block of R output rows read
    as one stream: 8 for the GEMV, 16 for the tiled GEMM's panels), or bf16 [ceil(N/16), K, 16]
    with each k's rows in pairs (r_i, r_(8+i)) (see block_dots_bf16; both kernels read it)."""
    n, k = weight_nk.shape
    rows = 16 if dtype == torch.bfloat16 else fp32_rows
    blocks = (n + rows - 1) // rows
    padded = torch.zeros(blocks * rows, k, dtype=dtype)
    padded[:n] = weight_nk
    if dtype == torch.float32:
        return padded.reshape(blocks, rows, k).transpose(1, 2).contiguous()
    return padded.reshape(blocks, 2, 8, k).permute(0, 3, 2, 1).contiguous()


class GemvLinear:
    """``act(x @ weight_nk^T + bias) + residual`` for fp32 ``x`` of at most GEMV_MAX_M rows.

    ``weight_nk`` is the [N, K] fp32 weight (kept packed by :func:`pack_weight`, in bf16 when
    ``weight_format`` is "bf16": :attr:`storage`); ``bias`` [N] or None. Calls pass x as [M, K] (``PackedLinear`` checks shapes); any M is correct, at most
    GEMV_MAX_M is where it is faster than the GEMM libraries."""

    def __init__(self, weight_nk: torch.Tensor, bias: Optional[torch.Tensor], activation: str,
                 bf16_pack: Optional[torch.Tensor] = None, weight_format: str = "dense"):
        """``bf16_pack``: ``weight_nk`` already packed in bf16 (the tiled GEMM's panels of the
        same weight, format "bf16"): used as is, not packed again."""
        if weight_nk.dtype != torch.float32:
            raise ValueError(f"gemv: fp32 weights only, got {weight_nk.dtype}")
        self.storage = storage_of(weight_format, "gemv")
        self.fn = _entry()
        if bf16_pack is not None:
            if self.storage != torch.bfloat16:
                raise ValueError(f"gemv: a bf16 pack for a weight of format {weight_format!r}")
            self.weight = bf16_pack
        else:
            self.weight = shared_pack(PACK_KINDS[self.storage], weight_nk,
                                      lambda w: pack_weight(w, self.storage))
        self.bias = bias.to(torch.float32).contiguous() if bias is not None else None
        self.bias_ptr = self.bias.data_ptr() if self.bias is not None else None
        self.n, self.k = weight_nk.shape
        self.act = ACTIVATION_CODES[activation]

    def __call__(self, x: torch.Tensor, residual: Optional[torch.Tensor],
                 threads: int = 0) -> torch.Tensor:
        """``threads``: this call's thread count (0: torch's)."""
        if x.stride(1) != 1:
            x = x.contiguous()
        rows = x.shape[0]
        y = torch.empty(rows, self.n, dtype=torch.float32)   # sizes as arguments: ~1.3 us less
        if residual is not None and residual.stride(1) != 1:
            residual = residual.contiguous()
        launch(self.fn, (x.data_ptr(), x.stride(0), rows, self.k, self.weight.data_ptr(),
                         int(self.storage == torch.bfloat16), self.n,
                         self.bias_ptr, residual.data_ptr() if residual is not None else None,
                         residual.stride(0) if residual is not None else 0, self.act,
                         y.data_ptr(), threads or torch.get_num_threads()))
        return y

    def describe(self, dtype_name: str, has_residual: bool) -> str:
        steps = [s for s in ("bias" if self.bias is not None else "",
                             REGISTRY[self.act].name if self.act else "",
                             "residual add" if has_residual else "") if s]
        epilogue = f", epilogue in registers: {' then '.join(steps)}" if steps else ""
        stored = ", weights stored in bf16 (format bf16)" if self.storage == torch.bfloat16 else ""
        return f"C++ GEMV ({dtype_name}{stored}, M <= {GEMV_MAX_M}, weight streamed once){epilogue}"
