"""The C++ source of the W8A8 linear (``kernels/w8a8_cpu.py`` builds and calls it; the weight layout
it reads is written by ``w8a8_cpu.pack``).

One call does the whole op: each row of x is multiplied by the smoothing vector and quantized to
int8 with its own scale (``max|row| / 127``, codes ``round(row * 127 / max|row|)``: the reference
``irgraph.weight_format.w8a8_quantize_rows``, bit for bit), then int8 x int8 dot products
accumulate in int32 (exact), then ``y = act((acc * scale_w[n]) * scale_x[m] + bias) + res``. A row
holding a NaN or an inf gets scale NaN and codes 0, so its outputs are NaN.

Layout: the codes of output columns 16b..16b+15 form block b; within a block, for each group of 4
input channels k4, the 16 columns' 4 codes side by side ([K/4][16][4] int8, 64 bytes a k4), K
padded to a multiple of 4 with zero codes, N to 16 with zero columns. That is the operand layout
of ``vpdpbusd``: a 32-bit lane per column, summing 4 consecutive k.

Three builds (``toolchain.ISA_MARCH``), reported by ``fxf_w8a8_isa``:

* AVX-512-VNNI (2): ``vpdpbusd`` multiplies *unsigned* bytes by signed ones, so the activation
  codes are stored biased (``q + 128``, 1..255) and the bias is taken back exactly with the
  column sums of the weight codes (``acc = dot(q + 128, w) - 128 * sum(w)``); vpdpbusd itself
  does not saturate.
* AVX2 (1): ``vpmaddubsw`` (u8 x s8 pairs -> i16, *saturating*) then ``vpmaddwd`` by ones. With
  biased u8 codes a pair reaches 2 * 255 * 127 > 32767, so instead the absolute value of the
  activation code is the unsigned operand and its sign moves onto the weight (``vpsignb``):
  |q| <= 127 and |w| <= 127, so a pair is at most 2 * 127 * 127 = 32258: no saturation, exact.
  (The weights are never -128: ``vpsignb`` could not negate that.)
* portable (0): scalar int32 loops the compiler vectorizes as it can.

The GEMM (any M: decode's one row is the same code with a one-row tile) walks output chunks of
NBT blocks; for each chunk the K range in pieces of KC4 k4 (the chunk's weight piece, NBT x KC4 x
64 bytes, stays in L1 while every row tile of x passes over it), partial sums kept in an int32
scratch per work item. Work items are (chunk, range of rows) so that a narrow N still spreads
over the threads.
"""
from fxforge.kernels.activations import ACT_OF_CPP, cpp_act_switch
from fxforge.kernels.fused_cpp_math import MATH, PRELUDE

# k4 steps a weight piece spans (NBT x KC4 x 64 bytes: 16 KiB at NBT = 4, half of a 32 KiB L1D)
KC4 = 64


def source(parallel_min_weights: int) -> str:
    return ("#include <omp.h>\n#include <immintrin.h>\n#include <stdlib.h>\n#include <string.h>\n"
            "#include <math.h>\n#include <float.h>\n" + _NO_CONTRACT + PRELUDE + MATH + ACT_OF_CPP
            + _ACT_ROW + "static void activate_row(float* y, int64_t n, int act) {\n"
            + cpp_act_switch("act_row<{act}>(y, n);") + "}\n" + _MICRO + _KERNEL) \
        .replace("PARALLEL_MIN_WEIGHTS", str(parallel_min_weights)).replace("KC4_STEPS", str(KC4))


# The epilogue's (acc * sw) * sx + bias must round as the reference's separate ATen ops do: no
# fused multiply-add contracted out of it (GNU C++ contracts by default).
_NO_CONTRACT = r"""
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif
"""

_ACT_ROW = r"""
template <int ACT> static void act_row(float* y, int64_t n) {
  #pragma omp simd
  for (int64_t c = 0; c < n; ++c) y[c] = act_of<ACT>(y[c]);
}
"""

# micro<MT, NBT>: acc[MT rows][NBT * 16 columns] (+)= the rows' codes (xq, rows at stride sxq
# bytes) times the NBT blocks' codes (w: block j at w + j * bstride) over k4 = 0..k4n
_MICRO = r"""
static inline int32_t load4(const uint8_t* p) { int32_t v; memcpy(&v, p, 4); return v; }

#if defined(__AVX512F__) && defined(__AVX512VNNI__)
#define W8_ISA 2
#define W8_MT 4
#define W8_NBT 4
#define W8_XBIAS 128
template <int MT, int NBT>
static void micro(const uint8_t* xq, int64_t sxq, const int8_t* w, int64_t bstride, int64_t k4n,
                  int32_t* acc, int64_t sacc, bool first) {
  __m512i a[MT][NBT];
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NBT; ++j)
      a[i][j] = first ? _mm512_setzero_si512() : _mm512_loadu_si512(acc + i * sacc + j * 16);
  for (int64_t k4 = 0; k4 < k4n; ++k4) {
    __m512i wv[NBT];
    for (int j = 0; j < NBT; ++j) wv[j] = _mm512_loadu_si512(w + j * bstride + k4 * 64);
    for (int i = 0; i < MT; ++i) {
      const __m512i xb = _mm512_set1_epi32(load4(xq + i * sxq + 4 * k4));
      for (int j = 0; j < NBT; ++j) a[i][j] = _mm512_dpbusd_epi32(a[i][j], xb, wv[j]);
    }
  }
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NBT; ++j) _mm512_storeu_si512(acc + i * sacc + j * 16, a[i][j]);
}
#elif defined(__AVX2__)
#define W8_ISA 1
#define W8_MT 2
#define W8_NBT 2
#define W8_XBIAS 0
template <int MT, int NBT>
static void micro(const uint8_t* xq, int64_t sxq, const int8_t* w, int64_t bstride, int64_t k4n,
                  int32_t* acc, int64_t sacc, bool first) {
  __m256i a[MT][2 * NBT];
  const __m256i ones = _mm256_set1_epi16(1);
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < 2 * NBT; ++j)
      a[i][j] = first ? _mm256_setzero_si256()
                      : _mm256_loadu_si256((const __m256i*)(acc + i * sacc + j * 8));
  for (int64_t k4 = 0; k4 < k4n; ++k4) {
    __m256i wv[2 * NBT];
    for (int j = 0; j < NBT; ++j) {
      wv[2 * j] = _mm256_loadu_si256((const __m256i*)(w + j * bstride + k4 * 64));
      wv[2 * j + 1] = _mm256_loadu_si256((const __m256i*)(w + j * bstride + k4 * 64 + 32));
    }
    for (int i = 0; i < MT; ++i) {
      const __m256i xb = _mm256_set1_epi32(load4(xq + i * sxq + 4 * k4));
      const __m256i ax = _mm256_abs_epi8(xb);
      for (int j = 0; j < 2 * NBT; ++j) {
        const __m256i pairs = _mm256_maddubs_epi16(ax, _mm256_sign_epi8(wv[j], xb));
        a[i][j] = _mm256_add_epi32(a[i][j], _mm256_madd_epi16(pairs, ones));
      }
    }
  }
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < 2 * NBT; ++j) _mm256_storeu_si256((__m256i*)(acc + i * sacc + j * 8), a[i][j]);
}
#else
#define W8_ISA 0
#define W8_MT 2
#define W8_NBT 2
#define W8_XBIAS 0
template <int MT, int NBT>
static void micro(const uint8_t* xq, int64_t sxq, const int8_t* w, int64_t bstride, int64_t k4n,
                  int32_t* acc, int64_t sacc, bool first) {
  for (int i = 0; i < MT; ++i) {
    int32_t* out = acc + i * sacc;
    if (first) memset(out, 0, sizeof(int32_t) * NBT * 16);
    const int8_t* x = (const int8_t*)(xq + i * sxq);
    for (int j = 0; j < NBT; ++j)
      for (int64_t k4 = 0; k4 < k4n; ++k4) {
        const int8_t* wp = w + j * bstride + k4 * 64;
        const int32_t x0 = x[4 * k4], x1 = x[4 * k4 + 1], x2 = x[4 * k4 + 2], x3 = x[4 * k4 + 3];
        for (int c = 0; c < 16; ++c)
          out[j * 16 + c] += x0 * wp[4 * c] + x1 * wp[4 * c + 1] + x2 * wp[4 * c + 2] + x3 * wp[4 * c + 3];
      }
  }
}
#endif
"""

_KERNEL = r"""
extern "C" int fxf_w8a8_isa(void) { return W8_ISA; }

/* one row: codes (+ W8_XBIAS) into q[0..Kp), its scale into *scale (the module doc's rule) */
static void quantize_row(const float* x, const float* smooth, int64_t K, int64_t Kp, uint8_t* q,
                         float* scale) {
  float amax = 0.0f, probe = 0.0f;   /* probe: NaN iff some value is NaN or inf (v * 0) */
  #pragma omp simd reduction(max : amax) reduction(+ : probe)
  for (int64_t k = 0; k < K; ++k) {
    const float v = x[k] * smooth[k], a = fabsf(v);
    probe += v * 0.0f;
    amax = a > amax ? a : amax;
  }
  if (probe != 0.0f) {
    memset(q, W8_XBIAS, Kp);
    *scale = NAN;
    return;
  }
  const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
  #pragma omp simd
  for (int64_t k = 0; k < K; ++k) {
    float r = nearbyintf((x[k] * smooth[k]) * inv);
    r = r > 127.0f ? 127.0f : r < -127.0f ? -127.0f : r;
    q[k] = (uint8_t)((int)r + W8_XBIAS);
  }
  memset(q + K, W8_XBIAS, Kp - K);   /* padding: times zero weight codes */
  *scale = amax / 127.0f;
}

/* rows [m0, m0 + mt) x blocks [b, b + nbt) of acc, dispatched to the micro-kernel's templates */
template <int NBT>
static void micro_rows(int mt, const uint8_t* xq, int64_t sxq, const int8_t* w, int64_t bstride,
                       int64_t k4n, int32_t* acc, int64_t sacc, bool first) {
  switch (mt) {
#if W8_MT >= 4
    case 4: micro<4, NBT>(xq, sxq, w, bstride, k4n, acc, sacc, first); break;
    case 3: micro<3, NBT>(xq, sxq, w, bstride, k4n, acc, sacc, first); break;
#endif
    case 2: micro<2, NBT>(xq, sxq, w, bstride, k4n, acc, sacc, first); break;
    default: micro<1, NBT>(xq, sxq, w, bstride, k4n, acc, sacc, first); break;
  }
}

static void micro_tile(int mt, int nbt, const uint8_t* xq, int64_t sxq, const int8_t* w,
                       int64_t bstride, int64_t k4n, int32_t* acc, int64_t sacc, bool first) {
  switch (nbt) {
#if W8_NBT >= 4
    case 4: micro_rows<4>(mt, xq, sxq, w, bstride, k4n, acc, sacc, first); break;
    case 3: micro_rows<3>(mt, xq, sxq, w, bstride, k4n, acc, sacc, first); break;
#endif
    case 2: micro_rows<2>(mt, xq, sxq, w, bstride, k4n, acc, sacc, first); break;
    default: micro_rows<1>(mt, xq, sxq, w, bstride, k4n, acc, sacc, first); break;
  }
}

struct W8Args {
  const uint8_t* xq; int64_t Kp; const float* sx; const int8_t* w; const int32_t* colsum;
  const float* sw; int64_t N; const float* bias; const float* res; int64_t sr; int act; float* y;
};

/* rows [m0, m1) x blocks [b0, b0 + nbt): int32 sums in acc (rows x nbt*16), then the epilogue */
static void work_item(const W8Args& A, int64_t m0, int64_t m1, int64_t b0, int nbt, int32_t* acc) {
  const int64_t K4 = A.Kp / 4, bstride = K4 * 64, sacc = (int64_t)nbt * 16;
  for (int64_t kc = 0; kc < K4; kc += KC4_STEPS) {
    const int64_t k4n = K4 - kc < KC4_STEPS ? K4 - kc : KC4_STEPS;
    for (int64_t m = m0; m < m1; m += W8_MT) {
      const int mt = (int)(m1 - m < W8_MT ? m1 - m : W8_MT);
      micro_tile(mt, nbt, A.xq + m * A.Kp + 4 * kc, A.Kp, A.w + b0 * bstride + kc * 64, bstride,
                 k4n, acc + (m - m0) * sacc, sacc, kc == 0);
    }
  }
  const int64_t n0 = b0 * 16, cn = A.N - n0 < sacc ? A.N - n0 : sacc;
  for (int64_t m = m0; m < m1; ++m) {   /* the epilogue, a row's chunk at a time (vectorized) */
    const int32_t* a = acc + (m - m0) * sacc;
    float* y = A.y + m * A.N + n0;
    const float sx = A.sx[m];
    #pragma omp simd
    for (int64_t c = 0; c < cn; ++c)
      y[c] = ((float)(a[c] - W8_XBIAS * A.colsum[n0 + c]) * A.sw[n0 + c]) * sx;
    if (A.bias) {
      #pragma omp simd
      for (int64_t c = 0; c < cn; ++c) y[c] = y[c] + A.bias[n0 + c];
    }
    if (A.act) activate_row(y, cn, A.act);
    if (A.res) {
      const float* r = A.res + m * A.sr + n0;
      #pragma omp simd
      for (int64_t c = 0; c < cn; ++c) y[c] = y[c] + r[c];
    }
  }
}

/* y [M, N] = act(quantized(x * smooth) . W + bias) (+ res); x rows at stride sx_stride, res at sr;
   w: the pack ([N/16][K/4][16][4]), colsum: each column's code sum, sw: fp32 column scales.
   Returns -1 if the scratch cannot be allocated. */
extern "C" int fxf_w8a8_linear(const float* x, int64_t sx_stride, int64_t M, int64_t K,
                               const float* smooth, const int8_t* w, const int32_t* colsum,
                               const float* sw, int64_t N, const float* bias, const float* res,
                               int64_t sr, int act, float* y, int nthreads) {
  const int64_t Kp = (K + 3) / 4 * 4, B = (N + 15) / 16, chunks = (B + W8_NBT - 1) / W8_NBT;
  const int64_t code_bytes = (M * Kp + 63) / 64 * 64;   /* the row scales after, aligned */
  uint8_t* xq = (uint8_t*)malloc(code_bytes + sizeof(float) * M);
  if (!xq) return -1;
  float* sxs = (float*)(xq + code_bytes);
  const int T = nthreads <= 1 || M * N * K < PARALLEL_MIN_WEIGHTS ? 1 : nthreads;
  /* rows split too when the chunks alone are too few to keep T threads busy */
  int64_t parts = chunks >= 2 * T ? 1 : (2 * T + chunks - 1) / chunks;
  const int64_t max_parts = (M + W8_MT - 1) / W8_MT;
  parts = parts < max_parts ? parts : max_parts;
  const int64_t rows_per = (M + parts - 1) / parts;
  int failed = 0;
  #pragma omp parallel num_threads(T)
  {
    #pragma omp for schedule(static)
    for (int64_t m = 0; m < M; ++m) quantize_row(x + m * sx_stride, smooth, K, Kp, xq + m * Kp, sxs + m);
    W8Args A = {xq, Kp, sxs, w, colsum, sw, N, bias, res, sr, act, y};
    int32_t* acc = (int32_t*)malloc(sizeof(int32_t) * rows_per * W8_NBT * 16);
    if (!acc) {
      #pragma omp atomic write
      failed = 1;
    }
    #pragma omp for schedule(static)
    for (int64_t item = 0; item < chunks * parts; ++item) {
      if (!acc) continue;
      const int64_t chunk = item / parts, m0 = item % parts * rows_per;
      const int64_t m1 = m0 + rows_per < M ? m0 + rows_per : M;
      const int64_t b0 = chunk * W8_NBT;
      const int nbt = (int)(B - b0 < W8_NBT ? B - b0 : W8_NBT);
      if (m0 < m1) work_item(A, m0, m1, b0, nbt, acc);
    }
    free(acc);
  }
  free(xq);
  return failed ? -1 : 0;
}

/* the activation quantization alone (the same function the linear runs): codes as int8 (the
   W8_XBIAS taken off again), scales; for tests of bit-exactness against the reference */
extern "C" int fxf_w8a8_quantize(const float* x, int64_t M, int64_t K, const float* smooth,
                                 int8_t* codes, float* scales) {
  const int64_t Kp = (K + 3) / 4 * 4;
  uint8_t* row = (uint8_t*)malloc(Kp);
  if (!row) return -1;
  for (int64_t m = 0; m < M; ++m) {
    quantize_row(x + m * K, smooth, K, Kp, row, scales + m);
    for (int64_t k = 0; k < K; ++k) codes[m * K + k] = (int8_t)((int)row[k] - W8_XBIAS);
  }
  free(row);
  return 0;
}
"""
