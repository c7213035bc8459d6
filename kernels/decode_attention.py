"""Attention of a few new positions against a static KV cache (``fxforge::cached_attention``).

The CPU path is :func:`~fxforge.kernels.decode_attention_cpu.cpu_cached_attention` (re-exported
here). On GPUs, :func:`triton_cached_attention` is split-K ("flash-decoding"): at decode a
(batch, head) has one query row, so parallelism must come from the keys. The grid is
(batch x kv head x query-row block, split); each program folds its slice of the visible keys into
a partial (max, sum, weighted values) with an online softmax in fp32, and a second small kernel
merges the splits by log-sum-exp. With one split the first kernel writes the output directly.

- The query heads sharing a kv head are rows of one program (GQA reads each key once), and the
  rows are ordered by position, so a block of prefill rows stops at its last row's diagonal.
- The cache length ``L`` is read from ``cache_pos`` on the device, and the grid depends only on
  the shapes (the split width is ``ceil(L + t, SPLITS)`` rounded to ``BLOCK_N``, computed in the
  kernel): no host sync, and a launch replays under a CUDA graph at any ``L``.
- The new keys/values are read from ``k``/``v`` directly and written into the caches by the
  program that owns their split (row block 0): the same launch does both, race-free.
- Positions past the cache are never read or written. The overflow error needs ``L`` on the
  host, so it is raised when ``cache_pos`` is a CPU tensor (the interpreter, or a caller that keeps
  the position on the host); with ``cache_pos`` on the GPU the caller bounds the length.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from fxforge.irgraph.ops import _check_cached, cache_overflow
from fxforge.kernels.attention import _online_softmax_step, _scores
from fxforge.kernels.decode_attention_cpu import cpu_cached_attention  # noqa: F401  (re-export)
from fxforge.kernels.matmul import SUPPORTED_DTYPES, dtype_itemsize, interpreting
from fxforge.kernels.tuning import Config, Problem, TuningSpace

MAX_HEAD_DIM = 256


# ---------------------------------------------------------------------------------- kernels
@triton.jit
def _write_new_rows(src, dst, T, length, start, end, offs_d, d_ok, stride_sm, stride_sd,
                    stride_dn, stride_dd, BLOCK_T: tl.constexpr):
    """Rows ``i < T`` of ``src`` whose position ``length + i`` lies in [start, end) -> ``dst``."""
    for first in range(0, T, BLOCK_T):
        offs_t = first + tl.arange(0, BLOCK_T)
        ok = (offs_t < T) & (length + offs_t >= start) & (length + offs_t < end)
        mask = ok[:, None] & d_ok[None, :]
        rows = tl.load(src + offs_t[:, None] * stride_sm + offs_d[None, :] * stride_sd, mask=mask,
                       other=0.0)
        tl.store(dst + (length + offs_t)[:, None] * stride_dn + offs_d[None, :] * stride_dd, rows,
                 mask=mask)


@triton.jit
def _fold_keys(acc, l_i, m_i, q, k_base, v_base, first_pos, first, last, length, pos_m,
               stride_kn, stride_kd, stride_vn, stride_vd, qk_scale, offs_d, d_ok, offs_dv, dv_ok,
               FP32_EXACT: tl.constexpr, UPCAST_DOT: tl.constexpr, BLOCK_N: tl.constexpr):
    """Fold the keys at positions [first, last) -- row ``n - first_pos`` of ``k_base``/``v_base``
    -- into the running (acc, l_i, m_i) of an online softmax (log2 units). Row ``m`` sees the
    positions ``<= length + pos_m``."""
    for start_n in range(first, last, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < last
        rows = offs_n - first_pos
        k_t = tl.load(k_base + rows[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                      mask=d_ok[:, None] & n_ok[None, :], other=0.0)
        qk = _scores(q, k_t, qk_scale, FP32_EXACT, UPCAST_DOT)
        keep = (offs_n[None, :] <= length + pos_m[:, None]) & n_ok[None, :]
        v = tl.load(v_base + rows[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                    mask=n_ok[:, None] & dv_ok[None, :], other=0.0)
        acc, l_i, m_i = _online_softmax_step(qk, keep, v, acc, l_i, m_i, FP32_EXACT, UPCAST_DOT)
    return acc, l_i, m_i


@triton.jit
def _split_kernel(
    q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, pos_ptr, out_ptr, part_ptr,
    stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_km, stride_kd,
    stride_vb, stride_vh, stride_vm, stride_vd, stride_kcb, stride_kch, stride_kcn, stride_kcd,
    stride_vcb, stride_vch, stride_vcn, stride_vcd, stride_ob, stride_oh, stride_om, stride_od,
    Hkv, T, D, Dv, capacity, group, qk_scale,
    SPLITS: tl.constexpr, FP32_EXACT: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, BLOCK_T: tl.constexpr,
):
    row_blocks = tl.cdiv(group * T, BLOCK_M)
    block_m = tl.program_id(0) % row_blocks
    off_bh = tl.program_id(0) // row_blocks
    split = tl.program_id(1)
    off_b = (off_bh // Hkv).to(tl.int64)
    off_hkv = (off_bh % Hkv).to(tl.int64)
    length = tl.load(pos_ptr).to(tl.int32)
    n_keys = tl.minimum(length + T, capacity)
    per_split = tl.cdiv(tl.cdiv(n_keys, SPLITS), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, n_keys)
    k_new = k_ptr + off_b * stride_kb + off_hkv * stride_kh
    v_new = v_ptr + off_b * stride_vb + off_hkv * stride_vh
    k_base = kc_ptr + off_b * stride_kcb + off_hkv * stride_kch
    v_base = vc_ptr + off_b * stride_vcb + off_hkv * stride_vch
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = offs_d < D
    dv_ok = offs_dv < Dv

    if block_m == 0:  # the new positions of this split go into the caches (read below from k/v)
        _write_new_rows(k_new, k_base, T, length, start, end, offs_d, d_ok, stride_km, stride_kd,
                        stride_kcn, stride_kcd, BLOCK_T)
        _write_new_rows(v_new, v_base, T, length, start, end, offs_dv, dv_ok, stride_vm,
                        stride_vd, stride_vcn, stride_vcd, BLOCK_T)

    # rows of this program: (position, head of the group), position-major
    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < group * T
    pos_m = offs_m // group
    off_h = off_hkv * group + offs_m % group
    q_ptrs = q_ptr + off_b * stride_qb + off_h[:, None] * stride_qh + pos_m[:, None] * stride_qm \
        + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST_DOT:
        q = q.to(tl.float32)
    last_row = tl.minimum(block_m * BLOCK_M + BLOCK_M, group * T) - 1
    end = tl.minimum(end, length + last_row // group + 1)  # keys past every row's diagonal

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    # keys of this split already in the cache, then the new ones, read from k/v themselves
    acc, l_i, m_i = _fold_keys(acc, l_i, m_i, q, k_base, v_base, 0, start, tl.minimum(end, length),
                               length, pos_m, stride_kcn, stride_kcd, stride_vcn, stride_vcd,
                               qk_scale, offs_d, d_ok, offs_dv, dv_ok, FP32_EXACT, UPCAST_DOT,
                               BLOCK_N)
    acc, l_i, m_i = _fold_keys(acc, l_i, m_i, q, k_new, v_new, length, tl.maximum(start, length),
                               end, length, pos_m, stride_km, stride_kd, stride_vm, stride_vd,
                               qk_scale, offs_d, d_ok, offs_dv, dv_ok, FP32_EXACT, UPCAST_DOT,
                               BLOCK_N)

    if SPLITS == 1:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        out_ptrs = out_ptr + off_b * stride_ob + off_h[:, None] * stride_oh \
            + pos_m[:, None] * stride_om + offs_dv[None, :] * stride_od
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dv_ok[None, :])
    else:  # partials [B, H, T, SPLITS, Dv + 2]: weighted values, then max and sum (log2 units)
        heads = Hkv * group
        row = ((off_b * heads + off_h) * T + pos_m) * SPLITS + split
        part = part_ptr + row * (Dv + 2)
        tl.store(part[:, None] + offs_dv[None, :], acc, mask=row_ok[:, None] & dv_ok[None, :])
        tl.store(part + Dv, m_i, mask=row_ok)
        tl.store(part + Dv + 1, l_i, mask=row_ok)


@triton.jit
def _combine_kernel(part_ptr, out_ptr, H, T, Dv, stride_ob, stride_oh, stride_om, stride_od,
                    SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr):
    """One output row: the log-sum-exp merge of its splits' partials."""
    row = tl.program_id(0).to(tl.int64)
    pos = row % T
    head = (row // T) % H
    batch = row // (T * H)
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    s_ok = offs_s < SPLITS
    dv_ok = offs_dv < Dv
    part = part_ptr + (row * SPLITS + offs_s) * (Dv + 2)
    m = tl.load(part + Dv, mask=s_ok, other=float("-inf"))
    l = tl.load(part + Dv + 1, mask=s_ok, other=0.0)
    acc = tl.load(part[:, None] + offs_dv[None, :], mask=s_ok[:, None] & dv_ok[None, :], other=0.0)
    m_max = tl.max(m, 0)
    weight = tl.math.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))  # empty split: 0
    total = tl.sum(weight * l, 0)
    out = tl.sum(acc * weight[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + batch * stride_ob + head * stride_oh + pos * stride_om + offs_dv * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=dv_ok)


# ----------------------------------------------------------------------------- tuning space
def _config(bn: int, splits: int, warps: int, stages: int) -> Config:
    return Config.of(num_warps=warps, num_stages=stages, BLOCK_N=bn, SPLITS=splits)


CONFIGS = tuple(
    _config(bn, splits, warps, stages)
    for bn in (32, 64, 128) for splits in (1, 2, 4, 8, 16, 32, 64)
    for warps, stages in ((4, 2), (4, 3), (8, 2))
) + (_config(16, 1, 2, 2), _config(16, 2, 2, 2))  # tiny caches: the smallest blocks
DEFAULT_SMEM_LIMIT = 232448  # bytes per block on H100 (227 KiB); problem["smem_limit"] otherwise
DEFAULT_SM_COUNT = 132       # H100 SXM; problem["sm_count"] otherwise
MAX_FP32_REGISTERS = 192     # 32-bit values a thread may hold (see prune)
MAX_BLOCK_M = 64


def head_block(head_dim: int) -> int:
    """The padded head dim the kernel works on (tl.dot needs at least 16)."""
    return max(16, triton.next_power_of_2(int(head_dim)))


def row_block(rows: int, dtype: torch.dtype | str) -> int:
    """Query rows per program (heads of a group x new positions), padded for tl.dot; fp32's
    exact dot keeps its operands in registers, so its blocks stay at 16 rows."""
    largest = 16 if dtype in (torch.float32, "float32") else MAX_BLOCK_M
    return min(largest, max(16, triton.next_power_of_2(int(rows))))


def used_splits(config: Config, keys: int) -> int:
    """How many of the config's splits get keys when ``keys`` keys are visible."""
    per_split = math.ceil(math.ceil(keys / config["SPLITS"]) / config["BLOCK_N"]) * config["BLOCK_N"]
    return math.ceil(keys / per_split) if keys > 0 else 0


def prune(config: Config, problem: Problem) -> Optional[str]:
    """Why ``config`` cannot run well on ``problem`` ({H, Hkv, T, Lk, D[, Dv], dtype
    [, smem_limit]}; ``Lk``: the keys attended, cached + new), or None."""
    bn, splits = config["BLOCK_N"], config["SPLITS"]
    bd, bdv = head_block(problem["D"]), head_block(problem.get("Dv", problem["D"]))
    dtype = problem.get("dtype", torch.float32)
    bm = row_block(problem["H"] // problem["Hkv"] * problem["T"], dtype)
    itemsize = dtype_itemsize(dtype)
    smem = (bm * bd + config.num_stages * bn * (bd + bdv)) * itemsize  # q, then k and v per stage
    limit = problem.get("smem_limit", DEFAULT_SMEM_LIMIT)
    if smem > limit:
        return f"shared memory {smem} B > {limit} B"
    # fp32 accumulator and scores, and the k and v tiles (fitted to ptxas' counts for sm_90:
    # above ~190 a thread, it spills)
    values = bm * bdv + bm * bn + bn * (bd + bdv) * itemsize // 4
    registers = values // (32 * config.num_warps)
    if registers > MAX_FP32_REGISTERS:
        return f"tiles need {registers} registers a thread"
    keys = max(int(problem["Lk"]), 1)
    smallest = min(c["BLOCK_N"] for c in CONFIGS)
    if bn > max(smallest, triton.next_power_of_2(keys)):
        return f"BLOCK_N={bn} larger than Lk={keys}"
    if used_splits(config, keys) < splits:
        return f"only {used_splits(config, keys)} of SPLITS={splits} get keys at Lk={keys}"
    return None


TUNING_SPACE = TuningSpace("fxforge.decode_attention", CONFIGS, default=_config(64, 8, 4, 2),
                           prune=prune)


def decode_problem(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: int) -> dict:
    """The autotuner's problem key; ``keys``: the cached + new positions to tune for."""
    return {"B": q.shape[0], "H": q.shape[1], "Hkv": k.shape[1], "T": q.shape[2], "Lk": int(keys),
            "D": q.shape[3], "Dv": v.shape[3], "dtype": q.dtype}


def choose_config(problem: Problem) -> Config:
    """The untuned choice: 4 warps, 2 stages and BLOCK_N=64 (the closest that survives), with the
    fewest splits that give each SM a program (the most that survive when none does)."""
    survivors, _ = TUNING_SPACE.survivors(problem)
    if not survivors:
        return TUNING_SPACE.default
    def distance(c: Config) -> tuple:
        return ((c.num_warps, c.num_stages) != (4, 2), abs(math.log2(c["BLOCK_N"] / 64)),
                -c["BLOCK_N"])
    best = min(survivors, key=distance)
    family = sorted((c for c in survivors if distance(c) == distance(best)), key=lambda c: c["SPLITS"])
    rows = problem["H"] // problem["Hkv"] * problem["T"]
    blocks = math.ceil(rows / row_block(rows, problem.get("dtype", torch.float32)))
    programs = problem["B"] * problem["Hkv"] * blocks
    sms = problem.get("sm_count", DEFAULT_SM_COUNT)
    return next((c for c in family if programs * c["SPLITS"] >= sms), family[-1])


_UNTUNED: dict[tuple, Config] = {}


def launch_config(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, capacity: int) -> Config:
    """The config of a launch given none: :func:`choose_config` for a full cache (the grid is
    fixed for every length, see the module docstring), looked up once per shape."""
    key = (q.shape, k.shape[1], v.shape[3], capacity, q.dtype)
    config = _UNTUNED.get(key)
    if config is None:
        problem = decode_problem(q, k, v, capacity)
        if q.is_cuda:
            props = torch.cuda.get_device_properties(q.device)
            problem["sm_count"] = props.multi_processor_count
            problem["smem_limit"] = getattr(props, "shared_memory_per_block_optin", DEFAULT_SMEM_LIMIT)
        config = _UNTUNED[key] = choose_config(problem)
    return config


# --------------------------------------------------------------------------------- launcher
def _check_inputs(q, k, v, k_cache, v_cache, cache_pos) -> None:
    _check_cached(q, k, v, k_cache, v_cache, cache_pos)
    if q.shape[2] != k.shape[2] or k.shape[2] != v.shape[2] or q.shape[3] != k.shape[3] \
            or k.shape[3] != k_cache.shape[3] or v.shape[3] != v_cache.shape[3] \
            or k_cache.shape[2] != v_cache.shape[2]:
        raise ValueError(f"triton_cached_attention: q {list(q.shape)}, k {list(k.shape)}, "
                         f"v {list(v.shape)}, caches {list(k_cache.shape)}/{list(v_cache.shape)} "
                         "disagree on new positions, head dims or capacity")
    if max(q.shape[3], v.shape[3]) > MAX_HEAD_DIM:
        raise ValueError(f"triton_cached_attention: head dims {q.shape[3]}/{v.shape[3]} "
                         f"unsupported (at most {MAX_HEAD_DIM})")
    tensors = (q, k, v, k_cache, v_cache)
    if q.dtype not in SUPPORTED_DTYPES or any(t.dtype != q.dtype for t in tensors):
        raise ValueError(f"triton_cached_attention: q, k, v and the caches must share one of "
                         f"{SUPPORTED_DTYPES}, got {[t.dtype for t in tensors]}")
    if any(t.device != q.device for t in tensors):
        raise ValueError("triton_cached_attention: tensors on different devices: "
                         f"{[str(t.device) for t in tensors]}")
    if q.device.type != "cuda" and not interpreting():
        raise ValueError(f"triton_cached_attention: tensors on {q.device} need CUDA "
                         "(or TRITON_INTERPRET=1 to run on the CPU)")


def triton_cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            k_cache: torch.Tensor, v_cache: torch.Tensor, cache_pos: torch.Tensor,
                            scale: Optional[float] = None,
                            config: Optional[Config] = None) -> torch.Tensor:
    """``fxforge::cached_attention`` as one split-K launch (plus the merge when SPLITS > 1);
    ``config`` None: :func:`launch_config`."""
    _check_inputs(q, k, v, k_cache, v_cache, cache_pos)
    batch, heads, new, head_dim = q.shape
    kv_heads, value_dim, capacity = k.shape[1], v.shape[3], k_cache.shape[2]
    if cache_pos.device != q.device:  # a host-side position: check it here, then ship it
        length = int(cache_pos.reshape(-1)[0])
        if length < 0 or length + new > capacity:
            raise cache_overflow(length, new, capacity)
        cache_pos = cache_pos.to(q.device, non_blocking=True)
    elif not cache_pos.is_cuda:
        length = int(cache_pos.reshape(-1)[0])
        if length < 0 or length + new > capacity:
            raise cache_overflow(length, new, capacity)
    out = torch.empty((batch, heads, new, value_dim), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    config = config or launch_config(q, k, v, capacity)
    splits = config["SPLITS"]
    group = heads // kv_heads
    block_m = row_block(group * new, q.dtype)
    part = out if splits == 1 else torch.empty(
        (batch * heads * new * splits, value_dim + 2), dtype=torch.float32, device=q.device)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    grid = (batch * kv_heads * triton.cdiv(group * new, block_m), splits)
    _split_kernel[grid](
        q, k, v, k_cache, v_cache, cache_pos, out, part,
        *q.stride(), *k.stride(), *v.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(),
        kv_heads, new, head_dim, value_dim, capacity, group, scale * 1.4426950408889634,
        SPLITS=splits, FP32_EXACT=q.dtype == torch.float32,
        UPCAST_DOT=interpreting() and q.dtype == torch.bfloat16, BLOCK_M=block_m,
        BLOCK_N=config["BLOCK_N"], BLOCK_D=head_block(head_dim), BLOCK_DV=head_block(value_dim),
        BLOCK_T=min(triton.next_power_of_2(new), 32), num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    if splits > 1:
        _combine_kernel[(batch * heads * new,)](
            part, out, heads, new, value_dim, *out.stride(), SPLITS=splits,
            BLOCK_S=triton.next_power_of_2(splits), BLOCK_DV=head_block(value_dim),
            num_warps=4 if value_dim * splits > 4096 else 2)
    return out
