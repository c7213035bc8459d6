"""A readable listing of the IR: one line a node, with dtype[shape] for each value."""
from __future__ import annotations

import torch.fx as fx

from fxforge.irgraph.graph import IRGraph, op_name
from fxforge.irgraph.meta import META_KEY, SymMeta, TensorMeta


def describe_meta(meta) -> str:
    if isinstance(meta, (TensorMeta, SymMeta)):
        return meta.describe()
    if isinstance(meta, tuple):
        return "(" + ", ".join(describe_meta(m) for m in meta) + ")"
    return "-"


def _arg(value) -> str:
    if isinstance(value, fx.Node):
        return "%" + value.name
    if isinstance(value, (list, tuple)):
        inner = ", ".join(_arg(v) for v in value)
        return f"[{inner}]" if isinstance(value, list) else f"({inner})"
    return repr(value)


def format_ir(ir: IRGraph, max_nodes: int | None = None) -> str:
    lines = []
    for i, node in enumerate(ir.gm.graph.nodes):
        if max_nodes is not None and i >= max_nodes:
            lines.append(f"  ... {len(ir.gm.graph.nodes) - max_nodes} more nodes")
            break
        meta = describe_meta(node.meta.get(META_KEY))
        if node.op == "placeholder":
            lines.append(f"  input  %{node.name}: {meta}")
        elif node.op == "get_attr":
            lines.append(f"  const  %{node.name}: {meta} = {node.target}")
        elif node.op == "output":
            lines.append(f"  return {_arg(node.args[0])}")
        else:
            args = ", ".join([_arg(a) for a in node.args] +
                             [f"{k}={_arg(v)}" for k, v in node.kwargs.items()])
            lines.append(f"  %{node.name}: {meta} = {op_name(node.target)}({args})")
    return "\n".join(lines)
