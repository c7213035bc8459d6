"""The base of the typed op views (:mod:`fxforge.irgraph.views`): an op's arguments by name.

A view is a frozen dataclass over one ``call_function`` node: ``View.of(node)`` reads the node's
arguments through the op's schema (:func:`fxforge.irgraph.graph.node_arguments`: positions or
keywords, defaults filled in) and returns None when the node is not one of the view's ops. So
the position of an argument is known only to the op's schema: a pass that reads ``Linear.of(n).bias``
keeps working when ``fxforge::linear`` gains an argument.

Field names are the schema's names, except the tensor the op acts on (``self`` in ATen, ``a`` in
prims), which is ``input`` in every view (and ``RENAME`` may map more). Writing goes through the
view too: ``view.replace(bias=b)`` edits the node in place, ``View.arguments(x=..., ...)`` builds
the ``(args, kwargs)`` of a new call.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Optional, TypeVar

import torch.fx as fx

from fxforge.irgraph.graph import node_arguments

V = TypeVar("V", bound="OpView")
_COMMON_RENAME = {"self": "input", "a": "input"}


@dataclasses.dataclass(frozen=True)
class OpView:
    """A typed, read-only view of a call of one of ``TARGETS`` (the first is the one
    :meth:`arguments` builds calls of)."""

    node: fx.Node
    TARGETS: ClassVar[tuple] = ()
    RENAME: ClassVar[dict] = {}   # schema argument name -> field name (beyond self/a -> input)

    @classmethod
    def matches(cls, node: Any) -> bool:
        return isinstance(node, fx.Node) and node.op == "call_function" and node.target in cls.TARGETS

    @classmethod
    def of(cls: type[V], node: Any) -> Optional[V]:
        """The view of ``node``, or None when ``node`` is not a call of one of the view's ops."""
        if not cls.matches(node):
            return None
        names = {f.name for f in dataclasses.fields(cls)} - {"node"}
        values = {}
        for schema_name, value in node_arguments(node).items():
            name = cls._field(schema_name)
            if name in names:
                values[name] = value
        return cls(node=node, **values)

    @classmethod
    def _field(cls, schema_name: str) -> str:
        return cls.RENAME.get(schema_name, _COMMON_RENAME.get(schema_name, schema_name))

    @classmethod
    def _schema_name(cls, target: Any, field: str) -> str:
        for arg in target._schema.arguments:
            if cls._field(arg.name) == field:
                return arg.name
        raise TypeError(f"{cls.__name__}: {target} has no argument {field!r}")

    @property
    def target(self) -> Any:
        return self.node.target

    def replace(self: V, **fields: Any) -> V:
        """Set the named arguments on the node itself (where the node holds them: a position
        or a keyword) and return the updated view."""
        node = self.node
        schema = node.target._schema.arguments
        for field, value in fields.items():
            name = self._schema_name(node.target, field)
            index = [a.name for a in schema].index(name)
            if index < len(node.args) and not schema[index].kwarg_only:
                node.update_arg(index, value)
            else:
                node.update_kwarg(name, value)
        return type(self).of(node)

    @classmethod
    def arguments(cls, target: Any = None, **fields: Any) -> tuple[tuple, dict]:
        """``(args, kwargs)`` for a new call of ``target`` (default: the view's first op):
        positional arguments up to the last one given, keyword-only ones as keywords; an
        argument not given before a given one takes its schema default."""
        target = cls.TARGETS[0] if target is None else target
        schema = target._schema.arguments
        unknown = set(fields) - {cls._field(a.name) for a in schema}
        if unknown:
            raise TypeError(f"{cls.__name__}: {target} has no arguments {sorted(unknown)}")
        args, kwargs, pending = [], {}, []
        for arg in schema:
            field = cls._field(arg.name)
            if arg.kwarg_only:
                if field in fields:
                    kwargs[arg.name] = fields[field]
            elif field in fields:
                args.extend(pending + [fields[field]])
                pending = []
            elif arg.has_default_value():
                pending.append(arg.default_value)
            else:
                raise TypeError(f"{cls.__name__}: {target} needs its argument {field!r}")
        return tuple(args), kwargs

    @classmethod
    def create(cls: type[V], graph: fx.Graph, target: Any = None, **fields: Any) -> fx.Node:
        """A new call node (at the graph's insertion point) with the named arguments."""
        target = cls.TARGETS[0] if target is None else target
        args, kwargs = cls.arguments(target, **fields)
        return graph.call_function(target, args, kwargs)
