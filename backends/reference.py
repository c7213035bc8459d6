"""The reference backend: runs the IR op by op on ATen (the GraphModule's own code).

It is the oracle the optimizing backends are tested against, and the fallback for partitions
they cannot compile. It runs every ATen/prims/fxforge op; anything else (Python callables
other than the operator module, higher-order ops) is reported unsupported and so runs in an
eager partition.
"""
from __future__ import annotations

import operator
from typing import Callable, Optional

import torch
import torch.fx as fx

from fxforge.backends.base import Backend, register_backend

# _c10d_functional: the collectives a tensor-parallel graph calls (irgraph/collectives.py)
_NAMESPACES = ("aten", "prims", "fxforge", "_c10d_functional")
_PY_OK = {operator.getitem, operator.add, operator.sub, operator.mul, operator.floordiv,
          operator.truediv, operator.mod, operator.neg, operator.pow, operator.eq, operator.ne,
          operator.lt, operator.le, operator.gt, operator.ge, operator.and_, operator.or_}


class ReferenceBackend(Backend):
    name = "reference"

    def supports(self, node: fx.Node) -> Optional[str]:
        target = node.target
        if isinstance(target, torch._ops.OpOverload):
            namespace = target.namespace
            if namespace in _NAMESPACES:
                return None
            return f"op namespace {namespace!r} is not one the reference backend runs"
        if target in _PY_OK or getattr(target, "__module__", "") in ("torch", "math"):
            return None
        if isinstance(target, torch._ops.HigherOrderOperator):
            return f"higher-order op {target.name()} is not lowered"
        return f"Python callable {getattr(target, '__name__', target)!r} is not an IR op"

    def compile_partition(self, gm: fx.GraphModule) -> Callable:
        return gm


register_backend("reference", ReferenceBackend)
