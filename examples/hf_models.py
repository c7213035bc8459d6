"""Tiny Hugging Face ``transformers`` models with random weights, built fully offline.

Every architecture is built from its config class (``AutoConfig.for_model``), so
nothing is downloaded. Sizes are tiny (hidden 64, 2 layers, 4 heads, vocab 1000)
so the whole zoo builds and runs in seconds on a laptop CPU; ``build_bench``
gives larger GPT-2 / Llama configs for timing.

Attention uses ``attn_implementation="eager"`` by default: the captured graph
then holds the explicit matmul -> softmax -> matmul pattern the compiler is
meant to optimise (``"sdpa"`` works too and can be passed as an override).
Decoders are built with ``use_cache=False`` so a forward returns only logits
and no ``DynamicCache`` object.

``LogitsOnly`` wraps any of them into a module taking positional tensors and
returning one tensor, so compilers and tests can treat the zoo uniformly.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn as nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSeq2SeqLM,
)

VOCAB = 1000
HIDDEN = 64
LAYERS = 2
HEADS = 4
KV_HEADS = 2  # grouped-query attention for llama-family models
FFN = 128
MAX_POS = 128

# Special token ids inside the tiny vocab (several configs default to ids of the
# original 32k-50k vocab, which would index out of the embedding table).
_SPECIAL = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)

_LLAMA_LIKE = dict(
    hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
    num_key_value_heads=KV_HEADS, intermediate_size=FFN, max_position_embeddings=MAX_POS,
)

# arch -> (task, config kwargs). task picks the Auto* head class.
_SPECS: dict[str, tuple[str, dict]] = {
    "gpt2": ("causal", dict(n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=FFN, n_positions=MAX_POS)),
    "llama": ("causal", dict(_LLAMA_LIKE)),
    "mistral": ("causal", dict(_LLAMA_LIKE, sliding_window=None)),
    "qwen2": ("causal", dict(_LLAMA_LIKE)),
    "qwen3": ("causal", dict(_LLAMA_LIKE, head_dim=HIDDEN // HEADS)),
    "gemma": ("causal", dict(_LLAMA_LIKE, head_dim=HIDDEN // HEADS)),
    "phi3": ("causal", dict(_LLAMA_LIKE)),
    "opt": ("causal", dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                           ffn_dim=FFN, word_embed_proj_dim=HIDDEN, max_position_embeddings=MAX_POS)),
    "gpt_neox": ("causal", dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                intermediate_size=FFN, max_position_embeddings=MAX_POS)),
    "bert": ("masked", dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                            intermediate_size=FFN, max_position_embeddings=MAX_POS)),
    "t5": ("seq2seq", dict(d_model=HIDDEN, d_kv=HIDDEN // HEADS, d_ff=FFN, num_layers=LAYERS,
                           num_decoder_layers=LAYERS, num_heads=HEADS, decoder_start_token_id=0)),
    # Extra variety: partial rotary + parallel blocks (phi), multi-query (falcon),
    # ALiBi (bloom), sliding window + logit soft-capping (gemma2), mixture of experts (mixtral).
    "phi": ("causal", dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                           intermediate_size=FFN, max_position_embeddings=MAX_POS)),
    "falcon": ("causal", dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                              max_position_embeddings=MAX_POS)),
    "bloom": ("causal", dict(hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS)),
    "gemma2": ("causal", dict(_LLAMA_LIKE, head_dim=HIDDEN // HEADS, sliding_window=8)),
    "mixtral": ("causal", dict(_LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2)),
}

ARCHITECTURES: tuple[str, ...] = tuple(_SPECS)

_AUTO = {"causal": AutoModelForCausalLM, "masked": AutoModelForMaskedLM, "seq2seq": AutoModelForSeq2SeqLM}


def task_of(arch: str) -> str:
    """``"causal"``, ``"masked"`` or ``"seq2seq"``."""
    if arch not in _SPECS:
        raise KeyError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    return _SPECS[arch][0]


def make_config(arch: str, **overrides):
    """The tiny config for ``arch``; ``overrides`` win over the defaults."""
    task = task_of(arch)
    kwargs = dict(vocab_size=VOCAB, **_SPECIAL)
    kwargs.update(_SPECS[arch][1])
    kwargs.setdefault("attn_implementation", "eager")
    if task == "causal":
        kwargs["use_cache"] = False
    kwargs.update(overrides)
    return AutoConfig.for_model(arch, **kwargs)


def build_from_config(config, seed: int = 0) -> nn.Module:
    """Instantiate the head model for ``config`` with seeded random weights, in eval mode."""
    task = task_of(config.model_type)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _AUTO[task].from_config(config, attn_implementation=config._attn_implementation)
    return model.eval()


def build(arch: str, seed: int = 0, **overrides) -> nn.Module:
    """A tiny random-weight model of ``arch`` (see ``ARCHITECTURES``), in eval mode."""
    return build_from_config(make_config(arch, **overrides), seed=seed)


def example_kwargs(arch: str, batch: int = 2, seq: int = 16, seed: int = 0, vocab_size: int = VOCAB) -> dict:
    """Keyword inputs for ``model(**kwargs)``: ``input_ids`` (+ ``decoder_input_ids`` for T5).

    Ids start at 3 so that no pad/bos/eos special token appears by accident.
    """
    task = task_of(arch)
    gen = torch.Generator().manual_seed(seed)
    kwargs = {"input_ids": torch.randint(3, vocab_size, (batch, seq), generator=gen)}
    if task == "seq2seq":
        kwargs["decoder_input_ids"] = torch.randint(3, vocab_size, (batch, max(1, seq // 2)), generator=gen)
    return kwargs


def example_inputs(arch: str, batch: int = 2, seq: int = 16, seed: int = 0, vocab_size: int = VOCAB) -> tuple:
    """Positional inputs matching ``LogitsOnly(model)``: ``(input_ids,)`` or ``(input_ids, decoder_input_ids)``."""
    return tuple(example_kwargs(arch, batch, seq, seed, vocab_size).values())


class LogitsOnly(nn.Module):
    """Adapter: positional tensor inputs in, a single tensor out.

    Hugging Face models take keyword arguments and return ``ModelOutput``
    dataclasses; compilers and tests want ``forward(*tensors) -> Tensor``. For
    encoder-decoder models the second positional input is ``decoder_input_ids``.
    Returns ``logits`` when the model has a head, else ``last_hidden_state``.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.is_seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
        # inspect.signature follows functools.wraps, unlike forward.__code__.
        self._takes_use_cache = "use_cache" in inspect.signature(model.forward).parameters

    def forward(self, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor | None = None) -> torch.Tensor:
        kwargs = {"input_ids": input_ids}
        if self.is_seq2seq:
            if decoder_input_ids is None:
                raise ValueError("encoder-decoder models need decoder_input_ids")
            kwargs["decoder_input_ids"] = decoder_input_ids
        if self._takes_use_cache:
            kwargs["use_cache"] = False
        out = self.model(**kwargs, return_dict=True)
        logits = getattr(out, "logits", None)
        return logits if logits is not None else out.last_hidden_state


# Benchmark-sized configs: big enough that matmuls dominate, small enough for a 2-core CPU.
_BENCH = {
    "gpt2": {
        "small": dict(n_embd=256, n_layer=4, n_head=4, n_inner=1024, n_positions=512, vocab_size=8192),
        "medium": dict(n_embd=512, n_layer=4, n_head=8, n_inner=2048, n_positions=1024, vocab_size=16384),
    },
    "llama": {
        "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=704, max_position_embeddings=512, vocab_size=8192),
        "medium": dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                       intermediate_size=1408, max_position_embeddings=1024, vocab_size=16384),
    },
}


def build_bench(arch: str, size: str = "small", seed: int = 0, **overrides) -> nn.Module:
    """A benchmark-sized GPT-2 or Llama (``size`` in ``"small"``, ``"medium"``), eval mode."""
    if arch not in _BENCH or size not in _BENCH[arch]:
        raise KeyError(f"no bench config for {arch!r}/{size!r}; have {sorted((a, s) for a in _BENCH for s in _BENCH[a])}")
    return build(arch, seed=seed, **{**_BENCH[arch][size], **overrides})


def bench_vocab(arch: str, size: str = "small") -> int:
    """The vocabulary size of a bench config (for drawing valid input ids)."""
    return _BENCH[arch][size]["vocab_size"]


class DecodeStep(nn.Module):
    """One KV-cached decode step as a pure function of tensors.

    ``forward(input_ids, k0, v0, k1, v1, ...)`` rebuilds a fresh ``DynamicCache``
    from the past keys/values on every call, so repeated calls see identical
    input shapes (HF's cache would otherwise grow in place) and the whole step,
    cache concatenation included, is one capturable graph. Returns the logits.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, *past_kv: torch.Tensor) -> torch.Tensor:
        from transformers import DynamicCache

        if len(past_kv) % 2:
            raise ValueError("past_kv must alternate keys and values, one pair per layer")
        cache = DynamicCache(config=self.model.config)
        for layer in range(len(past_kv) // 2):
            cache.update(past_kv[2 * layer], past_kv[2 * layer + 1], layer)
        return self.model(input_ids=input_ids, past_key_values=cache, use_cache=True).logits


@torch.no_grad()
def decode_inputs(model: nn.Module, past_len: int = 128, batch: int = 1, seed: int = 0) -> tuple:
    """Inputs for ``DecodeStep(model)``: one new token per row plus a real KV cache.

    The cache comes from running ``model`` on a random prefix of ``past_len``
    tokens, so its values are what a real decode step would see.
    """
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    prefix = torch.randint(3, vocab, (batch, past_len), generator=gen).to(device)
    token = torch.randint(3, vocab, (batch, 1), generator=gen).to(device)
    cache = model(input_ids=prefix, use_cache=True).past_key_values
    window = getattr(model.config, "sliding_window", None)
    if any(getattr(layer, "is_sliding", False) for layer in cache.layers) and window and past_len >= window:
        # A sliding layer keeps only the last window-1 tokens, so a cache rebuilt
        # from its tensors would report the wrong sequence length and positions.
        raise ValueError(f"past_len={past_len} >= sliding_window={window}: DecodeStep cannot rebuild a sliding cache")
    flat = []
    for layer in cache.layers:
        flat += [layer.keys.clone(), layer.values.clone()]
    return (token, *flat)
