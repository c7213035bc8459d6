"""Typed op views read the arguments of real traced graphs by name, and only of their own ops."""
import operator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.export import Dim

from fxforge.examples.small_gpt import make_model
from fxforge.irgraph import capture_export
from fxforge.irgraph import views as V
from fxforge.irgraph.query import (alias_root, aliases_graph_input, is_constant, is_pure,
                                   is_view_op, is_weight, tensor_meta)
from fxforge.passes.kv_cache import insert_kv_cache

aten = torch.ops.aten
SEQ = ({1: Dim("seq", min=2, max=64)},)


class _Decoder(nn.Module):
    """A causal decoder written with fxforge's linear and SDPA directly (no pass needed)."""

    def __init__(self, vocab=64, dim=32, heads=2):
        super().__init__()
        self.heads = heads
        self.emb, self.pos = nn.Embedding(vocab, dim), nn.Embedding(64, dim)
        self.qkv_w = nn.Parameter(torch.randn(dim, 3 * dim) * 0.1)
        self.qkv_b = nn.Parameter(torch.zeros(3 * dim))
        self.up = nn.Parameter(torch.randn(dim, dim) * 0.1)
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids):
        b, t = ids.shape
        x = (self.emb(ids) + self.pos(torch.arange(t))).reshape(b * t, -1)
        qkv = torch.ops.fxforge.linear(x, self.qkv_w, self.qkv_b, "none", None)
        q, k, v = qkv.view(b, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.25)
        y = torch.ops.fxforge.linear(a.transpose(1, 2).reshape(b * t, -1), self.up, None, "gelu", x)
        return self.head(y.view(b, t, -1))


@pytest.fixture(scope="module")
def gpt_graphs():
    """small_gpt exported with a dynamic length (explicit attention, addmm), a decoder with
    fxforge linears and SDPA, and that decoder's KV-cache step graph."""
    ids = torch.randint(0, 64, (1, 6))
    plain = capture_export(make_model(n_layer=1).eval(), (ids,), dynamic_shapes=SEQ)
    fused = capture_export(_Decoder().eval(), (ids,), dynamic_shapes=SEQ)
    plan = insert_kv_cache(fused)
    assert not isinstance(plan, str), plan
    return plain, fused, plan.ir


def _calls(ir, target):
    return [n for n in ir.gm.graph.nodes if n.op == "call_function" and n.target is target]


def _all_calls(ir):
    return [n for n in ir.gm.graph.nodes if n.op == "call_function"]


def test_linear_reads_every_field_and_only_linears(gpt_graphs):
    _, fused, _ = gpt_graphs
    linears = _calls(fused, torch.ops.fxforge.linear.default)
    assert linears
    for node in linears:
        view = V.Linear.of(node)
        x, weight, bias, activation, residual, out_dtype = (*node.args, None)[:6]   # a default
        assert (view.x, view.weight, view.bias, view.activation, view.residual, view.out_dtype) == \
            (x, weight, bias, activation, residual, out_dtype)
        assert view.node is node
    assert {V.Linear.of(n).activation for n in linears} >= {"none", "gelu"}
    assert any(V.Linear.of(n).residual is not None for n in linears)
    for node in _all_calls(fused):
        if node.target is not torch.ops.fxforge.linear.default:
            assert V.Linear.of(node) is None
    assert V.Linear.of(None) is None and V.Linear.of(3) is None


def test_a_linear_without_its_trailing_defaults_reads_them():
    graph = torch.fx.Graph()
    x, w = graph.placeholder("x"), graph.placeholder("w")
    node = graph.call_function(torch.ops.fxforge.linear.default, (x, w, None, "relu", None))
    view = V.Linear.of(node)
    assert view.out_dtype is None and view.activation == "relu"
    node.kwargs = {"out_dtype": torch.float32}
    assert V.Linear.of(node).out_dtype is torch.float32


def test_replace_writes_where_the_node_holds_the_argument():
    graph = torch.fx.Graph()
    x, w, b = graph.placeholder("x"), graph.placeholder("w"), graph.placeholder("b")
    node = graph.call_function(torch.ops.fxforge.linear.default, (x, w, None, "none", None))
    view = V.Linear.of(node).replace(bias=b, out_dtype=torch.bfloat16)
    assert node.args == (x, w, b, "none", None) and node.kwargs == {"out_dtype": torch.bfloat16}
    assert view.bias is b and view.out_dtype is torch.bfloat16
    with pytest.raises(TypeError, match="no argument 'scale'"):
        view.replace(scale=2.0)


def test_arguments_builds_calls_from_names():
    args, kwargs = V.Linear.arguments(x=1, weight=2, bias=None, activation="none", residual=None)
    assert args == (1, 2, None, "none", None) and kwargs == {}
    args, kwargs = V.Sdpa.arguments(query=1, key=2, value=3, is_causal=True, scale=0.5)
    assert args == (1, 2, 3, None, 0.0, True) and kwargs == {"scale": 0.5}
    with pytest.raises(TypeError, match="needs its argument 'activation'"):
        V.Linear.arguments(x=1, weight=2, bias=None)
    with pytest.raises(TypeError, match="no arguments"):
        V.Mm.arguments(input=1, mat2=2, beta=3)


def test_sdpa_and_cached_attention(gpt_graphs):
    _, fused, step = gpt_graphs
    (sdpa,) = _calls(fused, aten.scaled_dot_product_attention.default)
    view = V.Sdpa.of(sdpa)
    assert (view.query, view.key, view.value) == tuple(sdpa.args[:3])
    assert view.is_causal is True and view.attn_mask is None and view.dropout_p == 0.0
    assert view.scale == 0.25 and view.enable_gqa is False
    (cached,) = _calls(step, torch.ops.fxforge.cached_attention.default)
    c = V.CachedAttention.of(cached)
    assert c.tensors == tuple(cached.args[:6]) and c.scale == 0.25
    assert [p.name for p in c.tensors[3:]] == ["kv_cache_k0", "kv_cache_v0", "kv_cache_pos"]
    assert V.Sdpa.of(cached) is None and V.CachedAttention.of(sdpa) is None


def test_matmul_layout_softmax_and_norm_views(gpt_graphs):
    plain, _, _ = gpt_graphs
    addmm = _calls(plain, aten.addmm.default)[0]
    a = V.Addmm.of(addmm)
    assert (a.input, a.mat1, a.mat2) == addmm.args and a.plain
    assert V.LinearOperands.of(addmm) == V.LinearOperands(a.mat1, a.mat2, a.input)
    bmm = _calls(plain, aten.bmm.default)[0]
    assert (V.Bmm.of(bmm).input, V.Bmm.of(bmm).mat2) == bmm.args
    assert V.Contraction.of(bmm).a is bmm.args[0] and V.Mm.of(bmm) is None
    for node in _calls(plain, aten.permute.default):
        assert V.Permute.of(node).dims == list(node.args[1]) and V.View.of(node) is None
    for node in _calls(plain, aten.view.default):
        assert V.View.of(node).input is node.args[0] and V.View.of(node).size == node.args[1]
    for node in _calls(plain, aten.expand.default):
        assert V.Expand.of(node).size == node.args[1]
    softmax = _calls(plain, aten._softmax.default)[0]
    s = V.Softmax.of(softmax)
    assert (s.input, s.dim, s.half_to_float) == softmax.args
    assert V.Reduction.of(softmax).dims(4) == [3]
    ln = V.LayerNorm.of(_calls(plain, aten.native_layer_norm.default)[0])
    assert ln.normalized_shape == [128] and ln.eps == pytest.approx(1e-5)
    assert ln.weight.op == "get_attr" and ln.bias.op == "get_attr"
    arange = V.Arange.of(_calls(plain, aten.arange.start_step)[0])
    assert arange.start == 0 and arange.step == 1 and isinstance(arange.end, torch.fx.Node)
    size = V.SymSize.of(_calls(plain, aten.sym_size.int)[0])
    assert size.dim == 1 and size.input.op == "placeholder"


class _Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8))

    def forward(self, x):
        y = torch.mm(x, self.w.t()).transpose(0, 1).reshape(-1)
        z = F.rms_norm(x, (8,), eps=1e-3).to(torch.float64).sum(dim=(0,), keepdim=True)
        return y, z, torch.softmax(x, 0), x[:, 2:6:2]


def test_views_of_a_small_export():
    ir = capture_export(_Small().eval(), (torch.randn(4, 8),))
    by_target = {}
    for node in _all_calls(ir):
        by_target.setdefault(node.target, node)
    mm = V.Mm.of(by_target[aten.mm.default])
    assert mm.input.op == "placeholder" and is_constant(mm.mat2) and is_weight(mm.mat2)
    assert V.LinearOperands.of(mm.node) == V.LinearOperands(mm.input, mm.mat2)
    transposed = V.Permute.of(mm.mat2) or V.T.of(mm.mat2) or V.Transpose.of(mm.mat2)
    assert transposed is not None and transposed.input.op == "get_attr"
    shape_ops = [n for n in _all_calls(ir) if V.View.of(n) is not None]
    assert any(V.View.of(n).size == [-1] or V.View.of(n).size == [32] for n in shape_ops)
    cast = V.ToCopy.of(by_target[aten._to_copy.default])
    assert cast.dtype is torch.float64 and V.ConvertElementType.of(cast.node) is None
    total = V.Reduction.of(by_target[aten.sum.dim_IntList])
    assert total.dims(2) == [0] and total.node.kwargs.get("keepdim", total.node.args[2])
    rms = V.RmsNorm.of(by_target.get(aten.rms_norm.default) or by_target[aten._fused_rms_norm.default])
    assert rms.normalized_shape == [8] and rms.eps == pytest.approx(1e-3)
    sl = V.Slice.of(by_target[aten.slice.Tensor])
    assert (sl.dim, sl.start, sl.end, sl.step) == (1, 2, 6, 2)


def test_query_helpers(gpt_graphs):
    plain, _, _ = gpt_graphs
    permute = _calls(plain, aten.permute.default)[0]
    assert is_view_op(permute.target) and not is_view_op(aten.addmm.default)
    assert not is_view_op(operator.getitem)
    weight_view = V.Addmm.of(_calls(plain, aten.addmm.default)[0]).mat2
    assert alias_root(weight_view).op == "get_attr" and aliases_graph_input(weight_view)
    assert is_constant(weight_view) and is_weight(weight_view)
    tokens = plain.placeholders()[0]
    assert not is_constant(tokens) and not is_weight(tokens) and aliases_graph_input(tokens)
    assert tensor_meta(tokens).dtype is torch.int64 and tensor_meta(None) is None and tensor_meta(3) is None
    assert is_pure(permute) and not is_pure(tokens)


def test_reduction_dims_follow_the_schema_defaults_and_keywords():
    """argmax without a dim reduces over every dim; topk's dim may come as a keyword (the KV-cache
    pass once read both as the last dim)."""
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    argmax = graph.call_function(aten.argmax.default, (x,))
    topk = graph.call_function(aten.topk.default, (x, 2), {"dim": 1})
    amax = graph.call_function(aten.amax.default, (x,))
    summed = graph.call_function(aten.sum.dim_IntList, (x, [-1, 0]))
    assert V.Reduction.of(argmax).dims(3) == [0, 1, 2]
    assert V.Reduction.of(topk).dims(3) == [1]
    assert V.Reduction.of(amax).dims(2) == [0, 1]
    assert V.Reduction.of(summed).dims(3) == [2, 0]
    assert V.Reduction.of(x) is None
