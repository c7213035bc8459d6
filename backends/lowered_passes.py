"""The rewrites that run on a graph after its nodes became kernel calls, as managed passes.

Lowering (:func:`fxforge.backends.kernel_lowering.lower_to_kernels`) ends with these graph
rewrites. Each is a named :class:`LoweredPass` that edits the lowered module in place and says
how many nodes it changed; :func:`run_lowered_passes` runs them in order, checks the graph after
each (:func:`lowered_problems`) and records the counts in ``gm.meta[LOWERED_PASSES_KEY]``. A pass
that raises or breaks the graph raises :class:`LoweredPassError` naming it and the passes before
it; the lowering of that partition then fails, and it runs eagerly with the reason logged (the
failure policy of any partition that does not compile).

They are not IR passes (:mod:`fxforge.passes`): the graph they see holds kernel calls, method
calls and eager fallback submodules, which the IR never does.
"""
from __future__ import annotations

import logging
import operator
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
import torch.fx as fx

from fxforge.backends.base import drop_unused_tensors
from fxforge.irgraph import TensorMeta
from fxforge.irgraph.query import tensor_meta
from fxforge.irgraph.views import Expand, Permute, View

log = logging.getLogger("fxforge.backends")
aten = torch.ops.aten
LOWERED_PASSES_KEY = "fxf_lowered_passes"   # gm.meta: {pass name: nodes changed}


class LoweredPassError(RuntimeError):
    """A post-lowering pass raised or left a broken graph."""


@dataclass(frozen=True)
class LoweredPass:
    name: str
    fn: Callable[[fx.GraphModule], int]   # rewrites the module in place; returns nodes changed


def is_kernel(node: fx.Node) -> bool:
    """A call of a kernel lowering put in (not an ATen op), or a piece of its result."""
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:
        return is_kernel(node.args[0])   # getitem's source
    return not isinstance(node.target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket))


def views_to_reshapes(gm: fx.GraphModule) -> int:
    """``view`` requires its input's strides to be the ones eager produced; a kernel may lay
    out its result differently (a fused group writes row-major; eager's pointwise ops follow
    their input's layout, so a difference travels on through ATen ops too). ``reshape`` is the
    same view when the strides allow it and a copy otherwise, so the graph stays correct
    whatever layout a kernel chose (the IR is functional: nothing observes whether a value
    aliases another). It costs ~3 us more per call than ``view``."""
    changed = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in (aten.view.default, aten._unsafe_view.default):
            node.target = aten.reshape.default
            changed += 1
    return changed


def collapse_reshapes(gm: fx.GraphModule) -> int:
    """``reshape(reshape(x, a), b)`` is ``reshape(x, b)``, and a reshape to its input's own
    shape is its input: model code and the projection fusion leave such chains around every
    attention and MLP (a decode step of a 30-layer model made ~500 reshape calls, ~3 us each).
    The values are the same (the graph is functional here); a result that is a graph output
    keeps its reshape, so no output newly aliases another value."""
    changed = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not aten.reshape.default:
            continue
        view = View.of(node)
        source = view.input
        while (inner := View.of(source)) is not None and source.target is aten.reshape.default:
            source = inner.input
        if source is not view.input:
            view.replace(input=source)
            changed += 1
        mine, theirs = tensor_meta(node), tensor_meta(source)
        if mine is not None and theirs is not None and tuple(mine.shape) == tuple(theirs.shape) \
                and all(user.op != "output" for user in node.users):
            node.replace_all_uses_with(source)
            gm.graph.erase_node(node)
            changed += 1
    return changed


def _match_layout(value: torch.Tensor, stride: tuple) -> torch.Tensor:
    """``value`` with eager's strides: a graph output must look as eager made it (code after
    the graph may ``view`` it). Copies only when a kernel chose another layout."""
    if value.stride() == stride:
        return value
    out = torch.empty_strided(value.shape, stride, dtype=value.dtype, device=value.device)
    return out.copy_(value)


_match_layout.not_a_kernel = True  # a stride check; it copies only when a layout differs


def fix_output_layouts(gm: fx.GraphModule) -> int:
    """Every graph output a kernel made gets eager's strides back (``_match_layout``)."""
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    fixed: list[fx.Node] = []

    def fix(arg):
        if not isinstance(arg, fx.Node) or not is_kernel(arg):
            return arg
        val = arg.meta.get("val")
        if not isinstance(val, torch.Tensor) or not all(isinstance(s, int) for s in val.stride()):
            return arg
        with gm.graph.inserting_before(output):
            call = gm.graph.call_function(_match_layout, (arg, tuple(val.stride())))
        call.meta = dict(arg.meta)
        fixed.append(call)
        return call

    output.args = fx.node.map_aggregate(output.args, fix)
    return len(fixed)


# Shape ops called as Tensor methods: the same ATen kernels, without OpOverload's Python call
# path (measured on a 2-core Zen 1, 2026-11: ``t.reshape(...)`` 2.8 us, ``torch.ops.aten.reshape.default(t, ...)``
# 9.5 us; a small model's graph makes dozens of these calls per forward). Their size lists are
# passed as separate arguments: ``t.reshape(16, 1)`` 2.6 us, ``t.reshape([16, 1])`` 4.1 us.
_AS_METHOD = {
    aten.reshape.default: "reshape", aten.permute.default: "permute",
    aten.unsqueeze.default: "unsqueeze", aten.expand.default: "expand",
    aten.t.default: "t", aten.transpose.int: "transpose",
    aten.squeeze.dim: "squeeze", aten.split_with_sizes.default: "split_with_sizes",
    aten.split.Tensor: "split", aten.select.int: "select",
    aten.unbind.int: "unbind", aten.contiguous.default: "contiguous",
}
# The ops whose size list is spread into separate arguments: (input, sizes) by their views.
_SIZES_AS_ARGS = {aten.reshape.default: lambda n: (View.of(n).input, View.of(n).size),
                  aten.permute.default: lambda n: (Permute.of(n).input, Permute.of(n).dims),
                  aten.expand.default: lambda n: (Expand.of(n).input, Expand.of(n).size)}


def shape_ops_as_methods(gm: fx.GraphModule) -> int:
    changed = 0
    for node in gm.graph.nodes:
        method = _AS_METHOD.get(node.target) if node.op == "call_function" else None
        if method is None or node.kwargs:
            continue
        spread = _SIZES_AS_ARGS.get(node.target)
        if spread is not None:
            source, sizes = spread(node)
            if isinstance(sizes, (list, tuple)) and sizes:
                node.args = (source, *sizes)
        node.op, node.target = "call_method", method
        changed += 1
    return changed


def drop_dead_code(gm: fx.GraphModule) -> int:
    """Nodes nothing uses any more (the ops a kernel replaced), their submodules and tensors."""
    before = len(gm.graph.nodes)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    drop_unused_tensors(gm)
    return before - len(gm.graph.nodes)


# In order: reshapes must exist before they are collapsed; layouts are fixed on the outputs the
# collapsed graph returns; method calls come last (no pass after reads their ATen targets).
LOWERED_PASSES = (LoweredPass("views_to_reshapes", views_to_reshapes),
                  LoweredPass("collapse_reshapes", collapse_reshapes),
                  LoweredPass("fix_output_layouts", fix_output_layouts),
                  LoweredPass("shape_ops_as_methods", shape_ops_as_methods),
                  LoweredPass("drop_dead_code", drop_dead_code))


def _outputs(gm: fx.GraphModule) -> list:
    """The values the graph returns, flattened (nodes and constants)."""
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    leaves: list = []
    fx.node.map_aggregate(output.args, leaves.append)
    return leaves


def _output_metas(gm: fx.GraphModule) -> list[Optional[TensorMeta]]:
    return [tensor_meta(a) if isinstance(a, fx.Node) else a for a in _outputs(gm)]


def lowered_problems(gm: fx.GraphModule, outputs_before: list) -> list[str]:
    """What is wrong with a lowered graph after a pass: fx's lint (order, dangling nodes),
    modules or tensors it names that the module lacks, outputs whose number or metadata changed
    (a rewrite must not change what the graph returns)."""
    try:
        gm.graph.lint()
    except Exception as exc:  # fx raises RuntimeError with the offending node named
        return [f"graph lint: {exc}"]
    problems = [f"{n.name}: {n.op} target {n.target} is missing from the module"
                for n in gm.graph.nodes if n.op in ("get_attr", "call_module")
                and not _has_attr(gm, n.target)]
    after = _output_metas(gm)
    if len(after) != len(outputs_before):
        problems.append(f"the graph returns {len(after)} values, {len(outputs_before)} before")
    problems += [f"output {i}: {b} became {a}" for i, (b, a) in enumerate(zip(outputs_before, after))
                 if b != a]
    return problems


def _has_attr(gm: fx.GraphModule, target: str) -> bool:
    owner = gm
    for part in str(target).split("."):
        if not hasattr(owner, part):
            return False
        owner = getattr(owner, part)
    return True


def run_lowered_passes(gm: fx.GraphModule,
                       passes: Optional[Sequence[LoweredPass]] = None) -> dict[str, int]:
    """Run ``passes`` (default :data:`LOWERED_PASSES`) on the lowered module in place, each
    checked after it ran; the counts (nodes changed per pass) are returned and kept in
    ``gm.meta[LOWERED_PASSES_KEY]``."""
    counts: dict[str, int] = {}
    outputs = _output_metas(gm)
    for p in LOWERED_PASSES if passes is None else passes:
        start = time.perf_counter()
        try:
            changed = p.fn(gm)
            problems = lowered_problems(gm, outputs)
        except Exception as exc:
            problems = [f"{type(exc).__name__}: {exc}"]
        if problems:   # ``counts`` holds the passes that ran before it
            raise LoweredPassError(f"post-lowering pass {p.name!r} failed after [{', '.join(counts)}"
                                   f"]: {'; '.join(problems[:5])}")
        counts[p.name] = changed
        log.debug("lowered pass %-20s %6.2f ms  %d changed", p.name,
                  (time.perf_counter() - start) * 1e3, changed)
    gm.meta[LOWERED_PASSES_KEY] = counts
    return counts
