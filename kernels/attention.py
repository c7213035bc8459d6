"""Flash attention (forward) with the semantics of ``F.scaled_dot_product_attention``.

Laid out as in Triton's tutorials: the reference (the test oracle), the kernel, its tuning space
with a pruning rule, and the launcher :func:`triton_attention`.

Semantics matched to torch (checked against it in the tests):
- ``q [B, H, Lq, D]``, ``k``/``v`` ``[B, Hkv, Lk, D]``; with ``enable_gqa`` and ``H % Hkv == 0``,
  query head ``h`` reads key/value head ``h // (H // Hkv)``;
- ``attn_mask``: bool (True = attend) or additive float, broadcastable to ``[B, H, Lq, Lk]``
  (read through stride-0 views, never materialized);
- ``is_causal``: query ``i`` attends keys ``j <= i`` (torch's top-left alignment, also when
  Lq != Lk); given with a mask, both apply, as torch's CPU kernels do;
- a row with no key left to attend gives zeros (torch's safe softmax).

One program computes ``BLOCK_M`` query rows of one (batch, head), streaming ``BLOCK_N`` keys at a
time with an online softmax in fp32 (exp2, the scale folded into log2 units). With ``is_causal``
the key blocks wholly above the diagonal are skipped, and only blocks that straddle it pay for
the causal mask. Head dims that are not a power of two are padded with masked (zero) lanes.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from fxforge.kernels.matmul import SUPPORTED_DTYPES, dtype_itemsize, interpreting
from fxforge.kernels.tuning import Config, Problem, TuningSpace
from fxforge.kernels.tuning import current as current_session

MAX_HEAD_DIM = 256
MASK_NONE, MASK_BOOL, MASK_ADDITIVE = 0, 1, 2


def attention_reference(q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False):
    """The oracle: the math of torch's SDPA documentation, in fp32, safe softmax, cast back."""
    heads, kv_heads = q.shape[1], k.shape[1]
    if heads != kv_heads:
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q.float() @ k.float().transpose(-2, -1)) * scale
    keep = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device)
    if is_causal:
        keep = keep.tril()
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        keep = keep & attn_mask
    elif attn_mask is not None:
        scores = scores + attn_mask.float()
    scores = scores.masked_fill(~keep, float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row with no key: zeros
    return (weights @ v.float()).to(q.dtype)


# ---------------------------------------------------------------------------------- the kernel
@triton.jit
def _scores(q, k_t, qk_scale, FP32_EXACT: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """``q @ k_t`` scaled (log2 units); shared with the decode kernel (decode_attention.py)."""
    if UPCAST_DOT:  # the CPU interpreter multiplies bf16 bit patterns as integers
        k_t = k_t.to(tl.float32)
    if FP32_EXACT:  # fp32 inputs: no TF32 rounding
        return tl.dot(q, k_t, input_precision="ieee") * qk_scale
    return tl.dot(q, k_t) * qk_scale


@triton.jit
def _online_softmax_step(qk, keep, v, acc, l_i, m_i, FP32_EXACT: tl.constexpr,
                         UPCAST_DOT: tl.constexpr):
    """Fold one block of scores (``keep``: the visible ones) and its values into the running
    (acc, l_i, m_i) of an online softmax; returns the new triple."""
    qk = tl.where(keep, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all masked so far: no NaN
    p = tl.math.exp2(qk - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    p = p.to(v.dtype)
    if UPCAST_DOT:
        p = p.to(tl.float32)
        v = v.to(tl.float32)
    if FP32_EXACT:
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p, v)
    return acc, l_i, m_new


@triton.jit
def _attend_keys(acc, l_i, m_i, q, k_base, v_base, mask_base, offs_m, start, end,
                 stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
                 Lq, Lk, D, qk_scale,
                 MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, FP32_EXACT: tl.constexpr,
                 UPCAST_DOT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Fold keys [start, end) into the running (acc, l_i, m_i) of an online softmax (log2 units)."""
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < Lk
        k_t = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                      mask=d_ok[:, None] & n_ok[None, :], other=0.0)
        qk = _scores(q, k_t, qk_scale, FP32_EXACT, UPCAST_DOT)
        keep = n_ok[None, :] & (offs_m[:, None] >= 0)
        if CAUSAL:
            keep = keep & (offs_n[None, :] <= offs_m[:, None])
        if MASK_KIND != 0:
            mask_ptrs = mask_base + offs_m[:, None] * stride_mm + offs_n[None, :] * stride_mn
            in_bounds = (offs_m[:, None] < Lq) & n_ok[None, :]
            if MASK_KIND == 1:
                keep = keep & (tl.load(mask_ptrs, mask=in_bounds, other=0) != 0)
            else:
                qk += tl.load(mask_ptrs, mask=in_bounds, other=0.0).to(tl.float32) * 1.4426950408889634
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        acc, l_i, m_i = _online_softmax_step(qk, keep, v, acc, l_i, m_i, FP32_EXACT, UPCAST_DOT)
    return acc, l_i, m_i


@triton.jit
def _attention_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr,
    stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd, stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ob, stride_oh, stride_om, stride_od,
    H, Lq, Lk, D, kv_group, qk_scale,
    MASK_KIND: tl.constexpr, IS_CAUSAL: tl.constexpr, FP32_EXACT: tl.constexpr,
    UPCAST_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One flat grid axis (CUDA caps the second at 65535): a head's query blocks run side by side.
    blocks_m = tl.cdiv(Lq, BLOCK_M)
    start_m = tl.program_id(0) % blocks_m
    off_bh = tl.program_id(0) // blocks_m
    off_b = (off_bh // H).to(tl.int64)
    off_h = (off_bh % H).to(tl.int64)
    off_hkv = off_h // kv_group
    k_base = k_ptr + off_b * stride_kb + off_hkv * stride_kh
    v_base = v_ptr + off_b * stride_vb + off_hkv * stride_vh
    mask_base = mask_ptr + off_b * stride_mb + off_h * stride_mh

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_mask = (offs_m[:, None] < Lq) & (offs_d[None, :] < D)
    q = tl.load(q_ptr + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qm
                + offs_d[None, :] * stride_qd, mask=q_mask, other=0.0)
    if UPCAST_DOT:
        q = q.to(tl.float32)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    if IS_CAUSAL:
        # Keys below every row of this block need no causal mask; the block straddling the
        # diagonal does; the keys above it are never visited.
        full_end = (start_m * BLOCK_M) // BLOCK_N * BLOCK_N
        diag_end = min((start_m + 1) * BLOCK_M, Lk)
        acc, l_i, m_i = _attend_keys(acc, l_i, m_i, q, k_base, v_base, mask_base, offs_m, 0,
                                     min(full_end, Lk), stride_kn, stride_kd, stride_vn, stride_vd,
                                     stride_mm, stride_mn, Lq, Lk, D, qk_scale, MASK_KIND, False,
                                     FP32_EXACT, UPCAST_DOT, BLOCK_N, BLOCK_D)
        acc, l_i, m_i = _attend_keys(acc, l_i, m_i, q, k_base, v_base, mask_base, offs_m, full_end,
                                     diag_end, stride_kn, stride_kd, stride_vn, stride_vd,
                                     stride_mm, stride_mn, Lq, Lk, D, qk_scale, MASK_KIND, True,
                                     FP32_EXACT, UPCAST_DOT, BLOCK_N, BLOCK_D)
    else:
        acc, l_i, m_i = _attend_keys(acc, l_i, m_i, q, k_base, v_base, mask_base, offs_m, 0, Lk,
                                     stride_kn, stride_kd, stride_vn, stride_vd, stride_mm,
                                     stride_mn, Lq, Lk, D, qk_scale, MASK_KIND, False,
                                     FP32_EXACT, UPCAST_DOT, BLOCK_N, BLOCK_D)
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # no key attended: acc is 0, so is out
    tl.store(out_ptr + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om
             + offs_d[None, :] * stride_od, out.to(out_ptr.dtype.element_ty), mask=q_mask)


# ----------------------------------------------------------------------------- tuning space
def _config(bm, bn, warps, stages) -> Config:
    return Config.of(num_warps=warps, num_stages=stages, BLOCK_M=bm, BLOCK_N=bn)


# Tutorial 06's forward space (BLOCK_M 64/128, BLOCK_N 32..128) and small tiles for decode; the
# last holds the smallest block of both dimensions, so on any problem something survives.
CONFIGS = (
    _config(128, 64, 4, 3),
    _config(128, 128, 8, 3),
    _config(128, 64, 8, 3),
    _config(128, 32, 4, 4),
    _config(64, 64, 4, 3),
    _config(64, 32, 4, 4),
    _config(64, 128, 4, 2),
    _config(16, 64, 4, 2),
    _config(16, 32, 2, 3),
)
DEFAULT_SMEM_LIMIT = 232448  # bytes per block on H100 (227 KiB); pass problem["smem_limit"] otherwise
MAX_FP32_REGISTERS = 192     # acc [BM, D] + scores [BM, BN] in fp32 registers per thread


def head_block(head_dim: int) -> int:
    """The padded head dim the kernel works on (tl.dot needs at least 16)."""
    return max(16, triton.next_power_of_2(int(head_dim)))


def prune(config: Config, problem: Problem) -> Optional[str]:
    """Why ``config`` cannot run well on ``problem`` ({Lq, Lk, D, dtype[, smem_limit]}), or None."""
    bm, bn, bd = config["BLOCK_M"], config["BLOCK_N"], head_block(problem["D"])
    itemsize = dtype_itemsize(problem.get("dtype", torch.float32))
    smem = (bm * bd + config.num_stages * 2 * bn * bd) * itemsize  # q, then k and v per stage
    limit = problem.get("smem_limit", DEFAULT_SMEM_LIMIT)
    if smem > limit:
        return f"shared memory {smem} B > {limit} B"
    registers = (bm * bd + bm * bn) // (32 * config.num_warps)
    if registers > MAX_FP32_REGISTERS:
        return f"accumulators need {registers} registers a thread"
    for name, extent in (("M", problem["Lq"]), ("N", problem["Lk"])):
        smallest = min(c[f"BLOCK_{name}"] for c in CONFIGS)
        if config[f"BLOCK_{name}"] > max(smallest, triton.next_power_of_2(max(int(extent), 1))):
            length = "Lq" if name == "M" else "Lk"
            return f"BLOCK_{name}={config[f'BLOCK_{name}']} larger than {length}={extent}"
    return None


TUNING_SPACE = TuningSpace("fxforge.attention", CONFIGS, default=_config(128, 64, 4, 3), prune=prune)


def attention_problem(q: torch.Tensor, k: torch.Tensor) -> dict:
    """The autotuner's problem key."""
    return {"B": q.shape[0], "H": q.shape[1], "Lq": q.shape[2], "Lk": k.shape[2], "D": q.shape[3],
            "dtype": q.dtype}


def choose_config(problem: Problem) -> Config:
    """The default config if it survives pruning, else the first survivor."""
    survivors, _ = TUNING_SPACE.survivors(problem)
    if TUNING_SPACE.default in survivors or not survivors:
        return TUNING_SPACE.default
    return survivors[0]


_UNTUNED: dict[tuple, Config] = {}  # choose_config per (Lq bucket, Lk bucket, D, dtype)


def launch_config(q: torch.Tensor, k: torch.Tensor, attn_mask: Optional[torch.Tensor],
                  is_causal: bool) -> Config:
    """The config of a launch given none: the tuning session's pick inside one (the backend
    binds tuned configs at lowering; this serves direct calls), else :func:`choose_config`,
    looked up once per shape bucket (pruning sees the lengths only through
    ``next_power_of_2``)."""
    active = current_session()
    if active is not None and active.mode != "off":
        from fxforge.kernels.triton_tuning import attention_config, mask_kind_name
        return attention_config(q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2],
                                q.shape[3], q.dtype, is_causal, mask_kind_name(attn_mask), q.device)
    key = (triton.next_power_of_2(q.shape[2]), triton.next_power_of_2(k.shape[2]), q.shape[3],
           q.dtype)
    config = _UNTUNED.get(key)
    if config is None:
        config = _UNTUNED[key] = choose_config(attention_problem(q, k))
    return config


# --------------------------------------------------------------------------------- launcher
def _check_inputs(q, k, v, attn_mask, enable_gqa) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"triton_attention: q, k, v must be 4-D [B, H, L, D], got {list(q.shape)}, "
                         f"{list(k.shape)}, {list(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"triton_attention: k {list(k.shape)} and v {list(v.shape)} differ")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"triton_attention: q {list(q.shape)} and k {list(k.shape)} disagree on batch "
                         "or head dim")
    heads, kv_heads = q.shape[1], k.shape[1]
    if heads != kv_heads and not (enable_gqa and kv_heads > 0 and heads % kv_heads == 0):
        raise ValueError(f"triton_attention: {heads} query heads and {kv_heads} key/value heads need "
                         "enable_gqa=True and a key/value head count that divides the query heads")
    if not 1 <= q.shape[3] <= MAX_HEAD_DIM:
        raise ValueError(f"triton_attention: head dim {q.shape[3]} unsupported (1..{MAX_HEAD_DIM})")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"triton_attention: q, k, v must share one of {SUPPORTED_DTYPES}, "
                         f"got {q.dtype}, {k.dtype}, {v.dtype}")
    if attn_mask is not None and attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise ValueError(f"triton_attention: attn_mask must be bool or floating point, got {attn_mask.dtype}")
    if attn_mask is not None:
        _broadcast_mask(attn_mask, (q.shape[0], heads, q.shape[2], k.shape[2]))
    tensors = [t for t in (q, k, v, attn_mask) if t is not None]
    if any(t.device != q.device for t in tensors):
        raise ValueError("triton_attention: tensors on different devices: "
                         f"{[str(t.device) for t in tensors]}")
    if q.device.type != "cuda" and not interpreting():
        raise ValueError(f"triton_attention: tensors on {q.device} need CUDA "
                         "(or TRITON_INTERPRET=1 to run on the CPU)")


def _broadcast_mask(attn_mask: torch.Tensor, shape: tuple[int, int, int, int]) -> torch.Tensor:
    """``attn_mask`` as a [B, H, Lq, Lk] view: broadcast dims get stride 0, nothing is copied."""
    try:
        return attn_mask.expand(shape)
    except RuntimeError as error:
        raise ValueError(f"triton_attention: attn_mask {list(attn_mask.shape)} does not broadcast to "
                         f"{list(shape)}") from error


def triton_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
                     scale: Optional[float] = None, enable_gqa: bool = False,
                     config: Optional[Config] = None) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` (no dropout) as one flash-attention kernel launch;
    ``config`` None: :func:`launch_config`."""
    _check_inputs(q, k, v, attn_mask, enable_gqa)
    batch, heads, len_q, head_dim = q.shape
    len_k = k.shape[2]
    out = torch.empty((batch, heads, len_q, head_dim), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    mask_kind = MASK_NONE
    mask = q  # an unused pointer when there is no mask
    if attn_mask is not None:
        mask = _broadcast_mask(attn_mask, (batch, heads, len_q, len_k))
        mask_kind = MASK_BOOL if attn_mask.dtype == torch.bool else MASK_ADDITIVE
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    config = config or launch_config(q, k, attn_mask, is_causal)
    grid = (triton.cdiv(len_q, config["BLOCK_M"]) * batch * heads,)
    _attention_kernel[grid](
        q, k, v, mask, out,
        *q.stride(), *k.stride(), *v.stride(), *mask.stride(), *out.stride(),
        heads, len_q, len_k, head_dim, heads // k.shape[1], scale * 1.4426950408889634,
        MASK_KIND=mask_kind, IS_CAUSAL=bool(is_causal),
        FP32_EXACT=q.dtype == torch.float32,
        UPCAST_DOT=interpreting() and q.dtype == torch.bfloat16,
        BLOCK_D=head_block(head_dim), num_warps=config.num_warps, num_stages=config.num_stages,
        **config.kwargs(),
    )
    return out
