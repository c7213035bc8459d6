"""The C++ source of the CPU decode-attention kernel (``kernels/decode_attention_cpu.py`` has what
it does, how it was measured and when it runs, and loads and launches its entry points).

One template over the element type ``T`` of q/k/v/out and the element type ``C`` of the caches:
``C = T`` (the cache as the model computed it) or ``C = int8_t`` (``kv_cache_dtype="int8"``,
:mod:`fxforge.irgraph.kv_quant`: codes plus one fp32 scale per cached row). The int8 kernel
quantizes the new rows as it writes them (the rule of ``quantize_rows``, bit for bit: absmax / 127,
``nearbyintf(x / scale)``) and dequantizes on the fly: a key's scale multiplies its score once, a
value's scale its softmax weight once, so the inner loops are a convert and an FMA per code.

The int8 entries are built per ISA variant (``toolchain.ISA_MARCH``, chosen as the quantized
GEMV's are, ``quant_gemv_cpu.choose_isa``: ``FXFORGE_CPU_ISA=avx2`` or ``none`` forces a lower
one): the AVX2 build (the AVX-512 one too) has hand-written 8-lane loops (``vpmovsxbd`` +
``vcvtdq2ps`` + FMA), the portable build the generic templates. ``fxf_decode_q8_isa`` reports
which was compiled. The fp32/bf16/fp16 entries stay ``-march=native`` builds as before.
"""
from __future__ import annotations

import torch

from fxforge.kernels.fused_cpp_math import MATH, PRELUDE

MAX_HEAD_DIM = 256
PARALLEL_MIN_WORK = 1 << 16   # rows x visible keys x (D + Dv) below which one thread is faster
SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
META_LEN = 33   # see decode_attention's comment

SOURCE = PRELUDE + MATH + f"#define MAX_HEAD_DIM {MAX_HEAD_DIM}\n" \
    f"#define PARALLEL_MIN_WORK {PARALLEL_MIN_WORK}\n#define STACK_KEYS 2048\n" + r"""
#include <stdlib.h>
static inline float ld(float x) { return x; }
static inline float ld(uint16_t x) { return bf16_load(x); }
static inline float ld(_Float16 x) { return (float)x; }
static inline float ld(int8_t x) { return (float)x; }
static inline void st(float* p, float x) { *p = x; }
static inline void st(uint16_t* p, float x) { *p = bf16_store(x); }
static inline void st(_Float16* p, float x) { *p = (_Float16)x; }

/* p[j] = q . k_j for j < n, several keys at a time (independent FMA chains): eight for fp32,
   four for other types (whose conversions need registers too; AVX2 has sixteen) */
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

/* acc[0:Dv] = sum_j p[j] v_j */
template <typename T>
static inline void values(const float* p, const T* vb, int64_t stride, int64_t n, int64_t Dv, float* acc) {
  int64_t d = 0;
  constexpr int WIDE = sizeof(T) == 4 ? 64 : 32;  /* accumulators + conversions in 16 registers */
  for (; d + WIDE <= Dv; d += WIDE) weighted_sum<WIDE>(p, vb + d, stride, n, acc + d);
  for (; d + 16 <= Dv; d += 16) weighted_sum<16>(p, vb + d, stride, n, acc + d);
  for (; d < Dv; ++d) weighted_sum<1>(p, vb + d, stride, n, acc + d);
}

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define Q8_ISA 2
static inline __m256 cvt8(__m128i b) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)); }
static inline float hsum(__m256 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
/* int8 keys: four keys at a time, 8 codes a step (overloads the template above) */
static inline void scores(const float* qf, const int8_t* kb, int64_t stride, int64_t n, int64_t D, float* p) {
  const int64_t D8 = D & ~(int64_t)7;
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    const int8_t* k0 = kb + j * stride;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t d = 0; d < D8; d += 8) {
      const __m256 x = _mm256_loadu_ps(qf + d);
      a0 = _mm256_fmadd_ps(x, cvt8(_mm_loadl_epi64((const __m128i*)(k0 + d))), a0);
      a1 = _mm256_fmadd_ps(x, cvt8(_mm_loadl_epi64((const __m128i*)(k0 + stride + d))), a1);
      a2 = _mm256_fmadd_ps(x, cvt8(_mm_loadl_epi64((const __m128i*)(k0 + 2 * stride + d))), a2);
      a3 = _mm256_fmadd_ps(x, cvt8(_mm_loadl_epi64((const __m128i*)(k0 + 3 * stride + d))), a3);
    }
    float s[4] = {hsum(a0), hsum(a1), hsum(a2), hsum(a3)};
    for (int64_t d = D8; d < D; ++d)
      for (int u = 0; u < 4; ++u) s[u] += qf[d] * (float)k0[u * stride + d];
    for (int u = 0; u < 4; ++u) p[j + u] = s[u];
  }
  for (; j < n; ++j) {
    const int8_t* kr = kb + j * stride;
    __m256 a = _mm256_setzero_ps();
    for (int64_t d = 0; d < D8; d += 8)
      a = _mm256_fmadd_ps(_mm256_loadu_ps(qf + d), cvt8(_mm_loadl_epi64((const __m128i*)(kr + d))), a);
    float s = hsum(a);
    for (int64_t d = D8; d < D; ++d) s += qf[d] * (float)kr[d];
    p[j] = s;
  }
}
/* int8 values: 32 accumulators (four registers) per pass over the keys, then 8, then scalars */
static inline void values(const float* p, const int8_t* vb, int64_t stride, int64_t n, int64_t Dv, float* acc) {
  int64_t d = 0;
  for (; d + 32 <= Dv; d += 32) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t j = 0; j < n; ++j) {
      const __m256 w = _mm256_set1_ps(p[j]);
      const __m128i lo = _mm_loadu_si128((const __m128i*)(vb + j * stride + d));
      const __m128i hi = _mm_loadu_si128((const __m128i*)(vb + j * stride + d + 16));
      a0 = _mm256_fmadd_ps(w, cvt8(lo), a0);
      a1 = _mm256_fmadd_ps(w, cvt8(_mm_srli_si128(lo, 8)), a1);
      a2 = _mm256_fmadd_ps(w, cvt8(hi), a2);
      a3 = _mm256_fmadd_ps(w, cvt8(_mm_srli_si128(hi, 8)), a3);
    }
    _mm256_storeu_ps(acc + d, a0); _mm256_storeu_ps(acc + d + 8, a1);
    _mm256_storeu_ps(acc + d + 16, a2); _mm256_storeu_ps(acc + d + 24, a3);
  }
  for (; d + 8 <= Dv; d += 8) {
    __m256 a = _mm256_setzero_ps();
    for (int64_t j = 0; j < n; ++j)
      a = _mm256_fmadd_ps(_mm256_set1_ps(p[j]), cvt8(_mm_loadl_epi64((const __m128i*)(vb + j * stride + d))), a);
    _mm256_storeu_ps(acc + d, a);
  }
  for (; d < Dv; ++d) {
    float a = 0.0f;
    for (int64_t j = 0; j < n; ++j) a += p[j] * (float)vb[j * stride + d];
    acc[d] = a;
  }
}
#else
#define Q8_ISA 0
#endif
extern "C" int fxf_decode_q8_isa(void) { return Q8_ISA; }

/* A new row into its cache slot: as it is, or as int8 codes and a scale (kv_quant.quantize_rows:
   scale = absmax / 127, code = round-half-even(x / scale), an all-zero row scale 0, codes 0). */
template <typename T>
static inline void store_row(const T* x, int64_t n, T* dst, float*) { memcpy(dst, x, n * sizeof(T)); }
template <typename T>
static inline void store_row(const T* x, int64_t n, int8_t* dst, float* scale) {
  float amax = 0.0f;
  for (int64_t d = 0; d < n; ++d) amax = fmaxf(amax, fabsf(ld(x[d])));
  const float s = amax / 127.0f;
  *scale = s;
  for (int64_t d = 0; d < n; ++d) {
    const float c = s > 0.0f ? nearbyintf(ld(x[d]) / s) : 0.0f;
    dst[d] = (int8_t)fminf(fmaxf(c, -127.0f), 127.0f);
  }
}

/* One (batch, head, new position) row: softmax(q k^T * scale) v over cache slots 0..L+i; with
   int8 caches (ks, vs: their scales) p_j = s_kj (q . code_j), and the weights p_j s_vj. */
template <typename T, typename C>
static void attend_row(const int64_t* m, int64_t r, int64_t L, const T* q, const C* kc,
                       const C* vc, const float* ks, const float* vs, T* out, float scale) {
  const int64_t H = m[1], Hkv = m[2], NT = m[3], D = m[4], Dv = m[5];
  const int64_t *sq = m + 7, *skc = m + 16, *svc = m + 19, *so = m + 22, *sks = m + 27, *svs = m + 30;
  const int64_t i = r % NT, h = (r / NT) % H, b = r / (NT * H), hk = h / (H / Hkv), n = L + i + 1;
  const T* qr = q + b * sq[0] + h * sq[1] + i * sq[2];
  const C* kb = kc + b * skc[0] + hk * skc[1];
  const C* vb = vc + b * svc[0] + hk * svc[1];
  float qf[MAX_HEAD_DIM], acc[MAX_HEAD_DIM], small[STACK_KEYS];
  float* p = n <= STACK_KEYS ? small : (float*)malloc(n * sizeof(float));
  for (int64_t d = 0; d < D; ++d) qf[d] = ld(qr[d]) * scale;
  scores(qf, kb, skc[2], n, D, p);
  if (ks) {
    const float* kr = ks + b * sks[0] + hk * sks[1];
    for (int64_t j = 0; j < n; ++j) p[j] *= kr[j * sks[2]];
  }
  float top = -INFINITY, total = 0.0f;
  for (int64_t j = 0; j < n; ++j) top = p[j] > top ? p[j] : top;
  #pragma omp simd reduction(+:total)
  for (int64_t j = 0; j < n; ++j) { const float e = fxf_exp(p[j] - top); p[j] = e; total += e; }
  if (vs) {
    const float* vr = vs + b * svs[0] + hk * svs[1];
    for (int64_t j = 0; j < n; ++j) p[j] *= vr[j * svs[2]];
  }
  values(p, vb, svc[2], n, Dv, acc);
  if (p != small) free(p);
  T* o = out + b * so[0] + h * so[1] + i * so[2];
  const float inv = 1.0f / total;
  for (int64_t e = 0; e < Dv; ++e) st(o + e, acc[e] * inv);
}

/* meta: B, H, Hkv, T, D, Dv, Lmax, then the (batch, head, position) strides of q, k, v,
   k_cache, v_cache and out (last dims have stride 1), then W, S: a sliding window of W slots
   past S sinks (irgraph/window_ops.py; W = 0: the plain cache), then those of the scales
   (int8 caches; unread otherwise). Plain: position L + i goes to slot L + i and row i sees
   slots 0..L+i. Window (one new position, T = 1): position L goes to its slot (L below S, else
   the ring slot S + (L - S) % W), then the row sees every filled slot: min(L + 1, S + W) of
   them, all within its window (softmax does not care in which order).
   Returns 0, or -1 if L < 0, L + T > Lmax (plain) or T != 1 (window). */
template <typename T, typename C>
static int decode_attention(const int64_t* m, const T* q, const T* k, const T* v, C* kc, C* vc,
                            const int64_t* pos, T* out, float scale, int nthreads, float* ks,
                            float* vs) {
  const int64_t B = m[0], H = m[1], Hkv = m[2], NT = m[3], D = m[4], Dv = m[5], Lmax = m[6];
  const int64_t *sk = m + 10, *sv = m + 13, *skc = m + 16, *svc = m + 19, W = m[25], S = m[26];
  const int64_t *sks = m + 27, *svs = m + 30;
  const int64_t L = pos[0];
  if (L < 0 || (W == 0 && L + NT > Lmax) || (W > 0 && NT != 1)) return -1;
  const int64_t first = W == 0 || L < S ? L : S + (L - S) % W;   /* the first new slot */
  const int64_t seen = W == 0 ? L : (L + 1 < S + W ? L + 1 : S + W) - 1;   /* rows see seen+i+1 */
  for (int64_t b = 0; b < B; ++b)            /* the new positions first: every row reads them */
    for (int64_t h = 0; h < Hkv; ++h)
      for (int64_t i = 0; i < NT; ++i) {
        const int64_t slot = first + i;
        store_row(k + b * sk[0] + h * sk[1] + i * sk[2], D, kc + b * skc[0] + h * skc[1] + slot * skc[2],
                  ks ? ks + b * sks[0] + h * sks[1] + slot * sks[2] : nullptr);
        store_row(v + b * sv[0] + h * sv[1] + i * sv[2], Dv, vc + b * svc[0] + h * svc[1] + slot * svc[2],
                  vs ? vs + b * svs[0] + h * svs[1] + slot * svs[2] : nullptr);
      }
  const int64_t rows = B * H * NT;
  if (nthreads > 1 && rows > 1 && rows * (seen + NT) * (D + Dv) >= PARALLEL_MIN_WORK) {
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t r = 0; r < rows; ++r) attend_row(m, r, seen, q, kc, vc, ks, vs, out, scale);
  } else {
    for (int64_t r = 0; r < rows; ++r) attend_row(m, r, seen, q, kc, vc, ks, vs, out, scale);
  }
  return 0;
}

#define ENTRY(NAME, T, C) extern "C" int NAME(const int64_t* m, const T* q, const T* k, \
    const T* v, C* kc, C* vc, const int64_t* pos, T* out, float scale, int nthreads, float* ks, \
    float* vs) { return decode_attention<T, C>(m, q, k, v, kc, vc, pos, out, scale, nthreads, ks, vs); }
ENTRY(fxf_decode_attention_f32, float, float)
ENTRY(fxf_decode_attention_bf16, uint16_t, uint16_t)
ENTRY(fxf_decode_attention_f16, _Float16, _Float16)
ENTRY(fxf_decode_attention_f32_q8, float, int8_t)
ENTRY(fxf_decode_attention_bf16_q8, uint16_t, int8_t)
ENTRY(fxf_decode_attention_f16_q8, _Float16, int8_t)
"""
