"""Horizontal fusion: projections that share an input become one matmul.

``mm(x, W1) ... mm(x, Wn)`` (and ``addmm(b_i, x, W_i)``), where every ``W_i`` is a weight (a
constant, or a view of one), become ``mm(x, cat(W_1..W_n, dim=1))`` followed by a
``split_with_sizes`` whose pieces replace the old results: q/k/v projections, SwiGLU's gate/up.
The ``cat`` of weights is itself weight-only, so ``constant_fold`` (run after this pass)
concatenates the weights once at compile time.

Profitability: n matmuls become one of the same total work, so n-1 fewer kernel launches and one
read of ``x`` instead of n. Declined when the weights differ in dtype or inner size, are not
constants (the ``cat`` would then copy at run time), or when a consumer of a projection cannot
take the split's strided piece (metadata re-propagation fails): the group is then left as it was.
"""
from __future__ import annotations

import operator
from collections import defaultdict

import torch
import torch.fx as fx

from fxforge.irgraph import META_KEY, IRGraph
from fxforge.irgraph.query import is_constant, tensor_meta
from fxforge.irgraph.views import Addmm
from fxforge.passes.base import PassResult, register_pass
from fxforge.irgraph.pattern import Match, Pat, has_rank

aten = torch.ops.aten

# A projection of ``x`` by a constant weight [K, N] (a constant or a view of one: ``t(w)``),
# with a constant bias [N] if it is an unscaled addmm.
_X, _WEIGHT = Pat.var("x"), Pat.var("weight", where=(is_constant, has_rank(2)))
PROJECTION = Pat(aten.mm.default, (_X, _WEIGHT)) | Pat(
    aten.addmm.default, (Pat.var("bias", where=(is_constant, has_rank(1))), _X, _WEIGHT),
    where=lambda node: Addmm.of(node).plain)


def _groups(ir: IRGraph) -> list[list[Match]]:
    """Projections keyed by (op, shared input, weight inner size, dtype), two or more each."""
    by_key: dict[tuple, list[Match]] = defaultdict(list)
    for node in ir.call_nodes():
        match = PROJECTION.match(node)
        if match is not None:
            weight = tensor_meta(match.weight)
            by_key[(node.target, match.x, weight.shape[0], weight.dtype)].append(match)
    return [group for group in by_key.values() if len(group) > 1]


def _move_before(value: fx.Node, anchor: fx.Node) -> None:
    """Move the calls computing ``value`` (a weight's view chain) that sit after ``anchor``
    to just before it, in their order."""
    chain, stack = set(), [value]
    while stack:
        node = stack.pop()
        if node.op == "call_function" and node not in chain:
            chain.add(node)
            stack.extend(node.all_input_nodes)
    order = {n: i for i, n in enumerate(anchor.graph.nodes)}
    for node in sorted(chain, key=order.__getitem__):
        if order[node] > order[anchor]:
            anchor.prepend(node)


def _repropagate(ir: IRGraph, new: list[fx.Node], saved: dict[fx.Node, tuple]) -> None:
    """Infer metadata for ``new`` and for every later node whose inputs' metadata changed.

    Propagation stops where a node's metadata comes out the same (a ``view`` of the strided
    piece usually restores it), so one group costs its neighbourhood, not the rest of the
    graph. ``saved`` receives the previous (val, meta) of each re-inferred existing node as it
    goes, so a failure part-way can be undone.
    """
    changed, pending = set(new), set(new)   # pending: nodes still to visit, ahead in order
    node = new[0]
    while pending and node.op != "root":   # walk forward only as far as changes reach
        if node in pending:
            pending.discard(node)
            if node.op == "call_function":
                old_meta = node.meta.get(META_KEY)
                if node not in changed:
                    saved[node] = (node.meta.get("val"), old_meta)
                ir.infer(node)
                if node not in saved or node.meta.get(META_KEY) != old_meta:
                    changed.add(node)
                    pending.update(node.users)
        node = node.next


def _fuse(ir: IRGraph, matches: list[Match]) -> bool:
    graph = ir.gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    group = [m.root for m in matches]
    first = min(group, key=order.__getitem__)
    is_addmm = group[0].target is aten.addmm.default
    x = matches[0].x
    weights = [m.weight for m in matches]
    sizes = [int(tensor_meta(w).shape[1]) for w in weights]
    biases = [m.bias for m in matches] if is_addmm else []
    for value in weights + biases:  # weight views may sit after ``first``: they only read constants
        _move_before(value, first)
    new: list[fx.Node] = []
    with graph.inserting_before(first):
        cat_w = graph.call_function(aten.cat.default, (weights, 1))
        new.append(cat_w)
        if is_addmm:
            cat_b = graph.call_function(aten.cat.default, (biases, 0))
            fused = graph.call_function(aten.addmm.default, (cat_b, x, cat_w))
            new += [cat_b, fused]
        else:
            fused = graph.call_function(aten.mm.default, (x, cat_w))
            new.append(fused)
        split = graph.call_function(aten.split_with_sizes.default, (fused, sizes, 1))
        pieces = [graph.call_function(operator.getitem, (split, i)) for i in range(len(group))]
    new += [split] + pieces
    for old, piece in zip(group, pieces):
        old.replace_all_uses_with(piece)
    saved: dict[fx.Node, tuple] = {}
    try:
        _repropagate(ir, new, saved)
    except Exception:  # a consumer cannot take the strided piece: leave the group alone
        for old, piece in zip(group, pieces):
            piece.replace_all_uses_with(old)
        for node, (val, meta) in saved.items():
            node.meta["val"], node.meta[META_KEY] = val, meta
        for node in reversed(new):
            graph.erase_node(node)
        return False
    for old in group:
        graph.erase_node(old)
    return True


@register_pass("fuse_projections")
def fuse_projections(ir: IRGraph) -> PassResult:
    """Concatenate the weights of projections that share an input into one matmul."""
    fused = declined = 0
    for group in _groups(ir):
        if _fuse(ir, group):
            fused += len(group)
        else:
            declined += 1
    return PassResult(ir, {"projections_fused": fused, "groups_declined": declined})
