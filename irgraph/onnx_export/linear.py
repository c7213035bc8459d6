"""``fxforge::linear`` (a matmul and its epilogue) in every weight format.

* ``dense``: ``Gemm`` (``transB`` on ``nn.Linear``'s ``[N, K]`` weight, stored once); ``bf16``:
  the weight stored as bf16 and cast up (its values are what the format computes with);
* the quantized formats keep their integer codes in the file (:mod:`.quantized`): int8 ones as
  ``DequantizeLinear`` (QDQ), int4 as ``com.microsoft.MatMulNBits`` (or QDQ), ``w8a8`` as the
  per-row activation quantization and an exact ``MatMulInteger``.

Then the epilogue in the reference's order: bias, activation, residual, the output cast.
"""
from __future__ import annotations

import torch

from fxforge.irgraph.onnx_export import quantized
from fxforge.irgraph.onnx_export.elementwise import activation_of
from fxforge.irgraph.onnx_export.table import Unsupported, converts
from fxforge.irgraph.views import Linear
from fxforge.irgraph.weight_format import DENSE, FORMATS, W8A8

fxforge_linear = torch.ops.fxforge.linear.default


@converts(fxforge_linear)
def linear(ctx, node):
    view = Linear.of(node)
    fmt = FORMATS.get(view.weight_format)
    if fmt is None or not fmt.implemented:
        raise Unsupported(f"weight format {view.weight_format!r}")
    stored = ctx.dtype(view.weight)
    compute = torch.promote_types(ctx.dtype(view.x), stored if stored.is_floating_point
                                  else torch.float32)   # codes compute in fp32, as the op says
    x = ctx.tensor(view.x, compute)
    if view.weight_format == W8A8:
        y = quantized.w8a8(ctx, view, x, compute)
    elif fmt.code_dtype is not None and quantized.as_matmul_nbits(ctx, view):
        y = quantized.matmul_nbits(ctx, view, x, compute)
    elif fmt.code_dtype is not None:   # the weight [N, K] dequantized in the graph
        y = _gemm(ctx, x, quantized.dequantized(ctx, view), True, view.bias, compute)
    else:
        y = _dense(ctx, view, x, compute)
    return _epilogue(ctx, view, y, compute, ctx.meta(node).dtype)


def _dense(ctx, view: Linear, x: str, compute: torch.dtype) -> str:
    source, transposed = ctx.weight_source(view.weight)
    if view.weight_format == DENSE:
        return _gemm(ctx, x, ctx.tensor(source, compute), transposed, view.bias, compute)
    weight = ctx.constant(source)   # bf16: the values rounded to bf16 are what it computes with
    if weight is None:
        raise Unsupported("a bf16 weight that is not a constant")
    rounded = ctx.builder.initializer(f"{source.name}_bf16", weight.to(torch.bfloat16))
    return _gemm(ctx, x, ctx.builder.cast(rounded, torch.bfloat16, compute), transposed,
                 view.bias, compute)


def _gemm(ctx, x: str, weight: str, transposed: bool, bias, compute: torch.dtype) -> str:
    """``x @ W (+ bias)``; ``transposed``: ``weight`` is ``[N, K]``."""
    return ctx.builder.op("Gemm", [x, weight, ctx.optional(bias, compute)],
                          transB=int(transposed))


def _epilogue(ctx, view: Linear, y: str, compute: torch.dtype, out: torch.dtype) -> str:
    b = ctx.builder
    y = activation_of(ctx, view.activation, y, compute)
    if view.residual is not None:
        y_dtype = torch.promote_types(compute, ctx.dtype(view.residual))
        y = b.op("Add", [b.cast(y, compute, y_dtype), ctx.tensor(view.residual, y_dtype)])
        compute = y_dtype
    return b.cast(y, compute, out)
