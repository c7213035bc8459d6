"""Ragged prompts through every attention mode: ``fxforge.generate`` on a batch of prompts of
different lengths (it groups rows by length: a model without an attention-mask input must not
see padding) equals, prompt by prompt, eager decoding with the mode's pattern as the mask."""
import copy

import pytest
import torch

import fxforge
from fxforge.examples.small_gpt import make_model
from tests.passes.helpers import fresh_generator

pytestmark = pytest.mark.usefixtures("fresh_measurements")



def _masked(model, allowed):
    """small_gpt in eager with ``allowed(n)`` ([n, n] or [H, n, n] bool) as its mask."""
    ref = copy.deepcopy(model)
    for module in ref.modules():
        if hasattr(module, "tril"):
            n = module.tril.shape[-1]
            mask = allowed(n)
            module.tril = mask.view(1, -1, n, n)
    return ref


def _window(window, sinks):
    def allowed(n):
        i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
        return (j <= i) & ((j < sinks) | (i - j < window))
    return allowed


def _same_block(block):
    def allowed(n):
        i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
        return (j <= i) & (i // block == j // block)
    return allowed


def _eager_greedy(ref, prompt, steps):
    ids = prompt[None]
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, ref(ids)[:, -1].argmax(-1, keepdim=True)], 1)
    return ids[0]


RAGGED = (7, 12, 7, 19)


@pytest.mark.parametrize("spec", ["sliding_window:5,sinks:2", "per_head:5,sinks:2,mass:0.0"])
def test_ragged_prompts_decode_as_each_prompt_alone(spec):
    """per_head with mass 0 streams every head: the window's pattern on every head."""
    gen = fresh_generator()
    model = make_model(n_layer=2).eval()
    prompts = [torch.randint(0, 512, (n,), generator=gen) for n in RAGGED]
    calibration = torch.randint(0, 512, (1, 40), generator=gen)   # per_head measures on it
    torch._dynamo.reset()
    compiled = fxforge.compile(model, (calibration,), dynamic=True, kv_cache=True, max_seq_len=32,
                               attention=spec, backend="cpu")
    got = fxforge.generate(compiled, prompts, 16)   # past max_seq_len: bounded caches
    ref = _masked(model, _window(5, 2))
    for prompt, tokens in zip(prompts, got):
        assert torch.equal(tokens, _eager_greedy(ref, prompt, 16))


def test_ragged_prompts_through_block_sparse_prefill():
    """Block-sparse is a prompt approximation (dense decode): each prompt alone through the
    compiled model gives the batch's tokens for it, and those tokens are eager's with the
    pattern over the prompt when the whole prompt is one prefill."""
    gen = fresh_generator()
    model = make_model(n_layer=2).eval()
    prompts = [torch.randint(0, 512, (n,), generator=gen) for n in (40, 23, 40, 35)]
    spec = "block_sparse:16,local:1,global:0,stride:0"
    torch._dynamo.reset()
    compiled = fxforge.compile(model, (prompts[0][None],), dynamic=True, kv_cache=True,
                               max_seq_len=64, backend="cpu", attention=spec)
    batch = fxforge.generate(compiled, prompts, 6)
    alone = [fxforge.generate(compiled, p[None], 6)[0] for p in prompts]
    for tokens, single in zip(batch, alone):
        assert torch.equal(tokens, single)
    first = prompts[0]
    ref = _masked(model, _same_block(16))
    with torch.no_grad():
        assert int(ref(first[None])[0, -1].argmax()) == int(batch[0][len(first)])


@pytest.mark.parametrize("spec", ["linear:elu", "linear:elu,window:4"])
def test_ragged_prompts_through_linear_attention(spec):
    """Linear attention's state is per sequence: the batch's tokens for each prompt are the
    prompt's own, decoded alone (and its caches stay bounded past max_seq_len)."""
    gen = fresh_generator()
    model = make_model(n_layer=2).eval()
    prompts = [torch.randint(0, 512, (n,), generator=gen) for n in RAGGED]
    torch._dynamo.reset()
    compiled = fxforge.compile(model, (prompts[0][None],), dynamic=True, kv_cache=True,
                               max_seq_len=24, backend="cpu", attention=spec)
    batch = fxforge.generate(compiled, prompts, 10)
    for prompt, tokens in zip(prompts, batch):
        assert torch.equal(tokens, fxforge.generate(compiled, prompt[None], 10)[0])
