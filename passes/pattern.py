"""Pattern rewrites, in two tiers.

* :class:`Rewrite`: a multi-op pattern written as ordinary torch code and its replacement, both
  traced to fxforge's op set with ``make_fx`` and matched on the IR with torch.fx's subgraph
  matcher. A ``check`` sees the matched inputs and their metadata and may decline; after
  replacing, the new nodes get fresh metadata and the replacement's output must have the
  shape and dtype of what it replaced, or the rewrite is a bug and raises.
* :class:`RuleTable`: small local rules indexed by op (as tinygrad's PatternMatcher):
  ``rule(node, ir)`` returns the value that replaces ``node`` or ``None`` to decline.

Both count their matches per rule name, so tests can assert how often each fired.
"""
from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.fx as fx
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.subgraph_rewriter import replace_pattern_with_filters

from fxforge.irgraph import IRGraph, TensorMeta, decomposition_table, meta_of
from fxforge.irgraph.meta import META_KEY


@dataclass
class Match:
    """What a ``check`` sees: pattern input name -> matched IR node (with ``.meta["fxf"]``)."""

    inputs: dict[str, fx.Node]
    nodes: list[fx.Node]

    def meta(self, name: str):
        return self.inputs[name].meta.get(META_KEY)


@dataclass
class Rewrite:
    name: str
    pattern: Callable
    replacement: Callable
    example_inputs: Callable[[], tuple]  # fresh tensors to trace both sides with
    check: Optional[Callable[[Match], bool]] = None
    ignore_literals: bool = False
    _traced: Optional[tuple[fx.GraphModule, fx.GraphModule]] = field(default=None, repr=False)

    def traced(self) -> tuple[fx.GraphModule, fx.GraphModule]:
        if self._traced is None:
            table = decomposition_table()
            pattern = make_fx(self.pattern, decomposition_table=table)(*self.example_inputs())
            replacement = make_fx(self.replacement, decomposition_table=table)(*self.example_inputs())
            for gm in (pattern, replacement):
                gm.graph.eliminate_dead_code()
                gm.recompile()
            self._traced = (pattern, replacement)
        return self._traced

    def apply(self, ir: IRGraph) -> int:
        pattern, replacement = self.traced()
        names = [n.name for n in pattern.graph.nodes if n.op == "placeholder"]

        def accept(match, original_graph, pattern_graph) -> bool:
            if self.check is None:
                return True
            inputs = dict(zip(names, match.placeholder_nodes))
            return bool(self.check(Match(inputs, list(match.nodes_map.values()))))

        results = replace_pattern_with_filters(ir.gm, pattern, replacement, match_filters=[accept],
                                               ignore_literals=self.ignore_literals)
        for result in results:
            _refresh_and_check(ir, result, self.name)
        return len(results)


def _refresh_and_check(ir: IRGraph, result: Any, rule: str) -> None:
    """Re-derive metadata of the inserted nodes (graph_copy brought the traced example's),
    then require the replacement's output to have the replaced value's shape and dtype."""
    new = set(result.replacements)
    for node in ir.gm.graph.nodes:  # topological order
        if node in new and node.op == "call_function":
            node.meta.pop("val", None)
            ir.infer(node)
    outputs = [n for n in result.replacements if any(u not in new for u in n.users)]
    old = result.nodes_map[result.anchor].meta.get(META_KEY)
    if len(outputs) == 1 and isinstance(old, TensorMeta):
        new_meta = outputs[0].meta.get(META_KEY)
        if not isinstance(new_meta, TensorMeta) or new_meta.shape != old.shape or new_meta.dtype != old.dtype:
            got = new_meta.describe() if isinstance(new_meta, TensorMeta) else repr(new_meta)
            raise AssertionError(f"rewrite {rule!r} replaced {old.describe()} with {got}")


Rule = Callable[[fx.Node, IRGraph], Any]


@dataclass
class RuleTable:
    """Local rewrite rules keyed by op; applied in one forward sweep, repeated to a fixpoint."""

    rules: dict[Any, list[tuple[str, Rule]]] = field(default_factory=dict)

    def add(self, ops, name: str) -> Callable[[Rule], Rule]:
        ops = ops if isinstance(ops, (list, tuple)) else [ops]

        def wrap(fn: Rule) -> Rule:
            for op in ops:
                self.rules.setdefault(op, []).append((name, fn))
            return fn
        return wrap

    def apply(self, ir: IRGraph, max_sweeps: int = 8) -> Counter:
        counts: Counter = Counter()
        for _ in range(max_sweeps):
            fired = 0
            for node in list(ir.gm.graph.nodes):
                for name, rule in self.rules.get(node.target, ()):
                    if not node.users:
                        break
                    replacement = rule(node, ir)
                    if replacement is None or replacement is node:
                        continue
                    node.replace_all_uses_with(replacement)
                    counts[name] += 1
                    fired += 1
                    break
            if not fired:
                break
        ir.gm.graph.eliminate_dead_code()
        return counts


def is_view_op(target: Any) -> bool:
    """An ATen op whose (first) result aliases its input's memory (``view``, ``t``, ``split``)."""
    return isinstance(target, torch._ops.OpOverload) and bool(target._schema.returns) and \
        target._schema.returns[0].alias_info is not None


def alias_root(node: fx.Node) -> fx.Node:
    """The node whose memory ``node`` views: follows view ops and ``getitem`` of multi-output
    views (``split``, ``unbind``), stopping at the first node that makes new memory."""
    while node.op == "call_function" and node.args and isinstance(node.args[0], fx.Node):
        if not (node.target is operator.getitem or is_view_op(node.target)):
            break
        node = node.args[0]
    return node


def aliases_graph_input(node: fx.Node) -> bool:
    """True if ``node`` is, or is a view chain of, a placeholder or a constant."""
    return alias_root(node).op in ("placeholder", "get_attr")


def same_value_layout(a: fx.Node, b: fx.Node) -> bool:
    """True when two nodes hold tensors of equal shape, strides, dtype, device and offset."""
    va, vb = a.meta.get("val"), b.meta.get("val")
    if not (isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor)):
        return False
    if meta_of(va) != meta_of(vb) or va.layout != torch.strided or vb.layout != torch.strided:
        return False
    return va.storage_offset() == vb.storage_offset()
