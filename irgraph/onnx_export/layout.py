"""Layout, indexing and factory ops: views, slices, concatenation, gathers, ``arange``/``full``.

Target shapes are read from the node's output metadata rather than from the op's size list:
the metadata already has ``-1`` resolved and symbolic sizes as expressions (:mod:`.dims`).
"""
from __future__ import annotations

import operator

import torch

from fxforge.irgraph.graph import node_arguments
from fxforge.irgraph.meta import META_KEY
from fxforge.irgraph.onnx_dtypes import tensor_proto
from fxforge.irgraph.onnx_export.table import Unsupported, converts
from fxforge.irgraph.views import (Arange, Cat, Expand, Full, Permute, Select, Slice, Split,
                                   Squeeze, Transpose, Unsqueeze, View)

aten = torch.ops.aten
INT64_MAX = 2**63 - 1


@converts(aten.view.default, aten._unsafe_view.default, aten.reshape.default)
def reshape(ctx, node):
    meta = ctx.meta(node)
    allowzero = 1 if 0 in meta.shape else None   # a real 0-size, not "copy the input's size"
    shape = ctx.dims.shape(meta.shape, infer_one=allowzero is None)
    return ctx.builder.op("Reshape", [ctx.tensor(View.of(node).input), shape], allowzero=allowzero)


@converts(aten.permute.default)
def permute(ctx, node):
    view = Permute.of(node)
    rank = ctx.meta(node).rank
    return ctx.builder.op("Transpose", [ctx.tensor(view.input)], perm=[d % rank for d in view.dims])


@converts(aten.transpose.int)
def transpose(ctx, node):
    view = Transpose.of(node)
    rank = ctx.meta(node).rank
    perm = list(range(rank))
    a, b = view.dim0 % rank, view.dim1 % rank
    perm[a], perm[b] = perm[b], perm[a]
    return ctx.builder.op("Transpose", [ctx.tensor(view.input)], perm=perm)


@converts(aten.t.default)
def matrix_transpose(ctx, node):
    perm = [1, 0] if ctx.meta(node).rank == 2 else [0]
    return ctx.builder.op("Transpose", [ctx.tensor(node.all_input_nodes[0])], perm=perm)


@converts(aten.expand.default)
def expand(ctx, node):
    """Expand broadcasts both ways, so a size the input already has is given as 1: only the
    sizes that really grow are computed."""
    view = Expand.of(node)
    out, source = ctx.meta(node), ctx.meta(view.input)
    offset = out.rank - source.rank
    dims = [1 if i >= offset and source.shape[i - offset] == d else d
            for i, d in enumerate(out.shape)]
    return ctx.builder.op("Expand", [ctx.tensor(view.input), ctx.dims.shape(dims)])


@converts(aten.unsqueeze.default)
def unsqueeze(ctx, node):
    view = Unsqueeze.of(node)
    return ctx.builder.unsqueeze(ctx.tensor(view.input), [view.dim % ctx.meta(node).rank])


@converts(*Squeeze.TARGETS)
def squeeze(ctx, node):
    view = Squeeze.of(node)
    source = ctx.meta(view.input)
    named = view.squeezed(source.rank)
    axes = [d for d in (named if named is not None else range(source.rank)) if source.shape[d] == 1]
    x = ctx.tensor(view.input)
    return ctx.builder.squeeze(x, axes) if axes else ctx.builder.op("Identity", [x])


@converts(aten.slice.Tensor)
def slice_(ctx, node):
    view = Slice.of(node)
    rank = ctx.meta(view.input).rank
    start = 0 if view.start is None else ctx.dims.argument(view.start)
    end = INT64_MAX if view.end is None else ctx.dims.argument(view.end)
    end = min(end, INT64_MAX) if isinstance(end, int) else end
    dims = ctx.dims
    return ctx.builder.op("Slice", [ctx.tensor(view.input), dims.value(start), dims.value(end),
                                    ctx.builder.ints([view.dim % rank]),
                                    ctx.builder.ints([view.step])])


@converts(aten.select.int)
def select(ctx, node):
    view = Select.of(node)
    rank = ctx.meta(view.input).rank
    index = ctx.dims.scalar(ctx.dims.argument(view.index))
    return ctx.builder.op("Gather", [ctx.tensor(view.input), index], axis=view.dim % rank)


@converts(aten.cat.default)
def cat(ctx, node):
    view = Cat.of(node)
    meta = ctx.meta(node)
    parts = [t for t in view.tensors if ctx.meta(t).rank == meta.rank]   # legacy empty 1-D: none
    return ctx.builder.op("Concat", [ctx.tensor(t, meta.dtype) for t in parts],
                          axis=view.dim % meta.rank)


@converts(*Split.TARGETS)
def split(ctx, node):
    view = Split.of(node)
    metas = node.meta[META_KEY]
    rank = metas[0].rank
    axis = view.dim % rank
    sizes = ctx.dims.shape([m.shape[axis] for m in metas])
    parts = ctx.builder.op("Split", [ctx.tensor(view.input), sizes], outputs=len(metas), axis=axis)
    return tuple(parts) if isinstance(parts, list) else (parts,)


@converts(operator.getitem)
def getitem(ctx, node):
    source, index = node.args   # operator.getitem has no schema: (container, index)
    value = ctx.values.get(source)
    if not isinstance(value, tuple):
        raise Unsupported(f"getitem of {source.name}, which is not a tuple of tensors")
    if value[index] is None:
        raise Unsupported(f"output {index} of {source.name} has no ONNX counterpart")
    return value[index]


@converts(aten.embedding.default)
def embedding(ctx, node):
    args = node_arguments(node)
    return ctx.builder.op("Gather", [ctx.tensor(args["weight"]), ctx.tensor(args["indices"])], axis=0)


@converts(aten.index_select.default)
def index_select(ctx, node):
    args = node_arguments(node)
    axis = args["dim"] % max(ctx.meta(node).rank, 1)
    return ctx.builder.op("Gather", [ctx.tensor(args["self"]), ctx.tensor(args["index"], torch.int64)],
                          axis=axis)


@converts(aten.gather.default)
def gather(ctx, node):
    args = node_arguments(node)
    axis = args["dim"] % max(ctx.meta(node).rank, 1)
    return ctx.builder.op("GatherElements", [ctx.tensor(args["self"]),
                                             ctx.tensor(args["index"], torch.int64)], axis=axis)


@converts(aten.index.Tensor)
def index(ctx, node):
    """Advanced indexing: one index tensor at dim d is a Gather; index tensors on the leading
    dims are broadcast together and stacked for GatherND."""
    args = node_arguments(node)
    indices = list(args["indices"])
    given = [i for i, t in enumerate(indices) if t is not None]
    data = ctx.tensor(args["self"])
    if len(given) == 1:
        return ctx.builder.op("Gather", [data, ctx.tensor(indices[given[0]], torch.int64)],
                              axis=given[0])
    if given != list(range(len(given))):
        raise Unsupported("index tensors on dims that are not the leading ones")
    b = ctx.builder
    names = [ctx.tensor(indices[i], torch.int64) for i in given]
    zeros = b.op("Mul", [names[0], b.const(0, torch.int64)])
    for name in names[1:]:   # the broadcast shape of all indices, as zeros
        zeros = b.op("Add", [zeros, b.op("Mul", [name, b.const(0, torch.int64)])])
    stacked = [b.unsqueeze(b.op("Add", [name, zeros]), [-1]) for name in names]
    return b.op("GatherND", [data, b.op("Concat", stacked, axis=-1)])


@converts(*Arange.TARGETS)
def arange(ctx, node):
    view = Arange.of(node)
    dtype = ctx.meta(node).dtype
    return ctx.builder.op("Range", [_bound(ctx, v, dtype) for v in (view.start, view.end, view.step)])


def _bound(ctx, value, dtype: torch.dtype) -> str:
    """An arange bound as a 0-D tensor of the result's dtype (Range wants all three alike)."""
    if isinstance(value, float):
        if not dtype.is_floating_point:
            raise Unsupported("a float bound for an integer arange")
        return ctx.builder.const(value, dtype)
    return ctx.tensor(ctx.dims.argument(value), dtype)


@converts(aten.full.default)
def full(ctx, node):
    view = Full.of(node)
    meta = ctx.meta(node)
    return _filled(ctx, ctx.dims.shape(meta.shape), view.fill_value, meta.dtype)


@converts(aten.full_like.default)
def full_like(ctx, node):
    args = node_arguments(node)
    meta = ctx.meta(node)
    shape = ctx.builder.op("Shape", [ctx.tensor(args["self"])])
    return _filled(ctx, shape, args["fill_value"], meta.dtype)


@converts(aten.scalar_tensor.default)
def scalar_tensor(ctx, node):
    args = node_arguments(node)
    return ctx.builder.op("Identity", [ctx.tensor(args["s"], ctx.meta(node).dtype)])


def _filled(ctx, shape: str, value, dtype: torch.dtype) -> str:
    fill = tensor_proto("value", torch.tensor([value], dtype=dtype))
    return ctx.builder.op("ConstantOfShape", [shape], value=fill)


@converts(aten.constant_pad_nd.default)
def constant_pad(ctx, node):
    """torch pads the last dims first, (begin, end) pairs; ONNX takes all begins then all ends."""
    args = node_arguments(node)
    rank = ctx.meta(node).rank
    pad = list(args["pad"])
    begins, ends = [0] * rank, [0] * rank
    for i in range(len(pad) // 2):
        begins[rank - 1 - i], ends[rank - 1 - i] = pad[2 * i], pad[2 * i + 1]
    dtype = ctx.meta(node).dtype
    return ctx.builder.op("Pad", [ctx.tensor(args["self"]), ctx.builder.ints(begins + ends),
                                  ctx.tensor(args.get("value", 0), dtype)], mode="constant")
