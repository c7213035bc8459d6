"""Hugging Face generate() with its forward compiled by fxforge: same greedy tokens as eager."""
import logging

import pytest
import torch

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("cache", [None, "static"])
def test_generate_matches_eager(cache, caplog):
    config = transformers.LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 1000, (1, 8))
    kwargs = {"max_new_tokens": 12, "do_sample": False, "min_new_tokens": 12}
    if cache:
        kwargs["cache_implementation"] = cache
    with torch.no_grad():
        expected = model.generate(ids, **kwargs)
        model.forward = torch.compile(model.forward, backend="fxforge")
        with caplog.at_level(logging.INFO, logger="fxforge"):
            got = model.generate(ids, **kwargs)
    assert torch.equal(got, expected)
    assert "compiled a graph" in caplog.text
    assert "runs eagerly" not in caplog.text and "could not compile" not in caplog.text
