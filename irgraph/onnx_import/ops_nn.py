"""Convolutions and pools (1-D to 3-D), ``Dropout`` at inference.

ONNX pads are per side (``[begin..., end...]``) and ``auto_pad`` derives them from the input
size; torch's ops take one symmetric pad per axis. :func:`spatial_pads` resolves both into
begin/end lists, and a pad torch cannot express (uneven, or larger than its limit) is applied
beforehand with ``F.pad`` using a value neutral for the op (0 for sums, -inf for max).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F

from fxforge.irgraph.onnx_import.ops_tensor import outputs
from fxforge.irgraph.onnx_import.table import NodeView, converter

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _spatial(node: NodeView, x: torch.Tensor, table: dict) -> Any:
    rank = x.dim() - 2
    if rank not in table:
        raise ValueError(f"{node.label()}: {rank}-D inputs are not imported (1-D to 3-D are)")
    return table[rank]


def _ceil_div(a, b):
    return -(-a // b)


def spatial_pads(node: NodeView, sizes, kernel, strides, dilations) -> tuple[list, list]:
    """Begin and end pads per spatial axis, from ``pads`` or ``auto_pad``."""
    auto = node.attr("auto_pad", "NOTSET")
    n = len(kernel)
    if auto in ("NOTSET", "VALID"):
        pads = node.attr("pads") if auto == "NOTSET" else None
        pads = list(pads) if pads else [0] * (2 * n)
        return pads[:n], pads[n:]
    if auto not in ("SAME_UPPER", "SAME_LOWER"):
        raise ValueError(f"{node.label()}: attribute auto_pad={auto!r} is not NOTSET, VALID, "
                         "SAME_UPPER or SAME_LOWER")
    begins, ends = [], []
    for size, k, s, d in zip(sizes, kernel, strides, dilations):
        total = (_ceil_div(size, s) - 1) * s + (k - 1) * d + 1 - size
        total = torch.sym_max(total, 0) if not isinstance(total, int) else max(total, 0)
        small, large = total // 2, total - total // 2
        begins.append(small if auto == "SAME_UPPER" else large)   # the extra pad goes at the end
        ends.append(large if auto == "SAME_UPPER" else small)     # for UPPER, the start for LOWER
    return begins, ends


def _torch_pad(begins: list, ends: list) -> list:
    """ONNX begin/end lists as F.pad's spec (last axis first)."""
    spec = []
    for begin, end in zip(reversed(begins), reversed(ends)):
        spec += [begin, end]
    return spec


def _geometry(node: NodeView, x: torch.Tensor, kernel) -> tuple[list, list, list, list]:
    n = len(kernel)
    strides = list(node.attr("strides") or [1] * n)
    dilations = list(node.attr("dilations") or [1] * n)
    begins, ends = spatial_pads(node, list(x.shape[2:]), kernel, strides, dilations)
    return strides, dilations, begins, ends


@converter("Conv", since=13)
def conv(node: NodeView, x, w, b=None):
    kernel = list(node.attr("kernel_shape") or w.shape[2:])
    strides, dilations, begins, ends = _geometry(node, x, kernel)
    padding: Any = begins
    if begins != ends:   # torch pads both sides alike: pad unevenly first
        x, padding = F.pad(x, _torch_pad(begins, ends)), 0
    return _spatial(node, x, CONV)(x, w, b, strides, padding, dilations, node.attr("group", 1))


@converter("ConvTranspose", since=13)
def conv_transpose(node: NodeView, x, w, b=None):
    # The full transposed convolution (no padding), then each axis cropped by its pads and
    # extended by output_padding, then the bias: torch's padding arguments are symmetric.
    n = x.dim() - 2
    strides = list(node.attr("strides") or [1] * n)
    dilations = list(node.attr("dilations") or [1] * n)
    extra = list(node.attr("output_padding") or [0] * n)
    y = _spatial(node, x, CONV_T)(x, w, None, strides, 0, 0, node.attr("group", 1), dilations)
    full = list(y.shape[2:])
    target = node.attr("output_shape")
    auto = node.attr("auto_pad", "NOTSET")
    if target is not None or auto in ("SAME_UPPER", "SAME_LOWER"):
        if target is None:
            target = [size * s for size, s in zip(x.shape[2:], strides)]
        totals = [f + e - t for f, e, t in zip(full, extra, list(target)[-n:])]
        upper = auto == "SAME_UPPER"   # else (output_shape alone too) the odd pad goes first
        begins = [t // 2 if upper else t - t // 2 for t in totals]
        ends = [t - bg for t, bg in zip(totals, begins)]
    else:
        pads = node.attr("pads") if auto == "NOTSET" else None
        pads = list(pads) if pads else [0] * (2 * n)
        begins, ends = pads[:n], pads[n:]
    y = F.pad(y, _torch_pad([-bg for bg in begins], [e - end for e, end in zip(extra, ends)]))
    return y if b is None else y + b.reshape(-1, *([1] * n))


def _pool_geometry(node: NodeView, x: torch.Tensor):
    kernel = list(node.attr("kernel_shape"))
    strides, dilations, begins, ends = _geometry(node, x, kernel)
    # torch pools pad both sides alike, by at most half the (dilated) kernel.
    native = begins == ends and all(2 * p <= (k - 1) * d + 1 for p, k, d in
                                    zip(begins, kernel, dilations))
    return kernel, strides, dilations, begins, ends, native


@converter("MaxPool", since=13)
def max_pool(node: NodeView, x):
    if node.attr("storage_order", 0):
        raise ValueError(f"{node.label()}: attribute storage_order=1 (column-major indices) is "
                         "not imported")
    kernel, strides, dilations, begins, ends, native = _pool_geometry(node, x)
    padding: Any = begins
    if not native:
        if node.num_outputs > 1:
            raise ValueError(f"{node.label()}: the Indices output with uneven pads is not "
                             "imported")
        x, padding = F.pad(x, _torch_pad(begins, ends), value=float("-inf")), 0
    pool = _spatial(node, x, MAX_POOL)
    ceil = bool(node.attr("ceil_mode", 0))
    if node.num_outputs < 2:
        return pool(x, kernel, strides, padding, dilations, ceil_mode=ceil)
    values, index = pool(x, kernel, strides, padding, dilations, ceil_mode=ceil,
                         return_indices=True)
    # torch numbers positions within each (n, c) plane; ONNX across the whole tensor.
    plane = 1
    for size in x.shape[2:]:
        plane = plane * size
    base = torch.arange(x.shape[0] * x.shape[1], device=x.device) * plane
    return values, index + base.reshape(x.shape[0], x.shape[1], *([1] * (x.dim() - 2)))


def _window_sum_ratio(node: NodeView, x, kernel, strides, begins, ends, count_pads: bool):
    """Averages over windows with padding torch cannot express: the pooled sums of the padded
    input over the pooled count of the cells that count (pads too when ``count_pads``)."""
    spec = _torch_pad(begins, ends)
    ceil = bool(node.attr("ceil_mode", 0))
    pool = _spatial(node, x, AVG_POOL)
    ones = torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype, device=x.device)
    counted = F.pad(ones, spec, value=1.0 if count_pads else 0.0)
    sums = pool(F.pad(x, spec), kernel, strides, 0, ceil)
    return sums / pool(counted, kernel, strides, 0, ceil)


@converter("AveragePool", since=13)
def average_pool(node: NodeView, x):
    kernel, strides, dilations, begins, ends, native = _pool_geometry(node, x)
    if any(d != 1 for d in dilations):
        raise ValueError(f"{node.label()}: attribute dilations={dilations} is not imported "
                         "(torch's average pools have no dilation)")
    count_pads = bool(node.attr("count_include_pad", 0))
    if not native or (node.attr("ceil_mode", 0) and count_pads):
        # ceil_mode windows past the end: ONNX counts only the explicit pads, torch counts the
        # overhang too, so that case goes through the ratio as well.
        return _window_sum_ratio(node, x, kernel, strides, begins, ends, count_pads)
    return _spatial(node, x, AVG_POOL)(x, kernel, strides, begins, bool(node.attr("ceil_mode", 0)),
                                       count_pads)


@converter("LpPool", since=13)
def lp_pool(node: NodeView, x):
    kernel, strides, dilations, begins, ends, _ = _pool_geometry(node, x)
    if any(d != 1 for d in dilations):
        raise ValueError(f"{node.label()}: attribute dilations={dilations} is not imported")
    p = node.attr("p", 2)
    if node.attr("ceil_mode", 0):   # zeros past the end make the last windows whole
        ends = [e + _ceil_overhang(size + b + e, k, s, size + b) for size, k, s, b, e in
                zip(x.shape[2:], kernel, strides, begins, ends)]
    count = 1
    for k in kernel:
        count *= k
    # Sums of |x|^p over whole windows: the average over the padded input times the window.
    powered = F.pad(x.abs().pow(p), _torch_pad(begins, ends))
    sums = _spatial(node, x, AVG_POOL)(powered, kernel, strides, 0) * count
    return sums.pow(1.0 / p)


def _ceil_overhang(padded: int, kernel: int, stride: int, start_limit: int) -> int:
    """How far ceil_mode's last window reaches past the padded input; as torch and ONNX
    Runtime, a window must start inside the input or its begin pad."""
    count = _ceil_div(padded - kernel, stride) + 1
    if (count - 1) * stride >= start_limit:
        count -= 1
    return max((count - 1) * stride + kernel - padded, 0)


def _spatial_axes(x: torch.Tensor) -> list[int]:
    return list(range(2, x.dim()))


@converter("GlobalAveragePool", since=13)
def global_average_pool(node: NodeView, x):
    return x.mean(_spatial_axes(x), keepdim=True)


@converter("GlobalMaxPool", since=13)
def global_max_pool(node: NodeView, x):
    return x.amax(_spatial_axes(x), keepdim=True)


@converter("GlobalLpPool", since=13)
def global_lp_pool(node: NodeView, x):
    p = node.attr("p", 2)
    return x.abs().pow(p).sum(_spatial_axes(x), keepdim=True).pow(1.0 / p)


@converter("Dropout", since=13)
def dropout(node: NodeView, x, ratio=None, training: Optional[torch.Tensor] = None):
    # Inference: the identity, and a mask of ones. A training_mode known to be on would draw
    # random numbers, which an inference compiler does not reproduce.
    if training is not None and node.scalar(2, training):
        raise ValueError(f"{node.label()}: training_mode is true; fxforge imports Dropout for "
                         "inference only")
    return outputs(node, x, torch.ones_like(x, dtype=torch.bool))
