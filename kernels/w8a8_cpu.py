"""The W8A8 linear on the CPU: ``y = act(x @ W + bias) + residual`` with W as int8 codes and a
scale per output channel (weight format ``w8a8``, ``irgraph/weight_format.py``) and x quantized to
int8 per row inside the same kernel call (``kernels/w8a8_cpp.py``: the activation quantization,
the int8 dot products with int32 sums, the epilogue). The result equals the op's reference
(``weight_format.w8a8_matmul``) up to the last-bit rounding of the activation (exp/tanh) only:
the int32 sums are exact and the scaling rounds as the reference's ops do.

One library per ISA variant (``toolchain.ISA_MARCH``): ``avx512_vnni`` (``vpdpbusd``), ``avx2``
(``vpmaddubsw``/``vpmaddwd``) or ``portable``, chosen per kernel object from
``cpu_isa.cpu_features()`` (``FXFORGE_CPU_ISA=avx2`` / ``none`` force the lower ones), never above
what the hardware has. An AVX-512 CPU without VNNI runs the AVX2 build.
"""
from __future__ import annotations

import ctypes
import functools
from typing import Callable, Optional

import torch

from fxforge.irgraph.weight_format import W8A8
from fxforge.kernels import cpu_isa
from fxforge.kernels.activations import ACTIVATION_CODES, REGISTRY
from fxforge.kernels.gemv_cpu import PARALLEL_MIN_WEIGHTS
from fxforge.kernels.quant_gemv_cpu import choose_isa as quant_isa, row_major_operands
from fxforge.kernels.quant_linear_cpu import QuantLinear
from fxforge.kernels.replay import launch
from fxforge.kernels.shared_packs import shared_pack
from fxforge.kernels.toolchain import build_failure, load_function
from fxforge.kernels.w8a8_cpp import source

ISA_VARIANTS = ("portable", "avx2", "avx512_vnni")
MAX_K = 1 << 16   # |acc| <= K * 255 * 127 (the VNNI build's biased codes) must fit int32
SOURCE = source(PARALLEL_MIN_WEIGHTS)
PACK_KIND = "w8a8 int8 [N/16][K/4][16][4] + column sums"


def choose_isa() -> str:
    """The variant to build and run: VNNI where the (possibly overridden) features and the
    hardware both have AVX-512-VNNI (with the BW/VL/DQ the quantized GEMV's AVX-512 build checks),
    else AVX2, else portable."""
    base = quant_isa()
    if base == "avx512" and cpu_isa.cpu_features().avx512_vnni and cpu_isa.hardware().avx512_vnni:
        return "avx512_vnni"
    return "avx2" if base in ("avx512", "avx2") else "portable"


@functools.lru_cache(maxsize=None)
def entries(isa: str) -> tuple[Callable, Callable, Callable]:
    """(fxf_w8a8_linear, fxf_w8a8_quantize, fxf_w8a8_isa) of the ``isa`` build."""
    def load(symbol: str, restype, argtypes) -> Callable:
        fn = load_function(SOURCE, symbol, f"w8a8_{isa}", isa=isa)
        fn.restype, fn.argtypes = restype, argtypes
        return fn
    p, i64, i = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    return (load("fxf_w8a8_linear", i, (p, i64, i64, i64, p, p, p, p, i64, p, p, i64, i, p, i)),
            load("fxf_w8a8_quantize", i, (p, i64, i64, p, p, p)),
            load("fxf_w8a8_isa", i, ()))


def w8a8_unavailable() -> Optional[str]:
    """Why the variant :func:`choose_isa` picks cannot build or run here, or None."""
    isa = choose_isa()
    return build_failure(lambda: entries(isa), f"w8a8 ({isa}): C++ kernel")


def validate(codes: torch.Tensor, scales: torch.Tensor, smooth: torch.Tensor) -> tuple[int, int]:
    """(N, K) of a W8A8 weight in the kernel's orientation (codes int8 [N, K], scales fp16 [N, 1],
    smooth fp32 [K]), or the ValueError saying what is wrong."""
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.int8 or codes.dim() != 2 \
            or 0 in codes.shape:
        got = f"{codes.dtype} {list(codes.shape)}" if isinstance(codes, torch.Tensor) else codes
        raise ValueError(f"{W8A8}: codes must be a non-empty 2-D int8 tensor [N, K], got {got}")
    n, k = codes.shape
    if k >= MAX_K:
        raise ValueError(f"{W8A8}: K={k} input features: the int32 sums need K < {MAX_K}")
    for what, t, dtype, shape in (("scales", scales, torch.float16, (n, 1)),
                                  ("smooth", smooth, torch.float32, (k,))):
        if not isinstance(t, torch.Tensor) or t.dtype != dtype or tuple(t.shape) != shape:
            got = f"{t.dtype} {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{W8A8}: {what} must be {dtype} {list(shape)}, got {got}")
    return n, k


def pack(codes: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] -> the kernel's layout (``kernels/w8a8_cpp.py``) as bytes, then the int32
    column sums (N padded to 16) appended."""
    n, k = codes.shape
    blocks, k4 = (n + 15) // 16, (k + 3) // 4
    padded = torch.zeros(blocks * 16, k4 * 4, dtype=torch.int8)
    padded[:n, :k] = codes
    layout = padded.reshape(blocks, 16, k4, 4).permute(0, 2, 1, 3).contiguous().reshape(-1)
    sums = padded.to(torch.int32).sum(dim=1, dtype=torch.int32)
    return torch.cat((layout.view(torch.uint8), sums.view(torch.uint8)))


class W8A8Gemm:
    """``act(quantized(x * smooth) @ codes^T * scales + bias) + residual`` for fp32 x [M, K];
    codes int8 [N, K], scales fp16 [N, 1], smooth fp32 [K] (:func:`validate`). The weight is packed
    once and shared by content (``shared_pack``); the ISA variant is kept in :attr:`isa`."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, smooth: torch.Tensor,
                 bias: Optional[torch.Tensor], activation: str):
        self.n, self.k = validate(codes, scales, smooth)
        if activation not in ACTIVATION_CODES:
            raise ValueError(f"unknown activation {activation!r}; one of {sorted(ACTIVATION_CODES)}")
        if bias is not None and (bias.dim() != 1 or bias.shape[0] != self.n):
            raise ValueError(f"{W8A8}: bias must be [N={self.n}], got {list(bias.shape)}")
        self.activation, self.act = activation, ACTIVATION_CODES[activation]
        self.isa = choose_isa()
        self.fn, self.quantize_fn, _ = entries(self.isa)
        codes = codes.contiguous()
        self.packed = shared_pack(f"{PACK_KIND} N={self.n} K={self.k}", codes, pack)
        self.colsum = self.packed[-4 * 16 * ((self.n + 15) // 16):]   # the int32 sums' bytes
        self.scales = scales.reshape(-1).float().contiguous()
        self.smooth = smooth.contiguous()
        self.bias = bias.float().contiguous() if bias is not None else None

    def __call__(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None,
                 threads: int = 0) -> torch.Tensor:
        x, residual = row_major_operands(W8A8, x, residual, self.k, self.n)
        rows = x.shape[0]
        y = torch.empty(rows, self.n, dtype=torch.float32)
        ptr = lambda t: t.data_ptr() if t is not None else None  # noqa: E731
        if rows and launch(self.fn, (
                x.data_ptr(), x.stride(0), rows, self.k, self.smooth.data_ptr(),
                self.packed.data_ptr(), self.colsum.data_ptr(), self.scales.data_ptr(), self.n,
                ptr(self.bias), ptr(residual), residual.stride(0) if residual is not None else 0,
                self.act, y.data_ptr(), threads or torch.get_num_threads())) != 0:
            raise MemoryError(f"{W8A8}: the kernel could not allocate its activation codes")
        return y

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes int8 [M, K], scales fp32 [M]) of fp32 x [M, K] by the kernel's own function."""
        x = x.float().contiguous()
        codes = torch.empty(x.shape, dtype=torch.int8)
        scales = torch.empty(x.shape[0], dtype=torch.float32)
        if self.quantize_fn(x.data_ptr(), x.shape[0], x.shape[1], self.smooth.data_ptr(),
                            codes.data_ptr(), scales.data_ptr()) != 0:
            raise MemoryError(f"{W8A8}: the quantization could not allocate a row")
        return codes, scales

    def describe(self) -> str:
        steps = [s for s in ("bias" if self.bias is not None else "",
                             REGISTRY[self.act].name if self.act else "") if s]
        epilogue = f", epilogue: {' then '.join(steps)} (then any residual add)" if steps else ""
        return (f"C++ W8A8 ({self.isa} build; x quantized per row to int8 in the call, int8 dot "
                f"products with int32 sums, weight panels reused across row tiles){epilogue}")


class W8A8Linear(QuantLinear):
    """``fxforge::linear`` in format ``w8a8`` on the CPU: the op's tensors (IR orientation: codes
    [K, N], scales [1, N], smoothing [K, 1]) handed to :class:`W8A8Gemm`, with QuantLinear's dtype
    rules around it (the reference computes in fp32)."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, smooth: torch.Tensor,
                 bias: Optional[torch.Tensor], activation: str, has_residual: bool,
                 out_dtype: Optional[torch.dtype]):
        self.kernel = W8A8Gemm(weight.t().contiguous(), scales.t().contiguous(),
                               smooth.reshape(-1).contiguous(),
                               bias.detach().float() if bias is not None else None, activation)
        self.has_residual, self.out_dtype = has_residual, out_dtype
