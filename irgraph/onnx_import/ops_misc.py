"""The rest: gated activations (``Swish``, ``SwiGLU``), the KV-cache write ``TensorScatter``,
``CenterCropPad``, the signal windows and the two classification losses."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fxforge.irgraph.onnx_dtypes import torch_dtype
from fxforge.irgraph.onnx_import.ops_tensor import outputs
from fxforge.irgraph.onnx_import.table import NodeView, converter, normalize_axes, normalize_axis


def _swish(node: NodeView, x: torch.Tensor) -> torch.Tensor:
    alpha = node.attr("alpha", 1.0)
    return F.silu(x) if alpha == 1.0 else x * torch.sigmoid(alpha * x)


@converter("Swish", since=24)
def swish(node: NodeView, x):
    return _swish(node, x)


@converter("SwiGLU", since=28)
def swiglu(node: NodeView, gate, value):
    return _swish(node, gate) * value


@converter("TensorScatter", since=24)
def tensor_scatter(node: NodeView, cache, update, write_indices=None):
    # Rows of the cache along ``axis`` are overwritten from per-sample start positions: as a
    # scatter of the update along that axis, its index built from the positions.
    axis = normalize_axis(node.attr("axis", -2), cache.dim(), node)
    mode = node.attr("mode", "linear")
    if mode not in ("linear", "circular"):
        raise ValueError(f"{node.label()}: attribute mode={mode!r} is not linear or circular")
    shape = [1] * cache.dim()
    shape[axis] = update.shape[axis]
    index = torch.arange(update.shape[axis], device=cache.device).reshape(shape)
    if write_indices is not None:
        index = index + write_indices.to(torch.int64).reshape(-1, *([1] * (cache.dim() - 1)))
    if mode == "circular":
        index = index % cache.shape[axis]
    return cache.scatter(axis, index.expand(update.shape), update)


@converter("CenterCropPad", since=18)
def center_crop_pad(node: NodeView, x, shape):
    target = node.values(1, shape)
    axes = normalize_axes(node.attr("axes") or range(x.dim()), x.dim(), node)
    for axis, size in zip(axes, target):
        have = x.shape[axis]
        if have > size:    # crop: the window starts rounded down
            x = x.narrow(axis, (have - size) // 2, size)
        elif have < size:  # pad: the odd pixel goes on the right
            before = (size - have) // 2
            spec = [0, 0] * (x.dim() - 1 - axis) + [before, size - have - before]
            x = F.pad(x, spec)
    return x


# Window -> its cosine terms' coefficients a_k in sum_k (-1)^k a_k cos(2 pi k n / N).
WINDOWS = {
    "HannWindow": (0.5, 0.5),
    "HammingWindow": (25 / 46, 21 / 46),
    "BlackmanWindow": (0.42, 0.5, 0.08),
}


def _window(coefficients: tuple):
    def convert(node: NodeView, size):
        length = int(node.scalar(0, size))
        period = length if node.attr("periodic", 1) else length - 1
        n = torch.arange(length, dtype=torch.float64)
        out = torch.zeros(length, dtype=torch.float64)
        for k, a in enumerate(coefficients):
            out = out + (-1) ** k * a * torch.cos(2 * math.pi * k * n / period)
        return out.to(torch_dtype(node.attr("output_datatype", 1), node.label()))
    return convert


for _op, _coefficients in WINDOWS.items():
    converter(_op, since=17)(_window(_coefficients))


def _loss_args(node: NodeView) -> dict:
    reduction = node.attr("reduction", "mean")
    if reduction not in ("none", "sum", "mean"):
        raise ValueError(f"{node.label()}: attribute reduction={reduction!r} is not none, sum "
                         "or mean")
    # ONNX has no default ignore_index; torch's -100 cannot be a class index either.
    return {"reduction": reduction, "ignore_index": node.attr("ignore_index", -100)}


@converter("NegativeLogLikelihoodLoss", since=13)
def nll_loss(node: NodeView, x, target, weight=None):
    return F.nll_loss(x, target.to(torch.int64), weight, **_loss_args(node))


@converter("SoftmaxCrossEntropyLoss", since=13)
def softmax_cross_entropy(node: NodeView, scores, labels, weight=None):
    log_prob = torch.log_softmax(scores, 1)
    loss = F.nll_loss(log_prob, labels.to(torch.int64), weight, **_loss_args(node))
    return outputs(node, loss, log_prob)
