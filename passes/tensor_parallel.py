"""Tensor parallelism as a pass (``options={"tensor_parallel": True}`` under an initialised
``torch.distributed`` process group): the Megatron split, found on the graph, so each rank
holds and reads only its shard of the weights.

* attention: the q/k/v projections keep the columns of this rank's kv groups (a key/value head
  with the query heads that read it), the output projection the matching input rows; the
  partial sums of the output projections are added up over the ranks (an all_reduce). With
  fewer kv heads than ranks, ``world / kv_heads`` ranks hold each group (its key/value head
  replicated) and each reads only its part of the group's query heads into the output
  projection (the group's attention is computed on each of them);
* MLPs: gate/up (any producers of the hidden space) keep this rank's hidden channels, down the
  matching rows, then an all_reduce;
* the vocabulary: a token embedding keeps this rank's rows (other rows read as zeros, then an
  all_reduce), an LM head (a linear read only by the graph's outputs) this rank's logits, then
  an all_gather; a vocabulary that does not divide pads the last rank's piece with zeros, cut
  off after the gather. Tied weights stay one tensor.

The sites are the structured-pruning analyses' (:mod:`prune_head_sites`, :mod:`prune_sites`):
sharding is pruning to the rank's contiguous share, plus the collective that puts the shares
back together. An attention whose heads cannot be followed (a per-head side input, a fused
op the analysis does not know) stays whole on every rank, which is still exact, with the
reason logged; a dimension that does not divide evenly is an error naming it. Row-parallel
biases are added on rank 0 only, so the sum holds them once. The pass runs first in the
pipeline, on plain ATen: fusion, quantization (of the shards) and the KV cache (of this
rank's heads) all see the sharded graph.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any, Optional

import torch
import torch.fx as fx

from fxforge.errors import TensorParallelError
from fxforge.irgraph import POINTWISE, IRGraph
from fxforge.irgraph.collectives import insert_all_gather_last, insert_all_reduce
from fxforge.irgraph.graph import hoist_get_attrs, tensor_identity
from fxforge.irgraph.query import is_view_op, tensor_meta
from fxforge.irgraph.views import LinearOperands
from fxforge.passes.base import Pass, PassResult
from fxforge.passes.prune import constant_bytes, drop_unused_constants
from fxforge.passes.prune_head_sites import head_sites
from fxforge.passes.prune_heads import HeadChoice, apply_heads, plan_problem
from fxforge.passes.prune_mlp import (MlpChoice, apply_mlps, set_operands, slice_linear,
                                      weight_value)
from fxforge.passes.prune_sites import channel_groups, is_plain_linear, weight_name
from fxforge.passes.quantize import WHOLE_ROWS_KEY, add_transposed, weight_constant

log = logging.getLogger("fxforge.passes.tensor_parallel")
aten = torch.ops.aten


@dataclasses.dataclass(frozen=True)
class Mesh:
    """This process's place among the ranks: ``world`` ranks, this one ``rank``, collectives
    over the process group registered as ``group``."""
    world: int
    rank: int
    group: str


def current_mesh(world: Any = True) -> Mesh:
    """The mesh of the default process group; ``world``: the option's value (True, or the
    world size the compile expects, checked against the group's)."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        size = "" if world is True else f" --nproc-per-node {world}"
        raise TensorParallelError(
            "option tensor_parallel needs an initialised torch.distributed process group: launch "
            f"with `torchrun{size} script.py` and call torch.distributed.init_process_group("
            "'gloo') (CPUs) or ('nccl') (GPUs) before compiling")
    size = dist.get_world_size()
    if world is not True and world != size:
        raise TensorParallelError(f"option tensor_parallel={world} but the process group has "
                                  f"{size} ranks")
    return Mesh(size, dist.get_rank(), dist.group.WORLD.group_name)


def tensor_parallel_pass(mesh: Mesh) -> Pass:
    return Pass("tensor_parallel", functools.partial(shard, mesh=mesh),
                f"tensor parallelism (rank {mesh.rank} of {mesh.world})", required=True)


def shard(ir: IRGraph, mesh: Mesh) -> PassResult:
    """Keep this rank's share of every site (module docstring); what was split is reported in
    ``ir.info["tensor_parallel"]``."""
    before = constant_bytes(ir)
    report = {"world_size": mesh.world, "rank": mesh.rank, "attention": [], "mlp": [],
              "embeddings": [], "lm_heads": [], "replicated": {}}
    report["attention"] = _shard_attention(ir, mesh, report["replicated"])
    report["mlp"] = _shard_mlps(ir, mesh)
    shared: dict = {}   # tied weights: one shard for the LM head and the embedding
    report["lm_heads"] = [_shard_lm_head(ir, node, mesh, shared) for node in _lm_heads(ir)]
    report["embeddings"] = [_shard_embedding(ir, node, mesh, shared)
                            for node in _token_embeddings(ir, shared)]
    ir.gm.graph.eliminate_dead_code()
    drop_unused_constants(ir)
    hoist_get_attrs(ir.gm.graph)
    report["bytes_before"], report["bytes_after"] = before, constant_bytes(ir)
    check_fits(report["bytes_after"], mesh)
    ir.info["tensor_parallel"] = report
    if report["replicated"]:
        name, why = next(iter(report["replicated"].items()))
        log.warning("tensor_parallel: %d attention or softmax op(s) stay whole on every rank "
                    "(%s: %s; all in ir.info['tensor_parallel']['replicated'])",
                    len(report["replicated"]), name, why)
    if not any(report[k] for k in ("attention", "mlp", "embeddings", "lm_heads")):
        log.warning("tensor_parallel: nothing in this graph of %d nodes splits over the ranks "
                    "(no attention, MLP or vocabulary the pass knows); every rank runs it whole",
                    len(ir.gm.graph.nodes))
    return PassResult(ir, {k: len(report[k]) for k in ("attention", "mlp", "embeddings",
                                                       "lm_heads")})


# ---------------------------------------------------------------- attention and MLPs

def _shard_attention(ir: IRGraph, mesh: Mesh, replicated: dict) -> list[str]:
    sites, declined = head_sites(ir)
    replicated.update(declined)
    choices, sharded = [], []
    for site in sites:
        keep, share = _kv_groups(site, mesh)
        problem = plan_problem(site, keep)
        if problem is not None:
            replicated[site.name or site.attention.name] = problem
        else:
            sharded.append((site, share))
        choices.append(HeadChoice(keep if problem is None else None, why=problem or ""))
    whole = [_weight(ir, site.consumer) for site, _ in sharded]
    apply_heads(ir, choices)
    for (site, share), weight in zip(sharded, whole):
        if share > 1:
            _own_query_heads(ir, site.consumer, mesh.rank % share, share)
        _row_parallel(ir, site.consumer, mesh, weight)
    ir.gm.graph.eliminate_dead_code()
    return [site.name for site, _ in sharded]


def _kv_groups(site: Any, mesh: Mesh) -> tuple[torch.Tensor, int]:
    """(the kv groups this rank keeps, how many ranks share each of them). Groups split evenly
    when their count divides the world; with fewer groups than ranks each group is held by
    ``world / groups`` ranks (its key/value head replicated), which split its query heads."""
    groups, heads = site.kv_heads, site.heads
    if groups % mesh.world == 0:
        per = groups // mesh.world
        return torch.arange(mesh.rank * per, (mesh.rank + 1) * per), 1
    if mesh.world % groups == 0 and heads % mesh.world == 0:
        share = mesh.world // groups
        return torch.tensor([mesh.rank // share]), share
    raise TensorParallelError(
        f"attention {site.name or site.attention.name}: {groups} key/value heads ({heads} query "
        f"heads) cannot be split evenly over {mesh.world} ranks: a rank holds whole kv groups (a "
        "key/value head and the query heads that read it), or, with fewer kv heads than ranks, "
        f"an equal part of one group's query heads; use a world size that divides {groups}, or "
        f"a multiple of {groups} that divides {heads}")


def _own_query_heads(ir: IRGraph, node: fx.Node, part: int, share: int) -> None:
    """The output projection ``node`` of a kv group held by ``share`` ranks reads only this
    rank's ``part`` of the group's query heads (its features are the group's heads in order),
    so the sum over the ranks counts each head once."""
    lin = LinearOperands.of(node)
    width = tensor_meta(lin.x).shape[-1] // share
    with ir.gm.graph.inserting_before(node):
        mine = ir.gm.graph.call_function(aten.slice.Tensor,
                                         (lin.x, -1, part * width, (part + 1) * width))
    ir.infer(mine)
    node.replace_input_with(lin.x, mine)
    slice_linear(ir, node, rows=torch.arange(part * width, (part + 1) * width))


def _shard_mlps(ir: IRGraph, mesh: Mesh) -> list[str]:
    groups, _ = channel_groups(ir)
    choices = []
    for group in groups:
        if group.width % mesh.world:
            raise TensorParallelError(
                f"MLP {group.name}: {group.width} hidden channels cannot be split evenly over "
                f"{mesh.world} ranks; use a world size that divides {group.width}")
        per = group.width // mesh.world
        choices.append(MlpChoice(group.name, torch.arange(mesh.rank * per, (mesh.rank + 1) * per),
                                 None, None))
    whole = [_weight(ir, group.down) for group in groups]
    apply_mlps(ir, choices)
    for group, weight in zip(groups, whole):
        _row_parallel(ir, group.down, mesh, weight)
    ir.gm.graph.eliminate_dead_code()
    return [group.name for group in groups]


def _row_parallel(ir: IRGraph, node: fx.Node, mesh: Mesh, whole_kn: torch.Tensor) -> None:
    """``node`` now computes this rank's partial sum: its bias stays on rank 0 only, and its
    readers read the sum over the ranks. ``whole_kn``: its weight before the split, kept for
    quantization (a per-row scale is the whole row's, as in one process)."""
    lin = LinearOperands.of(node)
    weight_constant(ir, lin.weight)[1].meta[WHOLE_ROWS_KEY] = whole_kn.t()
    if lin.bias is not None and mesh.rank != 0:
        node = set_operands(ir, node, lin.weight, None)
    insert_all_reduce(ir, node, mesh.group)


def _weight(ir: IRGraph, node: fx.Node) -> torch.Tensor:
    return weight_value(ir, LinearOperands.of(node).weight)


# ---------------------------------------------------------------- the vocabulary

def _lm_heads(ir: IRGraph) -> list[fx.Node]:
    """Plain linears whose result is read only on its way to the graph's outputs."""
    return [node for node in ir.gm.graph.nodes
            if is_plain_linear(node) and _only_output(node)]


def _only_output(node: fx.Node) -> bool:
    """``node`` reaches nothing but the graph's outputs, through views and elementwise ops of
    it alone (casts and copies; a logit soft-cap's ``tanh(x / c) * c``): the gathered logits
    are the same whether those ops run on the pieces or on the whole."""
    stack, seen = list(node.users), set()
    while stack:
        user = stack.pop()
        if user in seen:
            continue
        seen.add(user)
        if user.op == "output":
            continue
        if user.op != "call_function" or not (is_view_op(user.target)
                                              or _elementwise_of_one(user)):
            return False
        stack.extend(user.users)
    return any(u.op == "output" for u in seen)


def _elementwise_of_one(node: fx.Node) -> bool:
    return node.target in POINTWISE and len(node.all_input_nodes) == 1


def _vocab_piece(size: int, mesh: Mesh) -> tuple[int, int]:
    """(first row of this rank's piece, rows a piece holds, padding included)."""
    per = -(-size // mesh.world)
    return mesh.rank * per, per


def _rows(value_ve: torch.Tensor, mesh: Mesh) -> torch.Tensor:
    """This rank's rows of a ``[V, E]`` table, zero-padded to the piece size."""
    start, per = _vocab_piece(value_ve.shape[0], mesh)
    piece = value_ve.new_zeros((per,) + tuple(value_ve.shape[1:]))
    taken = value_ve[start:start + per]
    piece[:taken.shape[0]] = taken
    return piece


def _read_elsewhere(ir: IRGraph, embedding: fx.Node) -> bool:
    """Whether anything but ``embedding`` reads its table's storage."""
    table = embedding.args[0]
    storage = getattr(ir.gm, table.target).untyped_storage().data_ptr()
    for node in ir.gm.graph.nodes:
        if node.op != "get_attr" or not isinstance(getattr(ir.gm, node.target), torch.Tensor):
            continue
        if getattr(ir.gm, node.target).untyped_storage().data_ptr() != storage:
            continue
        if any(user is not embedding for user in node.users):
            return True
    return False


def _shared_rows(shared: dict, table: torch.Tensor, mesh: Mesh) -> torch.Tensor:
    """This rank's rows of ``table``, made once per table (tied weights: the LM head and the
    embedding read one shard). A later reader gets a view: one tensor object registered under
    two names would reach only one of them through ``named_buffers()``."""
    key = tensor_identity(table)
    if key in shared:
        return shared[key].view_as(shared[key])
    shared[key] = _rows(table, mesh)
    return shared[key]


def _shard_lm_head(ir: IRGraph, node: fx.Node, mesh: Mesh, shared: dict) -> str:
    lin = LinearOperands.of(node)
    weight_kn = weight_value(ir, lin.weight)
    vocab = weight_kn.shape[1]
    table = weight_kn.t()                                       # [V, E], as an embedding holds it
    piece = _shared_rows(shared, table, mesh)
    weight = add_transposed(ir, "tp_lm_head", piece, node)
    bias = None
    if lin.bias is not None:
        bias = ir.add_constant("tp_lm_head_bias", _rows(weight_value(ir, lin.bias), mesh), node)
    set_operands(ir, node, weight, bias)
    insert_all_gather_last(ir, node, mesh.world, mesh.group, keep=vocab)
    return weight_name(lin.weight)


def _token_embeddings(ir: IRGraph, shared: dict) -> list[fx.Node]:
    """Embedding lookups of a constant table by indices that are a graph input (token ids,
    not positions made in the graph), whose table nothing else reads whole (a tied LM head
    that stays whole would keep the table beside the shard)."""
    found = []
    for node in ir.gm.graph.nodes:
        if node.target is not aten.embedding.default or node.args[0].op != "get_attr":
            continue
        if tensor_identity(getattr(ir.gm, node.args[0].target)) not in shared \
                and _read_elsewhere(ir, node):
            continue
        source = node.args[1]
        while source.op == "call_function" and is_view_op(source.target):
            source = source.all_input_nodes[0]
        if source.op == "placeholder":
            found.append(node)
    return found


def _shard_embedding(ir: IRGraph, node: fx.Node, mesh: Mesh, shared: dict) -> str:
    """``embedding(table, ids)`` -> this rank's rows looked up at ``ids - start`` (clamped),
    zero where ``ids`` fall outside them, summed over the ranks."""
    table = getattr(ir.gm, node.args[0].target)
    start, per = _vocab_piece(table.shape[0], mesh)
    piece = _shared_rows(shared, table, mesh)
    name = weight_name(node.args[0])
    graph, ids = ir.gm.graph, node.args[1]
    const = ir.add_constant("tp_embedding", piece, node)
    with graph.inserting_before(node):
        local = graph.call_function(aten.sub.Tensor, (ids, start))
        below = graph.call_function(aten.lt.Scalar, (local, 0))
        above = graph.call_function(aten.ge.Scalar, (local, per))
        outside = graph.call_function(aten.bitwise_or.Tensor, (below, above))
        index = graph.call_function(aten.clamp.default, (local, 0, per - 1))
        looked = graph.call_function(aten.embedding.default, (const, index, *node.args[2:]))
        mask = graph.call_function(aten.unsqueeze.default, (outside, -1))
        masked = graph.call_function(aten.masked_fill.Scalar, (looked, mask, 0.0))
    for new in (local, below, above, outside, index, looked, mask, masked):
        ir.infer(new)
    node.replace_all_uses_with(masked)
    graph.erase_node(node)
    insert_all_reduce(ir, masked, mesh.group)
    return name


# ---------------------------------------------------------------- memory

def host_memory_per_rank() -> Optional[int]:
    """Bytes of memory this host has for each of its ranks (``MemTotal`` over torchrun's
    ``LOCAL_WORLD_SIZE``), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            total = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
    except (OSError, StopIteration, ValueError):
        return None
    return total // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))


def check_fits(weight_bytes: int, mesh: Mesh, available: Optional[int] = None) -> None:
    """A rank's weights must fit in its share of the host's memory; the error says which
    world size would make them fit (weights scale as 1/world at best)."""
    available = host_memory_per_rank() if available is None else available
    if available is None or weight_bytes <= available:
        return
    needed = -(-mesh.world * weight_bytes // available)
    raise TensorParallelError(
        f"tensor_parallel: each of {mesh.world} ranks would hold {weight_bytes / 2**30:.2f} GiB "
        f"of weights, more than the {available / 2**30:.2f} GiB of memory this host has per "
        f"rank; a world size of at least {needed} (over more hosts) could fit it")
