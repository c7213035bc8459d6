"""Matmul with a fused epilogue: ``torch.ops.fxforge.linear`` as one Triton kernel.

    y = act(x @ weight + bias) + residual        # then cast to out_dtype

Laid out as in Triton's tutorials: the reference (the test oracle), the kernel, its tuning space
with a pruning rule, and the launcher :func:`triton_linear`.

The kernel accumulates in fp32 and applies the whole epilogue (bias, activation, residual, cast)
to the fp32 accumulator before the single store, so it is at least as accurate as the unfused
eager graph, which rounds to ``x.dtype`` after each op. ``x`` and ``weight`` may have any strides
(weights usually arrive as transposed views of ``nn.Linear`` weights). Programs are ordered in
groups of ``GROUP_M`` row-blocks so that the blocks running together share ``weight`` columns in L2.
"""
from __future__ import annotations

import os
from typing import Optional, Union

import torch
import triton
import triton.language as tl

from fxforge.irgraph.ops import ACTIVATIONS
from fxforge.kernels.activations import ACTIVATION_CODES
from fxforge.kernels.tuning import Config, Problem, TuningSpace
from fxforge.kernels.tuning import current as current_session

# the registry's codes (kernels/activations.py), as constants the kernel may read
_RELU = tl.constexpr(ACTIVATION_CODES["relu"])
_GELU = tl.constexpr(ACTIVATION_CODES["gelu"])
_GELU_TANH = tl.constexpr(ACTIVATION_CODES["gelu_tanh"])
_SILU = tl.constexpr(ACTIVATION_CODES["silu"])

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_OFFSET = 2**31 - 1  # the kernel indexes with int32


def linear_reference(x, weight, bias=None, activation="none", residual=None, out_dtype=None):
    """The oracle: the IR op's eager implementation (the unfused ATen ops, in order)."""
    return torch.ops.fxforge.linear(x, weight, bias, activation, residual, out_dtype)


def interpreting() -> bool:
    """Whether Triton runs kernels on the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


# ---------------------------------------------------------------------------------- the kernel
@triton.jit
def _activation(y, ACTIVATION: tl.constexpr):
    """``ACTIVATIONS[name]`` on an fp32 block, selected at compile time by its code."""
    if ACTIVATION == _RELU:
        y = tl.maximum(y, 0.0)
    elif ACTIVATION == _GELU:
        y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
    elif ACTIVATION == _GELU_TANH:
        inner = 0.7978845608028654 * (y + 0.044715 * y * y * y)
        y = 0.5 * y * (1.0 + (2.0 * tl.sigmoid(2.0 * inner) - 1.0))  # tanh(u) = 2*sigmoid(2u) - 1
    elif ACTIVATION == _SILU:
        y = y * tl.sigmoid(y)
    return y


@triton.jit
def _grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Program id -> (row tile, column tile), walking GROUP_M row tiles down a column band."""
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    tiles_per_group = GROUP_M * tiles_n
    first_m = (pid // tiles_per_group) * GROUP_M
    group_rows = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % tiles_per_group) % group_rows)
    pid_n = (pid % tiles_per_group) // group_rows
    return pid_m, pid_n


@triton.jit
def _linear_kernel(
    x_ptr, w_ptr, bias_ptr, res_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wk, stride_wn, stride_bias, stride_rm, stride_rn, stride_om, stride_on,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACTIVATION: tl.constexpr,
    FP32_EXACT: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Rows/columns past the edge wrap around (modulo) so loads stay in bounds without a mask;
    # their results are never stored. Only K needs a mask: it feeds the sum.
    rows = offs_m % M
    cols = offs_n % N
    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + cols[None, :] * stride_wn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_start in range(0, K, BLOCK_K):
        k_left = K - k_start
        a = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        b = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        if UPCAST_DOT:  # the CPU interpreter multiplies bf16 bit patterns as integers
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if FP32_EXACT:  # fp32 inputs: no TF32 rounding, fp32 stays fp32-accurate
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    _epilogue(acc, offs_m, offs_n, M, N, bias_ptr, stride_bias, res_ptr, stride_rm, stride_rn,
              out_ptr, stride_om, stride_on, HAS_BIAS, HAS_RESIDUAL, ACTIVATION)


@triton.jit
def _epilogue(acc, offs_m, offs_n, M, N, bias_ptr, stride_bias, res_ptr, stride_rm, stride_rn,
              out_ptr, stride_om, stride_on, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
              ACTIVATION: tl.constexpr):
    """fxforge::linear's epilogue, in fp32, on an fp32 ``[rows, cols]`` accumulator: bias,
    activation, residual, then one cast and store (rows/columns past the edge are not stored)."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + (offs_n % N) * stride_bias).to(tl.float32)[None, :]
    acc = _activation(acc, ACTIVATION)
    out_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if HAS_RESIDUAL:
        res_ptrs = res_ptr + offs_m[:, None] * stride_rm + offs_n[None, :] * stride_rn
        acc += tl.load(res_ptrs, mask=out_mask, other=0.0).to(tl.float32)
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


# ----------------------------------------------------------------------------- tuning space
def _config(bm, bn, bk, group_m, warps, stages) -> Config:
    return Config.of(num_warps=warps, num_stages=stages, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                     GROUP_M=group_m)


# Triton tutorial 03's CUDA configs, a wide-K H100 tile, and narrow-M tiles for decode (M = 1..16).
# The last holds the smallest block of every dimension, so on any problem something survives.
CONFIGS = (
    _config(128, 256, 64, 8, 8, 3),
    _config(128, 128, 64, 8, 8, 3),
    _config(64, 256, 32, 8, 4, 4),
    _config(128, 128, 32, 8, 4, 4),
    _config(128, 64, 32, 8, 4, 4),
    _config(64, 128, 32, 8, 4, 4),
    _config(128, 32, 32, 8, 4, 4),
    _config(64, 32, 32, 8, 2, 5),
    _config(32, 64, 32, 8, 2, 5),
    _config(16, 64, 128, 1, 4, 4),
    _config(16, 128, 64, 1, 4, 3),
    _config(16, 32, 32, 1, 2, 2),
)
DEFAULT_SMEM_LIMIT = 232448  # bytes per block on H100 (227 KiB); pass problem["smem_limit"] otherwise
MAX_ACC_REGISTERS = 128      # fp32 accumulator registers per thread before spilling is likely


def dtype_itemsize(dtype: Union[torch.dtype, str]) -> int:
    """Bytes per element of a dtype given as a torch dtype or by name (a tuning task's problem)."""
    return (getattr(torch, dtype) if isinstance(dtype, str) else dtype).itemsize


def _fits(block: int, extent: int, smallest: int) -> bool:
    """A block no larger than the problem's extent rounded up (to the smallest block we have)."""
    return block <= max(smallest, triton.next_power_of_2(max(int(extent), 1)))


def prune(config: Config, problem: Problem) -> Optional[str]:
    """Why ``config`` cannot run well on ``problem`` ({M, N, K, dtype[, smem_limit]}), or None."""
    bm, bn, bk = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    itemsize = dtype_itemsize(problem.get("dtype", torch.float32))
    smem = config.num_stages * (bm * bk + bk * bn) * itemsize
    limit = problem.get("smem_limit", DEFAULT_SMEM_LIMIT)
    if smem > limit:
        return f"shared memory {smem} B > {limit} B"
    if bm * bn // (32 * config.num_warps) > MAX_ACC_REGISTERS:
        return f"accumulator needs {bm * bn // (32 * config.num_warps)} registers a thread"
    for name, block, extent in (("M", bm, problem["M"]), ("N", bn, problem["N"]), ("K", bk, problem["K"])):
        smallest = min(c[f"BLOCK_{name}"] for c in CONFIGS)
        if not _fits(block, extent, smallest):
            return f"BLOCK_{name}={block} larger than {name}={extent}"
    return None


TUNING_SPACE = TuningSpace("fxforge.linear", CONFIGS, default=_config(128, 128, 32, 8, 4, 4), prune=prune)


def linear_problem(x: torch.Tensor, weight: torch.Tensor) -> dict:
    """The autotuner's problem key for ``x @ weight``."""
    return {"M": x.shape[0], "N": weight.shape[1], "K": x.shape[1], "dtype": x.dtype}


def choose_config(problem: Problem) -> Config:
    """The default config if it survives pruning, else the first survivor."""
    survivors, _ = TUNING_SPACE.survivors(problem)
    if TUNING_SPACE.default in survivors or not survivors:
        return TUNING_SPACE.default
    return survivors[0]


_UNTUNED: dict[tuple, Config] = {}  # choose_config per (M bucket, N, K, dtype): it depends on no more


def launch_config(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  activation: str, residual: Optional[torch.Tensor],
                  out_dtype: Optional[torch.dtype]) -> Config:
    """The config of a launch given none. Inside an autotuning session, the session's pick
    (the backend binds tuned configs at lowering; this serves direct calls); outside one,
    :func:`choose_config`, looked up once per shape bucket (pruning sees M only through
    ``next_power_of_2``), so a forward pays a dict lookup, not a pruning pass."""
    active = current_session()
    if active is not None and active.mode != "off":
        from fxforge.kernels.triton_tuning import linear_config
        return linear_config(x.shape[0], x.shape[1], weight.shape[1], x.dtype, activation,
                             bias is not None, residual is not None, x.device,
                             _output_dtype(x, residual, out_dtype))
    key = (triton.next_power_of_2(x.shape[0]), weight.shape[1], x.shape[1], x.dtype)
    config = _UNTUNED.get(key)
    if config is None:
        config = _UNTUNED[key] = choose_config(linear_problem(x, weight))
    return config


# --------------------------------------------------------------------------------- launcher
def _check_inputs(x, weight, bias, activation, residual, out_dtype) -> None:
    if activation not in ACTIVATION_CODES:
        raise ValueError(f"triton_linear: unknown activation {activation!r}; "
                         f"one of {sorted(ACTIVATION_CODES)}")
    if x.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"triton_linear: x and weight must be 2-D, got x {list(x.shape)}, "
                         f"weight {list(weight.shape)}")
    if x.shape[1] != weight.shape[0]:
        raise ValueError(f"triton_linear: K mismatch, x {list(x.shape)} @ weight {list(weight.shape)}")
    if x.dtype != weight.dtype or x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"triton_linear: x and weight must share one of {SUPPORTED_DTYPES}, "
                         f"got {x.dtype} and {weight.dtype}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[1]):
        raise ValueError(f"triton_linear: bias {list(bias.shape)} is not [N={weight.shape[1]}]")
    if residual is not None and list(residual.shape) != [x.shape[0], weight.shape[1]]:
        raise ValueError(f"triton_linear: residual {list(residual.shape)} is not "
                         f"[{x.shape[0]}, {weight.shape[1]}]")
    if out_dtype is not None and out_dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"triton_linear: out_dtype {out_dtype} is not one of {SUPPORTED_DTYPES}")
    tensors = [t for t in (x, weight, bias, residual) if t is not None]
    if any(t.device != x.device for t in tensors):
        raise ValueError(f"triton_linear: tensors on different devices: {[str(t.device) for t in tensors]}")
    if x.device.type != "cuda" and not interpreting():
        raise ValueError(f"triton_linear: tensors on {x.device} need CUDA "
                         "(or TRITON_INTERPRET=1 to run on the CPU)")
    if any(_largest_offset(t) > MAX_OFFSET for t in tensors):
        raise ValueError("triton_linear: a tensor spans 2**31 or more elements (the kernel indexes with int32)")


def _largest_offset(t: torch.Tensor) -> int:
    return sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()) if size > 0)


def _output_dtype(x, residual, out_dtype) -> torch.dtype:
    """As the op's fake: out_dtype, else x's dtype promoted with the residual's."""
    if out_dtype is not None:
        return out_dtype
    return torch.promote_types(x.dtype, residual.dtype) if residual is not None else x.dtype


def triton_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                  activation: str = "none", residual: Optional[torch.Tensor] = None,
                  out_dtype: Optional[torch.dtype] = None, config: Optional[Config] = None) -> torch.Tensor:
    """``torch.ops.fxforge.linear`` as one Triton kernel; ``config`` None: :func:`launch_config`."""
    _check_inputs(x, weight, bias, activation, residual, out_dtype)
    M, K = x.shape
    N = weight.shape[1]
    out = torch.empty((M, N), dtype=_output_dtype(x, residual, out_dtype), device=x.device)
    if M == 0 or N == 0:
        return out
    if K == 0:  # an empty sum: only the epilogue remains, computed eagerly in fp32
        y = torch.zeros((M, N), dtype=torch.float32, device=x.device)
        y = ACTIVATIONS[activation](y + bias.float() if bias is not None else y)
        return out.copy_(y + residual.float() if residual is not None else y)
    config = config or launch_config(x, weight, bias, activation, residual, out_dtype)
    params = config.kwargs()
    grid = (triton.cdiv(M, params["BLOCK_M"]) * triton.cdiv(N, params["BLOCK_N"]),)
    res = residual if residual is not None else out  # unused pointer when HAS_RESIDUAL is False
    _linear_kernel[grid](
        x, weight, bias if bias is not None else out, res, out,
        M, N, K,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
        bias.stride(0) if bias is not None else 0, res.stride(0), res.stride(1), out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
        ACTIVATION=ACTIVATION_CODES[activation],
        FP32_EXACT=x.dtype == torch.float32,
        UPCAST_DOT=interpreting() and x.dtype == torch.bfloat16,
        num_warps=config.num_warps, num_stages=config.num_stages, **params,
    )
    return out
