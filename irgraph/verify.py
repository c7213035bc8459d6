"""The IR verifier: well-formed, topologically ordered, functional, metadata consistent.

The pass manager runs it between passes when ``FXFORGE_VERIFY=1`` (always on in tests).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from fxforge.irgraph.graph import IRGraph, op_name
from fxforge.irgraph.meta import META_KEY, TensorMeta, meta_of


class IRVerificationError(AssertionError):
    """The IR broke one of its invariants (see ``fxforge.irgraph.graph``)."""


def verify(ir: IRGraph, allow_mutation: bool = False) -> None:
    problems = list(_problems(ir, allow_mutation or ir.info.get("allow_mutation", False)))
    if problems:
        shown = "\n  ".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise IRVerificationError(f"IR verification failed ({len(problems)} problems):\n  {shown}{more}")


def _problems(ir: IRGraph, allow_mutation: bool):
    graph = ir.gm.graph
    try:
        graph.lint()
    except Exception as exc:  # fx raises RuntimeError with the offending node named
        yield f"graph lint: {exc}"
        return
    nodes = list(graph.nodes)
    if not nodes or nodes[-1].op != "output":
        yield "the last node is not the output"
    seen_call = False
    for node in nodes:
        if node.op == "placeholder" and seen_call:
            yield f"placeholder {node.name} comes after a call node"
        if node.op == "call_function":
            seen_call = True
        if node.op == "call_module":
            yield f"{node.name}: call_module nodes are not part of the IR"
        if node.op in ("placeholder", "get_attr", "call_function"):
            yield from _check_meta(node)
        if node.op == "get_attr":
            yield from _check_constant(ir, node)
        if node.op == "call_function" and not allow_mutation:
            target = node.target
            if isinstance(target, torch._ops.OpOverload) and target._schema.is_mutable:
                yield f"{node.name}: mutating op {op_name(target)} in a functional graph"


def _returns_nothing(node: fx.Node) -> bool:
    target = node.target
    return isinstance(target, torch._ops.OpOverload) and not target._schema.returns


def _check_meta(node: fx.Node):
    if node.op == "call_function" and _returns_nothing(node):
        return
    if "val" not in node.meta:
        yield f"{node.name}: no meta['val']"
        return
    typed = node.meta.get(META_KEY, "missing")
    if typed == "missing":
        yield f"{node.name}: no typed metadata meta['{META_KEY}']"
    elif typed != meta_of(node.meta["val"]):
        yield f"{node.name}: typed metadata {typed} disagrees with its value {meta_of(node.meta['val'])}"


def _check_constant(ir: IRGraph, node: fx.Node):
    if not hasattr(ir.gm, node.target):
        yield f"{node.name}: constant {node.target} is missing from the module"
        return
    value = getattr(ir.gm, node.target)
    meta = node.meta.get(META_KEY)
    if isinstance(value, torch.Tensor) and isinstance(meta, TensorMeta):
        if tuple(value.shape) != meta.shape or value.dtype != meta.dtype:
            yield (f"{node.name}: constant is {value.dtype}{list(value.shape)} but its metadata "
                   f"says {meta.describe()}")
