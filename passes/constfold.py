"""Constant folding of weight-only subgraphs (casts, contiguous copies, arithmetic on weights).

A node folds when every input is a constant or another folding node, it is pure and its shapes
are static. Each folded subgraph is evaluated once at compile time and its frontier (nodes read
by the rest of the graph) becomes new constants. Two things are left alone on purpose:
  * a bare view of a constant (``t(w)``, ``permute``, ``slice``): it costs nothing at run time,
    and materialising it would only duplicate the weight;
  * a result much larger than its inputs (``expand``, ``repeat`` of a weight): folding would
    trade a cheap op for memory. The smaller inputs are folded instead.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from fxforge.irgraph import IRGraph, TensorMeta
from fxforge.irgraph.capture import WEIGHT_NAME_KEY
from fxforge.irgraph.graph import hoist_get_attrs
from fxforge.irgraph.meta import META_KEY
from fxforge.irgraph.query import alias_root, is_pure, is_view_op
from fxforge.passes.base import PassResult, register_pass

aten = torch.ops.aten

MAX_GROWTH = 2.0  # fold a node only if its output is at most this many times its inputs' size
MIN_GROWTH_BYTES = 1 << 16  # ... unless the output is this small anyway (masks, scalars)


def _static(node: fx.Node) -> bool:
    meta = node.meta.get(META_KEY)
    if isinstance(meta, TensorMeta):
        return meta.is_static
    return isinstance(meta, tuple) and all(isinstance(m, TensorMeta) and m.is_static for m in meta)


def _foldable(ir: IRGraph) -> set[fx.Node]:
    folds: set[fx.Node] = set()
    for node in ir.gm.graph.nodes:
        if node.op == "get_attr":
            folds.add(node)
        elif node.op == "call_function" and is_pure(node) and _static(node):
            inputs = node.all_input_nodes
            if all(i in folds for i in inputs) and (inputs or _is_factory(node)):
                folds.add(node)
    return folds


_FACTORIES = ("arange", "full", "ones", "zeros", "scalar_tensor")  # never ``empty``: uninitialised


def _is_factory(node: fx.Node) -> bool:
    return isinstance(node.target, torch._ops.OpOverload) and \
        node.target._schema.name.split("::")[-1] in _FACTORIES


def _nbytes(node: fx.Node) -> int:
    meta = node.meta.get(META_KEY)
    if not isinstance(meta, TensorMeta):
        return 0
    return int(meta.numel()) * torch.empty((), dtype=meta.dtype).element_size()


def _worth_folding(node: fx.Node) -> bool:
    if node.op == "get_attr" or is_view_op(node.target) or node.target is operator.getitem:
        return False
    out = _nbytes(node)
    inputs = sum(_nbytes(i) for i in node.all_input_nodes)
    return out <= MIN_GROWTH_BYTES or out <= MAX_GROWTH * max(inputs, 1)


def _frontier(ir: IRGraph, folds: set[fx.Node]) -> list[fx.Node]:
    """Foldable nodes read by non-folding nodes, pushed upstream past views and blow-ups."""
    pending = [n for n in folds if any(u not in folds for u in n.users)]
    chosen: set[fx.Node] = set()
    visited: set[fx.Node] = set()
    while pending:
        node = pending.pop()
        if node in visited:
            continue
        visited.add(node)
        if _worth_folding(node) and isinstance(node.meta.get(META_KEY), TensorMeta):
            chosen.add(node)
        else:
            pending.extend(i for i in node.all_input_nodes if i in folds)
    order = {n: i for i, n in enumerate(ir.gm.graph.nodes)}
    return sorted(chosen, key=order.__getitem__)


def _evaluate(ir: IRGraph, folds: set[fx.Node], wanted: list[fx.Node]) -> dict[fx.Node, torch.Tensor]:
    needed: set[fx.Node] = set()
    stack = list(wanted)
    while stack:
        node = stack.pop()
        if node not in needed:
            needed.add(node)
            stack.extend(node.all_input_nodes)
    env: dict[fx.Node, object] = {}
    for node in ir.gm.graph.nodes:
        if node not in needed:
            continue
        if node.op == "get_attr":
            env[node] = getattr(ir.gm, node.target)
        else:
            args = fx.node.map_arg(node.args, env.__getitem__)
            kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
            env[node] = node.target(*args, **kwargs)
    return {n: env[n] for n in wanted}


def _weight_names(node: fx.Node) -> str:
    """The model's names of the weights a folded value comes from (per-layer options find a
    fused projection by any of its parts)."""
    names, stack, seen = [], [node], set()
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        if current.op == "get_attr" and current.meta.get(WEIGHT_NAME_KEY):
            names.extend(current.meta[WEIGHT_NAME_KEY].split(","))
        stack.extend(current.all_input_nodes)
    return ",".join(sorted(set(names)))


@register_pass("constant_fold")
def constant_fold(ir: IRGraph) -> PassResult:
    """Evaluate weight-only subgraphs once at compile time."""
    folds = _foldable(ir)
    wanted = _frontier(ir, folds)
    if not wanted:
        return PassResult(ir, {"folded": 0})
    weights = {n.target for n in ir.gm.graph.nodes if n.op == "get_attr"}
    with torch.no_grad():
        values = _evaluate(ir, folds, wanted)
    for node, value in values.items():
        const = ir.add_constant(f"folded_{node.name}", value.clone(memory_format=torch.preserve_format),
                                before=node)
        if const.meta[META_KEY] != node.meta[META_KEY]:
            # Layout differs from what the graph assumed: keep the original node.
            ir.gm.graph.erase_node(const)
            delattr(ir.gm, const.target)
            continue
        const.meta[WEIGHT_NAME_KEY] = _weight_names(node)
        node.replace_all_uses_with(const)
    ir.gm.graph.eliminate_dead_code()
    _copy_folded_outputs(ir, {n.target for n in ir.gm.graph.nodes if n.op == "get_attr"} - weights)
    hoist_get_attrs(ir.gm.graph)
    return PassResult(ir, {"folded": len(values)})


def _copy_folded_outputs(ir: IRGraph, folded: set[str]) -> None:
    """Eager returns a fresh tensor where a folded constant (or a view of one) is an output:
    return a copy of it too, or every call would hand out, and let the caller mutate, the same
    memory."""
    output = ir.output_node()
    for value in output.all_input_nodes:
        root = alias_root(value)
        if root.op == "get_attr" and root.target in folded:
            with ir.gm.graph.inserting_before(output):
                copy = ir.gm.graph.call_function(aten.clone.default, (value,))
            ir.infer(copy)
            output.replace_input_with(value, copy)
