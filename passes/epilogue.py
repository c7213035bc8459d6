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

import dataclasses
import logging
import math
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.fx as fx

from fxforge.irgraph import IRGraph, node_arguments
from fxforge.irgraph.ops import ACTIVATIONS, fxforge_linear
from fxforge.irgraph.query import is_weight, tensor_meta
from fxforge.irgraph.views import Addmm, Linear, ToCopy, View
from fxforge.passes.base import PassResult, register_pass
from fxforge.irgraph.pattern import (ANY, AnyOf, Match, Op, Pat, PatternMatcher, graph_rewrite,
                                    is_contiguous)

log = logging.getLogger("fxforge.passes")
aten = torch.ops.aten
_RESHAPES = (aten.view.default, aten._unsafe_view.default)
_DECLINES = "fuse_epilogues_declined"  # ir.info key: node name -> reason
tanh, erf, sigmoid = Op(aten.tanh.default), Op(aten.erf.default), Op(aten.sigmoid.default)


def _unset(*fields: str) -> Callable[[fx.Node], bool]:
    """The linear's epilogue ``fields`` are still free (an epilogue applies in a fixed order:
    act(matmul + bias) + residual, then the cast, so a later step closes the earlier ones)."""
    def unset(node: fx.Node) -> bool:
        linear = Linear.of(node)
        return all(getattr(linear, f) == "none" if f == "activation" else getattr(linear, f) is None
                   for f in fields)
    return unset


def fused(*free: str) -> AnyOf:
    """A ``fxforge.linear`` whose epilogue fields ``free`` are unset, read directly or through
    the reshape back to ``[B, T, N]`` (of a contiguous result) that follows a 2-D matmul.
    Captures ``x`` (the value read), ``linear`` and, if read through one, ``view``."""
    linear = Pat(fxforge_linear, name="linear", where=_unset(*free))
    contiguous = Pat(fxforge_linear, name="linear", where=(_unset(*free), is_contiguous))
    return AnyOf(linear, Pat(_RESHAPES, (contiguous,), name="view"), name="x")


@dataclass(frozen=True)
class Fused:
    """A ``fxforge.linear`` node as a consumer reads it: directly, or through one reshape."""

    linear: fx.Node
    view: Optional[fx.Node] = None

    @classmethod
    def of(cls, m: Match) -> "Fused":
        return cls(m.linear, m.get("view"))

    @property
    def value(self) -> fx.Node:
        return self.view if self.view is not None else self.linear

    def sole_use(self, consumers: set[fx.Node]) -> bool:
        """Nothing but ``consumers`` reads the value (or the linear behind the view)."""
        if self.view is not None and set(self.linear.users) != {self.view}:
            return False
        return set(self.value.users) <= consumers

    def grown(self, m: Match, **changes) -> fx.Node:
        """The grown linear, viewed back to the shape the consumer read if it read a view."""
        linear = Linear.of(self.linear)
        fields = {f.name: getattr(linear, f.name) for f in dataclasses.fields(linear) if f.name != "node"}
        node = _new_linear(m, **{**fields, **changes})
        if self.view is not None:
            node = m.call(self.view.target, node, View.of(self.view).size)
        return node


def _new_linear(m: Match, **fields) -> fx.Node:
    defaults = {"bias": None, "activation": "none", "residual": None, "out_dtype": None}
    args, kwargs = Linear.arguments(**{**defaults, **fields})
    return m.call(fxforge_linear, *args, **kwargs)


def _decline(ir: IRGraph, node: fx.Node, reason: str) -> None:
    ir.info.setdefault(_DECLINES, {})[node.name] = reason


def _replace(m: Match, build: Callable[[Match], fx.Node]) -> Optional[fx.Node]:
    """Build the replacement of the root; keep it only if its metadata matches the root's
    (when declined, ``graph_rewrite`` removes the nodes ``build`` made)."""
    node = m.root
    try:
        out = build(m)
    except Exception as exc:  # the fake implementation refused the new node's shapes
        log.debug("fuse_epilogues: %s: %s: %s", node.name, type(exc).__name__, exc)
        return _decline(m.ir, node, "the replacement does not type-check")
    old, new = tensor_meta(node), tensor_meta(out)
    if old is None or new is None or (old.shape, old.stride, old.dtype, old.device) != \
            (new.shape, new.stride, new.dtype, new.device):
        return _decline(m.ir, node, "the replacement's metadata differs")
    m.ir.info.get(_DECLINES, {}).pop(node.name, None)
    return out


# ---- the matmul itself -------------------------------------------------------------------

def _weight_matmul_decline(x: fx.Node, weight: fx.Node) -> Optional[str]:
    if not is_weight(weight):
        return "weight is not a constant"
    x_meta, w_meta = tensor_meta(x), tensor_meta(weight)
    if x_meta is None or w_meta is None or x_meta.rank != 2 or w_meta.rank != 2:
        return "not a 2-D matmul"
    return None


def mm(m: Match) -> Optional[fx.Node]:
    reason = _weight_matmul_decline(m.x, m.weight)
    if reason:
        return _decline(m.ir, m.root, reason)
    return _replace(m, lambda m: _new_linear(m, x=m.x, weight=m.weight))


def addmm(m: Match) -> Optional[fx.Node]:
    reason = _weight_matmul_decline(m.x, m.weight)
    if not Addmm.of(m.root).plain:
        reason = "addmm with alpha/beta"
    elif reason is None:
        bias_meta = tensor_meta(m.bias)
        if bias_meta is None or bias_meta.shape != (tensor_meta(m.weight).shape[1],):
            reason = "bias is not 1-D [N]"
    if reason:
        return _decline(m.ir, m.root, reason)
    return _replace(m, lambda m: _new_linear(m, x=m.x, weight=m.weight, bias=m.bias))


# ---- activation ------------------------------------------------------------------------

def activation(name: str) -> Callable[[Match], Optional[fx.Node]]:
    """The rule folding activation ``name`` into the linear the match captured as ``x``. The
    match's own nodes may read that linear (a written-out activation reads it several times)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"fxforge::linear has no activation {name!r}")

    def activation(m: Match) -> Optional[fx.Node]:  # (counted as "activation")
        target = Fused.of(m)
        if not target.sole_use(set(m.nodes)):
            return _decline(m.ir, m.root, "the matmul result has other users")
        return _replace(m, lambda m: target.grown(m, activation=name))
    return activation


# Written out in the model (GPT-2's gelu_new, x*sigmoid(x), erf-gelu): the same epilogues, as
# long as nothing else reads an inner value of the expression. They become the ATen activation
# (equal up to rounding, a few ulp in fp32).
X = fused("activation", "residual", "out_dtype")
GELU_TANH = 0.5 * X * (1 + tanh(math.sqrt(2 / math.pi) * (X + 0.044715 * X ** 3)))
GELU_ERF = 0.5 * X * (1 + erf(X / math.sqrt(2) | X * math.sqrt(0.5)))
SILU = X * sigmoid(X)
_gelu = Op(aten.gelu.default)
ACTIVATION_RULES = PatternMatcher([
    (Pat(aten.relu.default, (X,)), activation("relu")),
    (Pat(aten.silu.default, (X,)), activation("silu")),
    (_gelu(X, approximate="none"), activation("gelu")),
    (_gelu(X, approximate="tanh"), activation("gelu_tanh")),
    (SILU.inner_single_use(), activation("silu")),
    (GELU_ERF.inner_single_use(), activation("gelu")),
    (GELU_TANH.inner_single_use(), activation("gelu_tanh")),
])


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


def add_with_alpha(m: Match) -> None:
    return _decline(m.ir, m.root, "add with alpha")


def residual(m: Match) -> Optional[fx.Node]:
    target, added = Fused.of(m), m.residual
    if not target.sole_use({m.root}):
        return _decline(m.ir, m.root, "the matmul result has other users")
    if tensor_meta(added) is None or tensor_meta(added).shape != tensor_meta(target.value).shape:
        return _decline(m.ir, m.root, "the residual broadcasts")
    if _depends_on(added, target.linear):
        return _decline(m.ir, m.root, "the residual depends on the matmul")

    def build(m: Match) -> fx.Node:
        flat = added
        if target.view is not None:
            flat = m.call(aten.view.default, added, [-1, tensor_meta(target.linear).shape[1]])
        return target.grown(m, residual=flat)
    return _replace(m, build)


def cast(m: Match) -> Optional[fx.Node]:
    copy = ToCopy.of(m.root)
    if copy.dtype is None or not _sets_only(m.root, "dtype"):
        return _decline(m.ir, m.root, "the copy changes more than the dtype")
    target = Fused.of(m)
    if not target.sole_use({m.root}):
        return _decline(m.ir, m.root, "the matmul result has other users")
    return _replace(m, lambda m: target.grown(m, out_dtype=copy.dtype))


def _sets_only(node: fx.Node, *names: str) -> bool:
    """Every argument of ``node`` with a default, other than ``names``, holds its default."""
    values = node_arguments(node)
    return all(values[a.name] == a.default_value for a in node.target._schema.arguments
               if a.has_default_value() and a.name not in names)


def _alpha_is_not_one(node: fx.Node) -> bool:
    return node_arguments(node)["alpha"] != 1


RULES = PatternMatcher([
    (Pat(aten.mm.default, (Pat.var("x"), Pat.var("weight"))), mm),
    (Pat(aten.addmm.default, (Pat.var("bias"), Pat.var("x"), Pat.var("weight"))), addmm),
]) + ACTIVATION_RULES + PatternMatcher([
    (Pat(aten.add.Tensor, (fused(), ANY), commutative=True, where=_alpha_is_not_one), add_with_alpha),
    (fused("residual", "out_dtype") + Pat.var("residual"), residual),
    (Pat(aten._to_copy.default, (fused("out_dtype"),)), cast),
])


@register_pass("fuse_epilogues")
def fuse_epilogues(ir: IRGraph) -> PassResult:
    """Fold bias, activation, residual add and output cast into fxforge.linear matmuls."""
    ir.info[_DECLINES] = {}
    fired: Counter = graph_rewrite(ir, RULES)
    alive = {n.name for n in ir.gm.graph.nodes}
    declined = {name: why for name, why in ir.info[_DECLINES].items() if name in alive}
    ir.info[_DECLINES] = declined
    return PassResult(ir, {
        "linear_fused": fired["mm"] + fired["addmm"], "bias": fired["addmm"],
        "activation": fired["activation"], "residual": fired["residual"], "cast": fired["cast"],
        "declined": len(declined),
    })
