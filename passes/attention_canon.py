"""Attention canonicalisation: the rewrites that bring every common way of writing attention to
the one form :mod:`fxforge.passes.attention` matches. ``fuse_attention`` runs them first.

The rules (a :class:`~fxforge.irgraph.pattern.PatternMatcher` table, run to a fixed point):

* ``softmax_from_exp_over_sum``: ``exp(x - amax(x)) / sum(exp(..))`` and ``exp(x) / sum(exp(x))``
  over the last dim become ``_softmax(x)`` when they are attention weights (their input comes
  from a matmul and their result is the first operand of one);
* ``canonical_score_operands`` / ``canonical_value_operands``: the operands of the two
  contractions, whatever layout ops made them (``einsum``'s permutes, ``permute(0, 2, 3, 1)``
  for k, ``.contiguous()``, broadcast grouped heads), become the canonical chains over 4-D
  tensors: ``q [B, H, Lq, D] -> [B*H, Lq, D]``, ``k [B, H, Lk, D] -> transpose -> [B*H, D, Lk]``
  and v like q, with grouped k/v as ``unsqueeze -> expand -> reshape`` (``repeat_kv``);
* ``collapse_layout_chain``: a chain of layout ops after a contraction or a softmax (scores,
  weights, the attention output) becomes the shortest chain with the same layout, so the scores
  and the output are plain views of the contractions again.

Layouts are compared semantically (:mod:`fxforge.irgraph.layout`), so the rules do not
list written forms: any chain of views, permutes, expands, copies and unsqueezes is covered.
Every rewrite keeps values exactly (the softmax rule up to rounding: both compute the same
normalised exponentials).
"""
from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Optional

import torch
import torch.fx as fx

from fxforge.irgraph import IRGraph, node_arguments
from fxforge.irgraph.query import tensor_meta
from fxforge.irgraph.views import Bmm, MaskedFill, Reduction, Softmax, Where
from fxforge.passes.attention_match import _is_float_cast, _leads_to_bmm, _scalar_multiplier
from fxforge.irgraph.layout import (Builder, Layout, NotALayout, _product, _shape, arrange,
                                          chain_source, is_layout_op, layout_of, quotient, same_size)
from fxforge.irgraph.pattern import AnyOf, Match, Op, Pat, PatternMatcher, graph_rewrite

log = logging.getLogger("fxforge.passes.attention")
aten = torch.ops.aten
SOFTMAX, BMM = aten._softmax.default, aten.bmm.default
MAX_CHAIN = 16   # ops between a contraction and its softmax worth walking


def _chain_input(node: fx.Node) -> Optional[fx.Node]:
    """The tensor a layout op or a float cast reads (None for other nodes)."""
    if is_layout_op(node) or _is_float_cast(node):
        return node_arguments(node).get("self")
    return None


def _on_last_dim(softmax: fx.Node) -> bool:
    view, meta = Softmax.of(softmax), tensor_meta(softmax)
    return view is not None and meta is not None and view.dim % meta.rank == meta.rank - 1 \
        and not view.half_to_float


def _carries_scores(user: fx.Node, node: fx.Node) -> bool:
    """``user`` passes the scores ``node`` on: a layout op, a cast, a scale or a mask."""
    if _chain_input(user) is node:
        return True
    if (scaled := _scalar_multiplier(user)) is not None:
        return scaled[0] is node
    if (where := Where.of(user)) is not None:
        return node in (where.input, where.other)
    if (fill := MaskedFill.of(user)) is not None:
        return fill.input is node
    if user.target is aten.add.Tensor:
        return node in node_arguments(user).values()
    return False


def scores_softmax(bmm: fx.Node) -> Optional[fx.Node]:
    """The softmax over the last dim that the ``q @ k^T`` contraction ``bmm`` feeds, if any."""
    node = bmm
    for _ in range(MAX_CHAIN):
        if len(node.users) != 1:
            return None
        user = next(iter(node.users))
        if user.target is SOFTMAX:
            return user if _on_last_dim(user) else None
        if not _carries_scores(user, node):
            return None
        node = user
    return None


def weights_softmax(bmm: fx.Node) -> Optional[fx.Node]:
    """The softmax whose result (through layout ops and casts) is ``bmm``'s first operand."""
    node = Bmm.of(bmm).input
    while isinstance(node, fx.Node) and (source := _chain_input(node)) is not None:
        node = source
    return node if isinstance(node, fx.Node) and node.target is SOFTMAX and _on_last_dim(node) else None


# ---- softmax written as exp over sum ---------------------------------------------------------

_x = Pat.var("x")
_exp = AnyOf(Op(aten.exp.default)(Pat(aten.sub.Tensor, (_x, Op(aten.amax.default)(_x, name="max")),
                                      args={"alpha": 1}, name="shifted")),
             Op(aten.exp.default)(_x), name="e")
EXP_OVER_SUM = Pat(aten.div.Tensor, (_exp, Op(aten.sum.dim_IntList)(_exp, name="total")))


def _reduces_last_keepdim(node: fx.Node, rank: int) -> bool:
    view, meta = Reduction.of(node), tensor_meta(node)
    return view is not None and view.dims(rank) == [rank - 1] and meta is not None and meta.rank == rank


def softmax_from_exp_over_sum(m: Match) -> Optional[fx.Node]:
    meta = tensor_meta(m.root)
    if meta is None or not meta.dtype.is_floating_point or tensor_meta(m.x) is None:
        return None
    shifted = [m.max, m.shifted] if m.get("max") is not None else []
    rank, inner = meta.rank, [m.e, m.total, *shifted]
    if not all(_reduces_last_keepdim(n, rank) for n in [m.total, *shifted[:1]]):
        return None
    if not all(m.read_only_inside(n) for n in inner):
        return None    # the exponentials or the sums are used elsewhere: not a softmax alone
    if not (_leads_to_bmm(m.x) and _value_bmm(m.root) is not None):
        return None    # only attention weights: elsewhere, eager's overflow to NaN stays
    args, kwargs = Softmax.arguments(input=m.x, dim=rank - 1, half_to_float=False)
    return m.call(SOFTMAX, *args, **kwargs)


# ---- the contractions' operands ----------------------------------------------------------------

def _value_bmm(node: fx.Node) -> Optional[fx.Node]:
    """The bmm that takes ``node``'s result (through layout ops and casts) as its first operand."""
    for _ in range(MAX_CHAIN):
        if len(node.users) != 1:
            return None
        user = next(iter(node.users))
        if user.target is BMM:
            return user if Bmm.of(user).input is node else None
        if _chain_input(user) is not node:
            return None
        node = user
    return None


def _output_end(bmm: fx.Node) -> fx.Node:
    """The last node of the single-use chain of layout ops after ``bmm``."""
    end = bmm
    while len(end.users) == 1 and is_layout_op(user := next(iter(end.users))):
        end = user
    return end


def batch_size(value_bmm: fx.Node) -> Optional[Any]:
    """B of the attention whose ``softmax(..) @ v`` is ``value_bmm`` (its batch dim is B*H): the
    user's code says which of its atoms are heads by merging them with the head dim (``[B, T,
    H*D]``), or by keeping them in a dim of their own after B (``[B, H, T, D]``)."""
    end = _output_end(value_bmm)
    if end is value_bmm:
        return None
    try:
        layout = layout_of(end)
    except NotALayout:
        return None
    batch = [a for a in layout.order if layout.origin[a] == 0]
    merged = [a for d in layout.dims if any(layout.origin.get(x) == 2 for x in d) for a in d if a in batch]
    if merged:
        return _product([a for a in batch if a not in merged])
    spread = [d for d in layout.dims if any(a in batch for a in d)]
    return _product(spread[0]) if len(spread) >= 2 else None


def _attention_batch(bmm: fx.Node) -> Optional[Any]:
    """B for either contraction of an attention (None: not one, or B is not known)."""
    if weights_softmax(bmm) is not None:
        return batch_size(bmm)
    softmax = scores_softmax(bmm)
    value = _value_bmm(softmax) if softmax is not None else None
    return batch_size(value) if value is not None else None


def _heads_target(layout: Layout, batch: Any) -> Optional[tuple[list, list, list]]:
    """(B's atoms, H's atoms, the two matrix dims) of a 3-D operand whose batch dim is B*H,
    cutting an atom where B ends inside it; None when B is not a prefix of the batch dim."""
    if len(layout.dims) != 3:
        return None
    rows, columns = ({layout.origin[a] for a in d if a in layout.origin} for d in layout.dims[1:])
    if rows & columns:
        return None    # a reshape that mixes the rows with the columns (k not transposed)
    atoms, have = layout.dims[0], 1
    for i, atom in enumerate(atoms):
        if same_size(have, batch):
            return atoms[:i], atoms[i:], layout.dims[1:]
        need = quotient(batch, have)
        if need is None or atom.broadcast:
            return None
        if quotient(need, atom.size) is None:
            rest = quotient(atom.size, need)
            if rest is None:
                return None
            layout.split(atom, need, rest)
            return _heads_target(layout, batch)
        have = have * atom.size
    return (atoms, [], layout.dims[1:]) if same_size(have, batch) else None


def _operand(operand: Any, batch: Any, build: Builder, transposed: bool) -> Any:
    """q, v or the weights as ``reshape(x4 [B, H, rows, cols], [B*H, rows, cols])``; k^T
    (``transposed``) as ``reshape(transpose(k4 [B, H, Lk, D]), [B*H, D, Lk])``."""
    try:
        layout = layout_of(operand)
        found = _heads_target(layout, batch)
        if found is None:
            return operand
        b, h, (rows, columns) = found
        if not transposed:
            return build.reshape(arrange(layout, [b, h, rows, columns], build), _shape(operand))
        k4 = arrange(layout, [b, h, columns, rows], build)
        return build.reshape(build.permute(k4, [0, 1, 3, 2]), _shape(operand))
    except NotALayout as why:
        log.debug("fuse_attention: %s stays as written: %s", operand.name, why)
        return operand


def canonical_score_operands(m: Match) -> Optional[fx.Node]:
    batch = _attention_batch(m.root) if scores_softmax(m.root) is not None else None
    if batch is None:
        return None
    view, build = Bmm.of(m.root), Builder(m.call, m.root)
    q, kt = _operand(view.input, batch, build, False), _operand(view.mat2, batch, build, True)
    return None if (q, kt) == (view.input, view.mat2) else m.call(BMM, q, kt)


def canonical_value_operands(m: Match) -> Optional[fx.Node]:
    batch = _attention_batch(m.root) if weights_softmax(m.root) is not None else None
    if batch is None:
        return None
    view = Bmm.of(m.root)
    v = _operand(view.mat2, batch, Builder(m.call, m.root), False)
    return None if v is view.mat2 else m.call(BMM, view.input, v)


# ---- layout chains after the contractions and the softmax -------------------------------------

def _in_attention(node: fx.Node) -> bool:
    if node.target is SOFTMAX:
        return _on_last_dim(node) and _value_bmm(node) is not None
    return node.target is BMM and (scores_softmax(node) is not None or weights_softmax(node) is not None)


def _output_layout(end: fx.Node, bmm: fx.Node, build: Builder) -> Layout:
    """The layout of ``end`` over ``out4 = view(bmm, [B, H, Lq, Dv])``: the attention's result as
    the 4-D tensor fused attention gives, however the user's code goes on from it."""
    batch = batch_size(bmm)
    n, rows, columns = _shape(bmm)
    heads = quotient(n, batch) if batch is not None else None
    if heads is None:
        raise NotALayout("the attention's batch and heads are not known")
    out4 = build.reshape(bmm, [batch, heads, rows, columns])
    start = Layout(out4)
    start.reshape([n, rows, columns])
    return layout_of(end, start)


def collapse_layout_chain(m: Match) -> Optional[fx.Node]:
    end = m.root
    if not end.users or all(is_layout_op(user) for user in end.users):
        return None    # not the end of a chain
    source = chain_source(end)
    if not (isinstance(source, fx.Node) and _in_attention(source)):
        return None
    build = Builder(m.call, end)
    try:
        output = source.target is BMM and weights_softmax(source) is not None
        layout = _output_layout(end, source, build) if output else layout_of(end)
        new = arrange(layout, layout.dims, build)
    except NotALayout as why:
        log.debug("fuse_attention: the chain to %s stays as written: %s", end.name, why)
        return None
    node = new
    while node is not end and node is not source and is_layout_op(node):
        node = _chain_input(node)
    return None if node is end else new


LAYOUT_OPS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.permute.default,
              aten.transpose.int, aten.t.default, aten.unsqueeze.default, aten.squeeze.dim,
              aten.squeeze.dims, aten.squeeze.default, aten.expand.default, aten.clone.default,
              aten.alias.default}
RULES = PatternMatcher([
    (EXP_OVER_SUM, softmax_from_exp_over_sum),
    (Pat(BMM), canonical_score_operands),
    (Pat(BMM), canonical_value_operands),
    (Pat(LAYOUT_OPS), collapse_layout_chain),
])
MAX_ROUNDS = 8


def canonicalize_attention(ir: IRGraph) -> Counter:
    """Apply :data:`RULES` until nothing changes; how often each rule fired. One sweep per round,
    dead nodes dropped between rounds (a rule's walk counts users: the dead ones must go)."""
    counts: Counter = Counter()
    for _ in range(MAX_ROUNDS):
        fired = graph_rewrite(ir, RULES, max_sweeps=1)
        if not fired:
            break
        counts.update(fired)
    return counts
