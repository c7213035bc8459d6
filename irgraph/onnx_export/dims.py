"""Symbolic sizes as ONNX values: the IR's sympy expressions over its input sizes.

A dynamic dimension of the IR is a sympy expression over the symbols of its inputs' shapes
(``s70``, ``2*s70``, ``s70 + 1``). Each symbol is read once from the input it came from
(``Shape`` with start/end), and an expression is built from those with int64 arithmetic, so
``view(x, [2*s, 64])`` exports as a ``Reshape`` that is right at every sequence length.
"""
from __future__ import annotations

from typing import Sequence, Union

import sympy
import torch
import torch.fx as fx

from fxforge.irgraph.meta import META_KEY, SymMeta, TensorMeta
from fxforge.irgraph.onnx_export.builder import GraphBuilder

Dim = Union[int, sympy.Expr]


class UnsupportedSizeError(ValueError):
    """A size expression with no ONNX spelling here (a symbol no input's shape holds, an
    operation other than + * // % max min)."""


class Dims:
    """Symbols -> where they are read; sympy expressions -> int64 ``[1]`` tensors (cached)."""

    def __init__(self, builder: GraphBuilder, placeholders: Sequence[fx.Node],
                 input_names: dict[fx.Node, str]):
        self.builder = builder
        self.sources: dict[str, tuple[str, int]] = {}
        for node in placeholders:
            meta = node.meta.get(META_KEY)
            for axis, dim in enumerate(meta.shape if isinstance(meta, TensorMeta) else ()):
                if isinstance(dim, sympy.Symbol) and dim.name not in self.sources:
                    self.sources[dim.name] = (input_names[node], axis)
        self._cache: dict[Dim, str] = {}

    def value(self, dim: Dim) -> str:
        """The size as an int64 ``[1]`` tensor."""
        dim = int(dim) if isinstance(dim, int) or getattr(dim, "is_Integer", False) else dim
        if isinstance(dim, int):
            return self.builder.ints([dim])
        if dim not in self._cache:
            self._cache[dim] = self._emit(dim)
        return self._cache[dim]

    def scalar(self, dim: Dim) -> str:
        """The size as a 0-D int64 tensor."""
        if isinstance(dim, int) or getattr(dim, "is_Integer", False):
            return self.builder.const(int(dim), torch.int64)
        return self.builder.scalar_of(self.value(dim))

    def shape(self, dims: Sequence[Dim], infer_one: bool = False) -> str:
        """An int64 shape tensor. ``infer_one`` (Reshape): a single non-constant size becomes
        -1, which Reshape infers from the element count, so no size arithmetic is emitted."""
        dims = [int(d) if getattr(d, "is_Integer", False) else d for d in dims]
        symbolic = [i for i, d in enumerate(dims) if not isinstance(d, int)]
        if infer_one and len(symbolic) == 1 and -1 not in dims:
            dims = [-1 if i == symbolic[0] else d for i, d in enumerate(dims)]
            symbolic = []
        if not symbolic:
            return self.builder.ints(dims)
        pieces, run = [], []
        for d in dims:   # runs of constant sizes become one constant each
            if isinstance(d, int):
                run.append(d)
                continue
            if run:
                pieces.append(self.builder.ints(run))
                run = []
            pieces.append(self.value(d))
        if run:
            pieces.append(self.builder.ints(run))
        return self.builder.op("Concat", pieces, axis=0, hint="shape")

    def argument(self, arg) -> Dim:
        """A size argument of an op (an int, or a node holding a symbolic int) as a Dim."""
        if isinstance(arg, fx.Node):
            meta = arg.meta.get(META_KEY)
            if not isinstance(meta, SymMeta):
                raise UnsupportedSizeError(f"{arg.name} is not a size")
            return meta.expr
        return int(arg)

    def _emit(self, expr: sympy.Expr) -> str:
        op = self.builder.op
        if isinstance(expr, sympy.Symbol):
            if expr.name not in self.sources:
                raise UnsupportedSizeError(f"size {expr} is not the size of any input")
            name, axis = self.sources[expr.name]
            return op("Shape", [name], start=axis, end=axis + 1, hint=expr.name)
        if isinstance(expr, sympy.Rational) and not expr.is_Integer:
            raise UnsupportedSizeError(f"size {expr} is not an integer")
        if isinstance(expr, (sympy.Add, sympy.Mul, sympy.Max, sympy.Min)):
            onnx_op = {sympy.Add: "Add", sympy.Mul: "Mul", sympy.Max: "Max", sympy.Min: "Min"}
            return self._fold(onnx_op[type(expr)], expr.args)
        if isinstance(expr, sympy.Pow) and expr.exp.is_Integer and int(expr.exp) > 0:
            return self._fold("Mul", [expr.base] * int(expr.exp))
        name = type(expr).__name__
        if name in ("FloorDiv", "CleanDiv", "IntTrueDiv") or name == "Mod":
            # sizes are non-negative, where ONNX's truncating Div is floor division
            return op("Div" if name != "Mod" else "Mod", [self.value(a) for a in expr.args])
        raise UnsupportedSizeError(f"size expression {expr} ({name})")

    def _fold(self, op_type: str, args) -> str:
        out = self.value(args[0])
        for arg in args[1:]:
            out = self.builder.op(op_type, [out, self.value(arg)])
        return out
