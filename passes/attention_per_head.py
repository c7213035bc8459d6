"""``options={"attention": "per_head:W,sinks:S,mass:M"}``: per-head streaming attention
(DuoAttention's split, training-free), opt-in and lossy.

DuoAttention observes that only some heads ("retrieval heads") need the whole context; the others
("streaming heads") attend to the first tokens and the recent ones. It learns which by
optimisation; here the split is measured: on the calibration inputs (the compile's example
inputs, real text: ``fxforge.calibration``) each head's softmax attention is computed and the
share of its mass on the first ``S`` positions plus the last ``W``
(:func:`fxforge.passes.attention_calib.window_mass`) is taken. A k/v head whose every query head
keeps at least ``M`` there (default 0.95) becomes streaming; the rest stay full. GQA groups are
never split: a query head follows its k/v head. The first measurement of a model (by its
weights) is kept for every later graph of it (``attention_calib.measured_once``); a compile whose
example is too short to measure, with none kept, leaves attention dense, logged.

Each causal self-attention becomes ``fxforge::per_head_attention``; with ``kv_cache`` the full
heads' keys go to a cache of ``max_seq_len`` positions and the streaming heads' to a ring of
``S + W`` slots (``fxforge::cached_per_head_attention``), so their memory stays flat. The pass
counts the streaming and full heads and logs the split per layer.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

from fxforge.irgraph import IRGraph
from fxforge.irgraph.views import PerHeadAttention, Sdpa
from fxforge.passes.attention_calib import calibration_sites, measured_once, window_mass
from fxforge.passes.attention_spec import (check_fields, float_field, int_field,
                                           rewrite_causal_attention)
from fxforge.passes.attention_window import DEFAULT_SINKS
from fxforge.passes.base import Pass, PassResult

log = logging.getLogger("fxforge.passes.attention")


@dataclass(frozen=True)
class PerHeadSpec:
    window: int
    sinks: int = DEFAULT_SINKS
    mass: float = 0.95

    def __str__(self) -> str:
        return f"per_head:{self.window},sinks:{self.sinks},mass:{self.mass:g}"

    def make_pass(self) -> Pass:
        return Pass("attention_per_head", lambda ir: per_head_rewrite(ir, self),
                    f"attention {self}: streaming heads measured on calibration text")


def parse_per_head(spec: str, value: str, fields: dict) -> PerHeadSpec:
    """``per_head:W[,sinks:S,mass:M]``."""
    check_fields(spec, fields, ("sinks", "mass"))
    return PerHeadSpec(int_field(spec, "per_head", value, 1),
                       int_field(spec, "sinks", fields.get("sinks", str(DEFAULT_SINKS)), 0),
                       float_field(spec, "mass", fields.get("mass", "0.95"), 0.0, 1.0))


def per_head_rewrite(ir: IRGraph, spec: PerHeadSpec) -> PassResult:
    """Every causal self-attention becomes ``fxforge::per_head_attention`` with the streaming
    k/v heads measured on the calibration inputs."""
    flags = measured_once(ir, spec, lambda: _measured_streaming(ir, spec))
    if flags is None:
        return PassResult(ir, {"per_head_sites": 0, "dense_sites": 0})

    def build(graph, sdpa: Sdpa, index: int):
        return PerHeadAttention.create(graph, q=sdpa.query, k=sdpa.key, v=sdpa.value,
                                       streaming=flags[index], window=spec.window,
                                       sinks=spec.sinks, scale=sdpa.scale)
    result = rewrite_causal_attention(ir, str(spec), build, "per_head_sites")
    heads = [f for site in flags for f in site]
    result.counts["streaming_kv_heads"] = sum(heads)
    result.counts["full_kv_heads"] = len(heads) - sum(heads)
    return result


def _measured_streaming(ir: IRGraph, spec: PerHeadSpec) -> Optional[list[list[int]]]:
    """Per causal site (graph order), one streaming flag per k/v head; None (attention stays
    dense, logged) without calibration inputs or with a sequence too short to tell."""
    least = 2 * (spec.window + spec.sinks) + 1
    sites = calibration_sites(ir, spec, least, "measuring the heads (twice window + sinks)")
    if sites is None:
        return None
    flags = []
    for layer, (node, q, k) in enumerate(sites):
        kept = window_mass(q, k, Sdpa.of(node).scale, spec.window, spec.sinks)
        per_kv = kept.view(k.shape[1], q.shape[1] // k.shape[1]).min(1).values
        flags.append([int(m >= spec.mass) for m in per_kv.tolist()])
        log.info("attention %s: site %d (%s): k/v heads %s keep %s of their mass in the window",
                 spec, layer, node.name, ["streaming" if f else "full" for f in flags[-1]],
                 [round(m, 3) for m in per_kv.tolist()])
    return flags
