"""The C++ source of the quantized weight-only GEMV (``kernels/quant_gemv_cpu.py`` builds and
calls it; the layout it reads is written by ``quant_gemv_cpu.pack``).

Layout (one sequential stream per block of 16 output rows): block b holds the K/G groups of rows
16b..16b+15 one after the other; group g is a header (16 fp16 scales, then for int4 16 fp16
offsets) followed by its codes, each k's 16 rows side by side: int8 [G][16], or for int4
[G/2][16] bytes whose low nibble is row i at k = 2j and high nibble row i at k = 2j + 1 (the
byte order of the IR's [N, K/2] codes, only transposed). Rows past N are zero codes and scales.

One source, three builds chosen at run time (``toolchain.ISA_MARCH``): the ``#if`` blocks below
define a 16-row vector ``V16`` and its loads for AVX-512 (one zmm), AVX2+F16C (two ymm) or
portable C; the kernels above them are written once on ``V16``. ``fxf_qgemv_isa`` reports which
block was compiled, so tests can check a variant is the build it claims to be.

Math: per group, y += s * dot(q, x_g) (+ o * sum(x_g) for int4), so the inner loop is a convert
and an FMA per 16 weights, the scale is applied once a group. For int4 that form differs from the
reference's ``x @ (q*s + o)`` in NaN-ness when x holds an inf (0 * inf in the dot, inf - inf
between the two terms), so a row tile whose group sums are not all finite takes the EXACT path:
w = q*s + o per weight, as the reference. q*s is exact in fp32 (4- or 8-bit times an 11-bit fp16
mantissa), so that is one rounding whether the compiler emits an FMA or not: the weights equal the
reference's bit for bit (the prefill dequantization relies on this too).
"""
from fxforge.kernels.activations import ACT_OF_CPP, cpp_act_switch
from fxforge.kernels.fused_cpp_math import MATH, PRELUDE
from fxforge.kernels.gemm_cpp import CORE

FMT_INT8, FMT_INT4 = 0, 1


def source(parallel_min_weights: int) -> str:
    return ("#include <omp.h>\n#include <immintrin.h>\n#include <stdlib.h>\n" + PRELUDE + MATH
            + ACT_OF_CPP + _VECTORS + CORE + r"""
static inline float activate(float v, int act) {
""" + cpp_act_switch("return act_of<{act}>(v);") + "}\n" + _KERNELS) \
        .replace("PARALLEL_MIN_WEIGHTS", str(parallel_min_weights)) \
        .replace("FMT_INT4", str(FMT_INT4))


# QG_PF: bytes ahead of the codes to prefetch, one cache line per 64 bytes read (0: none).
# Converting codes to floats costs several ops per byte, so the out-of-order window spans only a
# few cache lines of the stream, and the hardware prefetcher alone left the GEMV latency-bound
# once the weights came from DRAM rather than L3 (Zen 3, AVX2: bench/gemv_stream.py; bench/RESULTS.md,
# 2026-12-03 night). Not yet measured on AVX-512, so 0 there.
# QG_MT: activation rows per tile (the converted weights are reused across them; AVX2's sixteen
# ymm registers hold two rows' partial sums, AVX-512's 32 zmm four). QG_UNROLL_OF: codes loads per
# step, so that at M = 1 four FMA chains hide the FMA latency (AVX2 keeps one at M >= 2,
# where two would spill its sixteen ymm).
_VECTORS = r"""
#if defined(__AVX512F__)
#define QG_ISA 2
#define QG_MT 4
#define QG_UNROLL_OF(MT) 2
#define QG_PF 0
struct V16 { __m512 a; };
static inline V16 v_zero() { return {_mm512_setzero_ps()}; }
static inline V16 v_set(float f) { return {_mm512_set1_ps(f)}; }
static inline V16 v_fma(V16 a, V16 b, V16 c) { return {_mm512_fmadd_ps(a.a, b.a, c.a)}; }
static inline V16 v_add(V16 a, V16 b) { return {_mm512_add_ps(a.a, b.a)}; }
static inline V16 v_mul(V16 a, V16 b) { return {_mm512_mul_ps(a.a, b.a)}; }
static inline V16 v_h16(const uint8_t* p) {
  return {_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p))};
}
static inline V16 v_i8(const uint8_t* p) {
  return {_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)))};
}
/* 16 bytes -> their 16 low and 16 high nibbles as floats, exactly (so EXACT and the prefill's
   weights stay bit for bit the reference's). The bytes are zero-extended once (one vpmovzxbd per
   32 weights, not two, and no masks): vpermps reads only bits 3:0 of each index, so the bytes
   themselves look their low nibbles up in a table of 0.0f..15.0f; shifted right by 4 they are the
   high nibbles, converted. One lookup and one cvtdq2ps, not two of either, spreads the work over
   Zen 4's shuffle and convert pipes: 1.15-1.3x the old two-cvtdq2ps form at M = 1, 1.05x two
   lookups (bench/quant_gemv.py shapes, 1 thread) */
static inline void v_u4(const uint8_t* p, V16* lo, V16* hi) {
  const __m512 table = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p));
  lo->a = _mm512_permutexvar_ps(b, table);
  hi->a = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
}
static inline void v_store(float* p, V16 v) { _mm512_storeu_ps(p, v.a); }
#elif defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#define QG_ISA 1
#define QG_MT 2
#define QG_UNROLL_OF(MT) ((MT) == 1 ? 2 : 1)
#define QG_PF 4096
struct V16 { __m256 a, b; };
static inline V16 v_zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
static inline V16 v_set(float f) { const __m256 v = _mm256_set1_ps(f); return {v, v}; }
static inline V16 v_fma(V16 a, V16 b, V16 c) {
  return {_mm256_fmadd_ps(a.a, b.a, c.a), _mm256_fmadd_ps(a.b, b.b, c.b)};
}
static inline V16 v_add(V16 a, V16 b) { return {_mm256_add_ps(a.a, b.a), _mm256_add_ps(a.b, b.b)}; }
static inline V16 v_mul(V16 a, V16 b) { return {_mm256_mul_ps(a.a, b.a), _mm256_mul_ps(a.b, b.b)}; }
static inline V16 v_h16(const uint8_t* p) {
  return {_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)),
          _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(p + 16)))};
}
static inline V16 v_i8(const uint8_t* p) {
  return {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p))),
          _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(p + 8))))};
}
/* the bytes zero-extended once (two vpmovzxbd per 32 weights, where masking and shifting the
   bytes first took four, plus two to move the upper 8 bytes down), then the nibbles masked and
   shifted out as int32 lanes: 1.2-1.3x at M = 1. (vpermps has 8 entries here: a 16-entry lookup
   takes two and a blend, more than the cvtdq2ps it saves) */
static inline void v_u4(const uint8_t* p, V16* lo, V16* hi) {
  const __m256i a = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p)),
                b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(p + 8))),
                m = _mm256_set1_epi32(0x0F);
  *lo = {_mm256_cvtepi32_ps(_mm256_and_si256(a, m)), _mm256_cvtepi32_ps(_mm256_and_si256(b, m))};
  *hi = {_mm256_cvtepi32_ps(_mm256_srli_epi32(a, 4)), _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4))};
}
static inline void v_store(float* p, V16 v) { _mm256_storeu_ps(p, v.a); _mm256_storeu_ps(p + 8, v.b); }
#else
#define QG_ISA 0
#define QG_MT 2
#define QG_UNROLL_OF(MT) 1
#define QG_PF 0
struct V16 { float v[16]; };
#define QG_EACH(expr) V16 r; _Pragma("omp simd") for (int i = 0; i < 16; ++i) r.v[i] = (expr); return r;
static inline V16 v_zero() { QG_EACH(0.0f) }
static inline V16 v_set(float f) { QG_EACH(f) }
/* a * b + c, not fmaf: without an FMA unit (-march=x86-64) fmaf is a libm call in software,
   ~40x slower here; the compiler contracts it where the target has FMA */
static inline V16 v_fma(V16 a, V16 b, V16 c) { QG_EACH(a.v[i] * b.v[i] + c.v[i]) }
static inline V16 v_add(V16 a, V16 b) { QG_EACH(a.v[i] + b.v[i]) }
static inline V16 v_mul(V16 a, V16 b) { QG_EACH(a.v[i] * b.v[i]) }
static inline float h16_load(const uint8_t* p) { _Float16 h; memcpy(&h, p, 2); return (float)h; }
static inline V16 v_h16(const uint8_t* p) { QG_EACH(h16_load(p + 2 * i)) }
static inline V16 v_i8(const uint8_t* p) { QG_EACH((float)(int8_t)p[i]) }
static inline void v_u4(const uint8_t* p, V16* lo, V16* hi) {
  for (int i = 0; i < 16; ++i) { lo->v[i] = (float)(p[i] & 15); hi->v[i] = (float)(p[i] >> 4); }
}
static inline void v_store(float* p, V16 v) { memcpy(p, v.v, sizeof v.v); }
#endif
"""

_KERNELS = r"""
extern "C" int fxf_qgemv_isa(void) { return QG_ISA; }

static inline int64_t header_bytes(int fmt) { return fmt == FMT_INT4 ? 64 : 32; }
static inline int64_t group_bytes(int fmt, int64_t G) {
  return header_bytes(fmt) + (fmt == FMT_INT4 ? G * 8 : G * 16);
}

/* out[m][0:16] = the 16 rows of block `blk` times activation rows x + m sx, m < MT (xs: their
   group sums, MT rows of ng) */
template <int FMT, int MT, bool EXACT>
static void block_tile(const uint8_t* blk, int64_t G, int64_t ng, const float* x, int64_t sx,
                       const float* xs, float* out) {
  V16 acc[MT];
  for (int m = 0; m < MT; ++m) acc[m] = v_zero();
  const int64_t gb = group_bytes(FMT, G), hb = header_bytes(FMT);
  for (int64_t g = 0; g < ng; ++g) {
    const uint8_t* p = blk + g * gb;
    const uint8_t* c = p + hb;
    const float* xg = x + g * G;
    const V16 s = v_h16(p);
    if (FMT == FMT_INT4 && EXACT) {   /* the reference's weights, then x . w */
      const V16 o = v_h16(p + 32);
      for (int64_t j = 0; j < G / 2; ++j) {
        V16 lo, hi;
        v_u4(c + j * 16, &lo, &hi);
        lo = v_fma(lo, s, o);
        hi = v_fma(hi, s, o);
        for (int m = 0; m < MT; ++m) {
          acc[m] = v_fma(v_set(xg[m * sx + 2 * j]), lo, acc[m]);
          acc[m] = v_fma(v_set(xg[m * sx + 2 * j + 1]), hi, acc[m]);
        }
      }
      continue;
    }
    constexpr int unroll = QG_UNROLL_OF(MT);
    V16 t[MT][2 * unroll];
    for (int m = 0; m < MT; ++m)
      for (int u = 0; u < 2 * unroll; ++u) t[m][u] = v_zero();
    if (FMT == FMT_INT4) {
#if QG_PF > 0
      _mm_prefetch((const char*)p + QG_PF, _MM_HINT_T0);
#endif
      for (int64_t j = 0; j < G / 2; j += unroll) {  /* G >= 32: G/2 is a multiple of it */
#if QG_PF > 0
        if ((j & 3) == 0) _mm_prefetch((const char*)(c + j * 16) + QG_PF, _MM_HINT_T0);
#endif
        for (int u = 0; u < unroll; ++u) {
          V16 lo, hi;
          v_u4(c + (j + u) * 16, &lo, &hi);
          const int64_t k = 2 * (j + u);
          for (int m = 0; m < MT; ++m) {
            t[m][2 * u] = v_fma(v_set(xg[m * sx + k]), lo, t[m][2 * u]);
            t[m][2 * u + 1] = v_fma(v_set(xg[m * sx + k + 1]), hi, t[m][2 * u + 1]);
          }
        }
      }
    } else {
      int64_t k = 0;
      for (; k + 2 * unroll <= G; k += 2 * unroll) {
#if QG_PF > 0
        if ((k & 3) == 0) _mm_prefetch((const char*)(c + k * 16) + QG_PF, _MM_HINT_T0);
#endif
        for (int u = 0; u < 2 * unroll; ++u) {
          const V16 w = v_i8(c + (k + u) * 16);
          for (int m = 0; m < MT; ++m) t[m][u] = v_fma(v_set(xg[m * sx + k + u]), w, t[m][u]);
        }
      }
      for (; k < G; ++k) {   /* int8_channel: G = K, any K */
        const V16 w = v_i8(c + k * 16);
        for (int m = 0; m < MT; ++m) t[m][0] = v_fma(v_set(xg[m * sx + k]), w, t[m][0]);
      }
    }
    for (int m = 0; m < MT; ++m) {
      V16 sum = t[m][0];
      for (int u = 1; u < 2 * unroll; ++u) sum = v_add(sum, t[m][u]);
      acc[m] = v_fma(s, sum, acc[m]);
      if (FMT == FMT_INT4) acc[m] = v_fma(v_h16(p + 32), v_set(xs[m * ng + g]), acc[m]);
    }
  }
  for (int m = 0; m < MT; ++m) v_store(out + m * 16, acc[m]);
}

template <int FMT, bool EXACT>
static void tile(int mt, const uint8_t* blk, int64_t G, int64_t ng, const float* x, int64_t sx,
                 const float* xs, float* out) {
  switch (mt) {
#if QG_MT >= 4
    case 4: block_tile<FMT, 4, EXACT>(blk, G, ng, x, sx, xs, out); break;
    case 3: block_tile<FMT, 3, EXACT>(blk, G, ng, x, sx, xs, out); break;
#endif
    case 2: block_tile<FMT, 2, EXACT>(blk, G, ng, x, sx, xs, out); break;
    default: block_tile<FMT, 1, EXACT>(blk, G, ng, x, sx, xs, out); break;
  }
}

static void qgemv_blocks(const float* x, int64_t sx, int64_t M, int64_t K, const uint8_t* w,
                         int fmt, int64_t G, int64_t N, const float* bias, const float* res,
                         int64_t sr, int act, float* y, const float* xs, const uint8_t* bad,
                         int64_t b0, int64_t b1) {
  const int64_t ng = K / G, bb = ng * group_bytes(fmt, G);
  float acc[QG_MT * 16];
  for (int64_t b = b0; b < b1; ++b)
    for (int64_t m0 = 0; m0 < M; m0 += QG_MT) {   /* later tiles reread the block from L1/L2 */
      const int mt = (int)(M - m0 < QG_MT ? M - m0 : QG_MT);
      const uint8_t* blk = w + b * bb;
      const float* xm = x + m0 * sx;
      if (fmt == FMT_INT4) {
        bool exact = false;
        for (int i = 0; i < mt; ++i) exact |= bad[m0 + i] != 0;
        if (exact) tile<FMT_INT4, true>(mt, blk, G, ng, xm, sx, xs + m0 * ng, acc);
        else tile<FMT_INT4, false>(mt, blk, G, ng, xm, sx, xs + m0 * ng, acc);
      } else {
        tile<0, false>(mt, blk, G, ng, xm, sx, xs, acc);
      }
      for (int i = 0; i < mt; ++i)
        for (int64_t r = 0, n = b * 16; r < 16 && n < N; ++r, ++n) {
          const float v = activate(acc[i * 16 + r] + (bias ? bias[n] : 0.0f), act);
          y[(m0 + i) * N + n] = res ? v + res[(m0 + i) * sr + n] : v;
        }
    }
}

/* y [M, N] = act(x @ W^T + bias) (+ res), W the pack of fmt (FMT_INT4 or 0: int8) with groups
   of G along K (G = K per channel); x rows at stride sx, res rows at stride sr */
extern "C" int fxf_qgemv(const float* x, int64_t sx, int64_t M, int64_t K, const uint8_t* w,
                         int fmt, int64_t G, int64_t N, const float* bias, const float* res,
                         int64_t sr, int act, float* y, int nthreads) {
  const int64_t ng = K / G, B = (N + 15) / 16;
  float* xs = NULL;
  uint8_t* bad = NULL;
  if (fmt == FMT_INT4) {   /* per row and group: sum(x_g), shared by all N; non-finite: EXACT */
    xs = (float*)malloc(sizeof(float) * M * ng + M);
    if (!xs) return -1;
    bad = (uint8_t*)(xs + M * ng);
    for (int64_t m = 0; m < M; ++m) {
      bool finite = true;
      for (int64_t g = 0; g < ng; ++g) {
        float sum = 0.0f;
        #pragma omp simd reduction(+ : sum)
        for (int64_t k = 0; k < G; ++k) sum += x[m * sx + g * G + k];
        xs[m * ng + g] = sum;
        finite = finite && isfinite(sum);
      }
      bad[m] = !finite;
    }
  }
  if (nthreads <= 1 || N * K < PARALLEL_MIN_WEIGHTS) {
    qgemv_blocks(x, sx, M, K, w, fmt, G, N, bias, res, sr, act, y, xs, bad, 0, B);
  } else {
    #pragma omp parallel num_threads(nthreads)
    {
      const int64_t t = omp_get_thread_num(), T = omp_get_num_threads(), per = (B + T - 1) / T;
      const int64_t b0 = t * per < B ? t * per : B, b1 = (t + 1) * per < B ? (t + 1) * per : B;
      qgemv_blocks(x, sx, M, K, w, fmt, G, N, bias, res, sr, act, y, xs, bad, b0, b1);
    }
  }
  free(xs);
  return 0;
}

/* out [kc][16]: k = k0 .. k0 + kc of block b's 16 rows as fp32, in the tiled GEMM's panel layout
   (16 output columns, k-major; each k one vector store); values equal to the reference's (see the
   module doc). For int4, k0 and kc are even (a byte holds k = 2j and 2j + 1). */
static void qdequant_chunk(const uint8_t* w, int fmt, int64_t K, int64_t G, int64_t b, int64_t k0,
                           int64_t kc, float* __restrict out) {
  const int64_t ng = K / G, gb = group_bytes(fmt, G), hb = header_bytes(fmt), P = 16;
  for (int64_t k = k0, end; k < k0 + kc; k = end) {
    const int64_t g = k / G, g0 = g * G;
    end = g0 + G < k0 + kc ? g0 + G : k0 + kc;
    const uint8_t* p = w + (b * ng + g) * gb;
    const uint8_t* c = p + hb;
    float* o = out + (g0 - k0) * P;
    const V16 s = v_h16(p);
    if (fmt == FMT_INT4) {
      const V16 off = v_h16(p + 32);
      for (int64_t j = (k - g0) / 2; j < (end - g0) / 2; ++j) {
        V16 lo, hi;
        v_u4(c + j * 16, &lo, &hi);
        v_store(o + 2 * j * P, v_fma(lo, s, off));
        v_store(o + (2 * j + 1) * P, v_fma(hi, s, off));
      }
    } else {
      for (int64_t i = k - g0; i < end - g0; ++i) v_store(o + i * P, v_mul(v_i8(c + i * 16), s));
    }
  }
}

/* The quantized weight as the tiled GEMM's source (kernels/gemm_cpp.py): each thread dequantizes
   a panel chunk into its own buffer right before it multiplies it, so the fp32 weight never
   exists beyond one chunk per thread, and prefill reads a quarter (int8) or an eighth (int4) of
   the fp32 weight's bytes in one parallel region. */
struct QuantPanels {
  static constexpr bool in_place = false, widens = true;
  const uint8_t* w;
  int fmt;
  int64_t K, G;
  void widen(int64_t p, int64_t k0, int64_t kc, float* buf) const {
    qdequant_chunk(w, fmt, K, G, p, k0, kc, buf);
  }
};

/* y [M, N] (row stride ldy) = act(x @ W^T + bias) + res, x [M, K] (row stride lda); bias padded
   to whole blocks of 16 (or null); KC even. 0, or 1 when a thread's buffer could not be allocated */
extern "C" int fxf_qgemm(const float* x, int64_t lda, const uint8_t* w, int fmt, int64_t G,
                          const float* bias, float* y, int64_t ldy, const float* res, int64_t ldr,
                          int64_t M, int64_t K, int64_t N, int act, int64_t KC, int64_t MC,
                          int nthreads) {
  const QuantPanels src{w, fmt, K, G};
  bool done = false;
""" + cpp_act_switch("done = gemm<QuantPanels, {act}>(x, lda, src, bias, y, ldy, res, ldr, M, K, N, KC, MC, nthreads);") + r"""  return done ? 0 : 1;
}
"""
