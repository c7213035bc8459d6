"""A register-tiled C++ GEMM with its epilogue fused: ``y = act(x @ W + bias) + residual``.

Why not the BLAS: at the shapes of a small model's prefill (M ~ 16-512 rows, K and N in the
hundreds) MKL's ``addmm`` runs near peak when timed alone, but in a model it pays for what a
library call does around the math: the bias is first copied into the output, the activation
and the residual add are second and third passes over it, and the weight is repacked from its
[K, N] layout at every call, from memory the previous layers pushed out of cache. This kernel
packs the weight once (at compile time) into the order its inner loop reads it, and finishes
each MR x 16 output tile (bias, activation, residual) on its way from the accumulators to y, so
the output is written once.

The layout: the weight [K, N] is stored as panels of 16 output columns, ``[ceil(N/16)][K][16]``
(columns past N zero). The inner kernel multiplies MR rows of x by one panel into an MR x 16 tile
of eight-wide accumulators: MR = 6 on AVX2 (the classic shape: 12 accumulators, 2 panel loads
and 6 broadcasts per k), 12 where AVX-512VL gives 32 vector registers, so that the few rows of a
speculative verify step read each panel once (``tile_rows()`` says which was built).
Blocking: K in chunks of ``kc``, rows in blocks of ``mc``; threads share the (panel, 24-row
strip) tasks of a block, so a panel chunk is read once per block. Written with
GCC vector extensions, so the same source builds for AVX2, AVX-512 or plain SSE. Weights of
format "bf16" are packed in bf16, in the GEMV's layout (one pack serves both kernels).

Measured by ``bench/linear_cpu.py`` (weights cycled past the last-level cache, as in a model;
2 threads, the Zen 1 dev box, medians of 9 interleaved rounds), against ``addmm`` + epilogue:
1.15-1.20x on the small GPT's linears, 1.13-1.28x on the GPT-2/Llama bench configs', 1.21-1.42x
on SmolLM2's (37 and 128 rows), 2.2x at 8 rows; from 256 rows all three paths run the GEMM at
the machine's peak and tie within a few percent. Packing x into 6-row tiles as well (BLIS's
other half) was tried: 3-25% slower below 256 rows, 5% faster at 512.
"""
from __future__ import annotations

import ctypes
import functools
from typing import Callable, Optional

import torch

import fxforge.irgraph.ops  # noqa: F401  (registers torch.ops.fxforge.linear)
from fxforge.kernels.activations import ACT_OF_CPP, ACTIVATION_CODES, cpp_act_switch
from fxforge.kernels.fused_cpp_math import MATH, PRELUDE
from fxforge.kernels.gemm_cpp import CORE
from fxforge.kernels.gemv_cpu import BF16_PACK_KIND, pack_weight, storage_of
from fxforge.kernels.replay import launch
from fxforge.kernels.shared_packs import shared_pack
from fxforge.kernels.toolchain import build_failure, load_function

PANEL = 16                       # output columns per packed panel (two 8-wide accumulators)
# (kc, mc) choices, the first the default: a deep K chunk wins at every benched shape (fewer
# partial sums through y; measured (1024, 240) 1-13% faster than (256, 120), 2 threads).
BLOCKS = ((1024, 240), (256, 120), (1024, 96))
PARALLEL_MIN_MACS = 1 << 18      # M*N*K below which one thread beats a parallel region
# Layout names for kernels/shared_packs.py; bf16 panels are the GEMV's bf16 layout, so a linear
# with both kernels (a KV-cache step graph's) holds one copy.
PACK_KINDS = {torch.float32: "gemm panels fp32 [N/16][K][16]", torch.bfloat16: BF16_PACK_KIND}

SOURCE = "#include <omp.h>\n" + PRELUDE + MATH + ACT_OF_CPP + CORE + r"""
template <typename W>
static void gemm_act(const W* Bp, const float* A, int64_t lda, const float* bias, float* y,
                     int64_t ldy, const float* res, int64_t ldr, int64_t M, int64_t K, int64_t N,
                     int act, int64_t KC, int64_t MC, int nthreads) {
  const Panels<W> src{Bp, K};
""" + cpp_act_switch("gemm<Panels<W>, {act}>(A, lda, src, bias, y, ldy, res, ldr, M, K, N, KC, MC, nthreads);") + r"""}

extern "C" int fxf_gemm_tile_rows(void) { return MR_MAX; }

/* Bp: the packed panels, fp32 or (bf16 != 0) bf16 pairs; bias: padded to the panels (or null);
   res: [M, N] with row stride ldr (or null) */
extern "C" void fxf_gemm(const float* A, int64_t lda, const void* Bp, int bf16, const float* bias,
                         float* y, int64_t ldy, const float* res, int64_t ldr, int64_t M,
                         int64_t K, int64_t N, int act, int64_t KC, int64_t MC, int nthreads) {
  if (bf16)
    gemm_act((const uint16_t*)Bp, A, lda, bias, y, ldy, res, ldr, M, K, N, act, KC, MC, nthreads);
  else
    gemm_act((const float*)Bp, A, lda, bias, y, ldy, res, ldr, M, K, N, act, KC, MC, nthreads);
}
"""


@functools.lru_cache(maxsize=None)
def _entry() -> Callable:
    """The compiled kernel (built once into the kernel cache, ~3 s)."""
    fn = load_function(SOURCE, "fxf_gemm", "gemm")
    fn.restype = None
    fn.argtypes = ((ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int,
                    ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p)
                   + (ctypes.c_int64,) * 4 + (ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
                                              ctypes.c_int))
    return fn


@functools.lru_cache(maxsize=None)
def tile_rows() -> int:
    """The rows of the built micro-kernel's tile (MR_MAX in ``gemm_cpp.py``: 6 or 12)."""
    fn = load_function(SOURCE, "fxf_gemm_tile_rows", "gemm")
    fn.restype, fn.argtypes = ctypes.c_int, ()
    return fn()


def gemm_unavailable() -> Optional[str]:
    """Why the kernel cannot run here (no C++ compiler, a failed build), or None."""
    return build_failure(_entry, "tiled: C++ GEMM")


def pack_panels(weight_nk: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[N, K] fp32 -> [ceil(N/16), K, 16]: each panel of 16 output columns, k-major (rows past N
    zero), so the inner loop reads a panel as one sequential stream. In bf16 (weights of format
    "bf16") each k's 16 columns are stored in pairs (c_j, c_8+j): the GEMV's bf16
    layout, which the kernel widens with a shift and a mask."""
    return pack_weight(weight_nk, dtype, fp32_rows=PANEL)   # bf16: the GEMV's own layout


class TiledLinear:
    """``act(x @ weight_nk^T + bias) + residual`` for fp32 ``x`` [M, K] (any M; unit stride
    along K, else copied). ``weight_nk`` is the [N, K] fp32 weight, kept in bf16 panels when
    ``weight_format`` is "bf16" (:attr:`storage`: half the bytes), else fp32;
    ``bias`` [N] or None; ``block``: an index into :data:`BLOCKS` (the tuner's knob)."""

    name = "tiled"

    def __init__(self, weight_nk: torch.Tensor, bias: Optional[torch.Tensor], activation: str,
                 block: int = 0, weight_format: str = "dense"):
        if weight_nk.dtype != torch.float32 or weight_nk.dim() != 2:
            raise ValueError(f"tiled GEMM: a 2-D fp32 weight, got {weight_nk.dtype} "
                             f"{list(weight_nk.shape)}")
        self.fn = _entry()
        self.n, self.k = weight_nk.shape
        self.storage = storage_of(weight_format, "tiled GEMM")
        self.panels = shared_pack(PACK_KINDS[self.storage], weight_nk,
                                  lambda w: pack_panels(w, self.storage))
        self.bias = None
        if bias is not None:   # padded like the panels: the epilogue adds 16 at a time
            self.bias = torch.zeros(self.panels.shape[0] * PANEL, dtype=torch.float32)
            self.bias[:self.n] = bias
        self.bias_ptr = self.bias.data_ptr() if self.bias is not None else None
        self.activation, self.act = activation, ACTIVATION_CODES[activation]
        self.kc, self.mc = BLOCKS[block]

    def __call__(self, x: torch.Tensor, residual: Optional[torch.Tensor],
                 threads: int = 0) -> torch.Tensor:
        """``threads``: this call's thread count for a product big enough to share (0: torch's)."""
        if x.dtype != torch.float32 or (residual is not None and residual.dtype != torch.float32):
            raise ValueError(f"tiled GEMM: fp32 x and residual, got {x.dtype}"
                             + (f" and {residual.dtype}" if residual is not None else ""))
        rows = x.shape[0]
        if rows == 0 or self.k == 0:    # nothing to multiply: the formula, in ATen
            return self._degenerate(x, residual)
        if x.stride(1) != 1:
            x = x.contiguous()
        if residual is not None and residual.stride(1) != 1:
            residual = residual.contiguous()
        y = torch.empty(rows, self.n, dtype=torch.float32)
        if rows * self.n * self.k < PARALLEL_MIN_MACS:
            threads = 1
        threads = threads or torch.get_num_threads()
        launch(self.fn, (x.data_ptr(), x.stride(0), self.panels.data_ptr(),
                         int(self.storage == torch.bfloat16), self.bias_ptr,
                         y.data_ptr(), self.n, residual.data_ptr() if residual is not None else None,
                         residual.stride(0) if residual is not None else 0, rows, self.k, self.n,
                         self.act, self.kc, self.mc, threads))
        return y

    def _degenerate(self, x: torch.Tensor, residual: Optional[torch.Tensor]) -> torch.Tensor:
        if x.shape[0] == 0:
            return torch.empty(0, self.n, dtype=torch.float32)
        # K == 0: x @ W is zero and the rest is the epilogue; the reference op does it
        bias = self.bias[:self.n] if self.bias is not None else None
        return torch.ops.fxforge.linear(x, torch.zeros(0, self.n), bias, self.activation,
                                        residual, None)

    def describe(self, dtype_name: str, has_residual: bool) -> str:
        steps = [s for s in ("bias" if self.bias is not None else "",
                             self.activation if self.act else "",
                             "residual add" if has_residual else "") if s]
        epilogue = f", epilogue per tile before the store: {' then '.join(steps)}" if steps else ""
        stored = " (bf16: weight format bf16)" if self.storage == torch.bfloat16 else ""
        return (f"C++ tiled GEMM ({dtype_name}, weight packed in 16-column panels{stored}, "
                f"{tile_rows()}-row tiles, kc={self.kc}, mc={self.mc}){epilogue}")
