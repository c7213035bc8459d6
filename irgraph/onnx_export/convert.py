"""The export driver: an optimized IRGraph -> an ONNX ModelProto.

Every call node goes through its converter (:mod:`.table`); ops with no converter and nodes a
converter refuses are gathered and raised as one :class:`OnnxExportError` naming them all.
Graph inputs keep the IR's placeholder names; dynamic sizes are named axes (the user's names
where given, else the IR's symbols); outputs are ``output_0``, ``output_1``, ... Nodes and
initializers nothing reads (a transposed weight Gemm reads untransposed, say) are dropped.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Optional, Sequence

import onnx
import sympy
import torch.fx as fx
from onnx import helper
from torch.utils import _pytree as pytree

from fxforge.errors import FxforgeError
from fxforge.irgraph.graph import IRGraph, op_name
from fxforge.irgraph.meta import META_KEY, TensorMeta
from fxforge.irgraph.onnx_export.builder import GraphBuilder, value_info
from fxforge.irgraph.onnx_export.context import QUANT_FORMATS, UNAVAILABLE, ExportContext, Unavailable
from fxforge.irgraph.onnx_export.dims import Dims, UnsupportedSizeError
from fxforge.irgraph.onnx_dtypes import UnsupportedDtypeError
from fxforge.irgraph.onnx_export.table import CONVERTERS, Unsupported

MIN_OPSET = 17          # LayerNormalization
DEFAULT_OPSET = 23      # the first with Attention (and RMSNormalization)
MAX_OPSET = onnx.defs.onnx_opset_version()


class OnnxExportError(FxforgeError, ValueError):
    """The graph cannot be exported: every op and node in the way is named."""


def export_graph(ir: IRGraph, *, opset: int = DEFAULT_OPSET, dim_names: Optional[dict] = None,
                 sizes: Optional[dict[str, int]] = None, quant_format: str = "auto",
                 graph_name: str = "fxforge") -> onnx.ModelProto:
    """``ir`` as an ONNX model at ``opset``. ``dim_names``: symbol name -> axis name;
    ``sizes``: symbol name -> a fixed size (a static export: inputs and outputs declare those
    sizes); ``quant_format``: ``"auto"`` (int8 formats as QDQ, int4 as MatMulNBits), ``"qdq"``
    (DequantizeLinear for all, opset >= 21) or ``"matmulnbits"`` (the same as auto)."""
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise OnnxExportError(f"opset {opset} is outside {MIN_OPSET}..{MAX_OPSET} (this onnx)")
    if quant_format not in QUANT_FORMATS:
        raise OnnxExportError(f"quant_format {quant_format!r}; one of {QUANT_FORMATS}")
    _check_ops_known(ir)
    builder = GraphBuilder(opset)
    placeholders = ir.placeholders()
    input_names = {p: builder.reserve(p.name) for p in placeholders}
    ctx = ExportContext(ir.gm, builder, Dims(builder, placeholders, input_names), quant_format)
    ctx.values.update(input_names)
    label = _labeller(dim_names or {}, sizes or {})
    inputs = [value_info(input_names[p], _tensor_meta(p).dtype, [label(d) for d in _tensor_meta(p).shape])
              for p in placeholders]
    _convert_nodes(ir, ctx)
    outputs = _outputs(ir, ctx, label)
    _drop_unread(builder, [o.name for o in outputs])
    graph = helper.make_graph(builder.nodes, graph_name, inputs, outputs,
                              list(builder.initializers.values()))
    opsets = [helper.make_opsetid(domain, version) for domain, version in builder.domains.items()]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="fxforge")
    model.ir_version = helper.find_min_ir_version_for(opsets, ignore_unknown=True)
    return model


def _check_ops_known(ir: IRGraph) -> None:
    missing = Counter(op_name(n.target) for n in ir.call_nodes() if n.target not in CONVERTERS)
    if missing:
        listed = ", ".join(f"{name} (x{count})" for name, count in sorted(missing.items()))
        raise OnnxExportError(f"no ONNX export for {len(missing)} op(s) of this graph: {listed}")


def _tensor_meta(node: fx.Node) -> TensorMeta:
    meta = node.meta.get(META_KEY)
    if not isinstance(meta, TensorMeta):
        raise OnnxExportError(f"graph input/output {node.name} is not a tensor")
    return meta


def _labeller(dim_names: dict[str, str], sizes: dict[str, int]):
    """A size as ONNX declares it: an int, or an axis name (an expression of named axes)."""
    def label(dim: Any) -> Any:
        if isinstance(dim, int) or getattr(dim, "is_Integer", False):
            return int(dim)
        free = dim.free_symbols   # the IR's own symbols (with their assumptions) to substitute
        if free and all(s.name in sizes for s in free):
            return int(dim.subs({s: sizes[s.name] for s in free}))
        return str(dim.subs({s: sympy.Symbol(dim_names[s.name]) for s in free if s.name in dim_names}))
    return label


def _convert_nodes(ir: IRGraph, ctx: ExportContext) -> None:
    problems: list[str] = []
    for node in ir.call_nodes():
        try:
            ctx.values[node] = CONVERTERS[node.target](ctx, node)
        except Unavailable:
            ctx.values[node] = UNAVAILABLE
        except (Unsupported, UnsupportedSizeError, UnsupportedDtypeError) as exc:
            ctx.values[node] = UNAVAILABLE
            problems.append(f"{node.name} ({op_name(node.target)}): {exc}")
    if problems:
        raise OnnxExportError(f"{len(problems)} node(s) cannot be exported:\n  "
                              + "\n  ".join(problems))


def _outputs(ir: IRGraph, ctx: ExportContext, label) -> list:
    """``output_i`` for each tensor the graph returns (an Identity: an output may be an input
    or a weight, and ONNX output names are the graph's own)."""
    infos = []
    for i, node in enumerate(pytree.tree_leaves(ir.output_node().args[0])):
        meta = _tensor_meta(node)
        name = ctx.builder.reserve(f"output_{i}")
        ctx.builder.nodes.append(helper.make_node("Identity", [ctx.tensor(node)], [name]))
        infos.append(value_info(name, meta.dtype, [label(d) for d in meta.shape]))
    return infos


def _drop_unread(builder: GraphBuilder, outputs: Sequence[str]) -> None:
    """Keep the nodes the outputs depend on (converters may emit a value no one reads)."""
    needed = set(outputs)
    kept = []
    for node in reversed(builder.nodes):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
    builder.nodes[:] = kept[::-1]
    for name in [n for n in builder.initializers if n not in needed]:
        del builder.initializers[name]
