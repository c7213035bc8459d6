"""Export of fxforge's optimized IR to ONNX (``fxforge.export_onnx`` is the public entry).

``export_graph(ir, opset=..., ...)`` walks the IR once; each op's converter (:mod:`.table`,
filled by the modules imported here) emits ONNX nodes through a small builder
(:mod:`.builder`); symbolic sizes become int64 arithmetic on the inputs' shapes (:mod:`.dims`).
Fused attention is ONNX's ``Attention`` from opset 23, else its decomposition
(:mod:`.attention`); quantized linears keep their integer codes (:mod:`.quantized`).
"""
from fxforge.irgraph.onnx_export import attention, elementwise, layout, linear, nn  # noqa: F401
from fxforge.irgraph.onnx_export.convert import (DEFAULT_OPSET, MAX_OPSET, MIN_OPSET,
                                                 OnnxExportError, export_graph)
from fxforge.irgraph.onnx_export.table import CONVERTERS

__all__ = ["CONVERTERS", "DEFAULT_OPSET", "MAX_OPSET", "MIN_OPSET", "OnnxExportError",
           "export_graph"]
