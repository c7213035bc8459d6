"""Shape and layout ops: the ones a ``Shape -> Gather -> Concat -> Reshape`` chain is made of.

Each takes :class:`Dims` as they are (``dims=True``) and returns ``Dims`` while every input is a
shape or a known constant, so such a chain never becomes int64 tensor arithmetic in the graph;
on real tensors they are the plain torch ops.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from fxforge.irgraph.onnx_dtypes import onnx_type, torch_dtype
from fxforge.irgraph.onnx_import.table import (Dims, NodeView, as_tensor, converter, normalize_axes,
                                               normalize_axis)


def known_list(node: NodeView, index: int, value: Any) -> Optional[list]:
    """The input's values as Python ints/SymInts when a shape or a known constant, else None."""
    if isinstance(value, Dims) or index in node.known:
        return node.values(index, value)
    return None


def rank_of(value: Any) -> int:
    return len(value.shape) if isinstance(value, Dims) else value.dim()


@converter("Shape", since=13, dims=True)
def shape(node: NodeView, x):
    dims = list(x.shape) if isinstance(x, Dims) else list(as_tensor(x).shape)
    rank = len(dims)
    start = node.attr("start", 0)
    end = node.attr("end", rank)
    start, end = (max(0, min(rank, v + rank if v < 0 else v)) for v in (start, end))
    return Dims(dims[start:end])


@converter("Size", since=13, dims=True)
def size(node: NodeView, x):
    total = 1
    for d in as_tensor(x).shape:
        total = total * d
    return Dims([total], scalar=True)


@converter("Gather", since=13, dims=True)
def gather(node: NodeView, data, indices):
    axis = node.attr("axis", 0)
    values, picks = known_list(node, 0, data), known_list(node, 1, indices)
    if values is not None and picks is not None and rank_of(data) == 1:
        index_rank = rank_of(indices) if isinstance(indices, (Dims, torch.Tensor)) else 0
        picked = [values[int(i)] for i in picks]
        return Dims(picked, scalar=index_rank == 0) if index_rank <= 1 else \
            torch.tensor(picked).reshape(as_tensor(indices).shape)
    data, indices = as_tensor(data), as_tensor(indices)
    axis = normalize_axis(axis, data.dim(), node)
    indices = torch.where(indices < 0, indices + data.shape[axis], indices)
    return torch.index_select(data, axis, indices.reshape(-1)).reshape(
        *data.shape[:axis], *indices.shape, *data.shape[axis + 1:])


@converter("Concat", since=13, dims=True)
def concat(node: NodeView, *parts):
    lists = [known_list(node, i, p) for i, p in enumerate(parts)]
    if all(v is not None for v in lists) and all(rank_of(p) <= 1 for p in parts):
        return Dims([v for values in lists for v in values])
    tensors = [as_tensor(p) for p in parts]
    return torch.cat(tensors, normalize_axis(node.attr("axis"), tensors[0].dim(), node))


@converter("Unsqueeze", since=13, dims=True)
def unsqueeze(node: NodeView, x, axes):
    axes = node.values(1, axes)
    if isinstance(x, Dims) and x.scalar and axes in ([0], [-1]):
        return Dims(x.values)
    x = as_tensor(x)
    rank = x.dim() + len(axes)
    for axis in sorted(normalize_axes(axes, rank, node)):
        x = x.unsqueeze(axis)
    return x


@converter("Squeeze", since=13, dims=True)
def squeeze(node: NodeView, x, axes=None):
    axes = node.values(1, axes)
    if isinstance(x, Dims) and len(x.values) == 1 and axes in (None, [0], [-1]):
        return Dims(x.values, scalar=True)
    x = as_tensor(x)
    if axes is None:
        return x.squeeze()
    return x.squeeze(tuple(normalize_axes(axes, x.dim(), node)))


@converter("Slice", since=13, dims=True)
def slice_(node: NodeView, x, starts, ends, axes=None, steps=None):
    starts, ends = node.values(1, starts), node.values(2, ends)
    axes = node.values(3, axes) or list(range(len(starts)))
    steps = node.values(4, steps) or [1] * len(starts)
    values = known_list(node, 0, x)
    if values is not None and rank_of(x) == 1:
        (start, end, step), = [(starts[0], ends[0], steps[0])]
        return Dims(values[slice(*_python_slice(start, end, step, len(values)))])
    x = as_tensor(x)
    for start, end, axis, step in zip(starts, ends, normalize_axes(axes, x.dim(), node), steps):
        start, end, step = _python_slice(start, end, step, x.shape[axis])
        if step > 0:
            x = x[(slice(None),) * axis + (slice(start, end, step),)]
        else:   # torch slices forward only: pick the indices
            picks = torch.arange(start, -1 if end is None else end, step, device=x.device)
            x = x.index_select(axis, picks)
    return x


_BIG = 2**62


def _python_slice(start, end, step, size) -> tuple:
    """ONNX's clamped start/end as Python slice bounds (INT_MAX-style ends allowed)."""
    if step == 0:
        raise ValueError("Slice: a step of 0")
    if isinstance(start, int) and start >= _BIG:
        start = size
    if isinstance(end, int) and end >= _BIG:
        end = size
    if isinstance(end, int) and end <= -_BIG:
        end = None if step < 0 else 0
    if isinstance(start, int) and start <= -_BIG:
        start = 0
    if step > 0:
        return (_clamp(start, size, 0), _clamp(end, size, 0), step)
    start = _clamp(start, size, -1, upper=size - 1)
    end = None if end is None else _clamp(end, size, -1, upper=size - 1)
    return (start, end, step)


def _clamp(value, size, low, upper=None):
    upper = size if upper is None else upper
    if isinstance(value, int) and isinstance(size, int):
        value = value + size if value < 0 else value
        return max(low, min(upper, value))
    return torch.sym_max(low, torch.sym_min(upper, value + size if value < 0 else value))


@converter("Reshape", since=13, dims=True)
def reshape(node: NodeView, x, shape):
    target = node.values(1, shape)
    if isinstance(x, Dims) and len(target) == 1 and target[0] in (-1, len(x.values)):
        return Dims(x.values, dtype=x.dtype)
    x = as_tensor(x)
    allow_zero = node.attr("allowzero", 0)
    out = [x.shape[i] if (isinstance(d, int) and d == 0 and not allow_zero) else d
           for i, d in enumerate(target)]
    return x.reshape(out)


@converter("Flatten", since=13)
def flatten(node: NodeView, x):
    axis = node.attr("axis", 1)
    axis = axis + x.dim() if axis < 0 else axis
    lead = 1
    for d in x.shape[:axis]:
        lead = lead * d
    return x.reshape(lead, -1) if x.numel() or lead else x.reshape(lead, 0)


@converter("Expand", since=13, dims=True)
def expand(node: NodeView, x, shape):
    target = node.values(1, shape)
    x = as_tensor(x)
    rank = max(len(target), x.dim())
    target = [1] * (rank - len(target)) + list(target)
    have = [1] * (rank - x.dim()) + list(x.shape)
    out = [h if (isinstance(t, int) and t == 1) else t for h, t in zip(have, target)]
    return x.reshape(have).expand(out)


@converter("ConstantOfShape", since=9, dims=True)
def constant_of_shape(node: NodeView, shape):
    dims = node.values(0, shape)
    value = node.attr("value")
    if value is None:
        return torch.zeros(dims, dtype=torch.float32)
    if len(dims) == 1 and isinstance(dims[0], int) and value.dtype == torch.int64:
        return Dims([int(value.reshape(()))] * dims[0])   # a shape-sized vector of a constant
    return value.reshape(()).expand(dims).clone()


@converter("Range", since=11, dims=True)
def range_(node: NodeView, start, limit, delta):
    values = [node.scalar(i, v) for i, v in enumerate((start, limit, delta))]
    dtype = as_tensor(start).dtype if not isinstance(start, Dims) else torch.int64
    return torch.arange(*values, dtype=dtype)


@converter("Cast", since=13, dims=True)
def cast(node: NodeView, x):
    dtype = torch_dtype(node.attr("to"), f"{node.label()}'s target type")
    if isinstance(x, Dims) and dtype == torch.int64:
        return x
    x = as_tensor(x)
    if dtype == torch.bool:
        return x != 0
    if x.dtype.is_floating_point and not dtype.is_floating_point:
        x = x.trunc()    # ONNX casts float -> int by truncation; torch's .to does the same
    return x.to(dtype)


@converter("CastLike", since=15, dims=True)
def cast_like(node: NodeView, x, like):
    view = NodeView("Cast", node.name, node.domain, node.opset,
                    {"to": onnx_type(as_tensor(like).dtype)}, 1)
    return cast(view, x)


@converter("Identity", since=13, dims=True)
def identity(node: NodeView, x):
    return x


@converter("Transpose", since=13)
def transpose(node: NodeView, x):
    perm = node.attr("perm") or list(range(x.dim()))[::-1]
    return x.permute(perm)


@converter("Constant", since=13)
def constant(node: NodeView):
    for name, make in (("value", lambda v: v),
                       ("value_float", lambda v: torch.tensor(v, dtype=torch.float32)),
                       ("value_floats", lambda v: torch.tensor(v, dtype=torch.float32)),
                       ("value_int", lambda v: torch.tensor(v, dtype=torch.int64)),
                       ("value_ints", lambda v: torch.tensor(v, dtype=torch.int64))):
        if node.attr(name) is not None:
            return make(node.attr(name))
    raise ValueError(f"{node.label()}: no value attribute fxforge imports (sparse and string "
                     "constants are not imported)")
