"""Vertical fusion: chains of elementwise ops and last-dimension reductions become fusion groups.

The pass tags members with ``node.meta[GROUP_KEY]`` (see :mod:`fxforge.irgraph.fusion`); a
backend turns each group into one kernel. Residual adds, casts, activations, softmax, LayerNorm
and RMSNorm (as HF writes it: pow, mean, add, rsqrt, mul, casts) each end up as one group.

Every group has a *domain*, the iteration shape of its kernel. A member is either *full* (its
shape is the domain) or *row* (the domain with the last dimension reduced to 1 or dropped);
inputs from outside must broadcast to the domain. A node joins the group of one of its producers
when its shape fits that group's domain and the merge creates no cycle (a path that leaves the
group and comes back into it).

Rotary's ``rotate_half`` (``cat((-x[..., h:], x[..., :h]), -1)``) joins too: a ``cat`` over the
last dimension whose pieces are last-dim slices (or negations of them) of domain-shaped tensors
is placed as one unit with its pieces. The slices and negs are members (not shaped like the
domain, but used only by the cat); the cat's result is domain-shaped and its inputs are the
slices' sources. A slice or cat in any other form stays outside groups.

Profitability: fusing a producer into its consumer keeps the intermediate in registers instead
of writing it to memory and reading it back, and saves a kernel launch. It never adds memory
traffic: an intermediate that is also used outside the group is still written once, as a group
output. So we fuse whenever shapes fit and no cycle forms; a lone op stays ungrouped (fusing it
saves nothing) and nothing is recomputed (each node belongs to at most one group).
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.fx as fx

from fxforge.irgraph import IRGraph, TensorMeta
from fxforge.irgraph.fusion import (FUSIBLE, GROUP_KEY, ROW_REDUCTIONS, acts_on_last_dim,
                                    clear_groups, reduced_row_input)
from fxforge.irgraph.meta import META_KEY
from fxforge.irgraph.views import Cat, Neg, Slice
from fxforge.passes.base import PassResult, register_pass

aten = torch.ops.aten


def _shape(node: fx.Node) -> Optional[tuple]:
    meta = node.meta.get(META_KEY)
    if isinstance(meta, TensorMeta):
        return meta.shape
    if isinstance(meta, tuple) and meta and isinstance(meta[0], TensorMeta):
        return meta[0].shape  # native_layer_norm: the normalized output
    return None


def _row_shapes(domain: tuple) -> tuple[tuple, tuple]:
    return domain[:-1] + (1,), domain[:-1]


def _broadcasts_to(shape: tuple, domain: tuple) -> bool:
    if len(shape) > len(domain):
        return False
    return all(s == 1 or s == d for s, d in zip(reversed(shape), reversed(domain)))


def _domain_of(node: fx.Node) -> Optional[tuple]:
    """The iteration shape a group started by ``node`` gets: a reduction iterates its input."""
    if node.target in ROW_REDUCTIONS:
        reduced = reduced_row_input(node)
        return _shape(reduced) if reduced is not None else None
    return _shape(node)


def _cat_pieces(cat: fx.Node) -> Optional[list[fx.Node]]:
    """The slices (and negs of slices) a last-dim ``cat`` gathers, when they can be fused with
    it: each used only on the way to the cat, each slicing the last dim of a tensor of the cat's
    shape (or one broadcasting to it with the same last dim). None otherwise."""
    if Cat.of(cat) is None or not acts_on_last_dim(cat):
        return None
    domain, pieces = _shape(cat), []
    for arg in Cat.of(cat).tensors:
        piece = arg
        if (neg := Neg.of(piece)) is not None and len(piece.users) == 1:
            pieces.append(piece)
            piece = neg.input
        sliced = Slice.of(piece)
        if not (sliced is not None and acts_on_last_dim(piece)
                and len(piece.users) == 1 and isinstance(sliced.input, fx.Node)):
            return None
        source = _shape(sliced.input)
        if domain is None or source is None or not source or not _broadcasts_to(source, domain) \
                or source[-1] != domain[-1]:
            return None
        pieces.append(piece)
    return list(dict.fromkeys(pieces))


def _fits(node: fx.Node, domain: tuple) -> bool:
    """``node`` may live in a group of ``domain``: its result and its tensor inputs fit."""
    if node.target is aten.cat.default:   # only placed with its pieces (see _cat_pieces)
        return _shape(node) == domain
    if node.target in ROW_REDUCTIONS:
        return _domain_of(node) == domain
    if node.target is operator.getitem:
        return True  # a piece of a member's multi-output result
    shape = _shape(node)
    if shape is None or (shape != domain and shape not in _row_shapes(domain)):
        return False
    for arg in node.all_input_nodes:
        arg_shape = _shape(arg)
        if arg_shape is None or not _broadcasts_to(arg_shape, domain):
            return False
    return True


class _Grouper:
    def __init__(self, ir: IRGraph):
        self.order = {n: i for i, n in enumerate(ir.gm.graph.nodes)}
        self.group_of: dict[fx.Node, int] = {}
        self.members: dict[int, list[fx.Node]] = {}
        self.domain: dict[int, tuple] = {}
        self.next_id = 0

    def creates_cycle(self, members: set[fx.Node], node: fx.Node,
                      pieces: tuple[fx.Node, ...] = ()) -> bool:
        """Would ``members`` plus ``node`` (the latest of them) and its ``pieces`` close a path
        that leaves the set and comes back into it? Such a path runs through nodes before
        ``node`` in topological order, so the search never goes past it."""
        merged = members | {node} | set(pieces)
        limit = self.order[node]
        stack = [u for m in members | set(pieces) for u in m.users if u not in merged]
        seen: set[fx.Node] = set()
        while stack:
            cur = stack.pop()
            if cur in seen or self.order[cur] >= limit:
                continue
            seen.add(cur)
            for user in cur.users:
                if user in merged:
                    return True
                stack.append(user)
        return False

    def place(self, node: fx.Node, pieces: tuple[fx.Node, ...] = ()) -> None:
        """Join (and merge) the producers' groups that ``node`` fits, or start a group;
        ``pieces`` (a cat's slices and negs) come along as members."""
        inputs = [a for a in node.all_input_nodes if a not in pieces]
        inputs += [a for p in pieces for a in p.all_input_nodes if a not in pieces]
        candidates = sorted({self.group_of[a] for a in inputs if a in self.group_of})
        joined: Optional[int] = None
        for gid in candidates:
            if not _fits(node, self.domain[gid]):
                continue
            members = set(self.members[gid]) | (set(self.members[joined]) if joined is not None else set())
            if self.creates_cycle(members, node, pieces):
                continue
            if joined is None:
                joined = gid
            else:  # node links two groups of one domain: they become one kernel
                for member in self.members.pop(gid):
                    self.group_of[member] = joined
                    self.members[joined].append(member)
        if joined is not None:
            for member in (*pieces, node):
                self._add(joined, member)
            return
        if node.target is operator.getitem:
            return  # the getitem of an ungrouped multi-output op
        domain = _domain_of(node)
        if domain is not None and _fits(node, domain):
            gid = self.next_id
            self.next_id += 1
            self.members[gid], self.domain[gid] = [], domain
            for member in (*pieces, node):
                self._add(gid, member)

    def _add(self, gid: int, node: fx.Node) -> None:
        self.group_of[node] = gid
        self.members[gid].append(node)


def _computes(nodes: list[fx.Node]) -> int:
    return sum(1 for n in nodes if n.target is not operator.getitem)


@register_pass("fuse_elementwise")
def fuse_elementwise(ir: IRGraph) -> PassResult:
    """Tag chains of elementwise ops and last-dim reductions as fusion groups."""
    clear_groups(ir)
    grouper = _Grouper(ir)
    cat_pieces = {n: _cat_pieces(n) for n in ir.call_nodes() if n.target is aten.cat.default}
    cat_pieces = {cat: tuple(p) for cat, p in cat_pieces.items() if p is not None}
    deferred = {p for pieces in cat_pieces.values() for p in pieces}
    for node in ir.call_nodes():
        if node in cat_pieces:
            grouper.place(node, cat_pieces[node])
        elif node.target in FUSIBLE and node not in deferred:
            grouper.place(node)
    kept = single = 0
    fused_ops = 0
    for gid, nodes in sorted(grouper.members.items()):
        if _computes(nodes) < 2:
            single += 1
            continue
        kept += 1
        fused_ops += _computes(nodes)
        for node in nodes:
            node.meta[GROUP_KEY] = f"fused_{kept - 1}"
    return PassResult(ir, {"groups": kept, "ops_fused": fused_ops, "left_single": single})
