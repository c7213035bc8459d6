"""The layouts of an attention site's region: for every op between the projections and the
output projection, which atoms (:mod:`fxforge.passes.prune_axes`) its dims hold.

The layouts are computed forward, in graph order, from the projections' outputs (fresh atoms
for their rows, one column atom for their output features). Each op moves, splits or unifies
atoms by its own semantics; an op not listed here declines the site. What would need more than
a size change if it held the kv groups (a softmax's dim, a concatenated dim, a dim a side input
varies along, a reduced dim, a size read by ``sym_size``) is written down in ``fixed``: the
site checks it once the group axis is known.
"""
from __future__ import annotations

import operator
from typing import Any, Optional

import torch
import torch.fx as fx

from fxforge.irgraph import POINTWISE
from fxforge.irgraph.query import tensor_meta
from fxforge.irgraph.views import (Alias, Bmm, Cat, ConvertElementType, Expand, Permute,
                                   Reduction, Sdpa, SdpaFlashCpu, Slice, Softmax, Split, Squeeze,
                                   SymSize, T, Transpose, Unsqueeze, View)
from fxforge.passes.prune_axes import Atom, leaves, reshape, take, unify
from fxforge.passes.prune_sites import split_sizes

aten = torch.ops.aten
COPIES = {*Alias.TARGETS, *ConvertElementType.TARGETS}
# one tensor out, the reduced dims kept as size 1 or dropped (a per-head norm's statistics)
REDUCTIONS = {aten.sum.dim_IntList, aten.mean.dim, aten.amax.default, aten.amin.default}


class Decline(Exception):
    """The site's heads cannot be pruned safely (the message says why)."""


class Tracker:
    """Gives every op of a region its layout, in graph order."""

    def __init__(self, producers: list[fx.Node]):
        self.layouts: dict[fx.Node, Any] = {}
        self.columns: dict[fx.Node, Atom] = {}
        self.fixed: list[tuple[list[Atom], str]] = []    # dims the group axis must stay out of
        self.kernels: list[fx.Node] = []                 # the bmms or the fused attention
        self.batch: list[list[Atom]] = []                # their operands' batch dims
        for node in producers:
            shape = _shape(node)
            if not isinstance(shape[-1], int):
                raise Decline(f"{node.name} has no static output width")
            self.columns[node] = Atom(shape[-1], column=True)
            self.layouts[node] = [_fresh(s) for s in shape[:-1]] + [[self.columns[node]]]

    def dims(self, node: Any) -> list[list[Atom]]:
        found = self.layouts.get(node)
        if not isinstance(found, list):
            raise Decline(f"{getattr(node, 'name', node)} is read as a head tensor but is none")
        return found

    def visit(self, node: fx.Node) -> None:
        if (size := SymSize.of(node)) is not None:
            self.fixed.append((self.dims(size.input)[size.dim], f"{node.name} reads its size"))
            return
        if node.target is operator.getitem:
            pieces = self.layouts.get(node.args[0])
            if not isinstance(pieces, tuple):
                raise Decline(f"{node.name} takes an item of {node.args[0].name}")
            self.layouts[node] = pieces[node.args[1]]
            return
        self.layouts[node] = self._layout(node)

    def _layout(self, node: fx.Node) -> Any:
        if node.target in POINTWISE or node.target in COPIES:
            return self._pointwise(node)
        if (v := View.of(node)) is not None:
            return reshape(self.dims(v.input), _shape(node))
        if (p := Permute.of(node)) is not None:
            dims = self.dims(p.input)
            return [dims[d % len(dims)] for d in p.dims]
        if (t := Transpose.of(node)) is not None or (t := T.of(node)) is not None:
            dims = list(self.dims(t.input))
            a, b = (t.dim0, t.dim1) if isinstance(t, Transpose) else (0, 1)
            dims[a % len(dims)], dims[b % len(dims)] = dims[b % len(dims)], dims[a % len(dims)]
            return dims
        if (u := Unsqueeze.of(node)) is not None:
            dims = list(self.dims(u.input))
            dims.insert(u.dim % (len(dims) + 1), [])
            return dims
        if (s := Squeeze.of(node)) is not None:
            dims = self.dims(s.input)
            shape = _shape(s.input)
            drop = s.squeezed(len(dims))
            return [d for i, d in enumerate(dims) if shape[i] != 1 or (drop is not None
                                                                      and i not in drop)]
        if (e := Expand.of(node)) is not None:
            return self._expand(self.dims(e.input), _shape(node))
        if (sl := Slice.of(node)) is not None:
            return self._slice(sl.input, sl.dim, sl.start, sl.end, sl.step, _shape(node))
        if (sp := Split.of(node)) is not None:
            return self._split(sp)
        if (c := Cat.of(node)) is not None:
            return self._cat(node, c)
        if (sm := Softmax.of(node)) is not None:
            dims = self.dims(sm.input)
            self.fixed.append((dims[sm.dim % len(dims)], f"{node.name} normalizes along it"))
            return dims
        if node.target in REDUCTIONS:
            return self._reduce(node, Reduction.of(node))
        if (b := Bmm.of(node)) is not None:
            a_dims, b_dims = self.dims(b.input), self.dims(b.mat2)
            unify(a_dims[0], b_dims[0])
            unify(a_dims[2], b_dims[1])
            self.kernels.append(node)
            self.batch += [a_dims[0], b_dims[0]]
            return [a_dims[0], a_dims[1], b_dims[2]]
        if (sdpa := Sdpa.of(node) or SdpaFlashCpu.of(node)) is not None:
            return self._sdpa(node, sdpa)
        raise Decline(f"{node.name} ({node.target}) is not followed through")

    def _reduce(self, node: fx.Node, reduction: Reduction) -> list[list[Atom]]:
        dims = self.dims(reduction.input)
        reduced = reduction.dims(len(dims))
        self.fixed += [(dims[d], f"{node.name} reduces along it") for d in reduced]
        keepdim = len(_shape(node)) == len(dims)
        return [[] if i in reduced else d for i, d in enumerate(dims)
                if keepdim or i not in reduced]

    def _sdpa(self, node: fx.Node, sdpa: Any) -> Any:
        """q ``[..., L, E]``, k ``[..., S, E]``, v ``[..., S, Ev]`` -> ``[..., L, Ev]``."""
        q, k, v = (list(self.dims(t)) for t in (sdpa.query, sdpa.key, sdpa.value))
        if getattr(sdpa, "enable_gqa", False):   # k and v heads repeat for the query heads
            repeat = _shape(sdpa.query)[-3] // _shape(sdpa.key)[-3]
            k[-3] = v[-3] = k[-3] + [Atom(repeat, broadcast=True)]
        for a, b, c in zip(q[:-2], k[:-2], v[:-2]):
            unify(a, b)
            unify(a, c)
            self.batch += [a, b, c]
        unify(q[-1], k[-1])
        unify(k[-2], v[-2])
        scores = q[:-1] + [k[-2]]
        self.fixed.append((k[-2], f"{node.name} normalizes along it"))
        if sdpa.attn_mask is not None:
            self._side_input(node, sdpa.attn_mask, scores)
        self.kernels.append(node)
        out = q[:-1] + [v[-1]]
        return (out, q[:-1]) if SdpaFlashCpu.of(node) is not None else out

    def _pointwise(self, node: fx.Node) -> list[list[Atom]]:
        shape = _shape(node)
        out: list[Optional[list[Atom]]] = [None] * len(shape)
        sides = []
        for arg in node.args:
            meta = tensor_meta(arg)
            if meta is None:
                continue
            if arg not in self.layouts:
                sides.append(arg)
                continue
            offset = len(shape) - meta.rank
            for j, size in enumerate(meta.shape):
                i = offset + j
                if size == 1 and shape[i] != 1:
                    continue   # broadcast along it
                if out[i] is None:
                    out[i] = self.dims(arg)[j]
                else:
                    unify(out[i], self.dims(arg)[j])
        dims = [d if d is not None else _fresh(s) for d, s in zip(out, shape)]
        for arg in sides:
            self._side_input(node, arg, dims)
        return dims

    def _side_input(self, node: fx.Node, arg: fx.Node, dims: list[list[Atom]]) -> None:
        """``arg`` (from outside the region) is read against a tensor of ``dims``: every dim
        it is not broadcast along must not hold the heads."""
        shape = _shape(arg)
        offset = len(dims) - len(shape)
        for j, size in enumerate(shape):
            if size != 1:
                self.fixed.append((dims[offset + j], f"{node.name} reads {arg.name}, which varies "
                                   "along the head axis (a per-head side input)"))

    def _expand(self, dims: list[list[Atom]], shape: list) -> list[list[Atom]]:
        old = [[] for _ in range(len(shape) - len(dims))] + list(dims)
        return [[Atom(size, broadcast=True)] if not _holds_values(d) and size != 1 else d
                for d, size in zip(old, shape)]

    def _slice(self, source: fx.Node, dim: int, start: Any, end: Any, step: Any,
               shape: list) -> list[list[Atom]]:
        dims = list(self.dims(source))
        dim %= len(dims)
        if not any(a.column for a in leaves(dims[dim])):
            dims[dim] = _fresh(shape[dim])     # rows or time: the group never lives there
            return dims
        if step != 1 or not isinstance(start, int) or not isinstance(end, int):
            raise Decline("a strided or symbolic slice of projection columns")
        size = _shape(source)[dim]
        start, end = bound(start, size), bound(end, size)
        dims[dim] = take(dims[dim], start, max(start, end))
        return dims

    def _split(self, sp: Split) -> tuple:
        shape = _shape(sp.input)
        dim = sp.dim % len(shape)
        starts, pieces = 0, []
        for size in split_sizes(sp, shape[dim]):
            piece_shape = list(shape)
            piece_shape[dim] = size
            pieces.append(self._slice(sp.input, dim, starts, starts + size, 1, piece_shape))
            starts += size
        return tuple(pieces)

    def _cat(self, node: fx.Node, cat: Cat) -> list[list[Atom]]:
        inputs = [self.dims(t) for t in cat.tensors]
        dim = cat.dim % len(inputs[0])
        for other in inputs[1:]:
            for i, (a, b) in enumerate(zip(inputs[0], other)):
                if i != dim:
                    unify(a, b)
        column = any(a.column for d in inputs for a in leaves(d[dim]))
        joined = Atom(_shape(node)[dim], column=column)
        out = list(inputs[0])
        out[dim] = [joined]
        self.fixed += [(d[dim], f"{node.name} concatenates along it") for d in inputs]
        self.fixed.append((out[dim], f"{node.name} concatenates along it"))
        return out


def _shape(node: fx.Node) -> list:
    meta = tensor_meta(node)
    if meta is None:
        raise Decline(f"{node.name} has no tensor metadata")
    return list(meta.shape)


def _fresh(size: Any) -> list[Atom]:
    return [] if size == 1 else [Atom(size)]


def _holds_values(atoms: list[Atom]) -> bool:
    return any(a.size != 1 for a in leaves(atoms))


def bound(index: int, size: int) -> int:
    return max(0, min(size, index + size if index < 0 else index))


