"""Network ops: matrix products, normalisations, softmax, reductions, convolution, pooling."""
from __future__ import annotations

import torch

from fxforge.irgraph.graph import node_arguments
from fxforge.irgraph.meta import META_KEY
from fxforge.irgraph.onnx_export.table import Unsupported, converts
from fxforge.irgraph.views import Addmm, Baddbmm, LayerNorm, Reduction, RmsNorm, Softmax

aten = torch.ops.aten


@converts(aten.mm.default, aten.bmm.default, aten.matmul.default)
def matmul(ctx, node):
    args = node_arguments(node)
    a, b = args["self"], args.get("mat2", args.get("other"))
    dtype = ctx.meta(node).dtype
    return ctx.builder.op("MatMul", [ctx.tensor(a, dtype), ctx.tensor(b, dtype)])


@converts(aten.addmm.default)
def addmm(ctx, node):
    view = Addmm.of(node)
    dtype = ctx.meta(node).dtype
    return ctx.builder.op("Gemm", [ctx.tensor(view.mat1, dtype), ctx.tensor(view.mat2, dtype),
                                   ctx.tensor(view.input, dtype)],
                          alpha=float(view.alpha), beta=float(view.beta))


@converts(aten.baddbmm.default)
def baddbmm(ctx, node):
    view = Baddbmm.of(node)
    dtype = ctx.meta(node).dtype
    b = ctx.builder
    product = b.op("MatMul", [ctx.tensor(view.batch1, dtype), ctx.tensor(view.batch2, dtype)])
    if view.alpha != 1:
        product = b.op("Mul", [product, b.const(float(view.alpha), dtype)])
    added = ctx.tensor(view.input, dtype)
    if view.beta != 1:
        added = b.op("Mul", [added, b.const(float(view.beta), dtype)])
    return b.op("Add", [product, added])


@converts(aten.native_layer_norm.default)
def layer_norm(ctx, node):
    view = LayerNorm.of(node)
    meta = ctx.meta(node)
    axis = meta.rank - len(view.normalized_shape)
    weight = ctx.tensor(view.weight, meta.dtype) if view.weight is not None else \
        ctx.builder.initializer("ones", torch.ones(list(view.normalized_shape), dtype=meta.dtype))
    outputs = ctx.builder.op("LayerNormalization",
                             [ctx.tensor(view.input), weight, ctx.optional(view.bias, meta.dtype)],
                             outputs=3, axis=axis, epsilon=float(view.eps))
    return tuple(outputs)   # (output, mean, rstd): torch's three, in its shapes


@converts(*RmsNorm.TARGETS)
def rms_norm(ctx, node):
    """``x * rsqrt(mean(x^2) + eps) * weight``, torch's own formula (eps: the dtype's by default)."""
    view = RmsNorm.of(node)
    meta = ctx.meta(node)
    b = ctx.builder
    x = ctx.tensor(view.input, meta.dtype)
    axes = list(range(meta.rank - len(view.normalized_shape), meta.rank))
    eps = view.eps if view.eps is not None else torch.finfo(meta.dtype).eps
    mean_square = b.reduce("ReduceMean", b.op("Mul", [x, x]), axes, keepdims=True)
    rstd = b.op("Reciprocal", [b.op("Sqrt", [b.op("Add", [mean_square, b.const(float(eps), meta.dtype)])])])
    out = b.op("Mul", [x, rstd])
    if view.weight is not None:
        out = b.op("Mul", [out, ctx.tensor(view.weight, meta.dtype)])
    return (out, rstd) if isinstance(node.meta.get(META_KEY), tuple) else out


@converts(*Softmax.TARGETS)
def softmax(ctx, node):
    view = Softmax.of(node)
    meta = ctx.meta(node)
    op_type = "Softmax" if node.target is aten._softmax.default else "LogSoftmax"
    return ctx.builder.op(op_type, [ctx.tensor(view.input, meta.dtype)], axis=view.dim % max(meta.rank, 1))


REDUCTIONS = {aten.sum.dim_IntList: "ReduceSum", aten.mean.dim: "ReduceMean",
              aten.amax.default: "ReduceMax", aten.amin.default: "ReduceMin"}


@converts(*REDUCTIONS)
def reduction(ctx, node):
    view = Reduction.of(node)
    source = ctx.meta(view.input)
    keepdim = bool(node_arguments(node).get("keepdim", False))
    dtype = ctx.meta(node).dtype
    x = ctx.tensor(view.input, dtype)
    if source.rank == 0:
        return ctx.builder.op("Identity", [x])
    return ctx.builder.reduce(REDUCTIONS[node.target], x, view.dims(source.rank), keepdim)


@converts(aten.max.dim, aten.min.dim)
def max_min_dim(ctx, node):
    """(values, indices) along ``dim``: Reduce + ArgMax (first occurrence, like torch's CPU)."""
    args = node_arguments(node)
    rank = ctx.meta(args["self"]).rank
    axis, keepdim = args["dim"] % max(rank, 1), bool(args.get("keepdim", False))
    x = ctx.tensor(args["self"])
    is_max = node.target is aten.max.dim
    values = ctx.builder.reduce("ReduceMax" if is_max else "ReduceMin", x, [axis], keepdim)
    indices = ctx.builder.op("ArgMax" if is_max else "ArgMin", [x], axis=axis,
                             keepdims=int(keepdim), select_last_index=0)
    return values, indices


@converts(aten.argmax.default, aten.argmin.default)
def argmax(ctx, node):
    args = node_arguments(node)
    if args.get("dim") is None:
        raise Unsupported("argmax/argmin over all dims")
    rank = ctx.meta(args["self"]).rank
    op_type = "ArgMax" if node.target is aten.argmax.default else "ArgMin"
    return ctx.builder.op(op_type, [ctx.tensor(args["self"])], axis=args["dim"] % max(rank, 1),
                          keepdims=int(bool(args.get("keepdim", False))))


@converts(aten.cumsum.default)
def cumsum(ctx, node):
    args = node_arguments(node)
    dtype = ctx.meta(node).dtype
    rank = ctx.meta(node).rank
    axis = ctx.builder.const(args["dim"] % max(rank, 1), torch.int64)
    return ctx.builder.op("CumSum", [ctx.tensor(args["self"], dtype), axis])


@converts(aten.convolution.default)
def convolution(ctx, node):
    args = node_arguments(node)
    weight = ctx.meta(args["weight"])
    spatial = weight.rank - 2
    padding = list(args["padding"]) * (spatial if len(args["padding"]) == 1 else 1)
    attrs = dict(strides=_per_dim(args["stride"], spatial), pads=padding + padding,
                 dilations=_per_dim(args["dilation"], spatial), group=int(args["groups"]),
                 kernel_shape=[int(d) for d in weight.shape[2:]])
    inputs = [ctx.tensor(args["input"]), ctx.tensor(args["weight"]), ctx.optional(args["bias"])]
    if args["transposed"]:
        attrs["output_padding"] = _per_dim(args["output_padding"], spatial)
        return ctx.builder.op("ConvTranspose", inputs, **attrs)
    return ctx.builder.op("Conv", inputs, **attrs)


def _per_dim(values, spatial: int) -> list[int]:
    values = [int(v) for v in values]
    return values * spatial if len(values) == 1 else values


@converts(aten._native_batch_norm_legit_no_training.default)
def batch_norm(ctx, node):
    """Inference batch norm: ONNX gives the output only (torch's saved statistics are empty)."""
    args = node_arguments(node)
    channels = int(ctx.meta(args["input"]).shape[1])
    dtype = ctx.meta(node).dtype
    b = ctx.builder
    scale = ctx.tensor(args["weight"], dtype) if args["weight"] is not None else \
        b.initializer("ones", torch.ones(channels, dtype=dtype))
    bias = ctx.tensor(args["bias"], dtype) if args["bias"] is not None else \
        b.initializer("zeros", torch.zeros(channels, dtype=dtype))
    out = b.op("BatchNormalization", [ctx.tensor(args["input"]), scale, bias,
                                      ctx.tensor(args["running_mean"], dtype),
                                      ctx.tensor(args["running_var"], dtype)],
               epsilon=float(args["eps"]))
    return out, None, None


@converts(aten.max_pool2d_with_indices.default, aten.max_pool3d_with_indices.default)
def max_pool(ctx, node):
    args = node_arguments(node)
    spatial = len(ctx.meta(node).shape) - 2
    kernel = _per_dim(args["kernel_size"], spatial)
    stride = _per_dim(args["stride"], spatial) if args["stride"] else kernel
    padding = _per_dim(args["padding"], spatial)
    out = ctx.builder.op("MaxPool", [ctx.tensor(args["self"])], kernel_shape=kernel, strides=stride,
                         pads=padding + padding, dilations=_per_dim(args["dilation"], spatial),
                         ceil_mode=int(bool(args["ceil_mode"])))
    return out, None   # torch's flat indices have no ONNX twin


@converts(aten.avg_pool2d.default, aten.avg_pool3d.default)
def avg_pool(ctx, node):
    args = node_arguments(node)
    if args.get("divisor_override") is not None:
        raise Unsupported("avg_pool with divisor_override")
    spatial = len(ctx.meta(node).shape) - 2
    kernel = _per_dim(args["kernel_size"], spatial)
    stride = _per_dim(args["stride"], spatial) if args["stride"] else kernel
    padding = _per_dim(args["padding"], spatial)
    return ctx.builder.op("AveragePool", [ctx.tensor(args["self"])], kernel_shape=kernel,
                          strides=stride, pads=padding + padding,
                          ceil_mode=int(bool(args["ceil_mode"])),
                          count_include_pad=int(bool(args["count_include_pad"])))


@converts(aten._adaptive_avg_pool2d.default)
def adaptive_avg_pool(ctx, node):
    args = node_arguments(node)
    source, out = ctx.meta(args["self"]), ctx.meta(node)
    x = ctx.tensor(args["self"])
    if all(d == 1 for d in out.shape[2:]):
        return ctx.builder.op("GlobalAveragePool", [x])
    sizes = list(zip(source.shape[2:], out.shape[2:]))
    if not all(isinstance(i, int) and i % o == 0 for i, o in sizes):
        raise Unsupported("adaptive pooling to a size that does not divide the input's")
    kernel = [i // o for i, o in sizes]
    return ctx.builder.op("AveragePool", [x], kernel_shape=kernel, strides=kernel)
