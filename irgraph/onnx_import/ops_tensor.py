"""Tensor ops: splitting, tiling, padding, triangles, gathers/scatters, top-k, scans, one-hot.

Index inputs follow ONNX: negative indices count from the end of their axis, so each gather and
scatter wraps them with :func:`wrap_index` before the torch op (which would read them as out of
range or, for ``index_put``, wrap them itself only on some paths).
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from fxforge.irgraph.onnx_dtypes import torch_dtype
from fxforge.irgraph.onnx_import.table import NodeView, converter, normalize_axes, normalize_axis


def wrap_index(index: torch.Tensor, size: Any) -> torch.Tensor:
    return torch.where(index < 0, index + size, index)


def outputs(node: NodeView, *values: Any) -> Any:
    """The converter's result for the node's declared outputs: the program stores a one-output
    node's result as it is, so a tuple must only be returned for two or more."""
    values = values[:max(node.num_outputs, 1)]
    return values[0] if len(values) == 1 else values


@converter("Split", since=13)
def split(node: NodeView, x, sizes=None):
    # One converter for 13 and 18: 18 only adds num_outputs, whose ceil-sized chunks are what an
    # equal split into the node's outputs is at 13 (where the size must divide evenly).
    axis = normalize_axis(node.attr("axis", 0), x.dim(), node)
    sizes = node.values(1, sizes)
    if sizes is None:
        count = node.attr("num_outputs", node.num_outputs)
        chunk = (x.shape[axis] + count - 1) // count
        sizes = [chunk] * (count - 1) + [x.shape[axis] - chunk * (count - 1)]
    return outputs(node, *torch.split(x, sizes, axis))


@converter("Tile", since=13)
def tile(node: NodeView, x, repeats):
    return x.repeat(node.values(1, repeats))


PAD_MODES = ("constant", "reflect", "edge", "wrap")


@converter("Pad", since=13)
def pad(node: NodeView, x, pads, value=None, axes=None):
    # Axes (an input from 18) default to all; pads are [begin of each axis..., end of each...].
    pads = node.values(1, pads)
    axes = node.values(3, axes)
    axes = normalize_axes(axes, x.dim(), node) if axes is not None else list(range(x.dim()))
    begins, ends = pads[:len(axes)], pads[len(axes):]
    mode = node.attr("mode", "constant")
    if mode not in PAD_MODES:
        raise ValueError(f"{node.label()}: attribute mode={mode!r} is not one of {PAD_MODES}")
    if mode == "constant":
        fill = node.scalar(2, value) if value is not None else 0
        spec = [0] * (2 * x.dim())
        for axis, begin, end in zip(axes, begins, ends):
            spec[2 * (x.dim() - 1 - axis)] = begin        # F.pad lists the last axis first
            spec[2 * (x.dim() - 1 - axis) + 1] = end
        return torch.nn.functional.pad(x, spec, value=fill)
    # The other modes pick source indices along each axis: torch's own reflect/replicate pads
    # only cover the last 1-3 axes of a batched tensor, and wrap has none.
    for axis, begin, end in zip(axes, begins, ends):
        if begin or end:
            size = x.shape[axis]
            index = torch.arange(-begin, size + end, device=x.device)
            x = x.index_select(axis, _PAD_INDEX[mode](index, size))
    return x


def _reflect(index: torch.Tensor, size: Any) -> torch.Tensor:
    period = max(2 * (size - 1), 1)
    index = index.abs() % period
    return torch.where(index >= size, period - index, index)


_PAD_INDEX: dict[str, Callable] = {
    "reflect": _reflect,
    "edge": lambda index, size: index.clamp(0, size - 1),
    "wrap": lambda index, size: index % size,
}


@converter("Trilu", since=14)
def trilu(node: NodeView, x, k=None):
    k = node.scalar(1, k) if k is not None else 0
    return torch.triu(x, k) if node.attr("upper", 1) else torch.tril(x, k)


SCATTER_REDUCE = {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}


def _reduction(node: NodeView) -> str:
    reduction = node.attr("reduction", "none")
    if reduction != "none" and reduction not in SCATTER_REDUCE:
        raise ValueError(f"{node.label()}: attribute reduction={reduction!r} is not one of none, "
                         f"{', '.join(SCATTER_REDUCE)}")
    return reduction


@converter("ScatterElements", since=13)
def scatter_elements(node: NodeView, data, indices, updates):
    axis = normalize_axis(node.attr("axis", 0), data.dim(), node)
    indices = wrap_index(indices, data.shape[axis])
    reduction = _reduction(node)
    if reduction == "none":
        return data.scatter(axis, indices, updates)
    return data.scatter_reduce(axis, indices, updates, SCATTER_REDUCE[reduction])


@converter("ScatterND", since=13)
def scatter_nd(node: NodeView, data, indices, updates):
    # The first k axes of data are addressed by k-tuples: flatten them to one axis and the
    # tuples to row numbers, so every reduction is one index_put / scatter_reduce on rows.
    k = indices.shape[-1]
    lead, rest = data.shape[:k], data.shape[k:]
    rows = torch.zeros(indices.shape[:-1], dtype=torch.int64, device=data.device)
    for axis in range(k):
        rows = rows * lead[axis] + wrap_index(indices[..., axis], lead[axis])
    flat = data.reshape(-1, *rest)
    rows = rows.reshape(-1)
    values = updates.reshape(-1, *rest)
    reduction = _reduction(node)
    if reduction == "none":
        out = flat.index_put((rows,), values)
    else:
        index = rows.reshape(-1, *([1] * len(rest))).expand(values.shape)
        out = flat.scatter_reduce(0, index, values, SCATTER_REDUCE[reduction])
    return out.reshape(data.shape)


@converter("GatherElements", since=13)
def gather_elements(node: NodeView, data, indices):
    axis = normalize_axis(node.attr("axis", 0), data.dim(), node)
    return torch.gather(data, axis, wrap_index(indices, data.shape[axis]))


@converter("GatherND", since=13)
def gather_nd(node: NodeView, data, indices):
    batch = node.attr("batch_dims", 0)
    k = indices.shape[-1]
    batch_shape = data.shape[:batch]
    flat_data = data.reshape(-1, *data.shape[batch:])
    flat_index = indices.reshape(flat_data.shape[0], -1, k)
    picks = [torch.arange(flat_data.shape[0], device=data.device).reshape(-1, 1)]
    picks += [wrap_index(flat_index[..., i], flat_data.shape[1 + i]) for i in range(k)]
    out = flat_data[tuple(picks)]
    return out.reshape(*batch_shape, *indices.shape[batch:-1], *data.shape[batch + k:])


@converter("TopK", since=13)
def top_k(node: NodeView, x, k):
    axis = normalize_axis(node.attr("axis", -1), x.dim(), node)
    values, indices = torch.topk(x, int(node.scalar(1, k)), axis,
                                 largest=bool(node.attr("largest", 1)),
                                 sorted=bool(node.attr("sorted", 1)))
    return outputs(node, values, indices)


def _scan(fn: Callable, identity: int):
    def convert(node: NodeView, x, axis):
        axis = normalize_axis(int(node.scalar(1, axis)), x.dim(), node)
        if node.attr("reverse", 0):
            x = x.flip(axis)
        out = fn(x, axis)
        if node.attr("exclusive", 0):
            # Shift by one (not out - x, which rounds differently from ONNX Runtime's sum).
            first = torch.full_like(x.narrow(axis, 0, 1), identity)
            out = torch.cat([first, out.narrow(axis, 0, x.shape[axis] - 1)], axis)
        return out.flip(axis) if node.attr("reverse", 0) else out
    return convert


converter("CumSum", since=13)(_scan(torch.cumsum, 0))
converter("CumProd", since=26)(_scan(torch.cumprod, 1))


@converter("Einsum", since=13)
def einsum(node: NodeView, *xs):
    return torch.einsum(node.attr("equation").replace(" ", ""), *xs)


@converter("OneHot", since=13)
def one_hot(node: NodeView, indices, depth, values):
    depth = int(node.scalar(1, depth))
    axis = normalize_axis(node.attr("axis", -1), indices.dim() + 1, node)
    indices = wrap_index(indices.to(torch.int64), depth).unsqueeze(axis)
    shape = [1] * indices.dim()
    shape[axis] = depth
    hot = indices == torch.arange(depth, device=indices.device).reshape(shape)
    return torch.where(hot, values[1], values[0])


@converter("EyeLike", since=13)
def eye_like(node: NodeView, x):
    dtype = torch_dtype(node.attr("dtype"), node.label()) if node.attr("dtype") is not None \
        else x.dtype
    rows = torch.arange(x.shape[0], device=x.device).reshape(-1, 1)
    cols = torch.arange(x.shape[1], device=x.device).reshape(1, -1)
    return (cols - rows == node.attr("k", 0)).to(dtype)


@converter("Shrink", since=13)
def shrink(node: NodeView, x):
    bias, lambd = node.attr("bias", 0.0), node.attr("lambd", 0.5)
    zero = torch.zeros_like(x)
    return torch.where(x < -lambd, x + bias, torch.where(x > lambd, x - bias, zero)).to(x.dtype)


@converter("Det", since=13)
def det(node: NodeView, x):
    return torch.linalg.det(x)


@converter("ReverseSequence", since=13)
def reverse_sequence(node: NodeView, x, lengths):
    time, batch = node.attr("time_axis", 0), node.attr("batch_axis", 1)
    shape = [1] * x.dim()
    shape[time] = x.shape[time]
    steps = torch.arange(x.shape[time], device=x.device).reshape(shape)
    shape = [1] * x.dim()
    shape[batch] = x.shape[batch]
    lengths = lengths.to(torch.int64).reshape(shape)
    # Within its length a sequence reads backwards; past it, in place.
    source = torch.where(steps < lengths, lengths - 1 - steps, steps)
    return torch.gather(x, time, source.expand(x.shape))


@converter("BitShift", since=13)
def bit_shift(node: NodeView, x, y):
    direction = node.attr("direction")
    if direction not in ("LEFT", "RIGHT"):
        raise ValueError(f"{node.label()}: attribute direction={direction!r} is not LEFT or RIGHT")
    fn = torch.bitwise_left_shift if direction == "LEFT" else torch.bitwise_right_shift
    return fn(x, y)


@converter("NonZero", since=13)
def non_zero(node: NodeView, x):
    # Its length depends on the data: eager runs it, dynamo breaks its graph there.
    return torch.nonzero(x).t()


@converter("Compress", since=13)
def compress(node: NodeView, x, condition):
    axis = node.attr("axis")
    if axis is None:
        x, axis = x.reshape(-1), 0
    axis = normalize_axis(axis, x.dim(), node)
    picks = torch.nonzero(condition.reshape(-1)).reshape(-1)   # data dependent, as NonZero
    return x.index_select(axis, picks)


@converter("Unique", since=13)
def unique(node: NodeView, x):
    axis = node.attr("axis")
    if axis is None:
        x, dim = x.reshape(-1), None
    else:
        dim = normalize_axis(axis, x.dim(), node)
    values, inverse, counts = torch.unique(x, sorted=True, return_inverse=True,
                                           return_counts=True, dim=dim)
    positions = torch.arange(inverse.numel(), device=x.device)
    first = torch.full((counts.numel(),), inverse.numel(), dtype=torch.int64, device=x.device)
    first = first.scatter_reduce(0, inverse, positions, "amin")
    if not node.attr("sorted", 1):
        # Unsorted: in the order of first occurrence, the inverse renumbered to match.
        order = torch.argsort(first)
        rank = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel()))
        values = values.index_select(0 if dim is None else dim, order)
        first, counts, inverse = first[order], counts[order], rank[inverse]
    return outputs(node, values, first, inverse, counts)
