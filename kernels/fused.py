"""Fused pointwise/row-reduction groups: the shared loop IR ("row program").

A fusion group (see :mod:`fxforge.irgraph.fusion`) arrives as a small ``fx.GraphModule``.
:func:`build_program` turns it into a :class:`~fxforge.kernels.row_program.RowProgram`: the iteration space is
``rows x N`` (all dims but the last flattened into rows, ``N`` the last dim), every value is
a scalar computed per element (``ELEM``), once per row (``ROW``: row statistics and what is
derived from them) or once per kernel (``CONST``: literals, the row length). Composite
reductions (softmax, log_softmax, layer_norm, rms_norm, mean) are expanded into sum/max/min
row reductions plus pointwise ops, so code generators only know three reductions.

Numerics follow eager ATen: float values are held in fp32 registers; a value whose dtype is
bf16/fp16 is rounded to it right after the op that produced it, exactly where eager rounds
(the internals of softmax/layer_norm/rms_norm/mean stay fp32, as in ATen's kernels).
Sizes never come from ``meta["val"]`` (they may be symbolic): only ranks, dtypes and which
dims are a literal 1 do; ``row_program.bind_shapes`` takes sizes and strides from the runtime tensors.
"""
from __future__ import annotations

import operator
from typing import Any, Optional, Sequence

import torch
import torch.fx as fx

from fxforge.irgraph.fusion import POINTWISE, ROW_REDUCTIONS, acts_on_last_dim
from fxforge.irgraph.graph import node_arguments
from fxforge.irgraph.views import Cat
from fxforge.kernels.row_program import (
    CONST, ELEM, REDUCTIONS, ROW, InputSpec, OutputSpec, RowProgram, Unsupported, Value, kind_of)

aten = torch.ops.aten


def reference(gm: fx.GraphModule, *inputs: torch.Tensor) -> tuple:
    """The oracle: run the group's GraphModule itself on ATen."""
    out = gm(*inputs)
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _dims(val: Any) -> list[str]:
    return [str(d) for d in val.shape]


def _tensor_meta(node: fx.Node) -> torch.Tensor:
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        raise Unsupported(f"{node.name} has no tensor meta['val']")
    kind_of(val.dtype)
    return val


class _Builder:
    def __init__(self, gm: fx.GraphModule):
        all_placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.n_args = len(all_placeholders)
        # Symbolic sizes (e.g. layer_norm's normalized_shape) arrive as SymInt placeholders:
        # the kernel takes sizes from the tensors, so they are accepted and ignored.
        self.tensor_args = tuple(k for k, p in enumerate(all_placeholders)
                                 if not isinstance(p.meta.get("val"), (int, torch.SymInt)))
        placeholders = [all_placeholders[k] for k in self.tensor_args]
        metas = [_tensor_meta(p) for p in placeholders]
        self.rank = max((m.dim() for m in metas), default=0)
        if self.rank == 0:
            raise Unsupported("the group has no tensor of rank >= 1")
        self.iter_dims = self._broadcast([_dims(m) for m in metas])
        devices = {m.device.type for m in metas}
        if len(devices) > 1:
            raise Unsupported(f"inputs on several devices: {sorted(devices)}")
        self.values: list[Value] = []
        self.memo: dict[Value, int] = {}
        self.dropped: set[int] = set()      # ROW values whose rank lost the last dim
        self.env: dict[fx.Node, Any] = {}
        self.inputs: list[InputSpec] = []
        for node, meta in zip(placeholders, metas):
            level = ROW if self._row_shaped(_dims(meta)) else ELEM
            self.inputs.append(InputSpec(meta.dtype, meta.dim(), level))
            self.env[node] = self.emit("load", (), meta.dtype, attr=len(self.inputs) - 1,
                                       level=level, ctype=kind_of(meta.dtype))

    def _broadcast(self, shapes: list[list[str]]) -> list[str]:
        dims = ["1"] * self.rank
        for shape in shapes:
            for k, d in enumerate(shape[::-1]):
                pos = self.rank - 1 - k
                if d != "1":
                    if dims[pos] not in ("1", d):
                        raise Unsupported(f"cannot prove dims {dims[pos]} and {d} equal")
                    dims[pos] = d
        return dims

    def _row_shaped(self, dims: list[str]) -> bool:
        """One value per row: a size-1 last dim, or no dims at all (a 0-d tensor, the same for
        every row: read per element, it kept a row's arithmetic after it per element too)."""
        return (not dims or dims[-1] == "1") and self.iter_dims[-1] != "1"

    def emit(self, op: str, args: tuple, dtype: torch.dtype, attr: Any = None,
             level: Optional[int] = None, ctype: Optional[str] = None) -> int:
        if level is None:
            level = max((self.values[a].level for a in args), default=CONST)
        value = Value(op, tuple(args), dtype, level, attr, ctype or kind_of(dtype))
        if value not in self.memo:
            self.memo[value] = len(self.values)
            self.values.append(value)
            dropped_args = [a for a in args if a in self.dropped]
            if dropped_args and op not in REDUCTIONS:
                if any(self.values[a].level == ELEM for a in args):
                    raise Unsupported(f"{op}: a reduction without keepdim broadcasts against "
                                      "the last dim (misaligned broadcast)")
                self.dropped.add(self.memo[value])
        return self.memo[value]

    def operand(self, arg: Any) -> int:
        if isinstance(arg, fx.Node):
            if arg not in self.env:
                raise Unsupported(f"{arg.name}: a symbolic size used as a value")
            value = self.env[arg]
            if isinstance(value, tuple):
                raise Unsupported(f"{arg.name}: a multi-output value used directly")
            return value
        if isinstance(arg, bool):
            return self.emit("const", (), torch.bool, attr=arg)
        if isinstance(arg, int):
            return self.emit("const", (), torch.int64, attr=arg)
        if isinstance(arg, float):
            return self.emit("const", (), torch.float32, attr=arg)
        raise Unsupported(f"operand {arg!r} of type {type(arg).__name__}")

    def shift(self, vid: int, offset: int) -> int:
        """The value ``vid`` evaluated at column ``j + offset`` (row values do not move)."""
        value = self.values[vid]
        if value.level != ELEM or offset == 0:
            return vid
        if value.op == "load":
            return self.emit("load_at", (), value.dtype, attr=(value.attr, offset), level=ELEM,
                             ctype=value.ctype)
        if value.op == "load_at":
            index, base = value.attr
            return self.emit("load_at", (), value.dtype, attr=(index, base + offset), level=ELEM,
                             ctype=value.ctype)
        if value.op == "select_col":
            raise Unsupported("a slice of a cat over the last dim")
        args = tuple(self.shift(a, offset) for a in value.args)
        return self.emit(value.op, args, value.dtype, attr=value.attr, level=value.level,
                         ctype=value.ctype)

    def check_last_dim(self, node: fx.Node, dims: Any, rank: int) -> None:
        if isinstance(dims, int):
            dims = [dims]
        if dims is None or len(dims) != 1 or dims[0] % max(rank, 1) != rank - 1:
            raise Unsupported(f"{node.name}: reduction over dims {dims} (only the last dim)")
        if rank != self.rank:
            raise Unsupported(f"{node.name}: reduction of a rank-{rank} value in a "
                              f"rank-{self.rank} group")

    def reduce(self, op: str, arg: int, dtype: torch.dtype) -> int:
        if self.values[arg].level != ELEM:   # a size-1 last dim: the value itself
            return self.emit("cast", (arg,), dtype)
        return self.emit(op, (arg,), dtype, level=ROW, ctype=kind_of(dtype))

    def mean(self, arg: int, dtype: torch.dtype) -> int:
        total = self.reduce("sum", arg, torch.float32)
        return self.emit("div", (total, self.emit("ncols", (), torch.float32)), dtype)


def _promote_kind(builder: _Builder, args: Sequence[int]) -> str:
    kinds = {kind_of(builder.values[a].dtype) for a in args}
    return "f" if "f" in kinds else ("i" if "i" in kinds else "b")


UNARY = {aten.neg.default: "neg", aten.abs.default: "abs", aten.exp.default: "exp",
         aten.log.default: "log", aten.sqrt.default: "sqrt", aten.rsqrt.default: "rsqrt",
         aten.reciprocal.default: "reciprocal", aten.tanh.default: "tanh",
         aten.sigmoid.default: "sigmoid", aten.erf.default: "erf", aten.relu.default: "relu",
         aten.silu.default: "silu", aten.sin.default: "sin", aten.cos.default: "cos",
         aten.logical_not.default: "logical_not", aten.bitwise_not.default: "bitwise_not"}
BINARY = {aten.add.Tensor: "add", aten.add.Scalar: "add", aten.sub.Tensor: "sub",
          aten.sub.Scalar: "sub", aten.mul.Tensor: "mul", aten.mul.Scalar: "mul",
          aten.div.Tensor: "div", aten.div.Scalar: "div", aten.maximum.default: "maximum",
          aten.minimum.default: "minimum", aten.logical_and.default: "logical_and"}
COMPARE = {aten.eq.Scalar: "eq", aten.eq.Tensor: "eq", aten.ne.Scalar: "ne", aten.lt.Scalar: "lt",
           aten.lt.Tensor: "lt", aten.le.Scalar: "le", aten.gt.Scalar: "gt",
           aten.gt.Tensor: "gt", aten.ge.Scalar: "ge"}
FLOAT_ONLY = {"exp", "log", "sqrt", "rsqrt", "reciprocal", "tanh", "sigmoid", "erf", "silu",
              "sin", "cos", "div", "gelu", "pow"}


def _lower_pointwise(b: _Builder, node: fx.Node, dtype: torch.dtype) -> int:
    target, args = node.target, node_arguments(node)
    ctype = kind_of(dtype)
    if target in UNARY:
        op = UNARY[target]
        ctype = "b" if op == "logical_not" else ctype
        return b.emit(op, (b.operand(args["self"]),), dtype, ctype=ctype)
    if target in BINARY:
        op, lhs, rhs = BINARY[target], b.operand(args["self"]), b.operand(args["other"])
        if args.get("alpha", 1) != 1:
            rhs = b.emit("mul", (rhs, b.operand(args["alpha"])), torch.float32 if ctype == "f"
                         else torch.int64, ctype=ctype)
        return b.emit(op, (lhs, rhs), dtype, ctype="b" if op == "logical_and" else ctype)
    if target in COMPARE:
        operands = (b.operand(args["self"]), b.operand(args["other"]))
        return b.emit(COMPARE[target], operands, dtype, ctype=_promote_kind(b, operands))
    if target == aten.pow.Tensor_Scalar:
        if not isinstance(args["exponent"], (int, float)) or ctype != "f":
            raise Unsupported(f"{node.name}: pow with exponent {args['exponent']!r} on {dtype}")
        return b.emit("pow", (b.operand(args["self"]),), dtype, attr=float(args["exponent"]))
    if target == aten.gelu.default:
        approximate = args.get("approximate", "none")
        return b.emit("gelu", (b.operand(args["self"]),), dtype, attr=approximate)
    if target == aten.clamp.default:
        bounds = (args.get("min"), args.get("max"))
        if not all(x is None or isinstance(x, (int, float)) for x in bounds):
            raise Unsupported(f"{node.name}: clamp bounds {bounds}")
        return b.emit("clamp", (b.operand(args["self"]),), dtype, attr=bounds)
    if target == aten.where.self:
        operands = tuple(b.operand(args[k]) for k in ("condition", "self", "other"))
        return b.emit("where", operands, dtype)
    if target == aten._to_copy.default:
        device = args.get("device")
        src = args["self"]
        if device is not None and torch.device(device).type != src.meta["val"].device.type:
            raise Unsupported(f"{node.name}: a device copy")
        return b.emit("cast", (b.operand(src),), dtype)
    if target == aten.clone.default:
        return b.operand(args["self"])
    raise Unsupported(f"{node.name}: {target} is not a fused-kernel op")


def _static_last_size(node: fx.Node) -> int:
    size = _tensor_meta(node).shape[-1]
    if not isinstance(size, int):
        raise Unsupported(f"{node.name}: a symbolic last-dim size {size}")
    return size


def _lower_slice(b: _Builder, node: fx.Node) -> int:
    """``x[..., start:]`` over the last dim: ``x`` read ``start`` columns further on."""
    args = node_arguments(node)
    src = args["self"]
    if not acts_on_last_dim(node) or not isinstance(src, fx.Node):
        raise Unsupported(f"{node.name}: a slice not over the last dim")
    if _dims(_tensor_meta(src))[-1] not in (b.iter_dims[-1], "1"):
        raise Unsupported(f"{node.name}: slices a last dim unlike the iteration's")
    start = args.get("start") or 0
    if not isinstance(start, int):
        raise Unsupported(f"{node.name}: a symbolic slice start")
    if start < 0:
        start = max(start + _static_last_size(src), 0)
    return b.shift(b.operand(src), start)


def _lower_cat(b: _Builder, node: fx.Node) -> int:
    """``cat`` over the last dim: piece k where ``split_k <= j < split_k+1``."""
    if not acts_on_last_dim(node):
        raise Unsupported(f"{node.name}: a cat not over the last dim")
    if _dims(_tensor_meta(node))[-1] != b.iter_dims[-1]:
        raise Unsupported(f"{node.name}: a cat whose result is not the iteration shape")
    pieces, starts, start = Cat.of(node).tensors, [], 0
    for piece in pieces:
        starts.append(start)
        start += _static_last_size(piece)
    dtype = _tensor_meta(node).dtype

    def piece_at(piece: fx.Node, first: int) -> int:   # cat promotes mixed dtypes
        value = b.shift(b.operand(piece), -first)
        return value if b.values[value].dtype == dtype else b.emit("cast", (value,), dtype)

    out = piece_at(pieces[-1], starts[-1])
    for piece, first, end in reversed(list(zip(pieces[:-1], starts[:-1], starts[1:]))):
        out = b.emit("select_col", (piece_at(piece, first), out), dtype, attr=end, level=ELEM)
    return out


def _lower_reduction(b: _Builder, node: fx.Node, val: Any) -> Any:
    target, args = node.target, node_arguments(node)
    x = b.operand(args.get("self", args.get("input")))
    rank = args.get("self", args.get("input")).meta["val"].dim()
    if target in (aten.sum.dim_IntList, aten.mean.dim, aten.amax.default, aten.amin.default):
        b.check_last_dim(node, args["dim"], rank)
        if target == aten.mean.dim:
            if kind_of(val.dtype) != "f":
                raise Unsupported(f"{node.name}: mean to {val.dtype}")
            out = b.mean(x, val.dtype)
        else:
            op = {aten.sum.dim_IntList: "sum", aten.amax.default: "max"}.get(target, "min")
            out = b.reduce(op, x, val.dtype)
        if not args.get("keepdim", False):   # its own value: a keepdim twin may share `out`
            out = b.emit("cast", (out,), val.dtype, attr="drop")
            b.dropped.add(out)
        return out
    if target in (aten._softmax.default, aten._log_softmax.default):
        b.check_last_dim(node, args["dim"], rank)
        peak = b.reduce("max", x, torch.float32)
        shifted = b.emit("sub", (x, peak), torch.float32)
        exps = b.emit("exp", (shifted,), torch.float32)
        total = b.reduce("sum", exps, torch.float32)
        if target == aten._softmax.default:
            return b.emit("div", (exps, total), val.dtype)
        return b.emit("sub", (shifted, b.emit("log", (total,), torch.float32)), val.dtype)
    if target == aten.native_layer_norm.default:
        return _lower_layer_norm(b, node, args, x, rank)
    if target == aten.rms_norm.default:
        b.check_last_dim(node, [-1] * len(args["normalized_shape"]), rank)
        eps = args.get("eps")
        eps = torch.finfo(val.dtype).eps if eps is None else eps
        mean_sq = b.mean(b.emit("mul", (x, x), torch.float32), torch.float32)
        scale = b.emit("rsqrt", (b.emit("add", (mean_sq, b.operand(float(eps))), torch.float32),),
                       torch.float32)
        out = b.emit("mul", (x, scale), args["input"].meta["val"].dtype)
        if args.get("weight") is not None:
            out = b.emit("mul", (out, b.operand(args["weight"])), val.dtype)
        return b.emit("cast", (out,), val.dtype) if b.values[out].dtype != val.dtype else out
    raise Unsupported(f"{node.name}: {target} is not a fused-kernel op")


def _lower_layer_norm(b: _Builder, node: fx.Node, args: dict, x: int, rank: int) -> tuple:
    b.check_last_dim(node, [-1] * len(args["normalized_shape"]), rank)
    out_dtypes = [v.dtype for v in node.meta["val"]]
    mean = b.mean(x, torch.float32)
    centered = b.emit("sub", (x, mean), torch.float32)
    var = b.mean(b.emit("mul", (centered, centered), torch.float32), torch.float32)
    eps = b.operand(float(args["eps"]))
    rstd = b.emit("rsqrt", (b.emit("add", (var, eps), torch.float32),), torch.float32)
    out = b.emit("mul", (centered, rstd), torch.float32)
    for name, op in (("weight", "mul"), ("bias", "add")):
        if args.get(name) is not None:
            out = b.emit(op, (out, b.operand(args[name])), torch.float32)
    return tuple(b.emit("cast", (v,), dt) if b.values[v].dtype != dt else v
                 for v, dt in zip((out, mean, rstd), out_dtypes))


def build_program(gm: fx.GraphModule) -> RowProgram:
    """Translate a fusion group into a :class:`RowProgram` (raises :class:`Unsupported`)."""
    b = _Builder(gm)
    outputs: list[OutputSpec] = []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            results = node.args[0] if isinstance(node.args[0], (tuple, list)) else (node.args[0],)
            outputs = [_output_spec(b, r) for r in results]
        elif node.op != "call_function":
            raise Unsupported(f"{node.name}: {node.op} nodes are not fused")
        elif node.target is operator.getitem:
            b.env[node] = b.env[node.args[0]][node.args[1]]
        elif node.target in POINTWISE:
            b.env[node] = _lower_pointwise(b, node, _tensor_meta(node).dtype)
        elif node.target is aten.slice.Tensor:
            b.env[node] = _lower_slice(b, node)
        elif node.target is aten.cat.default:
            b.env[node] = _lower_cat(b, node)
        elif node.target in ROW_REDUCTIONS:
            val = node.meta.get("val")
            b.env[node] = _lower_reduction(b, node, val if isinstance(val, torch.Tensor)
                                           else None)
        else:
            raise Unsupported(f"{node.name}: {node.target} is not a fused-kernel op")
    if not outputs:
        raise Unsupported("the group has no outputs")
    return RowProgram(b.rank, tuple(b.inputs), tuple(b.values), tuple(outputs), b.tensor_args,
                      b.n_args)


def _output_spec(b: _Builder, node: Any) -> OutputSpec:
    if not isinstance(node, fx.Node):
        raise Unsupported(f"output {node!r} is not a tensor of the group")
    val, value = _tensor_meta(node), b.env[node]
    dims = _dims(val)
    if dims == b.iter_dims:
        shape = "full"
    elif dims == b.iter_dims[:-1] + ["1"] and b.values[value].level != ELEM:
        shape = "row_keep"
    elif dims == b.iter_dims[:-1] and value in b.dropped:
        shape = "row_drop"
    else:
        raise Unsupported(f"output {node.name} of shape {dims} is neither the iteration shape "
                          f"{b.iter_dims} nor its row reduction")
    return OutputSpec(value, val.dtype, shape)
