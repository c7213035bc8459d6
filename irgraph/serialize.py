"""IR <-> JSON (graph and typed metadata) + a dict of constant tensors (saved as safetensors).

Loading rebuilds the fx graph node by node from names: no model code and no tracing. Targets
resolve through ``torch.ops`` (ATen and fxforge's own custom ops) or a short allowlist of
Python modules, so a tampered artifact cannot make the loader import arbitrary code.
"""
from __future__ import annotations

import importlib
import operator
from typing import Any

import sympy
import torch
import torch.fx as fx

from fxforge.irgraph.fusion import GROUP_KEY
from fxforge.irgraph.graph import IRGraph, op_name
from fxforge.irgraph.meta import META_KEY, SymMeta, TensorMeta

FORMAT_VERSION = 1
_PY_MODULES = {"operator": operator, "math": importlib.import_module("math"), "torch": torch,
               "builtins": importlib.import_module("builtins")}
_MEMORY_FORMATS = {str(f).replace("torch.", ""): f for f in (
    torch.contiguous_format, torch.preserve_format, torch.channels_last, torch.channels_last_3d)}
_LAYOUTS = {str(l).replace("torch.", ""): l for l in (torch.strided, torch.sparse_coo)}


class SerializationError(ValueError):
    """The IR cannot be written, or a stored IR cannot be read back."""


def _dtype(name: str) -> torch.dtype:
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise SerializationError(f"unknown dtype {name!r}")
    return value


def encode_meta(meta) -> Any:
    if isinstance(meta, TensorMeta):
        return {"tensor": {"shape": [str(d) for d in meta.shape], "stride": [str(s) for s in meta.stride],
                           "dtype": str(meta.dtype).replace("torch.", ""), "device": str(meta.device)}}
    if isinstance(meta, SymMeta):
        return {"sym": str(meta.expr)}
    if isinstance(meta, tuple):
        return {"tuple": [encode_meta(m) for m in meta]}
    return None


def _expr(text: str):
    """Parse a dim; symbols get the shape environment's assumptions (sizes: positive ints)."""
    value = sympy.sympify(text)
    if value.is_Integer:
        return int(value)
    return value.subs({s: sympy.Symbol(s.name, integer=True, positive=True) if s.name.startswith("s")
                       else sympy.Symbol(s.name, integer=True) for s in value.free_symbols})


def decode_meta(data) -> Any:
    if data is None:
        return None
    if "tensor" in data:
        t = data["tensor"]
        return TensorMeta(tuple(_expr(d) for d in t["shape"]), tuple(_expr(s) for s in t["stride"]),
                          _dtype(t["dtype"]), torch.device(t["device"]))
    if "sym" in data:
        return SymMeta(_expr(data["sym"]))
    return tuple(decode_meta(m) for m in data["tuple"])


def _encode_arg(value: Any) -> Any:
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return {"list" if isinstance(value, list) else "tuple": [_encode_arg(v) for v in value]}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).replace("torch.", "")}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if isinstance(value, torch.memory_format):
        return {"memory_format": str(value).replace("torch.", "")}
    if isinstance(value, torch.layout):
        return {"layout": str(value).replace("torch.", "")}
    raise SerializationError(f"cannot serialize argument {value!r} of type {type(value).__name__}")


def _decode_arg(value: Any, env: dict[str, fx.Node]) -> Any:
    if not isinstance(value, dict):
        return value
    (kind, payload), = value.items()
    if kind == "node":
        if payload not in env:
            raise SerializationError(f"node {payload!r} is used before it is defined")
        return env[payload]
    if kind in ("list", "tuple"):
        items = [_decode_arg(v, env) for v in payload]
        return items if kind == "list" else tuple(items)
    if kind == "dtype":
        return _dtype(payload)
    if kind == "device":
        return torch.device(payload)
    if kind == "memory_format" and payload in _MEMORY_FORMATS:
        return _MEMORY_FORMATS[payload]
    if kind == "layout" and payload in _LAYOUTS:
        return _LAYOUTS[payload]
    raise SerializationError(f"unknown argument encoding {kind!r}")


def resolve_target(name: str) -> Any:
    """``aten.addmm.default`` -> the OpOverload; ``operator.getitem`` -> the function."""
    parts = name.split(".")
    if parts[0] in _PY_MODULES and len(parts) == 2:
        target = getattr(_PY_MODULES[parts[0]], parts[1], None)
        if callable(target):
            return target
    if len(parts) == 3:
        namespace, op, overload = parts
        try:
            return getattr(getattr(getattr(torch.ops, namespace), op), overload)
        except (AttributeError, RuntimeError):
            pass
    raise SerializationError(f"unknown op {name!r} (is the library that defines it imported?)")


def ir_to_json(ir: IRGraph) -> dict:
    nodes = []
    for node in ir.gm.graph.nodes:
        entry = {"name": node.name, "op": node.op, "meta": encode_meta(node.meta.get(META_KEY))}
        if node.op == "get_attr":
            entry["target"] = node.target
        elif node.op == "call_function":
            entry["target"] = op_name(node.target)
            resolve_target(entry["target"])  # fail at save time, not at load time
        entry["args"] = _encode_arg(tuple(node.args))
        entry["kwargs"] = {k: _encode_arg(v) for k, v in node.kwargs.items()}
        if node.meta.get(GROUP_KEY) is not None:  # fusion groups travel with the graph
            entry["group"] = node.meta[GROUP_KEY]
        nodes.append(entry)
    return {"format": FORMAT_VERSION, "nodes": nodes}


def ir_from_json(data: dict, constants: dict[str, torch.Tensor]) -> IRGraph:
    if data.get("format") != FORMAT_VERSION:
        raise SerializationError(f"IR format {data.get('format')!r}, this fxforge reads {FORMAT_VERSION}")
    graph = fx.Graph()
    owner = torch.nn.Module()
    env: dict[str, fx.Node] = {}
    for entry in data["nodes"]:
        op, name = entry["op"], entry["name"]
        args = _decode_arg({"tuple": entry["args"]["tuple"]}, env)
        kwargs = {k: _decode_arg(v, env) for k, v in entry["kwargs"].items()}
        if op == "get_attr":
            target = entry["target"]
            if target not in constants:
                raise SerializationError(f"constant {target!r} is missing from the weights file")
            owner.register_buffer(target, constants[target])
        elif op == "call_function":
            target = resolve_target(entry["target"])
        elif op == "placeholder":
            target = name
        elif op == "output":
            target = "output"
        else:
            raise SerializationError(f"node {name!r} has unsupported kind {op!r}")
        if name in env:
            raise SerializationError(f"duplicate node name {name!r}")
        # fx may rename (e.g. ``input`` -> ``input_1``, a builtin's name); env keys stay as stored.
        node = graph.create_node(op, target, args, kwargs, name=name)
        node.meta[META_KEY] = decode_meta(entry.get("meta"))
        if isinstance(entry.get("group"), str):
            node.meta[GROUP_KEY] = entry["group"]
        env[name] = node
    return IRGraph(fx.GraphModule(owner, graph), fake_mode=None, info={"capture": "artifact"})
