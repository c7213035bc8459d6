"""Quantized linear weights, exported with their integer codes (irgraph/weight_format.py has
the layouts: the op's weight is ``[K, N]``; int4 codes are uint8 ``[K/2, N]``, the low nibble
the even k; scales and offsets fp16 ``[K/G, N]``, ``w = q * scale + offset``).

* ``int8_channel``: ``DequantizeLinear`` of int8 ``[N, K]`` codes with one scale per row
  (axis 0); ``int8_g32``: blocked ``DequantizeLinear`` (axis 1, block 32, opset >= 21), before
  opset 21 the same product written as Mul on 32-wide blocks. fp16 scales are stored as fp32
  (exact), so each weight is the fp32 product ``q * scale``, the reference's own.
* int4 (``auto``/``matmulnbits``): ``com.microsoft.MatMulNBits``: B uint8 ``[N, K/G, G/2]`` (the
  same nibble order), scales and float zero points ``[N * K/G]``, ``w = (q - zp) * scale`` with
  ``zp = -offset / scale`` (equal to ``q * scale + offset`` up to rounding). A group with scale
  0 has no such zp: that linear goes the QDQ way. int4 ``qdq`` (opset >= 21): blocked
  ``DequantizeLinear`` of uint4 codes, plus the offsets per block: bit-exact to the reference.
* ``w8a8``: the activations quantized per row as :func:`w8a8_quantize_rows` does (same fp32
  ops, same order, round half to even), ``MatMulInteger`` (exact int32), then
  ``acc * scale_w * scale_x``.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from onnx import TensorProto

from fxforge.irgraph.onnx_export.builder import MS_DOMAIN
from fxforge.irgraph.onnx_export.table import Unsupported
from fxforge.irgraph.views import Linear
from fxforge.irgraph.weight_format import FORMATS

BLOCKED_DQ_OPSET = 21   # DequantizeLinear's block_size, and the 4-bit types


def _constants(ctx, view: Linear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes [K, N], scales, offsets) as tensors; the codes must be constants."""
    codes = ctx.constant(view.weight)
    if codes is None:
        raise Unsupported(f"quantized weight ({view.weight_format}) that is not a constant")
    return codes, ctx.constant(view.scales), ctx.constant(view.offsets)


def as_matmul_nbits(ctx, view: Linear) -> bool:
    """Whether this int4 linear is exported as MatMulNBits (else its weight is dequantized)."""
    if not view.weight_format.startswith("int4") or ctx.quant_format == "qdq":
        return False
    scales = ctx.constant(view.scales)
    return scales is not None and bool((scales != 0).all())


def dequantized(ctx, view: Linear) -> str:
    """The weight ``[N, K]`` as fp32, computed in the graph from its stored codes."""
    codes, scales, offsets = _constants(ctx, view)
    group = FORMATS[view.weight_format].group
    name = _hint(view)
    if view.weight_format.startswith("int4"):
        return _int4_qdq(ctx, codes, scales, offsets, group, name)
    codes_nk = ctx.builder.initializer(f"{name}_codes", codes.t().contiguous())
    if group == 0:   # a scale per output channel
        scale = ctx.builder.initializer(f"{name}_scale", scales.float().reshape(-1))
        return ctx.builder.op("DequantizeLinear", [codes_nk, scale], axis=0)
    scale_nb = scales.float().t().contiguous()   # [N, K/G]
    if ctx.opset >= BLOCKED_DQ_OPSET:
        scale = ctx.builder.initializer(f"{name}_scale", scale_nb)
        return ctx.builder.op("DequantizeLinear", [codes_nk, scale], axis=1, block_size=group)
    return _blockwise(ctx, ctx.builder.cast(codes_nk, torch.int8, torch.float32), scale_nb, None,
                      group, name)


def _int4_qdq(ctx, codes, scales, offsets, group: int, name: str) -> str:
    if ctx.opset < BLOCKED_DQ_OPSET:
        raise Unsupported(f"int4 weights as QDQ need opset >= {BLOCKED_DQ_OPSET} (4-bit types); "
                          "quant_format='matmulnbits' exports them at any opset")
    n, k = codes.shape[1], codes.shape[0] * 2
    # uint4 [N, K] row-major, two per byte, low nibble first: the codes transposed, as bytes
    packed = ctx.builder.initializer(f"{name}_codes", codes.t().contiguous(),
                                     elem_type=TensorProto.UINT4, dims=(n, k))
    scale = ctx.builder.initializer(f"{name}_scale", scales.float().t().contiguous())
    products = ctx.builder.op("DequantizeLinear", [packed, scale], axis=1, block_size=group)
    return _blockwise(ctx, products, None, offsets.float().t().contiguous(), group, name)


def _blockwise(ctx, weight_nk: str, scale_nb, offset_nb, group: int, name: str) -> str:
    """``weight * scale + offset`` with one scale and offset per block of ``group`` along K:
    [N, K] viewed as [N, K/G, G] against [N, K/G, 1] constants."""
    b = ctx.builder
    n, blocks = (scale_nb if scale_nb is not None else offset_nb).shape
    blocked = b.op("Reshape", [weight_nk, b.ints([n, blocks, group])])
    if scale_nb is not None:
        blocked = b.op("Mul", [blocked, b.initializer(f"{name}_scale", scale_nb.unsqueeze(-1))])
    if offset_nb is not None:
        blocked = b.op("Add", [blocked, b.initializer(f"{name}_offset", offset_nb.unsqueeze(-1))])
    return b.op("Reshape", [blocked, b.ints([n, blocks * group])])


def matmul_nbits(ctx, view: Linear, x: str, compute: torch.dtype) -> str:
    codes, scales, offsets = _constants(ctx, view)
    if compute not in (torch.float32, torch.float16):
        raise Unsupported(f"MatMulNBits computes in fp32 or fp16, not {compute}")
    group = FORMATS[view.weight_format].group
    k, n = codes.shape[0] * 2, codes.shape[1]
    name = _hint(view)
    b = ctx.builder
    blob = codes.t().contiguous().reshape(n, k // group, group // 2)
    scale_nb = scales.to(compute).t().contiguous()
    zero_points = (-offsets.to(compute).t() / scale_nb).contiguous()
    y = b.op("MatMulNBits", [x, b.initializer(f"{name}_codes", blob),
                             b.initializer(f"{name}_scale", scale_nb.reshape(-1)),
                             b.initializer(f"{name}_zero_point", zero_points.reshape(-1))],
             domain=MS_DOMAIN, K=k, N=n, bits=4, block_size=group)
    return b.op("Add", [y, ctx.tensor(view.bias, compute)]) if view.bias is not None else y


def w8a8(ctx, view: Linear, x: str, compute: torch.dtype) -> str:
    if compute != torch.float32:
        raise Unsupported(f"w8a8 with {compute} activations")
    codes, scales, smooth = _constants(ctx, view)
    name = _hint(view)
    b = ctx.builder
    f32 = torch.float32
    rows = b.op("Mul", [x, b.initializer(f"{name}_smooth", smooth.float().reshape(1, -1))])
    bad = b.op("Or", [b.op("IsInf", [rows]), b.op("IsNaN", [rows])])
    bad_row = b.op("Greater", [b.reduce("ReduceMax", b.cast(bad, torch.bool, f32), [1], True),
                               b.const(0.0, f32)])
    zero = b.const(0.0, f32)
    amax = b.op("Where", [bad_row, zero, b.reduce("ReduceMax", b.op("Abs", [rows]), [1], True)])
    positive = b.op("Greater", [amax, zero])
    inv = b.op("Where", [positive, b.op("Div", [b.const(127.0, f32), amax]), zero])
    rounded = b.op("Clip", [b.op("Round", [b.op("Mul", [rows, inv])]), b.const(-127.0, f32),
                            b.const(127.0, f32)])
    x_codes = b.cast(b.op("Where", [bad_row, zero, rounded]), f32, torch.int8)
    x_scales = b.op("Where", [bad_row, b.const(float("nan"), f32),
                              b.op("Div", [amax, b.const(127.0, f32)])])
    weight = b.initializer(f"{name}_codes", codes.contiguous())
    acc = b.cast(b.op("MatMulInteger", [x_codes, weight]), torch.int32, f32)
    w_scale = b.initializer(f"{name}_scale", scales.float().reshape(1, -1))
    y = b.op("Mul", [b.op("Mul", [acc, w_scale]), x_scales])
    return b.op("Add", [y, ctx.tensor(view.bias, f32)]) if view.bias is not None else y


def _hint(view: Linear) -> str:
    """Names for the initializers of this linear: its stored codes' constant's."""
    weight = view.weight
    while isinstance(weight, fx.Node) and weight.op != "get_attr" and weight.all_input_nodes:
        weight = weight.all_input_nodes[0]   # through the transposing view to the constant
    return str(weight.target) if isinstance(weight, fx.Node) and weight.op == "get_attr" \
        else view.node.name
