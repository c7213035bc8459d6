"""Attention in every common written form (``fxforge.examples.attention_forms``): each fuses into
one ``scaled_dot_product_attention``, matches eager, and a naive decode loop (the whole growing
sequence every call) runs incrementally under ``kv_cache``. Near misses stay unfused."""
import math

import pytest
import torch
import torch.nn as nn

from fxforge.compiler import recording
from fxforge.irgraph.views import Sdpa
from fxforge.examples.attention_forms import FORMS, GROUPED, VOCAB, make_model
from fxforge.testing import assert_close_to_eager
from tests.passes.helpers import greedy_loop

SDPA = torch.ops.aten.scaled_dot_product_attention.default
CACHED = torch.ops.fxforge.cached_attention.default
STEPS = 5   # calls of the loop: a prefill, then cached steps


def _fuse_counts(graph):
    return [s.counts for s in graph.ir.info["passes"] if s.name == "fuse_attention"][-1]


# one batch size per form, alternating (both for grouped k/v, whose B = 1 is a case of its own)
CASES = [(form, batch) for i, form in enumerate(FORMS)
         for batch in ((1, 2) if form in GROUPED else (1 + i % 2,))]


@pytest.mark.parametrize("form,batch", CASES)
def test_form_fuses_into_one_attention_and_decodes_incrementally(form, batch):
    model = make_model(form, block=32)
    prompt = torch.randint(0, VOCAB, (batch, 5))
    compiled = torch.compile(model, backend="fxforge",
                             options={"kv_cache": True, "max_seq_len": 32, "backend": "reference"})
    with torch.no_grad(), recording() as graphs:
        want_ids, want = greedy_loop(model, prompt, STEPS)
        got_ids, got = greedy_loop(compiled, prompt, STEPS)
    for step, (g, w) in enumerate(zip(got, want)):
        assert_close_to_eager(g, w, what=f"{form} logits at call {step}")
    assert torch.equal(got_ids, want_ids)
    # dynamo's first graph is static (5 tokens); the dynamic one, from the second call, caches
    static, dynamic = graphs
    for graph in graphs:
        counts = _fuse_counts(graph)
        assert counts["attention_fused"] == 1 and counts["declined"] == 0, counts
        assert counts["gqa"] == int(form in GROUPED), counts
        assert [n.target for n in graph.ir.call_nodes()].count(SDPA) == 1
        assert "aten._softmax.default" not in graph.ir.op_counts()
    assert dynamic.kv is not None, f"{form}: the KV-cache pass declined"
    assert [n.target for n in dynamic.kv.plan.ir.call_nodes()].count(CACHED) == 1
    stats = dynamic.kv.stats
    assert stats["prefills"] == 1 and stats["steps"] == STEPS - 2 and stats["uncached"] == 0
    assert stats["positions"] == 6 + STEPS - 2      # each position computed once


def test_there_are_at_least_twelve_forms():
    assert len(FORMS) >= 12 and len(set(FORMS.values())) == len(FORMS)


# ---- near misses: what must not become attention or a softmax ---------------------------------

PIPELINE = ["remove_noops", "cse", "constant_fold", "fuse_attention", "dce"]


def _compile_ir(model, *inputs):
    compiled = torch.compile(model, backend="fxforge", options={"passes": PIPELINE, "backend": "reference"})
    with torch.no_grad(), recording() as graphs:
        assert_close_to_eager(compiled(*inputs), model(*inputs))
    graph, = graphs
    return graph


class ExpSumClassifier(nn.Module):
    """exp over sum that is no attention's weights: eager overflows to NaN, and must still."""

    def forward(self, x):
        e = torch.exp(x)
        return e / e.sum(-1, keepdim=True)


def test_exp_over_sum_outside_attention_stays_as_written():
    x = torch.randn(3, 7)
    x[0, 0] = 200.0   # exp overflows: eager gives NaN in row 0, a softmax would not
    graph = _compile_ir(ExpSumClassifier(), x)
    assert "aten._softmax.default" not in graph.ir.op_counts()
    assert "aten.exp.default" in graph.ir.op_counts()


class ExpSumWeightsReused(nn.Module):
    """Attention weights as exp over sum, with the unnormalised exponentials also returned."""

    def forward(self, q, k, v):
        e = torch.exp(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]))
        return (e / e.sum(-1, keepdim=True)) @ v, e


def test_exp_over_sum_with_its_exponentials_used_elsewhere_does_not_fuse():
    q, k, v = (torch.randn(2, 4, 6, 8) for _ in range(3))
    graph = _compile_ir(ExpSumWeightsReused(), q, k, v)
    assert _fuse_counts(graph)["attention_fused"] == 0
    assert not [n for n in graph.ir.call_nodes() if n.target is SDPA]


class MixedKey(nn.Module):
    """``einsum`` whose k is reshaped so that its sequence and depth mix: not an attention."""

    def forward(self, q, k, v):
        b, h, n, d = k.shape
        scores = torch.einsum("bhqd,bhdk->bhqk", q, k.reshape(b, h, d, n))
        return torch.einsum("bhqk,bhkd->bhqd", scores.softmax(-1), v)


def test_einsum_with_a_key_that_mixes_positions_and_depth_does_not_fuse():
    q, k, v = (torch.randn(2, 4, 6, 8) for _ in range(3))
    graph = _compile_ir(MixedKey(), q, k, v)
    assert _fuse_counts(graph)["attention_fused"] == 0


class EinsumHeadsLast(nn.Module):
    """Attention straight from ``[B, T, H, D]`` tensors in one ``einsum`` naming: no mask."""

    def forward(self, q, k, v):
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * 0.3
        return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(scores, -1), v)


def test_einsum_on_sequence_first_tensors_fuses_with_the_scale():
    q, k, v = torch.randn(2, 6, 4, 8), torch.randn(2, 9, 4, 8), torch.randn(2, 9, 4, 8)
    graph = _compile_ir(EinsumHeadsLast(), q, k, v)
    assert _fuse_counts(graph)["attention_fused"] == 1
    node, = [Sdpa.of(n) for n in graph.ir.call_nodes() if n.target is SDPA]
    assert node.scale == pytest.approx(0.3) and not node.is_causal and node.attn_mask is None
    shapes = [tuple(x.meta["fxf"].shape) for x in (node.query, node.key, node.value)]
    assert shapes == [(2, 4, 6, 8), (2, 4, 9, 8), (2, 4, 9, 8)]
