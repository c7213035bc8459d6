"""Weight-only quantized linear on the CPU: ``y = act(x @ W^T + bias) + residual`` with W stored
as int8 or int4 codes and fp16 scales (and offsets), fp32 activations and math.

A decode step's time is the bytes of its weights over the memory bandwidth, so a weight in 8 or
4 bits is read 4x or ~6.4x (with its fp16 scale and offset a group) faster than fp32. For
M <= GEMV_MAX_M the C++ GEMV (``kernels/quant_gemv_cpp.py``) streams the packed blocks once and
dequantizes in registers. For more rows there are two ways, chosen per ISA variant by
GEMM_MIN_M: the same GEMV in tiles of rows (each weight converted once per tile), or the tiled
fp32 GEMM (``kernels/gemm_cpp.py``, epilogue fused) with the weight as its source: each thread
dequantizes the panel chunk it is about to multiply into a buffer of its own, so prefill reads the
quantized bytes once per block of rows, in one parallel region, and the fp32 weight never exists
beyond one chunk per thread.
``python bench/quant_gemv.py`` times both against the fp32 GEMM.

Formats (the IR's, ``[N, K]`` orientation; :func:`dequantize` is the reference and test oracle):
- ``int8_channel``: codes int8 [N, K], scales fp16 [N, 1]: w = q * s;
- ``int8_g32``: codes int8 [N, K], scales fp16 [N, K/32]: w = q * s (GGUF Q8_0);
- ``int4_g32/64/128``: codes uint8 [N, K/2] (k = 2j in byte j's low nibble, 2j+1 in its high
  one), scales and offsets fp16 [N, K/G]: w = q * s + o (GGUF Q4_1; Q4_0 and a symmetric int4
  are o = -8 s).

The kernel is built in one library per ISA variant (``toolchain.ISA_MARCH``: portable, AVX2 with
FMA and F16C, AVX-512) and the variant is chosen per kernel object from ``cpu_isa.cpu_features()``
(so ``FXFORGE_CPU_ISA=avx2`` selects the AVX2 build on an AVX-512 CPU, ``none`` the portable one),
never above what the hardware has (``cpu_isa.hardware()``).
"""
from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from fxforge.irgraph.weight_format import FORMATS, decode
from fxforge.kernels import cpu_isa
from fxforge.kernels.activations import ACTIVATION_CODES, REGISTRY
from fxforge.kernels.gemm_cpu import BLOCKS, PARALLEL_MIN_MACS
from fxforge.kernels.gemv_cpu import GEMV_MAX_M, PARALLEL_MIN_WEIGHTS
from fxforge.kernels.quant_gemv_cpp import FMT_INT4, FMT_INT8, source
from fxforge.kernels.replay import launch
from fxforge.kernels.shared_packs import shared_pack
from fxforge.kernels.toolchain import build_failure, load_function

ROWS = 16                 # output rows per packed block: one 16-float vector per k
ISA_VARIANTS = ("portable", "avx2", "avx512")
# Rows from which a call takes the dequantizing GEMM (None: the GEMV at every M). Method: GEMV
# tiles against the GEMM against the fp32 tiled GEMM, interleaved in one process
# (bench/quant_gemv.py --m 8,16,32,64,128), SmolLM2's four layer shapes, int8_channel and int4_g32.
# avx2 build, on a real AVX2 CPU (Zen 3, 2 threads; bench/RESULTS.md, 2026-12-03 (late night)):
# at M = 8 the GEMV ahead on int8 (8% over the four shapes), the GEMM on int4 (13%); from 16 the
# GEMM ahead on every shape and format (0.90-1.13x fp32 against the GEMV's 0.60-0.93x). avx512
# build: measured on a Zen 4 against the older GEMM path that dequantized whole panels first (the
# GEMV ahead at M = 16-64, even at 128-256, the panels ahead at 512); the dequantizing GEMM costs
# less than those panels, so 256 is the most it needs: re-measure on an AVX-512 CPU. The portable
# build's GEMV takes 6-15x the GEMM's time.
GEMM_MIN_M = {"portable": GEMV_MAX_M + 1, "avx2": 16, "avx512": 256}


def row_major_operands(name: str, x: torch.Tensor, residual: Optional[torch.Tensor], k: int,
                       n: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``x`` fp32 ``[M, k]`` and ``residual`` fp32 ``[M, n]`` (or None) with unit column stride, as
    the C++ kernels read them; a ValueError naming ``name`` otherwise."""
    if x.dim() != 2 or x.shape[1] != k or x.dtype != torch.float32:
        raise ValueError(f"{name}: x must be fp32 [M, K={k}], got {x.dtype} {list(x.shape)}")
    rows = x.shape[0]
    if residual is not None and (tuple(residual.shape) != (rows, n)
                                 or residual.dtype != torch.float32):
        raise ValueError(f"{name}: residual must be fp32 [{rows}, {n}], "
                         f"got {residual.dtype} {list(residual.shape)}")
    if x.stride(1) != 1:
        x = x.contiguous()
    if residual is not None and residual.stride(1) != 1:
        residual = residual.contiguous()
    return x, residual


@dataclass(frozen=True)
class QuantFormat:
    name: str
    int4: bool                 # nibble codes with offsets, else int8 codes without
    group: Optional[int]       # inputs per scale; None: one scale per output row


# The formats this kernel stores; what each means is irgraph/weight_format.py's registry.
QUANT_FORMATS = ("int8_channel", "int8_g32", "int4_g32", "int4_g64", "int4_g128")


def quant_format(fmt: str) -> QuantFormat:
    if fmt not in QUANT_FORMATS:
        raise ValueError(f"unknown quantized weight format {fmt!r}; one of {list(QUANT_FORMATS)}")
    registered = FORMATS[fmt]
    return QuantFormat(fmt, registered.bits == 4, registered.group or None)


def _check_tensor(fmt: str, what: str, t: object, dtype: torch.dtype, shape: tuple) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype != dtype or tuple(t.shape) != shape:
        got = f"{t.dtype} {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{fmt}: {what} must be {dtype} {list(shape)}, got {got}")


def validate(fmt: str, codes: torch.Tensor, scales: torch.Tensor,
             offsets: Optional[torch.Tensor]) -> tuple[int, int, int]:
    """(N, K, G) of a quantized weight (G = K per channel), or the ValueError saying what is wrong."""
    f = quant_format(fmt)
    code_dtype = torch.uint8 if f.int4 else torch.int8
    if not isinstance(codes, torch.Tensor) or codes.dim() != 2 or codes.dtype != code_dtype:
        got = f"{codes.dtype} {list(codes.shape)}" if isinstance(codes, torch.Tensor) else codes
        raise ValueError(f"{fmt}: codes must be a 2-D {code_dtype} tensor "
                         f"[N, {'K/2' if f.int4 else 'K'}], got {got}")
    n, k = codes.shape[0], codes.shape[1] * (2 if f.int4 else 1)
    if n < 1 or k < 1:
        raise ValueError(f"{fmt}: empty weight (N={n}, K={k})")
    g = f.group or k
    if k % g:
        raise ValueError(f"{fmt}: K={k} input features is not a multiple of the group size G={g}")
    _check_tensor(fmt, "scales", scales, torch.float16, (n, k // g))
    if f.int4:
        _check_tensor(fmt, "offsets", offsets, torch.float16, (n, k // g))
    elif offsets is not None:
        raise ValueError(f"{fmt}: has no offsets (w = q * s), got offsets {list(offsets.shape)}")
    return n, k, g


def dequantize(fmt: str, codes: torch.Tensor, scales: torch.Tensor,
               offsets: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The reference, the fp32 [N, K] weight: the registry's decode (IR orientation [K, N])."""
    validate(fmt, codes, scales, offsets)
    return decode(codes.t(), fmt, scales.t(), offsets.t() if offsets is not None else None).t()


def pack(fmt: str, codes: torch.Tensor, scales: torch.Tensor,
         offsets: Optional[torch.Tensor]) -> torch.Tensor:
    """The kernel's layout (``kernels/quant_gemv_cpp.py``): uint8 [ceil(N/16), K/G, group bytes],
    each group its 16 rows' fp16 scales (and offsets), then its codes with each k's rows
    side by side; rows past N zero."""
    n, k, g = validate(fmt, codes, scales, offsets)
    blocks, ng = (n + ROWS - 1) // ROWS, k // g

    def rows_last(t: torch.Tensor, width: int) -> torch.Tensor:   # [N, ng*width] -> [B, ng, width*16]
        padded = torch.zeros(blocks * ROWS, ng * width, dtype=t.dtype)
        padded[:n] = t.reshape(n, ng * width)
        return padded.reshape(blocks, ROWS, ng, width).permute(0, 2, 3, 1) \
            .reshape(blocks, ng, width * ROWS).contiguous().view(torch.uint8)

    parts = [rows_last(scales, 1)]
    if offsets is not None:
        parts.append(rows_last(offsets, 1))
    parts.append(rows_last(codes, g // 2 if quant_format(fmt).int4 else g))
    return torch.cat(parts, dim=-1).contiguous()


def choose_isa() -> str:
    """The variant to build and run: the best the (possibly overridden) features allow that the
    hardware has too. AVX-512 needs BW/VL/DQ as well (-march=skylake-avx512 uses them; Knights
    Landing lacks them); every AVX2 CPU has F16C (Haswell on, AMD since Piledriver)."""
    wanted, hw = cpu_isa.cpu_features(), cpu_isa.hardware()
    if wanted.avx512f and hw.avx512f and _avx512_bw_vl_dq():
        return "avx512"
    if wanted.avx2 and wanted.fma and hw.avx2 and hw.fma:
        return "avx2"
    return "portable"


@functools.lru_cache(maxsize=1)
def _avx512_bw_vl_dq() -> bool:
    get = getattr(getattr(torch, "cpu", None), "get_capabilities", None)
    try:
        caps = get() if get is not None else {}
    except (RuntimeError, TypeError, ValueError):
        caps = {}
    if "avx512_bw" in caps:
        return all(caps.get(key, False) for key in ("avx512_bw", "avx512_vl", "avx512_dq"))
    try:
        with open("/proc/cpuinfo") as f:
            words = set(next((ln for ln in f if ln.startswith("flags")), "").split())
    except OSError:
        return False
    return {"avx512bw", "avx512vl", "avx512dq"} <= words


SOURCE = source(PARALLEL_MIN_WEIGHTS)


@functools.lru_cache(maxsize=None)
def entries(isa: str) -> tuple[Callable, Callable, Callable]:
    """(fxf_qgemv, fxf_qgemm, fxf_qgemv_isa) of the ``isa`` build (one library per variant,
    built once into the kernel cache)."""
    gemv = load_function(SOURCE, "fxf_qgemv", f"quant_gemv_{isa}", isa=isa)
    gemv.restype = ctypes.c_int
    gemv.argtypes = (ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                     ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
                     ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int,
                     ctypes.c_void_p, ctypes.c_int)
    gemm = load_function(SOURCE, "fxf_qgemm", f"quant_gemv_{isa}", isa=isa)
    gemm.restype = ctypes.c_int
    gemm.argtypes = ((ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int,
                      ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                      ctypes.c_void_p) + (ctypes.c_int64,) * 4
                     + (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int))
    built = load_function(SOURCE, "fxf_qgemv_isa", f"quant_gemv_{isa}", isa=isa)
    built.restype = ctypes.c_int
    built.argtypes = ()
    return gemv, gemm, built


def quant_gemv_unavailable() -> Optional[str]:
    """Why the kernel of the variant :func:`choose_isa` picks cannot build or run here, or None."""
    isa = choose_isa()
    return build_failure(lambda: entries(isa), f"quant gemv ({isa}): C++ kernel")


class QuantGemv:
    """``act(x @ W^T + bias) + residual`` for fp32 ``x`` [M, K], W given as (``fmt``, codes,
    scales, offsets) in the IR's [N, K] orientation; ``bias`` [N] or None. The tensors are
    packed once (one copy per content however many objects use it: ``shared_pack``); the
    ISA variant is chosen here (:func:`choose_isa`) and kept in :attr:`isa`."""

    def __init__(self, fmt: str, codes: torch.Tensor, scales: torch.Tensor,
                 offsets: Optional[torch.Tensor], bias: Optional[torch.Tensor], activation: str):
        self.n, self.k, self.group = validate(fmt, codes, scales, offsets)
        if activation not in ACTIVATION_CODES:
            raise ValueError(f"unknown activation {activation!r}; one of {sorted(ACTIVATION_CODES)}")
        if bias is not None and (bias.dim() != 1 or bias.shape[0] != self.n):
            raise ValueError(f"{fmt}: bias must be [N={self.n}], got {list(bias.shape)}")
        self.fmt, self.activation, self.act = fmt, activation, ACTIVATION_CODES[activation]
        self.fmt_code = FMT_INT4 if quant_format(fmt).int4 else FMT_INT8
        self.isa = choose_isa()
        self.fn, self.gemm_fn, _ = entries(self.isa)
        parts = [t.contiguous().reshape(-1).view(torch.uint8)
                 for t in (codes, scales, offsets) if t is not None]
        self.weight = shared_pack(f"quant {fmt} [N/16][K/G][header, codes] N={self.n} K={self.k}",
                                  torch.cat(parts), lambda _: pack(fmt, codes, scales, offsets))
        self.bias = bias.to(torch.float32).contiguous() if bias is not None else None
        self.bias_ptr = self.bias.data_ptr() if self.bias is not None else None
        self.gemm_min_m: Optional[int] = GEMM_MIN_M[self.isa]
        self.kc, self.mc = BLOCKS[0]    # the GEMM's K chunk (even: int4 bytes hold two k) and rows
        self.panel_bias = None
        if self.bias is not None:   # the GEMM's epilogue adds 16 columns at a time
            self.panel_bias = torch.zeros((self.n + ROWS - 1) // ROWS * ROWS, dtype=torch.float32)
            self.panel_bias[:self.n] = self.bias

    def __call__(self, x: torch.Tensor, residual: Optional[torch.Tensor],
                 threads: int = 0) -> torch.Tensor:
        """``threads``: this call's thread count for the GEMV, the dequantization and the
        prefill's GEMM (0: torch's)."""
        x, residual = row_major_operands(self.fmt, x, residual, self.k, self.n)
        rows = x.shape[0]
        threads = threads or torch.get_num_threads()
        if self.gemm_min_m is not None and rows >= self.gemm_min_m:
            return self._gemm(x, residual, threads)
        y = torch.empty(rows, self.n, dtype=torch.float32)
        if rows and launch(self.fn, (
                x.data_ptr(), x.stride(0), rows, self.k, self.weight.data_ptr(), self.fmt_code,
                self.group, self.n, self.bias_ptr,
                residual.data_ptr() if residual is not None else None,
                residual.stride(0) if residual is not None else 0, self.act, y.data_ptr(),
                threads)) != 0:
            raise MemoryError(f"{self.fmt}: the GEMV could not allocate its x sums")
        return y

    def _gemm(self, x: torch.Tensor, residual: Optional[torch.Tensor],
              threads: int) -> torch.Tensor:
        """The tiled GEMM with the weight dequantized inside it (``fxf_qgemm``): each thread
        dequantizes the panel chunk it is about to multiply (exactly the reference's values)
        into its own buffer; bias, activation and residual fused as in the fp32 GEMM."""
        rows = x.shape[0]
        y = torch.empty(rows, self.n, dtype=torch.float32)
        threads = 1 if rows * self.n * self.k < PARALLEL_MIN_MACS else threads
        if launch(self.gemm_fn, (
                x.data_ptr(), x.stride(0), self.weight.data_ptr(), self.fmt_code, self.group,
                self.panel_bias.data_ptr() if self.panel_bias is not None else None,
                y.data_ptr(), self.n, residual.data_ptr() if residual is not None else None,
                residual.stride(0) if residual is not None else 0, rows, self.k, self.n, self.act,
                self.kc, self.mc, threads)) != 0:
            raise MemoryError(f"{self.fmt}: the GEMM could not allocate its dequantization buffers")
        return y

    def describe(self) -> str:
        steps = [s for s in ("bias" if self.bias is not None else "",
                             REGISTRY[self.act].name if self.act else "") if s]
        epilogue = f", epilogue: {' then '.join(steps)} (then any residual add)" if steps else ""
        large = ("any M: the same, in tiles of rows" if self.gemm_min_m is None else
                 f"M >= {self.gemm_min_m}: the tiled GEMM, each thread dequantizing the "
                 f"{self.kc}-deep panel chunks it multiplies")
        return (f"C++ quantized GEMV ({self.fmt}, {self.isa} build; weight streamed once, "
                f"dequantized in registers; {large}){epilogue}")
