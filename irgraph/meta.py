"""Typed tensor metadata carried by every IR node.

Each node holds ``node.meta["val"]`` (a FakeTensor, SymInt, or a tuple of them, as dynamo,
aot_autograd and torch.export leave it) and ``node.meta["fxf"]``, the typed view of it that
passes read: :class:`TensorMeta` for a tensor, :class:`SymMeta` for a symbolic integer, a tuple
of those for multi-output ops, ``None`` for values with no tensor meaning.
Dynamic dimensions are sympy expressions over the shape environment's symbols (``s0``, ``2*s0``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

import sympy
import torch
import torch.fx as fx

Dim = Union[int, sympy.Expr]
META_KEY = "fxf"


def _dim(value: Any) -> Dim:
    """A concrete int, or the sympy expression behind a SymInt."""
    if isinstance(value, torch.SymInt):
        expr = value.node.expr
        return int(expr) if expr.is_Integer else expr
    return int(value)


@dataclass(frozen=True)
class TensorMeta:
    shape: tuple[Dim, ...]
    stride: tuple[Dim, ...]
    dtype: torch.dtype
    device: torch.device

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def is_static(self) -> bool:
        return all(isinstance(d, int) for d in self.shape)

    @property
    def symbols(self) -> set[sympy.Symbol]:
        out: set[sympy.Symbol] = set()
        for d in self.shape:
            if isinstance(d, sympy.Expr):
                out |= d.free_symbols
        return out

    def numel(self) -> Dim:
        n: Dim = 1
        for d in self.shape:
            n = n * d
        return n

    def is_contiguous(self) -> bool:
        expected: Dim = 1
        for size, stride in reversed(list(zip(self.shape, self.stride))):
            if size != 1 and sympy.simplify(sympy.sympify(stride) - expected) != 0:
                return False
            expected = expected * size
        return True

    def describe(self) -> str:
        dims = ",".join(str(d) for d in self.shape)
        return f"{str(self.dtype).replace('torch.', '')}[{dims}]"


@dataclass(frozen=True)
class SymMeta:
    """A symbolic (or specialised) integer value, e.g. the result of ``aten.sym_size``."""

    expr: Dim

    def describe(self) -> str:
        return f"sym({self.expr})"


NodeMeta = Union[TensorMeta, SymMeta, tuple, None]


def meta_of(value: Any) -> NodeMeta:
    """Typed metadata for a FakeTensor/Tensor/SymInt/int or a (nested) tuple of them."""
    if isinstance(value, torch.Tensor):
        return TensorMeta(
            shape=tuple(_dim(d) for d in value.shape),
            stride=tuple(_dim(s) for s in value.stride()) if value.layout == torch.strided else (),
            dtype=value.dtype,
            device=value.device,
        )
    if isinstance(value, (torch.SymInt, int)) and not isinstance(value, bool):
        return SymMeta(_dim(value))
    if isinstance(value, (tuple, list)):
        return tuple(meta_of(v) for v in value)
    return None


def set_meta(node: fx.Node, value: Any) -> NodeMeta:
    """Store ``value`` (fake or real) as the node's example value and typed metadata."""
    node.meta["val"] = value
    node.meta[META_KEY] = meta_of(value)
    return node.meta[META_KEY]


def tensor_meta(node: Any) -> Optional[TensorMeta]:
    """The typed metadata of a node holding one tensor; None for anything else (a node of
    another kind of value, a constant argument such as an int or None)."""
    meta = node.meta.get(META_KEY) if isinstance(node, fx.Node) else None
    return meta if isinstance(meta, TensorMeta) else None


def infer_node(node: fx.Node, fake_mode) -> NodeMeta:
    """Compute a new node's metadata by running its target on the fake values of its inputs.

    Passes call this for every node they create, so metadata stays current after a rewrite.
    """
    def fake(arg):
        if isinstance(arg, fx.Node):
            if "val" not in arg.meta:
                raise ValueError(f"input {arg.name} of {node.name} has no metadata")
            return arg.meta["val"]
        return arg

    args = fx.node.map_aggregate(node.args, fake)
    kwargs = fx.node.map_aggregate(node.kwargs, fake)
    if node.op == "get_attr":
        owner = node.graph.owning_module
        value = getattr(owner, node.target)
        return set_meta(node, fake_mode.from_tensor(value, static_shapes=True))
    if node.op != "call_function":
        raise ValueError(f"cannot infer metadata of {node.op} node {node.name}")
    with fake_mode:
        value = node.target(*args, **kwargs)
    return set_meta(node, value)


def restore_example_values(gm: fx.GraphModule, hints: Optional[dict[str, int]] = None,
                           default_hint: int = 16) -> Optional[str]:
    """Give a graph rebuilt from typed metadata alone (an AOT artifact's) its fake example values
    (``meta["val"]``) again, by fake-tensor propagation from its placeholders: kernel builders
    (fusion groups) read shapes and dtypes from them. Symbolic input sizes become symbols of a
    fresh ShapeEnv, one per symbol name, with ``hints[name]`` (else ``default_hint``) as their
    example size. Returns None, or why the values could not be restored (nothing is changed
    then: the graph still runs, its kernels fall back where they need the values)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    shape_env = ShapeEnv()
    symbols: dict[str, torch.SymInt] = {}

    def size(dim: Dim):
        if isinstance(dim, int):
            return dim
        if not getattr(dim, "is_Symbol", False):
            raise ValueError(f"input size {dim} is an expression, not a symbol")
        name = str(dim)
        if name not in symbols:
            hint = max(2, (hints or {}).get(name, default_hint))
            sym = shape_env.create_symbol(hint, ConstantSource(name), dynamic_dim=DimDynamic.DYNAMIC)
            symbols[name] = shape_env.create_symintnode(sym, hint=hint)
        return symbols[name]

    mode = FakeTensorMode(shape_env=shape_env, allow_non_fake_inputs=True)
    try:
        inputs = []
        for node in (n for n in gm.graph.nodes if n.op == "placeholder"):
            meta = node.meta.get(META_KEY)
            if isinstance(meta, SymMeta):   # a size passed as an input (dynamo's graphs)
                inputs.append(size(meta.expr))
                continue
            if not isinstance(meta, TensorMeta):
                raise ValueError(f"input {node.name} has no tensor metadata")
            with mode:
                inputs.append(torch.empty([size(d) for d in meta.shape], dtype=meta.dtype,
                                          device=meta.device))
        saved = {node: node.meta.get("val") for node in gm.graph.nodes}
        try:
            FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*inputs)
        except Exception:
            for node, value in saved.items():   # all or nothing
                node.meta.pop("val", None) if value is None else node.meta.update(val=value)
            raise
    except Exception as exc:  # a graph we cannot propagate keeps running, without the values
        return f"{type(exc).__name__}: {exc}"
    return None
