"""The C++ source of the few-row fp32 / bf16-weight GEMV and the GEMM epilogue
(``kernels/gemv_cpu.py`` builds and calls them; it also writes the layouts read here).

Layouts (``gemv_cpu.pack_weight``): fp32 ``[ceil(N/8)][K][8]`` (a block of eight output rows is
one sequential stream), bf16 ``[ceil(N/16)][K][16]`` with each k's sixteen rows stored as pairs
(r_i, r_(8+i)): one 32-bit lane holds two weights, so a shift gives row i and a mask row 8+i as
fp32 (a bf16 is the top half of its fp32). The tiled GEMM reads the same bf16 layout.

One source, three builds chosen at run time (``toolchain.ISA_MARCH``, picked like the quantized
GEMV's): the ``#if`` blocks define ``block_dots`` (fp32) and ``block_dots_bf16`` for AVX-512
(bf16: one zmm holds the 32 weights of k and k+1; fp32 keeps AVX2's ymm loop, see there),
AVX2+FMA (ymm, one k per vector) or portable ``omp simd`` C. Everything else is written once.
``fxf_gemv_isa`` reports which block was compiled, so tests can check a build is what it claims.

Numerics: every variant computes the fp32 dot product of x with the (bf16-widened, exactly)
weights, with FMAs; only the summation order differs between them. NaN and inf propagate as in
any sum of products.
"""
from fxforge.kernels.activations import ACT_OF_CPP, cpp_act_switch
from fxforge.kernels.fused_cpp_math import MATH, PRELUDE

# GV_ISA of each build, as fxf_gemv_isa returns it
ISA_LEVEL = {"portable": 0, "avx2": 1, "avx512": 2}


def source(parallel_min_weights: int) -> str:
    return ("#include <omp.h>\n#include <immintrin.h>\n" + PRELUDE + MATH + ACT_OF_CPP + r"""
static inline float activate(float v, int act) {
""" + cpp_act_switch("return act_of<{act}>(v);") + "}\n" + _EPILOGUE + r"""
extern "C" void fxf_epilogue(float* y, int64_t M, int64_t N, int64_t sy, int act, const float* res,
                             int64_t sr, int nthreads) {
""" + cpp_act_switch("epilogue_rows<{act}>(y, M, N, sy, res, sr, nthreads);") + "}\n"
            + _BLOCK_DOTS + _GEMV).replace("PARALLEL_MIN_WEIGHTS", str(parallel_min_weights))


_EPILOGUE = r"""
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
"""

# block_dots: acc[0:8] = x . w_(8b+i) for the eight rows of one fp32 block (wb: [K][8]);
# block_dots_bf16: acc[0:16] = x . w_(16b+i) for one bf16 block (wb: [K][16] uint16 pairs).
# Four (fp32) or eight (bf16) independent accumulators: FMA latency, not bandwidth, would bind.
_BLOCK_DOTS = r"""
#if defined(__AVX2__) && defined(__FMA__)
/* fp32, in the AVX2 and the AVX-512 builds: one ymm per k. A zmm per two k (the rows of k and
   k+1 times {x[k] x8, x[k+1] x8}) was tried: 0.82-1.02x this loop's GB/s at 1 thread on
   SmolLM2's shapes (a 2-core AMD EPYC Zen 4, double-pumped AVX-512, shared host), so not kept. */
static inline void block_dots(const float* x, const float* wb, int64_t K, float* acc) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t k = 0;
  for (; k + 4 <= K; k += 4) {
    a0 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + k), _mm256_loadu_ps(wb + k * 8), a0);
    a1 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + k + 1), _mm256_loadu_ps(wb + k * 8 + 8), a1);
    a2 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + k + 2), _mm256_loadu_ps(wb + k * 8 + 16), a2);
    a3 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + k + 3), _mm256_loadu_ps(wb + k * 8 + 24), a3);
  }
  __m256 r = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
  for (; k < K; ++k) r = _mm256_fmadd_ps(_mm256_broadcast_ss(x + k), _mm256_loadu_ps(wb + k * 8), r);
  _mm256_storeu_ps(acc, r);
}
/* one k of a bf16 block into (rows 0-7, rows 8-15): a shift and a mask widen one load's pairs */
static inline void bf16_step(float xk, const uint16_t* wk, __m256* lo, __m256* hi) {
  const __m256i v = _mm256_loadu_si256((const __m256i*)wk);
  const __m256 xs = _mm256_set1_ps(xk);
  *lo = _mm256_fmadd_ps(xs, _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)), *lo);
  const __m256i high = _mm256_set1_epi32((int)0xFFFF0000u);
  *hi = _mm256_fmadd_ps(xs, _mm256_castsi256_ps(_mm256_and_si256(v, high)), *hi);
}
#endif
#if defined(__AVX512F__) && defined(__AVX512DQ__)
#define GV_ISA 2
/* bf16: one zmm load holds k and k+1 of a block (32 weights), widened by one shift and one mask
   and multiplied by {x[k] x8, x[k+1] x8}; the halves are added at the end. Half the loads and
   widening ops of the ymm loop per weight. */
static inline __m512 x_pair(const float* x) {
  return _mm512_insertf32x8(_mm512_set1_ps(x[0]), _mm256_set1_ps(x[1]), 1);
}
static inline __m256 halves_sum(__m512 v) {
  return _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
}
static inline void block_dots_bf16(const float* x, const uint16_t* wb, int64_t K, float* acc) {
  const __m512i high = _mm512_set1_epi32((int)0xFFFF0000u);
  __m512 lo[4], hi[4];
  for (int j = 0; j < 4; ++j) lo[j] = hi[j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8)
    for (int j = 0; j < 4; ++j) {   /* unrolled by the compiler */
      const __m512i v = _mm512_loadu_si512((const void*)(wb + (k + 2 * j) * 16));
      const __m512 xk = x_pair(x + k + 2 * j);
      lo[j] = _mm512_fmadd_ps(xk, _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)), lo[j]);
      hi[j] = _mm512_fmadd_ps(xk, _mm512_castsi512_ps(_mm512_and_si512(v, high)), hi[j]);
    }
  __m256 l = halves_sum(_mm512_add_ps(_mm512_add_ps(lo[0], lo[1]), _mm512_add_ps(lo[2], lo[3])));
  __m256 h = halves_sum(_mm512_add_ps(_mm512_add_ps(hi[0], hi[1]), _mm512_add_ps(hi[2], hi[3])));
  for (; k < K; ++k) bf16_step(x[k], wb + k * 16, &l, &h);
  _mm256_storeu_ps(acc, l);
  _mm256_storeu_ps(acc + 8, h);
}
#elif defined(__AVX2__) && defined(__FMA__)
#define GV_ISA 1
/* Bytes ahead to prefetch in the bf16 loop. Widening costs two ops per 8 weights, so the
   out-of-order window spans fewer bytes of the stream than fp32's load-FMA loop does, and the
   hardware prefetcher alone left it latency-bound once the weights came from DRAM (Zen 3:
   bench/gemv_stream.py; bench/RESULTS.md, 2026-12-03 night). The same prefetch in the fp32
   loop measured no gain there, so that loop has none */
#define BF16_PREFETCH 1024
static inline void block_dots_bf16(const float* x, const uint16_t* wb, int64_t K, float* acc) {
  __m256 lo[4], hi[4];
  for (int j = 0; j < 4; ++j) lo[j] = hi[j] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 4 <= K; k += 4) {   /* prefetch: see BF16_PREFETCH */
    _mm_prefetch((const char*)(wb + k * 16) + BF16_PREFETCH, _MM_HINT_T0);
    _mm_prefetch((const char*)(wb + k * 16) + BF16_PREFETCH + 64, _MM_HINT_T0);
    for (int j = 0; j < 4; ++j) bf16_step(x[k + j], wb + (k + j) * 16, &lo[j], &hi[j]);
  }
  for (; k < K; ++k) bf16_step(x[k], wb + k * 16, &lo[0], &hi[0]);
  _mm256_storeu_ps(acc, _mm256_add_ps(_mm256_add_ps(lo[0], lo[1]), _mm256_add_ps(lo[2], lo[3])));
  _mm256_storeu_ps(acc + 8, _mm256_add_ps(_mm256_add_ps(hi[0], hi[1]), _mm256_add_ps(hi[2], hi[3])));
}
#else
#define GV_ISA 0
static inline void block_dots(const float* x, const float* wb, int64_t K, float* acc) {
  for (int i = 0; i < 8; ++i) acc[i] = 0.0f;
  for (int64_t k = 0; k < K; ++k) {
    #pragma omp simd
    for (int i = 0; i < 8; ++i) acc[i] += x[k] * wb[k * 8 + i];
  }
}
static inline void block_dots_bf16(const float* x, const uint16_t* wb, int64_t K, float* acc) {
  for (int i = 0; i < 16; ++i) acc[i] = 0.0f;
  for (int64_t k = 0; k < K; ++k)
    for (int i = 0; i < 8; ++i) {
      acc[i] += x[k] * bf16_load(wb[k * 16 + 2 * i]);
      acc[8 + i] += x[k] * bf16_load(wb[k * 16 + 2 * i + 1]);
    }
}
#endif
"""

_GEMV = r"""
extern "C" int fxf_gemv_isa(void) { return GV_ISA; }

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
   [ceil(N/16)][K][16] (rows past N zero). Threads take contiguous ranges of blocks: each
   reads one sequential stream. */
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
"""
