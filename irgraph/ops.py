"""fxforge's own IR ops: fused operations that passes create and backends lower.

Each is a ``torch.library.custom_op`` with a fake (meta) implementation, so a rewritten graph
still runs eagerly (the reference implementation here is the test oracle), propagates fake
tensors, and serializes by name (``torch.ops.fxforge.*``).

``fxforge::linear(x, weight, bias, activation, residual, out_dtype)`` is a matmul with its
epilogue folded in::

    y = act(x @ weight + bias) + residual        # then cast to out_dtype (default x.dtype)

``x`` is ``[M, K]``, ``weight`` is ``[K, N]`` (the second operand of ``mm``, usually a
transposed view of an ``nn.Linear`` weight), ``bias`` ``[N]``, ``residual`` ``[M, N]``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

# activation name -> function; the names are part of the IR (serialized as strings).
ACTIVATIONS = {
    "none": lambda y: y,
    "relu": torch.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda y: F.gelu(y, approximate="tanh"),
    "silu": F.silu,
}


def _check(x, weight, bias, activation, residual) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"fxforge::linear: unknown activation {activation!r}; one of {sorted(ACTIVATIONS)}")
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[0]:
        raise ValueError(f"fxforge::linear: x {list(x.shape)} and weight {list(weight.shape)} "
                         "do not form [M, K] @ [K, N]")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[1]):
        raise ValueError(f"fxforge::linear: bias {list(bias.shape)} is not [N={weight.shape[1]}]")
    if residual is not None and list(residual.shape) != [x.shape[0], weight.shape[1]]:
        raise ValueError(f"fxforge::linear: residual {list(residual.shape)} is not "
                         f"[{x.shape[0]}, {weight.shape[1]}]")


@torch.library.custom_op("fxforge::linear", mutates_args=())
def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], activation: str,
           residual: Optional[torch.Tensor], out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Reference: the same ATen ops, in the same order, as the unfused graph (bit-exact)."""
    _check(x, weight, bias, activation, residual)
    y = torch.addmm(bias, x, weight) if bias is not None else torch.mm(x, weight)
    y = ACTIVATIONS[activation](y)
    if residual is not None:
        y = y + residual
    return y.to(out_dtype) if out_dtype is not None else y.clone() if y is x else y


@linear.register_fake
def _linear_fake(x, weight, bias, activation, residual, out_dtype=None):
    _check(x, weight, bias, activation, residual)
    dtype = out_dtype if out_dtype is not None else torch.promote_types(x.dtype, weight.dtype)
    if residual is not None and out_dtype is None:
        dtype = torch.promote_types(dtype, residual.dtype)
    return x.new_empty((x.shape[0], weight.shape[1]), dtype=dtype)


fxforge_linear = torch.ops.fxforge.linear.default
