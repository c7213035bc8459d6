"""Attention fusion: explicit ``softmax(q @ k^T * scale + mask) @ v`` becomes one
``aten.scaled_dot_product_attention(q, k, v, attn_mask, 0.0, is_causal, scale=, enable_gqa=)``.

Matched by structure, anchored on each ``_softmax``:
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
``_scaled_dot_product_flash_attention_for_cpu`` (dynamo's CPU SDPA) becomes the canonical node.

One semantic difference, as in every fused kernel: a query row whose keys are all masked with
``-inf`` is NaN in eager and 0 in SDPA. Constant masks with such a row are declined; runtime bool
masks cannot be checked.
"""
from __future__ import annotations

import logging
import math
import operator
from collections import Counter
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.fx as fx

from fxforge.irgraph import IRGraph, TensorMeta, op_name
from fxforge.irgraph.graph import hoist_get_attrs
from fxforge.irgraph.meta import META_KEY
from fxforge.passes.base import PassResult, register_pass
from fxforge.passes.cleanup import is_pure

log = logging.getLogger("fxforge.passes.attention")
aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
FLASH_CPU = aten._scaled_dot_product_flash_attention_for_cpu.default

# Ops whose result holds its input's values in the same row-major order (only the shape differs).
_SAME_ORDER = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.clone.default,
               aten.contiguous.default, aten.alias.default, aten.lift_fresh_copy.default,
               aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default}
_SCALE_OPS = {aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar}
_AND = {aten.bitwise_and.Tensor, aten.logical_and.default}
_OR = {aten.bitwise_or.Tensor, aten.logical_or.default}
_NOT = {aten.bitwise_not.default, aten.logical_not.default}
_NEGATE = {"lower": "strict_upper", "strict_upper": "lower", "all": "none", "none": "all"}
HUGE_NEGATIVE = -1e30  # a finite fill this low equals -inf after softmax and absorbs any score
MAX_CONSTANT_NUMEL = 1 << 24  # constant masks evaluated at compile time to prove their pattern


class Decline(Exception):
    """A candidate that must not fuse; the message is the reason."""


def _meta(node: Any) -> Optional[TensorMeta]:
    meta = node.meta.get(META_KEY) if isinstance(node, fx.Node) else None
    return meta if isinstance(meta, TensorMeta) else None


def _shape(node: fx.Node) -> tuple:
    meta = _meta(node)
    if meta is None:
        raise Decline(f"{node.name} has no tensor metadata")
    return tuple(meta.shape)


def _passes_order(node: fx.Node) -> bool:
    """``node`` holds its first input's values in the same row-major order."""
    if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    if node.target in _SAME_ORDER:
        return True
    if node.target in (aten.expand.default, aten.slice.Tensor):  # only when they change nothing
        src, out = _meta(node.args[0]), _meta(node)
        return src is not None and out is not None and src.shape == out.shape
    return False


def _is_float_cast(node: fx.Node) -> bool:
    src, out = _meta(node.args[0]) if node.args else None, _meta(node)
    return (node.target is aten._to_copy.default and set(node.kwargs) <= {"dtype", "memory_format"}
            and src is not None and out is not None and src.dtype.is_floating_point
            and out.dtype.is_floating_point and src.shape == out.shape)


def _scalar_value(arg: Any) -> Optional[float]:
    """The value of a real scalar constant: a Python number, a one-element constant tensor, or a
    ``scalar_tensor``/``full`` of one (possibly copied or cast)."""
    if isinstance(arg, (int, float)) and not isinstance(arg, bool):
        return float(arg)
    if not isinstance(arg, fx.Node):
        return None
    if arg.op == "get_attr":
        value = getattr(arg.graph.owning_module, arg.target)
        ok = isinstance(value, torch.Tensor) and value.numel() == 1 and value.dtype.is_floating_point
        return float(value.item()) if ok else None
    if arg.target is aten.scalar_tensor.default:
        return _scalar_value(arg.args[0])
    if arg.target is aten.full.default and all(s == 1 for s in arg.args[0]):
        return _scalar_value(arg.args[1])
    if arg.target in (aten._to_copy.default, aten.lift_fresh_copy.default, aten.clone.default):
        return _scalar_value(arg.args[0])
    return None


def _scalar_multiplier(node: fx.Node) -> Optional[tuple[fx.Node, float]]:
    """(tensor, factor) when ``node`` multiplies or divides a tensor by a real scalar constant."""
    if node.op != "call_function" or node.target not in _SCALE_OPS or node.kwargs:
        return None
    a, b = node.args
    divides = node.target in (aten.div.Tensor, aten.div.Scalar)
    for tensor, scalar in ((a, b),) if divides else ((a, b), (b, a)):
        value = _scalar_value(scalar)
        if value is None or not (math.isfinite(value) and value > 0):
            continue  # a negative factor would turn a -inf mask into +inf: not a scale
        if isinstance(tensor, fx.Node) and _meta(tensor) is not None and _meta(node) is not None and \
                (_meta(tensor).shape, _meta(tensor).dtype) == (_meta(node).shape, _meta(node).dtype):
            return tensor, 1.0 / value if divides else value
    return None


def _trace(node: fx.Node, last2: tuple, absorb: bool = True) -> tuple[Optional[fx.Node], float]:
    """Back from a bmm operand through order-preserving ops (and scalar multiplies if ``absorb``):
    the deepest rank-4 node with last dims ``last2`` holding the same values, and the scale met."""
    found, found_scale, scale = None, 1.0, 1.0
    while True:
        meta = _meta(node)
        if meta is not None and meta.rank == 4 and tuple(meta.shape[-2:]) == tuple(last2):
            found, found_scale = node, scale
        if _passes_order(node):
            node = node.args[0]
            continue
        multiplier = _scalar_multiplier(node) if absorb else None
        if multiplier is None:
            return found, found_scale
        node, factor = multiplier
        scale *= factor


def _swaps_last_two(node: fx.Node) -> bool:
    meta = _meta(node)
    if node.op != "call_function" or meta is None or meta.rank < 2:
        return False
    rank = meta.rank
    if node.target is aten.permute.default:
        return [d % rank for d in node.args[1]] == list(range(rank - 2)) + [rank - 1, rank - 2]
    if node.target is aten.transpose.int:
        return {node.args[1] % rank, node.args[2] % rank} == {rank - 2, rank - 1}
    return False


def _trace_key(kt3: fx.Node, lk: Any, d: Any) -> tuple[fx.Node, float]:
    """The 4-D k ``[B, H, Lk, D]`` behind the transposed operand, and scales met on the way."""
    node, scale = kt3, 1.0
    while not _swaps_last_two(node):
        multiplier = _scalar_multiplier(node)
        if _passes_order(node):
            node = node.args[0]
        elif multiplier is not None:
            node, factor = multiplier
            scale *= factor
        else:
            raise Decline("k reaches the matmul without a transpose of its last two dims")
    k4, more = _trace(node.args[0], (lk, d))
    if k4 is None:
        raise Decline("no 4-D k behind the transpose")
    return k4, scale * more


@dataclass
class Mask:
    node: fx.Node
    additive: bool  # a float mask added to the scores; else a bool condition
    keep_if_true: bool = True  # bool: True marks kept positions (False: masked ones)
    fill: float = -math.inf  # bool: the value masked positions get


def _leads_to_bmm(node: Any, depth: int = 12) -> bool:
    while isinstance(node, fx.Node) and node.op == "call_function" and depth > 0:
        if node.target is aten.bmm.default:
            return True
        if node.target is aten.where.self:
            return any(_leads_to_bmm(a, depth - 1) for a in node.args[1:])
        if node.target is aten.add.Tensor:
            return any(_leads_to_bmm(a, depth - 1) for a in node.args)
        multiplier = _scalar_multiplier(node)
        node = multiplier[0] if multiplier else node.args[0] if node.args else None
        depth -= 1
    return False


def _mask_op(node: fx.Node) -> Optional[tuple[Mask, fx.Node]]:
    """(mask, score input) when ``node`` applies a mask to the scores."""
    if node.target is aten.add.Tensor and not node.kwargs:
        a, b = node.args
        sides = [(x, y) for x, y in ((a, b), (b, a)) if isinstance(y, fx.Node) and _leads_to_bmm(y)]
        if len(sides) != 1 or not isinstance(sides[0][0], fx.Node):
            raise Decline(f"{node.name}: cannot tell the scores from the mask")
        return Mask(sides[0][0], additive=True), sides[0][1]
    if node.target is aten.where.self:
        cond, a, b = node.args
        if _scalar_value(a) is not None and isinstance(b, fx.Node):
            return _bool_mask(cond, False, _scalar_value(a)), b
        if _scalar_value(b) is not None and isinstance(a, fx.Node):
            return _bool_mask(cond, True, _scalar_value(b)), a
        raise Decline(f"{node.name}: a where without a constant fill")
    if node.target is aten.masked_fill.Scalar:
        return _bool_mask(node.args[1], False, _scalar_value(node.args[2])), node.args[0]
    return None


def _bool_mask(cond: fx.Node, keep_if_true: bool, fill: Optional[float]) -> Mask:
    if _meta(cond) is None or _meta(cond).dtype != torch.bool:
        raise Decline("a where/masked_fill condition that is not a bool tensor")
    if fill is None or not (fill == -math.inf or fill <= HUGE_NEGATIVE):
        raise Decline(f"mask fill {fill} is not -inf or <= {HUGE_NEGATIVE}: not an exact mask")
    return Mask(cond, additive=False, keep_if_true=keep_if_true, fill=fill)


@dataclass
class Scores:
    bmm: fx.Node
    chain: list[fx.Node]  # nodes after the bmm up to the softmax input
    scale: float  # every scalar factor on the scores
    mask_factor: float  # the factors applied after the mask (they scale an additive mask too)
    mask: Optional[Mask] = None
    mask_at: Optional[fx.Node] = None  # the node that applies the mask


def _walk_scores(node: fx.Node) -> Scores:
    """Back from the softmax input to the q @ k^T bmm."""
    chain: list[fx.Node] = []
    late, early, mask, mask_at = 1.0, 1.0, None, None  # factors after / before the mask
    while node.op == "call_function" and node.target is not aten.bmm.default:
        chain.append(node)
        multiplier = _scalar_multiplier(node)
        if _passes_order(node) or _is_float_cast(node):
            node = node.args[0]
        elif multiplier is not None:
            node, factor = multiplier
            late, early = (late * factor, early) if mask is None else (late, early * factor)
        elif (found := _mask_op(node)) is not None:
            if mask is not None:
                raise Decline("more than one mask op on the scores")
            (mask, node), mask_at = found, node
            if _shape(node) != _shape(mask_at):
                raise Decline(f"the mask at {mask_at.name} broadcasts the scores")
        else:
            raise Decline(f"{node.name}: {op_name(node.target)} on the scores")
    if node.target is not aten.bmm.default:
        raise Decline("the softmax input does not come from a bmm")
    return Scores(node, chain[::-1], early * late, late, mask, mask_at)


def _softmax_to_bmm(softmax: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """Forward from the softmax to the bmm that takes its result as the first operand."""
    chain, node = [], softmax
    while True:
        if len(node.users) != 1:
            raise Decline(f"{node.name} (attention weights) has {len(node.users)} users")
        user = next(iter(node.users))
        if user.target is aten.bmm.default and user.args[0] is node:
            return user, chain
        if not (_passes_order(user) or _is_float_cast(user)) or user.args[0] is not node:
            raise Decline(f"the softmax result reaches {op_name(user.target)} before the matmul with v")
        chain.append(user)
        node = user


def _unrepeat(node: fx.Node) -> Optional[tuple[fx.Node, int]]:
    """(kv, n_rep) when ``node`` ``[B, Hkv*n_rep, L, D]`` is ``repeat_kv(kv [B, Hkv, L, D])``."""
    while _passes_order(node):
        node = node.args[0]
    if node.target is not aten.expand.default:
        return None
    expanded, src = _meta(node), _meta(node.args[0])
    if expanded.rank != 5 or src is None or src.rank != 5 or src.shape[2] != 1 or \
            src.shape[:2] != expanded.shape[:2] or src.shape[3:] != expanded.shape[3:]:
        return None
    b, hkv, rep, length, d = expanded.shape
    node = node.args[0]
    while True:
        if _shape(node) == (b, hkv, length, d):
            return node, rep
        if not _passes_order(node):
            return None
        node = node.args[0]


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
        if node.op == "get_attr":
            return getattr(self.ir.gm, node.target)
        inputs = node.all_input_nodes
        if not (is_pure(node) and inputs and all(self.constant(i) is not None for i in inputs)):
            return None
        with torch.no_grad():
            value = node.target(*fx.node.map_arg(node.args, self.constant),
                                **fx.node.map_arg(node.kwargs, self.constant))
        return value if isinstance(value, torch.Tensor) else None

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
        target, args = node.target, node.args
        if target in _NOT:
            return _NEGATE.get(self.keep_class(args[0]))
        if target in (aten.eq.Scalar, aten.ne.Scalar) and meta.dtype == torch.bool and \
                _meta(args[0]).dtype == torch.bool and args[1] in (0, 1):  # x == 0 is not x
            same = (args[1] == 1) == (target is aten.eq.Scalar)
            return self.keep_class(args[0]) if same else _NEGATE.get(self.keep_class(args[0]))
        adds = target is aten.add.Tensor and not node.kwargs and meta.dtype.is_floating_point
        if target in _AND or target in _OR or adds:  # adding {0, -big} masks keeps where both do
            a, b = (self.keep_class(x) if isinstance(x, fx.Node) else None for x in args[:2])
            return _combine(a, b, target not in _OR)
        if target is aten.where.self and meta.dtype.is_floating_point:
            cond, a, b = args
            low = torch.finfo(meta.dtype).min / 2
            fill_a, fill_b = _scalar_value(a), _scalar_value(b)
            if fill_a == 0 and fill_b is not None and fill_b <= low:
                return self.keep_class(cond)
            if fill_b == 0 and fill_a is not None and fill_a <= low:
                return _NEGATE.get(self.keep_class(cond))
            return None
        if target is aten.slice.Tensor:
            dim, start, _, step = (list(args[1:]) + [0, None, None, 1][len(args) - 1:])[:4]
            if dim % meta.rank >= meta.rank - 2 and (start not in (0, None) or step != 1):
                return None
            return self.keep_class(args[0])
        src = _meta(args[0]) if args else None
        if (_passes_order(node) or target is aten.expand.default) and src is not None and \
                src.rank >= 2 and tuple(src.shape[-2:]) == tuple(meta.shape[-2:]):
            return self.keep_class(args[0])
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
        elif _shape(k)[1] != _shape(q)[1]:  # the CPU flash op takes grouped k/v as they are
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
        scores_in, dim = softmax.args[:2]
        if not _leads_to_bmm(scores_in):
            return False  # a classifier's or a router's softmax
        rank = len(_shape(scores_in))
        if dim % rank != rank - 1:
            raise Decline(f"softmax over dim {dim}, not the last")
        scores = _walk_scores(scores_in)
        bmm2, tail = _softmax_to_bmm(softmax)
        (q3, kt3), v3 = scores.bmm.args, bmm2.args[1]
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
        if out is None or not _passes_order(out) or _shape(out) != (b, h, lq, dv):
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

    def normalize_flash(self, node: fx.Node) -> bool:
        """dynamo's ``_scaled_dot_product_flash_attention_for_cpu`` -> the canonical node."""
        q, k, v = node.args[:3]
        dropout = node.args[3] if len(node.args) > 3 else node.kwargs.get("dropout_p", 0.0)
        is_causal = node.args[4] if len(node.args) > 4 else node.kwargs.get("is_causal", False)
        mask, scale = node.kwargs.get("attn_mask"), node.kwargs.get("scale")
        if dropout:
            raise Decline(f"dropout_p={dropout}")
        outputs = {u.args[1]: u for u in node.users if u.target is operator.getitem}
        if len(outputs) != len(node.users) or (1 in outputs and outputs[1].users):
            raise Decline("the logsumexp output is used")
        if 0 not in outputs or any(_meta(x) is None or _meta(x).rank != 4 for x in (q, k, v)):
            return False
        wrapped = Mask(mask, additive=_meta(mask).dtype != torch.bool) if mask is not None else None
        self.fuse(outputs[0], q, k, v, wrapped, 1.0, scale, bool(is_causal))
        return True


def _class_of(value: torch.Tensor) -> Optional[str]:
    if value.dim() < 2 or value.shape[-1] * value.shape[-2] == 0:
        return None
    if value.dtype == torch.bool:
        keep = value
    elif value.is_floating_point():
        dropped = value <= torch.finfo(value.dtype).min / 2
        if not bool(((value == 0) | dropped).all()):
            return None
        keep = value == 0
    else:
        return None
    n, m = keep.shape[-2:]
    slabs = keep.reshape(-1, n, m)
    if not bool((slabs == slabs[:1]).all()):
        return None
    pattern, lower = slabs[0], torch.ones(n, m, dtype=torch.bool).tril()
    if bool(pattern.all()):
        return "all"
    if not bool(pattern.any()):
        return "none"
    if torch.equal(pattern, lower):
        return "lower"
    return "strict_upper" if torch.equal(pattern, ~lower) else None


def _combine(a: Optional[str], b: Optional[str], both: bool) -> Optional[str]:
    """Kept positions of ``a and b`` (``both``) or ``a or b``."""
    if a is None or b is None:
        return None
    if not both:  # De Morgan: a or b = not (not a and not b)
        a, b = _NEGATE[a], _NEGATE[b]
    if "none" in (a, b) or {a, b} == {"lower", "strict_upper"}:
        result = "none"
    else:
        result = b if a == "all" else a
    return result if both else _NEGATE[result]


def _mask_value(mask: Mask, value: torch.Tensor, factor: float, dtype: torch.dtype) -> torch.Tensor:
    """A constant mask in SDPA's form; declines one that leaves a query row without keys."""
    if mask.additive:
        result = value * factor if factor != 1.0 else value.clone()
        kept = result != -math.inf
    elif mask.fill != -math.inf:
        zero, fill = torch.tensor(0.0, dtype=dtype), torch.tensor(mask.fill, dtype=dtype)
        result = torch.where(value, zero, fill) if mask.keep_if_true else torch.where(value, fill, zero)
        kept = torch.ones((), dtype=torch.bool)
    else:
        result = kept = value.clone() if mask.keep_if_true else ~value
    if not bool(kept.any(-1).all() if kept.dim() else kept):
        raise Decline("a constant mask leaves a query row with no key (eager gives NaN there)")
    return result


def _check_broadcast(mask: fx.Node, applied_at: fx.Node, target: tuple) -> None:
    """The mask was broadcast against ``applied_at``; it must mean the same against ``target``."""
    shape, at = _shape(mask), _shape(applied_at)
    if at[-2:] != target[-2:] or len(shape) > 4:
        raise Decline(f"mask applied to scores of shape {at}")
    if at != target and any(s != 1 for s in shape[:-2]):
        raise Decline(f"mask {shape} on scores {at} would not broadcast the same to {target}")


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
    """Explicit attention chains and dynamo's CPU SDPA become scaled_dot_product_attention."""
    context = _Context(ir)
    constants_before = {name for name, _ in ir.gm.named_buffers()}
    for node in list(ir.gm.graph.nodes):
        try:
            if node.op == "call_function" and node.target is aten._softmax.default:
                context.counts["attention_fused"] += context.fuse_softmax(node)
            elif node.op == "call_function" and node.target is FLASH_CPU:
                context.counts["normalized"] += context.normalize_flash(node)
        except Decline as reason:
            context.counts["declined"] += 1
            log.debug("fuse_attention: %s not fused: %s", node.name, reason)
    ir.gm.graph.eliminate_dead_code()
    used = {n.target for n in ir.gm.graph.nodes if n.op == "get_attr"}
    for name in [name for name, _ in ir.gm.named_buffers() if name not in constants_before | used]:
        delattr(ir.gm, name)  # masks made for a candidate that then declined
    hoist_get_attrs(ir.gm.graph)
    return PassResult(ir, {key: context.counts[key] for key in COUNT_KEYS})
