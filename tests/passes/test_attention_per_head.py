"""``attention="per_head:W,sinks:S,mass:M"``: the ops against an oracle written from the
definition, the split cache across many wrap-arounds, whole models against eager with the
per-head masks, and the measured split."""
import copy
import logging

import pytest
import torch

import fxforge
from fxforge.compiler import recording
from fxforge.examples.small_gpt import make_model
from fxforge.irgraph.views import PerHeadAttention
from fxforge.kernels.sparse_attention_cpu import (cpu_cached_per_head_attention,
                                                  cpu_per_head_attention)
from fxforge.passes import attention_per_head
from fxforge.passes.attention_modes import AttentionSpecError, parse_attention
from fxforge.passes.attention_per_head import PerHeadSpec
from tests.passes.helpers import fresh_generator, greedy_loop, random_qkv

per_head_attention = torch.ops.fxforge.per_head_attention
cached_per_head_attention = torch.ops.fxforge.cached_per_head_attention


pytestmark = pytest.mark.usefixtures("fresh_measurements")



def oracle(q, k, v, streaming, window, sinks, first=0):
    """Query row r (position first + r) of head h against keys 0..: causal, and for a head of a
    streaming k/v head only the first ``sinks`` and the last ``window`` keys; float64."""
    q, k, v = q.double(), k.double(), v.double()
    groups = q.shape[1] // k.shape[1]
    out = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=torch.float64)
    for h in range(q.shape[1]):
        streams = streaming[h // groups]
        for r in range(q.shape[2]):
            i = first + r
            seen = [j for j in range(i + 1) if not streams or j < sinks or i - j < window]
            scores = (k[:, h // groups, seen] @ q[:, h, r, :, None]).squeeze(-1) * q.shape[-1] ** -0.5
            out[:, h, r] = (scores.softmax(-1)[..., None] * v[:, h // groups, seen]).sum(1)
    return out



def test_the_option_parses_and_bad_ones_are_clear():
    assert parse_attention("per_head:256") == PerHeadSpec(256, 4, 0.95)
    assert parse_attention("per_head:64,sinks:2,mass:0.8") == PerHeadSpec(64, 2, 0.8)
    assert parse_attention(str(PerHeadSpec(64, 2, 0.8))) == PerHeadSpec(64, 2, 0.8)
    for spec, message in (("per_head:0", "per_head must be an integer >= 1"),
                          ("per_head:8,mass:2", "mass must be a number"),
                          ("per_head:8,local:2", "unknown field 'local'")):
        with pytest.raises(AttentionSpecError, match=message):
            parse_attention(spec)


@pytest.mark.parametrize("batch, heads, kv_heads, length, streaming, window, sinks", [
    (1, 2, 2, 30, [1, 0], 5, 2), (2, 4, 2, 90, [0, 1], 16, 3), (1, 6, 3, 140, [1, 1, 1], 20, 1),
    (2, 4, 4, 70, [0, 0, 0, 0], 8, 2), (1, 4, 2, 9, [1, 0], 3, 0)])
def test_the_ops_follow_the_per_head_pattern(batch, heads, kv_heads, length, streaming, window,
                                             sinks):
    gen = fresh_generator()
    q, k, v = random_qkv(gen, batch, heads, kv_heads, length)
    want = oracle(q, k, v, streaming, window, sinks)
    for fn in (per_head_attention, cpu_per_head_attention):
        torch.testing.assert_close(fn(q, k, v, streaming, window, sinks).double(), want,
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", ["reference", "cpu"])
def test_the_split_cache_across_many_wrap_arounds(kernel):
    """Chunks through the cache give the one-shot rows; the streaming heads' ring stays at
    window + sinks slots while the full heads' cache holds every position."""
    gen = fresh_generator()
    streaming, window, sinks = [0, 1], 4, 2
    chunks = [5, 1, 1, 7, 1, 2, 1, 1, 9, 1, 1, 1]
    total = sum(chunks)
    q, k, v = random_qkv(gen, 2, 4, 2, total)
    want = oracle(q, k, v, streaming, window, sinks)
    k_full, v_full = torch.zeros(2, 1, 64, 16), torch.zeros(2, 1, 64, 16)
    k_stream, v_stream = torch.zeros(2, 1, window + sinks, 16), torch.zeros(2, 1, window + sinks, 16)
    fn = cached_per_head_attention if kernel == "reference" else cpu_cached_per_head_attention
    start = 0
    for n in chunks:
        rows = slice(start, start + n)
        got = fn(q[:, :, rows], k[:, :, rows], v[:, :, rows], k_full, v_full, k_stream, v_stream,
                 torch.tensor([start]), streaming, window, sinks)
        torch.testing.assert_close(got.double(), want[:, :, rows], rtol=1e-5, atol=1e-5)
        start += n
    torch.testing.assert_close(k_full[:, :, :total], k[:, :1])


def _per_head_eager(model, flags_per_layer, window, sinks, heads):
    """small_gpt in eager with each layer's per-head mask (one k/v head per query head)."""
    ref = copy.deepcopy(model)
    for block, flags in zip(ref.blocks, flags_per_layer):
        n = block.attn.tril.shape[-1]
        i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
        causal, pattern = j <= i, (j <= i) & ((j < sinks) | (i - j < window))
        block.attn.tril = torch.stack([pattern if flags[h] else causal for h in range(heads)])[None]
    return ref


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_a_model_streams_the_heads_measured_to_stream(backend, monkeypatch, caplog):
    """The split follows the measurement (here fixed: heads 0 and 2 keep 0.99 of their mass
    in the window); the model equals eager with those heads masked, and generation through the
    split cache equals eager's tokens."""
    gen = fresh_generator()
    model = make_model(n_layer=2).eval()
    heads = model.blocks[0].attn.n_head
    fixed = torch.tensor([0.99 if h % 2 == 0 else 0.5 for h in range(heads)], dtype=torch.float64)
    monkeypatch.setattr(attention_per_head, "window_mass", lambda *a: fixed)
    ids = torch.randint(0, 512, (2, 40), generator=gen)
    flags = [[int(h % 2 == 0) for h in range(heads)]] * 2
    ref = _per_head_eager(model, flags, 6, 2, heads)
    torch._dynamo.reset()
    options = {"kv_cache": True, "max_seq_len": 64, "backend": backend,
               "attention": "per_head:6,sinks:2,mass:0.9"}
    compiled = torch.compile(model, backend="fxforge", options=options)
    with torch.no_grad(), recording() as graphs, caplog.at_level(logging.INFO,
                                                                 "fxforge.passes.attention"):
        want_ids, want = greedy_loop(ref, ids, 8)
        got_ids, got = greedy_loop(compiled, ids, 8)
    assert torch.equal(got_ids, want_ids)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    counts = [p.counts for p in graphs[0].ir.info["passes"] if p.name == "attention_per_head"][0]
    assert counts == {"per_head_sites": 2, "dense_sites": 0,
                      "streaming_kv_heads": heads, "full_kv_heads": heads}
    (decoder,) = [g.kv for g in graphs if g.kv is not None]
    assert decoder.stats["uncached"] == 0
    (state,) = decoder.states()
    dim = model.blocks[0].attn.head_dim
    assert sorted({tuple(c.shape) for c in state.caches}) == [(2, heads // 2, 8, dim),
                                                              (2, heads // 2, 64, dim)]
    assert "streaming" in caplog.text


def test_the_measured_split_runs_as_eager_with_its_masks():
    gen = fresh_generator()
    model = make_model(n_layer=2).eval()
    heads = model.blocks[0].attn.n_head
    ids = torch.randint(0, 512, (1, 48), generator=gen)
    with recording() as graphs:
        compiled = fxforge.compile(model, (ids,), backend="cpu", attention="per_head:8,mass:0.3")
        got = compiled(ids)
    ops = [PerHeadAttention.of(n) for n in graphs[0].ir.gm.graph.nodes if PerHeadAttention.matches(n)]
    assert len(ops) == 2
    with torch.no_grad():
        want = _per_head_eager(model, [op.streaming for op in ops], 8, 4, heads)(ids)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_the_split_needs_a_calibration_longer_than_the_window(caplog):
    """Too short to measure: the graph keeps dense attention, with the reason logged."""
    model = make_model(n_layer=1).eval()
    ids = torch.randint(0, 512, (1, 20), generator=fresh_generator())
    with caplog.at_level(logging.WARNING, "fxforge.passes.attention"):
        compiled = fxforge.compile(model, (ids,), backend="cpu", attention="per_head:8")
    assert "twice window + sinks" in caplog.text and "stays dense" in caplog.text
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids), model(ids), rtol=1e-4, atol=1e-4)
