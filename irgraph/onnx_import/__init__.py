"""ONNX import: an ONNX model as an ``nn.Module`` of ATen ops (:class:`OnnxModule`), which
fxforge's captures trace into its IR.

``table.py`` holds the converter table keyed by (domain, op, opset range); ``ops_*.py`` fill it;
``model.py`` reads and checks a model as data; ``program.py`` folds and flattens it.
"""
from __future__ import annotations

from fxforge.irgraph.onnx_import import (ops_attention, ops_binary, ops_misc, ops_ms,  # noqa: F401
                                         ops_nn, ops_norm, ops_quant, ops_reduce, ops_resize,
                                         ops_shape, ops_tensor, ops_unary)
from fxforge.irgraph.onnx_import.model import OnnxImportError, read_model
from fxforge.irgraph.onnx_import.module import OnnxModule
from fxforge.irgraph.onnx_import.program import InputSpec, Program, build_program
from fxforge.irgraph.onnx_import.table import TABLE, coverage, lookup

__all__ = ["InputSpec", "OnnxImportError", "OnnxModule", "Program", "TABLE", "build_program",
           "coverage", "import_model", "lookup", "read_model"]


def import_model(source, quantized_weights: str = "exact") -> OnnxModule:
    """An ONNX model (path, bytes or ModelProto) as an eager :class:`OnnxModule`."""
    model = read_model(source)
    name = model.graph.name or "onnx"
    return OnnxModule(build_program(model, quantized_weights), name=name).eval()
