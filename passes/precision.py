"""Low-precision matmuls and attention: ``precision_bf16`` and ``precision_fp16``.

Each fp32 matmul (``mm``, ``addmm``, ``bmm``, ``fxforge.linear``) and attention op
(``scaled_dot_product_attention`` and the CPU flash variant) gets its inputs cast to the low
dtype and its result cast back to fp32, so everything else (norms, softmax, residual adds,
reductions) keeps computing in fp32 exactly as before:

* activations: ``_to_copy(x, dtype=low)`` before the op, one per value however many ops read it;
* weights (constants, views of constants, weight-only subgraphs): the same cast, which
  ``constant_fold`` (run after this pass) evaluates once at compile time, so the low-precision
  weight is stored as a constant and nothing is converted per call;
* results: ``_to_copy(y, dtype=float32)`` after the op; a ``fxforge.linear`` instead gets
  ``out_dtype=float32``. Its bias is cast too (the reference runs ``addmm``, which needs one
  dtype) and its activation runs on the low-precision matmul result, but its residual stays
  fp32: ``low + fp32`` promotes, so the residual add runs in fp32.

Skipped, counted by reason: ops whose result or float inputs are not fp32 (a graph that is
already low precision, fp64, or integer matmuls), and matmuls whose inner size K is below
``MIN_K`` (there the casts cost more than the matmul saves). The pass only rewrites the IR;
whether a backend runs the low dtype natively is the backend's choice.
"""
from __future__ import annotations

import operator
from collections import Counter
from typing import Optional

import torch
import torch.fx as fx

from fxforge.irgraph import IRGraph, TensorMeta
from fxforge.irgraph.meta import META_KEY
from fxforge.irgraph.ops import fxforge_linear
from fxforge.passes.base import PassResult, register_pass
from fxforge.passes.epilogue import is_weight

aten = torch.ops.aten
MIN_K = 16  # matmuls with a smaller inner size stay fp32

# op -> the inputs that run in low precision, as (position, keyword name) pairs. The first
# one's last dimension is the op's inner size K.
LOW_INPUTS = {
    aten.mm.default: ((0, "self"), (1, "mat2")),
    aten.addmm.default: ((1, "mat1"), (2, "mat2"), (0, "self")),
    aten.bmm.default: ((0, "self"), (1, "mat2")),
    fxforge_linear: ((0, "x"), (1, "weight"), (2, "bias")),
    aten.scaled_dot_product_attention.default: ((0, "query"), (1, "key"), (2, "value"), (3, "attn_mask")),
    aten._scaled_dot_product_flash_attention_for_cpu.default:
        ((0, "query"), (1, "key"), (2, "value"), (None, "attn_mask")),
}
ATTENTION = {aten.scaled_dot_product_attention.default,
             aten._scaled_dot_product_flash_attention_for_cpu.default}
SKIP_REASONS = ("not_fp32", "integer", "small_k", "no_metadata")
_OUT_DTYPE_POSITION = 5  # fxforge.linear(x, weight, bias, activation, residual, out_dtype)


def _tensor_meta(value) -> Optional[TensorMeta]:
    meta = value.meta.get(META_KEY) if isinstance(value, fx.Node) else None
    return meta if isinstance(meta, TensorMeta) else None


def _first_tensor_meta(node: fx.Node) -> Optional[TensorMeta]:
    meta = node.meta.get(META_KEY)
    if isinstance(meta, tuple) and meta:
        meta = meta[0]  # attention's output; the rest are statistics
    return meta if isinstance(meta, TensorMeta) else None


def _get(node: fx.Node, position: Optional[int], name: str):
    if position is not None and position < len(node.args):
        return node.args[position]
    return node.kwargs.get(name)


def _set(node: fx.Node, position: Optional[int], name: str, value) -> None:
    if position is not None and position < len(node.args):
        node.update_arg(position, value)
    else:
        node.update_kwarg(name, value)


def skip_reason(node: fx.Node) -> Optional[str]:
    """Why ``node`` stays as it is, or None if it should run in low precision."""
    out = _first_tensor_meta(node)
    inputs = [_tensor_meta(_get(node, p, n)) for p, n in LOW_INPUTS[node.target]]
    if out is None or inputs[0] is None:
        return "no_metadata"
    if not out.dtype.is_floating_point:
        return "integer"
    floats = [m.dtype for m in inputs if m is not None and m.dtype.is_floating_point]
    if out.dtype != torch.float32 or any(d != torch.float32 for d in floats):
        return "not_fp32"
    k = inputs[0].shape[-1]
    if isinstance(k, int) and k < MIN_K:
        return "small_k"
    return None


class _Casts:
    """Cast nodes made so far: one per (value, dtype), so shared inputs are cast once, and a
    result cast back to fp32 that feeds another low-precision op is read in low precision
    directly (the round trip through fp32 is exact)."""

    def __init__(self, ir: IRGraph):
        self.ir, self.made, self.count, self.weights = ir, {}, 0, 0
        self.back_casts: set[fx.Node] = set()
        self.weight_memo: dict[fx.Node, bool] = {}

    def to(self, value: fx.Node, dtype: torch.dtype, before: fx.Node) -> fx.Node:
        key = (value, dtype)
        if value in self.back_casts and _tensor_meta(value.args[0]).dtype == dtype:
            return value.args[0]
        if key not in self.made:
            with self.ir.gm.graph.inserting_before(before):
                cast = self.ir.gm.graph.call_function(aten._to_copy.default, (value,), {"dtype": dtype})
            self.ir.infer(cast)
            self.made[key] = cast
            self.count += 1
            self.weights += is_weight(value, self.weight_memo)
        return self.made[key]

    def back(self, value: fx.Node, dtype: torch.dtype) -> fx.Node:
        """Cast ``value``'s result to ``dtype`` for all of its current users."""
        users = list(value.users)
        with self.ir.gm.graph.inserting_after(value):
            cast = self.ir.gm.graph.call_function(aten._to_copy.default, (value,), {"dtype": dtype})
        self.ir.infer(cast)
        self.count += 1
        self.back_casts.add(cast)
        for user in users:
            user.replace_input_with(value, cast)
        return cast


def _lower(ir: IRGraph, node: fx.Node, low: torch.dtype, casts: _Casts) -> list[tuple[fx.Node, object]]:
    """Rewrite ``node``; return (node the rest of the graph now reads, its old metadata)."""
    before = node.meta.get(META_KEY)
    for position, name in LOW_INPUTS[node.target]:
        value = _get(node, position, name)
        meta = _tensor_meta(value)
        if meta is not None and meta.dtype == torch.float32:
            _set(node, position, name, casts.to(value, low, before=node))
    if node.target is fxforge_linear:
        _set(node, _OUT_DTYPE_POSITION, "out_dtype", torch.float32)
        ir.infer(node)
        return [(node, before)]
    ir.infer(node)
    if not isinstance(before, tuple):
        return [(casts.back(node, before.dtype), before)]
    read = []  # multi-output attention: cast back the pieces whose dtype changed
    for user in [u for u in node.users if u.target is operator.getitem]:
        old = user.meta.get(META_KEY)
        ir.infer(user)
        changed = isinstance(old, TensorMeta) and _tensor_meta(user).dtype != old.dtype
        read.append((casts.back(user, old.dtype) if changed else user, old))
    return read


def lower_precision(ir: IRGraph, low: torch.dtype) -> PassResult:
    counts: Counter = Counter()
    casts = _Casts(ir)
    for node in list(ir.gm.graph.nodes):
        if node.op != "call_function" or node.target not in LOW_INPUTS:
            continue
        reason = skip_reason(node)
        if reason is not None:
            counts[f"skipped_{reason}"] += 1
            continue
        for read, old in _lower(ir, node, low, casts):
            if read.meta.get(META_KEY) != old:  # the rest of the graph must see what it saw
                raise AssertionError(f"precision: {node.name} now reads as "
                                     f"{read.meta.get(META_KEY)}, was {old}")
        counts["attention" if node.target in ATTENTION else "matmuls"] += 1
    return PassResult(ir, {"matmuls": counts["matmuls"], "attention": counts["attention"],
                           "casts": casts.count, "weight_casts": casts.weights,
                           **{f"skipped_{why}": counts[f"skipped_{why}"] for why in SKIP_REASONS}})


@register_pass("precision_bf16")
def precision_bf16(ir: IRGraph) -> PassResult:
    """Run fp32 matmuls and attention in bfloat16; everything else stays fp32."""
    return lower_precision(ir, torch.bfloat16)


@register_pass("precision_bf16_weights")
def precision_bf16_weights(ir: IRGraph) -> PassResult:
    """Weight-only bf16, for hardware that can store bf16 but has no bf16 math (a CPU without
    AMX-BF16 or AVX512-BF16): every fp32 ``fxforge.linear`` weight is rounded to bf16 values (a
    round trip of casts that constant folding evaluates once) and the math stays fp32. A backend
    can then keep such weights in bf16 at no further loss, halving the bytes a decode step reads
    (the CPU GEMV does: ``kernels/gemv_cpu.py``). Activations, biases and residuals are untouched."""
    counts: Counter = Counter()
    casts, memo = _Casts(ir), {}
    for node in list(ir.gm.graph.nodes):
        if node.op != "call_function" or node.target is not fxforge_linear:
            continue
        weight = node.args[1]
        reason = skip_reason(node) or (None if is_weight(weight, memo) else "not_a_weight")
        if reason is not None:
            counts[f"skipped_{reason}"] += 1
            continue
        rounded = casts.to(casts.to(weight, torch.bfloat16, before=node), torch.float32, before=node)
        node.update_arg(1, rounded)
        counts["weights_rounded"] += 1
    return PassResult(ir, {"weights_rounded": counts["weights_rounded"],
                           **{f"skipped_{why}": counts[f"skipped_{why}"]
                              for why in (*SKIP_REASONS, "not_a_weight")}})


@register_pass("precision_fp16")
def precision_fp16(ir: IRGraph) -> PassResult:
    """Run fp32 matmuls and attention in float16; everything else stays fp32."""
    return lower_precision(ir, torch.float16)
