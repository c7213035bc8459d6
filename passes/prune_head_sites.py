"""Attention sites for head pruning, and the axes of every tensor in them.

A site starts at a softmax of attention scores, or at a fused attention op (SDPA). Walking
back from the scores and from the value operand of the product the probabilities feed (from
SDPA's q, k and v), through the ops that move or combine head-carrying values, reaches the
projections (plain constant-weight linears, fused or not).
Everything computed from their outputs, up to the linears that read it (the output
projection), is the site's *region*: every op in it gets a layout (:mod:`prune_axes`), from the
projections' output columns forward (:mod:`prune_head_layouts`). The two bmms (or the SDPA)
unify the batch axes of q, k and v; the GQA repeat shows up as broadcast atoms there, so the
query head axis splits into a kv-group part and a within-group part by itself, whatever the
literal sizes are.

The kv-group class is the one column class in those batch dims with no broadcast member.
A site is declined, with the reason, when an op of the region is not understood, when the
region reaches anything but linears (a tensor read elsewhere, the graph output), or when the
group axis meets something that would need more than a size change: a side input that varies
along it (T5's relative position bias, ALiBi slopes), a reduction or concatenation along it, a
slice that cuts it, a size read from it.
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Any

import torch.fx as fx

from fxforge.irgraph import POINTWISE, IRGraph
from fxforge.irgraph.query import tensor_meta
from fxforge.irgraph.views import (Bmm, Cat, Expand, LinearOperands, Permute, Sdpa, SdpaFlashCpu,
                                   Slice, Split, Squeeze, SymSize, T, Transpose, Unsqueeze, View)
from fxforge.passes.prune_axes import Atom, NotTracked, carries, find, leaves, members
from fxforge.passes.prune_head_layouts import COPIES, Decline, Tracker
from fxforge.passes.prune_sites import SOFTMAX, common_prefix, is_plain_linear, weight_name

MAX_REGION = 400     # ops between the projections of one site (a tiny llama's has ~50)
FUSED = (*Sdpa.TARGETS, *SdpaFlashCpu.TARGETS)


@dataclasses.dataclass
class HeadSite:
    attention: fx.Node                 # the softmax of the scores, or the fused attention op
    producers: list[fx.Node]           # the q/k/v projections, in graph order
    columns: dict[fx.Node, Atom]       # projection -> the atom of its output columns
    consumer: fx.Node                  # the output projection
    region: list[fx.Node]              # the ops between, in graph order
    layouts: dict[fx.Node, Any]        # op -> its dims' atoms (a split: one layout per piece)
    group: Atom                        # a member of the kv-group class
    heads: int
    kv_heads: int
    name: str = ""

    def is_group(self, atom: Atom) -> bool:
        return find(atom) is find(self.group)

    def consumer_rows(self) -> list[Atom]:
        """The atoms of the output projection's input features."""
        return self.layouts[LinearOperands.of(self.consumer).x][-1]


def head_sites(ir: IRGraph) -> tuple[list[HeadSite], dict[str, str]]:
    """Every attention site whose heads can be pruned, and why each other one cannot (by the
    name of its softmax or fused attention op)."""
    sites, declined, covered = [], {}, set()
    for node in ir.gm.graph.nodes:
        if node.target not in SOFTMAX + FUSED or node in covered:
            continue
        try:
            site = _site_of(node)
        except (Decline, NotTracked) as exc:
            declined[node.name] = str(exc)
            continue
        covered.update(site.region)
        sites.append(site)
    return sites, declined


def _site_of(attention: fx.Node) -> HeadSite:
    """The site of a softmax of scores or of a fused attention op."""
    if attention.target in SOFTMAX:
        starts = [attention.args[0], _value_operand(attention)]
    else:
        fused = Sdpa.of(attention) or SdpaFlashCpu.of(attention)
        starts = [fused.query, fused.key, fused.value]
    producers = _producers(starts)
    region, consumers = _region(producers)
    if len(consumers) != 1:
        raise Decline(f"the heads reach {len(consumers)} linears, not one output projection")
    if sum(n.target in SOFTMAX + FUSED for n in region) != 1:
        raise Decline("the projections feed more than one attention")
    tracker = Tracker(producers)
    for node in region:
        tracker.visit(node)
    consumer = consumers[0]
    x_dims = tracker.layouts[LinearOperands.of(consumer).x]
    tracker.fixed += [(dim, f"{consumer.name} reads it as rows") for dim in x_dims[:-1]]
    group, heads = _classify(tracker, attention)
    site = HeadSite(attention, producers, tracker.columns, consumer, region, tracker.layouts,
                    group, heads, int(group.size),
                    common_prefix([weight_name(LinearOperands.of(n).weight)
                                   for n in producers + [consumer]]))
    _check_group_axis(site, tracker.fixed)
    return site


# ---------------------------------------------------------------- finding the projections

def _value_operand(softmax: fx.Node) -> fx.Node:
    """The second operand of the bmm the probabilities feed (through views and copies)."""
    node = softmax
    while len(node.users) == 1:
        user = next(iter(node.users))
        if Bmm.of(user) is not None and user.args[0] is node:
            return user.args[1]
        if not (View.of(user) or user.target in POINTWISE or user.target in COPIES):
            break
        node = user
    raise Decline(f"{softmax.name}'s probabilities do not reach a bmm with the values")


def _producers(starts: list[fx.Node]) -> list[fx.Node]:
    """The projections q, k and v come from, walking back through the ops that carry them."""
    found, seen, stack = [], set(), list(starts)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if LinearOperands.of(node) is not None:
            if not is_plain_linear(node):
                raise Decline(f"{node.name} is not a plain constant-weight projection")
            found.append(node)
        else:
            stack.extend(_carriers(node))
        if len(seen) > MAX_REGION:
            raise Decline("the scores are too far from any projection")
    order = {n: i for i, n in enumerate(starts[0].graph.nodes)}
    return sorted(found, key=order.__getitem__)


def _carriers(node: Any) -> list[fx.Node]:
    """The inputs of ``node`` that carry its head values (same-shape operands of pointwise ops;
    a broadcast side input such as a mask or a rotary table is not one)."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        raise Decline(f"the heads come from {getattr(node, 'name', node)}, not a projection")
    if node.target in POINTWISE or node.target in COPIES:
        shape = tensor_meta(node).shape
        return [a for a in node.args if isinstance(a, fx.Node) and tensor_meta(a) is not None
                and tensor_meta(a).shape == shape]
    if (cat := Cat.of(node)) is not None:
        return list(cat.tensors)
    if node.target is operator.getitem:
        return [node.args[0]]
    layout_op = (View.of(node) or Permute.of(node) or Transpose.of(node) or T.of(node) or
                 Unsqueeze.of(node) or Squeeze.of(node) or Expand.of(node) or Slice.of(node) or
                 Split.of(node))
    if layout_op is not None:
        return [layout_op.input]
    if Bmm.of(node) is not None:
        return [node.args[0], node.args[1]]
    raise Decline(f"{node.name} ({node.target}) is not followed back to the projections")


def _region(producers: list[fx.Node]) -> tuple[list[fx.Node], list[fx.Node]]:
    """(the ops computed from the projections, in graph order; the linears that read them)."""
    inside, consumers, stack = set(producers), [], list(producers)
    while stack:
        node = stack.pop()
        if SymSize.of(node) is not None:
            continue   # a size, not a tensor: its readers are outside
        for user in node.users:
            if user in inside or user in consumers:
                continue
            if user.op == "output":
                raise Decline(f"{node.name} is a graph output")
            lin = LinearOperands.of(user)
            if lin is not None and lin.x is node and is_plain_linear(user):
                consumers.append(user)
                continue
            inside.add(user)
            stack.append(user)
            if len(inside) > MAX_REGION:
                raise Decline("the projections' outputs spread too far")
    order = {n: i for i, n in enumerate(producers[0].graph.nodes)}
    region = sorted(inside - set(producers), key=order.__getitem__)
    return region, sorted(consumers, key=order.__getitem__)


# ---------------------------------------------------------------- which axis is the group

def _classify(tracker: Tracker, attention: fx.Node) -> tuple[Atom, int]:
    """(a member of the kv-group class, the number of query heads)."""
    wanted = 2 if attention.target in SOFTMAX else 1
    if len(tracker.kernels) != wanted or (wanted == 2 and attention not in tracker.layouts):
        raise Decline(f"{len(tracker.kernels)} products between the projections, not q@k and p@v"
                      " around the softmax, or one fused attention")
    batch = [a for dims in tracker.batch for a in leaves(dims)]
    groups, heads = [], 1
    for root in {find(a) for a in batch}:
        kinds = members(root)
        if not any(m.column for m in kinds):
            continue   # the batch
        if any(m.broadcast for m in kinds):
            heads *= root.size        # repeated for the query heads of a group
        elif all(m.column for m in kinds):
            groups.append(root)
        else:
            raise Decline("a head axis meets an axis that does not come from the projections")
    if not groups:
        raise Decline("no kv-group axis of more than one group (multi-query attention has a "
                      "single kv head: nothing to prune)")
    if len(groups) > 1:
        raise Decline(f"{len(groups)} kv-group axes in the attention batch, not one")
    if not isinstance(groups[0].size, int):
        raise Decline("the kv-group axis has a symbolic size")
    return groups[0], heads * groups[0].size


def _check_group_axis(site: HeadSite, fixed: list[tuple[list[Atom], str]]) -> None:
    if any(m.pieces for m in members(site.group)):
        raise Decline("a slice cuts across the kv groups")
    for atoms, why in fixed:
        if any(carries(a, site.is_group) for a in atoms):
            raise Decline(f"{why}, and it holds the heads")
