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
        result = self.out_dtype or self._result_dtype(x, residual)
        if residual is not None and residual.dtype != torch.float32:
            residual = residual.float()
        y = self.kernel(x if x.dtype == torch.float32 else x.float(), residual)
        return y if y.dtype == result else y.to(result)

    @staticmethod
    def _result_dtype(x: torch.Tensor, residual: Optional[torch.Tensor]) -> torch.dtype:
        """The fake's rule (the decoded weight is fp32). The fp32 case is decided without
        ``torch.promote_types``: under a decode step's recording it is an ATen op the replay
        cannot hold (it reads dtypes into Python), and it would cost every step its replay."""
        if x.dtype == torch.float32 and (residual is None or residual.dtype == torch.float32):
            return torch.float32
        dtype = torch.promote_types(x.dtype, torch.float32)
        return dtype if residual is None else torch.promote_types(dtype, residual.dtype)

    def describe(self) -> str:
        return self.kernel.describe()
