"""The Triton backend (GPUs): fused groups as generated Triton kernels, linears on the matmul
template with the epilogue fused, attention on the flash-attention kernel; static-shape graphs
replay as CUDA graphs. On a CPU it runs only under ``TRITON_INTERPRET=1`` (how CI tests it).
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Optional

import torch
import torch.fx as fx

from fxforge.backends.base import register_backend
from fxforge.backends.kernel_lowering import (LINEAR_OPS, Bound, KernelTable, attention_operands,
                                               linear_operands, lower_to_kernels)
from fxforge.backends.reference import ReferenceBackend
from fxforge.irgraph import META_KEY, TensorMeta

log = logging.getLogger("fxforge.backends")
aten = torch.ops.aten


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") not in ("", "0")


def _runs_here(node: fx.Node) -> bool:
    meta = node.meta.get(META_KEY)
    return isinstance(meta, TensorMeta) and (meta.device.type == "cuda" or interpreting())


def _fused_triton(sub: fx.GraphModule) -> tuple[Callable, str]:
    from fxforge.kernels.fused_triton import compile_fused_triton
    return compile_fused_triton(sub), "generated Triton"


def make_table() -> KernelTable:
    table = KernelTable("triton", _fused_triton)

    @table.rule(*LINEAR_OPS)
    def linear(node: fx.Node, constant) -> Optional[tuple]:
        from fxforge.kernels.matmul import triton_linear
        ops = linear_operands(node)
        if ops is None or not _runs_here(node):
            return None
        call = Bound("triton_linear", _linear_call, activation=ops.activation, out_dtype=ops.out_dtype,
                      has_bias=ops.bias is not None, has_residual=ops.residual is not None, fn=triton_linear)
        args = [a for a in (ops.x, ops.weight, ops.bias, ops.residual) if a is not None]
        return call, args, "Triton matmul template (fused epilogue)", f"activation={ops.activation}"

    @table.rule(aten.scaled_dot_product_attention.default)
    def attention(node: fx.Node, constant) -> Optional[tuple]:
        from fxforge.kernels.attention import triton_attention
        ops = attention_operands(node)
        if ops is None or not _runs_here(node):
            return None
        mask = ops["attn_mask"]
        call = Bound("triton_attention", _attention_call, fn=triton_attention, has_mask=mask is not None,
                      is_causal=ops["is_causal"], scale=ops["scale"], enable_gqa=ops["enable_gqa"])
        args = [ops["query"], ops["key"], ops["value"]] + ([mask] if mask is not None else [])
        return call, args, "Triton flash attention", "causal" if ops["is_causal"] else ""

    return table


def _linear_call(x, w, *rest, fn, activation, out_dtype, has_bias, has_residual):
    rest = list(rest)
    bias = rest.pop(0) if has_bias else None
    residual = rest.pop(0) if has_residual else None
    return fn(x, w, bias=bias, activation=activation, residual=residual, out_dtype=out_dtype)


def _attention_call(q, k, v, *mask, fn, has_mask, is_causal, scale, enable_gqa):
    return fn(q, k, v, attn_mask=mask[0] if has_mask else None, is_causal=is_causal, scale=scale,
              enable_gqa=enable_gqa)


class CUDAGraphRunner:
    """Replays a static-shape graph as one CUDA graph: inputs are copied into static buffers."""

    def __init__(self, fn: Callable, warmup: int = 2):
        self.fn, self.warmup, self.graph = fn, warmup, None
        self.static_inputs: list = []
        self.static_outputs = None
        self.signature = None

    def __call__(self, *args):
        signature = tuple((a.shape, a.dtype, a.device) if isinstance(a, torch.Tensor) else a for a in args)
        if self.graph is not None and signature != self.signature:
            return self.fn(*args)  # a shape the graph was not captured for
        if self.graph is None:
            if self.warmup > 0:
                self.warmup -= 1
                return self.fn(*args)
            self._capture(args, signature)
        for buf, arg in zip(self.static_inputs, args):
            if isinstance(buf, torch.Tensor):
                buf.copy_(arg)
        self.graph.replay()
        # Fresh outputs per call: the static ones are overwritten by the next replay.
        return torch.utils._pytree.tree_map(
            lambda t: t.clone() if isinstance(t, torch.Tensor) else t, self.static_outputs)

    def _capture(self, args, signature) -> None:
        self.signature = signature
        self.static_inputs = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
        self.graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        with torch.cuda.graph(self.graph):
            self.static_outputs = self.fn(*self.static_inputs)


def _static_cuda(gm: fx.GraphModule) -> bool:
    metas = [n.meta.get(META_KEY) for n in gm.graph.nodes if n.op == "placeholder"]
    return bool(metas) and all(isinstance(m, TensorMeta) and m.is_static and m.device.type == "cuda"
                               for m in metas)


class TritonBackend(ReferenceBackend):
    name = "triton"

    def __init__(self):
        self.report: list = []
        self.table = make_table()

    def compile_partition(self, gm: fx.GraphModule) -> Callable:
        lowered, choices = lower_to_kernels(gm, self.table)
        self.report.extend(choices)
        if _static_cuda(gm) and os.environ.get("FXFORGE_CUDA_GRAPHS", "1") != "0":
            runner = CUDAGraphRunner(lowered)
            runner.graph_module = lowered
            return runner
        return lowered


register_backend("triton", TritonBackend)
