"""A small ONNX graph builder: fresh value names, nodes, deduplicated initializers and constants.

Converters (:mod:`.table`) emit through it; it knows the target opset, so ops whose signature
changed between opsets (reductions' ``axes``, ``Gelu``) are spelled once, here.
"""
from __future__ import annotations

import re
from typing import Any, Optional, Sequence, Union

import torch
from onnx import NodeProto, TensorProto, helper

from fxforge.irgraph.graph import tensor_identity
from fxforge.irgraph.onnx_dtypes import onnx_type, tensor_proto

MS_DOMAIN = "com.microsoft"   # ONNX Runtime's contrib ops (MatMulNBits)
Names = Union[str, list[str]]


class GraphBuilder:
    """Nodes and initializers of one ONNX graph at ``opset``."""

    def __init__(self, opset: int):
        self.opset = opset
        self.nodes: list[NodeProto] = []
        self.initializers: dict[str, TensorProto] = {}
        self.domains: dict[str, int] = {"": opset}
        self._taken: set[str] = set()
        self._tensors: dict[tuple, str] = {}    # storage key -> initializer (tied weights once)
        self._constants: dict[tuple, str] = {}  # (dtype, values) -> small constant
        self._held: list[torch.Tensor] = []     # keyed tensors stay alive: no address reused

    def fresh(self, hint: str) -> str:
        """A value name not used yet, readable: the hint with a counter when it is taken."""
        base = re.sub(r"[^A-Za-z0-9_.]", "_", hint) or "v"
        name, n = base, 0
        while name in self._taken:
            n += 1
            name = f"{base}_{n}"
        self._taken.add(name)
        return name

    def reserve(self, name: str) -> str:
        """Claim ``name`` exactly (graph inputs keep the IR's names)."""
        if name in self._taken:
            raise ValueError(f"ONNX value name {name!r} is used twice")
        self._taken.add(name)
        return name

    def op(self, op_type: str, inputs: Sequence[Optional[str]], *, outputs: int = 1,
           domain: str = "", hint: Optional[str] = None, **attrs: Any) -> Names:
        """Append a node; its output name (a list when ``outputs`` > 1). A None input is an
        omitted optional one (an empty name, as ONNX spells it)."""
        names = [self.fresh(hint or op_type.lower()) for _ in range(outputs)]
        attrs = {k: v for k, v in attrs.items() if v is not None}
        self.nodes.append(helper.make_node(op_type, [i or "" for i in inputs], names,
                                           domain=domain or None, **attrs))
        if domain:
            self.domains.setdefault(domain, 1)
        return names[0] if outputs == 1 else names

    def initializer(self, hint: str, tensor: torch.Tensor, elem_type: Optional[int] = None,
                    dims: Optional[tuple[int, ...]] = None) -> str:
        """``tensor`` as an initializer, stored once however many nodes read it (tied weights:
        the same storage, offset, shape, strides and dtype give the same initializer)."""
        key = (*tensor_identity(tensor), elem_type, dims)
        if tensor.numel() and key in self._tensors:
            return self._tensors[key]
        name = self.fresh(hint)
        self.initializers[name] = tensor_proto(name, tensor, elem_type, dims)
        if tensor.numel():
            self._tensors[key] = name
            self._held.append(tensor)
        return name

    def const(self, values: Any, dtype: torch.dtype) -> str:
        """A small constant (a Python scalar: 0-D; a list: 1-D), shared by equal uses."""
        tensor = torch.tensor(values, dtype=dtype)
        key = (dtype, tuple(tensor.shape), tuple(tensor.reshape(-1).tolist()))
        if key not in self._constants:
            self._constants[key] = self.initializer("const", tensor)
        return self._constants[key]

    def ints(self, values: Sequence[int]) -> str:
        """An int64 1-D constant (shapes, axes, starts)."""
        return self.const([int(v) for v in values], torch.int64)

    def cast(self, name: str, source: torch.dtype, target: torch.dtype) -> str:
        return name if source == target else self.op("Cast", [name], to=onnx_type(target))

    def reduce(self, op_type: str, x: str, axes: Sequence[int], keepdims: bool) -> str:
        """``Reduce*`` over ``axes``: an input from opset 18 (ReduceSum: 13), an attribute before."""
        axes_as_input = self.opset >= (13 if op_type == "ReduceSum" else 18)
        if axes_as_input:
            return self.op(op_type, [x, self.ints(axes)], keepdims=int(keepdims))
        return self.op(op_type, [x], axes=list(axes), keepdims=int(keepdims))

    def unsqueeze(self, x: str, axes: Sequence[int]) -> str:
        return self.op("Unsqueeze", [x, self.ints(axes)])

    def squeeze(self, x: str, axes: Sequence[int]) -> str:
        return self.op("Squeeze", [x, self.ints(axes)])

    def scalar_of(self, one_element: str) -> str:
        """A 1-element 1-D tensor as a 0-D one (``Range`` takes scalars)."""
        return self.op("Reshape", [one_element, self.ints([])])


def value_info(name: str, dtype: torch.dtype, dims: Sequence[Union[int, str]]) -> Any:
    """A graph input's or output's declared type: ints are fixed sizes, strings named axes."""
    return helper.make_tensor_value_info(name, onnx_type(dtype), list(dims))
