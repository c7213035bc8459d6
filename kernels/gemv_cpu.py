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

The kernel (``kernels/gemv_cpp.py``) is built in one library per ISA variant (portable, AVX2+FMA,
AVX-512) and the variant chosen per kernel object from ``cpu_isa.cpu_features()``, as the quantized
GEMV's (``FXFORGE_CPU_ISA=avx2`` runs the AVX2 build on an AVX-512 CPU, ``none`` the portable
one). ``python bench/gemv_bandwidth.py`` prints each build's GB/s against the measured read
bandwidth. The reference is ``torch.ops.fxforge.linear``.
"""
from __future__ import annotations

import ctypes
import functools
import logging
from typing import Callable, Optional

import torch

from fxforge.irgraph.weight_format import not_implemented_by
from fxforge.kernels.activations import ACTIVATION_CODES, REGISTRY
from fxforge.kernels.gemv_cpp import ISA_LEVEL, source
from fxforge.kernels.replay import launch
from fxforge.kernels.shared_packs import shared_pack
from fxforge.kernels.toolchain import build_failure, load_function

log = logging.getLogger("fxforge.kernels")

GEMV_MAX_M = 4                  # above this many rows the GEMM libraries win (measured, see below)
PARALLEL_MIN_WEIGHTS = 1 << 15  # N x K below which one thread is faster than a parallel region
SOURCE = source(PARALLEL_MIN_WEIGHTS)   # kernels/gemv_cpp.py
ISA_VARIANTS = tuple(ISA_LEVEL)


def choose_isa() -> str:
    """The build to run (a key of ISA_LEVEL): the best the features (``FXFORGE_CPU_ISA`` applied)
    and the hardware both allow; the quantized GEMV's rule, so the two always agree."""
    from fxforge.kernels.quant_gemv_cpu import choose_isa as quant_choose_isa   # imports this
    return quant_choose_isa()


def runnable_isas() -> tuple[str, ...]:
    """The builds this CPU can run (``FXFORGE_CPU_ISA`` applied): up to :func:`choose_isa`'s."""
    return ISA_VARIANTS[:ISA_VARIANTS.index(choose_isa()) + 1]


@functools.lru_cache(maxsize=None)
def _entry(isa: str) -> Callable:
    """The ``isa`` build's kernel (one library per variant, built once into the kernel cache)."""
    fn = load_function(SOURCE, "fxf_gemv", f"gemv_{isa}", isa=isa)
    fn.restype = None
    fn.argtypes = (ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                   ctypes.c_int, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                   ctypes.c_int, ctypes.c_void_p, ctypes.c_int)
    return fn


@functools.lru_cache(maxsize=None)
def _epilogue_entry() -> Optional[Callable]:
    """The compiled epilogue (of the build :func:`choose_isa` picks first), or None where it
    cannot be built (no C++ compiler, a failed build): tried once per process, not at every
    GEMM."""
    try:
        isa = choose_isa()
        fn = load_function(SOURCE, "fxf_epilogue", f"gemv_{isa}", isa=isa)
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
    isa = choose_isa()
    return build_failure(lambda: _entry(isa), f"gemv ({isa}): C++ kernel")


@functools.lru_cache(maxsize=None)
def built_isa(isa: str) -> int:
    """The GV_ISA level the ``isa`` library was compiled with (ISA_LEVEL's value if it is the
    build it claims to be)."""
    fn = load_function(SOURCE, "fxf_gemv_isa", f"gemv_{isa}", isa=isa)
    fn.restype, fn.argtypes = ctypes.c_int, ()
    return fn()


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
                 bf16_pack: Optional[torch.Tensor] = None, weight_format: str = "dense",
                 isa: Optional[str] = None):
        """``bf16_pack``: ``weight_nk`` already packed in bf16 (the tiled GEMM's panels of the
        same weight, format "bf16"): used as is, not packed again. ``isa``: a build of
        :func:`runnable_isas` to run (benches compare them), else :func:`choose_isa`'s."""
        if weight_nk.dtype != torch.float32:
            raise ValueError(f"gemv: fp32 weights only, got {weight_nk.dtype}")
        self.storage = storage_of(weight_format, "gemv")
        if isa is not None and isa not in runnable_isas():
            raise ValueError(f"gemv: build {isa!r} cannot run here; one of {runnable_isas()}")
        self.isa = isa or choose_isa()
        self.fn = _entry(self.isa)
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
        return (f"C++ GEMV ({dtype_name}{stored}, {self.isa} build, M <= {GEMV_MAX_M}, weight "
                f"streamed once){epilogue}")
