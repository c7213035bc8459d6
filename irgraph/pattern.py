"""Declarative graph rewrites: patterns are data, rules are (pattern, function) pairs.

In the spirit of tinygrad's ``UPat``/``PatternMatcher``, over fxforge's IR (torch.fx nodes):

* :class:`Pat` matches a node: op sets, operands, named arguments, commutative operands,
  predicates on metadata, single use, captures (a name used twice binds one node).
  :class:`Lit` matches a literal argument, ``ANY`` any argument, ``a | b`` either pattern.
* Arithmetic on patterns builds patterns, so a rule reads like the math it matches:
  ``0.5 * x * (1 + erf(x / math.sqrt(2)))`` (``*`` and ``+`` commute; ``+`` has ``alpha=1``).
* :class:`PatternMatcher` indexes rules by their root op; tables combine with ``+``. A rule's
  function gets the :class:`Match` (captures by name, the IR, the root) and returns the value
  that replaces the root, or None to decline (nodes it made through ``Match.call`` are then
  removed again).
* :func:`graph_rewrite` applies a table to a fixed point (bounded sweeps in graph order, rules in
  table order) and returns how often each rule fired, keyed by the rule function's name.

Every node a rule makes gets fresh metadata (``IRGraph.infer``); a replacement must have the
replaced value's shape and dtype, or the rule is a bug and ``graph_rewrite`` raises.
"""
from __future__ import annotations

import copy
import math
from collections import Counter
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
import torch.fx as fx

from fxforge.irgraph import IRGraph, node_arguments
from fxforge.irgraph.query import tensor_meta

aten = torch.ops.aten
Predicate = Callable[[fx.Node], bool]


class _State:
    """A partial match: captures so far, the nodes matched, the nodes that must be read
    only inside the match. Immutable: binding returns a new state (matching backtracks)."""

    __slots__ = ("captures", "nodes", "single_use")

    def __init__(self, captures: dict, nodes: tuple, single_use: tuple):
        self.captures, self.nodes, self.single_use = captures, nodes, single_use

    def bind(self, name: Optional[str], value: Any) -> "_State":
        return self if name is None else _State({**self.captures, name: value}, self.nodes, self.single_use)

    def visit(self, node: fx.Node, single_use: bool) -> "_State":
        return _State(self.captures, self.nodes + (node,), self.single_use + ((node,) if single_use else ()))


class Pattern:
    """Base of all patterns: matching, alternatives (``|``) and arithmetic that builds patterns."""

    name: Optional[str] = None

    def _match(self, value: Any, state: _State) -> Iterator[_State]:
        raise NotImplementedError

    def matches(self, value: Any, state: _State) -> Iterator[_State]:
        """Every way ``value`` matches, as extended states (a bound name must match again)."""
        if self.name is not None and self.name in state.captures:
            if state.captures[self.name] is value:
                yield state
            return
        for found in self._match(value, state):
            yield found.bind(self.name, value)

    def match(self, node: Any, ir: Optional[IRGraph] = None) -> Optional["Match"]:
        """The first complete match rooted at ``node`` (single-use constraints hold), or None."""
        for state in self.matches(node, _State({}, (), ())):
            inside = set(state.nodes)
            if all(set(n.users) <= inside for n in state.single_use):
                return Match(node, state.captures, frozenset(inside), ir)
        return None

    def named(self, name: str) -> "Pattern":
        """This pattern, capturing what it matches as ``name``."""
        new = copy.copy(self)
        new.name = name
        return new

    def __or__(self, other: Any) -> "AnyOf":
        return AnyOf(self, other)

    def __mul__(self, other: Any) -> "Pat":
        return Pat(aten.mul.Tensor, (self, other), commutative=True)

    def __rmul__(self, other: Any) -> "Pat":
        return Pat(aten.mul.Tensor, (other, self), commutative=True)

    def __add__(self, other: Any) -> "Pat":
        return Pat(aten.add.Tensor, (self, other), commutative=True, args={"alpha": 1})

    def __radd__(self, other: Any) -> "Pat":
        return Pat(aten.add.Tensor, (other, self), commutative=True, args={"alpha": 1})

    def __truediv__(self, other: Any) -> "Pat":
        return Pat(aten.div.Tensor, (self, other))

    def __pow__(self, other: Any) -> "Pat":
        return Pat(aten.pow.Tensor_Scalar, (self, other))


def as_pattern(value: Any) -> Pattern:
    """A pattern as is; anything else is a literal to match."""
    return value if isinstance(value, Pattern) else Lit(value)


def operands(node: fx.Node) -> list:
    """A call's arguments in schema order (keyword-passed ones at their place, defaults filled
    in); for a target without a schema (``operator.getitem``), its positional arguments."""
    if isinstance(node.target, torch._ops.OpOverload):
        return list(node_arguments(node).values())
    return list(node.args)


class Pat(Pattern):
    """A node: ``Pat(ops, src, name=, where=, single_use=, commutative=, args=)``.

    ``ops``: an op, an ``OpOverloadPacket`` (any overload) or a collection of them; None for any
    node (a placeholder, a constant, a call). ``src``: patterns (or literals) for the first
    ``len(src)`` operands, later ones unconstrained; None leaves all operands free.
    (keyword-passed ones match at their schema place). ``args``: schema argument name ->
    pattern or literal. ``commutative``: two ``src`` that may match in either order (the given
    order first). ``where``: a predicate or a sequence of them, all called with the node
    (:func:`has_rank`, :func:`has_dtype`, :mod:`fxforge.irgraph.query`'s). ``single_use``: every
    user of the node is a node of the match (for a node matched once in a tree: one user)."""

    def __init__(self, ops: Any = None, src: Optional[Iterable[Any]] = None, *, name: Optional[str] = None,
                 where: Any = (), single_use: bool = False, commutative: bool = False,
                 args: Optional[dict] = None):
        collection = isinstance(ops, (set, frozenset, list, tuple))
        self.ops = None if ops is None else frozenset(ops if collection else (ops,))
        self.src = None if src is None else tuple(as_pattern(s) for s in src)
        self.name, self.single_use = name, single_use
        self.where: tuple[Predicate, ...] = tuple(where) if isinstance(where, (list, tuple)) else (where,)
        self.args = {k: as_pattern(v) for k, v in (args or {}).items()}
        if commutative and (self.src is None or len(self.src) != 2):
            raise ValueError("a commutative pattern needs exactly two src")
        if (self.src or self.args) and self.ops is None:
            raise ValueError("a pattern with operands needs its op(s)")
        self.commutative = commutative

    @staticmethod
    def var(name: Optional[str] = None, where: Any = (), single_use: bool = False) -> "Pat":
        """Any node, captured as ``name``."""
        return Pat(None, name=name, where=where, single_use=single_use)

    def inner_single_use(self) -> "Pat":
        """This pattern with every unnamed operation below the root ``single_use``: the
        expression is computed only for the root. Captures (``x``) are its leaves: their users
        are for the rule to judge."""
        src = None if self.src is None else tuple(_sealed(s) for s in self.src)
        return self._copy(src=src, args={k: _sealed(v) for k, v in self.args.items()})

    def _copy(self, **changes: Any) -> "Pat":
        new = copy.copy(self)
        new.__dict__.update(changes)
        return new

    @property
    def roots(self) -> Optional[frozenset]:
        return self.ops

    def _accepts(self, node: Any) -> bool:
        if not isinstance(node, fx.Node):
            return False
        if self.ops is not None:
            target = node.target
            if node.op != "call_function" or (target not in self.ops and
                                              getattr(target, "overloadpacket", None) not in self.ops):
                return False
        return all(predicate(node) for predicate in self.where)

    def _match(self, node: Any, state: _State) -> Iterator[_State]:
        if not self._accepts(node):
            return
        state = state.visit(node, self.single_use)
        if self.src is None and not self.args:
            yield state
            return
        src = self.src or ()
        values = node.args if len(node.args) >= len(src) else operands(node)  # (a schema prefix)
        if len(values) < len(src):
            return
        named = node_arguments(node) if self.args else {}
        pairs = list(zip(src, values))
        orders = [pairs]
        if self.commutative:
            (a, value_a), (b, value_b) = pairs
            orders.append([(a, value_b), (b, value_a)])
        extra = [(p, named.get(k, _MISSING)) for k, p in self.args.items()]
        for order in orders:
            yield from _match_all(order + extra, state)


_MISSING = object()


def _match_all(pairs: list, state: _State) -> Iterator[_State]:
    if not pairs:
        yield state
        return
    (pattern, value), rest = pairs[0], pairs[1:]
    if value is _MISSING:
        return
    for found in pattern.matches(value, state):
        yield from _match_all(rest, found)


def _sealed(pattern: Pattern) -> Pattern:
    if pattern.name is not None:
        return pattern
    if isinstance(pattern, Pat) and pattern.ops is not None:
        return pattern.inner_single_use()._copy(single_use=True)
    if isinstance(pattern, AnyOf):
        return AnyOf(*(_sealed(a) for a in pattern.alternatives), name=pattern.name)
    return pattern


class Lit(Pattern):
    """A literal argument: equal, or for numbers, equal up to a relative 1e-6."""

    def __init__(self, value: Any, name: Optional[str] = None):
        self.value, self.name = value, name

    def _match(self, value: Any, state: _State) -> Iterator[_State]:
        if isinstance(value, fx.Node):
            return
        numbers = (int, float)
        if isinstance(self.value, numbers) and not isinstance(self.value, bool):
            if isinstance(value, numbers) and math.isclose(value, self.value, rel_tol=1e-6):
                yield state
        elif type(value) is type(self.value) and value == self.value:
            yield state


class AnyValue(Pattern):
    """Any argument at all, a node or a literal (captured as ``name`` if given)."""

    def __init__(self, name: Optional[str] = None):
        self.name = name

    def _match(self, value: Any, state: _State) -> Iterator[_State]:
        yield state


ANY = AnyValue()


class AnyOf(Pattern):
    """The first of ``alternatives`` that matches (then the next, when matching backtracks)."""

    def __init__(self, *alternatives: Any, name: Optional[str] = None):
        flat: list[Pattern] = []
        for alternative in map(as_pattern, alternatives):
            unnamed = isinstance(alternative, AnyOf) and alternative.name is None
            flat.extend(alternative.alternatives if unnamed else [alternative])
        self.alternatives, self.name = tuple(flat), name

    @property
    def roots(self) -> Optional[frozenset]:
        roots = [getattr(a, "roots", None) for a in self.alternatives]
        return None if any(r is None for r in roots) else frozenset().union(*roots)

    def _match(self, value: Any, state: _State) -> Iterator[_State]:
        for alternative in self.alternatives:
            yield from alternative.matches(value, state)


class Op:
    """A pattern constructor for one op: ``tanh = Op(aten.tanh.default)``; ``tanh(x)``."""

    def __init__(self, ops: Any):
        self.ops = ops

    def __call__(self, *src: Any, name: Optional[str] = None, **args: Any) -> Pat:
        return Pat(self.ops, src, name=name, args=args)


class Match:
    """A complete match: captures by name (``m["x"]``, or ``m.x`` where the name is not one of
    the attributes below), the ``root`` node it replaces, the ``nodes`` it covers, the ``ir``."""

    def __init__(self, root: fx.Node, captures: dict, nodes: frozenset, ir: Optional[IRGraph]):
        self.root, self.captures, self.nodes, self.ir = root, captures, nodes, ir
        self.created: list[fx.Node] = []

    def __getitem__(self, name: str) -> Any:
        return self.captures[name]

    def __getattr__(self, name: str) -> Any:
        captures = self.__dict__.get("captures", {})
        if name in captures:
            return captures[name]
        raise AttributeError(f"the match captured no {name!r} (captures: {sorted(captures)})")

    def get(self, name: str, default: Any = None) -> Any:
        return self.captures.get(name, default)

    def read_only_inside(self, node: fx.Node) -> bool:
        """Nothing but the match's own nodes reads ``node``."""
        return set(node.users) <= self.nodes

    def call(self, target: Any, *args: Any, **kwargs: Any) -> fx.Node:
        """A new call before the root, with fresh metadata; removed again if the rule declines."""
        graph = self.root.graph
        with graph.inserting_before(self.root):
            node = graph.call_function(target, args, kwargs)
        self.created.append(node)
        self.ir.infer(node)
        return node

    def undo(self) -> None:
        for node in reversed(self.created):
            self.root.graph.erase_node(node)
        self.created.clear()


Rule = Callable[[Match], Optional[fx.Node]]


def rule_name(fn: Rule) -> str:
    return getattr(fn, "__name__", None) or repr(fn)


class PatternMatcher:
    """A rule table: ``PatternMatcher([(pattern, fn), ...])``, indexed by each pattern's root
    op(s); ``a + b`` is a table with ``a``'s rules, then ``b``'s. For a node, the rules for its
    op are tried in table order, each with its first match; the first rule whose function
    returns a node (other than the root) wins."""

    def __init__(self, rules: Iterable[tuple[Pattern, Rule]]):
        self.rules = list(rules)
        self._by_op: dict[Any, list[int]] = {}
        for index, (pattern, fn) in enumerate(self.rules):
            roots = getattr(pattern, "roots", None)
            if not roots:
                raise ValueError(f"rule {rule_name(fn)!r}: its pattern must name the root op(s)")
            for op in roots:
                self._by_op.setdefault(op, []).append(index)

    def __add__(self, other: "PatternMatcher") -> "PatternMatcher":
        return PatternMatcher(self.rules + other.rules)

    def rewrite(self, node: fx.Node, ir: IRGraph) -> Optional[tuple[str, fx.Node]]:
        """(rule name, replacement) of the first rule that rewrites ``node``, else None."""
        packet = getattr(node.target, "overloadpacket", None)
        indices = set(self._by_op.get(node.target, ())) | set(self._by_op.get(packet, ()) if packet else ())
        for pattern, fn in (self.rules[i] for i in sorted(indices)):
            match = pattern.match(node, ir)
            if match is None:
                continue
            try:
                replacement = fn(match)
            except BaseException:
                match.undo()
                raise
            if replacement is None or replacement is node:
                match.undo()
                continue
            _check_replacement(node, replacement, rule_name(fn))
            return rule_name(fn), replacement
        return None


def _check_replacement(old: fx.Node, new: Any, rule: str) -> None:
    """A replacement has the replaced value's shape and dtype; anything else is a bug."""
    if not isinstance(new, fx.Node):
        raise TypeError(f"rewrite {rule!r} returned {type(new).__name__}, not a graph node")
    before, after = tensor_meta(old), tensor_meta(new)
    if before is not None and (after is None or (after.shape, after.dtype) != (before.shape, before.dtype)):
        got = after.describe() if after is not None else repr(new.meta.get("fxf"))
        raise AssertionError(f"rewrite {rule!r} replaced {before.describe()} with {got}")


def graph_rewrite(ir: IRGraph, matcher: PatternMatcher, max_sweeps: int = 8) -> Counter:
    """Rewrite ``ir`` in place with ``matcher`` until a sweep changes nothing (at most
    ``max_sweeps``; each sweep visits the nodes present at its start, in graph order, skipping
    dead ones), then drop dead nodes. Returns how often each rule fired."""
    counts: Counter = Counter()
    for _ in range(max_sweeps):
        fired = 0
        for node in list(ir.gm.graph.nodes):
            if node.op != "call_function" or not node.users:
                continue
            done = matcher.rewrite(node, ir)
            if done is not None:
                name, replacement = done
                node.replace_all_uses_with(replacement)
                counts[name] += 1
                fired += 1
        if not fired:
            break
    ir.gm.graph.eliminate_dead_code()
    return counts


# ---- predicates on a node's metadata ------------------------------------------------------

def has_rank(*ranks: int) -> Predicate:
    return lambda node: (meta := tensor_meta(node)) is not None and meta.rank in ranks


def has_dtype(*dtypes: torch.dtype) -> Predicate:
    return lambda node: (meta := tensor_meta(node)) is not None and meta.dtype in dtypes


def is_contiguous(node: fx.Node) -> bool:
    meta = tensor_meta(node)
    return meta is not None and meta.is_contiguous()
