"""Normalizations. Where the ONNX op is a torch op with the same statistics (LayerNormalization
over trailing axes with a full-shape scale, RMSNormalization likewise, BatchNormalization at
inference), it maps onto it, so the IR holds the ops fxforge's passes match (``native_layer_norm``,
``rms_norm``); the rest are written out with ``mean``/``var``.

``stash_type`` (the precision of the statistics) is honoured by computing them in float32 for
low-precision inputs when it is 1 (its default), which is also what torch's CPU norms do.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from fxforge.irgraph.onnx_import.ops_tensor import outputs
from fxforge.irgraph.onnx_import.table import NodeView, converter, normalize_axes, normalize_axis


def _stash(node: NodeView, x: torch.Tensor) -> torch.Tensor:
    stash = node.attr("stash_type", 1)
    if stash == 1 and x.dtype in (torch.float16, torch.bfloat16):
        return x.float()
    return x


@converter("BatchNormalization", since=13)
def batch_norm(node: NodeView, x, scale, bias, mean, var):
    if node.attr("training_mode", 0):
        raise ValueError(f"{node.label()}: training_mode=1 is not imported (fxforge compiles "
                         "for inference; export the model in eval mode)")
    return F.batch_norm(x, mean, var, scale, bias, False, 0.0, node.attr("epsilon", 1e-5))


def _moments(x: torch.Tensor, axes: list[int]):
    mean = x.mean(axes, keepdim=True)
    return mean, ((x - mean) ** 2).mean(axes, keepdim=True)


def _channel(v: torch.Tensor, rank: int) -> torch.Tensor:
    return v.reshape(1, -1, *([1] * (rank - 2)))


@converter("InstanceNormalization", since=13)
def instance_norm(node: NodeView, x, scale, bias):
    axes = list(range(2, x.dim()))
    mean, var = _moments(x, axes)
    y = (x - mean) / torch.sqrt(var + node.attr("epsilon", 1e-5))
    return y * _channel(scale, x.dim()) + _channel(bias, x.dim())


@converter("LayerNormalization", since=17)
def layer_norm(node: NodeView, x, scale, bias=None):
    axis = normalize_axis(node.attr("axis", -1), x.dim(), node)
    eps = node.attr("epsilon", 1e-5)
    shape = tuple(x.shape[axis:])
    if node.num_outputs == 1 and tuple(scale.shape) == shape and \
            (bias is None or tuple(bias.shape) == shape):
        return F.layer_norm(x, shape, scale, bias, eps)
    # Broadcast scale/bias, or the Mean/InvStdDev outputs asked for: written out.
    stats = _stash(node, x)
    mean, var = _moments(stats, list(range(axis, x.dim())))
    inv_std = torch.rsqrt(var + eps)
    y = ((stats - mean) * inv_std).to(x.dtype) * scale
    if bias is not None:
        y = y + bias
    return outputs(node, y, mean, inv_std)


@converter("RMSNormalization", since=23)
def rms_norm(node: NodeView, x, scale):
    axis = normalize_axis(node.attr("axis", -1), x.dim(), node)
    eps = node.attr("epsilon", 1e-5)
    shape = tuple(x.shape[axis:])
    if tuple(scale.shape) == shape:
        return F.rms_norm(x, shape, scale, eps)
    stats = _stash(node, x)
    axes = list(range(axis, x.dim()))
    y = stats * torch.rsqrt((stats * stats).mean(axes, keepdim=True) + eps)
    return y.to(x.dtype) * scale


@converter("GroupNormalization", since=21)
def group_norm(node: NodeView, x, scale, bias):
    # Opset 21's per-channel scale and bias; opset 18's per-group version is deprecated, and
    # the ONNX checker fxforge runs refuses models using it.
    groups = node.attr("num_groups")
    stats = _stash(node, x).reshape(x.shape[0], groups, -1)
    mean, var = _moments(stats, [2])
    y = ((stats - mean) / torch.sqrt(var + node.attr("epsilon", 1e-5))).reshape(x.shape)
    return y.to(x.dtype) * _channel(scale, x.dim()) + _channel(bias, x.dim())


@converter("LpNormalization", since=13)
def lp_normalization(node: NodeView, x):
    p = node.attr("p", 2)
    if p not in (1, 2):
        raise ValueError(f"{node.label()}: attribute p={p} is not 1 or 2")
    axis = node.attr("axis", -1)
    norm = x.abs().sum(axis, keepdim=True) if p == 1 else \
        torch.sqrt((x * x).sum(axis, keepdim=True))
    return x / norm


@converter("MeanVarianceNormalization", since=13)
def mean_variance_normalization(node: NodeView, x):
    # ONNX's function body: (X - E[X]) / (sqrt(E[X^2] - E[X]^2) + 1e-9).
    axes = normalize_axes(node.attr("axes", [0, 2, 3]), x.dim(), node)
    mean = x.mean(axes, keepdim=True)
    var = (x * x).mean(axes, keepdim=True) - mean * mean
    return (x - mean) / (torch.sqrt(var) + 1e-9)


@converter("LRN", since=13)
def lrn(node: NodeView, x):
    # Sum of squares over channels c - floor((size-1)/2) .. c + ceil((size-1)/2): torch's
    # local_response_norm centres even sizes the other way, so the window is written out.
    size = node.attr("size")
    alpha, beta, bias = node.attr("alpha", 1e-4), node.attr("beta", 0.75), node.attr("bias", 1.0)
    before, after = (size - 1) // 2, size - 1 - (size - 1) // 2
    squares = F.pad(x * x, [0, 0] * (x.dim() - 2) + [before, after])
    channels = x.shape[1]
    window: Optional[torch.Tensor] = None
    for offset in range(size):
        part = squares.narrow(1, offset, channels)
        window = part if window is None else window + part
    return x / (bias + alpha / size * window) ** beta
