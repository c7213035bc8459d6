"""The C++ pieces both CPU prefill attention kernels are made of (``attention_cpp.py``'s tiled
kernel and ``sparse_attention_cpp.py``'s block-sparse one): key and value packing, the register
tiles of scores and of the weighted sum of values, and the exact fp32 softmax of a score row.
Source text only; each kernel module prepends the math prelude and builds its own library."""

TILES = r"""
#define KW 16          /* keys per score tile */
#define VW 16          /* value columns per output tile */

static inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

/* kt[d * np + j] = k_j[d] for j < n, and 0 for n <= j < np */
static void pack_keys(const float* kb, int64_t stride, int64_t n, int64_t np, int64_t D, float* kt) {
  for (int64_t d = 0; d < D; ++d) {
    float* row = kt + d * np;
    for (int64_t j = 0; j < n; ++j) row[j] = kb[j * stride + d];
    for (int64_t j = n; j < np; ++j) row[j] = 0.0f;
  }
}

/* vp[j * Dv + c] = v_j[c]: the values of one head in contiguous rows (a strided view of a
   fused projection puts each row on another page, and the weighted sum reads every row) */
static void pack_values(const float* vb, int64_t stride, int64_t n, int64_t Dv, float* vp) {
  for (int64_t j = 0; j < n; ++j) memcpy(vp + j * Dv, vb + j * stride, Dv * sizeof(float));
}

/* p[r][j] = qs_r . k_j for R rows and j < n (a multiple of KW), KW keys at a time; kt has rows
   of kstride floats, p rows of np */
template <int R>
static inline void score_tile(const float* qs, int64_t D, const float* kt, int64_t kstride,
                              int64_t n, float* p, int64_t np) {
  for (int64_t j0 = 0; j0 < n; j0 += KW) {
    float acc[R][KW];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < KW; ++c) acc[r][c] = 0.0f;
    for (int64_t d = 0; d < D; ++d) {
      const float* kr = kt + d * kstride + j0;
      for (int r = 0; r < R; ++r) {
        const float x = qs[r * D + d];
        #pragma omp simd
        for (int c = 0; c < KW; ++c) acc[r][c] += x * kr[c];
      }
    }
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < KW; ++c) p[r * np + j0 + c] = acc[r][c];
  }
}

/* o_r[0:W] = inv_r * sum_{j < n} p[r][j] v_j[0:W] for R rows */
template <int R, int W>
static inline void value_tile(const float* p, int64_t np, const float* vb, int64_t stride,
                              int64_t n, const float* inv, float* const* o) {
  float acc[R][W];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < W; ++c) acc[r][c] = 0.0f;
  for (int64_t j = 0; j < n; ++j) {
    const float* vr = vb + j * stride;
    for (int r = 0; r < R; ++r) {
      const float x = p[r * np + j];
      #pragma omp simd
      for (int c = 0; c < W; ++c) acc[r][c] += x * vr[c];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < W; ++c) o[r][c] = acc[r][c] * inv[r];
}

/* exp(x) for x <= 0 (a softmax's shifted scores), with one select instead of fxf_exp's
   overflow and denormal handling: results below 2^-125 become 0 (their weight is below any
   fp32 rounding of a sum that includes exp(0) = 1), -inf and NaN-free masked scores give 0. */
static inline float exp_nonpositive(float x) {
  const bool tiny = x < -86.0f;
  int32_t k;
  const float r = fxf_exp_reduce(tiny ? 0.0f : x, &k);
  const float y = fmaf(r * r, fxf_expm1_poly(r), r) + 1.0f;
  return tiny ? 0.0f : y * fxf_pow2i(k);
}

/* Softmax of row p[0:n] in place over its first `visible` entries (plus the mask row, if any);
   the rest are zeroed. Returns 1 / sum, or 0 for a row with nothing visible (its output is 0).
   The max runs in eight lanes (GCC vectorizes neither a fmaxf nor a select reduction). */
static inline float softmax_row(float* p, int64_t visible, int64_t n, const float* mask) {
  if (mask) {
    #pragma omp simd
    for (int64_t j = 0; j < visible; ++j) p[j] += mask[j];
  }
  float lanes[8];
  for (int l = 0; l < 8; ++l) lanes[l] = -INFINITY;
  int64_t j = 0;
  for (; j + 8 <= visible; j += 8)
    for (int l = 0; l < 8; ++l) lanes[l] = p[j + l] > lanes[l] ? p[j + l] : lanes[l];
  float top = -INFINITY;
  for (int l = 0; l < 8; ++l) top = lanes[l] > top ? lanes[l] : top;
  for (; j < visible; ++j) top = p[j] > top ? p[j] : top;
  if (top == -INFINITY) {             /* nothing visible (a NaN score still makes a NaN row) */
    int nan = 0;
    for (j = 0; j < visible; ++j) nan |= p[j] != p[j];
    if (!nan) {
      for (j = 0; j < n; ++j) p[j] = 0.0f;
      return 0.0f;
    }
  }
  float total = 0.0f;
  #pragma omp simd reduction(+:total)
  for (j = 0; j < visible; ++j) { const float e = exp_nonpositive(p[j] - top); p[j] = e; total += e; }
  for (j = visible; j < n; ++j) p[j] = 0.0f;
  return 1.0f / total;
}
"""
