"""Speculative decoding in fxforge.generate (fxforge/speculative.py), the KV-cache rollback it
relies on (fxforge/kv_runtime.py) and the adaptive draft length (fxforge/draft_length.py)."""
import gc
import itertools
import weakref

import pytest
import torch

import fxforge
from fxforge import self_draft
from fxforge.draft_length import DraftLength
from fxforge.kv_runtime import rollback_blocker
from fxforge.testing import assert_close_to_eager

transformers = pytest.importorskip("transformers")
from fxforge.examples.hf_models import LogitsOnly, build  # noqa: E402  (needs transformers)


def prompts(batch, length, seed=0, vocab=1000):
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def compiled_with_cache(module, **options):
    """``torch.compile`` with a KV cache (dynamo makes the sequence dynamic at the 2nd length)."""
    return torch.compile(module, backend="fxforge", options={"kv_cache": True, **options})


@pytest.fixture(scope="module")
def llama():
    return LogitsOnly(build("llama")).eval()


@pytest.fixture(scope="module")
def target(llama):
    torch._dynamo.reset()
    return compiled_with_cache(llama, max_seq_len=64)


# ---------------------------------------------------------------- greedy: the same tokens

@pytest.mark.parametrize("batch", [1, 2])
def test_greedy_with_a_draft_gives_the_tokens_of_greedy_without(llama, target, batch):
    ids = prompts(batch, 6, seed=batch)
    want = fxforge.generate(target, ids, 11)
    other = LogitsOnly(build("llama", seed=1)).eval()         # a different model as draft
    for draft, k in ((other, 3), (target, 4), (llama, "auto")):
        got, stats = fxforge.generate(target, ids, 11, draft=draft, draft_k=k, return_stats=True)
        assert torch.equal(got, want), (draft, k)
        spec = stats["speculative"]
        assert 0 <= spec["accepted"] <= spec["drafted"] == sum(
            k * n for k, n in spec["k_chosen"].items())
        assert spec["acceptance_rate"] == pytest.approx(spec["accepted"] / spec["drafted"])
        if draft is not other:   # the model itself drafts: every token is accepted
            assert spec["accepted"] == spec["drafted"] and stats["steps"] < 11


def test_verify_spans_are_replayed_and_stay_exact(llama):
    """The target's k + 1 position verify calls replay from validated recordings (one per span
    length, kv_runtime.SpanReplays) and the tokens stay those of greedy decoding."""
    from fxforge.compiler import recording
    torch._dynamo.reset()
    ids = prompts(1, 6, seed=9)
    other = LogitsOnly(build("llama", seed=1)).eval()
    with recording() as graphs:
        target = compiled_with_cache(llama, max_seq_len=96)
        want = fxforge.generate(target, ids, 30)
        for _ in range(3):
            assert torch.equal(fxforge.generate(target, ids, 30, draft=other, draft_k=3), want)
    decoder = [g.kv for g in graphs if g.kv is not None][-1]
    (state,) = decoder.states()
    spans = state.replay.spans
    assert spans[4].off is None and spans[4].validated, spans[4].off
    assert decoder.stats["replayed"] > decoder.stats["steps"] // 2


def test_greedy_with_stop_tokens_ragged_prompts_and_stream(target):
    ids = prompts(2, 5, seed=7)
    reference = fxforge.generate(target, ids, 12)
    stop = int(reference[0, 5 + 2])                       # row 0 stops at its 3rd token
    other = LogitsOnly(build("llama", seed=1)).eval()
    rows = [ids[0], ids[1, :4], ids[1]]                   # two groups: lengths 5 and 4
    for extra in ({}, {"draft": other, "draft_k": 3}):
        seen = []
        out, stats = fxforge.generate(target, ids, 12, stop_tokens=stop, pad_token_id=1,
                                      return_stats=True, stream=lambda s, t, r: seen.append(s),
                                      **extra)
        listed = fxforge.generate(target, rows, 7, stop_tokens=stop, **extra)
        if not extra:
            want, want_stats, want_seen, want_listed = out, stats, seen, listed
    assert torch.equal(out, want) and seen == want_seen == list(range(out.shape[1] - 5))
    assert stats["new_tokens"] == want_stats["new_tokens"]
    assert all(torch.equal(a, b) for a, b in zip(listed, want_listed))


def test_draft_self_compiles_one_quantized_copy_and_keeps_the_tokens(llama, target):
    ids = prompts(1, 6, seed=3)
    want = fxforge.generate(target, ids, 9)
    got, stats = fxforge.generate(target, ids, 9, draft="self", draft_k=3, return_stats=True)
    assert torch.equal(got, want)
    assert "quantize=int8" in stats["speculative"]["draft"]
    (draft,) = self_draft._DRAFTS[llama].values()
    fxforge.generate(target, ids, 4, draft="self")          # reused, not compiled again
    assert list(self_draft._DRAFTS[llama].values()) == [draft]


def test_a_derived_draft_goes_with_its_module():
    module = LogitsOnly(build("llama", num_hidden_layers=1)).eval()
    fxforge.generate(module, prompts(1, 5), 3, draft="self", draft_options={})
    assert module in self_draft._DRAFTS
    gone = weakref.ref(module)
    del module
    gc.collect()
    assert gone() is None


# ---------------------------------------------------------------- the KV cache rolls back

def test_ids_that_diverge_roll_the_cache_back(tiny_gpt, tiny_gpt_artifact):
    loaded = fxforge.load(tiny_gpt_artifact)
    a = prompts(2, 9, seed=4, vocab=512)
    diverged = torch.cat([a[:, :6], prompts(2, 2, seed=5, vocab=512)], dim=1)
    with torch.no_grad(), fxforge.Session() as session:
        first = loaded(a)
        for ids in (diverged, diverged[:, :5], diverged):   # shorter: its last position again
            assert_close_to_eager([loaded(ids)], [tiny_gpt(ids)])
    # the third call extends the second: a plain step
    assert session.stats["prefills"] == 1 and session.stats["rollbacks"] == 2
    assert session.stats["positions"] == 9 + 2 + 1 + 3
    assert_close_to_eager([first], [tiny_gpt(a)])   # a view returned earlier is intact


def test_the_pool_rolls_back_a_state_only_when_it_keeps_more_than_it_drops(tiny_gpt_artifact):
    loaded = fxforge.load(tiny_gpt_artifact)
    a = prompts(1, 10, seed=6, vocab=512)
    with torch.no_grad():
        loaded(a)
        loaded(torch.cat([a[:, :8], (a[:, 8:9] + 1) % 512], dim=1))   # keeps 8 of 10: rolled back
        assert loaded.kv.stats["rollbacks"] == 1 and len(loaded.kv.states()) == 1
        loaded(torch.cat([a[:, :3], (a[:, 3:7] + 1) % 512], dim=1))   # 3 of 9: a state of its own
    assert loaded.kv.stats["prefills"] == 2 and len(loaded.kv.states()) == 2


def test_a_bounded_cache_starts_over_instead_and_speculation_stays_exact(tiny_gpt):
    torch._dynamo.reset()
    model = compiled_with_cache(tiny_gpt, attention="sliding_window:4,sinks:1", max_seq_len=32)
    from fxforge.compiler import recording
    a = prompts(1, 8, seed=8, vocab=512)
    with torch.no_grad(), recording() as graphs, fxforge.Session():
        model(a[:, :7])
        model(a)
        diverged = torch.cat([a[:, :6], a[:, :2]], dim=1)
        got = model(diverged)
    (decoder,) = [g.kv for g in graphs if g.kv is not None]
    assert "fixed number of slots" in rollback_blocker(decoder.plan)
    assert decoder.stats["rollbacks"] == 0 and decoder.stats["prefills"] == 2
    with torch.no_grad(), fxforge.Session():                # a fresh prefill of the same ids
        assert_close_to_eager([got], [model(diverged)])
    want = fxforge.generate(model, a, 7)
    assert torch.equal(fxforge.generate(model, a, 7, draft=tiny_gpt, draft_k=2), want)


# ---------------------------------------------------------------- sampling: the target's law

VOCAB = 4
TARGET = torch.tensor([[2.0, 0.5, 0.0, -1.0], [0.0, 1.5, 0.2, 0.0],
                       [-0.5, 0.0, 1.0, 1.2], [0.3, 0.3, -1.0, 1.0]])
DRAFT = torch.tensor([[-1.0, 0.0, 2.0, 0.5], [1.0, -1.0, 0.0, 0.8],
                      [1.5, 0.0, -1.0, 0.0], [0.0, 1.5, 0.5, -0.5]])   # deliberately unlike it


def table_model(table):
    """Logits [B, T, V] from a fixed table conditioned on each position's token."""
    return lambda ids: table[ids]


def exact_pairs(table):
    """P(x1, x2 | prompt token 0) under ``table``, by enumeration."""
    p = table.softmax(-1)
    return {(x1, x2): float(p[0, x1] * p[x1, x2])
            for x1, x2 in itertools.product(range(VOCAB), repeat=2)}


TV_BOUND = 0.05


def total_variation(counts, exact):
    n = sum(counts.values())
    return 0.5 * sum(abs(counts.get(x, 0) / n - p) for x, p in exact.items())


@pytest.mark.parametrize("batch, calls", [(1, 2000), (4, 500)])
def test_sampled_tokens_follow_the_target_not_the_draft(batch, calls):
    """2,000 seeded sequences of two tokens: their empirical law is within TV 0.05 of the
    target's (exact samples of the target's 16 outcomes, n = 2,000, are at TV 0.026 on
    average, 0.041 at the 99th percentile), and the draft's own law (what accepting every draft
    token would give; TV 0.78 from the target's) fails the same bound. Batch 4 checks the
    batch rule (the shortest run any row accepted)."""
    counts = {}
    prompt = torch.zeros(batch, 1, dtype=torch.long)
    for seed in range(calls):
        out = fxforge.generate(table_model(TARGET), prompt, 2, draft=table_model(DRAFT),
                               draft_k=2, temperature=1.0, seed=seed)
        for row in out[:, 1:].tolist():
            counts[tuple(row)] = counts.get(tuple(row), 0) + 1
    target, draft = exact_pairs(TARGET), exact_pairs(DRAFT)
    assert total_variation(counts, target) < TV_BOUND
    assert total_variation({x: p * 1e6 for x, p in draft.items()}, target) > TV_BOUND


def test_sampling_is_reproducible_and_leaves_the_global_rng_alone():
    """At a fixed draft length: "auto" chooses lengths from wall-clock times (which draws
    make a token then depends on the machine's load)."""
    state = torch.get_rng_state()
    runs = [fxforge.generate(table_model(TARGET), [[0], [1]], 8, draft=table_model(DRAFT),
                             draft_k=3, top_k=3, seed=5) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    assert torch.equal(torch.get_rng_state(), state)


# ---------------------------------------------------------------- adaptive draft length

class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def timed(table, clock, seconds, per_position=0.0):
    """A table model that advances ``clock`` by ``seconds`` (+ ``per_position`` per new one)."""
    seen = {"length": 0}

    def model(ids):
        clock.now += seconds + per_position * max(1, ids.shape[1] - seen["length"])
        seen["length"] = ids.shape[1]
        return table[ids]
    return model


@pytest.mark.parametrize("draft_cost, draft_table, expect", [
    (0.01, TARGET, "grows"),      # nearly free, always accepted
    (1.0, TARGET, "one"),         # as dear as the target
    (0.01, DRAFT, "one")])        # cheap but mostly rejected (greedy: argmaxes differ)
def test_the_draft_length_follows_measured_costs_and_acceptance(draft_cost, draft_table, expect):
    clock = FakeClock()
    length = DraftLength(clock=clock)
    target = timed(TARGET, clock, 1.0, per_position=0.01)
    _, stats = fxforge.generate(target, [[0]], 120, draft=timed(draft_table, clock, draft_cost),
                                draft_k=length, return_stats=True)
    chosen = stats["speculative"]["k_chosen"]
    late = max(chosen) if expect == "grows" else max(chosen, key=chosen.get)
    assert (late >= 8) if expect == "grows" else (late == 1), chosen
    again = DraftLength(clock=FakeClock())
    target2 = timed(TARGET, again.clock, 1.0, per_position=0.01)
    _, stats2 = fxforge.generate(target2, [[0]], 120, draft=timed(draft_table, again.clock,
                                                                  draft_cost),
                                 draft_k=again, return_stats=True)
    assert stats2["speculative"]["k_chosen"] == chosen    # deterministic


# ---------------------------------------------------------------- argument checks

@pytest.mark.parametrize("kwargs, error, message", [
    ({"draft": 3}, TypeError, "draft must be a callable"),
    ({"draft": "yes"}, ValueError, "draft must be a logits callable or 'self'"),
    ({"draft_k": 0}, ValueError, r"draft_k must be in 1..16"),
    ({"draft_k": 17}, ValueError, r"draft_k must be in 1..16"),
    ({"draft_k": "many"}, TypeError, "draft_k must be 'auto'"),
    ({"draft": "self"}, ValueError, "pass draft="),
    ({"draft": None, "draft_options": {}}, ValueError, "draft_k and draft_options apply"),
    ({"draft": table_model(TARGET[:, :3])}, ValueError, "vocabulary"),
    ({"draft": table_model(TARGET), "draft_options": {"quantize": "int8"}}, ValueError,
     "draft_options applies to draft='self' only"),
])
def test_bad_speculative_arguments_name_the_problem(kwargs, error, message):
    kwargs = {"draft": table_model(TARGET), **kwargs}
    with pytest.raises(error, match=message):
        fxforge.generate(table_model(TARGET), [[0]], 4, **kwargs)
