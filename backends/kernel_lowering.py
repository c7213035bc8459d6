"""Shared machinery of the kernel backends (cpu, triton): IR nodes -> kernel calls.

A backend describes itself as a :class:`KernelTable`: how to build one kernel for a fusion group
(``fused``), and per-op rules that turn a node into a kernel call, each of which may decline
(return ``None``) — the pattern and its lowering side by side. :func:`lower_to_kernels` then

1. collapses each fusion group (``node.meta[GROUP_KEY]``, set by the ``fuse_elementwise`` pass)
   into one call of a kernel built from the group's sub-graph; a group whose kernel cannot be
   built runs its ops eagerly, with the reason recorded;
2. applies the op rules (prepacked linear, fused attention, ...);
3. leaves every other node on ATen.

Every decision is recorded as a :class:`KernelChoice`: which path each op took and why. That is
what the log line and ``fxforge.explain`` report.
"""
from __future__ import annotations

import logging
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.fx as fx
from torch.fx.passes.utils.fuser_utils import fuse_by_partitions

from fxforge.backends.base import copy_module, drop_unused_tensors
from fxforge.irgraph import GROUP_KEY, META_KEY, TensorMeta, op_name
from fxforge.passes.pattern import is_view_op

log = logging.getLogger("fxforge.backends")


@dataclass
class KernelChoice:
    node: str     # the IR node (or fusion group) the kernel replaces
    op: str       # what it computes
    path: str     # "C++ (AVX2)", "oneDNN fp32, prepacked", "Triton", "ATen", "eager fallback", ...
    reason: str = ""


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
        if node.op == "call_function" and is_view_op(node.target) and node.args:
            base = value(node.args[0], depth + 1)
            if base is None or any(isinstance(a, fx.Node) for a in node.args[1:]):
                return None
            return node.target(base, *node.args[1:], **node.kwargs)
        return None
    return value


@dataclass
class LinearOperands:
    """``fxforge::linear``, ``addmm`` (no beta/alpha) or ``mm`` read as one matmul + epilogue."""
    x: fx.Node
    weight: fx.Node
    bias: Optional[fx.Node] = None
    activation: str = "none"
    residual: Optional[fx.Node] = None
    out_dtype: Optional[torch.dtype] = None


LINEAR_OPS = (torch.ops.fxforge.linear.default, torch.ops.aten.addmm.default, torch.ops.aten.mm.default)


def linear_operands(node: fx.Node) -> Optional[LinearOperands]:
    if node.target is torch.ops.fxforge.linear.default:
        x, w, bias, activation, residual = node.args[:5]
        out_dtype = node.args[5] if len(node.args) > 5 else node.kwargs.get("out_dtype")
        return LinearOperands(x, w, bias, activation, residual, out_dtype)
    if node.target is torch.ops.aten.addmm.default:
        return None if node.kwargs else LinearOperands(node.args[1], node.args[2], node.args[0])
    if node.target is torch.ops.aten.mm.default:
        return LinearOperands(*node.args)
    return None


_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def attention_operands(node: fx.Node) -> Optional[dict]:
    """``scaled_dot_product_attention``'s arguments by name; ``None`` when it has dropout."""
    values = dict(zip(_SDPA_ARGS, node.args))
    values.update(node.kwargs)
    if values.get("dropout_p", 0.0):
        return None
    return {"query": values["query"], "key": values["key"], "value": values["value"],
            "attn_mask": values.get("attn_mask"), "is_causal": bool(values.get("is_causal", False)),
            "scale": values.get("scale"), "enable_gqa": bool(values.get("enable_gqa", False))}


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


def describe_group(sub: fx.GraphModule) -> str:
    ops = [op_name(n.target).replace("aten.", "").rsplit(".", 1)[0]
           for n in sub.graph.nodes if n.op == "call_function" and n.target is not operator.getitem]
    return f"fused {len(ops)} ops: {', '.join(ops)}"


def _collapse_groups(gm: fx.GraphModule, table: KernelTable, choices: list[KernelChoice]) -> None:
    members: dict[str, dict[fx.Node, None]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.meta.get(GROUP_KEY) is not None:
            members.setdefault(node.meta[GROUP_KEY], {})[node] = None
    if not members:
        return
    names = list(members)
    fuse_by_partitions(gm, list(members.values()), prefix="fxf_group_", always_return_tuple=True)
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not str(node.target).startswith("fxf_group_"):
            continue
        group = names[int(str(node.target).rsplit("_", 1)[1])]
        sub = gm.get_submodule(node.target)
        what = describe_group(sub)
        try:
            kernel, path = table.fused(sub)
        except Exception as exc:  # unsupported op or failed build: the group's ops run on ATen
            reason = f"{type(exc).__name__}: {exc}"
            choices.append(KernelChoice(group, what, "eager fallback", reason))
            log.warning("fxforge[%s]: %s (%s) runs op by op: %s", table.name, group, what, reason)
            continue  # the call_module of the group's own graph stays
        choices.append(KernelChoice(group, what, path))
        with gm.graph.inserting_before(node):
            call = gm.graph.call_function(_named(kernel, group), tuple(node.args))
        call.meta = dict(node.meta)
        call.meta["fxf_kernel_group"] = group
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
        delattr(gm, node.target)


def _apply_rules(gm: fx.GraphModule, table: KernelTable, choices: list[KernelChoice]) -> None:
    constant = constant_resolver(gm)
    for node in list(gm.graph.nodes):
        rule = table.rules.get(node.target) if node.op == "call_function" else None
        if rule is None:
            continue
        try:
            lowered = rule(node, constant)
        except Exception as exc:  # a kernel that fails to build: this op stays on ATen
            lowered = None
            reason = f"{type(exc).__name__}: {exc}"
            log.warning("fxforge[%s]: %s (%s) runs on ATen: %s", table.name, op_name(node.target),
                        node.name, reason)
            choices.append(KernelChoice(node.name, op_name(node.target), "ATen (fallback)", reason))
        if lowered is None:
            continue
        kernel, args, path, reason = lowered
        with gm.graph.inserting_before(node):
            call = gm.graph.call_function(_named(kernel, f"{table.name}_{node.name}"), tuple(args))
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
        choices.append(KernelChoice(node.name, op_name(node.target), path, reason))


def _is_kernel(node: fx.Node) -> bool:
    """A call of a kernel this lowering put in (not an ATen op), or a piece of its result."""
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:
        return _is_kernel(node.args[0])
    return not isinstance(node.target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket))


def _views_to_reshapes(gm: fx.GraphModule) -> None:
    """``view`` requires its input's strides to be the ones eager produced; a kernel may lay
    out its result differently (a fused group writes row-major; eager's pointwise ops follow
    their input's layout, so a difference travels on through ATen ops too). ``reshape`` is the
    same view when the strides allow it and a copy otherwise, so the graph stays correct
    whatever layout a kernel chose (the IR is functional: nothing observes whether a value
    aliases another). It costs ~3 us more per call than ``view``."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in (torch.ops.aten.view.default,
                                                          torch.ops.aten._unsafe_view.default):
            node.target = torch.ops.aten.reshape.default


def _collapse_reshapes(gm: fx.GraphModule) -> None:
    """``reshape(reshape(x, a), b)`` is ``reshape(x, b)``, and a reshape to its input's own
    shape is its input: model code and the projection fusion leave such chains around every
    attention and MLP (a decode step of a 30-layer model made ~500 reshape calls, ~3 us each).
    The values are the same (the graph is functional here); a result that is a graph output
    keeps its reshape, so no output newly aliases another value."""
    reshape = torch.ops.aten.reshape.default
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not reshape:
            continue
        source = node.args[0]
        while isinstance(source, fx.Node) and source.op == "call_function" and source.target is reshape:
            source = source.args[0]
        node.args = (source,) + tuple(node.args[1:])
        mine, theirs = node.meta.get(META_KEY), getattr(source, "meta", {}).get(META_KEY)
        if isinstance(mine, TensorMeta) and isinstance(theirs, TensorMeta) and \
                tuple(mine.shape) == tuple(theirs.shape) and \
                all(user.op != "output" for user in node.users):
            node.replace_all_uses_with(source)
            gm.graph.erase_node(node)


# Shape ops called as Tensor methods: the same ATen kernels, without OpOverload's Python call
# path (measured on a 2-core Zen 1, 2026-11: ``t.reshape(...)`` 2.8 us, ``torch.ops.aten.reshape.default(t, ...)``
# 9.5 us; a small model's graph makes dozens of these calls per forward). Their size lists are
# passed as separate arguments: ``t.reshape(16, 1)`` 2.6 us, ``t.reshape([16, 1])`` 4.1 us.
_AS_METHOD = {
    torch.ops.aten.reshape.default: "reshape", torch.ops.aten.permute.default: "permute",
    torch.ops.aten.unsqueeze.default: "unsqueeze", torch.ops.aten.expand.default: "expand",
    torch.ops.aten.t.default: "t", torch.ops.aten.transpose.int: "transpose",
    torch.ops.aten.squeeze.dim: "squeeze", torch.ops.aten.split_with_sizes.default: "split_with_sizes",
    torch.ops.aten.split.Tensor: "split", torch.ops.aten.select.int: "select",
    torch.ops.aten.unbind.int: "unbind", torch.ops.aten.contiguous.default: "contiguous",
}


_SIZES_AS_ARGS = {"reshape", "permute", "expand"}


def _shape_ops_as_methods(gm: fx.GraphModule) -> None:
    for node in gm.graph.nodes:
        method = _AS_METHOD.get(node.target) if node.op == "call_function" else None
        if method is not None and not node.kwargs:
            node.op, node.target = "call_method", method
            if method in _SIZES_AS_ARGS and len(node.args) == 2 and \
                    isinstance(node.args[1], (list, tuple)) and node.args[1]:
                node.args = (node.args[0], *node.args[1])


def _match_layout(value: torch.Tensor, stride: tuple) -> torch.Tensor:
    """``value`` with eager's strides: a graph output must look as eager made it (code after
    the graph may ``view`` it). Copies only when a kernel chose another layout."""
    if value.stride() == stride:
        return value
    out = torch.empty_strided(value.shape, stride, dtype=value.dtype, device=value.device)
    return out.copy_(value)


_match_layout.not_a_kernel = True  # a stride check; it copies only when a layout differs


def _fix_output_layouts(gm: fx.GraphModule) -> None:
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    def fix(arg):
        if not isinstance(arg, fx.Node) or not _is_kernel(arg):
            return arg
        val = arg.meta.get("val")
        if not isinstance(val, torch.Tensor) or not all(isinstance(s, int) for s in val.stride()):
            return arg
        with gm.graph.inserting_before(output):
            fixed = gm.graph.call_function(_match_layout, (arg, tuple(val.stride())))
        fixed.meta = dict(arg.meta)
        return fixed

    output.args = fx.node.map_aggregate(output.args, fix)


def lower_to_kernels(gm: fx.GraphModule, table: KernelTable) -> tuple[fx.GraphModule, list[KernelChoice]]:
    """A copy of ``gm`` rewritten into kernel calls, and the choices made."""
    gm = copy_module(gm)  # lowering never touches the IR it was given
    choices: list[KernelChoice] = []
    _collapse_groups(gm, table, choices)
    _apply_rules(gm, table, choices)
    _views_to_reshapes(gm)
    _collapse_reshapes(gm)
    _fix_output_layouts(gm)
    _shape_ops_as_methods(gm)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    drop_unused_tensors(gm)
    gm.recompile()
    return gm, choices


def kernel_count(gm: fx.GraphModule) -> int:
    """Kernels one call launches: calls that compute (views, getitem and size queries do not)."""
    count = 0
    for node in gm.graph.nodes:
        if node.op == "call_module":  # a partition: its own graph, or an opaque kernel
            module = gm.get_submodule(node.target)
            inner = getattr(module, "fn", module)
            count += kernel_count(inner) if isinstance(inner, fx.GraphModule) else 1
        elif node.op == "call_function":
            target = node.target
            if target is operator.getitem or is_view_op(target) or getattr(target, "not_a_kernel", False):
                continue
            if isinstance(target, fx.GraphModule):
                count += kernel_count(target)
            elif isinstance(target, torch._ops.OpOverload) and "sym_size" in target.name():
                continue
            elif getattr(target, "__module__", "") in ("_operator", "operator", "math"):
                continue
            else:
                count += 1
    return count
