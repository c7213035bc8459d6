"""What a converter sees: the IR node's inputs as ONNX values, metadata, constant values."""
from __future__ import annotations

from typing import Any, Optional

import sympy
import torch
import torch.fx as fx

from fxforge.irgraph.meta import META_KEY, SymMeta, TensorMeta
from fxforge.irgraph.onnx_export.builder import GraphBuilder
from fxforge.irgraph.onnx_export.dims import Dims
from fxforge.irgraph.onnx_export.table import Unsupported
from fxforge.irgraph.query import evaluate_on_constants
from fxforge.irgraph.views import Permute, T

QUANT_FORMATS = ("auto", "qdq", "matmulnbits")


class Unavailable(Exception):
    """An input of this node failed to convert (already reported): skip the node quietly."""


UNAVAILABLE = object()   # the value of a node whose conversion failed


class ExportContext:
    """One export's state: the builder, the sizes, the ONNX value of every converted node."""

    def __init__(self, gm: fx.GraphModule, builder: GraphBuilder, dims: Dims,
                 quant_format: str = "auto"):
        self.gm, self.builder, self.dims = gm, builder, dims
        self.quant_format = quant_format
        self.values: dict[fx.Node, Any] = {}
        self._constants: dict[fx.Node, Optional[torch.Tensor]] = {}

    @property
    def opset(self) -> int:
        return self.builder.opset

    def meta(self, node: Any) -> TensorMeta:
        """The node's tensor metadata (the first tensor's, for a multi-output op)."""
        meta = node.meta.get(META_KEY) if isinstance(node, fx.Node) else None
        if isinstance(meta, tuple):
            meta = next((m for m in meta if isinstance(m, TensorMeta)), None)
        if not isinstance(meta, TensorMeta):
            raise Unsupported(f"{getattr(node, 'name', node)!s} has no tensor metadata")
        return meta

    def dtype(self, arg: Any) -> Optional[torch.dtype]:
        """A tensor argument's dtype; None for a Python scalar or a size."""
        if isinstance(arg, fx.Node) and isinstance(arg.meta.get(META_KEY), TensorMeta):
            return arg.meta[META_KEY].dtype
        return None

    def tensor(self, arg: Any, dtype: Optional[torch.dtype] = None) -> str:
        """The ONNX value of a tensor argument, cast to ``dtype`` when given; a Python number or
        a symbolic int becomes a 0-D constant or size of ``dtype``."""
        if isinstance(arg, fx.Node):
            if arg.op == "get_attr":
                name = self.builder.initializer(str(arg.target), getattr(self.gm, arg.target))
            elif isinstance(arg.meta.get(META_KEY), SymMeta):
                name = self.dims.scalar(self.values.get(arg, arg.meta[META_KEY].expr))
                return self.builder.cast(name, torch.int64, dtype or torch.int64)
            else:
                name = self.values.get(arg, UNAVAILABLE)
                if name is UNAVAILABLE:
                    raise Unavailable(arg.name)
                if not isinstance(name, str):
                    raise Unsupported(f"{arg.name} is not a single tensor")
            source = self.dtype(arg)
            return self.builder.cast(name, source, dtype) if dtype and source else name
        if isinstance(arg, (bool, int, float)):
            if dtype is None:
                raise Unsupported(f"a scalar {arg!r} with no dtype to give it")
            return self.builder.const(arg, dtype)
        if isinstance(arg, sympy.Expr):
            return self.builder.cast(self.dims.scalar(arg), torch.int64, dtype or torch.int64)
        raise Unsupported(f"argument {arg!r} is not a tensor")

    def optional(self, arg: Any, dtype: Optional[torch.dtype] = None) -> Optional[str]:
        return None if arg is None else self.tensor(arg, dtype)

    def constant(self, arg: Any) -> Optional[torch.Tensor]:
        """The value of a node computed from constants alone (a weight, a transposed view of
        one), evaluated with torch; None when it depends on an input."""
        if not isinstance(arg, fx.Node):
            return None
        if arg not in self._constants:
            self._constants[arg] = evaluate_on_constants(arg, self.gm, self.constant)
        return self._constants[arg]

    def weight_source(self, arg: Any) -> tuple[Any, bool]:
        """Where a ``[K, N]`` weight comes from: ``(W, True)`` when it is the transpose of a
        constant ``W [N, K]`` (``nn.Linear``'s, read by Gemm's ``transB`` without a copy, and
        one initializer with an embedding tied to it), else ``(arg, False)``."""
        view = Permute.of(arg) or T.of(arg)
        if view is not None and (isinstance(view, T) or list(view.dims) == [1, 0]) and \
                isinstance(view.input, fx.Node) and view.input.op == "get_attr":
            return view.input, True
        return arg, False
