"""Axis algebra for attention-head pruning: which part of which dim of a tensor carries heads.

A tensor's *layout* is one list of :class:`Atom` per dim (major first; the sizes multiply to the
dim's size; a size-1 dim may hold none). Atoms are shared objects, so an axis keeps its identity
through every op that moves it:

* a view that splits an axis splits its atom into *parts* (every tensor holding the atom then
  reads the parts); a view that merges axes lists their atoms in one dim;
* two atoms that must index the same thing (the batch dims of a bmm's operands, its contracted
  dims, the same dim of a pointwise op's operands) are *unified* into one class (union-find),
  splitting one of them first where their sizes differ (a query head axis of 4 against a key
  side of [2 kv heads, 2 broadcast]); splitting an atom splits its whole class alike;
* an ``expand`` makes a *broadcast* atom (it holds no values of its own: the GQA repeat);
* a slice of an atom is one of its *pieces* (offset, atom): a fused projection's q, k and v
  columns, or the halves ``rotate_half`` swaps.

Atoms made for a projection's output columns are *column* atoms (and so are their parts and
pieces). Once the kv-group class is known, :func:`group_ids` tells, for every position of an
atom, which group it belongs to (-1: none), from which the kept columns, rows and new sizes
follow without ever comparing literal values.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from fxforge.irgraph.layout import quotient, same_size

Dim = Any   # an int or a sympy expression


class NotTracked(Exception):
    """The axes cannot be followed through an op (the message says where and why)."""


class Atom:
    __slots__ = ("size", "column", "broadcast", "parts", "pieces", "_parent", "_members")

    def __init__(self, size: Dim, column: bool = False, broadcast: bool = False):
        self.size = int(size) if getattr(size, "is_Integer", False) else size
        self.column, self.broadcast = column, broadcast
        self.parts: Optional[list[Atom]] = None        # set once the atom is split (major first)
        self.pieces: list[tuple[int, Atom]] = []        # (offset, atom) slices taken of it
        self._parent: Atom = self
        self._members: list[Atom] = [self]

    def __repr__(self) -> str:
        kind = "col" if self.column else "bc" if self.broadcast else "atom"
        return f"{kind}{self.size}"


def find(atom: Atom) -> Atom:
    """The representative of ``atom``'s class."""
    while atom._parent is not atom:
        atom._parent = atom._parent._parent
        atom = atom._parent
    return atom


def members(atom: Atom) -> list[Atom]:
    return find(atom)._members


def union(a: Atom, b: Atom) -> None:
    ra, rb = find(a), find(b)
    if ra is not rb:
        rb._parent = ra
        ra._members += rb._members


def leaves(atoms: list[Atom]) -> list[Atom]:
    """``atoms`` with every split atom replaced by its parts, recursively."""
    out: list[Atom] = []
    for atom in atoms:
        out.extend(leaves(atom.parts) if atom.parts is not None else [atom])
    return out


def split(atom: Atom, major: Dim) -> None:
    """Split ``atom``'s whole class into ``[major, size / major]`` parts, unified part by part."""
    minor = quotient(atom.size, major)
    if minor is None:
        raise NotTracked(f"cannot split an axis of {atom.size} by {major}")
    first: Optional[list[Atom]] = None
    for member in list(members(atom)):
        member.parts = [Atom(major, member.column, member.broadcast),
                        Atom(minor, member.column, member.broadcast)]
        if first is None:
            first = member.parts
        else:
            union(first[0], member.parts[0])
            union(first[1], member.parts[1])


def unify(a: list[Atom], b: list[Atom]) -> None:
    """Make two dims' atoms index the same thing, splitting where the sizes differ."""
    xs, ys = _sized(a), _sized(b)
    while xs and ys:
        x, y = xs[0], ys[0]
        if same_size(x.size, y.size):
            union(x, y)
            xs, ys = xs[1:], ys[1:]
        elif quotient(x.size, y.size) is not None:
            split(x, y.size)
        elif quotient(y.size, x.size) is not None:
            split(y, x.size)
        else:
            raise NotTracked(f"axes of {x.size} and {y.size} do not line up")
        xs, ys = _sized(xs), _sized(ys)   # (a split reaches every member of the class)
    if xs or ys:
        raise NotTracked("the dims hold different axes")


def _sized(atoms: list[Atom]) -> list[Atom]:
    return [a for a in leaves(atoms) if a.size != 1]


def reshape(dims: list[list[Atom]], shape: list[Dim]) -> list[list[Atom]]:
    """The layout of a view of a ``dims`` tensor to ``shape`` (atoms split where needed)."""
    flat, i, out = _sized([a for d in dims for a in d]), 0, []
    for size in shape:
        group: list[Atom] = []
        have: Dim = 1
        while not same_size(have, size):
            rest = quotient(size, have)
            if rest is None or i == len(flat):
                raise NotTracked(f"cannot regroup the axes into {list(shape)}")
            atom = flat[i]
            if quotient(rest, atom.size) is None:
                split(atom, rest)
                flat = flat[:i] + _sized(flat[i:])
                atom = flat[i]
                if quotient(rest, atom.size) is None:
                    raise NotTracked(f"cannot regroup the axes into {list(shape)}")
            group.append(atom)
            have, i = have * atom.size, i + 1
        out.append(group)
    if i != len(flat):
        raise NotTracked(f"cannot regroup the axes into {list(shape)}")
    return out


def window(atoms: list[Atom], start: int, end: int) -> tuple[Atom, int, int, list[Atom]]:
    """``atoms[start:end]`` along one dim as (leading atom, offset and length in it, the inner
    atoms taken whole); a slice off the leading atom's boundaries is not followed."""
    sized = _sized(atoms)
    if not sized or not all(isinstance(a.size, int) for a in sized):
        raise NotTracked("a slice of a symbolic axis")
    inner = 1
    for atom in sized[1:]:
        inner *= atom.size
    if start % inner or end % inner:
        raise NotTracked(f"slice [{start}:{end}] cuts across the axes {sized}")
    return sized[0], start // inner, (end - start) // inner, sized[1:]


def take(atoms: list[Atom], start: int, end: int) -> list[Atom]:
    """The atoms of ``atoms[start:end]`` along one dim: a piece of the leading atom (the same
    piece for the same slice), the inner atoms whole."""
    lead, offset, length, inner = window(atoms, start, end)
    if offset == 0 and length == lead.size:
        return [lead] + inner
    piece = next((p for o, p in lead.pieces if o == offset and p.size == length), None)
    if piece is None:
        piece = Atom(length, lead.column)
        lead.pieces.append((offset, piece))
    return [piece] + inner


# ---------------------------------------------------------------- once the groups are known

def carries(atom: Atom, is_group: Callable[[Atom], bool]) -> bool:
    """``atom`` or anything it was split or sliced into belongs to the group class."""
    if atom.parts is not None:
        if any(carries(p, is_group) for p in atom.parts):
            return True
    elif is_group(atom):
        return True
    return any(carries(p, is_group) for _, p in atom.pieces)


def group_ids(atoms: list[Atom], is_group: Callable[[Atom], bool]) -> torch.Tensor:
    """For each position of a dim holding ``atoms`` (row-major), its group (-1: none)."""
    ids = torch.full((1,), -1, dtype=torch.long)
    for atom in atoms:
        inner = _atom_ids(atom, is_group)
        ids = _merge(ids[:, None].expand(-1, inner.numel()), inner[None, :].expand(ids.numel(), -1))
        ids = ids.reshape(-1)
    return ids


def _atom_ids(atom: Atom, is_group: Callable[[Atom], bool]) -> torch.Tensor:
    if not isinstance(atom.size, int):
        raise NotTracked("positions of a symbolic axis")
    if not carries(atom, is_group):
        return torch.full((atom.size,), -1, dtype=torch.long)
    if atom.parts is not None:
        ids = group_ids(atom.parts, is_group)
    elif is_group(atom):
        ids = torch.arange(atom.size)
    else:
        ids = torch.full((atom.size,), -1, dtype=torch.long)
    for offset, piece in atom.pieces:
        window = ids[offset:offset + piece.size]
        ids[offset:offset + piece.size] = _merge(window, _atom_ids(piece, is_group))
    return ids


def _merge(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if bool(((a >= 0) & (b >= 0) & (a != b)).any()):
        raise NotTracked("one position belongs to two kv groups")
    return torch.where(a >= 0, a, b)


def kept_positions(atoms: list[Atom], is_group: Callable[[Atom], bool],
                   kept: torch.Tensor) -> torch.Tensor:
    """Mask over a dim's positions: those of no group, or of a kept group."""
    ids = group_ids(atoms, is_group)
    return (ids < 0) | torch.isin(ids, kept)


def new_size(atoms: list[Atom], is_group: Callable[[Atom], bool], kept: torch.Tensor) -> Dim:
    """The size of a dim holding ``atoms`` once only the ``kept`` groups remain."""
    size: Dim = 1
    for atom in atoms:
        if carries(atom, is_group):
            size = size * int(kept_positions([atom], is_group, kept).sum())
        else:
            size = size * atom.size
    return size
