"""Low-precision matmuls and attention: ``precision_bf16`` and ``precision_fp16``; bf16 weight
storage: ``precision_bf16_weights`` and the lossless ``exact_bf16_weights`` (set a linear's
weight format, see the passes).

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
from fxforge.irgraph.query import alias_root, first_tensor_meta, is_constant, is_weight, tensor_meta
from fxforge.irgraph.views import Addmm, Bmm, Linear, Mm, Sdpa, SdpaFlashCpu, ToCopy
from fxforge.irgraph.weight_format import DENSE, exactly_bf16
from fxforge.passes.base import PassResult, register_pass

MIN_K = 16  # matmuls with a smaller inner size stay fp32

# op -> its view and the fields of the inputs that run in low precision. The first one's last
# dimension is the op's inner size K.
_LOW_FIELDS = (
    (Mm, ("input", "mat2")),
    (Addmm, ("mat1", "mat2", "input")),
    (Bmm, ("input", "mat2")),
    (Linear, ("x", "weight", "bias")),
    (Sdpa, ("query", "key", "value", "attn_mask")),
    (SdpaFlashCpu, ("query", "key", "value", "attn_mask")),
)
LOW_INPUTS = {target: (view, fields) for view, fields in _LOW_FIELDS for target in view.TARGETS}
ATTENTION = set(Sdpa.TARGETS) | set(SdpaFlashCpu.TARGETS)
SKIP_REASONS = ("not_fp32", "integer", "small_k", "no_metadata")


def _low_inputs(node: fx.Node) -> list[tuple[str, object]]:
    """(field, value) of the inputs of ``node`` that run in low precision, K's first."""
    view, fields = LOW_INPUTS[node.target]
    op = view.of(node)
    return [(name, getattr(op, name)) for name in fields]


def skip_reason(node: fx.Node) -> Optional[str]:
    """Why ``node`` stays as it is, or None if it should run in low precision."""
    out = first_tensor_meta(node.meta.get(META_KEY))   # attention: its output, then statistics
    inputs = [tensor_meta(value) for _, value in _low_inputs(node)]
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
        if value in self.back_casts and tensor_meta(ToCopy.of(value).input).dtype == dtype:
            return ToCopy.of(value).input
        if key not in self.made:
            with self.ir.gm.graph.inserting_before(before):
                cast = ToCopy.create(self.ir.gm.graph, input=value, dtype=dtype)
            self.ir.infer(cast)
            self.made[key] = cast
            self.count += 1
            self.weights += is_weight(value, self.weight_memo)
        return self.made[key]

    def back(self, value: fx.Node, dtype: torch.dtype) -> fx.Node:
        """Cast ``value``'s result to ``dtype`` for all of its current users."""
        users = list(value.users)
        with self.ir.gm.graph.inserting_after(value):
            cast = ToCopy.create(self.ir.gm.graph, input=value, dtype=dtype)
        self.ir.infer(cast)
        self.count += 1
        self.back_casts.add(cast)
        for user in users:
            user.replace_input_with(value, cast)
        return cast


def _lower(ir: IRGraph, node: fx.Node, low: torch.dtype, casts: _Casts) -> list[tuple[fx.Node, object]]:
    """Rewrite ``node``; return (node the rest of the graph now reads, its old metadata)."""
    before = node.meta.get(META_KEY)
    view = LOW_INPUTS[node.target][0]
    for name, value in _low_inputs(node):
        meta = tensor_meta(value)
        if meta is not None and meta.dtype == torch.float32:
            view.of(node).replace(**{name: casts.to(value, low, before=node)})
    if (linear := Linear.of(node)) is not None:
        linear.replace(out_dtype=torch.float32)
        ir.infer(node)
        return [(node, before)]
    ir.infer(node)
    if not isinstance(before, tuple):
        return [(casts.back(node, before.dtype), before)]
    read = []  # multi-output attention: cast back the pieces whose dtype changed
    for user in [u for u in node.users if u.target is operator.getitem]:
        old = user.meta.get(META_KEY)
        ir.infer(user)
        changed = isinstance(old, TensorMeta) and tensor_meta(user).dtype != old.dtype
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
    AMX-BF16 or AVX512-BF16): every fp32 ``fxforge.linear`` weight gets ``weight_format="bf16"``
    (its values rounded to bf16; :mod:`fxforge.irgraph.weight_format`) and the math stays fp32.
    A backend stores such weights in bf16 (the CPU C++ GEMV and GEMM do), halving the bytes a
    decode step reads; the op's reference rounds them. Activations, biases and residuals are
    untouched."""
    counts: Counter = Counter()
    memo: dict = {}
    for node in list(ir.gm.graph.nodes):
        if (linear := Linear.of(node)) is None:
            continue
        reason = skip_reason(node) or (None if is_weight(linear.weight, memo) else "not_a_weight")
        if reason is None and linear.weight_format != DENSE:
            reason = "has_format"   # already stored another way (a later quantization's)
        if reason is not None:
            counts[f"skipped_{reason}"] += 1
            continue
        linear.replace(weight_format="bf16")
        counts["weights_rounded"] += 1
    return PassResult(ir, {"weights_rounded": counts["weights_rounded"],
                           **{f"skipped_{why}": counts[f"skipped_{why}"]
                              for why in (*SKIP_REASONS, "not_a_weight", "has_format")}})


@register_pass("exact_bf16_weights")
def exact_bf16_weights(ir: IRGraph) -> PassResult:
    """Lossless: a dense fp32 linear weight whose values are all bf16 values (a checkpoint
    upcast from bf16, weights rounded by a tool) gets ``weight_format="bf16"``, so a backend that
    stores bf16 reads half the bytes for the same products. Each constant is scanned once, here,
    at compile time; kernels read the format and never the values. Counted: ``weights_bf16``
    (marked), ``dense`` (a value off the bf16 grid), ``not_constant`` (not a folded constant)."""
    counts: Counter = Counter()
    exact: dict[fx.Node, bool] = {}   # constant -> all its values are bf16 values
    for node in list(ir.gm.graph.nodes):
        linear = Linear.of(node)
        meta = tensor_meta(linear.weight) if linear is not None else None
        if meta is None or linear.weight_format != DENSE or meta.dtype != torch.float32:
            continue
        if not is_constant(linear.weight):
            counts["not_constant"] += 1
            continue
        root = alias_root(linear.weight)   # views select values; none changes one
        if root not in exact:
            exact[root] = exactly_bf16(getattr(ir.gm, root.target))
        if exact[root]:
            linear.replace(weight_format="bf16")
        counts["weights_bf16" if exact[root] else "dense"] += 1
    return PassResult(ir, {k: counts[k] for k in ("weights_bf16", "dense", "not_constant")})


@register_pass("precision_fp16")
def precision_fp16(ir: IRGraph) -> PassResult:
    """Run fp32 matmuls and attention in float16; everything else stays fp32."""
    return lower_precision(ir, torch.float16)
