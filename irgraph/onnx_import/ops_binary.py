"""Broadcasting binary ops, comparisons, ``Where`` and the matrix products.

The arithmetic ones take :class:`Dims` (``dims=True``): on shapes and known constants they
compute in Python (sizes stay SymInts), on tensors they are the torch ops with ONNX's rules
(integer ``Div`` truncates, ``Mod`` follows ``fmod``)."""
from __future__ import annotations

import operator
from typing import Any, Callable, Optional

import torch

from fxforge.irgraph.onnx_import.ops_shape import known_list, rank_of
from fxforge.irgraph.onnx_import.table import Dims, NodeView, as_tensor, converter


def _int_div(a, b):
    if isinstance(a, int) and isinstance(b, int):
        q = abs(a) // abs(b)
        return q if (a >= 0) == (b >= 0) else -q
    return a // b       # SymInts: sizes, never negative


def _tensor_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.dtype.is_floating_point or b.dtype.is_floating_point:
        return a / b
    return torch.div(a, b, rounding_mode="trunc")


# op -> (Python function on sizes, torch function on tensors)
ARITHMETIC: dict[str, tuple[Callable, Callable]] = {
    "Add": (operator.add, torch.add),
    "Sub": (operator.sub, torch.sub),
    "Mul": (operator.mul, torch.mul),
    "Div": (_int_div, _tensor_div),
}


def _on_dims(node: NodeView, a: Any, b: Any, fn: Callable, dtype: torch.dtype = torch.int64):
    """The op in Python when both operands are shapes/known constants of rank <= 1."""
    left, right = known_list(node, 0, a), known_list(node, 1, b)
    if left is None or right is None or rank_of(a) > 1 or rank_of(b) > 1:
        return None
    if not (isinstance(a, Dims) or isinstance(b, Dims)):
        return None     # two constants fold at import; keep their dtype through torch
    if len(left) != len(right) and 1 not in (len(left), len(right)):
        return None
    n = max(len(left), len(right))
    left, right = left * n if len(left) == 1 else left, right * n if len(right) == 1 else right
    scalar = rank_of(a) == 0 and rank_of(b) == 0
    return Dims([fn(x, y) for x, y in zip(left, right)], scalar=scalar, dtype=dtype)


def _scalar_operand(node: NodeView, a: Any, b: Any) -> Optional[float]:
    """The right operand as a Python number, where that computes the same: a known constant of
    one element, of ``a``'s floating dtype and no higher rank (so the result's shape and dtype
    are unchanged, and the value is exact). Fused kernels then read it as a literal: as a 0-d
    tensor input, RMSNorm's epsilon made the kernel compute the whole ``1 / sqrt`` chain per
    element instead of per row (SmolLM2 from ONNX: 58 us against ~10 per call)."""
    value = node.known.get(1)
    if value is None or len(value) != 1 or not isinstance(a, torch.Tensor) \
            or not isinstance(b, torch.Tensor):
        return None
    if not a.dtype.is_floating_point or b.dtype != a.dtype or b.dim() > a.dim():
        return None
    return float(value[0])


def _arith(op: str):
    on_sizes, on_tensors = ARITHMETIC[op]

    def convert(node: NodeView, a, b):
        folded = _on_dims(node, a, b, on_sizes)
        if folded is not None:
            return folded
        scalar = _scalar_operand(node, a, b)
        if scalar is not None:
            return on_tensors(a, scalar)
        return on_tensors(as_tensor(a), as_tensor(b))
    return convert


for _op in ARITHMETIC:
    converter(_op, since=13, dims=True)(_arith(_op))


@converter("Pow", since=13)
def pow_(node: NodeView, a, b):
    exponent = node.known.get(1)
    if exponent is not None and len(exponent) == 1 and a.dtype.is_floating_point:
        return torch.pow(a, float(exponent[0]))   # a scalar power fuses (RMSNorm's x ** 2)
    out = torch.pow(a, b.to(a.dtype) if a.dtype.is_floating_point else b)
    return out.to(a.dtype)


@converter("Mod", since=13)
def mod(node: NodeView, a, b):
    return torch.fmod(a, b) if node.attr("fmod", 0) else torch.remainder(a, b)


COMPARE = {"Equal": (operator.eq, torch.eq), "Less": (operator.lt, torch.lt),
           "LessOrEqual": (operator.le, torch.le), "Greater": (operator.gt, torch.gt),
           "GreaterOrEqual": (operator.ge, torch.ge)}
LOGIC = {"And": torch.logical_and, "Or": torch.logical_or, "Xor": torch.logical_xor,
         "BitwiseAnd": torch.bitwise_and, "BitwiseOr": torch.bitwise_or,
         "BitwiseXor": torch.bitwise_xor}


def _binary(fn: Callable):
    def convert(node: NodeView, a, b):
        return fn(a, b)
    return convert


def _compare(on_sizes: Callable, on_tensors: Callable):
    def convert(node: NodeView, a, b):
        # a comparison of sizes is decided while tracing (a guard), as the exporters' masks
        # of shapes (``Where(Equal(shape, -1), 1, shape)``) need
        folded = _on_dims(node, a, b, lambda x, y: bool(on_sizes(x, y)), torch.bool)
        return folded if folded is not None else on_tensors(as_tensor(a), as_tensor(b))
    return convert


# Registered from opset 13, the oldest imported: later versions of these ops only add types.
for _op, (_sizes, _tensors) in COMPARE.items():
    converter(_op, since=13, dims=True)(_compare(_sizes, _tensors))
for _op, _fn in LOGIC.items():
    converter(_op, since=13)(_binary(_fn))


@converter("Where", since=13, dims=True)
def where(node: NodeView, cond, a, b):
    picks, left, right = (known_list(node, i, v) for i, v in enumerate((cond, a, b)))
    if isinstance(cond, Dims) and left is not None and right is not None and \
            max(rank_of(v) for v in (cond, a, b)) <= 1:
        n = max(len(picks), len(left), len(right))
        spread = [v * n if len(v) == 1 else v for v in (picks, left, right)]
        return Dims([x if c else y for c, x, y in zip(*spread)])
    return torch.where(as_tensor(cond), as_tensor(a), as_tensor(b))


def _variadic(fn: Callable):
    def convert(node: NodeView, *xs):
        out = xs[0]
        for x in xs[1:]:
            out = fn(out, x)
        return out
    return convert


converter("Max", since=13)(_variadic(torch.maximum))
converter("Min", since=13)(_variadic(torch.minimum))
converter("Sum", since=13)(_variadic(torch.add))


@converter("Mean", since=13)
def mean(node: NodeView, *xs):
    return _variadic(torch.add)(node, *xs) / len(xs)


@converter("MatMul", since=13)
def matmul(node: NodeView, a, b):
    return torch.matmul(a, b)


@converter("Gemm", since=13)
def gemm(node: NodeView, a, b, c=None):
    if node.attr("transA", 0):
        a = a.t()
    if node.attr("transB", 0):
        b = b.t()
    alpha, beta = node.attr("alpha", 1.0), node.attr("beta", 1.0)
    out = a @ b
    if alpha != 1.0:
        out = out * alpha
    if c is not None:
        out = out + (c * beta if beta != 1.0 else c)
    return out
