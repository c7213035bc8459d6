"""attention="linear:...": the option, the ops and CPU kernels against an oracle written from the
definition (the explicit O(L^2) weights, one query row at a time, float64), the fixed-size cached
state across prefill, chunks and decode steps, the fit, and whole models (compiled, cached,
generated past max_seq_len) against eager with the same attention."""
import copy
import logging
import os
import types

import pytest
import torch

import fxforge
from fxforge.compiler import recording
from fxforge.errors import OptionsError
from fxforge.examples.small_gpt import make_model
from fxforge.kernels import linear_attention_cpu
from fxforge.kernels.linear_attention_cpu import cpu_cached_linear_attention, cpu_linear_attention
from fxforge.passes.attention_linear import DEFAULT_STEPS, LinearSpec
from fxforge.passes.attention_linear_fit import fit_site
from fxforge.passes.attention_modes import AttentionSpecError, parse_attention
from tests.passes.helpers import greedy_loop

linear_attention = torch.ops.fxforge.linear_attention
cached_linear_attention = torch.ops.fxforge.cached_linear_attention


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))


def phi(x, feature, maps, head):
    """The feature map from its definition: elu(x) + 1, or [softmax(x W), softmax(-x W)]."""
    if feature == "elu":
        return torch.where(x > 0, x + 1, x.exp())
    y = x @ maps[head].double()
    up, down = y.exp(), (-y).exp()
    return torch.cat([up / up.sum(-1, keepdim=True), down / down.sum(-1, keepdim=True)], -1)


def oracle(q, k, v, feature="elu", window=0, scale=None, q_map=None, k_map=None):
    """Row i: keys j <= i weigh exp(s_ij - max of the window's s) when i - j < window, else
    phi(q_i).phi(k_j); the output is the weighted mean of the values. float64."""
    q, k, v = q.double(), k.double(), v.double()
    groups = q.shape[1] // k.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=torch.float64)
    for h in range(q.shape[1]):
        kv = h // groups
        for i in range(q.shape[2]):
            weights = torch.zeros(q.shape[0], i + 1, dtype=torch.float64)
            recent = list(range(max(0, i - window + 1), i + 1)) if window else []
            older = list(range(0, i + 1 - window))
            if recent:
                scores = (k[:, kv, recent] @ q[:, h, i, :, None]).squeeze(-1) * scale
                weights[:, recent] = (scores - scores.max(-1, keepdim=True).values).exp()
            if older:
                weights[:, older] = (phi(k[:, kv, older], feature, k_map, kv)
                                     @ phi(q[:, h, i], feature, q_map, h)[..., None]).squeeze(-1)
            out[:, h, i] = (weights[..., None] * v[:, kv, :i + 1]).sum(1) / weights.sum(1)[:, None]
    return out


def _qkv(gen, batch, heads, kv_heads, length, dim=8):
    return (torch.randn(batch, heads, length, dim, generator=gen),
            torch.randn(batch, kv_heads, length, dim, generator=gen),
            torch.randn(batch, kv_heads, length, dim, generator=gen))


def _maps(gen, feature, heads, kv_heads, dim=8, width=5):
    if feature == "elu":
        return None, None
    return (torch.randn(heads, dim, width, generator=gen) * 0.5,
            torch.randn(kv_heads, dim, width, generator=gen) * 0.5)


# ---- the option --------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, want", [
    ("linear:elu", LinearSpec("elu")), ("linear:elu,window:16", LinearSpec("elu", 16)),
    ("linear:fitted", LinearSpec("fitted", 0, DEFAULT_STEPS)),
    (" linear : fitted , window : 8 , steps : 30 ", LinearSpec("fitted", 8, 30))])
def test_the_option_parses(spec, want):
    assert parse_attention(spec) == want
    assert parse_attention(str(want)) == want


@pytest.mark.parametrize("spec, message", [
    ("linear:relu", "the feature map must be one of elu, fitted, got 'relu'"),
    ("linear:elu,steps:10", "unknown field 'steps' \\(this mode's fields: window\\)"),
    ("linear:fitted,sinks:4", "unknown field 'sinks' \\(this mode's fields: window, steps\\)"),
    ("linear:elu,window:-1", "window must be an integer >= 0, got '-1'"),
    ("linear:fitted,steps:x", "steps must be an integer >= 0"),
    ("linear", "cannot read 'linear'")])
def test_bad_options_are_clear_errors(spec, message):
    with pytest.raises(AttentionSpecError, match=message):
        parse_attention(spec)
    with pytest.raises(OptionsError, match=message):
        fxforge.compile(torch.nn.Linear(4, 4), (torch.randn(2, 4),), attention=spec)


# ---- the ops and kernels against the oracle ----------------------------------------------------

@pytest.mark.parametrize("feature", ["elu", "fitted"])
@pytest.mark.parametrize("batch, heads, kv_heads, length, window", [
    (1, 2, 2, 1, 0), (2, 4, 2, 64, 0), (2, 4, 1, 67, 5), (3, 2, 2, 130, 1), (1, 6, 3, 23, 64)])
def test_the_ops_follow_the_definition(feature, batch, heads, kv_heads, length, window):
    gen = _generator()
    q, k, v = _qkv(gen, batch, heads, kv_heads, length)
    q_map, k_map = _maps(gen, feature, heads, kv_heads)
    want = oracle(q, k, v, feature, window, 0.4, q_map, k_map)
    for op in (linear_attention, cpu_linear_attention):
        got = op(q, k, v, feature, window, 0.4, q_map, k_map)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_the_cpu_prefill_goes_in_chunks_of_bounded_band(monkeypatch):
    """Each chunk weighs at most window + CHUNK keys explicitly: time O(L), not O(L^2)."""
    gen = _generator()
    q, k, v = _qkv(gen, 1, 2, 1, 300)
    monkeypatch.setattr(linear_attention_cpu, "CHUNK", 16)
    from fxforge.irgraph import linear_ops
    bands = []
    real = linear_ops.attention_weights
    monkeypatch.setattr(linear_ops, "attention_weights",
                        lambda q, k, *a: bands.append(k.shape[2]) or real(q, k, *a))
    got = cpu_linear_attention(q, k, v, "elu", 7)
    torch.testing.assert_close(got.double(), oracle(q, k, v, "elu", 7), rtol=1e-5, atol=1e-5)
    assert len(bands) == -(-300 // 16) and max(bands) <= 16 + 7


@pytest.mark.parametrize("kernel", ["reference", "cpu"])
@pytest.mark.parametrize("feature, batch, heads, kv_heads, window, chunks", [
    ("elu", 1, 2, 2, 0, [1] * 20), ("elu", 2, 4, 2, 3, [5, 1, 1, 7, 1, 2, 9, 1, 1]),
    ("fitted", 2, 2, 1, 4, [1, 1, 70, 1, 1, 3]), ("fitted", 1, 4, 4, 0, [13, 1, 1, 66, 1])])
def test_the_cached_state_follows_the_definition(kernel, feature, batch, heads, kv_heads, window,
                                                 chunks):
    """Spans of new positions one after the other (prompt, chunks, decode steps) over a state and
    a ring of fixed size give each position's row of the one-shot definition; the caches start
    as NaN (a reused or fresh cache is never zeroed by the runtime)."""
    gen = _generator()
    length = sum(chunks)
    q, k, v = _qkv(gen, batch, heads, kv_heads, length)
    q_map, k_map = _maps(gen, feature, heads, kv_heads)
    want = oracle(q, k, v, feature, window, None, q_map, k_map)
    features = 8 if feature == "elu" else 10
    state = torch.full((batch, kv_heads, features + 1, 9), float("nan"))
    ring = [torch.full((batch, kv_heads, window, 8), float("nan")) if window else None
            for _ in range(2)]
    op = cpu_cached_linear_attention if kernel == "cpu" else cached_linear_attention
    start = 0
    for span in chunks:
        part = slice(start, start + span)
        # a decode step may run twice (the runtime validates a replayed step so): no change
        for _ in range(2 if kernel == "cpu" and span == 1 else 1):
            got = op(q[:, :, part], k[:, :, part], v[:, :, part], state, *ring,
                     torch.tensor([start]), feature, window, None, q_map, k_map)
            torch.testing.assert_close(got.double(), want[:, :, part], rtol=1e-5, atol=1e-5)
        start += span
    assert state.shape == (batch, kv_heads, features + 1, 9)


def test_the_fit_brings_the_outputs_near_softmax_attention():
    """On attention with a clear pattern (keys near their queries score high), the fitted maps
    cut the output error of the identity start they begin from."""
    gen = _generator()
    base = torch.randn(1, 2, 96, 8, generator=gen)
    q = base + 0.3 * torch.randn(1, 2, 96, 8, generator=gen)
    k, v = base[:, :1] * 1.5, torch.randn(1, 1, 96, 8, generator=gen)
    _, start_error = fit_site(q, k, v, 0, 8 ** -0.5, steps=0)
    (q_map, k_map), error = fit_site(q, k, v, 0, 8 ** -0.5, steps=60)
    assert q_map.shape == (2, 8, 8) and k_map.shape == (1, 8, 8)
    assert error < 0.9 * start_error   # seen: 0.72-0.74 of it after 60 steps


# ---- whole models --------------------------------------------------------------------------------

def _linear_eager(model, feature, window):
    """The same model in eager with every attention computed by the oracle (elu: no maps)."""
    ref = copy.deepcopy(model)
    for module in ref.modules():
        if hasattr(module, "tril"):
            def forward(self, x):
                b, t, c = x.shape
                q, k, v = (self._heads(p(x)) for p in (self.q_proj, self.k_proj, self.v_proj))
                y = oracle(q, k, v, feature, window).float()
                return self.c_proj(y.transpose(1, 2).reshape(b, t, c))
            module.forward = types.MethodType(forward, module)
    return ref


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("spec, feature, window", [("linear:elu", "elu", 0),
                                                   ("linear:elu,window:4", "elu", 4)])
def test_a_model_compiled_with_the_option_matches_eager_with_the_definition(backend, spec,
                                                                           feature, window):
    gen = _generator()
    model = make_model(n_layer=2).eval()
    ids = torch.randint(0, 512, (2, 21), generator=gen)
    with recording() as graphs:
        compiled = fxforge.compile(model, (ids,), backend=backend, attention=spec)
        got = compiled(ids)
    with torch.no_grad():
        torch.testing.assert_close(got, _linear_eager(model, feature, window)(ids), rtol=1e-4,
                                   atol=1e-4)
        assert (got - model(ids)).abs().max() > 1e-3   # lossy: not the dense model
    counts = [p.counts for p in graphs[0].ir.info["passes"] if p.name == "attention_linear"]
    assert counts == [{"linear_sites": 2, "dense_sites": 0}]


@pytest.mark.parametrize("spec", ["linear:elu,window:3", "linear:fitted,steps:0"])
def test_generation_runs_past_max_seq_len_on_a_fixed_size_state(spec):
    """Cached generation (prefill, then decode steps on the state) gives the tokens and logits
    of the same attention compiled uncached, run on the whole sequence every step (fitted with 0
    steps: the maps are Hedgehog's start, the same whatever the calibration text)."""
    gen = _generator()
    model = make_model(n_layer=2).eval()
    prompt = torch.randint(0, 512, (2, 6), generator=gen)
    uncached = fxforge.compile(model, (prompt,), backend="cpu", attention=spec)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="fxforge", options={
        "kv_cache": True, "max_seq_len": 16, "attention": spec, "backend": "cpu"})
    with torch.no_grad(), recording() as graphs:
        got_ids, got = greedy_loop(compiled, prompt, 30)
        want_ids, want = greedy_loop(uncached, prompt, 30)
    assert torch.equal(got_ids, want_ids)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    (decoder,) = [g.kv for g in graphs if g.kv is not None]
    assert decoder.stats["uncached"] == 0 and decoder.stats["steps"] == 28   # 36 > 16 tokens
    (state,) = decoder.states()
    window = parse_attention(spec).window
    state_rows = (32 if "elu" in spec else 64) + 1   # F + the count
    shapes = {(2, 4, state_rows, 32 + 1)} | ({(2, 4, window, 32)} if window else set())
    assert {tuple(c.shape) for c in state.caches} == shapes   # fixed: state (+ ring)


def test_an_artifact_keeps_the_state_and_generates_past_max_seq_len(tmp_path):
    gen = _generator()
    model = make_model(n_layer=1).eval()
    ids = torch.randint(0, 512, (1, 8), generator=gen)
    seq = torch.export.Dim("seq", min=2, max=64)
    fxforge.aot_compile(model, (ids,), tmp_path / "lin", dynamic_shapes=({1: seq},),
                        kv_cache=True, max_seq_len=16, attention="linear:elu,window:2")
    loaded = fxforge.load(tmp_path / "lin")
    assert loaded.kv.plan.bounded and {c.capacity for c in loaded.kv.plan.caches} == {33, 2}
    expected = ids
    ref = _linear_eager(model, "elu", 2)
    with torch.no_grad():
        for _ in range(20):   # 28 > max_seq_len positions
            expected = torch.cat([expected, ref(expected)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(fxforge.generate(loaded, ids, 20), expected)
    assert loaded.kv.stats["uncached"] == 0


def test_attention_it_cannot_rewrite_stays_dense_with_a_reason(caplog):
    transformers = pytest.importorskip("transformers")
    from fxforge.examples.hf_models import LogitsOnly
    config = transformers.BertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=64)
    model = LogitsOnly(transformers.BertModel(config)).eval()
    ids = torch.randint(0, 200, (1, 9), generator=_generator())
    with caplog.at_level(logging.INFO, "fxforge.passes.attention"):
        compiled = fxforge.compile(model, (ids,), backend="cpu", attention="linear:elu")
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids), model(ids), rtol=1e-4, atol=1e-4)
    assert "bidirectional attention (not causal)" in caplog.text
    assert "nothing rewritten" in caplog.text
