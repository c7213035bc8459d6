"""Attention fusion: explicit ``softmax(q @ k^T * scale + mask) @ v`` becomes one
``aten.scaled_dot_product_attention(q, k, v, attn_mask, 0.0, is_causal, scale=, enable_gqa=)``.

First the written form is canonicalised (:mod:`fxforge.passes.attention_canon`: layout ops
around the two contractions rewritten to one canonical chain, whatever ``einsum``, ``permute``,
``.contiguous()`` or broadcasting made them; softmax spelled as exp over sum made ``_softmax``).
Then matched by structure, anchored on each ``_softmax``:
  * ``bmm(q3, kt3)``: q3 and kt3 hold the values of 4-D ``[B, H, L, D]`` q and k in row-major order
    (views, copies, unsqueezes), k through an explicit swap of its last two dims; scalar
    multiplies on q or k fold into the scale;
  * a score chain of such views, float casts, ``mul``/``div`` by a real scalar constant (the scale)
    and at most one mask: ``add`` of a float mask, ``where``/``masked_fill`` with ``-inf`` (a bool
    mask) or with a fill <= -1e30 (exactly an additive mask);
  * ``_softmax`` over the last dim, then (views, casts) ``bmm(p3, v3)`` and its 4-D view, replaced.
Every node from the first bmm to the second must have a single user: attention weights used
elsewhere (returned, logged) decline, as does anything else unexpected; reasons go to DEBUG.

Causal: ``is_causal=True`` only when the kept positions are proven to be the top-left lower
triangle and Lq == Lk (:func:`_keep_class`: a constant that is ``tril``, prefix slices of one,
negations, ``and``/``or``, ``where(b, 0, -inf)``); a mask proven all-keep is dropped; any other
mask is passed as ``attn_mask`` (bool: True = keep, float: additive).
GQA: k and v that are ``repeat_kv`` (unsqueeze -> expand -> copy -> view) of the same head count
are replaced by the un-repeated tensors with ``enable_gqa=True``.
The op a traced SDPA becomes on each device (``SDPA_VARIANTS``: CPU flash; CUDA flash, memory-efficient,
cuDNN) becomes the canonical node again.

One semantic difference, as in every fused kernel: a query row whose keys are all masked with
``-inf`` is NaN in eager and 0 in SDPA. Constant masks with such a row are declined; runtime bool
masks cannot be checked.
"""
from __future__ import annotations

import logging
import math
import operator
from collections import Counter
from typing import Any, Optional

import torch
import torch.fx as fx

from fxforge.irgraph import IRGraph
from fxforge.irgraph.graph import hoist_get_attrs, node_arguments
from fxforge.irgraph.meta import META_KEY
from fxforge.irgraph.views import Bmm, Slice, Softmax, Where
from fxforge.passes.attention_canon import canonicalize_attention
from fxforge.passes.base import PassResult, register_pass
from fxforge.irgraph.query import evaluate_on_constants
from fxforge.irgraph.layout import keeps_order, step_layout

from fxforge.passes.attention_match import (  # noqa: F401  (HUGE_NEGATIVE, SDPA: re-exported)
    _AND, _NEGATE, _NOT, _OR, HUGE_NEGATIVE, MAX_CONSTANT_NUMEL, SDPA, SDPA_VARIANTS,
    Decline, Mask,
    _check_broadcast, _class_of, _combine, _input, _leads_to_bmm, _mask_value, _meta, _operands,
    _scalar_value, _shape, _softmax_to_bmm, _trace, _trace_key, _unrepeat, _walk_scores)

log = logging.getLogger("fxforge.passes.attention")
aten = torch.ops.aten


class _Context:
    """Per-pass state: the IR, constant-evaluation cache, counts."""

    def __init__(self, ir: IRGraph):
        self.ir, self.cache, self.counts = ir, {}, Counter()

    def constant(self, node: Any) -> Optional[torch.Tensor]:
        """The value of ``node`` when it depends only on constants (pure ops, static shapes)."""
        if not isinstance(node, fx.Node):
            return None
        if node not in self.cache:
            self.cache[node] = self._evaluate(node)
        return self.cache[node]

    def _evaluate(self, node: fx.Node) -> Optional[torch.Tensor]:
        meta = _meta(node)
        if meta is None or not meta.is_static or int(meta.numel()) > MAX_CONSTANT_NUMEL:
            return None
        if node.op != "get_attr" and not node.all_input_nodes:
            return None   # a factory op (full, arange): its pattern is read from the graph
        return evaluate_on_constants(node, self.ir.gm, self.constant)

    def keep_class(self, node: Any) -> Optional[str]:
        """Which positions of the last two dims a mask keeps, the same in every leading index:
        ``"lower"`` (j <= i, top-left aligned), ``"strict_upper"``, ``"all"``, ``"none"``, or None
        when not provable. Bool masks keep True; float masks are additive (0 keeps, a value at or
        below half the dtype's lowest drops). Every class survives prefix slicing ``[:a, :b]``."""
        value = self.constant(node)
        if value is not None:
            return _class_of(value)
        meta = _meta(node)
        if node.op != "call_function" or meta is None or meta.rank < 2:
            return None
        target, source = node.target, _input(node)
        if target in _NOT:
            return _NEGATE.get(self.keep_class(source))
        if target in (aten.eq.Scalar, aten.ne.Scalar) and meta.dtype == torch.bool:
            other = _operands(node)[1]
            if _meta(source).dtype == torch.bool and other in (0, 1):  # x == 0 is not x
                same = (other == 1) == (target is aten.eq.Scalar)
                return self.keep_class(source) if same else _NEGATE.get(self.keep_class(source))
        adds = target is aten.add.Tensor and not node.kwargs and meta.dtype.is_floating_point
        if target in _AND or target in _OR or adds:  # adding {0, -big} masks keeps where both do
            a, b = (self.keep_class(x) if isinstance(x, fx.Node) else None for x in _operands(node))
            return _combine(a, b, target not in _OR)
        if (where := Where.of(node)) is not None and meta.dtype.is_floating_point:
            cond, a, b = where.condition, where.input, where.other
            low = torch.finfo(meta.dtype).min / 2
            fill_a, fill_b = _scalar_value(a), _scalar_value(b)
            if fill_a == 0 and fill_b is not None and fill_b <= low:
                return self.keep_class(cond)
            if fill_b == 0 and fill_a is not None and fill_a <= low:
                return _NEGATE.get(self.keep_class(cond))
            return None
        if (sliced := Slice.of(node)) is not None:
            if sliced.dim % meta.rank >= meta.rank - 2 and (sliced.start not in (0, None) or sliced.step != 1):
                return None
            return self.keep_class(source)
        layout = step_layout(node)   # only the leading dims change: each matrix keeps its class
        if layout and len(layout.order) >= 2 and layout.dims[-2:] == [[a] for a in layout.order[-2:]]:
            return self.keep_class(source)
        return None

    def attn_mask(self, mask: Mask, factor: float, dtype: torch.dtype, lq: Any, lk: Any,
                  anchor: fx.Node) -> tuple[Optional[fx.Node], bool]:
        """(the ``attn_mask`` to pass, whether it was proven causal instead)."""
        keep = self.keep_class(mask.node)
        keep = keep if mask.additive or mask.keep_if_true else _NEGATE.get(keep)
        if keep == "none":
            raise Decline("the mask drops every position")
        if keep == "all":
            return None, False
        if keep == "lower" and lq == lk and _shape(mask.node)[-2:] == (lq, lk):
            return None, True
        if mask.additive and _meta(mask.node).dtype != dtype:
            raise Decline(f"additive mask is {_meta(mask.node).dtype}, q is {dtype}")
        value = self.constant(mask.node)
        if value is not None:
            return self.ir.add_constant("attn_mask", _mask_value(mask, value, factor, dtype), anchor), False
        graph = self.ir.gm.graph
        as_is = factor == 1.0 if mask.additive else mask.keep_if_true and mask.fill == -math.inf
        if as_is:
            return mask.node, False
        if not mask.additive and mask.fill != -math.inf:  # exactly additive: 0 kept, fill dropped
            zero, fill = (self.ir.add_constant("mask_fill", torch.tensor(v, dtype=dtype), anchor)
                          for v in (0.0, mask.fill))
            args = (mask.node, zero, fill) if mask.keep_if_true else (mask.node, fill, zero)
            target = aten.where.self
        else:
            target, args = (aten.mul.Tensor, (mask.node, factor)) if mask.additive else \
                (aten.bitwise_not.default, (mask.node,))
        with graph.inserting_before(anchor):
            node = graph.call_function(target, args)
        self.ir.infer(node)
        return node, False

    def fuse(self, anchor: fx.Node, q: fx.Node, k: fx.Node, v: fx.Node, mask: Optional[Mask],
             mask_factor: float, scale: Optional[float], is_causal: bool) -> None:
        """Insert the canonical node before ``anchor`` and make it replace ``anchor``."""
        lq, lk, dtype = _shape(q)[2], _shape(k)[2], _meta(q).dtype
        gqa = False
        k_kv, v_kv = _unrepeat(k), _unrepeat(v)
        if k_kv and v_kv and k_kv[1] == v_kv[1] > 1 and _shape(k_kv[0])[1] == _shape(v_kv[0])[1]:
            k, v, gqa = k_kv[0], v_kv[0], True
        elif _shape(k)[1] != _shape(q)[1]:  # the kernel ops take grouped k/v as they are
            gqa = True
        attn_mask, causal = None, is_causal
        if mask is not None:
            attn_mask, proven = self.attn_mask(mask, mask_factor, dtype, lq, lk, anchor)
            causal = causal or proven
        graph = self.ir.gm.graph
        with graph.inserting_before(anchor):
            node = graph.call_function(SDPA, (q, k, v, attn_mask, 0.0, causal),
                                       {"scale": scale, "enable_gqa": gqa})
        try:
            self.ir.infer(node)
        except Exception as exc:  # the operands do not form a valid attention after all
            graph.erase_node(node)
            raise Decline(f"the fused node does not type-check: {type(exc).__name__}: {exc}") from exc
        _replace(self.ir, anchor, node)
        self.counts.update({"causal": int(causal), "masked": int(attn_mask is not None), "gqa": int(gqa)})

    def fuse_softmax(self, softmax: fx.Node) -> bool:
        """Fuse the attention around ``softmax``; False when it is no attention at all."""
        view = Softmax.of(softmax)
        scores_in, dim = view.input, view.dim
        if not _leads_to_bmm(scores_in):
            return False  # a classifier's or a router's softmax
        rank = len(_shape(scores_in))
        if dim % rank != rank - 1:
            raise Decline(f"softmax over dim {dim}, not the last")
        scores = _walk_scores(scores_in)
        bmm2, tail = _softmax_to_bmm(softmax)
        (q3, kt3), v3 = (Bmm.of(scores.bmm).input, Bmm.of(scores.bmm).mat2), Bmm.of(bmm2).mat2
        _, lq, d = _shape(q3)
        lk, dv = _shape(v3)[1:]
        for node in [scores.bmm, *scores.chain]:
            if len(node.users) != 1:
                raise Decline(f"the scores {node.name} have another user")
        for node in [*scores.chain, softmax, *tail]:
            if _shape(node)[-2:] != (lq, lk):  # a view may not mix rows: softmax must stay per row
                raise Decline(f"{node.name} reshapes the [{lq}, {lk}] score rows")
        q, q_scale = _trace(q3, (lq, d))
        k, k_scale = _trace_key(kt3, lk, d)
        v, _ = _trace(v3, (lk, dv), absorb=False)
        if q is None or v is None:
            raise Decline("no 4-D q or v behind the matmuls")
        b, h = _shape(q)[:2]
        out = next(iter(bmm2.users)) if len(bmm2.users) == 1 else None
        if out is None or not keeps_order(out) or _shape(out) != (b, h, lq, dv):
            raise Decline("the attention output has no single 4-D view")
        if _shape(k) != (b, h, lk, d) or _shape(v) != (b, h, lk, dv):
            raise Decline(f"q {_shape(q)}, k {_shape(k)}, v {_shape(v)} do not line up")
        dtypes = {_meta(x).dtype for x in (q, k, v, out)}
        if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
            raise Decline(f"mixed or non-float dtypes {dtypes}")
        if scores.mask is not None:
            _check_broadcast(scores.mask.node, scores.mask_at, (b, h, lq, lk))
        scale = scores.scale * q_scale * k_scale
        if not (math.isfinite(scale) and scale > 0):
            raise Decline(f"scale {scale} is not a positive finite constant")
        self.fuse(out, q, k, v, scores.mask, scores.mask_factor, scale, False)
        return True

    def normalize_variant(self, node: fx.Node) -> bool:
        """A device's SDPA kernel op (``SDPA_VARIANTS``) -> the canonical node."""
        args = node_arguments(node)   # positions differ: attn_mask (CPU) / attn_bias (CUDA)
        q, k, v, scale = args["query"], args["key"], args["value"], args.get("scale")
        mask = args.get("attn_mask", args.get("attn_bias"))
        if args.get("dropout_p"):
            raise Decline(f"dropout_p={args['dropout_p']}")
        outputs = {_getitem_index(u): u for u in node.users if u.target is operator.getitem}
        if len(outputs) != len(node.users) or any(out.users for i, out in outputs.items() if i):
            raise Decline("an output other than the attention (logsumexp, RNG state) is used")
        if 0 not in outputs or any(_meta(x) is None or _meta(x).rank != 4 for x in (q, k, v)):
            return False
        wrapped = Mask(mask, additive=_meta(mask).dtype != torch.bool) if mask is not None else None
        self.fuse(outputs[0], q, k, v, wrapped, 1.0, scale, bool(args.get("is_causal")))
        graph = self.ir.gm.graph
        for out in outputs.values():   # dead now, but the op is impure to DCE (its dropout RNG)
            graph.erase_node(out)
        graph.erase_node(node)
        return True


def _getitem_index(node: fx.Node) -> int:
    """Which result of a multi-output op ``getitem`` ``node`` takes."""
    return node.args[1]


def _replace(ir: IRGraph, old: fx.Node, new: fx.Node) -> None:
    """``new`` replaces ``old``; later nodes get fresh metadata (the fused result's strides may
    differ). Undone, and declined, if a consumer cannot take the new layout."""
    old_meta, new_meta = _meta(old), _meta(new)
    if new_meta is None or new_meta.shape != old_meta.shape or new_meta.dtype != old_meta.dtype:
        ir.gm.graph.erase_node(new)
        got = new_meta.describe() if new_meta else "no tensor"
        raise Decline(f"the fused node would give {got} for {old_meta.describe()}")
    old.replace_all_uses_with(new)
    changed, saved = {new}, {}
    try:
        nodes = list(ir.gm.graph.nodes)
        for node in nodes[nodes.index(new) + 1:]:
            if node.op == "call_function" and changed.intersection(node.all_input_nodes):
                saved[node] = (node.meta.get("val"), node.meta.get(META_KEY))
                ir.infer(node)
                if node.meta.get(META_KEY) != saved[node][1]:
                    changed.add(node)
    except Exception as exc:
        new.replace_all_uses_with(old)
        for node, (val, meta) in saved.items():
            node.meta["val"], node.meta[META_KEY] = val, meta
        ir.gm.graph.erase_node(new)
        raise Decline(f"a consumer cannot take the fused result's layout ({exc})") from exc


COUNT_KEYS = ("attention_fused", "normalized", "causal", "masked", "gqa", "declined")


@register_pass("fuse_attention")
def fuse_attention(ir: IRGraph) -> PassResult:
    """Explicit attention chains and the devices' SDPA kernel ops become scaled_dot_product_attention."""
    canonical = canonicalize_attention(ir)
    if canonical:
        log.debug("fuse_attention: canonicalised %s", dict(canonical))
    context = _Context(ir)
    constants_before = {name for name, _ in ir.gm.named_buffers()}
    for node in list(ir.gm.graph.nodes):
        try:
            if node.op == "call_function" and node.target is aten._softmax.default:
                context.counts["attention_fused"] += context.fuse_softmax(node)
            elif node.op == "call_function" and node.target in SDPA_VARIANTS:
                context.counts["normalized"] += context.normalize_variant(node)
        except Decline as reason:
            context.counts["declined"] += 1
            log.debug("fuse_attention: %s not fused: %s", node.name, reason)
    ir.gm.graph.eliminate_dead_code()
    used = {n.target for n in ir.gm.graph.nodes if n.op == "get_attr"}
    for name in [name for name, _ in ir.gm.named_buffers() if name not in constants_before | used]:
        delattr(ir.gm, name)  # masks made for a candidate that then declined
    hoist_get_attrs(ir.gm.graph)
    return PassResult(ir, {key: context.counts[key] for key in COUNT_KEYS})
