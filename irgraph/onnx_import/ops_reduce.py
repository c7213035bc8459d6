"""Reductions. From opset 18 (ReduceSum from 13) the axes are an input, before an attribute."""
from __future__ import annotations

from typing import Callable

import torch

from fxforge.irgraph.onnx_import.table import NodeView, converter, normalize_axes


def _sum_square(x, dims, keep):
    return (x * x).sum(dims, keepdim=keep)


def _log_sum(x, dims, keep):
    return torch.log(x.sum(dims, keepdim=keep))


REDUCE: dict[str, Callable] = {
    "ReduceSum": lambda x, d, k: x.sum(d, keepdim=k),
    "ReduceMean": lambda x, d, k: x.mean(d, keepdim=k),
    "ReduceMax": lambda x, d, k: x.amax(d, keepdim=k),
    "ReduceMin": lambda x, d, k: x.amin(d, keepdim=k),
    "ReduceProd": lambda x, d, k: _prod(x, d, k),
    "ReduceL1": lambda x, d, k: x.abs().sum(d, keepdim=k),
    "ReduceL2": lambda x, d, k: torch.sqrt(_sum_square(x, d, k)),
    "ReduceSumSquare": _sum_square,
    "ReduceLogSum": _log_sum,
    "ReduceLogSumExp": lambda x, d, k: torch.logsumexp(x, d, keepdim=k),
}
AXES_INPUT_SINCE = {"ReduceSum": 13}   # the others: 18


def _prod(x, dims, keep):
    for d in sorted(dims, reverse=True):
        x = x.prod(d, keepdim=keep)
    return x


def _reduce(fn: Callable, axes_from_input: bool):
    def convert(node: NodeView, x, axes=None):
        if axes_from_input:
            axes = node.values(1, axes)
        else:
            axes = node.attr("axes")
        keep = bool(node.attr("keepdims", 1))
        if not axes:
            if node.attr("noop_with_empty_axes", 0):
                return x
            axes = list(range(x.dim()))
        if x.dim() == 0:
            return fn(x.reshape(1), [0], False)
        return fn(x, normalize_axes(axes, x.dim(), node), keep)
    return convert


for _op, _fn in REDUCE.items():
    _since = AXES_INPUT_SINCE.get(_op, 18)
    if _since > 13:
        converter(_op, since=13, until=_since - 1)(_reduce(_fn, False))
    converter(_op, since=_since)(_reduce(_fn, True))


def _arg(fn: Callable):
    def convert(node: NodeView, x):
        axis = node.attr("axis", 0)
        keep = bool(node.attr("keepdims", 1))
        if node.attr("select_last_index", 0):
            flipped = x.flip(axis)
            return x.shape[axis] - 1 - fn(flipped, axis, keepdim=keep)
        return fn(x, axis, keepdim=keep)
    return convert


converter("ArgMax", since=13)(_arg(torch.argmax))
converter("ArgMin", since=13)(_arg(torch.argmin))
