"""The converter table: ONNX ``(domain, op, opset range)`` -> a function of torch ops.

A converter is a plain function ``fn(node, *inputs)`` written with torch (ATen) ops; the
imported module runs them in order, so dynamo or torch.export traces them into the IR's ATen
graph. ``node`` is a :class:`NodeView`: the node's attributes with ONNX's defaults, its opset and
its name for error messages. An input is a ``torch.Tensor``, ``None`` for an omitted optional
input, or :class:`Dims` for a shape computed from tensor shapes.

``Dims`` is how ``Shape -> Gather -> Concat -> Reshape`` chains fold: a shape is a tuple of Python
ints and SymInts (the symbolic sizes of dynamic dims), never a tensor, so the traced graph holds
the reshape's symbolic sizes and no int64 tensor arithmetic. Converters registered with
``dims=True`` take ``Dims`` inputs as they are; every other converter gets them as int64 tensors.

Register with the decorator, once per opset range whose semantics differ::

    @converter("Softmax", since=13)
    def softmax(node, x):
        return torch.softmax(x, node.attr("axis", -1))
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

DEFAULT_DOMAIN = ""
MS_DOMAIN = "com.microsoft"


class Dims:
    """A 1-D int64 value (or a 0-d one: ``scalar``) known as Python ints/SymInts; ``dtype``
    bool for the comparisons exporters make of shapes (``Where(Equal(shape, -1), ...)``)."""

    __slots__ = ("values", "scalar", "dtype")

    def __init__(self, values: Iterable[Any], scalar: bool = False,
                 dtype: torch.dtype = torch.int64):
        self.values = tuple(values)
        self.scalar = scalar
        self.dtype = dtype
        if scalar and len(self.values) != 1:
            raise ValueError("a scalar Dims holds one value")

    def tensor(self) -> torch.Tensor:
        parts = [torch.scalar_tensor(v, dtype=self.dtype) if not isinstance(v, (int, bool))
                 else torch.tensor(v, dtype=self.dtype) for v in self.values]
        if self.scalar:
            return parts[0]
        return torch.stack(parts) if parts else torch.zeros(0, dtype=self.dtype)

    @property
    def shape(self) -> tuple:
        return () if self.scalar else (len(self.values),)

    def __repr__(self) -> str:
        return f"Dims({list(self.values)}{', scalar' if self.scalar else ''})"


def as_tensor(value: Any) -> Any:
    return value.tensor() if isinstance(value, Dims) else value


@dataclasses.dataclass(frozen=True)
class Converter:
    domain: str
    op: str
    since: int
    until: Optional[int]          # last opset with these semantics (None: up to the newest)
    fn: Callable[..., Any]
    dims: bool = False            # takes Dims inputs unmaterialized

    def covers(self, opset: int) -> bool:
        return self.since <= opset and (self.until is None or opset <= self.until)


TABLE: dict[tuple[str, str], list[Converter]] = {}


def converter(*ops: str, domain: str = DEFAULT_DOMAIN, since: int = 1, until: Optional[int] = None,
              dims: bool = False) -> Callable:
    """Register ``fn`` for each op name in ``ops`` over opsets ``since..until``."""
    def register(fn: Callable) -> Callable:
        for op in ops:
            entries = TABLE.setdefault((domain, op), [])
            for other in entries:
                if other.since <= (until or 10**6) and since <= (other.until or 10**6):
                    raise ValueError(f"{domain or 'ai.onnx'}::{op}: opsets {since}..{until} "
                                     f"overlap an existing converter ({other.since}..{other.until})")
            entries.append(Converter(domain, op, since, until, fn, dims))
        return fn
    return register


# (domain, op) -> fn(builder, node, inputs, outputs) -> a Step, or None to decline: an import-time
# rewrite that sees the producers of the node's inputs (a MatMul of a dequantized constant
# becomes a quantized fxforge linear instead of a matmul with a folded dense weight)
REWRITES: dict[tuple[str, str], Callable[..., Any]] = {}


def rewrite(op: str, domain: str = DEFAULT_DOMAIN) -> Callable:
    def register(fn: Callable) -> Callable:
        REWRITES[(domain, op)] = fn
        return fn
    return register


def lookup(domain: str, op: str, opset: int) -> Optional[Converter]:
    for entry in TABLE.get((domain, op), ()):
        if entry.covers(opset):
            return entry
    return None


@dataclasses.dataclass
class NodeView:
    """One ONNX node as its converter sees it.

    ``known`` holds the values of the node's constant inputs (initializers, ``Constant`` nodes
    and what folds from them at import) of up to ``KNOWN_LIMIT`` elements, as Python lists: a
    converter reads a shape, axes or pads through :meth:`values` by input position, so a traced
    graph never reads a tensor's values into Python."""

    op: str
    name: str
    domain: str
    opset: int
    attrs: dict[str, Any]
    num_outputs: int
    known: dict[int, list] = dataclasses.field(default_factory=dict)
    # input position -> ONNX element type, where known: 4-bit values load as int8/uint8
    # tensors, and only this tells an INT4 zero point from an INT8 one
    input_types: dict[int, int] = dataclasses.field(default_factory=dict)

    def attr(self, name: str, default: Any = None) -> Any:
        return self.attrs.get(name, default)

    def label(self) -> str:
        return f"{self.op} node {self.name!r}" if self.name else f"{self.op} node"

    def values(self, index: int, value: Any) -> Optional[list]:
        """Input ``index`` (whose value is ``value``) as a list of Python numbers/SymInts; None
        for an omitted input. A value computed from run-time data is read with ``tolist``: eager
        runs it, dynamo runs that part of the graph eagerly, and torch.export refuses it."""
        if value is None:
            return None
        if index in self.known:
            return list(self.known[index])
        if isinstance(value, Dims):
            return list(value.values)
        if isinstance(value, torch.Tensor):
            return value.reshape(-1).tolist()
        return list(value) if isinstance(value, (list, tuple)) else [value]

    def scalar(self, index: int, value: Any) -> Any:
        got = self.values(index, value)
        if got is None or len(got) != 1:
            raise ValueError(f"{self.label()}: input {index} must hold one value, got "
                             f"{'none' if got is None else len(got)}")
        return got[0]


KNOWN_LIMIT = 4096   # elements: larger constants (weights) are never read into Python


def coverage(opset: int) -> list[tuple[str, str, int, Optional[int]]]:
    """(domain, op, since, until) of every converter covering ``opset``, sorted."""
    rows = []
    for (domain, op), entries in TABLE.items():
        for entry in entries:
            if entry.covers(opset):
                rows.append((domain, op, entry.since, entry.until))
    return sorted(rows)


def normalize_axis(axis: int, rank: int, node: NodeView) -> int:
    if not -rank <= axis < max(rank, 1):
        raise ValueError(f"{node.label()}: axis {axis} is out of range for rank {rank}")
    return axis % max(rank, 1)


def normalize_axes(axes: Sequence[int], rank: int, node: NodeView) -> list[int]:
    return [normalize_axis(int(a), rank, node) for a in axes]
