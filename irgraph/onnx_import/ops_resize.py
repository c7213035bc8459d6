"""``Resize`` and the pixel shuffles (``DepthToSpace``, ``SpaceToDepth``).

Resize is separable: each resized axis maps its output positions to source coordinates (the
``coordinate_transformation_mode``), then reads them by index (nearest) or blends the taps
around them (linear: 2, cubic: 4), one axis at a time. Coordinates are computed in float32 in
ONNX Runtime's order of operations, so nearest picks and tap weights come out as its do;
F.interpolate covers only some of the modes' combinations.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from fxforge.irgraph.onnx_import.table import NodeView, converter, normalize_axes


# x_resized -> x_original per coordinate_transformation_mode, for a float32 ``scale``, the
# input and output lengths and (tf_crop_and_resize) the axis's region of interest.
TRANSFORMS: dict[str, Callable] = {
    "half_pixel": lambda x, scale, n_in, n_out, roi: (x + 0.5) / scale - 0.5,
    "half_pixel_symmetric": lambda x, scale, n_in, n_out, roi:
        n_in / 2 * (1 - n_out / (scale * n_in)) + (x + 0.5) / scale - 0.5,
    "pytorch_half_pixel": lambda x, scale, n_in, n_out, roi:
        (x + 0.5) / scale - 0.5 if n_out > 1 else torch.zeros_like(x),
    "align_corners": lambda x, scale, n_in, n_out, roi:
        x * (n_in - 1) / (n_out - 1) if n_out > 1 else torch.zeros_like(x),
    "asymmetric": lambda x, scale, n_in, n_out, roi: x / scale,
    "tf_half_pixel_for_nn": lambda x, scale, n_in, n_out, roi: (x + 0.5) / scale,
    "tf_crop_and_resize": lambda x, scale, n_in, n_out, roi:
        roi[0] * (n_in - 1) + x * (roi[1] - roi[0]) * (n_in - 1) / (n_out - 1) if n_out > 1
        else torch.full_like(x, 0.5 * (roi[0] + roi[1]) * (n_in - 1)),
}

# Nearest rounding; halves differ by mode (values below 0 are clamped to 0 afterwards).
ROUNDING: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "round_prefer_floor": lambda c: torch.ceil(c - 0.5),
    "round_prefer_ceil": lambda c: torch.floor(c + 0.5),
    "floor": torch.floor,
    "ceil": torch.ceil,
}


def _along(weights: torch.Tensor, axis: int, rank: int) -> torch.Tensor:
    shape = [1] * rank
    shape[axis] = -1
    return weights.reshape(shape)


def _nearest(node, x, axis, coord, n_in):
    rounding = node.attr("nearest_mode", "round_prefer_floor")
    if rounding not in ROUNDING:
        raise ValueError(f"{node.label()}: attribute nearest_mode={rounding!r} is not one of "
                         f"{', '.join(ROUNDING)}")
    index = ROUNDING[rounding](coord).to(torch.int64).clamp(0, n_in - 1)
    return x.index_select(axis, index)


def _linear(node, x, axis, coord, n_in):
    coord = coord.clamp(0, n_in - 1)
    low = coord.floor()
    weight = _along(coord - low, axis, x.dim())
    low = low.to(torch.int64)
    high = (low + 1).clamp(max=n_in - 1)
    return x.index_select(axis, low) * (1 - weight) + x.index_select(axis, high) * weight


def _cubic(node, x, axis, coord, n_in):
    a = node.attr("cubic_coeff_a", -0.75)
    base = coord.floor()
    s = coord - base
    base = base.to(torch.int64)
    # Keys' cubic convolution weights of the taps at base-1 .. base+2.
    weights = [((a * (s + 1) - 5 * a) * (s + 1) + 8 * a) * (s + 1) - 4 * a,
               ((a + 2) * s - (a + 3)) * s * s + 1,
               ((a + 2) * (1 - s) - (a + 3)) * (1 - s) * (1 - s) + 1,
               ((a * (2 - s) - 5 * a) * (2 - s) + 8 * a) * (2 - s) - 4 * a]
    taps = [base + offset for offset in (-1, 0, 1, 2)]
    if node.attr("exclude_outside", 0):
        weights = [w * ((t >= 0) & (t <= n_in - 1)) for w, t in zip(weights, taps)]
        total = weights[0] + weights[1] + weights[2] + weights[3]
        weights = [w / total for w in weights]
    out: Optional[torch.Tensor] = None
    for w, t in zip(weights, taps):
        part = x.index_select(axis, t.clamp(0, n_in - 1)) * _along(w, axis, x.dim())
        out = part if out is None else out + part
    return out


INTERPOLATE = {"nearest": _nearest, "linear": _linear, "cubic": _cubic}


def f32(value: float) -> float:
    """``value`` rounded to float32 (to nearest, ties to even), in plain Python: this code also
    runs under dynamo, which would trace numpy scalars into tensor ops."""
    if value == 0 or not math.isfinite(value):
        return value
    mantissa, exponent = math.frexp(value)
    return math.ldexp(round(mantissa * 2**24), exponent - 24)


def _output_sizes(node: NodeView, n_ins: list, scales: Optional[list], sizes: Optional[list]):
    """Output lengths and the float32 scale of each resized axis, as ONNX Runtime computes
    them in float32 (a product of float32 values is exact in a double, then rounded)."""
    if sizes:
        policy = node.attr("keep_aspect_ratio_policy", "stretch")
        ratios = [f32(o / i) for o, i in zip(sizes, n_ins)]
        if policy == "stretch":
            return list(sizes), ratios
        if policy not in ("not_larger", "not_smaller"):
            raise ValueError(f"{node.label()}: attribute keep_aspect_ratio_policy={policy!r} "
                             "is not stretch, not_larger or not_smaller")
        ratio = min(ratios) if policy == "not_larger" else max(ratios)
        return [int(math.floor(f32(f32(ratio * i) + 0.5))) for i in n_ins], [ratio] * len(n_ins)
    if scales is None:
        raise ValueError(f"{node.label()}: neither scales nor sizes is given")
    scales = [f32(s) for s in scales]
    return [_scaled(node, i, s) for s, i in zip(scales, n_ins)], scales


def _scaled(node: NodeView, size, scale: float):
    """floor(size * scale) in float32. A whole factor needs no rounding, so a dynamic size
    (SymInt) stays symbolic; other factors read the size as a number (dynamo specializes)."""
    if float(scale).is_integer():
        return size * int(scale)
    return int(f32(scale * size))


@converter("Resize", since=13)
def resize(node: NodeView, x, roi=None, scales=None, sizes=None):
    mode = node.attr("mode", "nearest")
    transform = node.attr("coordinate_transformation_mode", "half_pixel")
    for name, value, allowed in (("mode", mode, INTERPOLATE), ("coordinate_transformation_mode",
                                                              transform, TRANSFORMS)):
        if value not in allowed:
            raise ValueError(f"{node.label()}: attribute {name}={value!r} is not one of "
                             f"{', '.join(allowed)}")
    if mode != "nearest" and not x.dtype.is_floating_point:
        raise ValueError(f"{node.label()}: {mode} resizing of {x.dtype} inputs is not imported")
    axes = normalize_axes(node.attr("axes") or range(x.dim()), x.dim(), node)
    n_ins = [x.shape[a] for a in axes]
    scales, sizes = node.values(2, scales) or None, node.values(3, sizes) or None
    n_outs, factors = _output_sizes(node, n_ins, scales, sizes)
    if node.attr("antialias", 0) and mode != "nearest" and any(f < 1 for f in factors):
        raise ValueError(f"{node.label()}: attribute antialias=1 when downsampling is not "
                         "imported")
    roi_values = node.values(1, roi) if transform == "tf_crop_and_resize" else None
    outside: Optional[torch.Tensor] = None
    for i, (axis, n_in, n_out, factor) in enumerate(zip(axes, n_ins, n_outs, factors)):
        if n_out == n_in and factor == 1 and transform != "tf_crop_and_resize":
            continue   # every transform maps an unscaled axis onto itself
        region = None
        if roi_values is not None:   # [starts..., ends...] over the axes given, else all axes
            at, count = (i, len(axes)) if len(roi_values) == 2 * len(axes) else (axis, x.dim())
            region = (roi_values[at], roi_values[at + count])
        positions = torch.arange(n_out, dtype=torch.float32, device=x.device)
        coord = TRANSFORMS[transform](positions, float(factor), n_in, n_out, region)
        if roi_values is not None:   # outside the input: extrapolation_value
            beyond = _along((coord < 0) | (coord > n_in - 1), axis, x.dim())
            outside = beyond if outside is None else outside | beyond
        x = INTERPOLATE[mode](node, x, axis, coord, n_in)
    if outside is not None:
        fill = torch.tensor(node.attr("extrapolation_value", 0.0), dtype=x.dtype)
        x = torch.where(outside, fill, x)
    return x


def _pixel_mode(node: NodeView) -> str:
    mode = node.attr("mode", "DCR")
    if mode not in ("DCR", "CRD"):
        raise ValueError(f"{node.label()}: attribute mode={mode!r} is not DCR or CRD")
    return mode


@converter("DepthToSpace", since=13)
def depth_to_space(node: NodeView, x):
    b = node.attr("blocksize")
    n, c, h, w = x.shape
    if _pixel_mode(node) == "DCR":
        y = x.reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
    else:
        y = x.reshape(n, c // (b * b), b, b, h, w).permute(0, 1, 4, 2, 5, 3)
    return y.reshape(n, c // (b * b), h * b, w * b)


@converter("SpaceToDepth", since=13)
def space_to_depth(node: NodeView, x):
    # The mode attribute arrives at opset 28; before it the layout is DCR (its default).
    b = node.attr("blocksize")
    n, c, h, w = x.shape
    y = x.reshape(n, c, h // b, b, w // b, b)
    y = y.permute(0, 3, 5, 1, 2, 4) if _pixel_mode(node) == "DCR" else y.permute(0, 1, 3, 5, 2, 4)
    return y.reshape(n, c * b * b, h // b, w // b)

