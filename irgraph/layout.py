"""Layout algebra: what a chain of layout ops does to its source's values, and the shortest
chain that does the same.

A *layout op* moves values without computing (``view``/``reshape``, ``permute``/``transpose``,
``unsqueeze``/``squeeze``, ``expand``, ``clone``/``alias``). A chain of them from a *source* node
(the first node that is not one) is described by a :class:`Layout`: the source's dims are cut
into *atoms* (a ``view`` that splits a dim cuts its atom in two), and each dim of the chain's
result holds some atoms, major first. Atoms an ``expand`` makes are *broadcast*: they repeat
values and belong to no source dim (a size-1 dim an ``unsqueeze`` adds is one too).

Two chains with equal layouts compute the same tensor, however they are written. So
``einsum``'s ``view -> permute -> view`` around a ``bmm``, a ``.contiguous()`` between two
transposes or a ``permute(0, 2, 3, 1)`` that splits heads and transposes k at once all reduce to
one description, and :func:`arrange` writes any layout back as the canonical chain: reshape the
source to its atoms, one ``permute``, ``unsqueeze`` + ``expand`` for broadcast atoms, one
reshape to the result (each step only when it changes something; existing identical nodes are
reused, so a chain already in this form is left as it is).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import sympy
import torch
import torch.fx as fx

from fxforge.irgraph.meta import META_KEY, SymMeta
from fxforge.irgraph.query import tensor_meta
from fxforge.irgraph.views import Alias, Clone, Expand, Permute, Squeeze, T, Transpose, Unsqueeze, View

aten = torch.ops.aten
Dim = Any   # an int or a sympy expression


class NotALayout(Exception):
    """The chain is not a pure rearrangement this algebra can describe."""


def same_size(a: Dim, b: Dim) -> bool:
    return a == b or sympy.simplify(sympy.sympify(a) - sympy.sympify(b)) == 0


def quotient(a: Dim, b: Dim) -> Optional[Dim]:
    """``a / b`` when it is a whole size (for symbols: no denominator left), else None."""
    if isinstance(a, int) and isinstance(b, int):
        return a // b if b and a % b == 0 else None
    q = sympy.simplify(sympy.sympify(a) / sympy.sympify(b))
    if sympy.fraction(q)[1] != 1:
        return None
    return int(q) if q.is_Integer else q


@dataclass(eq=False)
class Atom:
    size: Dim
    broadcast: bool = False


class Layout:
    """The value of a layout chain's end in terms of its ``source``: ``order`` lists the source's
    atoms in row-major order, ``dims[i]`` the atoms of the end's dim ``i`` (major first)."""

    def __init__(self, source: fx.Node):
        meta = tensor_meta(source)
        if meta is None:
            raise NotALayout(f"{source.name} has no tensor metadata")
        self.source = source
        self.dims = [[Atom(size)] for size in meta.shape]
        self.order = [a for d in self.dims for a in d]
        self.origin = {a: i for i, a in enumerate(self.order)}   # atom -> the source dim it is in

    def atoms(self) -> list[Atom]:
        return [a for d in self.dims for a in d]

    def shape(self) -> list[Dim]:
        return [_product(d) for d in self.dims]

    # ---- the ops, applied in chain order ----

    def reshape(self, shape: list[Dim]) -> None:
        flat, i, dims = self.atoms(), 0, []
        for size in shape:
            group, have = [], 1
            while not same_size(have, size):
                rest = quotient(size, have)
                if rest is None or i == len(flat):
                    raise NotALayout(f"cannot regroup into {shape}")
                atom = flat[i]
                if quotient(rest, atom.size) is not None:
                    group.append(atom)
                    have, i = have * atom.size, i + 1
                elif (outer := quotient(atom.size, rest)) is not None:
                    major, minor = self.split(atom, rest, outer)
                    flat[i:i + 1] = [major, minor]
                    group.append(major)
                    have, i = have * rest, i + 1
                else:
                    raise NotALayout(f"cannot regroup into {shape}")
            while size == 1 and i < len(flat) and flat[i].size == 1:   # a kept size-1 dim
                group.append(flat[i])
                i += 1
            dims.append(group if group or size != 1 else [Atom(1, broadcast=True)])
        leftover = flat[i:]
        if any(a.size != 1 for a in leftover):
            raise NotALayout(f"cannot regroup into {shape}")
        self.dims = dims   # (leftover size-1 atoms hold no values: they go)

    def split(self, atom: Atom, major_size: Dim, minor_size: Dim) -> tuple[Atom, Atom]:
        """Cut ``atom`` into two (major first), wherever it is."""
        major, minor = Atom(major_size, atom.broadcast), Atom(minor_size, atom.broadcast)
        if atom in self.order:
            at = self.order.index(atom)
            self.order[at:at + 1] = [major, minor]
            self.origin[major] = self.origin[minor] = self.origin[atom]
        self.dims = [[x for a in d for x in ((major, minor) if a is atom else (a,))] for d in self.dims]
        return major, minor

    def permute(self, dims: list[int]) -> None:
        rank = len(self.dims)
        self.dims = [self.dims[d % rank] for d in dims]

    def unsqueeze(self, dim: int) -> None:
        self.dims.insert(dim % (len(self.dims) + 1), [Atom(1, broadcast=True)])

    def squeeze(self, dims: Optional[list[int]]) -> None:
        shape = self.shape()
        drop = {d for d in (range(len(shape)) if dims is None else dims) if shape[d] == 1}
        self.dims = [d for i, d in enumerate(self.dims) if i not in drop]

    def expand(self, shape: list[Dim]) -> None:
        new = len(shape) - len(self.dims)
        old = [[] for _ in range(new)] + self.dims
        self.dims = [[Atom(size, broadcast=True)] if _product(d) == 1 and size != 1 else d
                     for d, size in zip(old, shape)]


def _product(atoms: list) -> Dim:
    size: Dim = 1
    for a in atoms:
        size = size * (a.size if isinstance(a, Atom) else a)
    return size


def _shape(node: fx.Node) -> list[Dim]:
    meta = tensor_meta(node)
    if meta is None:
        raise NotALayout(f"{node.name} has no tensor metadata")
    return list(meta.shape)


def _step(node: Any) -> Optional[tuple[fx.Node, Callable[[Layout], None]]]:
    """(input, what ``node`` does to a layout) for a layout op, else None."""
    if (v := View.of(node)) is not None:
        return v.input, lambda layout: layout.reshape(_shape(node))
    if (p := Permute.of(node)) is not None:
        return p.input, lambda layout: layout.permute(list(p.dims))
    if (t := Transpose.of(node)) is not None:
        return t.input, lambda layout: _swap(layout, t.dim0, t.dim1)
    if (matrix := T.of(node)) is not None:
        return matrix.input, lambda layout: layout.permute([1, 0][:len(layout.dims)])
    if (u := Unsqueeze.of(node)) is not None:
        return u.input, lambda layout: layout.unsqueeze(u.dim)
    if (s := Squeeze.of(node)) is not None:
        return s.input, lambda layout: layout.squeeze(s.squeezed(len(layout.dims)))
    if (e := Expand.of(node)) is not None:
        return e.input, lambda layout: layout.expand(_shape(node))
    copy = Clone.of(node) or Alias.of(node)
    if copy is not None and isinstance(copy.input, fx.Node):
        return copy.input, lambda layout: None
    return None


def _swap(layout: Layout, a: int, b: int) -> None:
    order = list(range(len(layout.dims)))
    order[a % len(order)], order[b % len(order)] = order[b % len(order)], order[a % len(order)]
    layout.permute(order)


def is_layout_op(node: Any) -> bool:
    return isinstance(node, fx.Node) and _step(node) is not None


def step_layout(node: Any) -> Optional[Layout]:
    """The layout of a layout op's result over its own input (None for any other node)."""
    found = _step(node)
    if found is None or not isinstance(found[0], fx.Node):
        return None
    try:
        found[1](layout := Layout(found[0]))
    except NotALayout:
        return None
    return layout


def keeps_order(node: Any) -> bool:
    """``node`` is a layout op whose result holds its input's values in the same row-major order
    (only the shape differs: a view, a copy, an expand or permute that moves nothing)."""
    layout = step_layout(node)
    return layout is not None and [a for a in layout.atoms() if a.size != 1] == \
        [a for a in layout.order if a.size != 1]


def chain_source(node: Any) -> Any:
    """The first node up ``node``'s chain of layout ops that is not one (``node`` if it is not)."""
    while (found := _step(node)) is not None:
        node = found[0]
    return node


def layout_of(node: fx.Node, start: Optional[Layout] = None) -> Layout:
    """The layout of ``node`` over the first node up its chain that is not a layout op; or,
    given ``start`` (a layout of that node's values), continued from it."""
    steps, source = [], node
    while (found := _step(source)) is not None:
        source, apply = found
        steps.append(apply)
    if not isinstance(source, fx.Node):
        raise NotALayout("the chain does not start at a tensor")
    layout = Layout(source) if start is None else start
    for apply in reversed(steps):
        apply(layout)
    got = layout.shape()
    if len(got) != len(_shape(node)) or not all(map(same_size, got, _shape(node))):
        raise NotALayout(f"{node.name}: the layout gives {got}")
    return layout


class Builder:
    """Makes the nodes of a chain before ``before`` through ``call`` (``Match.call``: fresh
    metadata, undone if the rule declines), reusing an equal node that already precedes it."""

    def __init__(self, call: Callable[..., fx.Node], before: fx.Node):
        self.call, self.before = call, before

    def op(self, view: Any, x: fx.Node, shape: Optional[list] = None, **fields: Any) -> fx.Node:
        """A call of ``view``'s first op on ``x`` with ``fields`` (``shape``: reuse a node whose
        result has this shape rather than comparing the size arguments)."""
        target = view.TARGETS[0]
        for user in x.users:
            found = view.of(user)
            if found is None or user.target is not target or not self._precedes(user, x):
                continue
            meta = tensor_meta(user)
            if shape is not None and meta is not None and len(meta.shape) == len(shape) and \
                    all(map(same_size, meta.shape, shape)):
                return user
            if shape is None and all(_plain(getattr(found, k)) == _plain(v) for k, v in fields.items()):
                return user
        args, kwargs = view.arguments(target, input=x, **fields)
        return self.call(target, *args, **kwargs)

    def _precedes(self, node: fx.Node, start: fx.Node) -> bool:
        """``node`` (a user of ``start``) comes before the insertion point or is it (a chain
        that is already canonical rebuilds itself; its caller sees the root come back)."""
        if node is self.before:
            return True
        cursor = self.before.prev
        while cursor is not start and cursor.op != "root":
            if cursor is node:
                return True
            cursor = cursor.prev
        return False

    def reshape(self, x: fx.Node, shape: list[Dim]) -> fx.Node:
        meta = tensor_meta(x)
        if len(meta.shape) == len(shape) and all(map(same_size, meta.shape, shape)):
            return x
        if not _viewable(x, shape):
            x = self.op(Clone, x, memory_format=torch.contiguous_format)
        return self.op(View, x, shape=shape, size=_size_args(x, shape))

    def permute(self, x: fx.Node, order: list[int]) -> fx.Node:
        return x if order == sorted(order) else self.op(Permute, x, dims=order)


def _viewable(x: fx.Node, shape: list[Dim]) -> bool:
    """``x``'s memory can be viewed as ``shape`` (its strides allow it), as eager decides."""
    meta, fake = tensor_meta(x), x.meta.get("val")
    if meta.is_contiguous():
        return True
    if not isinstance(fake, torch.Tensor):
        return False
    symbols = {sympy.sympify(d.node.expr): d for d in fake.shape if isinstance(d, torch.SymInt)}
    sizes = [d if isinstance(d, int) else next((v for e, v in symbols.items() if same_size(e, d)), -1)
             for d in shape]
    if sizes.count(-1) > 1:
        return False
    try:
        fake.view(sizes)
    except Exception:   # (RuntimeError or ValueError, by torch version): a copy is needed
        return False
    return True


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _size_args(x: fx.Node, shape: list[Dim]) -> list:
    """Size arguments for a view of ``x`` to ``shape``: ints as they are, a symbolic size as the
    graph input that carries it (as dynamo's own views do), else -1 (for one size at most)."""
    inputs = {}
    for node in x.graph.nodes:
        if node.op != "placeholder":
            break
        meta = node.meta.get(META_KEY)
        if isinstance(meta, SymMeta):
            inputs.setdefault(sympy.sympify(meta.expr), node)
    args, unknown = [], []
    for size in shape:
        if isinstance(size, int) or (isinstance(size, sympy.Expr) and size.is_Integer):
            args.append(int(size))
            continue
        found = next((node for expr, node in inputs.items() if same_size(expr, size)), None)
        args.append(found)
        if found is None:
            unknown.append(len(args) - 1)
    if len(unknown) > 1:
        raise NotALayout(f"cannot spell the sizes {shape}")
    if unknown:
        args[unknown[0]] = -1
    return args


def arrange(layout: Layout, target: list[list[Atom]], build: Builder) -> fx.Node:
    """The canonical chain from ``layout.source`` to a tensor whose dims hold ``target``'s atoms
    (every source atom of size > 1 exactly once; broadcast atoms anywhere)."""
    position = {a: i for i, a in enumerate(layout.order)}
    expands = any(a.broadcast and a.size != 1 for atoms in target for a in atoms)
    target = [[a for a in atoms if a.size != 1] for atoms in target]   # the last reshape adds them,
    if expands:   # but an expand keeps every dim apart ([B, Hkv, rep, L, D] even when B = 1)
        target = [atoms or [Atom(1, broadcast=True)] for atoms in target]
    placed = [a for d in target for a in d if not a.broadcast]
    if len(set(placed)) != len(placed) or any(a not in position for a in placed) or \
            any(a.size != 1 for a in layout.order if a not in placed):
        raise NotALayout("the target does not hold each source atom once")
    runs_by_dim = []   # atoms adjacent in the source and in one target dim move as one run
    for atoms in target:
        runs: list[list[Atom]] = []
        for a in atoms:
            prev = runs[-1][-1] if runs else None
            if prev is not None and not (a.broadcast or prev.broadcast) and position[a] == position[prev] + 1:
                runs[-1].append(a)
            else:
                runs.append([a])
        runs_by_dim.append(runs)
    flat = [run for runs in runs_by_dim for run in runs]
    sources = sorted((run for run in flat if not run[0].broadcast), key=lambda run: position[run[0]])
    kept = [run for run in flat if not run[0].broadcast]
    order = [sources.index(run) for run in kept]
    broadcasts = any(run[0].broadcast for run in flat)
    if order == sorted(order) and not broadcasts:   # the values keep their order: one reshape
        return build.reshape(layout.source, [_product(atoms) for atoms in target])
    x = build.permute(build.reshape(layout.source, [_product(run) for run in sources]), order)
    if broadcasts:
        for at, run in enumerate(flat):
            if run[0].broadcast:
                x = build.op(Unsqueeze, x, dim=at)
        sizes = [_product(run) if run[0].broadcast else -1 for run in flat]
        if not all(isinstance(s, int) for s in sizes):
            raise NotALayout("a symbolic broadcast size")
        x = build.op(Expand, x, size=sizes)
    return build.reshape(x, [_product(atoms) for atoms in target])
