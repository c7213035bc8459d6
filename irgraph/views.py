"""Typed op views: the one place that knows where an op keeps its arguments.

``Linear.of(node)`` is a frozen dataclass with the fields ``x, weight, bias, activation,
residual, out_dtype`` of a ``fxforge::linear`` call (None when ``node`` is another op);
``Sdpa.of(node)``, ``CachedAttention.of(node)``, ``Mm.of(node)``, ... likewise. Passes and
backends read op arguments only through these (see :mod:`fxforge.irgraph.opview` for the base:
``of``, ``replace``, ``arguments``, ``create``). The layout, reduction, cast and norm views are in
:mod:`fxforge.irgraph.views_aten` and importable from here too.

To add a view: a frozen dataclass subclass of :class:`OpView` with ``TARGETS`` and one field per
schema argument the callers read (``self``/``a`` are called ``input``), at the end of a file.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch

from fxforge.irgraph import linear_ops as _linear_ops, ops as _ops  # noqa: F401  (register ops)
from fxforge.irgraph import per_head_ops as _per_head_ops, sparse_ops as _sparse_ops  # noqa: F401
from fxforge.irgraph import window_ops as _window_ops  # noqa: F401
from fxforge.irgraph.opview import OpView
from fxforge.irgraph.views_aten import (  # noqa: F401  (re-exported)
    Arange, Cat, Clone, ConvertElementType, Expand, Full, Gelu, LayerNorm, MaskedFill, Neg, Permute,
    Reduction, RepeatInterleave, RmsNorm, Select, Slice, Softmax, Split, SymSize, T, ToCopy,
    Transpose, Unsqueeze, View, Where)

__all__ = ["LINEAR_TARGETS", "Addmm", "Arange", "Baddbmm", "BlockSparseAttention", "Bmm",
           "CachedAttention", "CachedBlockSparseAttention", "CachedLinearAttention",
           "CachedPerHeadAttention", "CachedWindowAttention", "Cat", "Clone", "Contraction",
           "ConvertElementType", "Expand", "Full", "Gelu", "LayerNorm", "Linear",
           "LinearAttention", "LinearOperands", "MaskedFill", "Matmul", "Mm", "Neg", "OpView",
           "PerHeadAttention", "Permute", "Reduction", "RepeatInterleave", "RmsNorm", "Sdpa",
           "SdpaFlashCpu", "Select", "Slice", "Softmax", "Split", "SymSize", "T", "ToCopy",
           "Transpose", "Unsqueeze", "View", "Where", "WindowAttention"]
aten = torch.ops.aten
frozen = dataclasses.dataclass(frozen=True)


# ---- fxforge's own ops ------------------------------------------------------------------------

@frozen
class Linear(OpView):
    """``fxforge::linear``: ``act(x @ weight + bias) + residual``, cast to ``out_dtype``;
    ``weight_format``: how the weight is stored (:mod:`fxforge.irgraph.weight_format`)."""

    x: Any
    weight: Any
    bias: Any
    activation: str
    residual: Any
    out_dtype: Optional[torch.dtype] = None
    weight_format: str = "dense"
    scales: Any = None      # the quantized formats' extra tensors (irgraph/weight_format.py)
    offsets: Any = None
    TARGETS = (torch.ops.fxforge.linear.default,)


@frozen
class CachedAttention(OpView):
    """``fxforge::cached_attention``: causal attention of new positions against a KV cache."""

    q: Any
    k: Any
    v: Any
    k_cache: Any
    v_cache: Any
    cache_pos: Any
    scale: Optional[float] = None
    k_scale: Any = None     # int8 caches: their per-row scales (irgraph/kv_quant.py)
    v_scale: Any = None
    TARGETS = (torch.ops.fxforge.cached_attention.default,)

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None

    @property
    def tensors(self) -> tuple:
        """The tensor operands in the op's order (what a kernel call passes), the scales last
        where the caches are int8."""
        scales = (self.k_scale, self.v_scale) if self.quantized else ()
        return (self.q, self.k, self.v, self.k_cache, self.v_cache, self.cache_pos, *scales)


@frozen
class WindowAttention(OpView):
    """``fxforge::window_attention``: causal attention to the first ``sinks`` and the last
    ``window`` keys (:mod:`fxforge.irgraph.window_ops`)."""

    q: Any
    k: Any
    v: Any
    window: int
    sinks: int
    scale: Optional[float] = None
    TARGETS = (torch.ops.fxforge.window_attention.default,)


@frozen
class CachedWindowAttention(CachedAttention):
    """``fxforge::cached_window_attention``: :class:`WindowAttention` over a cache of
    ``sinks + window`` slots (a ring past the sinks); the cached operands as
    :class:`CachedAttention`'s."""

    window: int = dataclasses.field(kw_only=True)
    sinks: int = dataclasses.field(kw_only=True)
    TARGETS = (torch.ops.fxforge.cached_window_attention.default,)


@frozen
class BlockSparseAttention(OpView):
    """``fxforge::block_sparse_attention``: causal attention in which each query block reads
    the key blocks of its pattern (:mod:`fxforge.irgraph.sparse_ops`); ``patterns``: five
    integers per pattern, one pattern or one per query head."""

    q: Any
    k: Any
    v: Any
    patterns: list
    block: int
    scale: Optional[float] = None
    TARGETS = (torch.ops.fxforge.block_sparse_attention.default,)


@frozen
class CachedBlockSparseAttention(CachedAttention):
    """``fxforge::cached_block_sparse_attention``: :class:`CachedAttention` whose prefill over
    an empty cache keeps a block-sparse pattern."""

    patterns: list = dataclasses.field(kw_only=True)
    block: int = dataclasses.field(kw_only=True)
    TARGETS = (torch.ops.fxforge.cached_block_sparse_attention.default,)


@frozen
class PerHeadAttention(OpView):
    """``fxforge::per_head_attention``: causal attention, the k/v heads flagged in
    ``streaming`` (and their query heads) restricted to ``sinks`` plus a ``window``
    (:mod:`fxforge.irgraph.per_head_ops`)."""

    q: Any
    k: Any
    v: Any
    streaming: list
    window: int
    sinks: int
    scale: Optional[float] = None
    TARGETS = (torch.ops.fxforge.per_head_attention.default,)


@frozen
class CachedPerHeadAttention(OpView):
    """``fxforge::cached_per_head_attention``: :class:`PerHeadAttention` over a full cache for
    the full heads and a bounded ``sinks + window`` ring for the streaming ones."""

    q: Any
    k: Any
    v: Any
    k_full: Any
    v_full: Any
    k_stream: Any
    v_stream: Any
    cache_pos: Any
    streaming: list
    window: int
    sinks: int
    scale: Optional[float] = None
    TARGETS = (torch.ops.fxforge.cached_per_head_attention.default,)

    @property
    def tensors(self) -> tuple:
        return (self.q, self.k, self.v, self.k_full, self.v_full, self.k_stream, self.v_stream,
                self.cache_pos)


@frozen
class LinearAttention(OpView):
    """``fxforge::linear_attention``: a softmax over the last ``window`` keys and feature-map
    linear attention over the older ones (:mod:`fxforge.irgraph.linear_ops`)."""

    q: Any
    k: Any
    v: Any
    feature: str
    window: int
    scale: Optional[float] = None
    q_map: Any = None
    k_map: Any = None
    TARGETS = (torch.ops.fxforge.linear_attention.default,)


@frozen
class CachedLinearAttention(LinearAttention):
    """``fxforge::cached_linear_attention``: :class:`LinearAttention` over a fixed-size state
    ``[B, Hkv, F, Dv + 1]`` and a ring of the last ``window`` keys and values."""

    state: Any = dataclasses.field(kw_only=True)
    k_cache: Any = dataclasses.field(kw_only=True)
    v_cache: Any = dataclasses.field(kw_only=True)
    cache_pos: Any = dataclasses.field(kw_only=True)
    TARGETS = (torch.ops.fxforge.cached_linear_attention.default,)

    @property
    def tensors(self) -> tuple:
        """The tensor operands in the op's order (what a kernel call passes)."""
        return (self.q, self.k, self.v, self.state, self.k_cache, self.v_cache, self.cache_pos)


# ---- attention ------------------------------------------------------------------------------

@frozen
class Sdpa(OpView):
    """``aten.scaled_dot_product_attention`` (fxforge's canonical fused attention)."""

    query: Any
    key: Any
    value: Any
    attn_mask: Any = None
    dropout_p: float = 0.0
    is_causal: bool = False
    scale: Optional[float] = None
    enable_gqa: bool = False
    TARGETS = (aten.scaled_dot_product_attention.default,)


@frozen
class SdpaFlashCpu(OpView):
    """``aten._scaled_dot_product_flash_attention_for_cpu`` (what dynamo may dispatch SDPA to;
    results: output, logsumexp)."""

    query: Any
    key: Any
    value: Any
    dropout_p: float = 0.0
    is_causal: bool = False
    attn_mask: Any = None
    scale: Optional[float] = None
    TARGETS = (aten._scaled_dot_product_flash_attention_for_cpu.default,)


# ---- contractions ---------------------------------------------------------------------------

@frozen
class Mm(OpView):
    """``mm(input, mat2)``: ``[M, K] @ [K, N]``."""

    input: Any
    mat2: Any
    TARGETS = (aten.mm.default,)


@frozen
class Bmm(OpView):
    input: Any
    mat2: Any
    TARGETS = (aten.bmm.default,)


@frozen
class Addmm(OpView):
    """``addmm(input, mat1, mat2, beta, alpha) = beta * input + alpha * mat1 @ mat2``."""

    input: Any
    mat1: Any
    mat2: Any
    beta: Any = 1
    alpha: Any = 1
    TARGETS = (aten.addmm.default,)

    @property
    def plain(self) -> bool:
        """``input + mat1 @ mat2``: no scaling (what a linear with a bias is)."""
        return self.beta == 1 and self.alpha == 1


@frozen
class Baddbmm(OpView):
    """``baddbmm(input, batch1, batch2, beta, alpha)``."""

    input: Any
    batch1: Any
    batch2: Any
    beta: Any = 1
    alpha: Any = 1
    TARGETS = (aten.baddbmm.default,)


@frozen
class Matmul(OpView):
    input: Any
    other: Any
    TARGETS = (aten.matmul.default,)


@frozen
class Contraction:
    """Any matrix product read the same way: ``a @ b`` (batched or not), plus an optional
    added term. Covers mm, bmm, matmul, addmm, baddbmm and ``fxforge::linear``."""

    node: Any
    a: Any
    b: Any
    added: Any = None

    @classmethod
    def of(cls, node: Any) -> Optional["Contraction"]:
        if (v := Mm.of(node) or Bmm.of(node)) is not None:
            return cls(node, v.input, v.mat2)
        if (m := Matmul.of(node)) is not None:
            return cls(node, m.input, m.other)
        if (a := Addmm.of(node)) is not None:
            return cls(node, a.mat1, a.mat2, a.input)
        if (b := Baddbmm.of(node)) is not None:
            return cls(node, b.batch1, b.batch2, b.input)
        if (lin := Linear.of(node)) is not None:
            return cls(node, lin.x, lin.weight, lin.bias)
        return None


@frozen
class LinearOperands:
    """A 2-D matmul with a constant-weight shape, as the linear kernels take it: ``fxforge::linear``,
    ``addmm(bias, x, w)`` without scaling, or ``mm(x, w)``; ``weight`` is ``[K, N]``."""

    x: Any
    weight: Any
    bias: Any = None
    activation: str = "none"
    residual: Any = None
    out_dtype: Optional[torch.dtype] = None
    weight_format: str = "dense"   # aten's matmuls: the weight as it is
    scales: Any = None
    offsets: Any = None

    @classmethod
    def of(cls, node: Any) -> Optional["LinearOperands"]:
        if (lin := Linear.of(node)) is not None:
            return cls(lin.x, lin.weight, lin.bias, lin.activation, lin.residual, lin.out_dtype,
                       lin.weight_format, lin.scales, lin.offsets)
        if (addmm := Addmm.of(node)) is not None:
            return cls(addmm.mat1, addmm.mat2, addmm.input) if addmm.plain else None
        if (mm := Mm.of(node)) is not None:
            return cls(mm.input, mm.mat2)
        return None


LINEAR_TARGETS = (Linear.TARGETS[0], Addmm.TARGETS[0], Mm.TARGETS[0])


# ---- added by the attention canonicalisation (irgraph/layout.py) ----------------------

@frozen
class Squeeze(OpView):
    """``squeeze`` of every size-1 dim (``dim`` None) or of ``dim`` (an int or a list)."""

    input: Any
    dim: Any = None
    TARGETS = (aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default)

    def squeezed(self, rank: int) -> Optional[list[int]]:
        """The dims named (non-negative), or None for every size-1 dim."""
        if self.dim is None:
            return None
        return [d % rank for d in (self.dim if isinstance(self.dim, (list, tuple)) else [self.dim])]


@frozen
class Alias(OpView):
    """``alias`` and ``lift_fresh_copy``: the same values."""

    input: Any
    TARGETS = (aten.alias.default, aten.lift_fresh_copy.default)
