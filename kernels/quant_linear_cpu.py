"""``fxforge::linear`` with a quantized weight format on the CPU: the op's tensors (IR orientation,
``[K, N]``-shaped views) handed to :class:`~fxforge.kernels.quant_gemv_cpu.QuantGemv` (``[N, K]``),
with the op's dtype rules around it (the reference decodes to fp32 and computes in fp32)."""
from __future__ import annotations

from typing import Optional

import torch

from fxforge.kernels.quant_gemv_cpu import QUANT_FORMATS, QuantGemv, quant_gemv_unavailable

__all__ = ["QuantLinear", "QUANT_FORMATS", "quant_gemv_unavailable"]


class QuantLinear:
    """``act(x @ decode(weight) + bias) + residual``, cast to ``out_dtype``; ``weight``,
    ``scales``, ``offsets`` as the op holds them (:mod:`fxforge.irgraph.weight_format`)."""

    def __init__(self, fmt: str, weight: torch.Tensor, scales: torch.Tensor,
                 offsets: Optional[torch.Tensor], bias: Optional[torch.Tensor], activation: str,
                 has_residual: bool, out_dtype: Optional[torch.dtype]):
        self.kernel = QuantGemv(fmt, weight.t().contiguous(), scales.t().contiguous(),
                                offsets.t().contiguous() if offsets is not None else None,
                                bias.detach().float() if bias is not None else None, activation)
        self.has_residual, self.out_dtype = has_residual, out_dtype

    def __call__(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        if (residual is not None) != self.has_residual:
            raise ValueError(f"QuantLinear was built with has_residual={self.has_residual}")
        dtype = torch.promote_types(x.dtype, torch.float32)   # the fake's rule: decoded W is fp32
        if residual is not None:
            dtype = torch.promote_types(dtype, residual.dtype)
            residual = residual if residual.dtype == torch.float32 else residual.float()
        y = self.kernel(x if x.dtype == torch.float32 else x.float(), residual)
        result = self.out_dtype or dtype
        return y if y.dtype == result else y.to(result)

    def describe(self) -> str:
        return self.kernel.describe()
