"""Collectives as IR ops: ``torch.ops._c10d_functional``'s all_reduce and all_gather, each
followed by its ``wait_tensor``, as dynamo and torch.export write them.

They are ordinary nodes: the verifier, ``explain``, fake propagation (their fake kernels need
no process group) and serialization see them like any other op. What makes them special:

* they name a process group by its registered name, a string that belongs to one process:
  a stored graph is rebound to the loading process's group (:func:`rebind_group`);
* every rank must run the same collectives in the same order, so a graph holding them must
  not be run differently on different ranks (a recorded decode-step replay is turned off for
  it: ``fxforge/kv_runtime.py``).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from fxforge.irgraph.graph import IRGraph
from fxforge.irgraph.query import tensor_meta

c10d = torch.ops._c10d_functional
ALL_REDUCE = c10d.all_reduce.default
ALL_GATHER = c10d.all_gather_into_tensor.default
WAIT = c10d.wait_tensor.default
COLLECTIVES = (ALL_REDUCE, ALL_GATHER)
# (op, position of its group-name argument)
_GROUP_ARG = {ALL_REDUCE: 2, ALL_GATHER: 2}


def collective_nodes(ir: IRGraph) -> list[fx.Node]:
    return [n for n in ir.gm.graph.nodes if n.op == "call_function" and n.target in COLLECTIVES]


def has_collectives(gm: fx.GraphModule) -> bool:
    return any(n.op == "call_function" and n.target in COLLECTIVES for n in gm.graph.nodes)


def _waited(ir: IRGraph, node: fx.Node, target: Any, args: tuple) -> fx.Node:
    """``wait_tensor(target(*args))`` inserted after ``node``; returns the wait."""
    graph = ir.gm.graph
    with graph.inserting_after(node):
        issued = graph.call_function(target, args)
    with graph.inserting_after(issued):
        done = graph.call_function(WAIT, (issued,))
    ir.infer(issued)
    ir.infer(done)
    return done


def insert_all_reduce(ir: IRGraph, node: fx.Node, group: str) -> fx.Node:
    """Every reader of ``node`` reads the sum of ``node`` over the ranks of ``group`` instead;
    returns the summed value's node."""
    readers = list(node.users)
    done = _waited(ir, node, ALL_REDUCE, (node, "sum", group))
    for reader in readers:
        reader.replace_input_with(node, done)
    return done


def insert_all_gather_last(ir: IRGraph, node: fx.Node, world: int, group: str,
                           keep: int) -> fx.Node:
    """Every reader of ``node`` (``[..., n]`` on each rank) reads the ranks' pieces joined along
    the last dim, in rank order, and cut to its first ``keep`` entries (the last rank's piece
    may be padding). all_gather joins along dim 0, so the last dim moves there and back:
    permutes of constant dims, valid for any (symbolic) leading sizes."""
    readers = list(node.users)
    graph = ir.gm.graph
    rank = tensor_meta(node).rank
    first = [rank - 1] + list(range(rank - 1))
    back = list(range(1, rank)) + [0]
    with graph.inserting_after(node):
        moved = graph.call_function(torch.ops.aten.permute.default, (node, first))
    with graph.inserting_after(moved):
        packed = graph.call_function(torch.ops.aten.clone.default, (moved,),
                                     {"memory_format": torch.contiguous_format})
    for new in (moved, packed):
        ir.infer(new)
    gathered = _waited(ir, packed, ALL_GATHER, (packed, world, group))
    with graph.inserting_after(gathered):
        restored = graph.call_function(torch.ops.aten.permute.default, (gathered, back))
    ir.infer(restored)
    out = restored
    total = tensor_meta(gathered).shape[0]
    if keep != total:
        with graph.inserting_after(out):
            out = graph.call_function(torch.ops.aten.slice.Tensor, (restored, -1, 0, keep))
        ir.infer(out)
    with graph.inserting_after(out):
        final = graph.call_function(torch.ops.aten.clone.default, (out,),
                                    {"memory_format": torch.contiguous_format})
    ir.infer(final)
    for reader in readers:
        reader.replace_input_with(node, final)
    return final




def rebind_group(ir: IRGraph, group: str) -> int:
    """Point every collective of ``ir`` at the process group registered as ``group`` (a stored
    graph names the group of the process that wrote it); returns how many were rebound."""
    count = 0
    for node in collective_nodes(ir):
        index = _GROUP_ARG[node.target]
        if node.args[index] != group:
            node.update_arg(index, group)
        count += 1
    return count
