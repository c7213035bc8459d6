"""Lossless clean-up passes: dead code, common subexpressions, no-op views/clones/casts."""
from __future__ import annotations

import operator
from collections import Counter
from typing import Any

import torch
import torch.fx as fx

from fxforge.irgraph import POINTWISE, IRGraph, meta_of
from fxforge.irgraph.query import aliases_graph_input, is_pure, is_view_op
from fxforge.passes.base import PassResult, register_pass
from fxforge.irgraph.pattern import Pat, PatternMatcher, graph_rewrite

aten = torch.ops.aten


@register_pass("dce")
def dead_code_elimination(ir: IRGraph) -> PassResult:
    """Remove nodes whose results are unused, and constants nothing reads any more."""
    before = len(ir.gm.graph.nodes)
    ir.gm.graph.eliminate_dead_code(
        is_impure_node=lambda n: n.op == "placeholder" or not (n.op == "get_attr" or is_pure(n)))
    removed = before - len(ir.gm.graph.nodes)
    used = {n.target for n in ir.gm.graph.nodes if n.op == "get_attr"}
    dropped = [name for name, _ in ir.gm.named_buffers() if name not in used]
    for name in dropped:
        delattr(ir.gm, name)
    return PassResult(ir, {"nodes_removed": removed, "constants_removed": len(dropped)})


def _key(value: Any) -> Any:
    if isinstance(value, fx.Node):
        return ("node", id(value))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_key(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((k, _key(v)) for k, v in value.items())))
    if isinstance(value, float):
        return ("float", repr(value))  # 0.0 and -0.0 differ; nan equals nan here
    return (type(value).__name__, value)


def _both_outputs(a: fx.Node, b: fx.Node) -> bool:
    return any(u.op == "output" for u in a.users) and any(u.op == "output" for u in b.users)


@register_pass("cse")
def common_subexpression_elimination(ir: IRGraph) -> PassResult:
    """Merge pure calls with the same op and the same arguments."""
    seen: dict[Any, fx.Node] = {}
    merged = 0
    for node in list(ir.gm.graph.nodes):
        if not is_pure(node):
            continue
        key = (node.target, _key(node.args), _key(node.kwargs))
        if key in seen and _both_outputs(node, seen[key]):
            continue  # merging would make two outputs one tensor; eager returns two
        if key in seen:
            node.replace_all_uses_with(seen[key])
            ir.gm.graph.erase_node(node)
            merged += 1
        else:
            seen[key] = node
    return PassResult(ir, {"merged": merged})


_IDENTITY_WHEN_SAME_LAYOUT = [
    aten.clone.default, aten.alias.default, aten._to_copy.default, aten.view.default,
    aten.reshape.default, aten._unsafe_view.default, aten.expand.default, aten.permute.default,
    aten.slice.Tensor, aten.squeeze.dim, aten.squeeze.dims, aten.contiguous.default,
    aten.as_strided.default, aten.type_as.default, aten.view_as.default,
    aten.lift_fresh_copy.default,
]


def _reaches_output(node: fx.Node, besides: fx.Node | None = None) -> bool:
    """Is ``node``, or a view of it, a graph output (so its memory is handed to the caller)?
    Paths through ``besides`` do not count."""
    stack, seen = [node], set()
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        for user in current.users:
            if user is besides:
                continue
            if user.op == "output":
                return True
            if user.target is operator.getitem or is_view_op(user.target):  # shares our memory
                stack.append(user)
    return False


def same_value_layout(a: fx.Node, b: fx.Node) -> bool:
    """True when two nodes hold tensors of equal shape, strides, dtype, device and offset."""
    va, vb = a.meta.get("val"), b.meta.get("val")
    if not (isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor)):
        return False
    if meta_of(va) != meta_of(vb) or va.layout != torch.strided or vb.layout != torch.strided:
        return False
    return va.storage_offset() == vb.storage_offset()


def identity(m) -> fx.Node | None:
    """An op whose result has its input's exact shape, strides, dtype and offset is a no-op.

    Declined when the result (or a view of it) is a graph output and its source is an input,
    a constant or another output: the output would then alias it (a new aliasing the IR
    forbids).
    """
    if not same_value_layout(m.copy, m.source):
        return None
    if _reaches_output(m.copy) and (aliases_graph_input(m.source) or _reaches_output(m.source, m.copy)):
        return None
    return m.source


NOOP_RULES = PatternMatcher([
    (Pat(_IDENTITY_WHEN_SAME_LAYOUT, (Pat.var("source"),), name="copy"), identity),
])


@register_pass("remove_noops")
def remove_noops(ir: IRGraph) -> PassResult:
    """Drop views, clones and casts that do not change shape, strides, dtype or device."""
    counts: Counter = graph_rewrite(ir, NOOP_RULES)
    return PassResult(ir, dict(counts))


def _computes_below_fp64(user: fx.Node, scalar: fx.Node) -> bool:
    """``user`` is a pointwise op whose result is not float64 and that reads ``scalar`` next to a
    tensor of rank >= 1: ATen's type promotion then casts the 0-d operand to the op's compute
    dtype before computing, so casting it once beforehand gives the same bits."""
    result = user.meta.get("val")
    if user.target not in POINTWISE or not isinstance(result, torch.Tensor) \
            or result.dtype == torch.float64:
        return False
    return any(isinstance(a, fx.Node) and a is not scalar and isinstance(a.meta.get("val"), torch.Tensor)
               and a.meta["val"].dim() >= 1 for a in user.args)


@register_pass("narrow_scalar_inputs")
def narrow_scalar_inputs(ir: IRGraph) -> PassResult:
    """0-d float64 graph inputs read by fp32 pointwise ops become fp32 once, at the top.

    After a model with another value of a float attribute (an RMSNorm's eps), dynamo passes that
    float as a 0-d float64 tensor input at every call; the fused kernels hold no float64, so a
    norm that reads it directly ran op by op. (Hugging Face's norms convert it first, with
    ``prims.convert_element_type``, which capture turns into ``_to_copy``.) Every such use is an
    op that computes in its fp32 result dtype anyway (:func:`_computes_below_fp64`); other uses
    keep the float64 input. Lossless."""
    counts: Counter = Counter()
    graph = ir.gm.graph
    for node in ir.placeholders():
        val = node.meta.get("val")
        if not (isinstance(val, torch.Tensor) and val.dim() == 0 and val.dtype == torch.float64):
            continue
        users = [u for u in node.users if _computes_below_fp64(u, node)]
        if not users:
            continue
        with graph.inserting_after(ir.placeholders()[-1]):
            narrow = graph.call_function(torch.ops.aten._to_copy.default, (node,),
                                         {"dtype": torch.float32})
        ir.infer(narrow)
        for user in users:
            user.replace_input_with(node, narrow)
        counts["inputs"] += 1
        counts["uses"] += len(users)
    return PassResult(ir, {"inputs": counts["inputs"], "uses": counts["uses"]})
