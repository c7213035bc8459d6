"""An ONNX graph as a flat program of converter calls, folded at import.

The builder walks the graph in topological order and, per node:

* folds it when every input is a constant (initializers, ``Constant`` nodes and what folds from
  them; ``Shape`` of a value whose shape ONNX shape inference proves static): the result becomes
  a constant, so a traced graph holds neither the chain nor its int64 arithmetic;
* inlines ``If`` whose condition folds to a constant (the taken branch) and unrolls ``Loop``
  whose trip count and condition fold to constants; anything else is a clear error naming the
  node, since a traced graph cannot branch on data;
* otherwise appends a :class:`Step`, with the values of its small constant inputs kept as Python
  lists on its :class:`NodeView` (the shape of a ``Reshape``, the axes of a ``ReduceSum``).
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable, Optional, Sequence

import onnx
import torch

from fxforge.irgraph.onnx_dtypes import to_torch, torch_dtype
from fxforge.irgraph.onnx_import import model as onnx_model
from fxforge.irgraph.onnx_import.model import OnnxImportError, attribute_value
from fxforge.irgraph.onnx_import.table import (DEFAULT_DOMAIN, KNOWN_LIMIT, REWRITES, NodeView,
                                               as_tensor, converter, lookup)

# Ops never folded: their results are not a function of their inputs.
NO_FOLD = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Bernoulli",
           "Multinomial", "Dropout"}
MAX_UNROLLED_NODES = 200_000


@dataclasses.dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: torch.dtype
    dims: tuple      # ints for static dims, names (str) for dynamic ones


@dataclasses.dataclass
class Step:
    fn: Callable[..., Any]
    node: NodeView
    inputs: tuple[str, ...]     # "" for an omitted optional input
    outputs: tuple[str, ...]
    dims: bool                  # the converter takes Dims inputs unmaterialized


@dataclasses.dataclass
class Program:
    inputs: list[InputSpec]
    outputs: list[str]
    steps: list[Step]
    constants: dict[str, torch.Tensor]
    opsets: dict[str, int]
    folded: int = 0            # nodes folded at import
    inlined: int = 0           # If/Loop nodes replaced by their bodies
    rewritten: int = 0         # nodes an import-time rewrite replaced (quantized linears)


QUANTIZED_WEIGHTS = ("exact", "nearest")


def build_program(model: onnx.ModelProto, quantized_weights: str = "exact") -> Program:
    """``quantized_weights``: "exact" maps a quantized weight onto a fxforge weight format only
    where the format holds its values exactly; "nearest" also where fp16 rounds its offsets."""
    if quantized_weights not in QUANTIZED_WEIGHTS:
        raise ValueError(f"quantized_weights must be one of {QUANTIZED_WEIGHTS}, got "
                         f"{quantized_weights!r}")
    versions = onnx_model.opsets_of(model)
    onnx_model.check_supported(model, versions)
    model = _sorted(model)    # missing values and cycles: named here, before the checker
    typed = onnx_model.check_types(model)
    builder = _Builder(versions, _static_shapes(typed.graph), _elem_types(typed.graph))
    builder.quantized_weights = quantized_weights
    graph = model.graph
    initializer_names = {t.name for t in graph.initializer}
    inputs = [_input_spec(v, i) for i, v in enumerate(graph.input) if v.name not in initializer_names]
    scope = {spec.name: spec.name for spec in inputs}
    builder.emit_graph(graph, scope, prefix="")
    outputs = [builder.resolve(o.name, scope) for o in graph.output]
    return builder.program(inputs, outputs)


def _sorted(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with its top-level nodes in topological order (ONNX requires it, and some
    tools write graphs that break it)."""
    order = onnx_model.topological_order(model.graph)
    if [id(n) for n in order] == [id(n) for n in model.graph.node]:
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    del copy.graph.node[:]
    copy.graph.node.extend(order)
    return copy


def _inlined_at_import(node: NodeView, *inputs: Any) -> Any:
    raise AssertionError(f"{node.label()} is inlined at import and never runs as a step")


# If and Loop are table entries (the coverage table lists them) that the builder inlines.
converter("If", since=13)(_inlined_at_import)
converter("Loop", since=13)(_inlined_at_import)


def _input_spec(value: onnx.ValueInfoProto, index: int) -> InputSpec:
    tensor_type = value.type.tensor_type
    if not value.type.HasField("tensor_type"):
        raise OnnxImportError(f"graph input {value.name!r} is not a tensor (sequences and maps are "
                              "not imported)")
    dims = []
    for axis, dim in enumerate(tensor_type.shape.dim):
        if dim.HasField("dim_value"):
            dims.append(int(dim.dim_value))
        else:   # a named dim keeps its name; an anonymous one is named after its place
            dims.append(identifier(dim.dim_param or f"{value.name}_dim{axis}"))
    return InputSpec(value.name, torch_dtype(tensor_type.elem_type, f"graph input {value.name!r}"),
                     tuple(dims))


def identifier(name: str) -> str:
    """A dynamic dim's name as an identifier (torch.export's ``Dim`` and the artifact's
    signature need one; ONNX allows any string)."""
    cleaned = "".join(c if c.isalnum() or c == "_" else "_" for c in name)
    return cleaned if cleaned.isidentifier() else f"d_{cleaned}"


def _static_shapes(graph: onnx.GraphProto) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for value in itertools.chain(graph.input, graph.value_info, graph.output):
        dims = value.type.tensor_type.shape.dim
        if value.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = tuple(int(d.dim_value) for d in dims)
    return shapes


def _elem_types(graph: onnx.GraphProto) -> dict[str, int]:
    types = {t.name: t.data_type for t in graph.initializer}
    for value in itertools.chain(graph.input, graph.value_info, graph.output):
        if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type:
            types[value.name] = value.type.tensor_type.elem_type
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    types[node.output[0]] = attr.t.data_type
    return types


class _Builder:
    def __init__(self, versions: dict[str, int], static_shapes: dict[str, tuple[int, ...]],
                 elem_types: dict[str, int]):
        self.versions = versions
        self.static_shapes = static_shapes
        self.elem_types = elem_types
        self.quantized_weights = "exact"
        self.constants: dict[str, torch.Tensor] = {}
        self.steps: list[Step] = []
        self.folded = self.inlined = self.rewritten = 0
        self.producers: dict[str, Step] = {}     # value name -> the step (maybe folded) making it
        self.fresh = itertools.count()
        self.emitted = 0

    def program(self, inputs: list[InputSpec], outputs: list[str]) -> Program:
        used = {n for step in self.steps for n in step.inputs} | set(outputs)
        constants = {k: v for k, v in self.constants.items() if k in used}
        return Program(inputs, outputs, self.steps, constants, self.versions, self.folded,
                       self.inlined, self.rewritten)

    @staticmethod
    def resolve(name: str, scope: dict[str, str]) -> str:
        return scope.get(name, name) if name else ""

    def emit_graph(self, graph: onnx.GraphProto, scope: dict[str, str], prefix: str) -> None:
        """Emit ``graph``'s nodes; ``scope`` maps its value names to global ones (outer values
        a subgraph reads resolve through it), and gains the graph's own values."""
        for tensor in graph.initializer:
            scope[tensor.name] = self._constant(prefix + tensor.name, to_torch(tensor))
            self.elem_types[prefix + tensor.name] = tensor.data_type
        for node in onnx_model.topological_order(graph, outer=set(scope)):
            self.emitted += 1
            if self.emitted > MAX_UNROLLED_NODES:
                raise OnnxImportError(f"the model unrolls to over {MAX_UNROLLED_NODES} nodes "
                                      f"(at {node.op_type} node {node.name!r})")
            self.emit_node(node, scope, prefix)

    def _constant(self, name: str, value: torch.Tensor) -> str:
        self.constants[name] = value
        return name

    def add_constant(self, name: str, value: torch.Tensor) -> str:
        """A constant made at import (a rewrite's re-laid-out weight), under a fresh name."""
        while name in self.constants:
            name = f"{name}_{next(self.fresh)}"
        return self._constant(name, value)

    def emit_node(self, node: onnx.NodeProto, scope: dict[str, str], prefix: str) -> None:
        domain = "" if node.domain in ("", "ai.onnx") else node.domain
        version = self.versions[domain]
        attrs = {a.name: _attribute(a) for a in node.attribute}
        inputs = tuple(self.resolve(n, scope) for n in node.input)
        if node.op_type == "If" and domain == DEFAULT_DOMAIN:
            return self._inline_if(node, attrs, inputs, scope, prefix)
        if node.op_type == "Loop" and domain == DEFAULT_DOMAIN:
            return self._unroll_loop(node, attrs, inputs, scope, prefix)
        outputs = tuple(prefix + o if o else "" for o in node.output)
        for local, global_name in zip(node.output, outputs):
            if local:
                scope[local] = global_name
        entry = lookup(domain, node.op_type, version)
        view = NodeView(node.op_type, node.name, domain, version, attrs, len(node.output),
                        known=self._known(inputs),
                        input_types={i: self.elem_types[n] for i, n in enumerate(inputs)
                                     if n in self.elem_types})
        step = Step(entry.fn, view, inputs, outputs, entry.dims)
        self.producers.update({name: step for name in outputs if name})
        rewritten = REWRITES.get((domain, node.op_type))
        rewritten = rewritten(self, view, inputs, outputs) if rewritten is not None else None
        if rewritten is not None:
            self.steps.append(rewritten)
            self.rewritten += 1
            return
        static = self._static_shape_of(step)
        if static is not None:
            self._fold(step, [torch.empty(static, device="meta")])
        elif step.node.op not in NO_FOLD and all(not n or n in self.constants for n in inputs):
            self._fold(step, [self.constants[n] if n else None for n in inputs])
        else:
            self.steps.append(step)

    def _static_shape_of(self, step: Step) -> Optional[tuple[int, ...]]:
        """The input's static shape, for a ``Shape`` or ``Size`` node whose input ONNX shape
        inference proves static (the node then folds whatever computes its input)."""
        if step.node.op in ("Shape", "Size") and step.node.domain == DEFAULT_DOMAIN:
            return self.static_shapes.get(step.inputs[0])
        return None

    def _known(self, inputs: Sequence[str]) -> dict[int, list]:
        known = {}
        for index, name in enumerate(inputs):
            value = self.constants.get(name)
            if value is not None and value.numel() <= KNOWN_LIMIT:
                known[index] = value.reshape(-1).tolist()
        return known

    def _fold(self, step: Step, values: list) -> None:
        if not step.dims:
            values = [as_tensor(v) for v in values]
        with torch.no_grad():
            results = _as_tuple(step.fn(step.node, *values))
        for name, value in zip(step.outputs, results):
            if name:
                self.constants[name] = as_tensor(value)
        self.folded += 1

    def constant_value(self, name: str, node: onnx.NodeProto, what: str) -> torch.Tensor:
        if name not in self.constants:
            raise OnnxImportError(f"{node.op_type} node {node.name!r}: its {what} is computed at "
                                  "run time; fxforge imports If/Loop only when it is a constant "
                                  "(a traced graph cannot branch on data)")
        return self.constants[name]

    def _inline_if(self, node, attrs, inputs, scope, prefix) -> None:
        cond = bool(self.constant_value(inputs[0], node, "condition").reshape(-1)[0])
        branch = attrs["then_branch" if cond else "else_branch"]
        inner = f"{prefix}{node.name or 'if'}#{next(self.fresh)}/"
        sub_scope = dict(scope)
        self.emit_graph(branch, sub_scope, inner)
        for out, value in zip(node.output, branch.output):
            scope[out] = self.resolve(value.name, sub_scope)
        self.inlined += 1

    def _unroll_loop(self, node, attrs, inputs, scope, prefix) -> None:
        body = attrs["body"]
        trip = self.constant_value(inputs[0], node, "trip count") if inputs[0] else None
        cond = self.constant_value(inputs[1], node, "condition") if len(inputs) > 1 and inputs[1] else None
        if trip is None:
            raise OnnxImportError(f"Loop node {node.name!r} has no trip count: fxforge unrolls "
                                  "only loops with a constant one")
        carried = list(inputs[2:])
        scans: list[list[str]] = [[] for _ in body.output[1 + len(carried):]]
        running = cond is None or bool(cond.reshape(-1)[0])
        for iteration in range(int(trip.reshape(-1)[0]) if running else 0):
            inner = f"{prefix}{node.name or 'loop'}#{next(self.fresh)}/"
            sub_scope = dict(scope)
            sub_scope[body.input[0].name] = self._constant(inner + "iter",
                                                           torch.tensor(iteration, dtype=torch.int64))
            sub_scope[body.input[1].name] = self._constant(inner + "cond", torch.tensor(True))
            for value, name in zip(body.input[2:], carried):
                sub_scope[value.name] = name
            self.emit_graph(body, sub_scope, inner)
            outs = [self.resolve(o.name, sub_scope) for o in body.output]
            carried = outs[1:1 + len(carried)]
            for collected, name in zip(scans, outs[1 + len(carried):]):
                collected.append(name)
            go_on = self.constant_value(outs[0], node, "condition output")
            if not bool(go_on.reshape(-1)[0]):
                break
        for out, name in zip(node.output, carried):
            scope[out] = name
        for out, names in zip(node.output[len(carried):], scans):
            scope[out] = self._stack(names, prefix + out, node)
        self.inlined += 1

    def _stack(self, names: list[str], out: str, node: onnx.NodeProto) -> str:
        """A Loop's scan output: its per-iteration values stacked on a new first axis."""
        view = NodeView("Concat", node.name, DEFAULT_DOMAIN, 13, {"axis": 0}, 1)
        parts = []
        for name in names:
            part = f"{name}:unsq"
            self.steps.append(Step(_unsqueeze0, view, (name,), (part,), False))
            parts.append(part)
        self.steps.append(Step(_concat0, view, tuple(parts), (out,), False))
        return out


def _attribute(attr: onnx.AttributeProto) -> Any:
    """An attribute as Python data; a tensor as a torch tensor, read here, at import (a
    converter traced by dynamo must not run numpy)."""
    value = attribute_value(attr)
    if attr.type == onnx.AttributeProto.TENSOR:
        return to_torch(value)
    return value


def _unsqueeze0(node: NodeView, x: torch.Tensor) -> torch.Tensor:
    return x.unsqueeze(0)


def _concat0(node: NodeView, *parts: torch.Tensor) -> torch.Tensor:
    return torch.cat(parts, 0)


def _as_tuple(value: Any) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)
