"""IR <-> JSON (graph and typed metadata) + a dict of constant tensors (saved as safetensors).

Loading rebuilds the fx graph node by node from names: no model code, no tracing, and nothing
stored is evaluated. A stored graph is data (an artifact may come from anyone), so:

* a target resolves only to an op of ``torch.ops.<namespace>.<op>.<overload>`` for the
  namespaces in :data:`OP_NAMESPACES`, minus ops that reach outside the graph (files, stdout)
  or write to their arguments, or to one of the few Python callables in
  :data:`PYTHON_CALLABLES`; anything else is a :class:`SerializationError` naming the node;
* node names, constant names and keyword names must be Python identifiers: fx writes them into
  the Python source it generates for the graph;
* sizes, dtypes and devices go through :mod:`fxforge.irgraph.safe_parse` (a grammar and tables,
  never ``sympify``/``eval``).
"""
from __future__ import annotations

import operator
from typing import Any, Sequence

import torch
import torch.fx as fx

from fxforge.irgraph.fusion import GROUP_KEY
from fxforge.irgraph.graph import IRGraph, op_name
from fxforge.irgraph.meta import META_KEY, SymMeta, TensorMeta
from fxforge.irgraph.safe_parse import (ParseError, check_name, dtype_name, parse_device,
                                        parse_dtype, parse_size, short_repr)

FORMAT_VERSION = 1
# torch.ops namespaces a stored graph may call: ATen, and fxforge's own ops (irgraph/ops.py).
# (No IR fxforge builds holds a prims op: capture decomposes to ATen.)
OP_NAMESPACES = ("aten", "fxforge")
# ATen ops with effects outside the graph: files, stdout, futures.
_OUTSIDE_EFFECTS = {"aten::save", "aten::from_file", "aten::_print", "aten::warn", "aten::wait"}
# The Python callables an IR holds: ``getitem`` picks one result of a multi-output op, and
# torch.export writes integer arithmetic on symbolic sizes (``2 * s0`` for a view's shape).
PYTHON_CALLABLES = {op_name(f): f for f in (
    operator.getitem, operator.add, operator.sub, operator.mul, operator.floordiv, operator.mod,
    operator.neg, torch.sym_max, torch.sym_min)}
MAX_ARG_DEPTH = 16        # real arguments nest three deep (a tuple of lists of nodes)
_MAX_INT = 2 ** 63
_MEMORY_FORMATS = {str(f).replace("torch.", ""): f for f in (
    torch.contiguous_format, torch.preserve_format, torch.channels_last, torch.channels_last_3d)}
_LAYOUTS = {str(l).replace("torch.", ""): l for l in (torch.strided, torch.sparse_coo)}


class SerializationError(ValueError):
    """The IR cannot be written, or a stored IR cannot be read back."""


def encode_meta(meta) -> Any:
    if isinstance(meta, TensorMeta):
        return {"tensor": {"shape": [str(d) for d in meta.shape], "stride": [str(s) for s in meta.stride],
                           "dtype": dtype_name(meta.dtype), "device": str(meta.device)}}
    if isinstance(meta, SymMeta):
        return {"sym": str(meta.expr)}
    if isinstance(meta, tuple):
        return {"tuple": [encode_meta(m) for m in meta]}
    return None


def _dims(texts: Any, what: str) -> tuple:
    """Sizes or strides: ints >= 0, or expressions over the shape environment's symbols."""
    if not isinstance(texts, list):
        raise SerializationError(f"{what} is not a list")
    dims = tuple(parse_size(t) for t in texts)
    if any(isinstance(d, int) and d < 0 for d in dims):
        raise SerializationError(f"negative {what} {list(texts)}")
    return dims


def decode_meta(data: Any, depth: int = 0) -> Any:
    if data is None:
        return None
    if not isinstance(data, dict) or len(data) != 1 or depth > MAX_ARG_DEPTH:
        raise SerializationError(f"bad metadata {str(data)[:80]!r}")
    if "tensor" in data:
        t = data["tensor"]
        return TensorMeta(_dims(t["shape"], "shape"), _dims(t["stride"], "stride"),
                          parse_dtype(t["dtype"]), parse_device(t["device"]))
    if "sym" in data:
        return SymMeta(parse_size(data["sym"]))
    return tuple(decode_meta(m, depth + 1) for m in data["tuple"])


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


def _decode_arg(value: Any, env: dict[str, fx.Node], depth: int = 0) -> Any:
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > _MAX_INT:
        raise SerializationError(f"integer argument {short_repr(value)} is out of range")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if not isinstance(value, dict) or len(value) != 1 or depth > MAX_ARG_DEPTH:
        raise SerializationError(f"bad argument {str(value)[:80]!r}")
    (kind, payload), = value.items()
    if kind == "node":
        if not isinstance(payload, str) or payload not in env:
            raise SerializationError(f"node {short_repr(payload)} is used before it is defined")
        return env[payload]
    if kind in ("list", "tuple") and isinstance(payload, list):
        items = [_decode_arg(v, env, depth + 1) for v in payload]
        return items if kind == "list" else tuple(items)
    if kind == "dtype":
        return parse_dtype(payload)
    if kind == "device":
        return parse_device(payload)
    if kind == "memory_format" and payload in _MEMORY_FORMATS:
        return _MEMORY_FORMATS[payload]
    if kind == "layout" and payload in _LAYOUTS:
        return _LAYOUTS[payload]
    raise SerializationError(f"unknown argument encoding {short_repr(kind)}")


def resolve_target(name: str) -> Any:
    """``aten.addmm.default`` -> the OpOverload; ``operator.getitem`` -> the function.

    Only ops of :data:`OP_NAMESPACES` (less those with effects outside the graph, and ATen ops
    that write to an argument) and the callables of :data:`PYTHON_CALLABLES` resolve."""
    if not isinstance(name, str):
        raise SerializationError(f"bad op name {short_repr(name)}")
    if name in PYTHON_CALLABLES:
        return PYTHON_CALLABLES[name]
    parts = name.split(".")
    if len(parts) != 3 or parts[0] not in OP_NAMESPACES or \
            not all(p.isidentifier() and not p.startswith("__") for p in parts):
        raise SerializationError(f"op {short_repr(name)} is not one fxforge loads: an op of "
                                 f"torch.ops.{{{','.join(OP_NAMESPACES)}}} or one of "
                                 f"{sorted(PYTHON_CALLABLES)}")
    namespace, op, overload = parts
    try:
        target = getattr(getattr(getattr(torch.ops, namespace), op), overload)
    except (AttributeError, RuntimeError):
        target = None
    if not isinstance(target, torch._ops.OpOverload):
        raise SerializationError(f"unknown op {short_repr(name)} (is the library that defines "
                                 "it imported?)")
    if target._schema.name in _OUTSIDE_EFFECTS:
        raise SerializationError(f"op {short_repr(name)} reaches outside the graph (files or "
                                 "output)")
    if namespace != "fxforge" and target._schema.is_mutable:
        raise SerializationError(f"op {short_repr(name)} writes to its arguments; a stored "
                                 "graph is functional")
    return target


def _check_call(target: Any, args: tuple, kwargs: dict, writable: Sequence[str]) -> None:
    """A Python callable takes nodes and numbers only (no strings to parse, no lists to repeat);
    an op that writes to an argument may write only to the inputs named ``writable``."""
    if not isinstance(target, torch._ops.OpOverload):
        if kwargs or not all(isinstance(a, (fx.Node, int, float)) for a in args):
            raise SerializationError(f"{op_name(target)} takes nodes and numbers only")
        return
    for position, argument in enumerate(target._schema.arguments):
        if argument.alias_info is None or not argument.alias_info.is_write:
            continue
        value = args[position] if position < len(args) else kwargs.get(argument.name)
        if not (isinstance(value, fx.Node) and value.op == "placeholder"
                and value.name in writable):
            raise SerializationError(f"{op_name(target)} writes to its argument {argument.name}, "
                                     f"not one of the inputs {list(writable)} it may write")


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


def ir_from_json(data: dict, constants: dict[str, torch.Tensor],
                 writable_inputs: Sequence[str] = ()) -> IRGraph:
    """Rebuild a stored IR; ``writable_inputs``: placeholders an op may write to (a step
    graph's KV caches, which the runtime owns). Every problem is a SerializationError."""
    if not isinstance(data, dict) or data.get("format") != FORMAT_VERSION:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise SerializationError(f"IR format {short_repr(found)}, this fxforge reads "
                                 f"{FORMAT_VERSION}")
    if not isinstance(data.get("nodes"), list):
        raise SerializationError("the stored IR has no node list")
    graph = fx.Graph()
    owner = torch.nn.Module()
    env: dict[str, fx.Node] = {}
    for index, entry in enumerate(data["nodes"]):
        name = entry.get("name") if isinstance(entry, dict) else None
        try:
            env[name] = _rebuild_node(graph, owner, entry, env, constants, writable_inputs)
        except (ParseError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise SerializationError(f"node {index} ({str(name)[:60]!r}): {exc}") from None
    return IRGraph(fx.GraphModule(owner, graph), fake_mode=None, info={"capture": "artifact"})


def _rebuild_node(graph: fx.Graph, owner: torch.nn.Module, entry: dict, env: dict,
                  constants: dict, writable: Sequence[str]) -> fx.Node:
    op, name = entry["op"], check_name(entry["name"], "node name")
    if name in env:
        raise SerializationError(f"duplicate node name {name!r}")
    args = _decode_arg({"tuple": entry["args"]["tuple"]}, env)
    kwargs = {check_name(k, "keyword"): _decode_arg(v, env) for k, v in entry["kwargs"].items()}
    if op == "get_attr":
        target = check_name(entry["target"], "constant name")
        if target not in constants:
            raise SerializationError(f"constant {target!r} is missing from the weights file")
        owner.register_buffer(target, constants[target])
    elif op == "call_function":
        target = resolve_target(entry["target"])
        _check_call(target, args, kwargs, writable)
    elif op in ("placeholder", "output"):
        if op == "placeholder" and (args or kwargs):   # fx would write args as default values
            raise SerializationError(f"placeholder {name!r} has arguments")
        target = name if op == "placeholder" else "output"
    else:
        raise SerializationError(f"unsupported node kind {short_repr(op)}")
    # fx may rename (e.g. ``input`` -> ``input_1``, a builtin's name); env keys stay as stored.
    node = graph.create_node(op, target, args, kwargs, name=name)
    node.meta[META_KEY] = decode_meta(entry.get("meta"))
    group = entry.get("group")
    if group is not None:
        node.meta[GROUP_KEY] = check_name(group, "fusion group name")
    return node
