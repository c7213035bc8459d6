"""``options={"attention": "sliding_window:W,sinks:S"}``: StreamingLLM-style attention for models
trained with full attention, opt-in and lossy.

Each causal self-attention (a ``scaled_dot_product_attention`` that ``fuse_attention`` proved
causal, by ``is_causal`` or a mask that is the causal triangle) becomes
``fxforge::window_attention``: the query at position ``i`` sees the first ``S`` positions (the
"attention sinks", which the softmax of a model trained with full attention leans on) and the last
``W`` positions, itself included (:mod:`fxforge.irgraph.window_ops`). With ``kv_cache=True`` the
KV-cache pass then keeps ``S + W`` slots per layer, a ring past the sinks: the cache's memory and a
decode step's time stay flat however long the generation runs, and it may run past
``max_seq_len``. Keys are cached at their original positions (rotary embeddings as the model
applied them).

Any other attention (bidirectional, cross-attention, a mask other than the causal one) stays
dense, with the reason logged; the pass's counts say how many sites were rewritten.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Union

import torch.fx as fx

from fxforge.irgraph import IRGraph
from fxforge.irgraph.query import tensor_meta
from fxforge.irgraph.views import Sdpa, WindowAttention
from fxforge.passes.base import Pass, PassResult

log = logging.getLogger("fxforge.passes.attention")

DEFAULT_SINKS = 4   # StreamingLLM's choice: four initial tokens suffice for the models it tried
MODES = {"sliding_window": "StreamingLLM: the first S positions plus a window of the last W"}
LATER = ("block_sparse", "linear", "per_head")


class AttentionSpecError(ValueError):
    """An ``attention`` option fxforge cannot parse."""


@dataclass(frozen=True)
class WindowSpec:
    window: int
    sinks: int = DEFAULT_SINKS

    def __str__(self) -> str:
        return f"sliding_window:{self.window},sinks:{self.sinks}"


_FIELD = re.compile(r"^\s*([a-z_]+)\s*:\s*(\d+)\s*$")


def parse_attention(spec: str) -> WindowSpec:
    """``"sliding_window:256,sinks:4"`` (sinks default to 4) -> ``WindowSpec(256, 4)``."""
    if not isinstance(spec, str) or not spec.strip():
        raise AttentionSpecError(f"option attention must be a string like 'sliding_window:256,"
                                 f"sinks:4', got {spec!r}")
    fields = {}
    for part in spec.split(","):
        found = _FIELD.match(part)
        if found is None:
            mode = part.split(":")[0].strip()
            if mode in LATER:
                raise AttentionSpecError(f"option attention={spec!r}: {mode} attention is not "
                                         "available in this version of fxforge")
            raise AttentionSpecError(f"option attention={spec!r}: cannot read {part.strip()!r}; "
                                     "expected 'sliding_window:W' optionally with ',sinks:S' "
                                     "(W >= 1, S >= 0 integers)")
        if found.group(1) in fields:
            raise AttentionSpecError(f"option attention={spec!r}: {found.group(1)} given twice")
        fields[found.group(1)] = int(found.group(2))
    unknown = sorted(set(fields) - {"sliding_window", "sinks"})
    if unknown or "sliding_window" not in fields:
        later = [u for u in unknown if u in LATER]
        if later:
            raise AttentionSpecError(f"option attention={spec!r}: {later[0]} attention is not "
                                     "available in this version of fxforge")
        raise AttentionSpecError(f"option attention={spec!r}: the modes are "
                                 f"{', '.join(MODES)}; fields sliding_window:W and sinks:S")
    if fields["sliding_window"] < 1:
        raise AttentionSpecError(f"option attention={spec!r}: the window must hold at least 1 "
                                 "position")
    return WindowSpec(fields["sliding_window"], fields.get("sinks", DEFAULT_SINKS))


def _causal_self_attention(gm: fx.GraphModule, node: fx.Node) -> Union[bool, str]:
    """True when ``node`` is causal self-attention; else why it stays dense."""
    sdpa = Sdpa.of(node)
    q, k = tensor_meta(sdpa.query), tensor_meta(sdpa.key)
    if q is None or k is None or q.rank != 4 or k.rank != 4:
        return "attention without 4-D tensor metadata"
    if str(q.shape[2]) != str(k.shape[2]):
        return f"cross-attention ({q.shape[2]} queries, {k.shape[2]} keys)"
    if sdpa.dropout_p:
        return "attention with dropout"
    if sdpa.attn_mask is None:
        return True if sdpa.is_causal else "bidirectional attention (not causal)"
    if sdpa.is_causal:
        return "causal attention with a further mask"
    from fxforge.passes.kv_cache import _causal_pattern, mask_is_causal
    length, mask = q.shape[2], sdpa.attn_mask
    if isinstance(length, int):
        value = getattr(gm, str(mask.target), None) if mask.op == "get_attr" else None
        causal = value is not None and _causal_pattern(value, length)
    else:
        causal = mask_is_causal(gm, mask, length)
    return True if causal else "a mask that is not the causal triangle"


def window_rewrite(ir: IRGraph, spec: WindowSpec) -> PassResult:
    """Every causal self-attention becomes ``fxforge::window_attention`` (module docstring)."""
    graph, rewritten, kept = ir.gm.graph, 0, 0
    for node in list(ir.call_nodes()):
        if not Sdpa.matches(node):
            continue
        verdict = _causal_self_attention(ir.gm, node)
        if verdict is not True:
            kept += 1
            log.info("attention %s: %s stays dense: %s", spec, node.name, verdict)
            continue
        sdpa = Sdpa.of(node)
        with graph.inserting_before(node):
            window = WindowAttention.create(graph, q=sdpa.query, k=sdpa.key, v=sdpa.value,
                                            window=spec.window, sinks=spec.sinks, scale=sdpa.scale)
        node.replace_all_uses_with(window)
        graph.erase_node(node)
        ir.infer(window)
        rewritten += 1
    if rewritten:
        graph.eliminate_dead_code()   # the causal masks' computations
        ir.gm.recompile()
    else:
        log.warning("attention %s: no causal self-attention in this graph; nothing rewritten",
                    spec)
    return PassResult(ir, {"window_sites": rewritten, "dense_sites": kept})


def attention_pass(spec: str) -> Pass:
    """The pass for one parsed ``attention`` option."""
    parsed = parse_attention(spec)
    return Pass("attention_window", lambda ir: window_rewrite(ir, parsed),
                f"attention {parsed}: causal self-attention to sinks plus a window")
