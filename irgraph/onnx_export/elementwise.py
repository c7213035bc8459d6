"""Elementwise ops: arithmetic, comparisons, logic, unary math, ``where``, casts.

torch promotes mixed operands (an int tensor times a float scalar is float); ONNX wants equal
types, so each operand is cast to the dtype torch computes in: the result's dtype for
arithmetic, the promoted operands' dtype for comparisons (whose result is bool).
"""
from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.fx as fx

from fxforge.irgraph.graph import node_arguments
from fxforge.irgraph.meta import META_KEY, SymMeta
from fxforge.irgraph.onnx_export.table import Unsupported, converts
from fxforge.irgraph.views import Gelu, ToCopy, Where

aten = torch.ops.aten

ARITHMETIC = {
    aten.add.Tensor: "Add", aten.add.Scalar: "Add", aten.sub.Tensor: "Sub",
    aten.sub.Scalar: "Sub", aten.rsub.Scalar: "Sub", aten.rsub.Tensor: "Sub",
    aten.mul.Tensor: "Mul", aten.mul.Scalar: "Mul",
    aten.div.Tensor: "Div", aten.div.Scalar: "Div", aten.pow.Tensor_Scalar: "Pow",
    aten.pow.Tensor_Tensor: "Pow", aten.maximum.default: "Max", aten.minimum.default: "Min",
    aten.fmod.Tensor: "Mod", aten.fmod.Scalar: "Mod",
}
COMPARISONS = {
    aten.eq.Tensor: "Equal", aten.eq.Scalar: "Equal", aten.ne.Tensor: "Equal",
    aten.ne.Scalar: "Equal", aten.lt.Tensor: "Less", aten.lt.Scalar: "Less",
    aten.le.Tensor: "LessOrEqual", aten.le.Scalar: "LessOrEqual",
    aten.gt.Tensor: "Greater", aten.gt.Scalar: "Greater",
    aten.ge.Tensor: "GreaterOrEqual", aten.ge.Scalar: "GreaterOrEqual",
}
LOGICAL = {   # on bool; the bitwise ones on integers use BitwiseAnd & co.
    aten.bitwise_and.Tensor: "And", aten.bitwise_or.Tensor: "Or", aten.bitwise_xor.Tensor: "Xor",
    aten.logical_and.default: "And", aten.logical_or.default: "Or",
    aten.logical_xor.default: "Xor",
}
UNARY = {
    aten.neg.default: "Neg", aten.abs.default: "Abs", aten.exp.default: "Exp",
    aten.log.default: "Log", aten.sqrt.default: "Sqrt", aten.sin.default: "Sin",
    aten.cos.default: "Cos", aten.tan.default: "Tan", aten.tanh.default: "Tanh",
    aten.sigmoid.default: "Sigmoid", aten.relu.default: "Relu", aten.erf.default: "Erf",
    aten.reciprocal.default: "Reciprocal", aten.floor.default: "Floor",
    aten.ceil.default: "Ceil", aten.round.default: "Round", aten.sign.default: "Sign",
    aten.isnan.default: "IsNaN", aten.logical_not.default: "Not",
    aten.asin.default: "Asin", aten.acos.default: "Acos", aten.atan.default: "Atan",
    aten.sinh.default: "Sinh", aten.cosh.default: "Cosh",
}


def _operands(node: fx.Node) -> tuple[Any, Any]:
    args = node_arguments(node)
    first = args.get("self", args.get("input"))
    second = args.get("other", args.get("exponent"))
    return first, second


def _example(ctx, arg: Any) -> Any:
    """A stand-in for torch.result_type with the operand's dtype and category (a tensor with
    dims outranks a 0-D one, which outranks a Python scalar): an empty tensor of its rank; a
    size (symbolic int) is an int."""
    dtype = ctx.dtype(arg)
    if dtype is None:
        return arg if isinstance(arg, (bool, int, float)) else 0
    return torch.empty((0,) * ctx.meta(arg).rank, dtype=dtype)


def promoted(ctx, a: Any, b: Any) -> torch.dtype:
    """The dtype torch compares ``a`` and ``b`` in."""
    if ctx.dtype(a) is None and ctx.dtype(b) is None:
        return torch.result_type(torch.tensor(a), b)
    return torch.result_type(_example(ctx, a), _example(ctx, b))


@converts(*ARITHMETIC)
def arithmetic(ctx, node):
    a, b = _operands(node)
    compute = ctx.meta(node).dtype   # int / int divides as floats: the result's dtype
    op_type = ARITHMETIC[node.target]
    if node.target in (aten.rsub.Scalar, aten.rsub.Tensor):
        a, b = b, a
    alpha = node_arguments(node).get("alpha", 1)
    if alpha != 1:   # add/sub(a, b, alpha=k) = a ± k * b
        b_name = ctx.builder.op("Mul", [ctx.tensor(b, compute), ctx.tensor(alpha, compute)])
    else:
        # Pow takes its exponent in its own type (an int tensor stays int)
        b_name = ctx.tensor(b, compute if op_type != "Pow" else ctx.dtype(b) or compute)
    extra = {"fmod": 1} if op_type == "Mod" else {}
    return ctx.builder.op(op_type, [ctx.tensor(a, compute), b_name], **extra)


@converts(aten.div.Tensor_mode)
def divide_rounded(ctx, node):
    args = node_arguments(node)
    dtype, mode = ctx.meta(node).dtype, args.get("rounding_mode")
    if mode is not None and not dtype.is_floating_point:
        raise Unsupported(f"integer division with rounding_mode={mode!r}")
    quotient = ctx.builder.op("Div", [ctx.tensor(args["self"], dtype), ctx.tensor(args["other"], dtype)])
    return quotient if mode is None else _round_quotient(ctx, quotient, mode)


def _round_quotient(ctx, quotient: str, mode: str) -> str:
    if mode == "floor":
        return ctx.builder.op("Floor", [quotient])
    # trunc: toward zero, sign(q) * floor(|q|)
    floor = ctx.builder.op("Floor", [ctx.builder.op("Abs", [quotient])])
    return ctx.builder.op("Mul", [ctx.builder.op("Sign", [quotient]), floor])


@converts(*COMPARISONS)
def comparison(ctx, node):
    a, b = _operands(node)
    compute = promoted(ctx, a, b)
    out = ctx.builder.op(COMPARISONS[node.target], [ctx.tensor(a, compute), ctx.tensor(b, compute)])
    negate = node.target in (aten.ne.Tensor, aten.ne.Scalar)
    return ctx.builder.op("Not", [out]) if negate else out


@converts(*LOGICAL)
def logical(ctx, node):
    a, b = _operands(node)
    dtype = ctx.meta(node).dtype
    if dtype == torch.bool:
        return ctx.builder.op(LOGICAL[node.target], [ctx.tensor(a, dtype), ctx.tensor(b, dtype)])
    bitwise = {"And": "BitwiseAnd", "Or": "BitwiseOr", "Xor": "BitwiseXor"}[LOGICAL[node.target]]
    if ctx.opset < 18:
        raise Unsupported(f"{bitwise} on integers needs opset >= 18")
    return ctx.builder.op(bitwise, [ctx.tensor(a, dtype), ctx.tensor(b, dtype)])


@converts(aten.bitwise_not.default)
def bitwise_not(ctx, node):
    x = node_arguments(node)["self"]
    if ctx.dtype(x) != torch.bool and ctx.opset < 18:
        raise Unsupported("BitwiseNot on integers needs opset >= 18")
    return ctx.builder.op("Not" if ctx.dtype(x) == torch.bool else "BitwiseNot", [ctx.tensor(x)])


@converts(*UNARY)
def unary(ctx, node):
    x = node_arguments(node)["self"]
    dtype = ctx.meta(node).dtype
    compute = ctx.dtype(x) if dtype == torch.bool else dtype   # isnan: the input's own type
    return ctx.builder.op(UNARY[node.target], [ctx.tensor(x, compute)])


@converts(aten.rsqrt.default)
def rsqrt(ctx, node):
    x = ctx.tensor(node_arguments(node)["self"], ctx.meta(node).dtype)
    return ctx.builder.op("Reciprocal", [ctx.builder.op("Sqrt", [x])])


@converts(aten.silu.default)
def silu(ctx, node):
    dtype = ctx.meta(node).dtype
    return activation_of(ctx, "silu", ctx.tensor(node_arguments(node)["self"], dtype), dtype)


def activation_of(ctx, name: str, x: str, dtype: torch.dtype) -> str:
    """fxforge's activation ``name`` (a key of ``irgraph.ops.ACTIVATIONS``) applied to ``x``."""
    if name == "none":
        return x
    if name == "relu":
        return ctx.builder.op("Relu", [x])
    if name in ("gelu", "gelu_tanh"):
        return gelu_of(ctx, x, "tanh" if name == "gelu_tanh" else "none", dtype)
    if name == "silu":
        return ctx.builder.op("Mul", [x, ctx.builder.op("Sigmoid", [x])])
    raise Unsupported(f"activation {name!r}")


def gelu_of(ctx, x: str, approximate: str, dtype: torch.dtype) -> str:
    """GELU: ONNX's ``Gelu`` from opset 20, else its formula (erf, or the tanh approximation)."""
    b = ctx.builder
    if ctx.opset >= 20:
        return b.op("Gelu", [x], approximate=approximate)
    if approximate == "tanh":
        cube = b.op("Mul", [b.op("Mul", [x, x]), x])
        inner = b.op("Add", [x, b.op("Mul", [cube, b.const(0.044715, dtype)])])
        tanh = b.op("Tanh", [b.op("Mul", [inner, b.const(math.sqrt(2 / math.pi), dtype)])])
        gate = b.op("Add", [tanh, b.const(1.0, dtype)])
    else:
        erf = b.op("Erf", [b.op("Mul", [x, b.const(math.sqrt(0.5), dtype)])])
        gate = b.op("Add", [erf, b.const(1.0, dtype)])
    return b.op("Mul", [b.op("Mul", [x, b.const(0.5, dtype)]), gate])


@converts(aten.gelu.default)
def gelu(ctx, node):
    view = Gelu.of(node)
    dtype = ctx.meta(node).dtype
    return gelu_of(ctx, ctx.tensor(view.input, dtype), view.approximate, dtype)


@converts(aten.clamp.default, aten.clamp.Tensor, aten.hardtanh.default)
def clamp(ctx, node):
    args = node_arguments(node)
    dtype = ctx.meta(node).dtype
    low = args.get("min", args.get("min_val"))
    high = args.get("max", args.get("max_val"))
    return ctx.builder.op("Clip", [ctx.tensor(args["self"], dtype), ctx.optional(low, dtype),
                                   ctx.optional(high, dtype)])


@converts(aten.where.self)
def where(ctx, node):
    view = Where.of(node)
    dtype = ctx.meta(node).dtype
    return ctx.builder.op("Where", [ctx.tensor(view.condition, torch.bool),
                                    ctx.tensor(view.input, dtype), ctx.tensor(view.other, dtype)])


@converts(aten.masked_fill.Scalar, aten.masked_fill.Tensor)
def masked_fill(ctx, node):
    args = node_arguments(node)   # the Tensor overload's value is a 0-D tensor
    dtype = ctx.meta(node).dtype
    return ctx.builder.op("Where", [ctx.tensor(args["mask"], torch.bool),
                                    ctx.tensor(args["value"], dtype), ctx.tensor(args["self"], dtype)])


@converts(aten._to_copy.default)
def to_copy(ctx, node):
    view = ToCopy.of(node)
    source = ctx.dtype(view.input)
    target = ctx.meta(node).dtype
    name = ctx.tensor(view.input)
    return ctx.builder.cast(name, source, target) if source != target else \
        ctx.builder.op("Identity", [name])


@converts(aten.clone.default, aten.alias.default, aten.lift_fresh_copy.default,
          aten.detach.default)
def identity(ctx, node):
    return ctx.builder.op("Identity", [ctx.tensor(node.all_input_nodes[0])])


SYMBOLIC = (operator.add, operator.mul, operator.sub, operator.floordiv, operator.mod,
            operator.neg, aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int)


@converts(*SYMBOLIC)
def symbolic_int(ctx, node):
    """A size computation: its value is its sympy expression, emitted where a size is read."""
    meta = node.meta.get(META_KEY)
    if not isinstance(meta, SymMeta):
        raise Unsupported("only sizes (symbolic ints) are exported for Python operators")
    return meta.expr
