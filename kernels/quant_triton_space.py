"""The tuning spaces of the quantized Triton kernels (``kernels/quant_triton.py``): the
dequant-fused matmul's (block sizes, ``GROUP_M``, warps, stages) and the split-K GEMV's
(``BLOCK_N``, ``BLOCK_K``, ``SPLIT_K``), their pruning rules and the untuned choice.

A problem is ``{M, N, K, dtype, format[, smem_limit]}`` (``dtype`` a torch dtype or its name).
M at most :data:`GEMV_MAX_ROWS` (decode) runs the GEMV, larger M the matmul.
"""
from __future__ import annotations

import math
from typing import Optional

import triton

from fxforge.irgraph.weight_format import implemented_format
from fxforge.kernels import matmul
from fxforge.kernels.tuning import Config, Problem, TuningSpace

GEMV_MAX_ROWS = 4   # up to this many rows (decode), the GEMV: each row re-reads the codes (from L2)


_matmul_config = matmul._config   # the dense kernel's knobs: (bm, bn, bk, group_m, warps, stages)


def _gemv_config(bn, bk, split_k) -> Config:
    return Config.of(num_warps=8 if bn * bk >= 32768 else 4, num_stages=3, BLOCK_N=bn, BLOCK_K=bk,
                     SPLIT_K=split_k)


# BLOCK_K >= 32: an int4 tile is two dots over BLOCK_K / 2 code rows, and tl.dot needs 16. The
# last config holds the smallest block of every dimension, so on any problem something survives.
MATMUL_CONFIGS = (
    _matmul_config(128, 128, 64, 8, 8, 3),
    _matmul_config(128, 128, 32, 8, 4, 4),
    _matmul_config(64, 128, 64, 8, 4, 3),
    _matmul_config(128, 64, 32, 8, 4, 4),
    _matmul_config(64, 64, 64, 8, 4, 3),
    _matmul_config(64, 64, 128, 8, 4, 3),
    _matmul_config(32, 64, 64, 8, 4, 3),
    _matmul_config(16, 128, 128, 1, 4, 3),
    _matmul_config(16, 64, 64, 1, 4, 3),
    _matmul_config(16, 32, 32, 1, 2, 2),
)
GEMV_CONFIGS = tuple(_gemv_config(bn, bk, split) for bn in (32, 64, 128, 256) for bk in (64, 128, 256)
                     for split in (1, 2, 4, 8, 16))
MAX_TILE_REGISTERS = 192   # fp32 accumulator + dequantized tile values a thread holds
GEMV_TARGET_PROGRAMS = 256  # ~2 programs per SM of an H100-class GPU: the untuned split-K aims here


def _code_rows(config: Config, problem: Problem) -> int:
    """Stored code rows per K block (two values of K per byte row for int4)."""
    return config["BLOCK_K"] // implemented_format(problem["format"]).codes_per_row


def _too_big(config: Config, problem: Problem, smallest: dict) -> Optional[str]:
    names = [n for n in ("M", "N", "K") if f"BLOCK_{n}" in config.kwargs()]
    for name in names:
        block, extent = config[f"BLOCK_{name}"], problem[name]
        if not matmul._fits(block, extent, smallest[name]):
            return f"BLOCK_{name}={block} larger than {name}={extent}"
    return None


def _smallest(configs) -> dict:
    return {n: min(c[f"BLOCK_{n}"] for c in configs if f"BLOCK_{n}" in c.kwargs())
            for n in ("M", "N", "K") if any(f"BLOCK_{n}" in c.kwargs() for c in configs)}


def prune_matmul(config: Config, problem: Problem) -> Optional[str]:
    """Why ``config`` cannot run well on ``problem`` ({M, N, K, dtype, format[, smem_limit]})."""
    bm, bn, bk = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    smem = config.num_stages * (bm * bk * matmul.dtype_itemsize(problem["dtype"]) +
                                _code_rows(config, problem) * bn)
    limit = problem.get("smem_limit", matmul.DEFAULT_SMEM_LIMIT)
    if smem > limit:
        return f"shared memory {smem} B > {limit} B"
    per_thread = (bm * bn + bk * bn) // (32 * config.num_warps)
    if per_thread > MAX_TILE_REGISTERS:
        return f"accumulator and weight tile need {per_thread} registers a thread"
    return _too_big(config, problem, _smallest(MATMUL_CONFIGS))


def gemv_splits(k: int, block_k: int, split_k: int) -> tuple[int, int]:
    """(K per split, a multiple of BLOCK_K; splits that have work) for a split-K launch."""
    per_split = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    return per_split, triton.cdiv(k, per_split)


def prune_gemv(config: Config, problem: Problem) -> Optional[str]:
    """Why the split-K GEMV ``config`` cannot run well on ``problem`` ({N, K, format, ...})."""
    per_thread = _code_rows(config, problem) * config["BLOCK_N"] // (32 * config.num_warps)
    if per_thread > MAX_TILE_REGISTERS:
        return f"weight tile needs {per_thread} registers a thread"
    split, block_k = config["SPLIT_K"], config["BLOCK_K"]
    launched = gemv_splits(problem["K"], block_k, split)[1]
    if split > 1 and launched == gemv_splits(problem["K"], block_k, split // 2)[1]:
        # splits are whole blocks: past K / BLOCK_K, more SPLIT_K launches the same programs
        return f"SPLIT_K={split} launches the same {launched} splits as SPLIT_K={split // 2}"
    return _too_big(config, problem, _smallest(GEMV_CONFIGS))


MATMUL_SPACE = TuningSpace("fxforge.quant_linear", MATMUL_CONFIGS,
                           default=_matmul_config(128, 128, 32, 8, 4, 4), prune=prune_matmul)
GEMV_SPACE = TuningSpace("fxforge.quant_gemv", GEMV_CONFIGS, default=_gemv_config(64, 128, 1),
                         prune=prune_gemv)


def uses_gemv(m: int) -> bool:
    return m <= GEMV_MAX_ROWS


def space_for(problem: Problem) -> TuningSpace:
    return GEMV_SPACE if uses_gemv(problem["M"]) else MATMUL_SPACE


def choose_config(problem: Problem) -> Config:
    """The untuned pick. Matmul: the default if it survives pruning, else the first survivor.
    GEMV: the smallest SPLIT_K that gives :data:`GEMV_TARGET_PROGRAMS` programs, at blocks
    nearest the default's; when none gets there, the most programs."""
    space = space_for(problem)
    survivors, _ = space.survivors(problem)
    if not survivors:
        return space.default
    if space is MATMUL_SPACE:
        return space.default if space.default in survivors else survivors[0]

    def rank(config: Config) -> tuple:
        splits = gemv_splits(problem["K"], config["BLOCK_K"], config["SPLIT_K"])[1]
        programs = triton.cdiv(problem["N"], config["BLOCK_N"]) * splits
        short = programs < GEMV_TARGET_PROGRAMS
        away = abs(math.log2(config["BLOCK_N"] / 64)) + abs(math.log2(config["BLOCK_K"] / 128))
        return short, -programs if short else 0, away, config["SPLIT_K"]
    return min(survivors, key=rank)


