"""KV-cache insertion: a captured causal decoder -> one *cached step* graph.

The step graph computes ``t`` new positions given ``L`` already cached ones: with ``L = 0`` it
is the prefill, with ``t = 1`` a decode step. It is found by analysis of the IR, not by names:

* the **token input** is the rank-2 integer placeholder; its dim 1 is the **sequence size**,
  which must be symbolic (dynamo makes it so once it has seen two lengths): with a static size
  a sequence dim cannot be told apart from a hidden dim of the same size;
* every **attention site** is a ``scaled_dot_product_attention`` (``fuse_attention`` has turned
  explicit attention into one) with ``is_causal`` and no other mask, over the sequence dim;
  each becomes ``fxforge::cached_attention`` reading and writing per-layer K/V buffers that
  become new graph inputs (GQA keeps its ``Hkv`` heads in the cache; with ``kv_dtype="int8"``
  the buffers hold int8 codes and two more hold their per-row scales, ``irgraph/kv_quant.py``).
  A sliding-window site
  (``fxforge::window_attention``, ``passes/attention_window.py``) becomes
  ``fxforge::cached_window_attention`` over ``window + sinks`` slots; a block-sparse site
  (``passes/attention_sparse.py``) ``fxforge::cached_block_sparse_attention`` (sparse prefill,
  dense decode); a per-head streaming site (``passes/attention_per_head.py``)
  ``fxforge::cached_per_head_attention`` over a full cache for its full heads and a ring for
  its streaming ones;
  ``fxforge::cached_window_attention`` over ``window + sinks`` slots; a linear-attention site
  (``fxforge::linear_attention``, ``passes/attention_linear.py``) becomes
  ``fxforge::cached_linear_attention`` over a fixed-size state and a ring of its window;
* **positions**: ``arange(0, seq)`` (learned position embeddings, rotary ``position_ids``,
  ``cache_position``) becomes ``arange(0, t) + cache_pos``;
* any other op that **mixes positions** — a matmul contracting over the sequence, a reduction,
  softmax, cumsum or sort along it, a non-causal or masked attention — makes the pass decline
  with the reason: the model then runs as it is, correct and uncached.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import sympy
import torch
import torch.fx as fx

from fxforge.irgraph import IRGraph
from fxforge.irgraph.meta import META_KEY, SymMeta, set_meta
from fxforge.irgraph.per_head_ops import head_groups
from fxforge.irgraph.query import tensor_meta
from fxforge.irgraph.linear_ops import features_of
from fxforge.irgraph.views import (Arange, BlockSparseAttention, CachedAttention,
                                   CachedBlockSparseAttention, CachedLinearAttention,
                                   CachedPerHeadAttention, CachedWindowAttention, Contraction,
                                   LinearAttention, PerHeadAttention, Reduction, Sdpa, SymSize,
                                   WindowAttention)

log = logging.getLogger(__name__)

# the attention modes' causal ops
REWRITTEN = (WindowAttention, BlockSparseAttention, PerHeadAttention, LinearAttention)

aten = torch.ops.aten


@dataclass
class CacheSpec:
    """One layer's K (or V) buffer: [batch, kv_heads, capacity, head_dim] of ``dtype``; the
    capacity is ``max_seq_len`` (None), or the slots of a sliding window with sinks (or a
    linear-attention state: [batch, kv_heads, features + 1, head_dim + 1]). An int8 cache's
    scales are a buffer of their own (head_dim 1, fp32) naming it in ``scales_for``."""
    placeholder: str
    heads: int
    head_dim: int
    dtype: torch.dtype
    capacity: Optional[int] = None
    scales_for: Optional[str] = None


@dataclass
class KVCachePlan:
    ir: IRGraph                        # the cached step graph
    tokens: int                        # position of the token input among the placeholders
    seq_symbol: sympy.Symbol
    cache_pos: str                     # placeholder name of the int64 [1] cache length
    caches: list[CacheSpec] = field(default_factory=list)   # k0, v0, (k0/v0 scales,) k1, ...
    seq_outputs: list[int] = field(default_factory=list)    # outputs with the sequence at dim 1
    sites: int = 0
    positions: int = 0

    @property
    def bounded(self) -> bool:
        """Every cache has a fixed number of slots (sliding windows): any length fits."""
        return bool(self.caches) and all(c.capacity is not None for c in self.caches)

    def to_json(self) -> dict:
        """What an AOT artifact stores next to the step graph (the graph itself goes separately)."""
        return {"tokens": self.tokens, "cache_pos": self.cache_pos, "sites": self.sites,
                "positions": self.positions, "seq_outputs": list(self.seq_outputs),
                "caches": [c.placeholder for c in self.caches],
                "capacities": [c.capacity for c in self.caches],
                "scales_for": [c.scales_for for c in self.caches]}

    @classmethod
    def from_json(cls, ir: IRGraph, data: dict) -> "KVCachePlan":
        """The plan over ``ir``, a step graph rebuilt from an artifact (its sequence symbol and
        the caches' heads, head dims and dtypes are read back from its placeholders)."""
        token_meta = tensor_meta(ir.placeholders()[data["tokens"]])
        if token_meta is None or token_meta.rank != 2 or isinstance(token_meta.shape[1], int):
            raise ValueError("the step graph's token input is not [batch, symbolic sequence]")
        metas = {p.name: tensor_meta(p) for p in ir.placeholders()}
        if any(metas.get(name) is None for name in data["caches"]):
            raise ValueError(f"the step graph lacks the cache inputs {data['caches']}")
        capacities = data.get("capacities") or [None] * len(data["caches"])
        scales_for = data.get("scales_for") or [None] * len(data["caches"])  # absent: no int8
        caches = [CacheSpec(name, int(metas[name].shape[1]), int(metas[name].shape[3]),
                            metas[name].dtype, capacity, codes)
                  for name, capacity, codes in zip(data["caches"], capacities, scales_for)]
        return cls(ir, data["tokens"], token_meta.shape[1], data["cache_pos"], caches,
                   list(data["seq_outputs"]), data["sites"], data["positions"])


def _is_seq(dim: Any, seq: sympy.Symbol) -> bool:
    return isinstance(dim, sympy.Expr) and sympy.simplify(dim - seq) == 0


def _token_input(ir: IRGraph) -> Union[tuple[int, sympy.Symbol], str]:
    for i, node in enumerate(ir.placeholders()):
        meta = tensor_meta(node)
        if meta is not None and meta.rank == 2 and not meta.dtype.is_floating_point \
                and meta.dtype != torch.bool:
            seq = meta.shape[1]
            if isinstance(seq, sympy.Symbol):
                return i, seq
            return (f"the sequence size of token input {node.name} is static ({seq}); the "
                    "pass needs the dynamic graph (dynamo compiles one from the second length)")
    return "no token input (a rank-2 integer tensor)"


def _sdpa_site(node: fx.Node, seq) -> Union[bool, str]:
    """True for a causal self-attention over the sequence; a reason if it blocks the pass."""
    sdpa = Sdpa.of(node)
    mask, dropout, causal = sdpa.attn_mask, sdpa.dropout_p, sdpa.is_causal
    q, k = tensor_meta(sdpa.query), tensor_meta(sdpa.key)
    if q is None or k is None or q.rank != 4:
        return f"{node.name}: attention without 4-D tensor metadata"
    if not (_is_seq(q.shape[2], seq) and _is_seq(k.shape[2], seq)):
        return False if not any(_is_seq(d, seq) for d in (*q.shape, *k.shape)) else \
            f"{node.name}: attention whose query/key length is not the sequence"
    if dropout or (mask is None and not causal):
        return f"{node.name}: attention is not causal (bidirectional or dropout)"
    if mask is not None and (causal or not mask_is_causal(node.graph.owning_module, mask, seq)):
        return f"{node.name}: attention with a mask that is not the causal mask"
    return True


def _rewritten_site(node: fx.Node, seq) -> Union[bool, str]:
    """True for an attention mode's op (window, block-sparse, per-head, linear) over the
    sequence (causal by construction)."""
    view = next(v.of(node) for v in REWRITTEN if v.matches(node))
    q = tensor_meta(view.q)
    if q is None or q.rank != 4:
        return f"{node.name}: {node.target} without 4-D tensor metadata"
    return True if _is_seq(q.shape[2], seq) else \
        f"{node.name}: {node.target} whose length is not the sequence"


CHECK_LENGTHS = (1, 2, 3, 5, 8, 13, 40)


def mask_is_causal(gm: fx.GraphModule, mask: fx.Node, seq) -> bool:
    """Whether ``mask`` is the causal mask: it must be computed from the sequence size and
    constants only (no token data: Hugging Face builds it from ``arange`` positions, with a
    packed-sequence check that is all-true for one sequence), and evaluated at several lengths
    it must allow exactly the keys at or before each query (bool, or additive 0 / -inf)."""
    cone, stack = {}, [mask]
    while stack:
        node = stack.pop()
        if node in cone:
            continue
        if node.op == "placeholder":
            meta = node.meta.get(META_KEY)
            if not (isinstance(meta, SymMeta) and _is_seq(meta.expr, seq)):
                return False            # depends on runtime data: not decidable here
        elif node.op not in ("get_attr", "call_function"):
            return False
        cone[node] = None
        stack.extend(node.all_input_nodes)
    graph, env = fx.Graph(), {}
    inputs = []
    for node in gm.graph.nodes:            # graph order is a topological order
        if node in cone:
            env[node] = graph.node_copy(node, lambda n: env[n])
            if node.op == "placeholder":
                inputs.append(node)
    graph.output(env[mask])
    evaluate = fx.GraphModule(gm, graph)
    try:
        return all(_causal_pattern(evaluate(*[n for _ in inputs]), n) for n in CHECK_LENGTHS)
    except Exception as exc:   # the site then runs uncached; say why (seen on CUDA only, once)
        log.info("kv_cache: evaluating the attention mask %s at other lengths failed: %s: %s",
                 mask.name, type(exc).__name__, str(exc)[:300])
        return False


def _causal_pattern(mask: Any, length: int) -> bool:
    if not isinstance(mask, torch.Tensor) or mask.dim() < 2 or \
            tuple(mask.shape[-2:]) != (length, length):
        return False
    allowed = torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
    flat = mask.reshape(-1, length, length)
    if mask.dtype == torch.bool:
        return bool((flat == allowed).all())
    blocked = flat[:, ~allowed]
    return bool((flat[:, allowed] == 0).all()) and bool((blocked == float("-inf")).all() or
                                                        (blocked <= torch.finfo(mask.dtype).min).all())


def _mixes_positions(node: fx.Node, seq) -> Optional[str]:
    """Why ``node`` combines values of different positions (so a cache cannot serve it)."""
    if (reduction := Reduction.of(node)) is not None:
        source = tensor_meta(reduction.input)
        if source is not None:
            for dim in reduction.dims(source.rank):
                if _is_seq(source.shape[dim], seq):
                    return f"{node.name} ({node.target}) reduces over the sequence"
    if (product := Contraction.of(node)) is not None:
        ma = tensor_meta(product.a)   # a @ b contracts a's last dim (a linear's x: [M, K])
        if ma is not None and _is_seq(ma.shape[-1], seq):
            return f"{node.name} ({node.target}) contracts over the sequence"
    return None


def _position_arange(node: fx.Node, seq_nodes: set) -> bool:
    arange = Arange.of(node)
    return arange is not None and not isinstance(arange.start, fx.Node) and arange.start == 0 and \
        isinstance(arange.end, fx.Node) and arange.end in seq_nodes and arange.step == 1


def _sequence_size_nodes(ir: IRGraph, tokens: fx.Node, seq) -> set:
    nodes = {n for n in ir.placeholders() if isinstance(n.meta.get(META_KEY), SymMeta)
             and _is_seq(n.meta[META_KEY].expr, seq)}
    sizes = [SymSize.of(n) for n in ir.call_nodes()]
    nodes |= {s.node for s in sizes if s is not None and s.input is tokens and s.dim in (1, -1)}
    return nodes


def _flat_outputs(ir: IRGraph) -> list:
    out = ir.output_node().args[0]
    return list(out) if isinstance(out, (tuple, list)) else [out]


def insert_kv_cache(ir: IRGraph, kv_dtype: str = "auto") -> Union[KVCachePlan, str]:
    """The cached step graph and what its runtime needs, or why the graph is not a causal
    decoder the pass can serve (the input ``ir`` is never modified). ``kv_dtype``: "auto"
    (the caches hold k and v as computed) or "int8" (codes plus per-row scales)."""
    found = _token_input(ir)
    if isinstance(found, str):
        return found
    tokens_at, seq = found
    if ir.fake_mode is None:
        return "the graph has no fake-tensor mode to propagate metadata with"
    step = ir.copy()
    graph = step.gm.graph
    tokens = step.placeholders()[tokens_at]
    seq_nodes = _sequence_size_nodes(step, tokens, seq)
    sites, aranges = [], []
    for node in step.call_nodes():
        if Sdpa.matches(node) or any(v.matches(node) for v in REWRITTEN):
            verdict = _sdpa_site(node, seq) if Sdpa.matches(node) else _rewritten_site(node, seq)
            if isinstance(verdict, str):
                return verdict
            if verdict:
                sites.append(node)
    masks = _only_feeding({_mask_of(site) for site in sites} - {None}, set(sites))
    for node in step.call_nodes():
        if node in masks or node in sites:
            continue                       # a causal mask the cached attention replaces
        if _position_arange(node, seq_nodes):
            aranges.append(node)
        elif (why := _mixes_positions(node, seq)) is not None:
            return why
    if not sites:
        return "no causal attention over the sequence: not a causal decoder"
    seq_outputs = []
    for i, value in enumerate(_flat_outputs(step)):
        meta = tensor_meta(value)
        if meta is not None and meta.rank >= 2 and _is_seq(meta.shape[1], seq):
            seq_outputs.append(i)
        elif meta is not None and any(_is_seq(d, seq) for d in meta.shape):
            return f"output {i} has the sequence at a dim other than 1"
    plan = KVCachePlan(step, tokens_at, seq, "kv_cache_pos", sites=len(sites),
                       positions=len(aranges), seq_outputs=seq_outputs)
    device = tokens.meta["val"].device   # the position and the caches live with the tokens
    cache_pos = _add_input(step, "kv_cache_pos", torch.zeros(1, dtype=torch.int64, device=device))
    for i, site in enumerate(sites):
        _cache_site(step, plan, site, cache_pos, i, kv_dtype == "int8")
    for node in aranges:
        with graph.inserting_after(node):
            shifted = graph.call_function(aten.add.Tensor, (node, cache_pos))
        node.replace_all_uses_with(shifted, delete_user_cb=lambda user: user is not shifted)
        step.infer(shifted)
    graph.eliminate_dead_code()            # the causal masks' computations
    graph.lint()
    step.gm.recompile()
    return plan


def _mask_of(site: fx.Node) -> Optional[fx.Node]:
    return Sdpa.of(site).attn_mask if Sdpa.matches(site) else None


def _only_feeding(roots: set, sinks: set) -> set:
    """Nodes upstream of ``roots`` whose every use leads to ``sinks`` (dead once they go)."""
    dead: set = set()
    frontier = list(roots)
    while frontier:
        node = frontier.pop()
        if node in dead or not isinstance(node, fx.Node) or node.op != "call_function":
            continue
        if all(user in dead or user in sinks for user in node.users):
            dead.add(node)
            frontier.extend(node.all_input_nodes)
    return dead


def _add_input(ir: IRGraph, name: str, example: torch.Tensor) -> fx.Node:
    last = ir.placeholders()[-1]
    with ir.gm.graph.inserting_after(last):
        node = ir.gm.graph.placeholder(name)
    set_meta(node, ir.fake_mode.from_tensor(example))
    return node


def _cache_site(ir: IRGraph, plan: KVCachePlan, site: fx.Node, cache_pos: fx.Node, i: int,
                int8: bool = False) -> None:
    """The site reads and writes its layer's K/V buffers: ``cached_attention`` over
    ``max_seq_len`` positions; for a sliding window ``cached_window_attention`` over its
    ``window + sinks`` slots; block-sparse ``cached_block_sparse_attention``; per-head
    streaming ``cached_per_head_attention`` over a full cache and a ring. ``int8``: int8
    buffers plus their scales (plain and window sites; the options refuse it with the others).
    Linear attention: ``cached_linear_attention`` (:func:`_cache_linear_site`)."""
    if LinearAttention.matches(site):
        return _cache_linear_site(ir, plan, site, cache_pos, i)
    window, sparse = WindowAttention.of(site), BlockSparseAttention.of(site)
    per_head, sdpa = PerHeadAttention.of(site), Sdpa.of(site)
    mode = window or sparse or per_head
    q, k, v, scale = (mode.q, mode.k, mode.v, mode.scale) if mode is not None else \
        (sdpa.query, sdpa.key, sdpa.value, sdpa.scale)
    kv_heads = int(tensor_meta(k).shape[1])
    groups = [("", kv_heads, window.window + window.sinks if window is not None else None)]
    if per_head is not None:
        full, stream = head_groups(per_head.streaming, kv_heads)
        groups = [("", len(full), None), ("s", len(stream), per_head.window + per_head.sinks)]
    specs = [CacheSpec(f"kv_cache_{kind}{suffix}{i}", heads, int(tensor_meta(value).shape[3]),
                       torch.int8 if int8 else tensor_meta(value).dtype, capacity)
             for suffix, heads, capacity in groups for kind, value in (("k", k), ("v", v))]
    if int8:
        specs += [CacheSpec(f"{spec.placeholder}_scale", spec.heads, 1, torch.float32,
                            spec.capacity, spec.placeholder) for spec in specs]
    buffers = [_cache_buffer(ir, plan, spec, k) for spec in specs]
    graph, common = ir.gm.graph, dict(q=q, k=k, v=v, cache_pos=cache_pos, scale=scale)
    cached_kv = dict(k_cache=buffers[0], v_cache=buffers[1])
    if int8:
        cached_kv.update(k_scale=buffers[2], v_scale=buffers[3])
    with graph.inserting_before(site):
        if per_head is not None:
            cached = CachedPerHeadAttention.create(
                graph, **common, k_full=buffers[0], v_full=buffers[1], k_stream=buffers[2],
                v_stream=buffers[3], streaming=per_head.streaming, window=per_head.window,
                sinks=per_head.sinks)
        elif window is not None:
            cached = CachedWindowAttention.create(graph, **common, **cached_kv,
                                                  window=window.window, sinks=window.sinks)
        elif sparse is not None:
            cached = CachedBlockSparseAttention.create(graph, **common, **cached_kv,
                                                       patterns=sparse.patterns, block=sparse.block)
        else:
            cached = CachedAttention.create(graph, **common, **cached_kv)
    site.replace_all_uses_with(cached)
    graph.erase_node(site)
    ir.infer(cached)


def _cache_buffer(ir: IRGraph, plan: KVCachePlan, spec: CacheSpec, like: fx.Node) -> fx.Node:
    """A new cache input ``[batch, heads, capacity or max_seq_len, head_dim]`` as ``spec``
    says (batch and device: ``like``'s), and the spec in the plan."""
    with ir.fake_mode:
        example = torch.empty(like.meta["val"].shape[0], spec.heads, spec.capacity or 1,
                              spec.head_dim, dtype=spec.dtype, device=like.meta["val"].device)
    plan.caches.append(spec)
    return _add_input(ir, spec.placeholder, example)


def _cache_linear_site(ir: IRGraph, plan: KVCachePlan, site: fx.Node, cache_pos: fx.Node,
                       i: int) -> None:
    """Linear attention keeps its state ``[batch, kv heads, features + 1, head_dim + 1]`` (at least
    fp32: it sums over the whole sequence) and, with a window, a ring of ``window`` keys and
    values: every cache bounded."""
    op = LinearAttention.of(site)
    q_map = op.q_map.meta["val"] if op.q_map is not None else None
    k_meta, v_meta = tensor_meta(op.k), tensor_meta(op.v)
    kv_heads = int(k_meta.shape[1])
    features = features_of(op.feature, int(tensor_meta(op.q).shape[3]), q_map)
    dtype = torch.promote_types(v_meta.dtype, torch.float32)
    state = _cache_buffer(ir, plan, CacheSpec(f"kv_cache_s{i}", kv_heads, int(v_meta.shape[3]) + 1,
                                              dtype, features + 1), op.v)
    ring = [_cache_buffer(ir, plan, CacheSpec(f"kv_cache_{kind}{i}", kv_heads,
                                              int(meta.shape[3]), meta.dtype, op.window), op.k)
            for kind, meta in (("k", k_meta), ("v", v_meta))] if op.window else [None, None]
    with ir.gm.graph.inserting_before(site):
        cached = CachedLinearAttention.create(
            ir.gm.graph, q=op.q, k=op.k, v=op.v, state=state, k_cache=ring[0], v_cache=ring[1],
            cache_pos=cache_pos, feature=op.feature, window=op.window, scale=op.scale,
            q_map=op.q_map, k_map=op.k_map)
    site.replace_all_uses_with(cached)
    ir.gm.graph.erase_node(site)
    ir.infer(cached)
