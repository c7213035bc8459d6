"""Elementwise unary ops and activations: ONNX op -> torch function, as a table."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from fxforge.irgraph.onnx_import.table import NodeView, converter

UNARY: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "Abs": torch.abs, "Acos": torch.acos, "Acosh": torch.acosh, "Asin": torch.asin,
    "Asinh": torch.asinh, "Atan": torch.atan, "Atanh": torch.atanh, "Ceil": torch.ceil,
    "Cos": torch.cos, "Cosh": torch.cosh, "Erf": torch.erf, "Exp": torch.exp,
    "Floor": torch.floor, "Log": torch.log, "Neg": torch.neg, "Not": torch.logical_not,
    "Reciprocal": torch.reciprocal, "Relu": torch.relu, "Round": torch.round,
    "Sigmoid": torch.sigmoid, "Sign": torch.sign, "Sin": torch.sin, "Sinh": torch.sinh,
    "Sqrt": torch.sqrt, "Tan": torch.tan, "Tanh": torch.tanh, "Softplus": F.softplus,
    "Softsign": F.softsign, "Mish": F.mish, "BitwiseNot": torch.bitwise_not,
    "IsNaN": torch.isnan,
}


def _unary(fn: Callable):
    def convert(node: NodeView, x):
        return fn(x)
    return convert


for _op, _fn in UNARY.items():
    converter(_op, since=13)(_unary(_fn))


@converter("IsInf", since=13)
def is_inf(node: NodeView, x):
    pos, neg = node.attr("detect_positive", 1), node.attr("detect_negative", 1)
    return (torch.isposinf(x) if pos else torch.zeros_like(x, dtype=torch.bool)) | \
        (torch.isneginf(x) if neg else torch.zeros_like(x, dtype=torch.bool))


@converter("LeakyRelu", since=13)
def leaky_relu(node: NodeView, x):
    return F.leaky_relu(x, node.attr("alpha", 0.01))


@converter("Elu", since=13)
def elu(node: NodeView, x):
    return F.elu(x, node.attr("alpha", 1.0))


@converter("Selu", since=13)
def selu(node: NodeView, x):
    alpha = node.attr("alpha", 1.67326319217681884765625)
    gamma = node.attr("gamma", 1.05070102214813232421875)
    return gamma * torch.where(x > 0, x, alpha * (torch.exp(x) - 1))


@converter("Celu", since=13)
def celu(node: NodeView, x):
    return F.celu(x, node.attr("alpha", 1.0))


@converter("ThresholdedRelu", since=13)
def thresholded_relu(node: NodeView, x):
    return torch.where(x > node.attr("alpha", 1.0), x, torch.zeros_like(x))


@converter("HardSigmoid", since=13)
def hard_sigmoid(node: NodeView, x):
    return torch.clamp(node.attr("alpha", 0.2) * x + node.attr("beta", 0.5), 0, 1)


@converter("HardSwish", since=14)
def hard_swish(node: NodeView, x):
    return F.hardswish(x)


@converter("Gelu", since=20)
def gelu(node: NodeView, x):
    return F.gelu(x, approximate=node.attr("approximate", "none"))


@converter("PRelu", since=13)
def prelu(node: NodeView, x, slope):
    return torch.where(x >= 0, x, x * slope)


@converter("Clip", since=13)
def clip(node: NodeView, x, low=None, high=None):
    if low is not None:
        x = torch.maximum(x, low.to(x.dtype))
    if high is not None:
        x = torch.minimum(x, high.to(x.dtype))
    return x


def _softmax_like(fn: Callable):
    def convert(node: NodeView, x):
        return fn(x, dim=node.attr("axis", -1))
    return convert


converter("Softmax", since=13)(_softmax_like(torch.softmax))
converter("LogSoftmax", since=13)(_softmax_like(torch.log_softmax))


@converter("Hardmax", since=13)
def hardmax(node: NodeView, x):
    axis = node.attr("axis", -1)
    return F.one_hot(x.argmax(axis), x.shape[axis]).movedim(-1, axis).to(x.dtype)
