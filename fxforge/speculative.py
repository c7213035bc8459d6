"""Speculative decoding for ``fxforge.generate(..., draft=...)``.

Each round a cheap *draft* model proposes ``k`` tokens one call at a time; the target then runs
once on the sequence plus those ``k`` tokens (``k + 1`` new positions through its KV-cache step
graph) and keeps the longest run it agrees with, plus one token of its own: the one it would
have picked where it first disagrees, or a bonus token after all ``k``. Both models are driven
as ``generate`` drives any model, by the full sequence so far; the positions a round rejected
are dropped from their KV caches by the next call, whose ids share only the kept prefix
(``fxforge/kv_runtime.py`` rolls the cache back).

Greedy: a draft token is kept while it equals the target's argmax, so the tokens are exactly
those of ``generate`` without a draft. Sampling: the rejection rule of Leviathan et al. 2023 and
Chen et al. 2023 keeps draft token ``x`` with probability ``min(1, p(x) / q(x))`` and on
rejection samples ``normalize(max(0, p - q))``; ``p`` and ``q`` are the target's and the draft's
probabilities after the same temperature / top-k / top-p filtering, and every draw comes from
``generate``'s seeded generator.

A batch keeps, each round, the shortest run any unfinished row accepted. That is exact for
greedy. For sampling, every row's token at a position is distributed as the target's
conditional whether the draft's token was kept or a residual drawn (the rule's lemma, over the
fresh randomness of that position), and whether a round goes on past a position depends only
on what was drawn up to it (a stopping time): so each emitted token, given the tokens before
it, is distributed as the target's, and a row that accepted more than the batch keeps simply
emits its own accepted token at the cut (its later draws are discarded, which biases nothing).

``draft="self"`` derives the draft from the target by fxforge's own passes (``SELF_DRAFT``,
:mod:`fxforge.self_draft`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from fxforge.direct_steps import DirectSteps
from fxforge.draft_length import MAX_K, DraftLength
from fxforge.generate import (StreamCallback, _filtered, _found_logits, _GroupResult,
                              _last_logits, _TokenPicker, greedy)
from fxforge.self_draft import SELF_DRAFT, self_draft  # noqa: F401  (SELF_DRAFT: re-exported)


@dataclass
class Speculation:
    """What ``generate`` needs to run its groups speculatively, and what they counted."""

    draft: Callable[..., Any]
    description: str
    length: DraftLength
    drafted: int = 0
    accepted: int = 0
    rounds: int = 0

    def stats(self) -> dict:
        return {"rounds": self.rounds, "drafted": self.drafted, "accepted": self.accepted,
                "acceptance_rate": self.accepted / self.drafted if self.drafted else 0.0,
                "k_chosen": dict(sorted(self.length.chosen.items())), "draft": self.description}


def prepare(model: Any, draft: Any, draft_k: Any, draft_options: Optional[dict],
            example_ids: torch.Tensor) -> Speculation:
    """The checked arguments: the draft callable (derived for ``"self"``) and its length."""
    length = _draft_length(draft_k)
    if isinstance(draft, str):
        if draft != "self":
            raise ValueError(f"draft must be a logits callable or 'self', got {draft!r}")
        return Speculation(*self_draft(model, draft_options, example_ids), length)
    if draft_options is not None:
        raise ValueError("draft_options applies to draft='self' only (the options fxforge "
                         "compiles the derived draft with)")
    if not callable(draft):
        raise TypeError(f"draft must be a callable returning logits (or 'self'), got "
                        f"{type(draft).__name__}")
    return Speculation(draft, f"{type(draft).__name__} (given)", length)


def _draft_length(draft_k: Any) -> DraftLength:
    if isinstance(draft_k, DraftLength):
        return draft_k
    if draft_k == "auto":
        return DraftLength()
    if isinstance(draft_k, bool) or not isinstance(draft_k, int):
        raise TypeError(f"draft_k must be 'auto', an int or a DraftLength, got {draft_k!r}")
    if not 1 <= draft_k <= MAX_K:
        raise ValueError(f"draft_k must be in 1..{MAX_K}, got {draft_k}")
    return DraftLength(fixed=draft_k)


def run_group(model: Callable[..., Any], spec: Speculation, ids: torch.Tensor, rows: list[int],
              max_new_tokens: int, picker: _TokenPicker, stops: list[int], pad: int,
              stream: Optional[StreamCallback], direct_steps: Optional[bool]) -> _GroupResult:
    """One group of equal-length prompts, in speculative rounds (``generate``'s ``_run_group``
    semantics: stop tokens, padding, ``stream`` once per emitted token)."""
    emit = _Emitter(ids, rows, stops, pad, stream)
    target = DirectSteps(model, _found_logits, direct_steps)
    draft = DirectSteps(spec.draft, _found_logits, direct_steps)
    calls = 0
    while emit.count < max_new_tokens and not emit.done:
        k = spec.length.choose(max_new_tokens - emit.count - 1)
        drafts, q, vocab = _propose(draft, emit.ids, k, picker, emit.finished, pad, spec.length)
        start = spec.length.clock()
        logits = _verified_logits(target(torch.cat([emit.ids, drafts], dim=1)), k)
        seconds = spec.length.clock() - start
        calls += 1
        _check_vocab(logits, vocab)
        tokens, accepted = _accept(logits, drafts, q, picker, emit.finished)
        spec.length.record_round(k, seconds, accepted)
        spec.rounds += k > 0
        spec.drafted += k
        spec.accepted += accepted
        emit.tokens(tokens, max_new_tokens)
    return emit.result(calls, target.direct_calls)


def _propose(draft: DirectSteps, ids: torch.Tensor, k: int, picker: _TokenPicker,
             finished: torch.Tensor, pad: int, length: DraftLength):
    """``k`` draft tokens ``[G, k]`` (``pad`` for finished rows: the target then sees what
    the emitted sequence will hold, and its cache keeps them); when sampling, the draft's
    filtered probabilities ``[G, k, V]`` they were drawn from (else None); the draft's
    vocabulary size (None when ``k`` is 0)."""
    tokens, probs, vocab = [], [], None
    for _ in range(k):
        start = length.clock()
        logits = _last_logits(draft(torch.cat([ids, *tokens], dim=1)), ids.shape[0])
        length.record_draft(length.clock() - start)
        vocab = logits.shape[-1]
        if picker.sampling.do_sample:
            probs.append(_probabilities(logits, picker))
            token = torch.multinomial(probs[-1], 1, generator=picker.generator_for(ids.device))
        else:
            token = greedy(logits)[:, None]
        tokens.append(torch.where(finished[:, None], pad, token.to(ids.dtype)))
    drafts = torch.cat(tokens, dim=1) if tokens else ids.new_empty((ids.shape[0], 0))
    return drafts, (torch.stack(probs, dim=1) if probs else None), vocab


def _verified_logits(out: Any, k: int) -> torch.Tensor:
    """The target's logits ``[G, k + 1, V]`` at the last ``k + 1`` positions."""
    logits = _found_logits(out)
    if logits is not None and logits.dim() == 2 and k == 0:
        logits = logits[:, None]
    if logits is None or logits.dim() != 3 or logits.shape[1] < k + 1:
        raise ValueError("speculative decoding needs the target's logits at every position "
                         f"([B, T, V]); it returned {type(out).__name__} "
                         f"{tuple(logits.shape) if logits is not None else ''}")
    return logits[:, -(k + 1):]


def _check_vocab(logits: torch.Tensor, vocab: Optional[int]) -> None:
    if vocab is not None and vocab != logits.shape[-1]:
        raise ValueError(f"the draft's vocabulary ({vocab} logits) differs from the "
                         f"target's ({logits.shape[-1]}): the draft must share its tokenizer")


def _probabilities(logits: torch.Tensor, picker: _TokenPicker) -> torch.Tensor:
    """Filtered probabilities over the last dim, as ``_TokenPicker`` samples them."""
    flat = logits.reshape(-1, logits.shape[-1]).float()
    return _filtered(flat, picker.sampling).softmax(dim=-1).reshape(logits.shape)


def _accept(logits: torch.Tensor, drafts: torch.Tensor, q: Optional[torch.Tensor],
            picker: _TokenPicker, finished: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The round's tokens ``[G, a + 1]`` and ``a``, the draft tokens kept: the shortest run an
    unfinished row accepted (module docstring: why that is exact)."""
    k = drafts.shape[1]
    if not picker.sampling.do_sample:
        chosen = greedy(logits.reshape(-1, logits.shape[-1])).view(logits.shape[:2])
        accepted = _kept(drafts == chosen[:, :k], finished)
        return chosen[:, :accepted + 1].to(drafts.dtype), accepted
    p = _probabilities(logits, picker)
    generator = picker.generator_for(drafts.device)
    if k:
        p_x = p[:, :k].gather(-1, drafts[..., None])[..., 0]
        q_x = q.gather(-1, drafts[..., None])[..., 0]
        uniform = torch.rand(drafts.shape, generator=generator, device=drafts.device)
        keep = uniform * q_x < p_x   # u < p(x) / q(x), without dividing by q(x)
        accepted = _kept(keep, finished)
    else:
        keep, accepted = torch.zeros_like(drafts, dtype=torch.bool), 0
    if accepted < k:   # a row that rejected draws from the residual; one that kept, its draft
        residual = (p[:, accepted] - q[:, accepted]).clamp(min=0)
        empty = residual.sum(-1, keepdim=True) <= 0   # p == q up to rounding: p itself
        residual = torch.where(empty, p[:, accepted], residual)
        drawn = torch.multinomial(residual, 1, generator=generator)[:, 0].to(drafts.dtype)
        last = torch.where(keep[:, accepted], drafts[:, accepted], drawn)
    else:              # all kept: the bonus token from the target after the k-th
        last = torch.multinomial(p[:, k], 1, generator=generator)[:, 0].to(drafts.dtype)
    return torch.cat([drafts[:, :accepted], last[:, None]], dim=1), accepted


def _kept(agrees: torch.Tensor, finished: torch.Tensor) -> int:
    """The leading run of ``agrees`` [G, k] every unfinished row has."""
    runs = agrees.long().cumprod(dim=1).sum(dim=1)
    active = runs[~finished]
    return int(active.min()) if active.numel() else agrees.shape[1]


class _Emitter:
    """The emitted tokens of one group, one step at a time, as ``generate``'s loop emits them:
    finished rows get ``pad``, a row finishes at a stop token, ``stream`` sees every step."""

    def __init__(self, ids: torch.Tensor, rows: list[int], stops: list[int], pad: int,
                 stream: Optional[StreamCallback]):
        self.ids, self.rows, self.stops, self.pad, self.stream = ids, rows, stops, pad, stream
        self.stop_ids = torch.tensor(stops, dtype=ids.dtype, device=ids.device)
        self.finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        self.generated = torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device)
        self.count = 0
        self.done = False

    def tokens(self, tokens: torch.Tensor, limit: int) -> None:
        for column in tokens.unbind(dim=1):
            if self.count >= limit or self.done:
                return
            if self.stops:
                column = torch.where(self.finished, torch.full_like(column, self.pad), column)
                self.generated += (~self.finished).long()
                self.finished |= torch.isin(column, self.stop_ids)
            self.ids = torch.cat([self.ids, column[:, None]], dim=1)
            if self.stream is not None:
                self.stream(self.count, column, list(self.rows))
            self.count += 1
            self.done = bool(self.stops) and bool(self.finished.all())

    def result(self, calls: int, direct_calls: int) -> _GroupResult:
        counts = self.generated.tolist() if self.stops else [self.count] * self.ids.shape[0]
        return _GroupResult(self.rows, self.ids, counts, self.count, direct_calls, calls)
