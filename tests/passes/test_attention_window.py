"""attention="sliding_window:W,sinks:S": the option, the ops against an oracle written from the
pattern's definition (not against dense attention), the CPU kernels, the bounded ring cache
across many wrap-arounds, and whole models against eager with the same pattern."""
import copy
import logging

import pytest
import torch

import fxforge
from fxforge.compiler import recording
from fxforge.errors import OptionsError
from fxforge.examples.small_gpt import make_model
from fxforge.irgraph.sparse_ops import block_layout
from fxforge.irgraph.window_ops import cached_positions, slot_of
from fxforge.irgraph.window_ops import visible as window_visible
from fxforge.kernels import window_attention_cpu
from fxforge.kernels.window_attention_cpu import (cpu_cached_window_attention,
                                                  cpu_window_attention)
from fxforge.passes.attention_modes import AttentionSpecError, parse_attention
from fxforge.passes.attention_window import WindowSpec
from tests.passes.helpers import fresh_generator, greedy_loop, random_qkv

window_attention = torch.ops.fxforge.window_attention
cached_window_attention = torch.ops.fxforge.cached_window_attention



def oracle(q, k, v, window, sinks, scale=None, first=0):
    """Query row r (position first + r) against keys 0..: a softmax over the keys j with
    j <= i and (j < sinks or i - j < window), one row at a time, in float64."""
    q, k, v = q.double(), k.double(), v.double()
    groups = q.shape[1] // k.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=torch.float64)
    for r in range(q.shape[2]):
        i = first + r
        seen = [j for j in range(i + 1) if j < sinks or i - j < window]
        for h in range(q.shape[1]):
            scores = (k[:, h // groups, seen] @ q[:, h, r, :, None]).squeeze(-1) * scale
            out[:, h, r] = (scores.softmax(-1)[..., None] * v[:, h // groups, seen]).sum(1)
    return out



# ---- the option --------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, want", [("sliding_window:256", WindowSpec(256, 4)),
                                        ("sliding_window:64,sinks:0", WindowSpec(64, 0)),
                                        (" sliding_window : 8 , sinks : 2 ", WindowSpec(8, 2))])
def test_the_option_parses(spec, want):
    assert parse_attention(spec) == want
    assert parse_attention(str(want)) == want


@pytest.mark.parametrize("spec, message", [
    ("sliding_window", "cannot read 'sliding_window'"),
    ("sliding_window:0", "sliding_window must be an integer >= 1"),
    ("sliding_window:8,sinks:-1", "sinks must be an integer >= 0"),
    ("sliding_window:8,sinks:two", "sinks must be an integer >= 0, got 'two'"),
    ("sinks:4", "unknown mode 'sinks'; the modes are sliding_window, block_sparse, per_head, linear"),
    ("sliding_window:8,window:8", "unknown field 'window' \\(this mode's fields: sinks\\)"),
    ("sliding_window:8;sinks:4", "cannot read"),
    ("sliding_window:8,sliding_window:9", "given twice"),
    ("", "must be a string")])
def test_bad_options_are_clear_errors(spec, message):
    with pytest.raises(AttentionSpecError, match=message):
        parse_attention(spec)
    with pytest.raises(OptionsError, match=message):
        fxforge.compile(torch.nn.Linear(4, 4), (torch.randn(2, 4),), attention=spec)


# ---- the ops and kernels against the oracle ----------------------------------------------------

@pytest.mark.parametrize("batch, heads, kv_heads, length, window, sinks", [
    (1, 2, 2, 1, 3, 1), (2, 4, 2, 19, 5, 2), (3, 6, 3, 33, 4, 0), (1, 2, 1, 12, 64, 4),
    (2, 2, 2, 40, 1, 3)])
def test_the_ops_follow_the_pattern(batch, heads, kv_heads, length, window, sinks, monkeypatch):
    gen = fresh_generator()
    q, k, v = random_qkv(gen, batch, heads, kv_heads, length)
    want = oracle(q, k, v, window, sinks)
    torch.testing.assert_close(window_attention(q, k, v, window, sinks).double(), want,
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cpu_window_attention(q, k, v, window, sinks).double(), want,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("length, window, sinks", [(150, 16, 2), (200, 64, 4), (130, 1, 0),
                                                   (300, 100, 70)])
def test_the_cpu_kernel_reads_only_the_blocks_of_the_pattern(length, window, sinks, monkeypatch):
    """The sliding window runs on the block-sparse kernel; its pattern names every block a
    query can see and no block past the window's reach."""
    gen = fresh_generator()
    q, k, v = random_qkv(gen, 2, 4, 2, length)
    monkeypatch.setattr(window_attention_cpu, "BLOCK", 16)
    pattern = window_attention_cpu.window_pattern(window, sinks, 16)
    blocks = -(-length // 16)
    layout = block_layout(pattern, blocks)
    seen = torch.zeros(blocks, blocks, dtype=torch.bool)
    pos = torch.arange(length)
    mask = window_visible(pos, pos, window, sinks)
    seen[pos[:, None] // 16, pos[None, :] // 16] |= mask     # blocks holding a visible key
    assert bool((layout | ~seen).all())                       # all of them read
    far = -(-(window - 1) // 16) + 1                          # no block beyond the reach
    assert int(layout.sum(1).max()) <= far + -(-sinks // 16)
    torch.testing.assert_close(cpu_window_attention(q, k, v, window, sinks, scale=0.3).double(),
                               oracle(q, k, v, window, sinks, scale=0.3), rtol=1e-5, atol=1e-5)


def test_the_ring_holds_the_sinks_and_the_last_window():
    window, sinks = 5, 2
    for length in range(40):
        kept = cached_positions(length, window, sinks)
        assert kept == [p for p in range(length) if p < sinks or p >= length - window]
        slots = [slot_of(p, window, sinks) for p in kept]
        assert len(set(slots)) == len(slots) and all(0 <= s < window + sinks for s in slots)


@pytest.mark.parametrize("kernel", ["reference", "cpu"])
@pytest.mark.parametrize("batch, heads, kv_heads, window, sinks, chunks", [
    (1, 2, 2, 4, 1, [1] * 30), (2, 4, 2, 3, 2, [5, 1, 1, 7, 1, 2, 9, 1, 1]),
    (1, 2, 1, 6, 0, [2, 1, 3, 1, 12, 1, 1]), (2, 2, 2, 8, 4, [3] + [1] * 40)])
def test_the_bounded_cache_across_many_wrap_arounds(kernel, batch, heads, kv_heads, window,
                                                    sinks, chunks):
    """Spans of new positions one after the other (prompt, decode steps, chunks) over a cache of
    window + sinks slots give each position's row of the pattern over the whole sequence."""
    gen = fresh_generator()
    length = sum(chunks)
    q, k, v = random_qkv(gen, batch, heads, kv_heads, length)
    want = oracle(q, k, v, window, sinks)
    k_cache = torch.full((batch, kv_heads, window + sinks, 16), float("nan"))
    v_cache = torch.full_like(k_cache, float("nan"))   # an unfilled slot read would show
    op = cpu_cached_window_attention if kernel == "cpu" else cached_window_attention
    start = 0
    for span in chunks:
        part = slice(start, start + span)
        got = op(q[:, :, part], k[:, :, part], v[:, :, part], k_cache, v_cache,
                 torch.tensor([start]), window, sinks)
        torch.testing.assert_close(got.double(), want[:, :, part], rtol=1e-5, atol=1e-5)
        start += span
    assert length > 2 * (window + sinks)   # wrapped around more than once


def test_the_decode_kernel_reads_the_length_itself_and_takes_bf16():
    """One new position through the C++ kernel: the cache length comes from the tensor (a
    replayed step passes the same tensor with a new value); bf16 caches work alike."""
    gen = fresh_generator()
    q, k, v = (t.bfloat16() for t in random_qkv(gen, 1, 4, 2, 25))
    want = oracle(q, k, v, 6, 2)
    k_cache, v_cache = (torch.zeros(1, 2, 8, 16, dtype=torch.bfloat16) for _ in range(2))
    position = torch.zeros(1, dtype=torch.int64)
    for i in range(25):
        position.fill_(i)
        got = cpu_cached_window_attention(q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1],
                                          k_cache, v_cache, position, 6, 2)
        torch.testing.assert_close(got.double(), want[:, :, i:i + 1], rtol=2e-2, atol=2e-2)


# ---- whole models --------------------------------------------------------------------------------

def _windowed_eager(model, window, sinks):
    """The same model in eager with the pattern as its attention mask (small_gpt masks with a
    registered bool buffer)."""
    ref = copy.deepcopy(model)
    for module in ref.modules():
        if hasattr(module, "tril"):
            n = module.tril.shape[-1]
            i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
            module.tril = ((j <= i) & ((j < sinks) | (i - j < window))).view(1, 1, n, n)
    return ref


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_a_model_compiled_with_the_option_matches_eager_with_the_pattern(backend):
    gen = fresh_generator()
    model = make_model(n_layer=2).eval()
    ids = torch.randint(0, 512, (2, 21), generator=gen)
    with recording() as graphs:
        compiled = fxforge.compile(model, (ids,), backend=backend, attention="sliding_window:6,sinks:2")
        got = compiled(ids)
    with torch.no_grad():
        torch.testing.assert_close(got, _windowed_eager(model, 6, 2)(ids), rtol=1e-4, atol=1e-4)
        assert (got - model(ids)).abs().max() > 1e-3   # lossy: not the dense model
    counts = [p.counts for p in graphs[0].ir.info["passes"] if p.name == "attention_window"]
    assert counts == [{"window_sites": 2, "dense_sites": 0}]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_generation_runs_past_max_seq_len_on_a_bounded_cache(backend):
    gen = fresh_generator()
    model = make_model(n_layer=2).eval()
    prompt = torch.randint(0, 512, (2, 6), generator=gen)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="fxforge", options={
        "kv_cache": True, "max_seq_len": 16, "attention": "sliding_window:5,sinks:2",
        "backend": backend})
    with torch.no_grad(), recording() as graphs:
        want_ids, want = greedy_loop(_windowed_eager(model, 5, 2), prompt, 34)
        got_ids, got = greedy_loop(compiled, prompt, 34)
    assert torch.equal(got_ids, want_ids)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    (decoder,) = [g.kv for g in graphs if g.kv is not None]
    assert decoder.stats["uncached"] == 0 and decoder.stats["steps"] == 32   # 40 > 16 tokens
    (state,) = decoder.states()
    assert {tuple(c.shape) for c in state.caches} == {(2, 4, 7, 32)}   # window + sinks slots


def test_attention_it_cannot_rewrite_stays_dense_with_a_reason(caplog):
    transformers = pytest.importorskip("transformers")
    from fxforge.examples.hf_models import LogitsOnly
    config = transformers.BertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=64)
    model = LogitsOnly(transformers.BertModel(config)).eval()
    ids = torch.randint(0, 200, (1, 9), generator=fresh_generator())
    with caplog.at_level(logging.INFO, "fxforge.passes.attention"):
        compiled = fxforge.compile(model, (ids,), backend="cpu", attention="sliding_window:4")
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids), model(ids), rtol=1e-4, atol=1e-4)
    assert "bidirectional attention (not causal)" in caplog.text
    assert "nothing rewritten" in caplog.text


def test_an_artifact_keeps_the_bounded_cache_and_runs_past_max_seq_len(tmp_path):
    gen = fresh_generator()
    model = make_model(n_layer=1).eval()
    ids = torch.randint(0, 512, (1, 8), generator=gen)
    seq = torch.export.Dim("seq", min=2, max=64)
    fxforge.aot_compile(model, (ids,), tmp_path / "win", dynamic_shapes=({1: seq},),
                        kv_cache=True, max_seq_len=16, attention="sliding_window:4,sinks:1")
    loaded = fxforge.load(tmp_path / "win")
    assert loaded.kv.plan.bounded and {c.capacity for c in loaded.kv.plan.caches} == {5}
    expected = ids
    ref = _windowed_eager(model, 4, 1)
    with torch.no_grad():
        for _ in range(20):   # 28 > max_seq_len positions
            expected = torch.cat([expected, ref(expected)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(fxforge.generate(loaded, ids, 20), expected)
    assert loaded.kv.stats["uncached"] == 0


def test_a_prompt_continued_in_a_chunk_leaves_the_decode_steps_replayed():
    """A call adding several positions to a cached sequence reads the cache length into Python
    (the chunk path of cached_window_attention): it runs as it is, and the one-position steps
    after it are still recorded and replayed."""
    gen = fresh_generator()
    model = make_model(n_layer=1).eval()
    ids = torch.randint(0, 512, (1, 40), generator=gen)
    ref = _windowed_eager(model, 6, 2)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="fxforge", options={
        "kv_cache": True, "attention": "sliding_window:6,sinks:2", "backend": "cpu"})
    with torch.no_grad(), recording() as graphs:
        for end in (8, 9, 30, *range(31, 41)):   # 21 new positions over the cached 9, then steps
            torch.testing.assert_close(compiled(ids[:, :end]), ref(ids[:, :end]),
                                       rtol=1e-4, atol=1e-4)
    (decoder,) = [g.kv for g in graphs if g.kv is not None]
    (state,) = decoder.states()
    assert state.replay.spans[1].off is None and decoder.stats["replayed"] >= 10 - 2
