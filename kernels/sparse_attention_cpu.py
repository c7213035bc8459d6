"""Block-sparse attention on the CPU (the ops of :mod:`fxforge.irgraph.sparse_ops`).

Prefill runs the C++ kernel of ``kernels/sparse_attention_cpp.py``, which reads only the key
blocks each query block's pattern names; inputs it declines (not fp32, a block size it was not
built for, a packed copy too large) take the reference op, with the reason logged once per
reason. With a KV cache, the prefill over an empty cache keeps the pattern and writes the cache;
every later call (decode steps, continued chunks) is ``fxforge::cached_attention`` on its CPU
kernels: dense, as the mode defines.
"""
from __future__ import annotations

import functools
import logging
from typing import Optional

import torch

from fxforge.irgraph.sparse_ops import block_sparse_attention, split_patterns, write_prompt
from fxforge.kernels.decode_attention_cpu import cpu_cached_attention
from fxforge.kernels.sparse_attention_cpp import kernel_declines, sparse_attention

log = logging.getLogger("fxforge.kernels")


@functools.lru_cache(maxsize=64)
def _log_declined(reason: str) -> None:
    log.info("block-sparse attention: reference op (%s)", reason)


def cpu_block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, patterns: list,
                               block: int, scale: Optional[float] = None) -> torch.Tensor:
    """``fxforge::block_sparse_attention`` (module docstring)."""
    declined = kernel_declines(q, k, v, block)
    if declined is not None:
        _log_declined(declined)
        return block_sparse_attention(q, k, v, patterns, block, scale)
    return sparse_attention(q, k, v, split_patterns(patterns, q.shape[1]), block, scale)


def cpu_cached_block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                      k_cache: torch.Tensor, v_cache: torch.Tensor,
                                      cache_pos: torch.Tensor, patterns: list, block: int,
                                      scale: Optional[float] = None) -> torch.Tensor:
    """``fxforge::cached_block_sparse_attention`` (module docstring)."""
    if q.shape[2] == 1 or int(cache_pos.reshape(-1)[0]) != 0:
        return cpu_cached_attention(q, k, v, k_cache, v_cache, cache_pos, scale)
    write_prompt(k, v, k_cache, v_cache)
    return cpu_block_sparse_attention(q, k, v, patterns, block, scale)
