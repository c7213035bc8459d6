"""How many tokens a speculative round drafts (``fxforge.generate(..., draft_k="auto")``).

A round drafts ``k`` tokens one call at a time, then the target checks them in one call of
``k + 1`` new positions. With a per-token acceptance rate ``alpha`` (each draft token accepted
independently: the usual model, Leviathan et al. 2023) a round emits on average
``(1 - alpha^(k+1)) / (1 - alpha)`` tokens and costs ``k * draft + verify(k)`` seconds, so
:class:`DraftLength` picks the ``k`` that maximises their ratio, from what it measured:

* ``alpha``: accepted draft tokens over the draft tokens the target judged (a round that
  rejects at position ``a`` judged ``a + 1``, one that accepts all ``k`` judged ``k``: the
  maximum-likelihood estimate under that model), starting from a prior worth two tokens;
* ``draft``: the median seconds of a draft call;
* ``verify(k)``: the median seconds of the target's calls with ``k`` draft tokens where ``k``
  was tried; elsewhere a least-squares line through those medians (flat through the only one
  while a single ``k`` was tried: verifying a few more positions of a memory-bound decode step
  costs little; the exploration below measures it).

Every ``EXPLORE_EVERY``-th round tries a neighbour of the best ``k`` instead (alternately one
above and one below), so a ``k`` the estimates undervalue gets measured. Times come from the
injected ``clock`` (``time.perf_counter`` by default): tests pass a fake one and never depend
on wall time. Nothing here is random: the same measurements give the same choices.
"""
from __future__ import annotations

import statistics
import time
from collections import Counter
from typing import Callable, Optional

MAX_K = 16
FIRST_K = 4          # before anything is measured
EXPLORE_EVERY = 8
PRIOR = (1.0, 2.0)   # alpha's prior: one accepted token out of two judged
MAX_ALPHA = 1.0 - 1e-6


class DraftLength:
    """The draft length of each round: fixed (``fixed``), or chosen from measurements."""

    def __init__(self, fixed: Optional[int] = None, clock: Callable[[], float] = time.perf_counter,
                 max_k: int = MAX_K):
        self.fixed, self.clock, self.max_k = fixed, clock, max_k
        self.accepted = self.judged = 0
        self.draft_seconds: list[float] = []
        self.verify_seconds: dict[int, list[float]] = {}
        self.rounds = 0
        self.chosen: Counter = Counter()   # k -> rounds that drafted k tokens

    @property
    def alpha(self) -> float:
        """The estimated chance that the target accepts one draft token."""
        return min(MAX_ALPHA, (self.accepted + PRIOR[0]) / (self.judged + PRIOR[1]))

    def choose(self, limit: int) -> int:
        """The next round's ``k``, at most ``limit`` (the tokens still to emit, less the one
        the target adds): 0 when ``limit`` is 0 (the round is a plain target step)."""
        limit = min(limit, self.max_k)
        if limit <= 0:
            return 0
        k = self.fixed if self.fixed is not None else self._best()
        return max(1, min(k, limit))

    def record_draft(self, seconds: float) -> None:
        self.draft_seconds.append(seconds)

    def record_round(self, k: int, verify_seconds: float, accepted: int) -> None:
        """A round that drafted ``k`` tokens, the target's call took ``verify_seconds`` and
        ``accepted`` of the draft tokens were kept."""
        if k == 0:
            return
        self.rounds += 1
        self.chosen[k] += 1
        self.verify_seconds.setdefault(k, []).append(verify_seconds)
        self.accepted += accepted
        self.judged += accepted + (1 if accepted < k else 0)

    def _best(self) -> int:
        if not self.draft_seconds or not self.verify_seconds:
            return FIRST_K
        best = max(range(1, self.max_k + 1), key=self.tokens_per_second)
        if self.rounds % EXPLORE_EVERY != EXPLORE_EVERY - 1:
            return best
        up = (self.rounds // EXPLORE_EVERY) % 2 == 0
        neighbour = best + 1 if (up and best < self.max_k) or best == 1 else best - 1
        return neighbour

    def tokens_per_second(self, k: int) -> float:
        """The expected tokens per second of rounds drafting ``k`` tokens."""
        alpha = self.alpha
        tokens = (1.0 - alpha ** (k + 1)) / (1.0 - alpha)
        seconds = k * statistics.median(self.draft_seconds) + self._verify(k)
        return tokens / max(seconds, 1e-12)

    def _verify(self, k: int) -> float:
        medians = {j: statistics.median(t) for j, t in self.verify_seconds.items()}
        if k in medians:
            return medians[k]
        if len(medians) == 1:
            return next(iter(medians.values()))
        mean_k = statistics.fmean(medians)
        mean_t = statistics.fmean(medians.values())
        spread = sum((j - mean_k) ** 2 for j in medians)
        slope = max(0.0, sum((j - mean_k) * (t - mean_t) for j, t in medians.items()) / spread)
        return max(0.0, mean_t + slope * (k - mean_k))
