"""fxforge.generate's steps past dynamo (fxforge/direct_steps.py): taken where sound, with the
same tokens as every step through dynamo, and refused (every step through dynamo) where a
skipped call would miss something."""
import logging

import pytest
import torch

import fxforge
from fxforge.examples.small_gpt import make_model

STEPS = 12
OPTIONS = {"kv_cache": True, "max_seq_len": 64}


def _prompt(vocab=512, seed=0):
    return torch.randint(0, vocab, (1, 8), generator=torch.Generator().manual_seed(seed))


def _run(model, direct, steps=STEPS, **kwargs):
    return fxforge.generate(model, _prompt(), steps, return_stats=True, direct_steps=direct,
                            **kwargs)


TINY = {"n_layer": 1, "n_embd": 32, "n_head": 2}


@pytest.fixture(scope="module")
def gpt():
    return make_model(seed=3, **TINY)


def test_a_pure_forward_is_proven_and_gives_the_dynamo_tokens(gpt):
    compiled = torch.compile(gpt, backend="fxforge", options=OPTIONS)
    through, stats_through = _run(compiled, direct=False)
    direct, stats = _run(compiled, direct=None)
    assert stats_through["direct_steps"] == 0
    assert stats["direct_steps"] == STEPS - 3     # the prefill and two decode steps observed
    assert torch.equal(direct, through)
    with torch.no_grad():
        eager = fxforge.generate(gpt, _prompt(), STEPS)
    assert torch.equal(direct, eager)


def test_hf_models_take_it_when_vouched_for():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=2, use_cache=False)
    torch.manual_seed(11)
    model = transformers.LlamaForCausalLM(config).eval()   # returns a CausalLMOutput
    compiled = fxforge.compile(model, **OPTIONS)
    # transformers' wrappers set and reset context state in every call: not provably pure
    assert _run(compiled, direct=None)[1]["direct_steps"] == 0
    direct, stats = _run(compiled, direct=True)
    assert stats["direct_steps"] == STEPS - 3
    with torch.no_grad():
        assert torch.equal(direct, fxforge.generate(model, _prompt(), STEPS))


class _Counter(torch.nn.Module):
    """A forward with a Python side effect: dynamo replays the write after its graph."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, ids):
        self.calls += 1
        return self.inner(ids)


class _GraphBreak(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, ids):
        hidden = self.inner(ids)
        torch._dynamo.graph_break()
        return hidden * 1.0


class _BufferWrite(torch.nn.Module):
    """A buffer written in forward: aot_autograd copies the mutation back after the graph."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.register_buffer("seen", torch.zeros(()))

    def forward(self, ids):
        self.seen.add_(1.0)
        return self.inner(ids)


class _KeepsLast(torch.nn.Module):
    """A side effect no guard sees (no recompile): the output kept on the module."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.last = inner, None

    def forward(self, ids):
        out = self.inner(ids)
        self.last = out
        return out


@pytest.mark.parametrize("wrap, backend, options, vouched", [
    (_KeepsLast, "fxforge", OPTIONS, None),
    (_Counter, "fxforge", OPTIONS, True),    # recompiles at every call: caught even when vouched
    (_GraphBreak, "fxforge", OPTIONS, True),
    (_BufferWrite, "fxforge", OPTIONS, True),
    (lambda m: m, "fxforge", {}, True),      # no KV cache: nothing to step
    (lambda m: m, "eager", None, True),      # another backend: no fxforge graph to call
], ids=["side-effect", "recompiling-side-effect", "graph-break", "buffer-write",
        "no-kv-cache", "eager-backend"])
def test_refused_where_a_skipped_call_would_miss_something(gpt, caplog, wrap, backend, options,
                                                            vouched):
    model = wrap(gpt)
    kwargs = {"options": options} if options is not None else {}
    compiled = torch.compile(model, backend=backend, **kwargs)
    with caplog.at_level(logging.DEBUG, logger="fxforge"):
        out, stats = _run(compiled, direct=vouched, steps=5)
    assert stats["direct_steps"] == 0
    if isinstance(model, _Counter):
        assert model.calls == 5                  # every call ran the side effect
    if isinstance(model, _KeepsLast):
        assert model.last.shape[1] == out.shape[1] - 1   # the last call ran it
    if isinstance(model, _BufferWrite):
        assert model.seen.item() == 5.0
    with torch.no_grad():
        assert torch.equal(out, fxforge.generate(model, _prompt(), 5))
    if backend == "fxforge" and options:
        assert any("every step goes through the compiled model" in r.getMessage()
                   for r in caplog.records)


def test_bad_direct_steps_value_is_a_clear_error(gpt):
    with pytest.raises(TypeError, match="direct_steps must be None, True or False"):
        fxforge.generate(gpt, _prompt(), 2, direct_steps="yes")


def test_weights_changed_mid_generate_are_still_seen(gpt):
    """A weight written from the stream callback between direct steps: the graph's own weights
    check sees it, as a call through dynamo would."""
    def scaled(model):
        return torch.compile(model, backend="fxforge", options=OPTIONS)

    outs = {}
    for direct in (False, True):
        model = make_model(seed=3, **TINY)
        compiled = scaled(model)
        weight = next(p for name, p in model.named_parameters() if name.endswith("weight")
                      and p.dim() == 2 and "wte" not in name)

        def edit(step, tokens, rows, weight=weight):
            if step == 5:
                with torch.no_grad():
                    weight.mul_(-1.5)
        outs[direct] = _run(compiled, None if direct else False, stream=edit)
    assert outs[True][1]["direct_steps"] > 0
    assert torch.equal(outs[True][0], outs[False][0])
