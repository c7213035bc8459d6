"""Graph queries that passes and backends share: a node's tensor metadata, whether an op is a
view, what memory a value aliases, whether a call is pure, whether a value is a weight.

They read only the IR (no pass, no backend), so every layer may import them.
"""
from __future__ import annotations

import operator
from typing import Any, Callable, Optional

import torch
import torch.fx as fx

from fxforge.irgraph.graph import first_tensor_meta
from fxforge.irgraph.meta import tensor_meta

__all__ = ["alias_root", "aliases_graph_input", "evaluate_on_constants", "first_tensor_meta",
           "is_constant", "is_pure", "is_view_op", "is_weight", "tensor_meta", "view_source"]


def is_view_op(target: Any) -> bool:
    """An ATen op whose (first) result aliases its input's memory (``view``, ``t``, ``split``)."""
    return isinstance(target, torch._ops.OpOverload) and bool(target._schema.returns) and \
        target._schema.returns[0].alias_info is not None


def view_source(node: Any) -> Optional[fx.Node]:
    """The value a view op or a ``getitem`` reads (its first argument, in every view op's
    schema), or None when ``node`` is neither."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.args
            and (node.target is operator.getitem or is_view_op(node.target))):
        return None
    return node.args[0] if isinstance(node.args[0], fx.Node) else None


def alias_root(node: fx.Node) -> fx.Node:
    """The node whose memory ``node`` views: follows view ops and ``getitem`` of multi-output
    views (``split``, ``unbind``), stopping at the first node that makes new memory."""
    while (source := view_source(node)) is not None:
        node = source
    return node


def aliases_graph_input(node: fx.Node) -> bool:
    """True if ``node`` is, or is a view chain of, a placeholder or a constant."""
    return alias_root(node).op in ("placeholder", "get_attr")


def is_constant(node: Any) -> bool:
    """A constant or a view of one (``t(w)``, ``permute(w)``)."""
    return isinstance(node, fx.Node) and alias_root(node).op == "get_attr"


def is_pure(node: fx.Node) -> bool:
    """A call we may drop, merge or evaluate ahead of time: no mutation, no randomness."""
    target = node.target
    if node.op != "call_function":
        return False
    if isinstance(target, torch._ops.OpOverload):
        if target._schema.is_mutable or torch.Tag.nondeterministic_seeded in target.tags:
            return False
        return not target.name().startswith("aten::_assert") and "sym_constrain" not in target.name()
    return getattr(target, "__module__", None) in ("_operator", "operator")


def evaluate_on_constants(node: fx.Node, gm: fx.GraphModule,
                          constant: Callable[[fx.Node], Optional[torch.Tensor]]
                          ) -> Optional[torch.Tensor]:
    """``node``'s value when it is a constant of ``gm`` or a pure call whose inputs all have a
    value by ``constant`` (the caller's memoized evaluator, which calls back here), else None."""
    if node.op == "get_attr":
        return getattr(gm, node.target)
    if not is_pure(node) or any(constant(i) is None for i in node.all_input_nodes):
        return None
    with torch.no_grad():
        value = node.target(*fx.node.map_arg(node.args, constant),
                            **fx.node.map_arg(node.kwargs, constant))
    return value if isinstance(value, torch.Tensor) else None


def is_weight(node: Any, memo: Optional[dict] = None) -> bool:
    """A constant, a view of one, or a pure computation on constants only (the weight
    concatenation ``fuse_projections`` leaves for ``constant_fold``). Pass the same ``memo``
    to many calls on one graph to visit each node once in all."""
    if not isinstance(node, fx.Node):
        return False
    if is_constant(node):
        return True
    memo = {} if memo is None else memo
    stack = [node]
    while stack:  # post-order: a node is decided once all of its inputs are
        current = stack[-1]
        if current in memo:
            stack.pop()
        elif current.op == "get_attr":
            memo[current] = True
        elif not is_pure(current) or not current.all_input_nodes:
            memo[current] = False  # a runtime input, a factory or a random op
        else:
            pending = [i for i in current.all_input_nodes if i not in memo]
            if pending:
                stack.extend(pending)
            else:
                memo[current] = all(memo[i] for i in current.all_input_nodes)
    return memo[node]
