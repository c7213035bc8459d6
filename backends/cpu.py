"""The CPU backend: fused groups as generated C++, linears on oneDNN/MKL with prepacked weights
and fused post-ops, attention on fxforge's tiled C++ kernel (short fp32 prefills) or PyTorch's
CPU flash-attention kernel; the rest on ATen.

Which matmul path runs (AMX-BF16, AVX512-BF16, VNNI, fp32) is decided at compile time from the
CPU's runtime-detected features (``fxforge.kernels.cpu_isa``); bf16 weights meet a CPU without
native bf16 by being computed in fp32, and the report says so.
"""
from __future__ import annotations

import logging
from typing import Callable, Optional

import torch
import torch.fx as fx

from fxforge.backends.base import register_backend
from fxforge.backends.kernel_lowering import (LINEAR_OPS, Bound, KernelTable, attention_operands,
                                               linear_operands, lower_to_kernels)
from fxforge.backends.reference import ReferenceBackend
from fxforge.irgraph import TensorMeta
from fxforge.irgraph.query import tensor_meta
from fxforge.irgraph.views import (BlockSparseAttention, CachedAttention, CachedBlockSparseAttention,
                                   CachedLinearAttention, CachedPerHeadAttention,
                                   CachedWindowAttention, LinearAttention, PerHeadAttention,
                                   WindowAttention)
from fxforge.irgraph.weight_format import QUANTIZED, W8A8

log = logging.getLogger("fxforge.backends")
aten = torch.ops.aten


def _fused_cpu(sub: fx.GraphModule) -> tuple[Callable, str]:
    from fxforge.kernels.cpu_isa import hardware
    from fxforge.kernels.fused_cpp import compile_fused_cpu
    kernel = compile_fused_cpu(sub)
    features = hardware()  # what -march=native built for, not an FXFORGE_CPU_ISA pretence
    isa = "AVX-512" if features.avx512f else "AVX2" if features.avx2 else "scalar"
    return kernel, f"generated C++ ({isa})"


def _attention_path(args: tuple, is_causal: bool) -> str:
    """The path ``cpu_attention`` takes for the traced inputs (their fake values decide it as
    real ones would), or what it chooses between when the shapes are symbolic."""
    from fxforge.kernels.attention_cpu import describe_attention
    vals = [a.meta.get("val") if isinstance(a, fx.Node) else a for a in args]
    static = all(isinstance(m, TensorMeta) and m.is_static for m in map(tensor_meta, args[:3]))
    if static and all(isinstance(v, torch.Tensor) for v in vals[:3]) and \
            (vals[3] is None or isinstance(vals[3], torch.Tensor)):
        return describe_attention(*vals, is_causal=is_causal)
    return "CPU attention: tiled C++ kernel or PyTorch's flash kernel, by shape at run time"


def _quantized_linear(ops, weight: torch.Tensor, bias: Optional[torch.Tensor], constant) -> tuple:
    """(kernel, description, reason) of a linear in a quantized weight format; the caller adds
    the arguments. Raises (the linear then runs its reference, the reason logged) where the
    kernel cannot build or take the tensors."""
    from fxforge.kernels.quant_linear_cpu import QuantLinear
    scales = constant(ops.scales)
    offsets = constant(ops.offsets) if ops.offsets is not None else None
    if ops.weight_format == W8A8:   # offsets: its smoothing vector (irgraph/weight_format.py)
        from fxforge.kernels.w8a8_cpu import W8A8Linear
        kernel = W8A8Linear(weight, scales, offsets, bias, ops.activation,
                            ops.residual is not None, ops.out_dtype)
        return kernel, kernel.describe(), f"weight format {W8A8}"
    kernel = QuantLinear(ops.weight_format, weight, scales, offsets, bias, ops.activation,
                         ops.residual is not None, ops.out_dtype)
    return kernel, kernel.describe(), f"weight format {ops.weight_format}"


def _with_scales(q, k, v, k_cache, v_cache, cache_pos, k_scale=None, v_scale=None, *, kernel,
                 **fixed):
    """A cached-attention kernel called with the op's tensors in order (``CachedAttention.tensors``:
    an int8 cache's scales last) and its other arguments as keywords."""
    return kernel(q, k, v, k_cache, v_cache, cache_pos, k_scale=k_scale, v_scale=v_scale, **fixed)


def make_table() -> KernelTable:
    table = KernelTable("cpu", _fused_cpu)

    @table.rule(*LINEAR_OPS)
    def linear(node: fx.Node, constant) -> Optional[tuple]:
        from fxforge.kernels.linear_cpu_tuning import tuned_linear
        ops = linear_operands(node)
        if ops is None:
            return None
        weight = constant(ops.weight)
        bias = constant(ops.bias) if ops.bias is not None else None
        if weight is None or (ops.bias is not None and bias is None):
            return None  # activations times activations: ATen's matmul
        meta = tensor_meta(ops.x)
        if meta is None or meta.dtype not in (torch.float32, torch.bfloat16) or meta.rank != 2:
            return None
        args = (ops.x, ops.residual) if ops.residual is not None else (ops.x,)
        if ops.weight_format in QUANTIZED:
            kernel, description, reason = _quantized_linear(ops, weight, bias, constant)
            return kernel, args, description, reason
        varying = not isinstance(meta.shape[0], int)
        rows = 128 if varying else meta.shape[0]  # dynamic M: pack for prefill, GEMV for decode
        packed = tuned_linear(weight, bias, ops.activation, ops.residual is not None, ops.out_dtype,
                              rows, varying, ops.weight_format)
        return packed, args, packed.describe(), packed.path.reason

    @table.rule(aten.scaled_dot_product_attention.default)
    def attention(node: fx.Node, constant) -> Optional[tuple]:
        from fxforge.kernels.attention_cpu import cpu_attention
        ops = attention_operands(node)
        if ops is None:
            return None
        call = Bound("cpu_attention", cpu_attention, is_causal=ops["is_causal"], scale=ops["scale"],
                     enable_gqa=ops["enable_gqa"])
        args = (ops["query"], ops["key"], ops["value"], ops["attn_mask"])
        return call, args, _attention_path(args, ops["is_causal"]), ""

    @table.rule(torch.ops.fxforge.cached_attention.default)
    def cached_attention(node: fx.Node, constant) -> Optional[tuple]:
        from fxforge.kernels.decode_attention_cpu import cpu_cached_attention, cpu_decode_path
        op = CachedAttention.of(node)
        tensors = list(op.tensors)
        call = Bound("cpu_cached_attention", _with_scales, kernel=cpu_cached_attention,
                     scale=op.scale)
        vals = [n.meta.get("val") if isinstance(n, fx.Node) else None for n in tensors]
        static = all(isinstance(v, torch.Tensor) for v in vals) and \
            all(isinstance(m, TensorMeta) and m.is_static for m in map(tensor_meta, tensors))
        reason = cpu_decode_path(*vals) if static else "C++ decode kernel where the layout allows"
        return call, tensors, "CPU cached attention (decode)", reason

    @table.rule(torch.ops.fxforge.window_attention.default)
    def window_attention(node: fx.Node, constant) -> Optional[tuple]:
        from fxforge.kernels.window_attention_cpu import cpu_window_attention
        op = WindowAttention.of(node)
        call = Bound("cpu_window_attention", cpu_window_attention, window=op.window,
                     sinks=op.sinks, scale=op.scale)
        return (call, (op.q, op.k, op.v), f"CPU sliding-window attention (window {op.window}, "
                f"sinks {op.sinks})", "query blocks attend to the keys they can see")

    @table.rule(torch.ops.fxforge.cached_window_attention.default)
    def cached_window_attention(node: fx.Node, constant) -> Optional[tuple]:
        from fxforge.kernels.window_attention_cpu import cpu_cached_window_attention
        op = CachedWindowAttention.of(node)
        call = Bound("cpu_cached_window_attention", _with_scales,
                     kernel=cpu_cached_window_attention, window=op.window, sinks=op.sinks,
                     scale=op.scale)
        return (call, list(op.tensors), f"CPU sliding-window cached attention ({op.window} + "
                f"{op.sinks} slots)", "C++ decode kernel on the ring for one new position")

    @table.rule(torch.ops.fxforge.block_sparse_attention.default)
    def block_sparse_attention(node: fx.Node, constant) -> Optional[tuple]:
        from fxforge.kernels.sparse_attention_cpu import cpu_block_sparse_attention
        op = BlockSparseAttention.of(node)
        call = Bound("cpu_block_sparse_attention", cpu_block_sparse_attention,
                     patterns=op.patterns, block=op.block, scale=op.scale)
        return (call, (op.q, op.k, op.v), f"CPU block-sparse attention (blocks of {op.block})",
                "C++ kernel reads only the key blocks of each query block's pattern")

    @table.rule(torch.ops.fxforge.cached_block_sparse_attention.default)
    def cached_block_sparse_attention(node: fx.Node, constant) -> Optional[tuple]:
        from fxforge.kernels.sparse_attention_cpu import cpu_cached_block_sparse_attention
        op = CachedBlockSparseAttention.of(node)
        call = Bound("cpu_cached_block_sparse_attention", cpu_cached_block_sparse_attention,
                     patterns=op.patterns, block=op.block, scale=op.scale)
        return (call, list(op.tensors), "CPU cached attention, block-sparse prefill",
                "block-sparse kernel over an empty cache, C++ decode kernel after")

    @table.rule(torch.ops.fxforge.per_head_attention.default)
    def per_head_attention(node: fx.Node, constant) -> Optional[tuple]:
        from fxforge.kernels.sparse_attention_cpu import cpu_per_head_attention
        op = PerHeadAttention.of(node)
        call = Bound("cpu_per_head_attention", cpu_per_head_attention, streaming=op.streaming,
                     window=op.window, sinks=op.sinks, scale=op.scale)
        return (call, (op.q, op.k, op.v), f"CPU per-head attention ({sum(op.streaming)} of "
                f"{len(op.streaming)} k/v heads streaming)", "full heads causal, streaming "
                "heads on the sliding-window kernel")

    @table.rule(torch.ops.fxforge.cached_per_head_attention.default)
    def cached_per_head_attention(node: fx.Node, constant) -> Optional[tuple]:
        from fxforge.kernels.sparse_attention_cpu import cpu_cached_per_head_attention
        op = CachedPerHeadAttention.of(node)
        call = Bound("cpu_cached_per_head_attention", cpu_cached_per_head_attention,
                     streaming=op.streaming, window=op.window, sinks=op.sinks, scale=op.scale)
        return (call, list(op.tensors), "CPU per-head cached attention",
                "full heads on the cache, streaming heads on the ring")
    @table.rule(torch.ops.fxforge.linear_attention.default)
    def linear_attention(node: fx.Node, constant) -> Optional[tuple]:
        from fxforge.kernels.linear_attention_cpu import CHUNK, cpu_linear_attention
        op = LinearAttention.of(node)
        maps = [m for m in (op.q_map, op.k_map) if m is not None]
        call = Bound("cpu_linear_attention", _maps_last(cpu_linear_attention, 3, len(maps)),
                     feature=op.feature, window=op.window, scale=op.scale)
        return (call, (op.q, op.k, op.v, *maps), f"CPU linear attention ({op.feature}, window "
                f"{op.window})", f"chunks of {CHUNK} queries and a running state: O(length)")

    @table.rule(torch.ops.fxforge.cached_linear_attention.default)
    def cached_linear_attention(node: fx.Node, constant) -> Optional[tuple]:
        from fxforge.kernels.linear_attention_cpu import cpu_cached_linear_attention
        op = CachedLinearAttention.of(node)
        tensors = [t for t in op.tensors if t is not None]
        maps = [m for m in (op.q_map, op.k_map) if m is not None]
        kernel = _maps_last(_ring_optional(cpu_cached_linear_attention, op.window), len(tensors),
                            len(maps))
        call = Bound("cpu_cached_linear_attention", kernel, feature=op.feature, window=op.window,
                     scale=op.scale)
        return (call, (*tensors, *maps), f"CPU cached linear attention ({op.feature}, window "
                f"{op.window})", "a recurrent step on a fixed-size state for one new position")

    return table


def _maps_last(kernel: Callable, operands: int, maps: int) -> Callable:
    """``kernel`` called with its ``operands`` tensors then the fitted maps (if any) as the
    keyword arguments ``q_map``/``k_map``: the lowered graph passes tensors only, in order."""
    def call(*tensors, **fixed):
        named = dict(zip(("q_map", "k_map"), tensors[operands:])) if maps else {}
        return kernel(*tensors[:operands], **named, **fixed)
    return call


def _ring_optional(kernel: Callable, window: int) -> Callable:
    """Without a window the cached op has no ring: its k_cache/v_cache are None (not passed)."""
    if window:
        return kernel
    return lambda q, k, v, state, cache_pos, **kw: kernel(q, k, v, state, None, None, cache_pos,
                                                          **kw)


class CPUBackend(ReferenceBackend):
    """Supports what the reference backend supports; lowers what it has kernels for."""

    name = "cpu"

    def __init__(self):
        self.table = make_table()

    def precision_unsupported(self, precision: str) -> Optional[str]:
        """Why ``precision`` does not run as low-precision math here, or None. bf16 math runs
        only with AMX tiles: with AVX512-BF16 alone, a bf16 graph (a cast around every op)
        decoded slower than fp32 math on bf16-stored weights, which read the same bytes
        (bench/generate.py, recorded in bench/RESULTS.md), so bf16 becomes weight-only there."""
        from fxforge.kernels.cpu_isa import choose_matmul_path
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        path = choose_matmul_path(dtype)
        if path.compute_dtype == torch.float32:
            return path.reason
        if path.name == "avx512_bf16":
            return (f"{path.reason}; bf16 math with casts measured slower than fp32 math on bf16 "
                    "weights on such CPUs")
        return None

    @property
    def weight_formats(self) -> frozenset:
        """bf16 too where the C++ GEMV and tiled GEMM build (they keep bf16 weights in bf16), and
        the quantized formats where the quantized GEMV builds."""
        from fxforge.kernels.gemv_cpu import gemv_unavailable
        from fxforge.kernels.quant_linear_cpu import QUANT_FORMATS, quant_gemv_unavailable
        formats = {"dense", "bf16"} if gemv_unavailable() is None else {"dense"}
        if quant_gemv_unavailable() is None:
            formats |= set(QUANT_FORMATS) & set(QUANTIZED)
        from fxforge.kernels.w8a8_cpu import w8a8_unavailable
        if w8a8_unavailable() is None:
            formats.add(W8A8)
        return frozenset(formats)

    def weight_only_precision(self, precision: str) -> Optional[str]:
        """bf16 without bf16 units: the C++ GEMV and tiled GEMM store bf16-valued weights in bf16
        (one shared pack), so decode reads half the bytes; the math stays fp32."""
        from fxforge.kernels.gemv_cpu import gemv_unavailable
        return "bf16_weights" if precision == "bf16" and gemv_unavailable() is None else None

    def compile_partition(self, gm: fx.GraphModule) -> Callable:
        lowered, _ = lower_to_kernels(gm, self.table)   # its choices travel with it
        return lowered


register_backend("cpu", CPUBackend)
