"""Typed views of the ATen layout, reduction, cast, norm and factory ops passes read
(re-exported by :mod:`fxforge.irgraph.views`; the base is :class:`fxforge.irgraph.opview.OpView`)."""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch

from fxforge.irgraph.opview import OpView

aten = torch.ops.aten
prims = torch.ops.prims
frozen = dataclasses.dataclass(frozen=True)


# ---- layout (views and their copying twins) -------------------------------------------------

@frozen
class View(OpView):
    """``view``, ``_unsafe_view`` and ``reshape`` to ``size`` (``reshape`` calls it ``shape``)."""

    input: Any
    size: Any
    TARGETS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)
    RENAME = {"shape": "size"}


@frozen
class Permute(OpView):
    input: Any
    dims: Any
    TARGETS = (aten.permute.default,)


@frozen
class Transpose(OpView):
    input: Any
    dim0: int
    dim1: int
    TARGETS = (aten.transpose.int,)


@frozen
class T(OpView):
    """``t``: the transpose of a matrix."""

    input: Any
    TARGETS = (aten.t.default,)


@frozen
class Expand(OpView):
    input: Any
    size: Any
    implicit: bool = False
    TARGETS = (aten.expand.default,)


@frozen
class Unsqueeze(OpView):
    input: Any
    dim: int
    TARGETS = (aten.unsqueeze.default,)


@frozen
class Select(OpView):
    input: Any
    dim: int
    index: Any
    TARGETS = (aten.select.int,)


@frozen
class Slice(OpView):
    input: Any
    dim: int = 0
    start: Any = None
    end: Any = None
    step: Any = 1
    TARGETS = (aten.slice.Tensor,)


@frozen
class Cat(OpView):
    tensors: Any
    dim: int = 0
    TARGETS = (aten.cat.default,)


@frozen
class Split(OpView):
    """``split`` (one size), ``split_with_sizes`` (``split_sizes``), ``chunk`` (``chunks``)."""

    input: Any
    dim: int = 0
    split_size: Any = None
    split_sizes: Any = None
    chunks: Any = None
    TARGETS = (aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default)


@frozen
class RepeatInterleave(OpView):
    input: Any
    repeats: Any
    dim: Optional[int] = None
    TARGETS = (aten.repeat_interleave.self_int,)


@frozen
class Clone(OpView):
    input: Any
    memory_format: Any = None
    TARGETS = (aten.clone.default,)


# ---- casts ----------------------------------------------------------------------------------

@frozen
class ToCopy(OpView):
    """``_to_copy(input, *, dtype, ...)``: a cast (or a device/layout copy)."""

    input: Any
    dtype: Optional[torch.dtype] = None
    layout: Any = None
    device: Any = None
    memory_format: Any = None
    TARGETS = (aten._to_copy.default,)


@frozen
class ConvertElementType(OpView):
    """``prims.convert_element_type(input, dtype)``."""

    input: Any
    dtype: torch.dtype
    TARGETS = (prims.convert_element_type.default,)


# ---- reductions and normalisations ----------------------------------------------------------

@frozen
class Softmax(OpView):
    """``_softmax`` and ``_log_softmax`` along ``dim``."""

    input: Any
    dim: int
    half_to_float: bool = False
    TARGETS = (aten._softmax.default, aten._log_softmax.default)


@frozen
class Reduction(OpView):
    """An op that combines values along ``dim`` (one int, a list, or None/[] for all)."""

    input: Any
    dim: Any = None
    TARGETS = (aten.sum.dim_IntList, aten.mean.dim, aten.amax.default, aten.amin.default,
               aten._softmax.default, aten._log_softmax.default, aten.cumsum.default,
               aten.cumprod.default, aten.sort.default, aten.topk.default, aten.argmax.default,
               aten.argmin.default, aten.logsumexp.default, aten.max.dim, aten.min.dim,
               aten.var.correction, aten.std.correction)

    def dims(self, rank: int) -> list[int]:
        """The reduced dims, non-negative (all of them when ``dim`` is None or empty)."""
        if self.dim is None or (isinstance(self.dim, (list, tuple)) and not self.dim):
            return list(range(rank))
        dims = self.dim if isinstance(self.dim, (list, tuple)) else [self.dim]
        return [d % rank for d in dims] if rank else []


@frozen
class LayerNorm(OpView):
    """``native_layer_norm`` (results: output, mean, rstd)."""

    input: Any
    normalized_shape: Any
    weight: Any
    bias: Any
    eps: float
    TARGETS = (aten.native_layer_norm.default,)


@frozen
class RmsNorm(OpView):
    """``rms_norm`` and ``_fused_rms_norm`` (results: output, rstd)."""

    input: Any
    normalized_shape: Any
    weight: Any = None
    eps: Optional[float] = None
    TARGETS = (aten.rms_norm.default, aten._fused_rms_norm.default)


# ---- elementwise with options, selection, factories ------------------------------------------

@frozen
class Neg(OpView):
    input: Any
    TARGETS = (aten.neg.default,)


@frozen
class Gelu(OpView):
    input: Any
    approximate: str = "none"
    TARGETS = (aten.gelu.default,)


@frozen
class Where(OpView):
    condition: Any
    input: Any
    other: Any
    TARGETS = (aten.where.self,)


@frozen
class MaskedFill(OpView):
    input: Any
    mask: Any
    value: Any
    TARGETS = (aten.masked_fill.Scalar,)


@frozen
class Full(OpView):
    size: Any
    fill_value: Any
    dtype: Optional[torch.dtype] = None
    TARGETS = (aten.full.default,)


@frozen
class Arange(OpView):
    """``arange(end)``, ``arange(start, end)``, ``arange(start, end, step)``."""

    end: Any
    start: Any = 0
    step: Any = 1
    dtype: Optional[torch.dtype] = None
    TARGETS = (aten.arange.default, aten.arange.start, aten.arange.start_step)


@frozen
class SymSize(OpView):
    """``sym_size.int(input, dim)``: one (symbolic) size of a tensor."""

    input: Any
    dim: int
    TARGETS = (aten.sym_size.int,)
