"""What every ``options={"attention": ...}`` mode shares: the option's syntax, the search for the
causal self-attention sites a mode may rewrite, and the rewrite loop with its counts.

The option is ``"mode:value,field:value,..."``: the first field names the mode and carries its
main value (``sliding_window:256,sinks:4``, ``block_sparse:64,local:4``, ``linear:elu``). Each
mode module (``attention_window.py``, ``attention_sparse.py``, ...) parses its fields into a
frozen spec whose ``str`` is the canonical option and whose ``make_pass()`` gives the pass;
:mod:`fxforge.passes.attention_modes` holds the table of modes.
"""
from __future__ import annotations

import logging
import re
from typing import Callable, Union

import torch.fx as fx

from fxforge.irgraph import IRGraph
from fxforge.irgraph.query import tensor_meta
from fxforge.irgraph.views import Sdpa
from fxforge.passes.base import PassResult

log = logging.getLogger("fxforge.passes.attention")


class AttentionSpecError(ValueError):
    """An ``attention`` option fxforge cannot parse."""


_FIELD = re.compile(r"^\s*([a-z_]+)\s*:\s*([A-Za-z0-9_.+-]+)\s*$")


def split_spec(spec: str) -> tuple[str, str, dict[str, str]]:
    """``"block_sparse:64,local:4"`` -> ``("block_sparse", "64", {"local": "4"})``: the mode
    (the first field), its value and the other fields as text. A field given twice, or one
    that does not read as ``name:value``, is an error naming it."""
    if not isinstance(spec, str) or not spec.strip():
        raise AttentionSpecError(f"option attention must be a string like 'sliding_window:256,"
                                 f"sinks:4', got {spec!r}")
    fields: dict[str, str] = {}
    for part in spec.split(","):
        found = _FIELD.match(part)
        if found is None:
            raise AttentionSpecError(f"option attention={spec!r}: cannot read {part.strip()!r}; "
                                     "expected name:value fields, the first naming the mode")
        if found.group(1) in fields:
            raise AttentionSpecError(f"option attention={spec!r}: {found.group(1)} given twice")
        fields[found.group(1)] = found.group(2)
    mode = next(iter(fields))
    return mode, fields.pop(mode), fields


def int_field(spec: str, name: str, text: str, least: int) -> int:
    """The integer ``name:text`` of option ``spec``, at least ``least``."""
    if not re.fullmatch(r"\d+", text) or int(text) < least:
        raise AttentionSpecError(f"option attention={spec!r}: {name} must be an integer >= "
                                 f"{least}, got {text!r}")
    return int(text)


def float_field(spec: str, name: str, text: str, low: float, high: float) -> float:
    """The number ``name:text`` of option ``spec``, in ``[low, high]``."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not low <= value <= high:
        raise AttentionSpecError(f"option attention={spec!r}: {name} must be a number in "
                                 f"[{low}, {high}], got {text!r}")
    return value


def check_fields(spec: str, fields: dict[str, str], known: tuple[str, ...]) -> None:
    unknown = sorted(set(fields) - set(known))
    if unknown:
        allowed = ", ".join(known) if known else "none"
        raise AttentionSpecError(f"option attention={spec!r}: unknown field {unknown[0]!r} "
                                 f"(this mode's fields: {allowed})")


def causal_self_attention(gm: fx.GraphModule, node: fx.Node) -> Union[bool, str]:
    """True when ``node`` (an SDPA) is causal self-attention; else why it stays dense."""
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


Build = Callable[[fx.Graph, Sdpa, int], fx.Node]


def rewrite_causal_attention(ir: IRGraph, label: str, build: Build, counted: str) -> PassResult:
    """Every causal self-attention SDPA becomes what ``build(graph, sdpa, site_index)`` inserts
    before it (the others stay dense, each with its reason logged). Counts: ``counted`` (the
    rewritten sites) and ``dense_sites``."""
    graph, rewritten, kept = ir.gm.graph, 0, 0
    for node in list(ir.call_nodes()):
        if not Sdpa.matches(node):
            continue
        verdict = causal_self_attention(ir.gm, node)
        if verdict is not True:
            kept += 1
            log.info("attention %s: %s stays dense: %s", label, node.name, verdict)
            continue
        with graph.inserting_before(node):
            replacement = build(graph, Sdpa.of(node), rewritten)
        node.replace_all_uses_with(replacement)
        graph.erase_node(node)
        ir.infer(replacement)
        rewritten += 1
    if rewritten:
        graph.eliminate_dead_code()   # the causal masks' computations
        ir.gm.recompile()
    else:
        log.warning("attention %s: no causal self-attention in this graph; nothing rewritten",
                    label)
    return PassResult(ir, {counted: rewritten, "dense_sites": kept})
