"""Structure matching for attention fusion: walking the score chain back to q, k and v,
recognising masks, scales and ``repeat_kv``, and classifying constant masks (see
:mod:`fxforge.passes.attention` for the rewrite and the rules)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.fx as fx

from fxforge.irgraph import node_arguments, op_name
from fxforge.irgraph.query import tensor_meta
from fxforge.irgraph.views import Bmm, Full, MaskedFill, Where
from fxforge.irgraph.layout import keeps_order, step_layout


aten = torch.ops.aten


SDPA = aten.scaled_dot_product_attention.default
# What a traced ``F.scaled_dot_product_attention`` becomes: aot_autograd decomposes it into the
# kernel the device's dispatcher picks (CPU flash; CUDA flash, memory-efficient or cuDNN). Each
# returns the attention as output 0 plus softmax statistics and RNG state, and is normalized back
# to SDPA by fuse_attention (the KV-cache pass and the kernels know only the canonical op).
SDPA_VARIANTS = tuple(getattr(aten, name).default for name in (
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention")
    if hasattr(aten, name))

_SCALE_OPS = {aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar}
_AND = {aten.bitwise_and.Tensor, aten.logical_and.default}
_OR = {aten.bitwise_or.Tensor, aten.logical_or.default}
_NOT = {aten.bitwise_not.default, aten.logical_not.default}
_NEGATE = {"lower": "strict_upper", "strict_upper": "lower", "all": "none", "none": "all"}
HUGE_NEGATIVE = -1e30  # a finite fill this low equals -inf after softmax and absorbs any score
MAX_CONSTANT_NUMEL = 1 << 24  # constant masks evaluated at compile time to prove their pattern


class Decline(Exception):
    """A candidate that must not fuse; the message is the reason."""


_meta = tensor_meta   # (the short name reads better in the many shape checks below)


def _shape(node: fx.Node) -> tuple:
    meta = _meta(node)
    if meta is None:
        raise Decline(f"{node.name} has no tensor metadata")
    return tuple(meta.shape)


def _input(node: Any) -> Any:
    """The tensor an ATen op acts on (its schema's ``self``); None for anything else."""
    if not (isinstance(node, fx.Node) and node.op == "call_function"
            and isinstance(node.target, torch._ops.OpOverload)):
        return None
    return node_arguments(node).get("self")


def _operands(node: fx.Node) -> tuple[Any, Any]:
    """``self`` and ``other`` of a binary ATen op (``add``, ``mul``, ``div``, ``and``, ``eq``...)."""
    args = node_arguments(node)
    return args.get("self"), args.get("other")


def _is_float_cast(node: fx.Node) -> bool:
    src, out = _meta(_input(node)), _meta(node)
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
        return _scalar_value(node_arguments(arg)["s"])
    if (full := Full.of(arg)) is not None and all(s == 1 for s in full.size):
        return _scalar_value(full.fill_value)
    if arg.target in (aten._to_copy.default, aten.lift_fresh_copy.default, aten.clone.default):
        return _scalar_value(_input(arg))
    return None


def _scalar_multiplier(node: fx.Node) -> Optional[tuple[fx.Node, float]]:
    """(tensor, factor) when ``node`` multiplies or divides a tensor by a real scalar constant."""
    if node.op != "call_function" or node.target not in _SCALE_OPS or node.kwargs:
        return None
    a, b = _operands(node)
    divides = node.target in (aten.div.Tensor, aten.div.Scalar)
    for tensor, scalar in ((a, b),) if divides else ((a, b), (b, a)):
        value = _scalar_value(scalar)
        if value is None or not (math.isfinite(value) and value > 0):
            continue  # a negative factor would turn a -inf mask into +inf: not a scale
        if isinstance(tensor, fx.Node) and _meta(tensor) is not None and _meta(node) is not None and \
                (_meta(tensor).shape, _meta(tensor).dtype) == (_meta(node).shape, _meta(node).dtype):
            return tensor, 1.0 / value if divides else value
    return None


def _step_back(node: fx.Node, absorb: bool = True) -> Optional[tuple[fx.Node, float]]:
    """(input, factor) one step back through an order-preserving op (factor 1) or, if
    ``absorb``, a scalar multiply; None for anything else."""
    if keeps_order(node):
        return _input(node), 1.0
    return _scalar_multiplier(node) if absorb else None


def _trace(node: fx.Node, last2: tuple, absorb: bool = True) -> tuple[Optional[fx.Node], float]:
    """Back from a bmm operand through order-preserving ops (and scalar multiplies if ``absorb``):
    the deepest rank-4 node with last dims ``last2`` holding the same values, and the scale met."""
    found, found_scale, scale = None, 1.0, 1.0
    while True:
        meta = _meta(node)
        if meta is not None and meta.rank == 4 and tuple(meta.shape[-2:]) == tuple(last2):
            found, found_scale = node, scale
        if (step := _step_back(node, absorb)) is None:
            return found, found_scale
        node, scale = step[0], scale * step[1]


def _swaps_last_two(node: fx.Node) -> bool:
    layout = step_layout(node)
    if layout is None or len(layout.dims) < 2:
        return False
    *lead, rows, columns = ([a] for a in layout.order)
    return layout.dims == [*lead, columns, rows]


def _trace_key(kt3: fx.Node, lk: Any, d: Any) -> tuple[fx.Node, float]:
    """The 4-D k ``[B, H, Lk, D]`` behind the transposed operand, and scales met on the way."""
    node, scale = kt3, 1.0
    while not _swaps_last_two(node):
        if (step := _step_back(node)) is None:
            raise Decline("k reaches the matmul without a transpose of its last two dims")
        node, scale = step[0], scale * step[1]
    k4, more = _trace(_input(node), (lk, d))
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
        if (where := Where.of(node)) is not None:
            return any(_leads_to_bmm(a, depth - 1) for a in (where.input, where.other))
        if node.target is aten.add.Tensor:
            return any(_leads_to_bmm(a, depth - 1) for a in _operands(node))
        multiplier = _scalar_multiplier(node)
        node = multiplier[0] if multiplier else _input(node)
        depth -= 1
    return False


def _mask_op(node: fx.Node) -> Optional[tuple[Mask, fx.Node]]:
    """(mask, score input) when ``node`` applies a mask to the scores."""
    if node.target is aten.add.Tensor and not node.kwargs:
        a, b = _operands(node)
        sides = [(x, y) for x, y in ((a, b), (b, a)) if isinstance(y, fx.Node) and _leads_to_bmm(y)]
        if len(sides) != 1 or not isinstance(sides[0][0], fx.Node):
            raise Decline(f"{node.name}: cannot tell the scores from the mask")
        return Mask(sides[0][0], additive=True), sides[0][1]
    if (where := Where.of(node)) is not None:
        cond, a, b = where.condition, where.input, where.other
        if _scalar_value(a) is not None and isinstance(b, fx.Node):
            return _bool_mask(cond, False, _scalar_value(a)), b
        if _scalar_value(b) is not None and isinstance(a, fx.Node):
            return _bool_mask(cond, True, _scalar_value(b)), a
        raise Decline(f"{node.name}: a where without a constant fill")
    if (fill := MaskedFill.of(node)) is not None:
        return _bool_mask(fill.mask, False, _scalar_value(fill.value)), fill.input
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
        if _is_float_cast(node):
            node = _input(node)
        elif (step := _step_back(node)) is not None:   # a view (factor 1) or a scale
            node, factor = step
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


def _nan_guard(node: fx.Node) -> Optional[fx.Node]:
    """``where(isnan(p), 0, p)`` over the weights ``p`` (ONNX exports of SDPA write it; core
    ATen's ``isnan`` is ``ne(p, p)``): the fused kernel's own result for a row whose keys are all
    masked (0, where the plain softmax gives NaN), so the guard fuses with the attention."""
    if len(node.users) != 2:
        return None
    test = next((u for u in node.users if u.target is aten.isnan.default and u.args[0] is node
                 or u.target is aten.ne.Tensor and u.args[:2] == (node, node)), None)
    select = next((u for u in node.users if u.target is aten.where.self), None)
    if test is None or select is None or len(test.users) != 1 or \
            select.args[0] is not test or select.args[2] is not node or \
            _scalar_value(select.args[1]) != 0.0:
        return None
    return select


def _softmax_to_bmm(softmax: fx.Node) -> tuple[fx.Node, list[fx.Node]]:
    """Forward from the softmax to the bmm that takes its result as the first operand."""
    chain, node = [], softmax
    while True:
        if (guard := _nan_guard(node)) is not None:
            chain.append(guard)
            node = guard
            continue
        if len(node.users) != 1:
            raise Decline(f"{node.name} (attention weights) has {len(node.users)} users")
        user = next(iter(node.users))
        if (bmm := Bmm.of(user)) is not None and bmm.input is node:
            return user, chain
        if not (keeps_order(user) or _is_float_cast(user)) or _input(user) is not node:
            raise Decline(f"the softmax result reaches {op_name(user.target)} before the matmul with v")
        chain.append(user)
        node = user


def _unrepeat(node: fx.Node) -> Optional[tuple[fx.Node, int]]:
    """(kv, n_rep) when ``node`` ``[B, Hkv*n_rep, L, D]`` is ``repeat_kv(kv [B, Hkv, L, D])``."""
    while keeps_order(node):
        node = _input(node)
    if node.target is not aten.expand.default:
        return None
    expanded, src = _meta(node), _meta(_input(node))
    if expanded.rank == 4 and src is not None and src.rank == 4 and src.shape[1] == 1 \
            and src.shape[0] == expanded.shape[0] and src.shape[2:] == expanded.shape[2:]:
        # one kv head broadcast to every query head (repeat_kv of a single head, whose
        # reshape folded away): multi-query attention, grouped with Hkv = 1
        return _input(node), expanded.shape[1]
    if expanded.rank != 5 or src is None or src.rank != 5 or src.shape[2] != 1 or \
            src.shape[:2] != expanded.shape[:2] or src.shape[3:] != expanded.shape[3:]:
        return None
    b, hkv, rep, length, d = expanded.shape
    node = _input(node)
    while _shape(node) != (b, hkv, length, d):
        if not keeps_order(node):
            return None
        node = _input(node)
    return node, rep


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
    pattern, lower = slabs[0], torch.ones(n, m, dtype=torch.bool, device=slabs.device).tril()
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
    if at[-2:] != target[-2:] or any(s != 1 for s in shape[:-4]):  # extra leading dims: size 1
        raise Decline(f"mask applied to scores of shape {at}")
    if at != target and any(s != 1 for s in shape[:-2]):
        raise Decline(f"mask {shape} on scores {at} would not broadcast the same to {target}")
