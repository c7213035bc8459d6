"""Fusion groups: what may be fused, and how a group is recorded on the IR.

A fusion pass does not restructure the graph: it tags each member node with
``node.meta[GROUP_KEY] = "<group name>"``. The graph stays a plain ATen graph (it still
verifies, runs on the reference backend, prints and serializes), and a backend turns each
group into one kernel. A group is valid when merging it makes no cycle
(:func:`fxforge.irgraph.would_create_cycle`) and every member is in :data:`POINTWISE` or
:data:`ROW_REDUCTIONS` (reductions over the last dimension only: one row per kernel program),
or is in :data:`LAST_DIM_LAYOUT` and :func:`acts_on_last_dim` holds for it.

The kernel-side contract (``fxforge.kernels.fused``): a group arrives as a small
``fx.GraphModule`` of these ops whose placeholders are the group's inputs and whose output
tuple holds the values used outside the group; every tensor in it broadcasts to one
iteration shape, or is a last-dimension reduction of it.
"""
from __future__ import annotations

import operator
from collections import defaultdict
from typing import Optional

import torch
import torch.fx as fx

from fxforge.irgraph.graph import IRGraph
from fxforge.irgraph.views_aten import Cat, LayerNorm, Reduction, RmsNorm, Slice

aten = torch.ops.aten
GROUP_KEY = "fxf_group"

# Elementwise ops (broadcasting, with scalar or tensor operands) a fused kernel computes.
POINTWISE = frozenset({
    aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar, aten.mul.Tensor,
    aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar, aten.neg.default, aten.abs.default,
    aten.exp.default, aten.log.default, aten.sqrt.default, aten.rsqrt.default,
    aten.reciprocal.default, aten.pow.Tensor_Scalar, aten.tanh.default, aten.sigmoid.default,
    aten.erf.default, aten.relu.default, aten.gelu.default, aten.silu.default, aten.sin.default,
    aten.cos.default, aten.maximum.default, aten.minimum.default, aten.clamp.default,
    aten.where.self, aten.eq.Scalar, aten.eq.Tensor, aten.ne.Scalar, aten.lt.Scalar,
    aten.lt.Tensor, aten.le.Scalar, aten.gt.Scalar, aten.gt.Tensor, aten.ge.Scalar,
    aten.logical_not.default, aten.bitwise_not.default, aten.logical_and.default,
    aten._to_copy.default, aten.clone.default,
})

# Reductions over the last dimension, whole (softmax, layer/RMS norm) or one statistic.
ROW_REDUCTIONS = frozenset({
    aten.sum.dim_IntList, aten.mean.dim, aten.amax.default, aten.amin.default,
    aten._softmax.default, aten._log_softmax.default, aten.native_layer_norm.default,
    aten.rms_norm.default,
})

FUSIBLE = POINTWISE | ROW_REDUCTIONS | {operator.getitem}

# Column moves within a row: a slice reads its source at a shifted column, a cat picks a piece
# by column range (rotary embeddings' ``rotate_half``). Fusible ONLY when
# :func:`acts_on_last_dim` holds, so they are kept out of FUSIBLE (fusible whatever the args).
LAST_DIM_LAYOUT = frozenset({aten.slice.Tensor, aten.cat.default})


def acts_on_last_dim(node: fx.Node) -> bool:
    """A ``slice`` (step 1) or ``cat`` over the last dimension of its tensors."""
    op = Cat.of(node) or Slice.of(node)
    if op is None or (isinstance(op, Slice) and op.step != 1):
        return False
    first = op.tensors[0] if isinstance(op, Cat) else op.input
    val = first.meta.get("val") if isinstance(first, fx.Node) else None
    if not isinstance(val, torch.Tensor) or val.dim() == 0:
        return False
    return isinstance(op.dim, int) and op.dim % val.dim() == val.dim() - 1


def reduced_row_input(node: fx.Node) -> Optional[fx.Node]:
    """The tensor a :data:`ROW_REDUCTIONS` node reduces, when it reduces that tensor's last
    dimension only (a whole row per kernel program); None for any other node or reduction."""
    op = LayerNorm.of(node) or RmsNorm.of(node) or Reduction.of(node)
    val = op.input.meta.get("val") if op is not None and isinstance(op.input, fx.Node) else None
    if not isinstance(val, torch.Tensor) or val.dim() == 0:
        return None
    if isinstance(op, (LayerNorm, RmsNorm)):
        return op.input if len(op.normalized_shape) == 1 else None
    named = op.dim not in (None, [], ())   # reducing every dim is not a row program's job
    return op.input if named and op.dims(val.dim()) == [val.dim() - 1] else None


def group_of(node: fx.Node) -> Optional[str]:
    return node.meta.get(GROUP_KEY)


def groups(ir: IRGraph) -> dict[str, list[fx.Node]]:
    """Group name -> member nodes, in graph order."""
    out: dict[str, list[fx.Node]] = defaultdict(list)
    for node in ir.gm.graph.nodes:
        name = group_of(node)
        if name is not None:
            out[name].append(node)
    return dict(out)


def clear_groups(ir: IRGraph) -> None:
    for node in ir.gm.graph.nodes:
        node.meta.pop(GROUP_KEY, None)
