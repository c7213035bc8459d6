"""Shared machinery of the kernel backends (cpu, triton): IR nodes -> kernel calls.

A backend describes itself as a :class:`KernelTable`: how to build one kernel for a fusion group
(``fused``), and per-op rules that turn a node into a kernel call, each of which may decline
(return ``None``) — the pattern and its lowering side by side. :func:`lower_to_kernels` then

1. collapses each fusion group (``node.meta[GROUP_KEY]``, set by the ``fuse_elementwise`` pass)
   into one call of a kernel built from the group's sub-graph; a group whose kernel cannot be
   built runs its ops eagerly, with the reason recorded;
2. applies the op rules (prepacked linear, fused attention, ...);
3. leaves every other node on ATen;
4. runs the post-lowering passes (:mod:`fxforge.backends.lowered_passes`).

Every decision is recorded as a :class:`KernelChoice`: which path each op took and why. That is
what the log line and ``fxforge.explain`` report. The choices travel with the lowered module
(``gm.meta[CHOICES_KEY]``, read back by :func:`kernel_choices`): each lowering has its own.
"""
from __future__ import annotations

import copy
import logging
import operator
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.fx as fx
from torch.fx.passes.tools_common import stable_topological_sort

try:   # torch's GraphModule that generates its code when first called
    from torch.fx._lazy_graph_module import _LazyGraphModule as _LazyModule
except ImportError:  # pragma: no cover - a torch without it generates the code at once
    _LazyModule = fx.GraphModule

from fxforge.backends.base import copy_module
from fxforge.backends.lowered_passes import run_lowered_passes
from fxforge.irgraph import GROUP_KEY, META_KEY, node_arguments, op_name
from fxforge.irgraph.compile_profile import phase
from fxforge.irgraph.query import is_view_op
from fxforge.irgraph.views import LINEAR_TARGETS, LinearOperands, Sdpa

log = logging.getLogger("fxforge.backends")
CHOICES_KEY = "fxf_kernel_choices"   # gm.meta of a lowered module: its list of KernelChoice


@dataclass
class KernelChoice:
    node: str     # the IR node (or fusion group) the kernel replaces
    op: str       # what it computes
    path: str     # "C++ (AVX2)", "oneDNN fp32, prepacked", "Triton", "ATen", "eager fallback", ...
    reason: str = ""
    # what building it took (code generation, compiling, packing weights); not part of equality
    seconds: float = field(default=0.0, compare=False)


# rule(node, constant) -> (callable, args, path, reason) or None to decline.
# ``constant(arg)`` returns the real tensor behind a constant node (or a view of one), else None.
Rule = Callable[[fx.Node, Callable[[Any], Optional[torch.Tensor]]], Optional[tuple]]


@dataclass
class KernelTable:
    name: str
    fused: Callable[[fx.GraphModule], tuple[Callable, str]]  # group -> (kernel, path); may raise
    rules: dict[Any, Rule] = field(default_factory=dict)

    def rule(self, *targets: Any) -> Callable[[Rule], Rule]:
        def wrap(fn: Rule) -> Rule:
            for target in targets:
                self.rules[target] = fn
            return fn
        return wrap


def constant_resolver(gm: fx.GraphModule) -> Callable[[Any], Optional[torch.Tensor]]:
    """The value of a ``get_attr`` node or of a chain of view ops on one, else ``None``."""
    def value(node: Any, depth: int = 0) -> Optional[torch.Tensor]:
        if not isinstance(node, fx.Node) or depth > 8:
            return None
        if node.op == "get_attr":
            return getattr(gm, node.target)
        if node.op == "call_function" and is_view_op(node.target):
            arguments = node_arguments(node)   # by schema name; the first is what it views
            source = next(iter(arguments), None)
            base = value(arguments[source], depth + 1) if source is not None else None
            if base is None or any(isinstance(a, fx.Node) for k, a in arguments.items() if k != source):
                return None
            return node.target(**{**arguments, source: base})
        return None
    return value


# The linear kernels' reading of ``fxforge::linear``/``addmm``/``mm`` (its view; kept by these names
# for the backends' rules).
LINEAR_OPS = LINEAR_TARGETS
linear_operands = LinearOperands.of


def attention_operands(node: fx.Node) -> Optional[dict]:
    """``scaled_dot_product_attention``'s arguments by name; ``None`` when it has dropout."""
    op = Sdpa.of(node)
    if op is None or op.dropout_p:
        return None
    return {"query": op.query, "key": op.key, "value": op.value, "attn_mask": op.attn_mask,
            "is_causal": bool(op.is_causal), "scale": op.scale, "enable_gqa": bool(op.enable_gqa)}


class Bound:
    """A kernel call with the node's non-tensor arguments bound, and the ``__name__`` fx's code
    generation needs for a call target: the lowered graph passes only tensors."""

    def __init__(self, name: str, call: Callable, **fixed):
        self.__name__ = name
        self.call, self.fixed = call, fixed

    def __call__(self, *tensors):
        return self.call(*tensors, **self.fixed)


def _named(kernel: Callable, hint: str) -> Callable:
    if getattr(kernel, "__name__", None):
        return kernel
    try:
        kernel.__name__ = hint
        return kernel
    except (AttributeError, TypeError):
        return Bound(hint, kernel)


def describe_group(sub: fx.GraphModule | fx.Graph) -> str:
    graph = getattr(sub, "graph", sub)
    ops = [op_name(n.target).replace("aten.", "").rsplit(".", 1)[0]
           for n in graph.nodes if n.op == "call_function" and n.target is not operator.getitem]
    return f"fused {len(ops)} ops: {', '.join(ops)}"


def _group_graph(nodes: list[fx.Node]) -> tuple[fx.Graph, list, list]:
    """A fusion group's nodes (in graph order: topologically sorted) as a graph of their own:
    (the graph, the outside values it reads, the members read outside it: its outputs)."""
    inside = set(nodes)
    graph = fx.Graph()
    copies: dict[fx.Node, fx.Node] = {}
    inputs: dict[fx.Node, fx.Node] = {}

    def remap(value: fx.Node) -> fx.Node:
        if value in inside:
            return copies[value]
        if value not in inputs:
            inputs[value] = graph.placeholder(value.name, type_expr=value.type)
            inputs[value].meta = copy.copy(value.meta)
        return inputs[value]
    for node in nodes:
        copies[node] = graph.node_copy(node, remap)
    outputs = [n for n in nodes if any(user not in inside for user in n.users)]
    graph.output(tuple(copies[n] for n in outputs))
    return graph, list(inputs), outputs


def _group_module(graph: fx.Graph, name: str) -> fx.GraphModule:
    """The group's graph as a module. Its code is generated on the first call only (a fallback,
    a tuner's reference run): for most groups the kernel builder reads the graph and nothing runs
    it (SmolLM2: 0.3 s of 151 codegens). A group whose kernel is reused makes none: each module
    is a class of its own, ~1.5 ms to create."""
    return _LazyModule(torch.nn.Module(), graph, class_name=name)


def _in_order(gm: fx.GraphModule) -> bool:
    """Does every node come after the nodes it reads?"""
    seen: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if any(arg not in seen for arg in node.all_input_nodes):
            return False
        seen.add(node)
    return True


# Identical fusion groups (a transformer's 30 layers make 30 of each) share one kernel: built
# for the first, reused for the others. Tests turn it off to compare.
REUSE_BLOCKS = True


def structural_key(graph: fx.Graph) -> Optional[tuple]:
    """What a fusion group's kernel is built from: its ops in order, how they connect, their
    constant arguments and every value's dtype, shape and strides (names aside). Two groups
    with equal keys get the same kernel. None for a group that holds a constant of its own."""
    index: dict[fx.Node, int] = {}
    items = []
    for position, node in enumerate(graph.nodes):
        if node.op == "get_attr":
            return None
        index[node] = position
        args = fx.node.map_arg((node.args, node.kwargs), lambda n: ("%", index[n]))
        target = op_name(node.target) if node.op == "call_function" else ""
        items.append((node.op, target, repr(args), repr(node.meta.get(META_KEY))))
    return tuple(items)


def _collapse_groups(gm: fx.GraphModule, table: KernelTable, choices: list[KernelChoice]) -> None:
    """Each fusion group becomes one call of its kernel (or of its own module, run op by op,
    where the kernel cannot be built), its outputs read by ``getitem``. The fusion passes
    never form a cycle, so no group is checked for one (torch's ``fuse_by_partitions`` walks
    the graph for every group); where a call landed after an outside user of its outputs, one
    stable topological sort at the end puts it first."""
    members: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.meta.get(GROUP_KEY) is not None:
            members.setdefault(node.meta[GROUP_KEY], []).append(node)
    built: dict[tuple, tuple] = {}   # a repeated block's groups: one kernel per structure
    for index, (group, nodes) in enumerate(members.items()):
        name = f"fxf_group_{index}"
        graph, inputs, outputs = _group_graph(nodes)
        what = describe_group(graph)
        start = time.perf_counter()
        try:
            key = structural_key(graph) if REUSE_BLOCKS else None
            if key in built:   # the same kernel under this group's name
                kernel, path = built[key]
                target = Bound(group, kernel)
            else:
                kernel, path = table.fused(_group_module(graph, name))
                target = _named(kernel, group)
                if key is not None:
                    built[key] = (kernel, path)
            op = "call_function"
            choices.append(KernelChoice(group, what, path, seconds=time.perf_counter() - start))
        except Exception as exc:  # unsupported op or failed build: the group's ops run on ATen
            reason = f"{type(exc).__name__}: {exc}"
            choices.append(KernelChoice(group, what, "eager fallback", reason,
                                        time.perf_counter() - start))
            log.warning("fxforge[%s]: %s (%s) runs op by op: %s", table.name, group, what, reason)
            gm.add_submodule(name, _group_module(graph, name))
            target, op = name, "call_module"
        with gm.graph.inserting_after(nodes[-1]):
            call = gm.graph.create_node(op, target, tuple(inputs))
        call.meta = {"val": tuple(n.meta.get("val") for n in outputs)}
        if op == "call_function":
            call.meta["fxf_kernel_group"] = group
        with gm.graph.inserting_after(call):
            for position, output in reversed(list(enumerate(outputs))):
                item = gm.graph.call_function(operator.getitem, (call, position))
                item.meta = copy.copy(output.meta)
                output.replace_all_uses_with(item)
        for node in reversed(nodes):
            gm.graph.erase_node(node)
    if members and not _in_order(gm):   # a call placed after an outside user of its outputs
        stable_topological_sort(gm)
    gm.graph.lint()


def _apply_rules(gm: fx.GraphModule, table: KernelTable, choices: list[KernelChoice]) -> None:
    constant = constant_resolver(gm)
    for node in list(gm.graph.nodes):
        rule = table.rules.get(node.target) if node.op == "call_function" else None
        if rule is None:
            continue
        start = time.perf_counter()
        try:
            lowered = rule(node, constant)
        except Exception as exc:  # a kernel that fails to build: this op stays on ATen
            lowered = None
            reason = f"{type(exc).__name__}: {exc}"
            log.warning("fxforge[%s]: %s (%s) runs on ATen: %s", table.name, op_name(node.target),
                        node.name, reason)
            choices.append(KernelChoice(node.name, op_name(node.target), "ATen (fallback)", reason,
                                        time.perf_counter() - start))
        if lowered is None:
            continue
        kernel, args, path, reason = lowered
        with gm.graph.inserting_before(node):
            call = gm.graph.call_function(_named(kernel, f"{table.name}_{node.name}"), tuple(args))
        call.meta = dict(node.meta)
        call.meta["fxf_kernel_node"] = node.name
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
        choices.append(KernelChoice(node.name, op_name(node.target), path, reason,
                                    time.perf_counter() - start))


def lower_to_kernels(gm: fx.GraphModule, table: KernelTable) -> tuple[fx.GraphModule, list[KernelChoice]]:
    """A copy of ``gm`` rewritten into kernel calls, and the choices made."""
    with phase("copy"):
        gm = copy_module(gm)  # lowering never touches the IR it was given
    choices: list[KernelChoice] = []
    with phase("fusion groups"):
        _collapse_groups(gm, table, choices)
    with phase("kernel rules"):
        _apply_rules(gm, table, choices)
    with phase("lowered passes"):
        run_lowered_passes(gm)
    gm.recompile()
    gm.meta[CHOICES_KEY] = choices
    return gm, choices


def kernel_choices(module: Any) -> list[KernelChoice]:
    """The choices :func:`lower_to_kernels` recorded in ``module`` (a lowered module, or a
    callable wrapping one as ``graph_module``), else in the partitions it calls, in order."""
    module = getattr(module, "graph_module", module)
    if not isinstance(module, fx.GraphModule):
        return []
    if CHOICES_KEY in module.meta:
        return list(module.meta[CHOICES_KEY])
    choices: list[KernelChoice] = []
    for node in module.graph.nodes:
        if node.op == "call_module":
            sub = module.get_submodule(node.target)
            choices += kernel_choices(getattr(sub, "fn", sub))   # a partition (``_AsModule``)
    return choices


def kernel_count(gm: fx.GraphModule) -> int:
    """Kernels one call launches: calls that compute (views, getitem and size queries do not)."""
    count = 0
    for node in gm.graph.nodes:
        if node.op == "call_module":  # a partition: its own graph, or an opaque kernel
            module = gm.get_submodule(node.target)
            inner = getattr(module, "fn", module)
            count += kernel_count(inner) if isinstance(inner, fx.GraphModule) else 1
        elif node.op == "call_function" and launches(node.target):
            target = node.target
            count += kernel_count(target) if isinstance(target, fx.GraphModule) else 1
    return count


def launches(target: Any) -> bool:
    """Whether a call of ``target`` in a lowered graph launches a kernel: not a ``getitem``, a
    view, a size query, Python arithmetic on sizes or a call marked ``not_a_kernel``."""
    if target is operator.getitem or is_view_op(target) or getattr(target, "not_a_kernel", False):
        return False
    if isinstance(target, torch._ops.OpOverload) and "sym_size" in target.name():
        return False
    return getattr(target, "__module__", "") not in ("_operator", "operator", "math")
