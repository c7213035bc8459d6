"""Quantized ONNX ops, and their weights mapped onto fxforge's weight formats.

Every op has its ONNX semantics as torch ops (the converters below). On top, two import-time
rewrites keep a quantized weight quantized instead of folding it to a dense constant:

* ``MatMul(x, DequantizeLinear(codes, scale, zero_point))`` with constant operands, and
* ``com.microsoft::MatMulNBits`` with a constant ``B``,

become one ``fxforge::linear`` in the weight format that stores the same values
(:mod:`fxforge.irgraph.weight_format`): per-channel int8 -> ``int8_channel``, int8 in blocks of
32 along K -> ``int8_g32``, 4-bit in blocks of 32/64/128 -> ``int4_g32/64/128`` (``w = q * scale
+ offset`` with ``offset = -zero_point * scale``). A weight no format stores (other block sizes,
scales that fp16 cannot hold exactly, ``g_idx``) keeps the plain path, and the reason is logged.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import onnx
import torch

from fxforge.irgraph import ops as fxforge_ops  # noqa: F401  (registers torch.ops.fxforge)
from fxforge.irgraph.onnx_dtypes import onnx_type, torch_dtype
from fxforge.irgraph.onnx_import.table import (DEFAULT_DOMAIN, MS_DOMAIN, NodeView, converter,
                                               normalize_axis, rewrite)
from fxforge.irgraph.weight_format import pack_nibbles

log = logging.getLogger("fxforge")
_T = onnx.TensorProto
# the types QuantizeLinear writes: (low, high) of their values (4-bit ones load as int8/uint8)
RANGES = {_T.INT4: (-8, 7), _T.UINT4: (0, 15),
          **{t: (torch.iinfo(torch_dtype(t)).min, torch.iinfo(torch_dtype(t)).max)
             for t in (_T.INT8, _T.UINT8, _T.INT16, _T.UINT16, _T.INT32)}}


def _spread(param: torch.Tensor, like: torch.Tensor, axis: int, block: int) -> torch.Tensor:
    """A scale or zero point (scalar, per-axis or blocked) broadcast against ``like``."""
    if param.dim() == 0 or param.numel() == 1 and block == 0:
        return param.reshape(())
    if block:
        return param.repeat_interleave(block, dim=axis).narrow(axis, 0, like.shape[axis])
    shape = [1] * like.dim()
    shape[axis] = -1
    return param.reshape(shape)


def _axis_block(node: NodeView, x: torch.Tensor, scale: torch.Tensor) -> tuple[int, int]:
    block = node.attr("block_size", 0) if node.opset >= 21 else 0
    if scale.dim() == 0 or scale.numel() == 1 and not block:
        return 0, 0   # per tensor: the axis does not apply
    axis = normalize_axis(node.attr("axis", 1), x.dim(), node)
    if block and scale.dim() != x.dim():
        raise ValueError(f"{node.label()}: a blocked scale must have the input's rank")
    return axis, block


@converter("DequantizeLinear", since=13)
def dequantize_linear(node: NodeView, x, scale, zero_point=None):
    axis, block = _axis_block(node, x, scale)
    values = x.to(torch.float32)
    if zero_point is not None:
        values = values - _spread(zero_point, x, axis, block).to(torch.float32)
    out = values * _spread(scale, x, axis, block).to(torch.float32)
    return out.to(scale.dtype)


def _quantized_type(node: NodeView, zero_point: Any) -> int:
    if zero_point is not None:
        return node.input_types.get(2, onnx_type(zero_point.dtype))
    return node.attr("output_dtype", 0) or _T.UINT8


@converter("QuantizeLinear", since=13)
def quantize_linear(node: NodeView, x, scale, zero_point=None):
    elem = _quantized_type(node, zero_point)
    if elem not in RANGES:
        raise ValueError(f"{node.label()}: quantizing to "
                         f"{onnx.TensorProto.DataType.Name(elem)} is not imported (integer types only)")
    axis, block = _axis_block(node, x, scale)
    q = torch.round(x.to(torch.float32) / _spread(scale, x, axis, block).to(torch.float32))
    if zero_point is not None:
        q = q + _spread(zero_point, x, axis, block).to(torch.float32)
    low, high = RANGES[elem]
    return q.clamp(low, high).to(torch_dtype(elem))


@converter("DynamicQuantizeLinear", since=13)
def dynamic_quantize_linear(node: NodeView, x):
    """uint8 codes of ``x`` with one scale and zero point over the whole tensor (ONNX's rule:
    the range always includes 0)."""
    x = x.to(torch.float32)
    low = torch.clamp(x.min(), max=0.0)
    high = torch.clamp(x.max(), min=0.0)
    scale = (high - low) / 255
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    zero_point = torch.clamp(torch.round(-low / safe), 0, 255)
    codes = torch.clamp(torch.round(x / safe) + zero_point, 0, 255)
    return codes.to(torch.uint8), scale, zero_point.to(torch.uint8)


@converter("MatMulInteger", since=13)
def matmul_integer(node: NodeView, a, b, a_zero_point=None, b_zero_point=None):
    a32, b32 = a.to(torch.int32), b.to(torch.int32)
    if a_zero_point is not None:   # scalar, or one per row of a
        azp = a_zero_point.to(torch.int32)
        a32 = a32 - (azp.reshape(-1, 1) if azp.numel() > 1 else azp.reshape(()))
    if b_zero_point is not None:   # scalar, or one per column of b
        b32 = b32 - b_zero_point.to(torch.int32).reshape(-1) if b_zero_point.numel() > 1 else \
            b32 - b_zero_point.to(torch.int32).reshape(())
    return torch.matmul(a32, b32)


@converter("QLinearMatMul", since=13)
def qlinear_matmul(node: NodeView, a, a_scale, a_zp, b, b_scale, b_zp, y_scale, y_zp):
    a_real = dequantize_linear(_as(node, axis=-1), a, a_scale, a_zp).float()
    b_real = dequantize_linear(_as(node, axis=-1), b, b_scale.reshape(-1), b_zp.reshape(-1)).float()
    real = a_real @ b_real
    view = _as(node, axis=-1)
    view.input_types = {2: node.input_types.get(7, onnx_type(y_zp.dtype))}
    return quantize_linear(view, real, y_scale.float(), y_zp)


def _as(node: NodeView, **attrs) -> NodeView:
    return NodeView(node.op, node.name, node.domain, node.opset, dict(attrs), 1)


@converter("MatMulNBits", domain=MS_DOMAIN, since=1)
def matmul_nbits(node: NodeView, a, b, scales, zero_points=None, g_idx=None, bias=None):
    """ONNX Runtime's blocked low-bit matmul: ``B`` holds per output row ``k_blocks`` blobs of
    ``block_size`` codes (two 4-bit codes per byte, the low nibble first)."""
    if g_idx is not None:
        raise ValueError(f"{node.label()}: g_idx (act-order) is not imported")
    weight = nbits_dense(node, b, scales, zero_points)      # [N, K]
    out = torch.matmul(a, weight.t().to(a.dtype))
    return out + bias if bias is not None else out


def _nbits_shape(node: NodeView) -> tuple[int, int, int, int]:
    k, n = node.attr("K"), node.attr("N")
    bits, block = node.attr("bits", 4), node.attr("block_size")
    if bits not in (4, 8) or not block or block < 16 or block & (block - 1):
        raise ValueError(f"{node.label()}: bits={bits}, block_size={block} are not imported "
                         "(bits 4 or 8, block_size a power of two >= 16)")
    return k, n, bits, block


def nbits_codes(node: NodeView, b: torch.Tensor) -> torch.Tensor:
    """``B`` -> the codes ``[N, k_blocks * block_size]`` (uint8 values)."""
    k, n, bits, block = _nbits_shape(node)
    blobs = b.reshape(n, -1)
    if bits == 8:
        return blobs
    return torch.stack((blobs & 15, blobs >> 4), dim=-1).reshape(n, -1)


def nbits_zero_points(node: NodeView, zero_points, scales: torch.Tensor) -> torch.Tensor:
    """Zero points ``[N, k_blocks]`` in the scales' float type (default: the middle code)."""
    k, n, bits, block = _nbits_shape(node)
    k_blocks = -(-k // block)
    if zero_points is None:
        return torch.full((n, k_blocks), 2 ** (bits - 1), dtype=scales.dtype)
    if zero_points.dtype.is_floating_point:
        return zero_points.reshape(n, k_blocks)
    packed = zero_points.reshape(n, -1)
    if bits == 4:
        packed = torch.stack((packed & 15, packed >> 4), dim=-1).reshape(n, -1)
    return packed[:, :k_blocks].to(scales.dtype)


def nbits_dense(node: NodeView, b, scales, zero_points) -> torch.Tensor:
    k, n, bits, block = _nbits_shape(node)
    codes = nbits_codes(node, b).to(torch.float32).reshape(n, -1, block)
    scale = scales.reshape(n, -1, 1).to(torch.float32)
    zero = nbits_zero_points(node, zero_points, scales).reshape(n, -1, 1).to(torch.float32)
    return ((codes - zero) * scale).reshape(n, -1)[:, :k].to(scales.dtype)


# ---- import-time rewrites onto fxforge's weight formats ----------------------------------------

def fxforge_linear(node: NodeView, x, codes_nk, scales, offsets, bias):
    """``x [..., K]`` times a weight in ``node.attrs['format']`` (codes stored ``[N, K']``)."""
    lead = x.shape[:-1]
    out = torch.ops.fxforge.linear(x.reshape(-1, x.shape[-1]), codes_nk.t(), bias, "none", None,
                                   None, node.attr("format"), scales, offsets)
    return out.reshape(*lead, out.shape[-1])


def _fp16_exact(t: torch.Tensor) -> bool:
    return bool(torch.equal(t.to(torch.float16).to(t.dtype), t))


def _linear_step(builder, view: NodeView, x: str, fmt: str, codes_kn: torch.Tensor,
                 scales: torch.Tensor, offsets: Optional[torch.Tensor], bias: str, outputs,
                 stem: str):
    from fxforge.irgraph.onnx_import.program import Step
    names = [builder.add_constant(f"{stem}.codes", codes_kn.t().contiguous()),
             builder.add_constant(f"{stem}.scales", scales.to(torch.float16).contiguous())]
    names.append(builder.add_constant(f"{stem}.offsets", offsets.to(torch.float16).contiguous())
                 if offsets is not None else "")
    node = NodeView(view.op, view.name, view.domain, view.opset, {"format": fmt}, 1)
    log.info("fxforge: ONNX %s -> fxforge::linear, weight format %s", view.label(), fmt)
    return Step(fxforge_linear, node, (x, *names, bias), tuple(outputs), False)


def _decline(view: NodeView, why: str) -> None:
    log.info("fxforge: ONNX %s keeps a dense weight: %s", view.label(), why)
    return None


def _int4_format(builder, codes_kn, zero_kn, scales_kn, group, view, signed: bool):
    """4-bit codes ``[K, N]``, zero points and scales ``[K/G, N]`` -> int4_gG's tensors. The
    format's fp16 offset holds ``-zero_point * scale`` exactly for symmetric weights (zero point
    8: a power of two) but rarely for others; those map only under ``quantized_weights="nearest"``
    (offsets rounded to fp16, the largest weight change logged), else they stay dense."""
    if group not in (32, 64, 128):
        return _decline(view, f"4-bit blocks of {group} (fxforge stores 32, 64, 128)")
    if not _fp16_exact(scales_kn):
        return _decline(view, "its scales are not exact in fp16")
    shift = 8 if signed else 0
    offsets = -(zero_kn.to(torch.float32) + shift) * scales_kn.to(torch.float32)
    if not _fp16_exact(offsets):
        error = (offsets.to(torch.float16).float() - offsets).abs().max().item()
        if builder.quantized_weights != "nearest":
            return _decline(view, "zero point x scale is not exact in fp16 (quantized_weights="
                                  f"'nearest' maps it, changing weights by up to {error:.3g})")
        log.info("fxforge: ONNX %s: offsets rounded to fp16 (weights change by up to %.3g)",
                 view.label(), error)
    return f"int4_g{group}", pack_nibbles((codes_kn.to(torch.int16) + shift).to(torch.uint8)), \
        scales_kn, offsets


@rewrite("MatMulNBits", domain=MS_DOMAIN)
def matmul_nbits_as_linear(builder, view: NodeView, inputs, outputs):
    b, scales = (builder.constants.get(n) for n in inputs[1:3])
    zp = builder.constants.get(inputs[3]) if len(inputs) > 3 and inputs[3] else None
    if b is None or scales is None or len(inputs) > 3 and inputs[3] and zp is None:
        return _decline(view, "its weight is not a constant")
    if len(inputs) > 4 and inputs[4]:
        return _decline(view, "g_idx")
    k, n, bits, block = _nbits_shape(view)
    if k % block:
        return _decline(view, f"K={k} is not a multiple of its block size {block}")
    codes_kn = nbits_codes(view, b)[:, :k].t()
    zero_kn = nbits_zero_points(view, zp, scales).t().float()
    scales_kn = scales.reshape(n, -1).t()
    bias = inputs[5] if len(inputs) > 5 else ""
    if bits == 8:
        if block != 32 or not torch.all(zero_kn == 128) or not _fp16_exact(scales_kn):
            return _decline(view, "8-bit blocks other than symmetric blocks of 32")
        codes = (codes_kn.to(torch.int16) - 128).to(torch.int8)
        return _linear_step(builder, view, inputs[0], "int8_g32", codes, scales_kn, None, bias,
                            outputs, inputs[1])
    made = _int4_format(builder, codes_kn, zero_kn, scales_kn, block, view, signed=False)
    if made is None:
        return None
    fmt, packed, scales_kn, offsets = made
    return _linear_step(builder, view, inputs[0], fmt, packed, scales_kn, offsets, bias, outputs,
                        inputs[1])


@rewrite("MatMul")
def matmul_of_dequantized(builder, view: NodeView, inputs, outputs):
    producer = builder.producers.get(inputs[1])
    if producer is None or producer.node.op != "DequantizeLinear" or \
            producer.node.domain != DEFAULT_DOMAIN:
        return None
    codes, scale = (builder.constants.get(n) for n in producer.inputs[:2])
    zp_name = producer.inputs[2] if len(producer.inputs) > 2 else ""
    zp = builder.constants.get(zp_name) if zp_name else None
    if codes is None or scale is None or zp_name and zp is None or codes.dim() != 2:
        return None
    elem = producer.node.input_types.get(0)
    axis, block = _axis_block(producer.node, codes, scale)
    stem = producer.inputs[0]
    zero = zp if zp is not None else torch.zeros((), dtype=torch.int32)
    if elem in (_T.INT4, _T.UINT4):
        if block == 0 or axis != 0:
            return _decline(view, "4-bit codes not in blocks along K")
        made = _int4_format(builder, codes, zero.float().expand_as(scale), scale, block, view,
                            signed=elem == _T.INT4)
        if made is None:
            return None
        fmt, packed, scales_kn, offsets = made
        return _linear_step(builder, view, inputs[0], fmt, packed, scales_kn, offsets, "",
                            outputs, stem)
    if elem != _T.INT8 or bool(torch.any(zero != 0)) or not _fp16_exact(scale):
        return _decline(view, "only symmetric int8 (zero point 0, fp16-exact scales) maps")
    if block == 0 and axis == 1 and scale.numel() == codes.shape[1]:
        return _linear_step(builder, view, inputs[0], "int8_channel", codes,
                            scale.reshape(1, -1), None, "", outputs, stem)
    if block == 32 and axis == 0 and codes.shape[0] % 32 == 0:
        return _linear_step(builder, view, inputs[0], "int8_g32", codes, scale, None, "",
                            outputs, stem)
    return _decline(view, f"int8 with axis={axis}, block_size={block}")
