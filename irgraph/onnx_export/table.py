"""The converter table: IR op overload -> the function that emits its ONNX nodes.

A converter is ``fn(ctx, node) -> value``: it reads the node's arguments (through the typed
views where the IR has one), emits nodes through ``ctx.builder`` and returns what the node's
users read: an ONNX value name, a tuple of them (multi-output ops; None for an output ONNX
does not give), or a size expression (symbolic-int ops). It raises :class:`Unsupported` for a
use of the op it cannot export (the export lists every such node in one error).
"""
from __future__ import annotations

from typing import Any, Callable

CONVERTERS: dict[Any, Callable] = {}


class Unsupported(Exception):
    """This node cannot be exported; the message says why (gathered into one error)."""


def converts(*targets: Any) -> Callable[[Callable], Callable]:
    def register(fn: Callable) -> Callable:
        for target in targets:
            CONVERTERS[target] = fn
        return fn
    return register
