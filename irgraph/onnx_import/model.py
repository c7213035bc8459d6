"""Reading an ONNX model as data, and the checks that turn a malformed one into a clear error.

An ONNX file is data: loading one reads protobuf and tensor bytes, never code. External data
files are read only from inside the model's own folder (a location that escapes it, absolute or
through ``..`` or a link, is refused), so a model cannot make fxforge read arbitrary files.
"""
from __future__ import annotations

import graphlib
import os
from pathlib import Path
from typing import Any, Iterator, Union

import onnx
import onnx.defs
import onnx.shape_inference

from fxforge.errors import FxforgeError
from fxforge.irgraph.onnx_import.table import DEFAULT_DOMAIN, MS_DOMAIN, lookup

MIN_OPSET = 13
DOMAIN_NAMES = {DEFAULT_DOMAIN: "ai.onnx", "ai.onnx": "ai.onnx", MS_DOMAIN: MS_DOMAIN}


class OnnxImportError(FxforgeError, ValueError):
    """An ONNX model fxforge cannot import: malformed, or using ops it does not convert."""


def newest_opset() -> int:
    return onnx.defs.onnx_opset_version()


Source = Union[str, os.PathLike, bytes, onnx.ModelProto]


def read_model(source: Source) -> onnx.ModelProto:
    """A ModelProto from a path, serialized bytes or a ModelProto, its external data loaded."""
    if isinstance(source, onnx.ModelProto):
        return source
    if isinstance(source, (bytes, bytearray)):
        return _parse(bytes(source), "the given bytes")
    path = Path(source)
    if not path.is_file():
        raise OnnxImportError(f"no ONNX file at {str(path)!r}")
    model = _parse(path.read_bytes(), str(path))
    _load_external_data(model, path.parent.resolve())
    return model


def _parse(data: bytes, where: str) -> onnx.ModelProto:
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception as exc:   # protobuf's DecodeError and friends
        raise OnnxImportError(f"{where} is not an ONNX model ({type(exc).__name__})") from None
    if not model.HasField("graph"):
        raise OnnxImportError(f"{where} holds no ONNX graph")
    return model


def _load_external_data(model: onnx.ModelProto, base: Path) -> None:
    from onnx.external_data_helper import uses_external_data
    for tensor in _all_initializers(model.graph):
        if not uses_external_data(tensor):
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        target = (base / location).resolve()
        if not location or Path(location).is_absolute() or not target.is_relative_to(base):
            raise OnnxImportError(f"initializer {tensor.name!r}: its external data location "
                                  f"{location!r} is outside the model's folder; refused")
        if not target.is_file():
            raise OnnxImportError(f"initializer {tensor.name!r}: external data file "
                                  f"{location!r} is missing next to the model")
        offset, length = int(info.get("offset", 0)), info.get("length")
        with open(target, "rb") as f:
            f.seek(offset)
            data = f.read(int(length)) if length is not None else f.read()
        tensor.raw_data = data
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.DEFAULT


def _all_initializers(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            for sub in _subgraphs_of_attr(attr):
                yield from _all_initializers(sub)


def _subgraphs_of_attr(attr: onnx.AttributeProto) -> list[onnx.GraphProto]:
    if attr.type == onnx.AttributeProto.GRAPH:
        return [attr.g]
    if attr.type == onnx.AttributeProto.GRAPHS:
        return list(attr.graphs)
    return []


def opsets_of(model: onnx.ModelProto) -> dict[str, int]:
    """Domain -> imported opset version, checked against what fxforge converts."""
    versions = {}
    for entry in model.opset_import:
        domain = "" if entry.domain in ("", "ai.onnx") else entry.domain
        versions[domain] = int(entry.version)
    default = versions.get(DEFAULT_DOMAIN)
    newest = newest_opset()
    if default is None:
        raise OnnxImportError("the model imports no opset of the default ONNX domain")
    if not MIN_OPSET <= default <= newest:
        raise OnnxImportError(f"the model imports opset {default} of the default domain; fxforge "
                              f"imports opsets {MIN_OPSET} to {newest} (convert older models with "
                              "onnx.version_converter.convert_version)")
    return versions


def walk_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node, subgraphs (If/Loop bodies) included."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in _subgraphs_of_attr(attr):
                yield from walk_nodes(sub)


def check_supported(model: onnx.ModelProto, versions: dict[str, int]) -> None:
    """One error listing every op of the model that has no converter at its opset."""
    missing: dict[tuple[str, str, int], int] = {}
    for node in walk_nodes(model.graph):
        domain = "" if node.domain in ("", "ai.onnx") else node.domain
        version = versions.get(domain)
        if version is None:
            raise OnnxImportError(f"{node.op_type} node {node.name!r} is in domain "
                                  f"{node.domain!r}, which the model does not import")
        if lookup(domain, node.op_type, version) is None:
            key = (DOMAIN_NAMES.get(domain, domain), node.op_type, version)
            missing[key] = missing.get(key, 0) + 1
    if missing:
        listed = ", ".join(f"{d}::{op} (opset {v}, {n} node{'s' if n > 1 else ''})"
                           for (d, op, v), n in sorted(missing.items()))
        raise OnnxImportError(f"the model uses {len(missing)} op(s) fxforge does not import: "
                              f"{listed}. `python -m fxforge onnx-ops` prints what it does import")


def topological_order(graph: onnx.GraphProto, outer: set[str] = frozenset()) -> list[onnx.NodeProto]:
    """The graph's nodes in an order where each comes after its inputs' producers; a clear error
    for an input nothing produces and for a cycle."""
    local = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    known = local | set(outer) | {""}
    producer: dict[str, int] = {}
    for index, node in enumerate(graph.node):
        for out in node.output:
            if out and (out in producer or out in local):
                raise OnnxImportError(f"value {out!r} is produced twice (by {node.op_type} node "
                                      f"{node.name!r})")
            if out:
                producer[out] = index
    sorter: graphlib.TopologicalSorter = graphlib.TopologicalSorter()
    for index, node in enumerate(graph.node):
        deps = set()
        for name in list(node.input) + _captured_names(node):
            if name in producer:
                deps.add(producer[name])
            elif name not in known:
                raise OnnxImportError(f"{node.op_type} node {node.name!r} reads {name!r}, which is "
                                      "neither a graph input, an initializer nor a node's output "
                                      "(a missing initializer?)")
        sorter.add(index, *deps)
    try:
        order = list(sorter.static_order())
    except graphlib.CycleError as exc:
        cycle = [graph.node[i] for i in exc.args[1]]
        names = " -> ".join(f"{n.op_type} {n.name!r}" for n in cycle)
        raise OnnxImportError(f"the graph has a cycle: {names}") from None
    for out in graph.output:
        if out.name not in producer and out.name not in known:
            raise OnnxImportError(f"graph output {out.name!r} is produced by no node")
    return [graph.node[i] for i in order]


def _captured_names(node: onnx.NodeProto) -> list[str]:
    """Outer-scope names a node's subgraphs read (ONNX lets If/Loop bodies see them)."""
    names = []
    for attr in node.attribute:
        for sub in _subgraphs_of_attr(attr):
            local = {i.name for i in sub.input} | {t.name for t in sub.initializer}
            for inner in walk_nodes(sub):
                local.update(inner.output)
            for inner in walk_nodes(sub):
                names.extend(n for n in inner.input if n and n not in local)
    return names


def check_types(model: onnx.ModelProto) -> onnx.ModelProto:
    """The checker and strict shape inference; returns the model with inferred value types.
    Ops of domains the ONNX package has no schema for (com.microsoft) are skipped by them."""
    try:
        onnx.checker.check_model(model)
        return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True,
                                                 data_prop=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise OnnxImportError(f"the ONNX model is invalid: {first.strip()}") from None
    except ValueError as exc:   # models over 2 GB: the checker needs a path
        if "2GB" not in str(exc) and "2 GB" not in str(exc):
            raise
        return model


def attribute_value(attr: onnx.AttributeProto) -> Any:
    """An attribute as Python data (tensors stay TensorProto, graphs GraphProto; strings are
    ``str``: onnx gives them as UTF-8 bytes, which converters would compare to str in vain)."""
    value = onnx.helper.get_attribute_value(attr)
    if attr.type == onnx.AttributeProto.STRING:
        return value.decode("utf-8")
    if attr.type == onnx.AttributeProto.STRINGS:
        return [v.decode("utf-8") for v in value]
    return value
