"""Attention-head pruning, GQA-aware: every attention layer keeps its most important kv groups
(a group is one key/value head with all the query heads that read it; under MHA, one head), and
every shape shrinks with them: the projections' weights, the ops between, the KV cache.

Sites and their axes come from :mod:`fxforge.passes.prune_head_sites`. A group's importance,
measured on the calibration inputs, is the norm of what its heads add to the output
projection's result over the calibration tokens::

    s_g = ‖ O[:, rows_g] @ W_o[rows_g, :] ‖_F

(``O``: the attention output the output projection reads, ``rows_g``: the features of the
group's query heads). The output projection is linear, so this is exactly the term that
removing the group takes out of the residual stream: the smallest one changes the layer's
output least. It sees the attention pattern, the values and ``W_o`` together, where weight
norms see weights only (and a head's q/k weights say nothing of how much it contributes). With
``score="magnitude"`` or without calibration inputs the score is the L1 norm of all of the
group's weights (its q, k and v columns and its ``W_o`` rows), the activation-blind baseline.

The rewrite changes only what carries the group axis: the projections lose the removed groups'
output columns, the output projection their input rows, and each size argument between (view
and expand sizes, split sizes, slice bounds, a symbolic ``batch * heads``) is recomputed from
the tracked axes, never matched by value (kv heads and query heads per group are both 2 in a
tiny Llama). Every shape is checked against the plan afterwards.
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Any, Optional, Sequence

import sympy
import torch
import torch.fx as fx

from fxforge.irgraph import IRGraph
from fxforge.irgraph.layout import same_size
from fxforge.irgraph.query import tensor_meta
from fxforge.irgraph.views import Expand, LinearOperands, Slice, Split, View
from fxforge.passes.prune_axes import (NotTracked, carries, find, group_ids, kept_positions,
                                       leaves, new_size, window)
from fxforge.passes.prune_head_layouts import Decline, bound
from fxforge.passes.prune_head_sites import HeadSite, head_sites
from fxforge.passes.prune_mlp import kept_channels, linear_input_rows, slice_linear, weight_value
from fxforge.passes.prune_spec import PruneSpec


@dataclasses.dataclass(frozen=True)
class _Scaled:
    """A symbolic size to spell as ``symbol * factor`` (a new node, made when applied)."""
    symbol: fx.Node
    factor: int


@dataclasses.dataclass
class _Plan:
    columns: dict[fx.Node, torch.Tensor]     # projection -> its kept output columns
    rows: torch.Tensor                       # the output projection's kept input rows
    edits: list[tuple[fx.Node, Any, str, Any]]   # (op, its view, argument, new value)
    shapes: dict[fx.Node, list]              # op -> its shape once pruned


@dataclasses.dataclass(frozen=True)
class HeadChoice:
    """What one attention site keeps (measured once per model, applied to each of its graphs):
    the kv groups, ascending, or None with the reason it stays whole."""
    keep: Optional[torch.Tensor]
    scores: tuple = ()
    measured: bool = False
    why: str = ""


def choose_heads(ir: IRGraph, spec: PruneSpec, inputs: Optional[Sequence]) -> list[HeadChoice]:
    """Per attention site of ``ir`` (``head_sites`` order) the kv groups it keeps."""
    sites, declined = head_sites(ir)
    measured = spec.score != "magnitude" and inputs is not None
    activations = linear_input_rows(ir, [s.consumer for s in sites], inputs) if measured else {}
    choices = []
    for site in sites:
        kept_count = keep_count(site.kv_heads, spec.heads)
        if kept_count == site.kv_heads:   # a fraction too small to remove a whole group here
            choices.append(HeadChoice(None, why=f"{spec.heads:g} of {site.kv_heads} kv groups "
                                      "rounds to none"))
            continue
        try:
            scores = group_scores(ir, site, activations.get(site.consumer))
            keep = kept_channels(scores, kept_count)
            _plan(site, keep)   # one that cannot be planned declines here, once
        except (Decline, NotTracked) as exc:
            choices.append(HeadChoice(None, why=str(exc)))
            continue
        choices.append(HeadChoice(keep, tuple(float(s) for s in scores), measured))
    return choices


def apply_heads(ir: IRGraph, choices: list[HeadChoice]) -> tuple[list, dict]:
    """Prune ``ir``'s attention sites as ``choices`` say: report rows and, per attention that
    is not pruned, why."""
    sites, declined = head_sites(ir)
    if len(sites) != len(choices):
        raise ValueError(f"prune heads: this graph has {len(sites)} attention sites, "
                         f"{len(choices)} were measured")
    symbols: dict[_Scaled, fx.Node] = {}
    rows = []
    for site, choice in zip(sites, choices):
        if choice.keep is None:
            declined.setdefault(site.attention.name, choice.why)
            continue
        kept_count = choice.keep.numel()
        rows.append({"kind": "heads", "name": site.name, "heads": site.heads,
                     "kv_heads": site.kv_heads, "kv_heads_after": kept_count,
                     "heads_after": site.heads // site.kv_heads * kept_count,
                     "kept_groups": choice.keep.tolist(), "scores": list(choice.scores),
                     "measured": choice.measured,
                     **_sizes_saved(ir, site, _apply(ir, site, _plan(site, choice.keep), symbols))})
    return rows, declined


def plan_problem(site: HeadSite, keep: torch.Tensor) -> Optional[str]:
    """Why keeping the kv groups ``keep`` of ``site`` cannot be planned, or None."""
    try:
        _plan(site, keep)
    except (Decline, NotTracked) as exc:
        return str(exc)
    return None


def _sizes_saved(ir: IRGraph, site: HeadSite, weights: int) -> dict:
    size = weight_value(ir, LinearOperands.of(site.consumer).weight).element_size()
    return {"weights_saved": weights, "bytes_saved": weights * size}


def keep_count(groups: int, fraction: float) -> int:
    """How many of ``groups`` stay when ``fraction`` of them go (at least one)."""
    return max(1, groups - round(groups * fraction))


def group_scores(ir: IRGraph, site: HeadSite, x: Optional[torch.Tensor]) -> torch.Tensor:
    """One importance per kv group (module docstring): measured on ``x``, the output
    projection's input rows, or from the weights alone when ``x`` is None."""
    rows = group_ids(site.consumer_rows(), site.is_group)
    w_o = weight_value(ir, LinearOperands.of(site.consumer).weight).double()     # [K, N]
    groups = range(site.kv_heads)
    if x is not None:
        x = x.double()
        return torch.stack([(x[:, rows == g] @ w_o[rows == g]).norm() for g in groups])
    total = torch.stack([w_o[rows == g].abs().sum() for g in groups])
    for producer, atom in site.columns.items():
        weight = weight_value(ir, LinearOperands.of(producer).weight).abs().double()
        columns = group_ids([atom], site.is_group)
        total += torch.stack([weight[:, columns == g].sum() for g in groups])
    return total


# ---------------------------------------------------------------- the plan (nothing changes yet)

def _plan(site: HeadSite, keep: torch.Tensor) -> _Plan:
    def kept(atoms):
        return kept_positions(atoms, site.is_group, keep).nonzero().flatten()

    def shape(dims):
        return [new_size(d, site.is_group, keep) for d in dims]

    _check_classes(site, keep)
    shapes = {n: shape(d) for n, d in site.layouts.items() if isinstance(d, list)}
    edits = []
    for node in site.region:
        if (v := View.of(node)) is not None:
            edits.append((node, View, "size", _sizes(v.size, _old(node), shapes[node])))
        elif (e := Expand.of(node)) is not None:
            edits.append((node, Expand, "size", _sizes(e.size, _old(node), shapes[node])))
        elif (sl := Slice.of(node)) is not None:
            start, end = _bounds(site, keep, sl.input, sl.dim, sl.start, sl.end, shapes[node])
            edits += [(node, Slice, "start", start), (node, Slice, "end", end)]
        elif (sp := Split.of(node)) is not None:
            edits.append(_split_edit(site, keep, sp, shapes))
    return _Plan({p: kept([a]) for p, a in site.columns.items()}, kept(site.consumer_rows()),
                 edits, shapes)


def _old(node: fx.Node) -> list:
    return list(tensor_meta(node).shape)


def _check_classes(site: HeadSite, keep: torch.Tensor) -> None:
    """Atoms unified into one class must shrink alike (a slice taken of only one of them
    would make them differ)."""
    sizes: dict = {}
    for dims in site.layouts.values():
        for atom in (a for d in (dims if isinstance(dims, list) else []) for a in leaves(d)):
            size = new_size([atom], site.is_group, keep)
            if not same_size(sizes.setdefault(find(atom), size), size):
                raise Decline("two axes that index the same thing would shrink differently")


def _sizes(args: list, old: list, new: list) -> list:
    return [_respell(a, o, n) for a, o, n in zip(args, old, new)]


def _respell(arg: Any, old: Any, new: Any) -> Any:
    """A size argument that gave ``old`` rewritten to give ``new``."""
    if same_size(old, new) or arg == -1:
        return arg
    if isinstance(arg, int):
        if isinstance(new, int):
            return new
    elif isinstance(arg, fx.Node) and arg.target is operator.mul and len(arg.args) == 2:
        symbol, factor = arg.args if isinstance(arg.args[1], int) else arg.args[::-1]
        ratio = sympy.simplify(sympy.sympify(new) / sympy.sympify(old))
        if isinstance(factor, int) and isinstance(symbol, fx.Node) and ratio.is_Rational \
                and (factor * ratio).is_Integer:
            return _Scaled(symbol, int(factor * ratio))
    raise Decline(f"cannot respell the size {arg} (now {old}, pruned {new})")


def _bounds(site: HeadSite, keep: torch.Tensor, source: fx.Node, dim: int, start: Any,
            end: Any, new_shape: list) -> tuple[Any, Any]:
    """A slice's new (start, end): where its piece of the pruned axis starts and ends."""
    atoms = site.layouts[source][dim % len(site.layouts[source])]
    if not any(carries(a, site.is_group) for a in atoms):
        return start, end
    size = _old(source)[dim]
    start, end = bound(start, size), bound(end, size)
    lead, offset, length, inner = window(atoms, start, max(start, end))
    mask = kept_positions([lead], site.is_group, keep)
    scale = new_size(inner, site.is_group, keep)
    new_start = int(mask[:offset].sum()) * scale
    new_length = int(mask[offset:offset + length].sum()) * scale
    if new_length != new_shape[dim % len(new_shape)]:
        raise Decline("a slice would no longer take the same heads")
    return new_start, new_start + new_length


def _split_edit(site: HeadSite, keep: torch.Tensor, sp: Split, shapes: dict) -> tuple:
    pieces = [u for u in sp.node.users if u.target is operator.getitem]
    sizes, start = [], 0
    old = [int(_old(p)[sp.dim]) for p in sorted(pieces, key=lambda p: p.args[1])]
    if len(old) != len(pieces) or sorted(p.args[1] for p in pieces) != list(range(len(old))):
        raise Decline(f"{sp.node.name}: not every piece of the split is used")
    for piece, size in zip(sorted(pieces, key=lambda p: p.args[1]), old):
        new_start, new_end = _bounds(site, keep, sp.input, sp.dim, start, start + size,
                                     shapes[piece])
        sizes.append(new_end - new_start)
        start += size
    if sp.split_sizes is not None:
        return (sp.node, Split, "split_sizes", sizes)
    if sp.split_size is not None and all(s == sizes[0] for s in sizes[:-1]) \
            and sizes[-1] <= sizes[0]:
        return (sp.node, Split, "split_size", sizes[0])
    raise Decline(f"{sp.node.name}: the pruned pieces cannot be spelled as this split")


# ---------------------------------------------------------------- the rewrite

def _apply(ir: IRGraph, site: HeadSite, plan: _Plan, symbols: dict) -> int:
    """Slice the weights, set the new sizes, re-infer in graph order; weights saved."""
    saved = sum(slice_linear(ir, p, columns=c) for p, c in plan.columns.items())
    for node, view, field, value in plan.edits:
        if isinstance(value, list):
            value = [_spelled(ir, v, node, symbols) for v in value]
        view.of(node).replace(**{field: value})
    for node in site.region:
        ir.infer(node)
    saved += slice_linear(ir, site.consumer, rows=plan.rows)
    for node, want in plan.shapes.items():
        got = _old(node)
        if len(got) != len(want) or not all(map(same_size, got, want)):
            raise RuntimeError(f"prune heads: {node.name} came out {got}, planned {want}")
    return saved


def _spelled(ir: IRGraph, value: Any, user: fx.Node, symbols: dict) -> Any:
    """``value``, with a :class:`_Scaled` size made into a node (one per symbol and factor:
    the layers share it, as dynamo's own ``batch * heads`` is shared)."""
    if not isinstance(value, _Scaled):
        return value
    if value not in symbols:
        with ir.gm.graph.inserting_before(user):
            symbols[value] = ir.gm.graph.call_function(operator.mul, (value.symbol, value.factor))
        ir.infer(symbols[value])
    return symbols[value]
