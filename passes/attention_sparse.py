"""``options={"attention": "block_sparse:..."}``: block-sparse prefill attention for models
trained with full attention, opt-in and lossy (MInference-style: the prompt's attention is
sparse, decoding stays dense).

Each causal self-attention becomes ``fxforge::block_sparse_attention``
(:mod:`fxforge.irgraph.sparse_ops`): queries and keys in blocks of ``B`` positions, each query
block reading only the key blocks of its pattern.

* ``"block_sparse:B,local:N,global:G,stride:S"``: one pattern for every head: the ``N`` blocks
  ending at the diagonal, the first ``G`` blocks (where the "attention sinks" are), and every
  ``S``-th block back from the diagonal (0: none). Defaults: local 4, global 1, stride 0.
* ``"block_sparse:auto,block:B,mass:M"``: a pattern per head, chosen on the calibration inputs
  (the compile's example inputs, real text: ``fxforge.calibration``): the probabilities of each
  head's softmax attention are folded per block (:mod:`fxforge.passes.attention_calib`) and the
  head gets the cheapest pattern of :data:`MENU` that keeps at least ``M`` of its attention
  mass (default 0.95), or stays dense when none does. The pass reports how many heads went
  sparse and their mean cost; the patterns are logged per layer. The first measurement of a
  model (by its weights) is kept for every later graph of it; a compile whose example is too
  short to measure, with none kept, leaves attention dense, logged.

With ``kv_cache`` the prefill over an empty cache keeps the pattern and decode steps attend
densely (``fxforge::cached_block_sparse_attention``). Other attention stays dense, with the
reason logged.
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Optional

import torch

from fxforge.irgraph import IRGraph
from fxforge.irgraph.sparse_ops import BLOCK_SIZES, DENSE, block_layout
from fxforge.irgraph.views import BlockSparseAttention, Sdpa
from fxforge.passes.attention_calib import block_mass, calibration_sites, measured_once
from fxforge.passes.attention_spec import (AttentionSpecError, check_fields, float_field,
                                           int_field, rewrite_causal_attention)
from fxforge.passes.base import Pass, PassResult

log = logging.getLogger("fxforge.passes.attention")

# The patterns auto chooses from (local, global, stride): cheapest first by COST_LENGTH's work.
MENU = [(local, global_, stride) for local, global_, stride in
        itertools.product((1, 2, 3, 4, 6, 8, 12, 16), (0, 1, 2), (0, 16, 8, 4))]
COST_LENGTH = 8192   # positions at which a pattern's cost (its share of dense work) is weighed


@dataclass(frozen=True)
class BlockSparseSpec:
    block: int = 64
    local: int = 4
    global_: int = 1
    stride: int = 0
    auto: bool = False
    mass: float = 0.95

    def __str__(self) -> str:
        if self.auto:
            return f"block_sparse:auto,block:{self.block},mass:{self.mass:g}"
        return (f"block_sparse:{self.block},local:{self.local},global:{self.global_},"
                f"stride:{self.stride}")

    @property
    def pattern(self) -> tuple[int, ...]:
        return (self.local, self.global_, self.stride, 0, 0)

    def make_pass(self) -> Pass:
        return Pass("attention_sparse", lambda ir: sparse_rewrite(ir, self),
                    f"attention {self}: causal self-attention to a block-sparse pattern")


def parse_block_sparse(spec: str, value: str, fields: dict) -> BlockSparseSpec:
    """``block_sparse:B[,local:N,global:G,stride:S]`` or ``block_sparse:auto[,block:B,mass:M]``."""
    if value == "auto":
        check_fields(spec, fields, ("block", "mass"))
        block = _block(spec, fields.get("block", "64"))
        return BlockSparseSpec(block, auto=True,
                               mass=float_field(spec, "mass", fields.get("mass", "0.95"), 0.0, 1.0))
    check_fields(spec, fields, ("local", "global", "stride"))
    return BlockSparseSpec(_block(spec, value), int_field(spec, "local", fields.get("local", "4"), 1),
                           int_field(spec, "global", fields.get("global", "1"), 0),
                           int_field(spec, "stride", fields.get("stride", "0"), 0))


def _block(spec: str, text: str) -> int:
    block = int_field(spec, "block", text, 1)
    if block not in BLOCK_SIZES:
        raise AttentionSpecError(f"option attention={spec!r}: block {block} is not one of "
                                 f"{', '.join(map(str, BLOCK_SIZES))}")
    return block


def cost(pattern, block: int, length: int = COST_LENGTH) -> float:
    """The share of dense causal attention's block work ``pattern`` does at ``length``."""
    blocks = -(-length // block)
    return float(block_layout(pattern, blocks).sum()) / (blocks * (blocks + 1) / 2)


def choose_pattern(mass: torch.Tensor, block: int, keep: float) -> tuple[tuple[int, ...], float]:
    """The cheapest MENU pattern whose blocks hold at least ``keep`` of a head's mean mass
    (``mass``: ``[blocks, blocks]`` from :func:`block_mass`), and the mass it holds; dense
    (and 1.0) when none does. Patterns that read every block at the calibration's length are
    not candidates: what they would leave out at longer lengths was not measured."""
    blocks = mass.shape[0]
    dense = block_layout(DENSE, blocks)
    best: Optional[tuple] = None
    for local, global_, stride in MENU:
        pattern = (local, global_, stride, 0, 0)
        layout = block_layout(pattern, blocks)
        if bool((layout == dense).all()):
            continue   # reads every block at this length: the measurement cannot tell it from dense
        held = float((mass * layout).sum(1).mean())
        if held >= keep:
            candidate = (cost(pattern, block), -held, pattern)
            best = candidate if best is None or candidate < best else best
    return (best[2], -best[1]) if best is not None else (DENSE, 1.0)


def sparse_rewrite(ir: IRGraph, spec: BlockSparseSpec) -> PassResult:
    """Every causal self-attention becomes ``fxforge::block_sparse_attention``: with the
    spec's pattern, or (auto) a pattern per head measured on the calibration inputs."""
    patterns = measured_once(ir, spec, lambda: _measured_patterns(ir, spec)) if spec.auto else None
    if spec.auto and patterns is None:
        return PassResult(ir, {"sparse_sites": 0, "dense_sites": 0})

    def build(graph, sdpa: Sdpa, index: int):
        flat = [x for p in (patterns[index] if patterns else [spec.pattern]) for x in p]
        return BlockSparseAttention.create(graph, q=sdpa.query, k=sdpa.key, v=sdpa.value,
                                           patterns=flat, block=spec.block, scale=sdpa.scale)
    result = rewrite_causal_attention(ir, str(spec), build, "sparse_sites")
    if patterns:
        heads = [p for site in patterns for p in site]
        result.counts["sparse_heads"] = sum(p != DENSE for p in heads)
        result.counts["dense_heads"] = sum(p == DENSE for p in heads)
        result.counts["work_vs_dense"] = round(sum(cost(p, spec.block) for p in heads) /
                                               len(heads), 4)
    return result


def _measured_patterns(ir: IRGraph, spec: BlockSparseSpec) -> Optional[list]:
    """Per causal site (in graph order), a pattern per query head; None (attention stays
    dense, logged) without calibration inputs or with a sequence too short to tell."""
    sites = calibration_sites(ir, spec, 4 * spec.block, "choosing patterns (4 blocks)")
    if sites is None:
        return None
    patterns = []
    for layer, (node, q, k) in enumerate(sites):
        masses = block_mass(q, k, Sdpa.of(node).scale, spec.block)
        chosen = [choose_pattern(m, spec.block, spec.mass) for m in masses]
        patterns.append([p for p, _ in chosen])
        log.info("attention %s: site %d (%s): %s", spec, layer, node.name,
                 ", ".join(f"h{h} {p[:3]} holds {held:.3f}" for h, (p, held) in enumerate(chosen)))
    return patterns
