"""Epilogue fusion: a weight matmul and what follows it become one ``fxforge::linear``.

``addmm(b, x, W)`` / ``mm(x, W)`` with ``W`` a weight (a constant, a view of one, or a
weight-only computation such as ``fuse_projections``' concatenation) becomes
``fxforge.linear(x, W, b, "none", None, None)``; then local rules, each a pattern and its
replacement side by side, grow that node by absorbing its single consumer, in this order:

    activation  gelu (none/tanh), silu, relu; also their written-out forms (GPT-2's gelu_new
                is ``0.5*x*(1+tanh(sqrt(2/pi)*(x+0.044715*x**3)))``, ``x*sigmoid(x)``, erf-gelu)
    residual    ``add(y, r)`` with ``r`` of y's exact shape (no broadcasting)
    cast        ``_to_copy(y, dtype=d)`` becomes ``out_dtype=d``

Each rule also sees through the ``view`` back to ``[B, T, N]`` that follows a 2-D matmul:
``add(view(linear(...)), r)`` becomes ``view(linear(..., residual=view(r, [-1, N])))``. That
is exact because a view keeps the row-major element order, and elementwise epilogues do not
care about shape. A value is absorbed only when nothing else reads the intermediate result
(one user, or for a written-out activation, only the pattern's own nodes): otherwise the
intermediate would have to be kept anyway and nothing is saved.

Every replacement gets fresh metadata and must have the replaced node's shape, strides, dtype
and device, else it is undone. The fused op's reference runs the same ATen ops in the same
order, so the rewrite is bit-exact for the single-op activations; a written-out activation
becomes the ATen one (equal up to rounding, a few ulp in fp32).
"""
from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.fx as fx

from fxforge.irgraph import IRGraph, TensorMeta
from fxforge.irgraph.meta import META_KEY
from fxforge.irgraph.ops import ACTIVATIONS, fxforge_linear
from fxforge.passes.base import PassResult, register_pass
from fxforge.passes.cleanup import is_pure
from fxforge.passes.pattern import RuleTable, alias_root

log = logging.getLogger("fxforge.passes")
aten = torch.ops.aten
LINEAR_FIELDS = ("x", "weight", "bias", "activation", "residual", "out_dtype")
_DEFAULTS = {"bias": None, "activation": "none", "residual": None, "out_dtype": None}
_RESHAPES = (aten.view.default, aten._unsafe_view.default)
_DECLINES = "fuse_epilogues_declined"  # ir.info key: node name -> reason

RULES = RuleTable()


def linear_fields(node: fx.Node) -> dict:
    """The arguments of a ``fxforge.linear`` node by name, defaults filled in."""
    fields = dict(_DEFAULTS)
    fields.update(zip(LINEAR_FIELDS, node.args))
    fields.update(node.kwargs)
    return fields


def _meta(node) -> Optional[TensorMeta]:
    meta = node.meta.get(META_KEY) if isinstance(node, fx.Node) else None
    return meta if isinstance(meta, TensorMeta) else None


@dataclass(frozen=True)
class Fused:
    """A ``fxforge.linear`` node as a consumer reads it: directly, or through one reshape."""

    linear: fx.Node
    view: Optional[fx.Node] = None

    @property
    def value(self) -> fx.Node:
        return self.view if self.view is not None else self.linear

    @property
    def fields(self) -> dict:
        return linear_fields(self.linear)

    def sole_use(self, consumers: set[fx.Node]) -> bool:
        """Nothing but ``consumers`` reads the value (or the linear behind the view)."""
        if self.view is not None and set(self.linear.users) != {self.view}:
            return False
        return set(self.value.users) <= consumers


def fused_operand(value) -> Optional[Fused]:
    if not isinstance(value, fx.Node) or value.op != "call_function":
        return None
    if value.target is fxforge_linear:
        return Fused(value)
    source = value.args[0] if value.args else None
    if value.target in _RESHAPES and isinstance(source, fx.Node) and source.target is fxforge_linear:
        meta = _meta(source)
        if meta is not None and meta.is_contiguous():
            return Fused(source, value)
    return None


def _decline(ir: IRGraph, node: fx.Node, reason: str) -> None:
    ir.info.setdefault(_DECLINES, {})[node.name] = reason


class _Builder:
    """Inserts nodes before ``anchor`` with fresh metadata, and can take them all back."""

    def __init__(self, ir: IRGraph, anchor: fx.Node):
        self.ir, self.anchor, self.nodes = ir, anchor, []

    def call(self, target, args: tuple) -> fx.Node:
        with self.ir.gm.graph.inserting_before(self.anchor):
            node = self.ir.gm.graph.call_function(target, args)
        self.nodes.append(node)
        self.ir.infer(node)
        return node

    def linear(self, fused: Fused, **changes) -> fx.Node:
        """The grown linear, viewed back to the shape the consumer read if it read a view."""
        fields = {**fused.fields, **changes}
        node = self.call(fxforge_linear, tuple(fields[name] for name in LINEAR_FIELDS))
        if fused.view is not None:
            node = self.call(fused.view.target, (node, *fused.view.args[1:]))
        return node

    def undo(self) -> None:
        for node in reversed(self.nodes):
            self.ir.gm.graph.erase_node(node)


def _replace(ir: IRGraph, node: fx.Node, build: Callable[[_Builder], fx.Node]) -> Optional[fx.Node]:
    """Build the replacement of ``node``; keep it only if its metadata matches ``node``'s."""
    builder = _Builder(ir, node)
    try:
        out = build(builder)
    except Exception as exc:  # the fake implementation refused the new node's shapes
        builder.undo()
        log.debug("fuse_epilogues: %s: %s: %s", node.name, type(exc).__name__, exc)
        _decline(ir, node, "the replacement does not type-check")
        return None
    old, new = _meta(node), _meta(out)
    if old is None or new is None or (old.shape, old.stride, old.dtype, old.device) != \
            (new.shape, new.stride, new.dtype, new.device):
        builder.undo()
        _decline(ir, node, "the replacement's metadata differs")
        return None
    ir.info.get(_DECLINES, {}).pop(node.name, None)
    return out


# ---- the matmul itself -------------------------------------------------------------------

def is_weight(node, memo: Optional[dict] = None) -> bool:
    """A constant, a view of one, or a pure computation on constants only (the weight
    concatenation ``fuse_projections`` leaves for ``constant_fold``). Pass the same ``memo``
    to many calls on one graph to visit each node once in all."""
    if not isinstance(node, fx.Node):
        return False
    if alias_root(node).op == "get_attr":
        return True
    memo = {} if memo is None else memo
    stack = [node]
    while stack:  # post-order: a node is decided once all of its inputs are
        current = stack[-1]
        if current in memo:
            stack.pop()
        elif current.op == "get_attr":
            memo[current] = True
        elif not is_pure(current) or not current.all_input_nodes:
            memo[current] = False  # a runtime input, a factory or a random op
        else:
            pending = [i for i in current.all_input_nodes if i not in memo]
            if pending:
                stack.extend(pending)
            else:
                memo[current] = all(memo[i] for i in current.all_input_nodes)
    return memo[node]


def _weight_matmul_decline(x, weight) -> Optional[str]:
    if not is_weight(weight):
        return "weight is not a constant"
    if _meta(x) is None or _meta(weight) is None or _meta(x).rank != 2 or _meta(weight).rank != 2:
        return "not a 2-D matmul"
    return None


@RULES.add(aten.mm.default, "mm")
def _mm(node: fx.Node, ir: IRGraph):
    x, weight = node.args
    reason = _weight_matmul_decline(x, weight)
    if reason:
        return _decline(ir, node, reason)
    return _replace(ir, node, lambda b: b.call(fxforge_linear, (x, weight, None, "none", None, None)))


@RULES.add(aten.addmm.default, "addmm")
def _addmm(node: fx.Node, ir: IRGraph):
    bias, x, weight = node.args
    reason = _weight_matmul_decline(x, weight)
    if node.kwargs:
        reason = "addmm with alpha/beta"
    elif reason is None:
        bias_meta = _meta(bias)
        if bias_meta is None or bias_meta.shape != (_meta(weight).shape[1],):
            reason = "bias is not 1-D [N]"
    if reason:
        return _decline(ir, node, reason)
    return _replace(ir, node, lambda b: b.call(fxforge_linear, (x, weight, bias, "none", None, None)))


# ---- activation ------------------------------------------------------------------------

def _grow_activation(ir: IRGraph, node: fx.Node, x, activation: str, pattern: set[fx.Node]):
    fused = fused_operand(x)
    if fused is None:
        return None
    fields = fused.fields
    if fields["activation"] != "none" or fields["residual"] is not None or fields["out_dtype"] is not None:
        return None  # epilogue order: act(matmul + bias) + residual, then the cast
    if activation not in ACTIVATIONS:
        return _decline(ir, node, f"activation {activation!r} is not supported")
    if not fused.sole_use(pattern | {node}):
        return _decline(ir, node, "the matmul result has other users")
    return _replace(ir, node, lambda b: b.linear(fused, activation=activation))


_SINGLE_OP_ACTIVATIONS = {aten.relu.default: "relu", aten.silu.default: "silu"}


@RULES.add([aten.relu.default, aten.silu.default], "activation")
def _relu_silu(node: fx.Node, ir: IRGraph):
    return _grow_activation(ir, node, node.args[0], _SINGLE_OP_ACTIVATIONS[node.target], set())


@RULES.add(aten.gelu.default, "activation")
def _gelu(node: fx.Node, ir: IRGraph):
    approximate = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
    name = {"none": "gelu", "tanh": "gelu_tanh"}.get(approximate, f"gelu_{approximate}")
    return _grow_activation(ir, node, node.args[0], name, set())


_COMMUTATIVE = (aten.add.Tensor, aten.mul.Tensor)


def _operand_orders(node, target):
    """(a, b), and (b, a) if ``target`` commutes, for a binary ``target`` node."""
    if isinstance(node, fx.Node) and node.target is target and len(node.args) == 2 and not node.kwargs:
        a, b = node.args
        yield a, b
        if target in _COMMUTATIVE:
            yield b, a


def _with_scalar(node, target, value: float) -> Optional[fx.Node]:
    """``t`` where ``node`` is ``target(t, value)`` or ``target(value, t)``."""
    for tensor, scalar in _operand_orders(node, target):
        if isinstance(tensor, fx.Node) and isinstance(scalar, (int, float)) and \
                math.isclose(scalar, value, rel_tol=1e-6):
            return tensor
    return None


def _unary(node, target) -> Optional[fx.Node]:
    if isinstance(node, fx.Node) and node.target is target and len(node.args) == 1 and not node.kwargs:
        return node.args[0]
    return None


def _silu_written_out(mul: fx.Node):
    for x, sig in _operand_orders(mul, aten.mul.Tensor):
        if _unary(sig, aten.sigmoid.default) is x:
            return "silu", x, {sig}
    return None


def _gelu_written_out(mul: fx.Node):
    """``0.5*x * (1 + tanh(sqrt(2/pi)*(x + 0.044715*x**3)))`` or ``0.5*x * (1 + erf(x/sqrt(2)))``."""
    for half_x, one_plus in _operand_orders(mul, aten.mul.Tensor):
        x, inner = _with_scalar(half_x, aten.mul.Tensor, 0.5), _with_scalar(one_plus, aten.add.Tensor, 1.0)
        if x is None or inner is None:
            continue
        erf_arg = _unary(inner, aten.erf.default)
        if erf_arg is not None and x in (_with_scalar(erf_arg, aten.mul.Tensor, math.sqrt(0.5)),
                                         _with_scalar(erf_arg, aten.div.Tensor, math.sqrt(2))):
            return "gelu", x, {half_x, one_plus, inner, erf_arg}
        scaled = _unary(inner, aten.tanh.default)
        poly = _with_scalar(scaled, aten.mul.Tensor, math.sqrt(2 / math.pi))
        for lhs, cubic in _operand_orders(poly, aten.add.Tensor):
            cube = _with_scalar(cubic, aten.mul.Tensor, 0.044715)
            if lhs is x and cube is not None and _with_scalar(cube, aten.pow.Tensor_Scalar, 3) is x:
                return "gelu_tanh", x, {half_x, one_plus, inner, scaled, poly, cubic, cube}
    return None


@RULES.add(aten.mul.Tensor, "activation")
def _written_out_activation(node: fx.Node, ir: IRGraph):
    match = _silu_written_out(node) or _gelu_written_out(node)
    if match is None:
        return None
    name, x, pattern = match
    if any(set(p.users) - pattern - {node} for p in pattern):
        return None  # an inner value of the pattern is read elsewhere
    return _grow_activation(ir, node, x, name, pattern)


# ---- residual and cast -----------------------------------------------------------------

def _depends_on(value: fx.Node, ancestor: fx.Node) -> bool:
    seen, stack = set(), [value]
    while stack:
        node = stack.pop()
        if node is ancestor:
            return True
        if node not in seen:
            seen.add(node)
            stack.extend(node.all_input_nodes)
    return False


def _residual_candidate(node: fx.Node) -> Optional[tuple[Fused, fx.Node]]:
    for a, b in _operand_orders(node, aten.add.Tensor):
        fused = fused_operand(a)
        if fused is not None and isinstance(b, fx.Node):
            fields = fused.fields
            if fields["residual"] is None and fields["out_dtype"] is None:
                return fused, b
    return None


@RULES.add(aten.add.Tensor, "residual")
def _residual(node: fx.Node, ir: IRGraph):
    if node.kwargs and len(node.args) == 2:
        if any(fused_operand(a) is not None for a in node.args):
            _decline(ir, node, "add with alpha")
        return None
    found = _residual_candidate(node)
    if found is None:
        return None
    fused, residual = found
    if not fused.sole_use({node}):
        return _decline(ir, node, "the matmul result has other users")
    if _meta(residual) is None or _meta(residual).shape != _meta(fused.value).shape:
        return _decline(ir, node, "the residual broadcasts")
    if _depends_on(residual, fused.linear):
        return _decline(ir, node, "the residual depends on the matmul")

    def build(b: _Builder) -> fx.Node:
        flat = residual
        if fused.view is not None:
            flat = b.call(aten.view.default, (residual, [-1, _meta(fused.linear).shape[1]]))
        return b.linear(fused, residual=flat)
    return _replace(ir, node, build)


@RULES.add(aten._to_copy.default, "cast")
def _cast(node: fx.Node, ir: IRGraph):
    fused = fused_operand(node.args[0])
    if fused is None or fused.fields["out_dtype"] is not None:
        return None
    if len(node.args) != 1 or set(node.kwargs) != {"dtype"}:
        return _decline(ir, node, "the copy changes more than the dtype")
    if not fused.sole_use({node}):
        return _decline(ir, node, "the matmul result has other users")
    return _replace(ir, node, lambda b: b.linear(fused, out_dtype=node.kwargs["dtype"]))


@register_pass("fuse_epilogues")
def fuse_epilogues(ir: IRGraph) -> PassResult:
    """Fold bias, activation, residual add and output cast into fxforge.linear matmuls."""
    ir.info[_DECLINES] = {}
    fired: Counter = RULES.apply(ir)
    alive = {n.name for n in ir.gm.graph.nodes}
    declined = {name: why for name, why in ir.info[_DECLINES].items() if name in alive}
    ir.info[_DECLINES] = declined
    return PassResult(ir, {
        "linear_fused": fired["mm"] + fired["addmm"], "bias": fired["addmm"],
        "activation": fired["activation"], "residual": fired["residual"], "cast": fired["cast"],
        "declined": len(declined),
    })
