"""Where the attention of a model trained with full attention actually goes, measured on the
calibration inputs (the compile's example inputs, ``passes/gptq.calibration_inputs``): the modes
that choose a pattern per head (``block_sparse:auto``, ``per_head``) read it from here.

:func:`observe_queries_keys` runs the graph once, eagerly (``gptq.observe_nodes``: no generated
code), and keeps the query and key of every wanted attention site; :func:`block_mass` folds a
site's softmax probabilities into the mean mass each query block puts on each key block, one
head at a time (one ``[L, L]`` probability matrix in memory, not ``[H, L, L]``).
"""
from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict
from typing import Callable, Optional, Sequence

import logging

import torch
import torch.fx as fx

from fxforge.irgraph import IRGraph
from fxforge.irgraph.views import Sdpa
from fxforge.passes.gptq import calibration_inputs, observe_nodes

log = logging.getLogger("fxforge.passes.attention")

MAX_POSITIONS = 4096   # of a calibration sequence measured (the probabilities are quadratic)
MAX_REMEMBERED = 16
_REMEMBERED: "OrderedDict[tuple, list]" = OrderedDict()
_REMEMBERED_LOCK = threading.Lock()   # graphs may compile on several threads at once


def observe_queries_keys(ir: IRGraph, nodes: Sequence[fx.Node]) -> Optional[dict]:
    """node -> (q ``[B, H, L, D]``, k ``[B, Hkv, L, D]``) at each SDPA of ``nodes`` in one eager
    run on the calibration inputs (at most MAX_POSITIONS of them); None when the compile has no
    calibration inputs."""
    inputs = calibration_inputs()
    if inputs is None:
        return None
    seen = {}

    def visit(node, env):
        sdpa = Sdpa.of(node)
        seen[node] = tuple(env[t][:, :, :MAX_POSITIONS].detach().float()
                           for t in (sdpa.query, sdpa.key))
    observe_nodes(ir, inputs, nodes, visit)
    return seen


def weights_fingerprint(ir: IRGraph) -> str:
    """The graph's constants (shapes and a sample of their values), order-free: the same model
    gives the same fingerprint in every graph dynamo makes of it (other batch sizes, lengths)."""
    parts = []
    for name, value in list(ir.gm.named_parameters()) + list(ir.gm.named_buffers()) + \
            [(n, v) for n, v in vars(ir.gm).items() if isinstance(v, torch.Tensor)]:
        flat = value.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 16)][:16].float().tolist() if flat.numel() else []
        parts.append(f"{tuple(value.shape)}:{sample}")
    return hashlib.sha256("|".join(sorted(parts)).encode()).hexdigest()


def measured_once(ir: IRGraph, spec: object, measure: Callable[[], Optional[list]]) -> Optional[list]:
    """What ``measure()`` chose for this spec the first time it could measure this model (same
    weights), else a new measurement: every graph dynamo compiles of one model (a new batch
    size, the KV step graph, a short prompt too short to measure) uses the same heads."""
    key = (str(spec), weights_fingerprint(ir))
    with _REMEMBERED_LOCK:
        if key in _REMEMBERED:
            _REMEMBERED.move_to_end(key)
            return _REMEMBERED[key]
    chosen = measure()
    if chosen is not None:
        with _REMEMBERED_LOCK:
            chosen = _REMEMBERED.setdefault(key, chosen)   # a racing thread's first one wins
            while len(_REMEMBERED) > MAX_REMEMBERED:
                _REMEMBERED.popitem(last=False)
    return chosen


def calibration_sites(ir: IRGraph, spec: object, least: int, need: str) -> Optional[list]:
    """``(node, q, k)`` for every causal self-attention site (graph order) on the calibration
    inputs; None, with the reason logged, when there are none or the sequence is shorter than
    ``least`` positions (``need`` says why that many): the graph's attention then stays dense."""
    from fxforge.passes.attention_spec import causal_self_attention
    sites = [n for n in ir.call_nodes()
             if Sdpa.matches(n) and causal_self_attention(ir.gm, n) is True]
    seen = observe_queries_keys(ir, sites)
    if seen is None:
        log.warning("attention %s: no calibration inputs (the compile's example inputs) to "
                    "measure the heads on; nothing rewritten", spec)
        return None
    length = next(iter(seen.values()))[0].shape[2] if seen else 0
    if seen and length < least:
        log.warning("attention %s: the calibration sequence (the compile's example input) has %d "
                    "positions; %s needs at least %d: attention stays dense in this graph",
                    spec, length, need, least)
        return None
    return [(node, *seen[node]) for node in sites]


def head_probabilities(q: torch.Tensor, k: torch.Tensor, scale: Optional[float], head: int):
    """The causal softmax probabilities ``[B, L, L]`` of query head ``head`` (GQA: its k/v head)."""
    kv_head = head // (q.shape[1] // k.shape[1])
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q[:, head] @ k[:, kv_head].transpose(-1, -2)) * scale
    length = q.shape[2]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    return scores.masked_fill(~causal, float("-inf")).softmax(-1)


def block_mass(q: torch.Tensor, k: torch.Tensor, scale: Optional[float], block: int) -> torch.Tensor:
    """``[H, blocks, blocks]``: per query head, the mean over a query block's queries (and the
    batch) of the probability mass each key block receives; rows sum to 1."""
    length = q.shape[2]
    blocks = -(-length // block)
    pad = blocks * block - length
    out = []
    for head in range(q.shape[1]):
        probs = head_probabilities(q, k, scale, head).mean(0)              # [L, L]
        probs = torch.nn.functional.pad(probs, (0, pad))                    # keys to whole blocks
        per_key_block = probs.view(length, blocks, block).sum(-1)           # [L, blocks]
        rows = torch.nn.functional.pad(per_key_block, (0, 0, 0, pad))
        counts = torch.full((blocks,), float(block))
        counts[-1] = block - pad
        out.append(rows.view(blocks, block, blocks).sum(1) / counts[:, None])
    return torch.stack(out)


def window_mass(q: torch.Tensor, k: torch.Tensor, scale: Optional[float], window: int,
                sinks: int) -> torch.Tensor:
    """``[H]``: per query head, the mean over queries (and the batch) of the probability mass
    on the sinks and the last ``window`` keys (the rest is what a streaming head would lose)."""
    from fxforge.irgraph.window_ops import visible
    pos = torch.arange(q.shape[2])
    kept = visible(pos, pos, window, sinks)
    return torch.stack([(head_probabilities(q, k, scale, h) * kept).sum(-1).mean()
                        for h in range(q.shape[1])])
