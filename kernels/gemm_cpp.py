"""The C++ core of the tiled GEMM (``kernels/gemm_cpu.py`` documents the method and builds it):
the MR_MAX x 16 micro-kernel (6 or 12 rows), the fused epilogue and the blocked, threaded
driver, written once and templated on where the weight's panels come from: packed fp32 or bf16
panels (``Panels``), or the quantized weights dequantized a panel chunk at a time inside the
driver (``kernels/quant_gemv_cpp.py``). A source includes PRELUDE, MATH and ACT_OF_CPP before it."""

CORE = r"""
/* MR_MAX: rows of the micro-kernel's tile. Its MR x 16 accumulators, two weight vectors and a
   broadcast take 2*MR + 3 vector registers: 15 of AVX2's 16 at 6 rows, 27 of AVX-512VL's 32 at
   12. Twelve rows let a speculative verify step (k + 1 <= 12 rows) read each panel once:
   measured on a 2-core Zen 4 (SmolLM2's linears, weights from DRAM, 2 threads) 9 rows 0.75x
   the time of a 6 + 3 row pass; 64 rows even. */
#if defined(__AVX512VL__)
#define MR_MAX 12
#else
#define MR_MAX 6
#endif
/* Bytes ahead of the panel stream to prefetch, a line per k, in tiles of several rows: there
   the FMAs of one k hide less of the load's latency, and with the hardware prefetcher alone
   4-12 rows took 1.2-1.35x the time (Zen 4, the same shapes). One row (decode) showed no gain
   within the noise, so it keeps the plain loop. */
#define GEMM_PF 1024
typedef float v8 __attribute__((vector_size(32), aligned(4)));

typedef uint32_t u8v __attribute__((vector_size(32), aligned(4)));

/* One k of a panel as two 8-wide fp32 vectors (columns 0-7, 8-15). bf16 panels hold each k's
   columns in pairs (c_j, c_8+j) per 32-bit lane (gemv_cpu.pack_weight's bf16 layout): a bf16 is
   the top half of its fp32, so a shift and a mask widen both halves of one load. */
static inline void load_k(const float* bp, int64_t k, v8& b0, v8& b1) {
  b0 = *(const v8*)(bp + 16 * k);
  b1 = *(const v8*)(bp + 16 * k + 8);
}
static inline void load_k(const uint16_t* bp, int64_t k, v8& b0, v8& b1) {
  const u8v pairs = *(const u8v*)(bp + 16 * k);
  b0 = (v8)(pairs << 16);
  b1 = (v8)(pairs & 0xFFFF0000u);
}

/* out[MR][16] = a[MR rows (stride lda), kc] . bp[kc][16] */
template <typename W, int MR>
static inline void micro(const float* __restrict a, int64_t lda, const W* __restrict bp,
                         int64_t kc, float* __restrict out) {
  v8 c0[MR], c1[MR];
  for (int i = 0; i < MR; ++i) { c0[i] = (v8){0}; c1[i] = (v8){0}; }
  for (int64_t k = 0; k < kc; ++k) {
    v8 b0, b1;
    if (MR > 1) __builtin_prefetch((const char*)(bp + 16 * k) + GEMM_PF, 0, 3);
    load_k(bp, k, b0, b1);
    #pragma GCC unroll 12
    for (int i = 0; i < MR; ++i) {
      const float x = a[i * lda + k];
      c0[i] += x * b0;
      c1[i] += x * b1;
    }
  }
  for (int i = 0; i < MR; ++i) { *(v8*)(out + 16 * i) = c0[i]; *(v8*)(out + 16 * i + 8) = c1[i]; }
}

template <typename W>
static inline void micro_rows(int mr, const float* a, int64_t lda, const W* bp, int64_t kc,
                              float* tile) {
  switch (mr) {
#if MR_MAX > 6
    case 12: micro<W, 12>(a, lda, bp, kc, tile); break;
    case 11: micro<W, 11>(a, lda, bp, kc, tile); break;
    case 10: micro<W, 10>(a, lda, bp, kc, tile); break;
    case 9: micro<W, 9>(a, lda, bp, kc, tile); break;
    case 8: micro<W, 8>(a, lda, bp, kc, tile); break;
    case 7: micro<W, 7>(a, lda, bp, kc, tile); break;
#endif
    case 6: micro<W, 6>(a, lda, bp, kc, tile); break;
    case 5: micro<W, 5>(a, lda, bp, kc, tile); break;
    case 4: micro<W, 4>(a, lda, bp, kc, tile); break;
    case 3: micro<W, 3>(a, lda, bp, kc, tile); break;
    case 2: micro<W, 2>(a, lda, bp, kc, tile); break;
    default: micro<W, 1>(a, lda, bp, kc, tile); break;
  }
}

/* Store a tile's mr x nv values to y: after the last K chunk act(tile + bias) (+ residual);
   a later K chunk first adds what the earlier chunks left in y. */
template <int ACT>
static inline void finish(float* __restrict tile, int mr, int nv, const float* bias, float* y,
                          int64_t ldy, const float* res, int64_t ldr, bool first, bool last) {
  if (!first)
    for (int i = 0; i < mr; ++i)
      for (int j = 0; j < nv; ++j) tile[16 * i + j] += y[i * ldy + j];
  if (last) {
    if (bias)
      for (int i = 0; i < mr; ++i) {
        #pragma omp simd
        for (int j = 0; j < 16; ++j) tile[16 * i + j] += bias[j];
      }
    if (ACT) {
      #pragma omp simd
      for (int j = 0; j < mr * 16; ++j) tile[j] = act_of<ACT>(tile[j]);
    }
    if (res)
      for (int i = 0; i < mr; ++i)
        for (int j = 0; j < nv; ++j) tile[16 * i + j] += res[i * ldr + j];
  }
  for (int i = 0; i < mr; ++i) memcpy(y + i * ldy, tile + 16 * i, sizeof(float) * nv);
}

/* The weight as the driver reads it, one (panel, K chunk) at a time. Panels<W>: packed fp32
   or bf16 panels [N/16][K][16] that the micro-kernel reads where they lie (in_place); a bf16
   chunk can also be widened to fp32 into a buffer (widens). Another source (the quantized
   weights' dequantizing one, kernels/quant_gemv_cpp.py) provides widen only. */
template <typename W>
struct Panels {
  typedef W Elem;
  static constexpr bool in_place = true, widens = sizeof(W) == 2;
  const W* base;
  int64_t K;
  const W* at(int64_t p, int64_t k0) const { return base + p * 16 * K + 16 * k0; }
  void widen(int64_t p, int64_t k0, int64_t kc, float* __restrict buf) const {
    const W* bp = at(p, k0);
    for (int64_t k = 0; k < kc; ++k) {
      v8 b0, b1;
      load_k(bp, k, b0, b1);
      *(v8*)(buf + 16 * k) = b0;
      *(v8*)(buf + 16 * k + 8) = b1;
    }
  }
};

/* Rows m_begin..m_end of one panel's 16 columns over one K chunk; bias, y and res point at
   the panel's first column */
template <typename W, int ACT>
static inline void strip(const float* A, int64_t lda, const W* bp, int64_t kc, int64_t m_begin,
                         int64_t m_end, int nv, const float* bias, float* y, int64_t ldy,
                         const float* res, int64_t ldr, bool first, bool last) {
  float tile[MR_MAX * 16] __attribute__((aligned(32))) = {0};
  for (int64_t m = m_begin; m < m_end; m += MR_MAX) {
    const int mr = m_end - m < MR_MAX ? (int)(m_end - m) : MR_MAX;
    micro_rows(mr, A + m * lda, lda, bp, kc, tile);
    finish<ACT>(tile, mr, nv, bias, y + m * ldy, ldy, res ? res + m * ldr : nullptr, ldr,
                first, last);
  }
}

/* A source that widens: for strips of more than MR_MAX rows (every strip, if it cannot be read in
   place) a thread widens each panel chunk once into its own buffer and runs the fp32
   micro-kernel on it (its tasks of one block come panel by panel, so a chunk is widened once per
   block). Widened once per 24-row strip instead, bf16 panels ran 4-12% behind fp32 ones (37-512
   rows); once per chunk per thread they are even. At <= MR_MAX rows (decode, a speculative
   verify) the micro-kernel widens bf16 inline: there the weight's bytes are the cost. Returns false when a source that cannot
   be read in place got no buffer (out of memory: y is then incomplete); a bf16 source without
   one reads its panels in place. */
template <typename S, int ACT>
static bool gemm(const float* A, int64_t lda, const S& src, const float* bias, float* y,
                 int64_t ldy, const float* res, int64_t ldr, int64_t M, int64_t K, int64_t N,
                 int64_t KC, int64_t MC, int nthreads) {
  const int64_t panels = (N + 15) / 16, STRIP = 24;
  const bool widened = S::widens && (M > MR_MAX || !S::in_place);
  bool failed = false;
  #pragma omp parallel num_threads(nthreads) if (nthreads > 1)
  {
    float* buf = widened ? (float*)aligned_alloc(32, sizeof(float) * 16 * KC) : nullptr;
    if (widened && !buf && !S::in_place) {
      #pragma omp atomic write
      failed = true;
    }
    int64_t buf_panel = -1, buf_k0 = -1;   // the chunk buf holds
    for (int64_t k0 = 0; k0 < K; k0 += KC) {
      const int64_t kc = K - k0 < KC ? K - k0 : KC;
      const bool first = k0 == 0, last = k0 + kc == K;
      for (int64_t m0 = 0; m0 < M; m0 += MC) {
        const int64_t mc = M - m0 < MC ? M - m0 : MC, strips = (mc + STRIP - 1) / STRIP;
        #pragma omp for schedule(static)
        for (int64_t task = 0; task < panels * strips; ++task) {
          const int64_t p = task / strips, m_begin = m0 + (task % strips) * STRIP;
          const int64_t m_end = m_begin + STRIP < m0 + mc ? m_begin + STRIP : m0 + mc;
          const int64_t n0 = p * 16;
          const int nv = N - n0 < 16 ? (int)(N - n0) : 16;
          const float* bias_p = bias ? bias + n0 : nullptr;
          const float* res_p = res ? res + n0 : nullptr;
          if (buf && (m_end - m_begin > MR_MAX || !S::in_place)) {
            if (p != buf_panel || k0 != buf_k0) {   // a thread's tasks run panel by panel
              src.widen(p, k0, kc, buf);
              buf_panel = p, buf_k0 = k0;
            }
            strip<float, ACT>(A + k0, lda, buf, kc, m_begin, m_end, nv, bias_p, y + n0, ldy,
                              res_p, ldr, first, last);
          } else if constexpr (S::in_place) {
            strip<typename S::Elem, ACT>(A + k0, lda, src.at(p, k0), kc, m_begin, m_end, nv,
                                         bias_p, y + n0, ldy, res_p, ldr, first, last);
          }
        }
      }
    }
    free(buf);
  }
  return !failed;
}
"""
