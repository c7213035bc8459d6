"""The C every generated CPU kernel starts with: ``PRELUDE`` (headers, bf16/fp16 conversions
and rounding, column clamping) and the math block, exp, log, tanh, erf and sigmoid written
branch-free so GCC vectorizes the row loops (libm's scalar versions do not vectorize).
"""

PRELUDE = r"""#include <stdint.h>
#include <string.h>
#include <math.h>
static inline float bf16_load(uint16_t u) { uint32_t b = (uint32_t)u << 16; float f; memcpy(&f, &b, 4); return f; }
static inline uint16_t bf16_store(float f) {
  uint32_t b; memcpy(&b, &f, 4);
  uint32_t rounded = (b + 0x7fffu + ((b >> 16) & 1u)) >> 16;
  return (b & 0x7fffffffu) > 0x7f800000u ? (uint16_t)0x7fc0 : (uint16_t)rounded;
}
static inline float bf16_round(float f) { return bf16_load(bf16_store(f)); }
static inline float f16_round(float f) { return (float)(_Float16)f; }
static inline int64_t fxf_col(int64_t c, int64_t n) { return c < 0 ? 0 : (c >= n ? n - 1 : c); }
"""


MATH = r"""/* Branch-free float math (selects, fma, bit casts) that GCC vectorizes inside `omp simd`
   loops (given -fno-trapping-math); max errors vs float64 over the float range are in the
   tests (exp 1 ulp, log 0.8, tanh 1.3, erf 1.6, sigmoid 2). Zero and denormal results are made
   without denormal intermediates where that is cheap (exp of a masked -inf). */
#define FXF_INLINE static inline __attribute__((always_inline))
FXF_INLINE uint32_t fxf_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
FXF_INLINE float fxf_float(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
FXF_INLINE float fxf_copysign(float mag, float sign) {
  return fxf_float((fxf_bits(mag) & 0x7fffffffu) | (fxf_bits(sign) & 0x80000000u));
}
FXF_INLINE float fxf_pow2i(int32_t k) { return fxf_float((uint32_t)(k + 127) << 23); }
#define FXF_MAGIC 12582912.0f   /* 1.5 * 2^23: adding it rounds to an integer */
/* x = k ln2 + r, |r| <= ln2/2 (x already clamped to [-104, 89]) */
FXF_INLINE float fxf_exp_reduce(float x, int32_t* k) {
  const float shifted = fmaf(x, 1.44269504089f, FXF_MAGIC), kf = shifted - FXF_MAGIC;
  *k = (int32_t)(fxf_bits(shifted) - fxf_bits(FXF_MAGIC));
  return fmaf(kf, -1.42860676533018e-6f, fmaf(kf, -0.693145751953125f, x));
}
FXF_INLINE float fxf_expm1_poly(float r) {   /* (exp(r) - 1 - r) / r^2 */
  float p = 1.98527617612853646e-4f;
  p = fmaf(p, r, 1.39304355252534151e-3f);
  p = fmaf(p, r, 8.33336077630519867e-3f);
  p = fmaf(p, r, 4.16664853692054749e-2f);
  p = fmaf(p, r, 1.66666671633720398e-1f);
  return fmaf(p, r, 0.5f);
}
/* y * 2^k in two steps, so that a denormal result is rounded once */
FXF_INLINE float fxf_scale(float y, int32_t k) {
  const int32_t k1 = k >> 1;
  return (y * fxf_pow2i(k1)) * fxf_pow2i(k - k1);
}
FXF_INLINE float fxf_exp(float x) {
  const bool zero = x < -104.0f;                       /* exp < 2^-150: 0 without underflow */
  float xc = zero ? 0.0f : x;
  xc = xc > 89.0f ? 89.0f : xc;                        /* a NaN goes through as a NaN */
  int32_t k;
  const float r = fxf_exp_reduce(xc, &k);
  return zero ? 0.0f : fxf_scale(fmaf(r * r, fxf_expm1_poly(r), r) + 1.0f, k);
}
FXF_INLINE float fxf_log(float x) {
  const bool tiny = x < 1.17549435e-38f;
  const uint32_t ix = fxf_bits(tiny ? x * 8388608.0f : x);
  const int32_t t = (int32_t)(ix - 0x3f3504f3u);          /* mantissa in [sqrt(1/2), sqrt(2)) */
  const float kf = (float)((t >> 23) - (tiny ? 23 : 0));
  const float f = fxf_float(ix - ((uint32_t)t & 0xff800000u)) - 1.0f;
  const float z = f * f;
  float p = 7.0376836292e-2f;
  p = fmaf(p, f, -1.1514610310e-1f);
  p = fmaf(p, f, 1.1676998740e-1f);
  p = fmaf(p, f, -1.2420140846e-1f);
  p = fmaf(p, f, 1.4249322787e-1f);
  p = fmaf(p, f, -1.6668057665e-1f);
  p = fmaf(p, f, 2.0000714765e-1f);
  p = fmaf(p, f, -2.4999993993e-1f);
  p = fmaf(p, f, 3.3333331174e-1f);
  float y = fmaf(kf, -2.12194440e-4f, p * f * z);
  y = fmaf(-0.5f, z, y);
  float res = fmaf(kf, 0.693359375f, f + y);
  res = x == INFINITY ? x : res;
  res = x == 0.0f ? -INFINITY : res;
  return (x < 0.0f || x != x) ? NAN : res;
}
FXF_INLINE float fxf_tanh(float x) {
  const float a = fabsf(x), z = x * x;
  float p = -5.70498872745e-3f;
  p = fmaf(p, z, 2.06390887954e-2f);
  p = fmaf(p, z, -5.37397155531e-2f);
  p = fmaf(p, z, 1.33314422036e-1f);
  p = fmaf(p, z, -3.33332819422e-1f);
  const float small = fmaf(p * z, x, x);
  const float big = 1.0f - 2.0f / (fxf_exp(2.0f * a) + 1.0f);
  return a < 0.625f ? small : fxf_copysign(big, x);
}
FXF_INLINE float fxf_erf(float x) {
  /* |x| < 1.5: x + x P(x^2); 1.5 <= |x| < 3.93: 1 - Q(|x|), Q ~ erfc; beyond: 1. The
     coefficients are fitted with each rounded to float in turn. */
  const float z = x * x;
  float p = 6.040411904e-07f;
  p = fmaf(p, z, -1.118344153e-05f);
  p = fmaf(p, z, 1.125778290e-04f);
  p = fmaf(p, z, -8.444993873e-04f);
  p = fmaf(p, z, 5.215929821e-03f);
  p = fmaf(p, z, -2.686259709e-02f);
  p = fmaf(p, z, 1.128371134e-01f);
  p = fmaf(p, z, -3.761263192e-01f);
  p = fmaf(p, z, 1.283791661e-01f);
  const float small = fmaf(x, p, x);
  const float a = fabsf(x), ac = a > 3.93f ? 3.93f : a, u = ac - 2.715f;   /* keeps NaN */
  float q = 5.255858468e-06f;
  q = fmaf(q, u, 1.875248813e-06f);
  q = fmaf(q, u, -6.580009358e-05f);
  q = fmaf(q, u, 1.146088616e-04f);
  q = fmaf(q, u, 6.797395326e-05f);
  q = fmaf(q, u, -6.872821832e-04f);
  q = fmaf(q, u, 1.816045260e-03f);
  q = fmaf(q, u, -3.112369450e-03f);
  q = fmaf(q, u, 3.772413125e-03f);
  q = fmaf(q, u, -3.253239207e-03f);
  q = fmaf(q, u, 1.927209785e-03f);
  q = fmaf(q, u, -7.097823545e-04f);
  q = fmaf(q, u, 1.232410577e-04f);
  const float big = fxf_float(fxf_bits(1.0f - q) | (fxf_bits(x) & 0x80000000u));
  return a < 1.5f ? small : big;
}
/* sigmoid: ATen's 1 / (1 + exp(-x)), but below -80, where 1 + exp(x) rounds to 1 and
   exp(-x) would overflow, exp(x) itself: the denormal tail is kept. */
FXF_INLINE float fxf_sigmoid(float x) {
  const bool tail = x < -80.0f;
  const float e = fxf_exp(tail ? x : -x);
  return tail ? e : 1.0f / (1.0f + e);
}
"""
