"""``fxforge.export_onnx``: fxforge's optimized graph as an ONNX model.

What is exported is the IR after fxforge's passes (fused, folded, quantized), the graph an
artifact stores, not the model's own ops: fused attention is ONNX's ``Attention`` (opset >= 23)
or its decomposition, quantized linears keep their integer codes (QDQ ``DequantizeLinear`` or
``com.microsoft.MatMulNBits``), dynamic sizes are named axes. The translation lives in
:mod:`fxforge.irgraph.onnx_export`; this module finds the graph (an artifact, a model, a
``fxforge.compile`` result), checks the model (``onnx.checker`` full check, strict shape
inference) and writes it, with weights over ~2 GB as external data beside the file.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import onnx
import sympy
import torch
from torch.utils import _pytree as pytree

from fxforge.irgraph import TensorMeta, capture_export
from fxforge.irgraph.onnx_export import DEFAULT_OPSET, OnnxExportError, export_graph

log = logging.getLogger("fxforge.onnx")
EXTERNAL_DATA_BYTES = 1800 * 2**20   # a ModelProto must serialize under 2 GiB: leave headroom
__all__ = ["DEFAULT_OPSET", "OnnxExportError", "export_onnx"]


def export_onnx(obj: Any, path: str | os.PathLike, *, example_inputs: Optional[Sequence] = None,
                dynamic: bool = True, dynamic_shapes: Any = None, opset: int = DEFAULT_OPSET,
                quant_format: str = "auto", **options: Any) -> onnx.ModelProto:
    """Write the optimized graph of ``obj`` to ``path`` as ONNX at ``opset``; return the model.

    ``obj``: an ``fxforge.Artifact`` or an artifact directory; an ``nn.Module`` (captured like
    ``aot_compile``: torch.export with ``dynamic_shapes``, then fxforge's passes for
    ``**options``); or a ``fxforge.compile`` result (its model and options). A model needs
    ``example_inputs``. ``dynamic``: named axes for the dynamic sizes (a model given no
    ``dynamic_shapes`` gets ``Dim.AUTO`` on every size); ``dynamic=False`` fixes every size to
    the example inputs'. ``quant_format``: ``"auto"`` (int8 formats as QDQ, int4 as
    MatMulNBits), ``"qdq"`` (DequantizeLinear throughout; opset >= 21) or ``"matmulnbits"``.
    Raises OnnxExportError naming every op and node that cannot be exported."""
    started = time.perf_counter()
    ir, dim_names, example = _optimized_graph(obj, example_inputs, dynamic, dynamic_shapes,
                                              options)
    sizes = None if dynamic else _fixed_sizes(ir, example)
    model = export_graph(ir, opset=opset, dim_names=dim_names, sizes=sizes,
                         quant_format=quant_format, graph_name=_graph_name(obj))
    model.doc_string = "fxforge optimized graph"
    checked = _check_and_write(model, Path(path))
    log.info("fxforge: exported %s to %s (opset %d, %d nodes) in %.1f s", type(obj).__name__,
             path, opset, len(model.graph.node), time.perf_counter() - started)
    return checked


def _optimized_graph(obj: Any, example_inputs, dynamic: bool, dynamic_shapes: Any,
                     options: dict) -> tuple[Any, dict[str, str], Optional[tuple]]:
    """(the optimized IR, symbol -> axis name, the example inputs if any)."""
    from fxforge.aot import Artifact
    from fxforge.api import CompiledModule
    example = tuple(example_inputs) if example_inputs is not None else None
    if isinstance(obj, (Artifact, str, os.PathLike)):
        if options or dynamic_shapes is not None:
            raise OnnxExportError("an artifact is exported as it was compiled: compile options "
                                  "and dynamic_shapes apply to models only")
        ir, names = _artifact_graph(obj.path if isinstance(obj, Artifact) else Path(obj))
        return ir, names, example
    if isinstance(obj, CompiledModule):
        options = {**obj.options.to_dict(), **options}
        obj = obj.model
    if not isinstance(obj, torch.nn.Module):
        raise TypeError(f"export_onnx takes an artifact, an artifact directory, an nn.Module or "
                        f"a fxforge.compile result, not {type(obj).__name__}")
    if example is None:
        raise OnnxExportError("exporting a model needs example_inputs (it is captured with "
                              "torch.export, as aot_compile does)")
    if dynamic and dynamic_shapes is None:
        dynamic_shapes = pytree.tree_map_only(
            torch.Tensor, lambda t: {i: torch.export.Dim.AUTO for i in range(t.dim())}, example)
    ir = _model_graph(obj, example, dynamic_shapes if dynamic else None, options)
    from fxforge.aot import user_dim_names
    names = user_dim_names([p.meta.get("fxf") for p in ir.placeholders()], dynamic_shapes)
    return ir, names, example


def _model_graph(model: torch.nn.Module, example: tuple, dynamic_shapes: Any, options: dict):
    """Capture and optimize as ``aot_compile`` does (its ``passes`` stage)."""
    from fxforge.options import parse_options
    from fxforge.orchestrate import compile_graph
    opts = parse_options(options)
    with torch.no_grad():
        ir = capture_export(model.eval(), example, dynamic_shapes=dynamic_shapes)
        flat = pytree.tree_flatten((example, {}))[0]
        return compile_graph(ir, opts, stages=("passes",), calibration=flat).ir


def _artifact_graph(root: Path) -> tuple[Any, dict[str, str]]:
    """An artifact's stored graph (read and checked, not lowered) and its axis names: the
    names its manifest gives the inputs' sizes."""
    from fxforge.aot import read_artifact
    stored = read_artifact(root)
    names: dict[str, str] = {}
    for placeholder, entry in zip(stored.ir.placeholders(), stored.signature):
        meta = placeholder.meta.get("fxf")
        for dim, named in zip(meta.shape if isinstance(meta, TensorMeta) else (), entry.shape):
            if isinstance(dim, sympy.Symbol) and isinstance(named, sympy.Symbol):
                names.setdefault(dim.name, named.name)
    return stored.ir, names


def _fixed_sizes(ir, example: Optional[tuple]) -> dict[str, int]:
    """Symbol -> the example inputs' size (a static export of a graph with symbols)."""
    placeholders = ir.placeholders()
    symbolic = any(not p.meta["fxf"].is_static for p in placeholders)
    if not symbolic:
        return {}
    if example is None:
        raise OnnxExportError("dynamic=False on a graph with dynamic sizes needs example_inputs "
                              "to fix them")
    tensors = [t for t in pytree.tree_leaves(example) if isinstance(t, torch.Tensor)]
    sizes: dict[str, int] = {}
    for placeholder, tensor in zip(placeholders, tensors):
        for dim, size in zip(placeholder.meta["fxf"].shape, tensor.shape):
            if isinstance(dim, sympy.Symbol):
                sizes[dim.name] = int(size)
    return sizes


def _graph_name(obj: Any) -> str:
    model = getattr(obj, "model", obj)
    return type(model).__name__ if isinstance(model, torch.nn.Module) else "fxforge"


def _check_and_write(model: onnx.ModelProto, path: Path) -> onnx.ModelProto:
    """The full checker and strict shape inference, then the file (weights over
    EXTERNAL_DATA_BYTES to ``<name>.data`` beside it, checked from disk, as the checker can
    only read a model that large there)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    weight_bytes = sum(len(t.raw_data) for t in model.graph.initializer)
    try:
        if weight_bytes <= EXTERNAL_DATA_BYTES:
            onnx.checker.check_model(model, full_check=True)
            onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
            onnx.save_model(model, str(path))
            return model
        return _write_external(model, path)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise OnnxExportError(f"the exported model fails ONNX's checks: {exc}") from exc


def _write_external(model: onnx.ModelProto, path: Path) -> onnx.ModelProto:
    location = path.name + ".data"
    staged = path.with_name(path.name + ".tmp")
    onnx.save_model(model, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=1024)
    try:
        onnx.checker.check_model(str(staged), full_check=True)
        inferred = staged.with_name(staged.name + ".inferred")
        onnx.shape_inference.infer_shapes_path(str(staged), str(inferred), check_type=True,
                                               strict_mode=True)
        inferred.unlink(missing_ok=True)
        os.replace(staged, path)
    except Exception:
        (path.parent / location).unlink(missing_ok=True)   # no weights without their model
        raise
    finally:
        staged.unlink(missing_ok=True)
    return model
