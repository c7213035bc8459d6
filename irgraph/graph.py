"""fxforge's IR: a functional ATen-level ``fx.GraphModule`` plus what passes need beside it.

Invariants (checked by :func:`fxforge.irgraph.verify`):
  * nodes are in topological order and every node's inputs come before it;
  * the graph is functional: no in-place or ``out=`` ATen ops, no aliasing of inputs in outputs
    introduced by a pass (mutation may appear only in late passes, e.g. KV-cache insertion);
  * every placeholder and call node carries ``meta["val"]`` and the typed ``meta["fxf"]``;
  * model weights are constants: ``get_attr`` nodes whose tensors live on the GraphModule;
  * placeholders are exactly the runtime inputs, in calling order (tensors and SymInts).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
import torch.fx as fx

from fxforge.irgraph.meta import META_KEY, NodeMeta, TensorMeta, infer_node


@dataclass
class IRGraph:
    gm: fx.GraphModule
    fake_mode: Any  # torch._subclasses.FakeTensorMode that produced the metadata
    # Free-form provenance and per-pass records (capture mode, pass stats, fallbacks).
    info: dict = field(default_factory=dict)

    @property
    def graph(self) -> fx.Graph:
        return self.gm.graph

    @property
    def nodes(self) -> Iterator[fx.Node]:
        return iter(self.gm.graph.nodes)

    def placeholders(self) -> list[fx.Node]:
        return [n for n in self.gm.graph.nodes if n.op == "placeholder"]

    def output_node(self) -> fx.Node:
        return next(n for n in reversed(self.gm.graph.nodes) if n.op == "output")

    def call_nodes(self) -> list[fx.Node]:
        return [n for n in self.gm.graph.nodes if n.op == "call_function"]

    def constants(self) -> dict[str, torch.Tensor]:
        """Every tensor a ``get_attr`` node names (weights, buffers, folded constants)."""
        out = {}
        for node in self.gm.graph.nodes:
            if node.op == "get_attr":
                out[node.target] = getattr(self.gm, node.target)
        return out

    def release_constants(self) -> int:
        """Swap each constant tensor of the module for a meta tensor of the same shape, dtype
        and strides; return the bytes this IR stopped holding. For an IR kept only to be
        reported on once it is lowered into a module of its own (whose kernels hold what they
        use): the graph and its metadata stay, but the IR can no longer run."""
        released = 0
        for name, tensor in list(self.gm._buffers.items()):
            if tensor is None or tensor.device.type == "meta":
                continue
            released += tensor.untyped_storage().nbytes()
            self.gm._buffers[name] = torch.empty_strided(tensor.shape, tensor.stride(),
                                                         dtype=tensor.dtype, device="meta")
        self.info["constants_released"] = True
        return released

    def meta(self, node: fx.Node) -> NodeMeta:
        return node.meta.get(META_KEY)

    def infer(self, node: fx.Node) -> NodeMeta:
        """Fill a new node's metadata from its inputs' (see ``meta.infer_node``)."""
        return infer_node(node, self.fake_mode)

    def add_constant(self, name_hint: str, value: torch.Tensor, before: fx.Node) -> fx.Node:
        """Register ``value`` on the module and insert a ``get_attr`` node for it."""
        name = _free_attr_name(self.gm, name_hint)
        self.gm.register_buffer(name, value, persistent=True)
        with self.gm.graph.inserting_before(before):
            node = self.gm.graph.get_attr(name)
        self.infer(node)
        return node

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for node in self.call_nodes():
            key = op_name(node.target)
            counts[key] = counts.get(key, 0) + 1
        return counts

    def recompile(self) -> None:
        self.gm.graph.lint()
        self.gm.recompile()

    def copy(self, recompile: bool = True) -> "IRGraph":
        """A structural copy that shares the constant tensors (they are never mutated).

        ``recompile=False`` skips generating the module's Python code (the costly part on big
        graphs): the copy's ``gm`` is then not callable until ``recompile()``. The pass manager
        uses it between passes and recompiles once at the end.
        """
        new_graph = fx.Graph()
        value_map: dict[fx.Node, fx.Node] = {}
        out = new_graph.graph_copy(self.gm.graph, value_map)
        new_graph.output(out)
        for old, new in value_map.items():
            new.meta = copy.copy(old.meta)
        if recompile:
            new_gm = fx.GraphModule(_share_tensors(self.gm, torch.nn.Module()), new_graph)
        else:
            # Trivial codegen for an empty graph (which copies no attributes), then swap ours in.
            new_gm = _share_tensors(self.gm, fx.GraphModule(torch.nn.Module(), fx.Graph()))
            new_gm._graph = new_graph
            new_graph.owning_module = new_gm
        return IRGraph(new_gm, self.fake_mode, copy.deepcopy(self.info))


def _share_tensors(src: torch.nn.Module, dst: torch.nn.Module) -> torch.nn.Module:
    for name, tensor in src.named_buffers():
        dst.register_buffer(name, tensor)
    for name, tensor in src.named_parameters():
        dst.register_parameter(name, tensor)
    return dst


def tensor_identity(tensor: torch.Tensor) -> tuple:
    """What makes two tensors the same values in memory (tied weights): storage, offset,
    shape, strides and dtype."""
    return (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
            tuple(tensor.stride()), tensor.dtype)


def op_name(target: Any) -> str:
    """A stable printable name: ``aten.addmm.default``, ``operator.getitem``."""
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    if isinstance(target, torch._ops.OpOverloadPacket):
        return str(target) + ".default"
    module = getattr(target, "__module__", None) or ""
    module = "operator" if module in ("_operator", "operator") else module
    return f"{module}.{getattr(target, '__name__', repr(target))}"


def schema_arguments(op: Any, args: tuple, kwargs: dict) -> dict[str, Any]:
    """An ATen op's arguments by schema name, defaults filled in (positions differ between ops
    that take the same argument: e.g. SDPA kernels' ``attn_mask``/``attn_bias``, ``dropout_p``)."""
    bound = {}
    for i, arg in enumerate(op._schema.arguments):
        if i < len(args):
            bound[arg.name] = args[i]
        elif arg.name in kwargs:
            bound[arg.name] = kwargs[arg.name]
        elif arg.has_default_value():
            bound[arg.name] = arg.default_value
    return bound


def node_arguments(node: fx.Node) -> dict[str, Any]:
    """A call_function node's arguments by schema name (:func:`schema_arguments`)."""
    return schema_arguments(node.target, node.args, node.kwargs)


def _free_attr_name(gm: fx.GraphModule, hint: str) -> str:
    base = "".join(c if c.isalnum() or c == "_" else "_" for c in hint) or "const"
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    return name


def first_tensor_meta(metas: NodeMeta) -> Optional[TensorMeta]:
    if isinstance(metas, TensorMeta):
        return metas
    if isinstance(metas, tuple):
        for m in metas:
            found = first_tensor_meta(m)
            if found is not None:
                return found
    return None


def hoist_get_attrs(graph: fx.Graph) -> None:
    """Put constants right after the placeholders: order stays topological and readable."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    anchor = placeholders[-1] if placeholders else None
    for node in [n for n in graph.nodes if n.op == "get_attr"]:
        if anchor is None:
            first = next(iter(graph.nodes))
            if first is not node:
                first.prepend(node)
        else:
            anchor.append(node)
        anchor = node
