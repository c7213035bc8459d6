"""IR <-> JSON (graph and typed metadata) + a dict of constant tensors (saved as safetensors).

Loading rebuilds the fx graph node by node from names: no model code, no tracing, and nothing
stored is evaluated. A stored graph is data (an artifact may come from anyone), and fake
propagation at load and every call run its ops, so a target resolves (:func:`resolve_target`)
only to one of the few Python callables in :data:`PYTHON_CALLABLES`, or to an operator
``torch.ops.<namespace>.<op>.<overload>`` of :data:`OP_NAMESPACES` whose schema says it computes
its results from its arguments and does nothing else:

* it is a tensor operator of the dispatcher. ``torch.ops.aten`` also reaches TorchScript's
  interpreter builtins (``manual_seed``, ``seed``, ``set_grad_enabled``, ``backward``, ``grad``,
  RRef, string, list and dict functions), which are not;
* it writes to none of its arguments (``set_``, ``record_stream``, every in-place op),
  except that fxforge's own ops may write to the inputs the caller names writable (a step
  graph's KV caches, which the runtime owns);
* it returns something: an op that returns nothing exists for its effect on state outside the
  graph (``_backward``, ``_cufft_set_plan_cache_max_size``, ``_print``). The exceptions are the
  runtime checks export writes (:data:`CHECK_OPS`), which raise or do nothing;
* its results are tensors, numbers or lists of tensors (not ``get_gradients``' dict of the
  distributed autograd context's gradients);
* it is not ``from_file``, which reads any file into a tensor a caller gets back.

The collectives of a tensor-parallel graph (:data:`COLLECTIVE_OPS`: all_reduce, all_gather
and their wait) are named one by one: they send and receive, which is what they are for, over
the process group the loader binds them to (``fxforge/distributed.py``).

Ops that only read process state (``_cufft_get_plan_cache_size``) pass, and sampling ops draw
from the global generator as the model does when run eagerly. Anything else is a
:class:`SerializationError` naming the node. Besides:

* node names, constant names and keyword names must be Python identifiers: fx writes them into
  the Python source it generates for the graph; node names may not be one of the names that
  source already uses (:data:`RESERVED_NAMES`), nor a constant name an attribute of the module
  that holds it;
* sizes, dtypes and devices go through :mod:`fxforge.irgraph.safe_parse` (a grammar and tables,
  never ``sympify``/``eval``); integers must fit in int64; a linear's weight format must be one
  :mod:`fxforge.irgraph.weight_format` implements (a graph stored before formats existed reads
  as "dense", the argument's default).
"""
from __future__ import annotations

import functools
import operator
from typing import Any, Sequence

import torch
import torch.fx as fx

from fxforge.irgraph.collectives import COLLECTIVES, WAIT
from fxforge.irgraph.fusion import GROUP_KEY
from fxforge.irgraph.graph import IRGraph, op_name
from fxforge.irgraph.meta import META_KEY, SymMeta, TensorMeta
from fxforge.irgraph.safe_parse import (ParseError, check_name, parse_device, parse_dtype,
                                        parse_size, short_repr, torch_name)
from fxforge.irgraph.views import Linear
from fxforge.irgraph.weight_format import implemented_format

FORMAT_VERSION = 1
# torch.ops namespaces a stored graph may call: ATen, and fxforge's own ops (irgraph/ops.py).
# (No IR fxforge builds holds a prims op: capture decomposes to ATen.)
OP_NAMESPACES = ("aten", "fxforge")
# A tensor-parallel graph's collectives and their waits, by name: no other op of their
# namespace loads (``_c10d_functional`` also holds ops that reach other groups' state).
COLLECTIVE_OPS = {op_name(op): op for op in (*COLLECTIVES, WAIT)}
# Ops that return nothing yet belong in a graph: the checks export writes (see the docstring).
CHECK_OPS = {"aten::_assert_async", "aten::_assert_scalar", "aten::_assert_tensor_metadata",
             "aten::sym_constrain_range", "aten::sym_constrain_range_for_size"}
# A functional op that returns a value and still reaches outside the graph: it reads a file.
_READS_FILES = {"aten::from_file"}
# What an op may return, as its schema prints it.
_RESULT_TYPES = {"Tensor", "List[Tensor]", "int", "float", "bool", "number"}
# The Python callables an IR holds: ``getitem`` picks one result of a multi-output op, and
# torch.export writes integer arithmetic on symbolic sizes (``2 * s0`` for a view's shape).
PYTHON_CALLABLES = {op_name(f): f for f in (
    operator.getitem, operator.add, operator.sub, operator.mul, operator.floordiv, operator.mod,
    operator.neg, torch.sym_max, torch.sym_min)}
# The names fx's generated ``forward(self, ...)`` uses besides the graph's own: ``self``, and the
# globals every generated module starts with (``torch``, ``inf``, ``device`` ...). A placeholder
# keeps its stored name as the argument's name, so an input called ``torch`` would hide the
# module and an input called ``self`` the module itself.
RESERVED_NAMES = frozenset({"self", *torch.fx.graph._custom_builtins})
MAX_ARG_DEPTH = 16        # real arguments nest three deep (a tuple of lists of nodes)
_INT64 = range(-2 ** 63, 2 ** 63)
_MEMORY_FORMATS = {torch_name(f): f for f in (
    torch.contiguous_format, torch.preserve_format, torch.channels_last, torch.channels_last_3d)}
_LAYOUTS = {torch_name(layout): layout for layout in (torch.strided, torch.sparse_coo)}


class SerializationError(ValueError):
    """The IR cannot be written, or a stored IR cannot be read back."""


def encode_meta(meta) -> Any:
    if isinstance(meta, TensorMeta):
        return {"tensor": {"shape": [str(d) for d in meta.shape], "stride": [str(s) for s in meta.stride],
                           "dtype": torch_name(meta.dtype), "device": str(meta.device)}}
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
    if isinstance(value, torch.device):
        return {"device": str(value)}
    for kind, cls in (("dtype", torch.dtype), ("memory_format", torch.memory_format),
                      ("layout", torch.layout)):
        if isinstance(value, cls):
            return {kind: torch_name(value)}
    raise SerializationError(f"cannot serialize argument {value!r} of type {type(value).__name__}")


def _decode_arg(value: Any, env: dict[str, fx.Node], depth: int = 0) -> Any:
    if isinstance(value, int) and not isinstance(value, bool) and value not in _INT64:
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

    Only the callables of :data:`PYTHON_CALLABLES` and the ops of :data:`OP_NAMESPACES` whose
    schema says they do nothing but compute their results resolve (the module docstring)."""
    if not isinstance(name, str):
        raise SerializationError(f"bad op name {short_repr(name)}")
    if name in PYTHON_CALLABLES:
        return PYTHON_CALLABLES[name]
    if name in COLLECTIVE_OPS:   # a load rebinds their group to its own (collectives.py)
        return COLLECTIVE_OPS[name]
    parts = name.split(".")
    if len(parts) != 3 or parts[0] not in OP_NAMESPACES or \
            not all(p.isidentifier() for p in parts) or parts[2].startswith("__"):
        raise SerializationError(f"op {short_repr(name)} is not one fxforge loads: an op of "
                                 f"torch.ops.{{{','.join(OP_NAMESPACES)}}} or one of "
                                 f"{sorted(PYTHON_CALLABLES)}")
    namespace, op, overload = parts
    try:
        target = getattr(_op_packet(namespace, op), overload)
    except (AttributeError, RuntimeError):
        target = None
    if not isinstance(target, torch._ops.OpOverload):
        raise SerializationError(f"unknown op {short_repr(name)} (is the library that defines "
                                 "it imported?)")
    why = _effect_beyond_results(target, may_write=namespace == "fxforge")
    if why:
        raise SerializationError(f"op {short_repr(name)} {why}; a stored graph may only "
                                 "compute its outputs")
    return target


def _op_packet(namespace: str, op: str) -> torch._ops.OpOverloadPacket:
    """``torch.ops.<namespace>.<op>`` looked up as an operator name only, so that ``__and__``
    is ATen's op and ``__class__`` (an attribute of the namespace object) is no op at all."""
    ops = getattr(torch.ops, namespace)
    packet = vars(ops).get(op)
    return packet if isinstance(packet, torch._ops.OpOverloadPacket) else \
        type(ops).__getattr__(ops, op)


def _effect_beyond_results(op: torch._ops.OpOverload, may_write: bool) -> str:
    """What ``op`` does besides computing its results from its arguments, read from its schema
    (the rules of the module docstring), or ''."""
    schema = op._schema
    if not torch._C._dispatch_has_kernel(op.name()):
        return "is a TorchScript builtin, not a tensor operator"
    if schema.is_mutable and not may_write:
        return "writes to its arguments"
    if not schema.returns and schema.name not in CHECK_OPS:
        return "returns nothing, so it exists for an effect outside the graph"
    if any(str(result.type) not in _RESULT_TYPES for result in schema.returns):
        return f"returns {[str(r.type) for r in schema.returns]}, not tensors or numbers"
    if schema.name in _READS_FILES:
        return "reads a file"
    return ""


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
        if value is None and isinstance(argument.type, torch.OptionalType):
            continue   # an optional buffer left out (an int8 cache's scales): nothing written
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
    try:
        gm = fx.GraphModule(owner, graph)
    except (RuntimeError, TypeError, ValueError, AttributeError, SyntaxError) as exc:
        raise SerializationError(f"fx cannot build the stored graph: {exc}") from None
    return IRGraph(gm, fake_mode=None, info={"capture": "artifact"})


@functools.cache
def _module_attributes() -> frozenset[str]:
    """The attribute names of a GraphModule (its own and nn.Module's): a constant is stored as
    an attribute of the module, so it may not be called ``graph``, ``code`` or ``forward``."""
    return frozenset(dir(fx.GraphModule(torch.nn.Module(), fx.Graph())))


def _rebuild_node(graph: fx.Graph, owner: torch.nn.Module, entry: dict, env: dict,
                  constants: dict, writable: Sequence[str]) -> fx.Node:
    op, name = entry["op"], check_name(entry["name"], "node name")
    if name in RESERVED_NAMES:
        raise SerializationError(f"node name {name!r} is reserved: fx's generated code uses it")
    if name in env:
        raise SerializationError(f"duplicate node name {name!r}")
    args = _decode_arg({"tuple": entry["args"]["tuple"]}, env)
    kwargs = {check_name(k, "keyword"): _decode_arg(v, env) for k, v in entry["kwargs"].items()}
    if op == "get_attr":
        target = check_name(entry["target"], "constant name")
        if target in _module_attributes():
            raise SerializationError(f"constant name {target!r} is an attribute of the module "
                                     "that holds the graph")
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
    if (linear := Linear.of(node)) is not None:   # a format this fxforge runs, else its name
        implemented_format(linear.weight_format)
    node.meta[META_KEY] = decode_meta(entry.get("meta"))
    group = entry.get("group")
    if group is not None:
        node.meta[GROUP_KEY] = check_name(group, "fusion group name")
    return node
