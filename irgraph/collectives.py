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
GROUP_ARG = 2   # where both collectives' schemas take the process group's name


def _is_collective(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in COLLECTIVES


def collective_nodes(ir: IRGraph) -> list[fx.Node]:
    return [n for n in ir.gm.graph.nodes if _is_collective(n)]


def has_collectives(gm: fx.GraphModule) -> bool:
    return any(_is_collective(n) for n in gm.graph.nodes)


def _after(ir: IRGraph, anchor: fx.Node, target: Any, args: tuple, kwargs=None) -> fx.Node:
    """``target(*args, **kwargs)`` inserted right after ``anchor``, its metadata inferred."""
    with ir.gm.graph.inserting_after(anchor):
        node = ir.gm.graph.call_function(target, args, kwargs or {})
    ir.infer(node)
    return node


def _waited(ir: IRGraph, node: fx.Node, target: Any, args: tuple) -> fx.Node:
    """``wait_tensor(target(*args))`` inserted after ``node``; returns the wait."""
    issued = _after(ir, node, target, args)
    return _after(ir, issued, WAIT, (issued,))


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
    aten = torch.ops.aten
    contiguous = {"memory_format": torch.contiguous_format}
    readers = list(node.users)
    rank = tensor_meta(node).rank
    moved = _after(ir, node, aten.permute.default, (node, [rank - 1] + list(range(rank - 1))))
    packed = _after(ir, moved, aten.clone.default, (moved,), contiguous)
    gathered = _waited(ir, packed, ALL_GATHER, (packed, world, group))
    out = _after(ir, gathered, aten.permute.default, (gathered, list(range(1, rank)) + [0]))
    if keep != tensor_meta(gathered).shape[0]:
        out = _after(ir, out, aten.slice.Tensor, (out, -1, 0, keep))
    final = _after(ir, out, aten.clone.default, (out,), contiguous)
    for reader in readers:
        reader.replace_input_with(node, final)
    return final


def rebind_group(ir: IRGraph, group: str) -> int:
    """Point every collective of ``ir`` at the process group registered as ``group`` (a stored
    graph names the group of the process that wrote it); returns how many were rebound."""
    nodes = collective_nodes(ir)
    for node in nodes:
        if node.args[GROUP_ARG] != group:
            node.update_arg(GROUP_ARG, group)
    return len(nodes)
