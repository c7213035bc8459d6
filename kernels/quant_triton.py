"""``fxforge::linear`` on quantized weights as Triton kernels: dequantization fused into the matmul.

    y = act(x @ decode(codes, scales, offsets) + bias) + residual     # then cast to out_dtype

The formats are :mod:`fxforge.irgraph.weight_format`'s ``int8_channel``, ``int8_g32`` and
``int4_g32/64/128`` (codes ``[K or K/2, N]``, fp16 ``scales``/``offsets`` ``[groups, N]``, any
strides: the quantize pass stores them as transposed views). Two kernels:

* a **matmul** (prefill, M above ``GEMV_MAX_ROWS``): tiles of x times tiles of codes dequantized in
  registers, fp32 accumulation, the epilogue of ``kernels/matmul.py`` on the accumulator. An int4
  tile is two dots: the even columns of x with the low nibbles, the odd ones with the high, so the
  bytes are never interleaved. An ``int8_channel`` tile is dotted as plain int8 values and the
  channel scale applied to the accumulator once (exact in any dot dtype);
* a **split-K GEMV** (decode): program (column block, K split, row) streams its codes once,
  dequantizes and multiply-adds in fp32 without ``tl.dot``. With ``SPLIT_K > 1`` the partial sums
  go to an fp32 workspace ``[SPLIT_K, M, N]`` and a second small kernel adds them in a fixed order
  and applies the epilogue. Chosen over atomics because the sum is then deterministic (the same
  bits every call, which verification and CUDA-graph replays compare), no workspace needs zeroing
  (an extra launch anyway), the epilogue's activation needs the complete sum, and it runs the
  same under ``TRITON_INTERPRET=1``; its cost is ``SPLIT_K * M * N * 4`` bytes written and
  re-read, small beside the weight bytes at decode sizes.

Dot precision: fp32 x dots fp32 dequantized values in IEEE fp32 (as the dense kernel); fp16/bf16 x
dots the dequantized weight rounded to x's dtype (tensor cores); the GEMV is fp32 throughout.
Their tuning spaces are in ``kernels/quant_triton_space.py`` (``MATMUL_SPACE``, ``GEMV_SPACE``);
a config with a ``SPLIT_K`` parameter runs the GEMV, any other the matmul.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fxforge.irgraph.weight_format import (WeightFormat, WeightFormatError, implemented_format,
                                           not_implemented_by)
from fxforge.kernels import matmul
from fxforge.kernels.activations import ACTIVATION_CODES
from fxforge.kernels.matmul import _epilogue, _grouped_tile, interpreting
from fxforge.kernels.quant_triton_space import choose_config, gemv_splits
from fxforge.kernels.tuning import Config
from fxforge.kernels.tuning import current as current_session

FORMATS = ("int8_channel", "int8_g32", "int4_g32", "int4_g64", "int4_g128")
KERNEL = "Triton quantized matmul"


# ---------------------------------------------------------------------------------- kernels
@triton.jit
def _weight_tile(c_ptr, s_ptr, o_ptr, code_rows, row_mask, cols, k_start, stride_ck, stride_cn,
                 stride_sk, stride_sn, stride_ok, stride_on,
                 INT4: tl.constexpr, PER_ROW: tl.constexpr, GROUP: tl.constexpr,
                 ONE_SCALE_ROW: tl.constexpr):
    """Stored code rows ``code_rows`` x columns ``cols`` dequantized to fp32: (low nibbles, high
    nibbles) for int4 (k = 2r and 2r + 1), (values, values) for int8. ``int8_channel`` (GROUP 0)
    comes back unscaled: its scale is applied to the accumulator."""
    codes = tl.load(c_ptr + code_rows[:, None] * stride_ck + cols[None, :] * stride_cn,
                    mask=row_mask[:, None], other=0)
    if INT4:
        first = (codes & 15).to(tl.float32)
        second = (codes >> 4).to(tl.float32)
    else:
        first = codes.to(tl.float32)
        second = first
    if GROUP > 0:
        if ONE_SCALE_ROW:   # the block lies in one group: one scale (and offset) row
            group = k_start // GROUP
            scale = tl.load(s_ptr + group * stride_sk + cols * stride_sn).to(tl.float32)[None, :]
        else:               # rows from several groups: a scale row per code row (cached loads)
            groups = (code_rows * PER_ROW) // GROUP
            scale = tl.load(s_ptr + groups[:, None] * stride_sk + cols[None, :] * stride_sn,
                            mask=row_mask[:, None], other=0.0).to(tl.float32)
        first = first * scale
        second = second * scale
        if INT4:
            if ONE_SCALE_ROW:
                offset = tl.load(o_ptr + group * stride_ok + cols * stride_on).to(tl.float32)[None, :]
            else:
                offset = tl.load(o_ptr + groups[:, None] * stride_ok + cols[None, :] * stride_on,
                                 mask=row_mask[:, None], other=0.0).to(tl.float32)
            first = first + offset
            second = second + offset
    return first, second


@triton.jit
def _finish(acc, offs_m, offs_n, M, N, s_ptr, stride_sn, bias_ptr, stride_bias, res_ptr, stride_rm,
            stride_rn, out_ptr, stride_om, stride_on, CHANNEL_SCALE: tl.constexpr,
            HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr):
    """The epilogue on an fp32 ``[rows, cols]`` accumulator: channel scale, bias, activation,
    residual, one cast and store (rows/columns past the edge are not stored)."""
    if CHANNEL_SCALE:
        acc = acc * tl.load(s_ptr + (offs_n % N) * stride_sn).to(tl.float32)[None, :]
    _epilogue(acc, offs_m, offs_n, M, N, bias_ptr, stride_bias, res_ptr, stride_rm, stride_rn,
              out_ptr, stride_om, stride_on, HAS_BIAS, HAS_RESIDUAL, ACTIVATION)


@triton.jit
def _quant_matmul_kernel(
    x_ptr, c_ptr, s_ptr, o_ptr, bias_ptr, res_ptr, out_ptr, M, N, K,
    stride_xm, stride_xk, stride_ck, stride_cn, stride_sk, stride_sn, stride_ok, stride_on,
    stride_bias, stride_rm, stride_rn, stride_ym, stride_yn,
    INT4: tl.constexpr, PER_ROW: tl.constexpr, GROUP: tl.constexpr, ONE_SCALE_ROW: tl.constexpr,
    FP32_DOT: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_m % M   # past the edge: wrapped (never stored), so loads need no row mask
    cols = offs_n % N
    offs_r = tl.arange(0, BLOCK_K // PER_ROW)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_start in range(0, K, BLOCK_K):
        code_rows = k_start // PER_ROW + offs_r
        row_mask = code_rows < K // PER_ROW
        first, second = _weight_tile(c_ptr, s_ptr, o_ptr, code_rows, row_mask, cols, k_start,
                                     stride_ck, stride_cn, stride_sk, stride_sn, stride_ok, stride_on,
                                     INT4, PER_ROW, GROUP, ONE_SCALE_ROW)
        x_ptrs = x_ptr + rows[:, None] * stride_xm + (code_rows * PER_ROW)[None, :] * stride_xk
        a = tl.load(x_ptrs, mask=row_mask[None, :], other=0.0)
        if FP32_DOT:
            acc = tl.dot(a.to(tl.float32), first, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, first.to(a.dtype), acc)
        if INT4:   # the odd k: x's next column with the high nibbles
            b = tl.load(x_ptrs + stride_xk, mask=row_mask[None, :], other=0.0)
            if FP32_DOT:
                acc = tl.dot(b.to(tl.float32), second, acc, input_precision="ieee")
            else:
                acc = tl.dot(b, second.to(b.dtype), acc)
    _finish(acc, offs_m, offs_n, M, N, s_ptr, stride_sn, bias_ptr, stride_bias, res_ptr, stride_rm,
            stride_rn, out_ptr, stride_ym, stride_yn, GROUP == 0, HAS_BIAS, HAS_RESIDUAL, ACTIVATION)


@triton.jit
def _quant_gemv_kernel(
    x_ptr, c_ptr, s_ptr, o_ptr, bias_ptr, res_ptr, out_ptr, part_ptr, M, N, K, K_PER_SPLIT,
    stride_xm, stride_xk, stride_ck, stride_cn, stride_sk, stride_sn, stride_ok, stride_on,
    stride_bias, stride_rm, stride_rn, stride_ym, stride_yn,
    INT4: tl.constexpr, PER_ROW: tl.constexpr, GROUP: tl.constexpr, ONE_SCALE_ROW: tl.constexpr,
    SPLIT_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = offs_n % N
    offs_r = tl.arange(0, BLOCK_K // PER_ROW)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    k_begin = pid_k * K_PER_SPLIT       # K_PER_SPLIT: a multiple of BLOCK_K
    for k_start in range(k_begin, tl.minimum(k_begin + K_PER_SPLIT, K), BLOCK_K):
        code_rows = k_start // PER_ROW + offs_r
        row_mask = code_rows < K // PER_ROW
        first, second = _weight_tile(c_ptr, s_ptr, o_ptr, code_rows, row_mask, cols, k_start,
                                     stride_ck, stride_cn, stride_sk, stride_sn, stride_ok, stride_on,
                                     INT4, PER_ROW, GROUP, ONE_SCALE_ROW)
        x_ptrs = x_ptr + m * stride_xm + code_rows * PER_ROW * stride_xk
        a = tl.load(x_ptrs, mask=row_mask, other=0.0).to(tl.float32)
        acc += tl.sum(a[:, None] * first, axis=0)
        if INT4:
            b = tl.load(x_ptrs + stride_xk, mask=row_mask, other=0.0).to(tl.float32)
            acc += tl.sum(b[:, None] * second, axis=0)
    offs_m = m + tl.zeros((1,), dtype=tl.int32)
    if SPLIT_K == 1:
        _finish(acc[None, :], offs_m, offs_n, M, N, s_ptr, stride_sn, bias_ptr, stride_bias, res_ptr,
                stride_rm, stride_rn, out_ptr, stride_ym, stride_yn, GROUP == 0, HAS_BIAS,
                HAS_RESIDUAL, ACTIVATION)
    else:
        tl.store(part_ptr + (pid_k * M + m) * N + offs_n, acc, mask=offs_n < N)


@triton.jit
def _split_k_sum_kernel(
    part_ptr, s_ptr, bias_ptr, res_ptr, out_ptr, M, N,
    stride_sn, stride_bias, stride_rm, stride_rn, stride_om, stride_on,
    CHANNEL_SCALE: tl.constexpr, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The GEMV's second pass: the SPLIT_K partial sums added in order, then the epilogue."""
    m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for split in tl.static_range(SPLIT_K):
        acc += tl.load(part_ptr + (split * M + m) * N + offs_n, mask=offs_n < N, other=0.0)
    offs_m = m + tl.zeros((1,), dtype=tl.int32)
    _finish(acc[None, :], offs_m, offs_n, M, N, s_ptr, stride_sn, bias_ptr, stride_bias, res_ptr,
            stride_rm, stride_rn, out_ptr, stride_om, stride_on, CHANNEL_SCALE, HAS_BIAS,
            HAS_RESIDUAL, ACTIVATION)


# ------------------------------------------------------------------------------ configs
def quant_problem(x: torch.Tensor, n: int, weight_format: str) -> dict:
    """The autotuner's problem key for ``x @ decode(codes)`` with N output columns."""
    return {"M": x.shape[0], "N": n, "K": x.shape[1], "dtype": x.dtype, "format": weight_format}


_UNTUNED: dict[tuple, Config] = {}   # choose_config per (M bucket, N, K, dtype, format)


def launch_config(x: torch.Tensor, n: int, weight_format: str, has_bias: bool, activation: str,
                  has_residual: bool, out_dtype: torch.dtype) -> Config:
    """The config of a launch given none: the tuning session's pick inside one, else
    :func:`choose_config` looked up once per shape bucket."""
    active = current_session()
    if active is not None and active.mode != "off":
        from fxforge.kernels.quant_triton_tuning import quant_config
        return quant_config(x.shape[0], x.shape[1], n, weight_format, x.dtype, activation,
                            has_bias, has_residual, x.device, out_dtype)
    key = (triton.next_power_of_2(x.shape[0]), n, x.shape[1], x.dtype, weight_format)
    config = _UNTUNED.get(key)
    if config is None:
        config = _UNTUNED[key] = choose_config(quant_problem(x, n, weight_format))
    return config


# --------------------------------------------------------------------------------- launcher
def checked_format(weight_format: str, codes: torch.Tensor, scales, offsets) -> WeightFormat:
    """The format, if these kernels run it and the tensors are its (else a WeightFormatError)."""
    if weight_format not in FORMATS:
        raise not_implemented_by(KERNEL, weight_format, FORMATS)
    fmt = implemented_format(weight_format)
    fmt.check_extras(codes, (scales, offsets))
    k = fmt.in_features(codes)
    if fmt.group and k % fmt.group:
        raise WeightFormatError(f"{KERNEL}: weight format {fmt.name!r} needs K (input features) to "
                                f"be a multiple of its group of {fmt.group}; K={k} leaves a partial "
                                f"last group of {k % fmt.group}")
    return fmt


def _check(x, codes, scales, offsets, fmt, bias, activation, residual, out_dtype) -> None:
    """The quantized tensors' devices, the dense launcher's checks on a one-element stand-in
    weight of x's dtype with the decoded weight's shape, then the quantized tensors' extents."""
    quantized = [t for t in (codes, scales, offsets) if t is not None]
    if any(t.device != x.device for t in quantized):
        raise ValueError(f"{KERNEL}: codes/scales/offsets on {[str(t.device) for t in quantized]}, "
                         f"x on {x.device}")
    stand_in = x.new_empty(1).as_strided((fmt.in_features(codes), codes.shape[1]), (0, 0))
    matmul._check_inputs(x, stand_in, bias, activation, residual, out_dtype)
    if any(matmul._largest_offset(t) > matmul.MAX_OFFSET for t in quantized):
        raise ValueError(f"{KERNEL}: a tensor spans 2**31 or more elements (int32 indexing)")


def output_dtype(x: torch.Tensor, residual, out_dtype) -> torch.dtype:
    """As the op's fake: out_dtype, else x's dtype promoted with fp32 (decoded codes are fp32
    values) and the residual's."""
    if out_dtype is not None:
        return out_dtype
    return torch.promote_types(matmul._output_dtype(x, residual, None), torch.float32)


def triton_quant_linear(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                        offsets: Optional[torch.Tensor], weight_format: str,
                        bias: Optional[torch.Tensor] = None, activation: str = "none",
                        residual: Optional[torch.Tensor] = None,
                        out_dtype: Optional[torch.dtype] = None,
                        config: Optional[Config] = None) -> torch.Tensor:
    """``fxforge::linear`` with ``weight_format`` in :data:`FORMATS` as Triton kernels; ``config``
    None: :func:`launch_config` (a config with ``SPLIT_K`` runs the GEMV, else the matmul)."""
    fmt = checked_format(weight_format, codes, scales, offsets)
    _check(x, codes, scales, offsets, fmt, bias, activation, residual, out_dtype)
    (M, K), N = x.shape, codes.shape[1]
    out = torch.empty((M, N), dtype=output_dtype(x, residual, out_dtype), device=x.device)
    if M == 0 or N == 0:
        return out
    if K == 0:   # an empty sum: the dense launcher's eager epilogue
        empty = x.new_empty((0, N))
        return out.copy_(matmul.triton_linear(x, empty, bias, activation, residual, out.dtype))
    config = config or launch_config(x, N, weight_format, bias is not None, activation,
                                     residual is not None, out.dtype)
    params = config.kwargs()
    res = residual if residual is not None else out   # unused pointers when the flag is off
    tensors = (x, codes, scales, offsets if offsets is not None else scales,
               bias if bias is not None else out, res, out)
    strides = (x.stride(0), x.stride(1), codes.stride(0), codes.stride(1),
               scales.stride(0), scales.stride(1), *tensors[3].stride(),
               bias.stride(0) if bias is not None else 0, res.stride(0), res.stride(1),
               out.stride(0), out.stride(1))
    flags = dict(INT4=fmt.bits == 4, PER_ROW=fmt.codes_per_row, GROUP=fmt.group,
                 ONE_SCALE_ROW=fmt.group > 0 and fmt.group % params["BLOCK_K"] == 0,
                 HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
                 ACTIVATION=ACTIVATION_CODES[activation],
                 num_warps=config.num_warps, num_stages=config.num_stages)
    if "SPLIT_K" in params:
        _launch_gemv(tensors, strides, flags, params, M, N, K)
    else:
        grid = (triton.cdiv(M, params["BLOCK_M"]) * triton.cdiv(N, params["BLOCK_N"]),)
        # the interpreter multiplies bf16 bit patterns as integers: fp32 dots there too
        fp32_dot = x.dtype == torch.float32 or (interpreting() and x.dtype == torch.bfloat16)
        _quant_matmul_kernel[grid](*tensors, M, N, K, *strides, FP32_DOT=fp32_dot, **flags, **params)
    return out


SUM_BLOCK_N = 256   # columns per program of the split-K sum


def _launch_gemv(tensors, strides, flags, params, M, N, K) -> None:
    x, codes, scales, offsets, bias, res, out = tensors
    per_split, splits = gemv_splits(K, params["BLOCK_K"], params["SPLIT_K"])
    partial = torch.empty((splits, M, N), dtype=torch.float32, device=x.device) if splits > 1 else out
    grid = (M, triton.cdiv(N, params["BLOCK_N"]), splits)
    _quant_gemv_kernel[grid](*tensors, partial, M, N, K, per_split, *strides, SPLIT_K=splits,
                             **flags, BLOCK_N=params["BLOCK_N"], BLOCK_K=params["BLOCK_K"])
    if splits > 1:
        _split_k_sum_kernel[(M, triton.cdiv(N, SUM_BLOCK_N))](
            partial, scales, bias, res, out, M, N, scales.stride(1), *strides[8:],
            CHANNEL_SCALE=flags["GROUP"] == 0, SPLIT_K=splits, HAS_BIAS=flags["HAS_BIAS"],
            HAS_RESIDUAL=flags["HAS_RESIDUAL"], ACTIVATION=flags["ACTIVATION"], BLOCK_N=SUM_BLOCK_N)
