"""KV-cache insertion and the transparent incremental mode (``kv_cache=True``)."""
import logging

import pytest
import torch

import fxforge
from fxforge.compiler import recording
from fxforge.errors import OptionsError
from fxforge.examples.small_gpt import make_model
from fxforge.testing import assert_close_to_eager
from tests.passes.helpers import greedy_loop


def _compiled(model, **options):
    torch._dynamo.reset()
    return torch.compile(model, backend="fxforge", options={"kv_cache": True, **options})


def _decoders(graphs):
    return [g.kv for g in graphs if g.kv is not None]


def _loop_matches_eager(model, prompt, steps, **options) -> list:
    """Greedy loops, eager and compiled with ``kv_cache``: same tokens and every step's logits
    within tolerance. Returns the compiled graphs' incremental decoders."""
    with torch.no_grad(), recording() as graphs:
        want_ids, want = greedy_loop(model, prompt, steps)
        got_ids, got = greedy_loop(_compiled(model, **options), prompt, steps)
    assert torch.equal(got_ids, want_ids)
    for g, w in zip(got, want):
        assert_close_to_eager([g], [w])
    return _decoders(graphs)


@pytest.mark.parametrize("batch", [1, 3])
def test_transparent_mode_matches_eager_at_every_step(batch):
    model = make_model(n_layer=2).eval()
    prompt = torch.randint(0, 512, (batch, 5))
    (decoder,) = _loop_matches_eager(model, prompt, 34, max_seq_len=64)
    # dynamo's first graph is static (5 tokens); the dynamic one caches from the second call
    assert decoder.stats["prefills"] == 1 and decoder.stats["steps"] == 32
    assert decoder.stats["positions"] == 6 + 32        # each position computed once


def test_a_new_prompt_an_edited_prefix_and_another_batch_start_over():
    model = make_model(n_layer=1).eval()
    compiled = _compiled(model, max_seq_len=32)
    a = torch.randint(0, 512, (1, 6))
    with torch.no_grad(), recording() as graphs:
        for ids in (a, torch.cat([a, a[:, :1]], 1), torch.cat([a, a[:, :2]], 1)):
            assert_close_to_eager([compiled(ids)], [model(ids)])
        edited = torch.cat([a, a[:, :2]], 1).clone()
        edited[0, 1] = (edited[0, 1] + 1) % 512          # same length + 1, changed prefix
        cases = [torch.cat([edited, a[:, :1]], 1), torch.randint(0, 512, (1, 9)),
                 torch.randint(0, 512, (2, 9)), torch.randint(0, 512, (2, 7))]
        for ids in cases:
            assert_close_to_eager([compiled(ids)], [model(ids)])
    stats = [d.stats for d in _decoders(graphs)]      # batch 2 is another dynamo graph
    assert sum(s["steps"] for s in stats) == 1 and sum(s["prefills"] for s in stats) == 5


def test_past_max_seq_len_the_graph_runs_uncached_and_correct():
    model = make_model(n_layer=1).eval()
    prompt = torch.randint(0, 512, (1, 6))
    (decoder,) = _loop_matches_eager(model, prompt, 5, max_seq_len=8)   # 6..10 tokens
    assert decoder.stats["uncached"] == 2 and decoder.stats["steps"] == 1


def test_an_encoder_is_declined_with_a_reason_and_stays_correct(caplog):
    transformers = pytest.importorskip("transformers")
    from fxforge.examples.hf_models import LogitsOnly
    config = transformers.BertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=64)
    model = LogitsOnly(transformers.BertModel(config)).eval()
    compiled = _compiled(model)
    with torch.no_grad(), caplog.at_level(logging.INFO, "fxforge"), recording() as graphs:
        for length in (6, 7, 8):
            ids = torch.randint(0, 200, (1, length))
            assert_close_to_eager([compiled(ids)], [model(ids)])
    assert not _decoders(graphs)
    assert "kv_cache: not applied" in caplog.text


def test_the_step_graph_caches_every_attention_and_offsets_positions():
    from fxforge.passes.kv_cache import insert_kv_cache
    model = make_model(n_layer=3).eval()
    compiled = _compiled(model)
    with torch.no_grad(), recording() as graphs:
        compiled(torch.randint(0, 512, (1, 4)))
        compiled(torch.randint(0, 512, (1, 5)))
    plan = insert_kv_cache(graphs[-1].ir)
    assert plan.sites == 3 and plan.positions == 1 and len(plan.caches) == 6
    ops = [n.target for n in plan.ir.call_nodes()]
    assert torch.ops.fxforge.cached_attention.default in ops
    assert torch.ops.aten.scaled_dot_product_attention.default not in ops
    static = insert_kv_cache(graphs[0].ir)
    assert isinstance(static, str) and "static" in static


def test_max_seq_len_is_validated():
    with pytest.raises(OptionsError, match="max_seq_len"):
        fxforge.options.parse_options(kv_cache=True, max_seq_len=0)


@pytest.mark.parametrize("arch,batch", [("gpt2", 1), ("llama", 3), ("mistral", 1), ("qwen2", 3)])
def test_hf_decoders_in_transparent_mode_match_eager(arch, batch):
    """HF models with use_cache=False: their dynamic-length graph builds the causal mask from
    positions (with a packed-sequence check); the pass proves it causal and caches them."""
    pytest.importorskip("transformers")
    from fxforge.examples.hf_models import LogitsOnly, build
    model = LogitsOnly(build(arch)).eval()
    prompt = torch.randint(3, 200, (batch, 5))
    (decoder,) = _loop_matches_eager(model, prompt, 33, max_seq_len=48)
    assert decoder.stats["steps"] == 31 and decoder.stats["uncached"] == 0


def test_a_mask_that_is_not_causal_is_not_taken_for_one():
    from fxforge.passes.kv_cache import _causal_pattern
    n = 5
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    assert _causal_pattern(causal[None, None], n)
    additive = torch.zeros(n, n).masked_fill(~causal, float("-inf"))
    assert _causal_pattern(additive, n)
    assert not _causal_pattern(torch.ones(n, n, dtype=torch.bool), n)        # bidirectional
    sliding = causal & torch.ones(n, n, dtype=torch.bool).triu(-2)           # a window
    assert not _causal_pattern(sliding, n)
    assert not _causal_pattern(additive.masked_fill(~causal, -1.0), n)      # a soft bias


def test_fxforge_generate_runs_incrementally_through_the_transparent_mode():
    model = make_model(n_layer=2).eval()
    prompts = [torch.randint(0, 512, (n,)) for n in (5, 9, 7)]      # ragged: grouped by length
    with torch.no_grad(), recording() as graphs:
        want = fxforge.generate(model, prompts, 32)
        got = fxforge.generate(_compiled(model, max_seq_len=64), prompts, 32)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    stats = [d.stats for d in _decoders(graphs)]
    assert sum(s["steps"] for s in stats) >= 3 * 30       # all but the first two calls per row
