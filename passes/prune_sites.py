"""Where structured pruning can cut a graph: MLP channel groups and decoder blocks.

Both are found from the graph's data flow alone, before any fusion (the prune pass runs right
after CSE), so one analysis covers every architecture captured into plain ATen:

* a :class:`ChannelGroup` is the hidden space of one MLP: the linears that produce it (``gate``
  and ``up``, a fused ``gate_up`` split in two, GPT-2's ``c_fc``), the channel-wise ops between
  (activations, products, views, per-channel constants) and the one linear that consumes it
  (``down``). Channel j of every tensor in between is channel ``offset + j`` of a producer, so
  removing channel j removes one row (output column) per producer segment and one input row of
  ``down``. A tensor of the group read by anything else (it escapes) disqualifies the group.
* a :class:`Block` is one decoder (or encoder) layer: the stretch of the residual stream between
  the stream nodes that begin two consecutive self-attention layers. Stream nodes are the
  dominators of the output seen from a token embedding (every path from the tokens to the
  logits passes through them: the residual adds, or a post-norm model's norms), found with
  networkx; a self-attention site is a softmax (or fused SDPA) that depends on one embedding
  only (a T5 decoder's cross-attention depends on both and starts no block). The last block of
  each stack is never a candidate: its end is the stack's head, not another block's start.
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Optional

import networkx as nx
import torch
import torch.fx as fx

from fxforge.irgraph import POINTWISE, IRGraph
from fxforge.irgraph.capture import WEIGHT_NAME_KEY
from fxforge.irgraph.query import is_weight, tensor_meta
from fxforge.irgraph.views import LinearOperands, Sdpa, SdpaFlashCpu, Slice, Split

aten = torch.ops.aten
SOFTMAX = (aten._softmax.default, aten.softmax.int)
RESHAPES = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


class NotAGroup(Exception):
    """The linear's input is not a prunable MLP hidden space (the message says why)."""


@dataclasses.dataclass
class ChannelGroup:
    down: fx.Node
    width: int                                 # hidden channels (intermediate size)
    producers: dict[fx.Node, list[int]]        # producer linear -> segment offsets, sorted
    region: list[fx.Node]                      # the ops between, in graph order
    constants: list[tuple[fx.Node, int]]       # (op, argument index) of per-channel constants
    name: str = ""                             # the down projection's weight name

    def producer_rows(self) -> list[dict]:
        """Per producer: its weight's name and where its segments of hidden channels start."""
        return [{"name": weight_name(LinearOperands.of(p).weight), "offsets": offsets}
                for p, offsets in self.producers.items()]


@dataclasses.dataclass
class Block:
    index: int            # within its stack, in graph order
    start: fx.Node        # the stream value entering the block
    end: fx.Node          # the stream value leaving it (the next block's start)
    name: str = ""        # the model's common weight-name prefix of the block


def weight_name(node: fx.Node) -> str:
    """The model's name of the weight ``node`` reads (through views), or ``""``."""
    seen, stack = set(), [node]
    while stack:
        current = stack.pop()
        if current in seen or not isinstance(current, fx.Node):
            continue
        seen.add(current)
        if current.op == "get_attr" and current.meta.get(WEIGHT_NAME_KEY):
            return current.meta[WEIGHT_NAME_KEY]
        stack.extend(current.all_input_nodes)
    return ""


# ---------------------------------------------------------------- MLP channel groups

def channel_groups(ir: IRGraph) -> tuple[list[ChannelGroup], dict[str, str]]:
    """Every MLP hidden space of ``ir`` and, per linear that is not one, why (for the log)."""
    groups, declined = [], {}
    memo: dict = {}   # is_weight's answers, shared by every walk (each would cover the graph)
    for node in ir.gm.graph.nodes:
        lin = LinearOperands.of(node)
        if lin is None or not is_weight(lin.weight, memo):
            continue
        try:
            groups.append(_group_of(node, lin, memo))
        except NotAGroup as exc:
            declined[node.name] = str(exc)
    return groups, declined


def _group_of(down: fx.Node, lin: LinearOperands, memo: dict) -> ChannelGroup:
    width = _last_dim(lin.x)
    tracer = _Tracer(width, memo)
    tracer.trace(lin.x, 0)
    if not tracer.producers:
        raise NotAGroup("no producing linear")
    inside = set(tracer.region) | set(tracer.producers)
    for node in inside:
        if any(user not in inside and user is not down for user in node.users):
            raise NotAGroup(f"{node.name} is read outside the MLP")
    for producer, offsets in tracer.producers.items():
        n_out = _last_dim(producer)
        if sorted(offsets) != list(range(0, n_out, width)):
            raise NotAGroup(f"{producer.name}'s outputs are not all hidden channels")
    order = {n: i for i, n in enumerate(down.graph.nodes)}
    return ChannelGroup(down, width, {p: sorted(o) for p, o in tracer.producers.items()},
                        sorted(set(tracer.region), key=order.__getitem__), tracer.constants,
                        weight_name(lin.weight))


class _Tracer:
    """Walks back from ``down``'s input, mapping each tensor's channel 0 to a producer channel."""

    def __init__(self, width: int, memo: dict):
        self.width, self.memo = width, memo
        self.producers: dict[fx.Node, set[int]] = {}
        self.region: list[fx.Node] = []
        self.constants: list[tuple[fx.Node, int]] = []

    def trace(self, node: fx.Node, offset: int) -> None:
        if not isinstance(node, fx.Node) or node.op != "call_function":
            raise NotAGroup(f"reaches {getattr(node, 'name', node)}, not an op")
        lin = LinearOperands.of(node)
        if lin is not None:
            if not is_plain_linear(node):
                raise NotAGroup(f"producer {node.name} is not a plain constant-weight linear")
            self.producers.setdefault(node, set()).add(offset)
            return
        self.region.append(node)
        if node.target is operator.getitem:
            self._trace_split(node, offset)
        elif (sl := Slice.of(node)) is not None:
            if sl.dim not in (-1, _rank(node) - 1) or sl.step != 1 or not isinstance(sl.start, int):
                raise NotAGroup(f"{node.name} slices across the hidden channels")
            self.trace(sl.input, offset + sl.start)
        elif node.target in RESHAPES:
            if _last_dim(node.args[0]) != _last_dim(node):
                raise NotAGroup(f"{node.name} reshapes the hidden channels")
            self.trace(node.args[0], offset)
        elif node.target in POINTWISE:
            self._trace_pointwise(node, offset)
        else:
            raise NotAGroup(f"{node.name} ({node.target}) is not channel-wise")

    def _trace_split(self, node: fx.Node, offset: int) -> None:
        split = Split.of(node.args[0]) if isinstance(node.args[0], fx.Node) else None
        if split is None or split.dim not in (-1, _rank(node.args[0].args[0]) - 1):
            raise NotAGroup(f"{node.name} is not a piece of a split along the channels")
        src = split.input
        sizes = split_sizes(split, _last_dim(src))
        self.region.append(node.args[0])
        self.trace(src, offset + sum(sizes[:node.args[1]]))

    def _trace_pointwise(self, node: fx.Node, offset: int) -> None:
        shape = tensor_meta(node).shape
        for index, arg in enumerate(node.args):
            if not isinstance(arg, fx.Node):
                continue
            meta = tensor_meta(arg)
            if meta is None or meta.is_static and int(meta.numel()) == 1:
                continue   # a scalar (a 0-d tensor, a one-element constant)
            if is_weight(arg, self.memo):
                if meta.shape[-1] == 1 or _last_dim(arg) != self.width:
                    raise NotAGroup(f"{node.name} mixes the channels with {arg.name}")
                self.constants.append((node, index))
            elif tuple(meta.shape) == tuple(shape):
                self.trace(arg, offset)
            else:
                raise NotAGroup(f"{node.name} broadcasts {arg.name} across the channels")


def is_plain_linear(node: fx.Node) -> bool:
    """A linear whose weight is a constant, with no residual and at most a vector bias: one the
    pruning passes can slice (rows or columns) at compile time."""
    lin = LinearOperands.of(node)
    return lin is not None and is_weight(lin.weight) and lin.residual is None \
        and _bias_rank(lin.bias) <= 1


def split_sizes(split: Split, total: int) -> list[int]:
    """The piece sizes of a split, chunk or split_with_sizes of a ``total``-long dimension."""
    if split.split_sizes is not None:
        return list(split.split_sizes)
    size = split.split_size if split.chunks is None else -(-total // split.chunks)
    return [min(size, total - start) for start in range(0, total, size)]


def _rank(node: fx.Node) -> int:
    return len(tensor_meta(node).shape)


def _last_dim(node: fx.Node) -> int:
    meta = tensor_meta(node)
    if meta is None or not meta.shape or not isinstance(meta.shape[-1], int):
        raise NotAGroup(f"{getattr(node, 'name', node)} has no static last dimension")
    return int(meta.shape[-1])


def _bias_rank(bias: Optional[fx.Node]) -> int:
    return 0 if bias is None else len(tensor_meta(bias).shape)


# ---------------------------------------------------------------- decoder blocks

def decoder_blocks(ir: IRGraph) -> list[Block]:
    """The removable blocks of every stack (one per token embedding), in graph order."""
    graph = _data_graph(ir)
    roots = _token_embeddings(ir)
    reach = {root: nx.descendants(graph, root) | {root} for root in roots}
    output = ir.output_node()
    blocks: list[Block] = []
    for root in roots:
        if output not in reach[root]:
            continue
        others = set().union(*(reach[r] for r in roots if r is not root))
        sub = graph.subgraph(reach[root])
        idom = nx.immediate_dominators(sub, root)
        stream = _dominators(idom, output, root)
        starts = []
        for site in (n for n in reach[root] if _is_attention(n) and n not in others):
            start = _stream_ancestor(idom, site, stream, root)
            if start is not None and start not in starts:
                starts.append(start)
        order = {n: i for i, n in enumerate(ir.gm.graph.nodes)}
        starts.sort(key=order.__getitem__)
        for start, end in zip(starts, starts[1:]):
            if tensor_meta(start) == tensor_meta(end):
                blocks.append(Block(len(blocks), start, end, _block_name(start, end, order)))
    return blocks


def _data_graph(ir: IRGraph) -> nx.DiGraph:
    graph = nx.DiGraph()
    for node in ir.gm.graph.nodes:
        graph.add_node(node)
        for inp in node.all_input_nodes:
            graph.add_edge(inp, node)
    return graph


def _token_embeddings(ir: IRGraph) -> list[fx.Node]:
    """``embedding(table, ids)`` with a constant table and ids straight from an input."""
    return [n for n in ir.gm.graph.nodes if n.target == aten.embedding.default
            and is_weight(n.args[0]) and isinstance(n.args[1], fx.Node)
            and n.args[1].op == "placeholder"]


def _is_attention(node: fx.Node) -> bool:
    return node.target in SOFTMAX or Sdpa.matches(node) or SdpaFlashCpu.matches(node)


def _dominators(idom: dict, node: fx.Node, root: fx.Node) -> set[fx.Node]:
    chain = {node}
    while node is not root:
        node = idom[node]
        chain.add(node)
    return chain


def _stream_ancestor(idom: dict, node: fx.Node, stream: set, root: fx.Node) -> Optional[fx.Node]:
    while node is not root:
        node = idom[node]
        if node in stream:
            return node
    return None


def _block_name(start: fx.Node, end: fx.Node, order: dict) -> str:
    """The longest dotted prefix shared by the weights of the linears between ``start`` and
    ``end`` (``model.layers.3``), or ``""``."""
    names = []
    for node in start.graph.nodes:
        lin = LinearOperands.of(node)
        if lin is not None and order[start] < order[node] < order[end] and weight_name(lin.weight):
            names.append(weight_name(lin.weight).split(",")[0])
    prefix = common_prefix(names).split(".")
    numbered = [i for i, part in enumerate(prefix) if part.isdigit()]
    return ".".join(prefix[:numbered[-1] + 1] if numbered else prefix)   # the block, not its parts


def common_prefix(names: list[str]) -> str:
    """The longest dotted prefix every one of ``names`` starts with (``""`` for none)."""
    if not names:
        return ""
    prefix = names[0].split(".")
    for name in names[1:]:
        parts = name.split(".")
        while prefix and parts[:len(prefix)] != prefix:
            prefix = prefix[:-1]
    return ".".join(prefix)
