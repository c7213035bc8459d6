"""The Triton backend (GPUs): fused groups as generated Triton kernels, linears on the matmul
template with the epilogue fused, attention on the flash-attention kernel; static-shape graphs
replay as CUDA graphs. On a CPU it runs only under ``TRITON_INTERPRET=1`` (how CI tests it).
"""
from __future__ import annotations

import importlib.util
import logging
import os
import threading
from typing import Callable, Optional

import torch
import torch.fx as fx

from fxforge.backends.base import register_backend
from fxforge.backends.kernel_lowering import (LINEAR_OPS, Bound, KernelTable, attention_operands,
                                               linear_operands, lower_to_kernels)
from fxforge.backends.reference import ReferenceBackend
from fxforge.irgraph import TensorMeta
from fxforge.irgraph.query import tensor_meta
from fxforge.irgraph.views import CachedAttention
from fxforge.irgraph.weight_format import DENSE, not_implemented_by
from fxforge.kernels.tuning import bucket
from fxforge.kernels.tuning import current as tuning_session

log = logging.getLogger("fxforge.backends")
aten = torch.ops.aten


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") not in ("", "0")


def unavailable() -> Optional[str]:
    """Why Triton kernels cannot run in this process, or None. Its interpreter
    (``TRITON_INTERPRET=1``) runs them on the CPU; otherwise Triton needs the driver of a GPU
    (its own test: without one its first launch fails with "0 active drivers")."""
    if importlib.util.find_spec("triton") is None:
        return "needs the triton package (pip install triton)"
    if interpreting():
        return None
    from triton.backends import backends as triton_backends
    if any(b.driver.is_active() for b in triton_backends.values()):
        return None
    return (f"needs a GPU that Triton can drive (CUDA or ROCm); none is visible here "
            f"(torch.cuda.is_available() is {torch.cuda.is_available()}). Use backend='cpu' or "
            "'auto', or set TRITON_INTERPRET=1 to run the Triton kernels in Triton's (slow) "
            "interpreter on the CPU")


def _runs_here(node: fx.Node) -> bool:
    meta = tensor_meta(node)
    return meta is not None and (meta.device.type == "cuda" or interpreting())


def _fused_triton(sub: fx.GraphModule) -> tuple[Callable, str]:
    from fxforge.kernels.triton_tuning import compile_tuned_fused
    kernel = compile_tuned_fused(sub)  # the tuning session's config, if one is open
    return kernel, "generated Triton" + (f" (tuned {kernel.config.describe()})" if kernel.config else "")


def make_table() -> KernelTable:
    table = KernelTable("triton", _fused_triton)

    @table.rule(*LINEAR_OPS)
    def linear(node: fx.Node, constant) -> Optional[tuple]:
        from fxforge.kernels.matmul import triton_linear
        ops = linear_operands(node)
        if ops is None or not _runs_here(node):
            return None
        from fxforge.kernels.quant_triton import FORMATS as QUANTIZED_FORMATS
        if ops.weight_format in QUANTIZED_FORMATS:
            return _quantized_linear(node, ops)
        if ops.weight_format != DENSE:   # the op's reference decodes it (logged as a fallback)
            raise not_implemented_by("Triton matmul", ops.weight_format, (DENSE, *QUANTIZED_FORMATS))
        tuned = _tuned_linear(node, ops)
        call = Bound("triton_linear", _linear_call, activation=ops.activation, out_dtype=ops.out_dtype,
                      has_bias=ops.bias is not None, has_residual=ops.residual is not None, fn=triton_linear,
                      tuned=tuned)
        args = [a for a in (ops.x, ops.weight, ops.bias, ops.residual) if a is not None]
        return call, args, "Triton matmul template (fused epilogue)", \
            f"activation={ops.activation}" + _tuned_note(tuned)

    @table.rule(aten.scaled_dot_product_attention.default)
    def attention(node: fx.Node, constant) -> Optional[tuple]:
        from fxforge.kernels.attention import triton_attention
        ops = attention_operands(node)
        if ops is None or not _runs_here(node):
            return None
        mask = ops["attn_mask"]
        tuned = _tuned_attention(ops)
        call = Bound("triton_attention", _attention_call, fn=triton_attention, has_mask=mask is not None,
                      is_causal=ops["is_causal"], scale=ops["scale"], enable_gqa=ops["enable_gqa"],
                      tuned=tuned)
        args = [ops["query"], ops["key"], ops["value"]] + ([mask] if mask is not None else [])
        return call, args, "Triton flash attention", \
            ("causal" if ops["is_causal"] else "") + _tuned_note(tuned)

    @table.rule(torch.ops.fxforge.cached_attention.default)
    def cached_attention(node: fx.Node, constant) -> Optional[tuple]:
        from fxforge.kernels.decode_attention import triton_cached_attention
        op = CachedAttention.of(node)
        tensors, scale = list(op.tensors), op.scale
        metas = [tensor_meta(n) for n in tensors[:5]]
        if op.quantized or not _runs_here(node) or not all(isinstance(m, TensorMeta) for m in metas) \
                or len({m.dtype for m in metas}) != 1:
            return None  # mixed dtypes (a cache of another precision, int8): the op's ATen reference
        call = Bound("triton_cached_attention", triton_cached_attention, scale=scale)
        return call, tensors, "Triton split-K decode attention", ""

    return table


def _quantized_linear(node: fx.Node, ops) -> tuple:
    """A linear in a quantized format on the dequant-fused kernels: the split-K GEMV for a
    call of few rows (decode), the matmul for more (chosen per call, by its rows)."""
    from fxforge.kernels.quant_triton import triton_quant_linear
    tuned = _tuned_linear(node, ops)
    call = Bound("triton_quant_linear", _quant_linear_call, fn=triton_quant_linear,
                 weight_format=ops.weight_format, has_offsets=ops.offsets is not None,
                 activation=ops.activation, out_dtype=ops.out_dtype, has_bias=ops.bias is not None,
                 has_residual=ops.residual is not None, tuned=tuned)
    args = [a for a in (ops.x, ops.weight, ops.scales, ops.offsets, ops.bias, ops.residual)
            if a is not None]
    return call, args, f"Triton quantized matmul / split-K GEMV ({ops.weight_format})", \
        f"activation={ops.activation}" + _tuned_note(tuned)


# --- autotuning: configs are chosen at lowering, inside the compiler's tuning session, and bound
# into the call as (shape bucket, config). A call whose shape falls in another bucket (a dynamic
# length) gets None: the launcher's untuned per-shape choice, never a session lookup per call.

def _example_sizes(node) -> Optional[list[int]]:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if not isinstance(val, torch.Tensor):
        return None
    sizes = []
    for size in val.shape:
        if isinstance(size, torch.SymInt):
            if not size.node.has_hint():
                return None
            size = size.node.hint
        sizes.append(int(size))
    return sizes


def _tuned_linear(node: fx.Node, ops) -> Optional[tuple]:
    from fxforge.kernels.triton_tuning import tuned_linear_config
    active = tuning_session()
    if active is None or active.mode == "off":
        return None
    x, w = _example_sizes(ops.x), _example_sizes(ops.weight)
    if x is None or w is None or len(x) != 2 or len(w) != 2:
        return None
    dtype, device = tensor_meta(node).dtype, tensor_meta(node).device
    x_dtype = ops.x.meta["val"].dtype
    if ops.weight_format != DENSE:   # the quantized kernels' spaces (rows: GEMV or matmul)
        from fxforge.kernels.quant_triton_tuning import tuned_quant_config
        return tuned_quant_config(x[0], x[1], w[1], ops.weight_format, x_dtype, ops.activation,
                                  ops.bias is not None, ops.residual is not None, device, dtype)
    config = tuned_linear_config(x[0], x[1], w[1], x_dtype, ops.activation, ops.bias is not None,
                                 ops.residual is not None, device, dtype)
    return None if config is None else (bucket(x[0]), config)


def _tuned_attention(ops: dict) -> Optional[tuple]:
    from fxforge.kernels.triton_tuning import tuned_attention_config
    active = tuning_session()
    if active is None or active.mode == "off":
        return None
    q, k = _example_sizes(ops["query"]), _example_sizes(ops["key"])
    if q is None or k is None or len(q) != 4 or len(k) != 4:
        return None
    mask = ops["attn_mask"]
    if mask is not None and not isinstance(mask.meta.get("val"), torch.Tensor):
        return None
    mask_kind = "none" if mask is None else \
        ("bool" if mask.meta["val"].dtype == torch.bool else "additive")
    val = ops["query"].meta["val"]
    config = tuned_attention_config(q[0], q[1], k[1], q[2], k[2], q[3], val.dtype,
                                    ops["is_causal"], mask_kind, val.device)
    return None if config is None else ((bucket(q[0]), bucket(q[2]), bucket(k[2])), config)


def _tuned_note(tuned: Optional[tuple]) -> str:
    return f"; tuned {tuned[1].describe()}" if tuned else ""


def _linear_call(x, w, *rest, fn, activation, out_dtype, has_bias, has_residual, tuned):
    rest = list(rest)
    bias = rest.pop(0) if has_bias else None
    residual = rest.pop(0) if has_residual else None
    config = tuned[1] if tuned is not None and bucket(x.shape[0]) == tuned[0] else None
    return fn(x, w, bias=bias, activation=activation, residual=residual, out_dtype=out_dtype,
              config=config)


def _quant_linear_call(x, codes, scales, *rest, fn, weight_format, has_offsets, **linear):
    rest = list(rest)
    offsets = rest.pop(0) if has_offsets else None
    quantized = lambda x, codes, **kw: fn(x, codes, scales, offsets, weight_format, **kw)  # noqa: E731
    return _linear_call(x, codes, *rest, fn=quantized, **linear)


def _attention_call(q, k, v, *mask, fn, has_mask, is_causal, scale, enable_gqa, tuned):
    config = None
    if tuned is not None and (bucket(q.shape[0]), bucket(q.shape[2]), bucket(k.shape[2])) == tuned[0]:
        config = tuned[1]
    return fn(q, k, v, attn_mask=mask[0] if has_mask else None, is_causal=is_causal, scale=scale,
              enable_gqa=enable_gqa, config=config)


class CUDAGraphRunner:
    """Replays a static-shape graph as one CUDA graph: inputs are copied into static buffers.
    Those buffers are the runner's, and every thread calling the compiled graph shares the
    runner: copy-in, replay and copy-out hold its lock, so one call's inputs never meet
    another's replay (calls from several threads are ordered on the default stream). The
    warm-up calls and the capture hold it too (the capture must follow complete warm-ups, which
    compile the kernels); a call of another shape than the captured one runs the graph eagerly
    outside it, touching none of the runner's buffers."""

    def __init__(self, fn: Callable, warmup: int = 2):
        self.fn, self.warmup, self.graph = fn, warmup, None
        self.static_inputs: list = []
        self.static_outputs = None
        self.signature = None
        self.lock = threading.Lock()

    def __call__(self, *args):
        signature = tuple((a.shape, a.dtype, a.device) if isinstance(a, torch.Tensor) else a for a in args)
        with self.lock:
            if self.graph is None or signature == self.signature:
                return self._replay(args, signature)
        return self.fn(*args)   # a shape the graph was not captured for: eager, unlocked

    def _replay(self, args, signature):
        """The captured graph on ``args``, after the warm-up calls and the capture (the caller
        holds the lock)."""
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
        # thread_local: other threads' syncs and allocations stay legal during the capture
        # (kernels/replay.py, CudaGraphRecording)
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.static_outputs = self.fn(*self.static_inputs)


def _static_cuda(gm: fx.GraphModule) -> bool:
    """Replayable as a CUDA graph: static CUDA inputs, and no op that writes into an input (a
    replay writes into the runner's private copies: a KV cache would never see its updates)."""
    metas = [tensor_meta(n) for n in gm.graph.nodes if n.op == "placeholder"]
    mutates = any(getattr(getattr(n.target, "_schema", None), "is_mutable", False)
                  for n in gm.graph.nodes if n.op == "call_function")
    return bool(metas) and not mutates and all(
        isinstance(m, TensorMeta) and m.is_static and m.device.type == "cuda" for m in metas)


class TritonBackend(ReferenceBackend):
    name = "triton"
    unavailable = staticmethod(unavailable)

    def __init__(self):
        self.table = make_table()

    def compile_partition(self, gm: fx.GraphModule) -> Callable:
        lowered, _ = lower_to_kernels(gm, self.table)   # its choices travel with it
        if _static_cuda(gm) and os.environ.get("FXFORGE_CUDA_GRAPHS", "1") != "0":
            runner = CUDAGraphRunner(lowered)
            runner.graph_module = lowered
            return runner
        return lowered


register_backend("triton", TritonBackend)
