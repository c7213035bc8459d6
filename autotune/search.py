"""Search a kernel's tuning space for its fastest valid config.

1. **Prune**: the space's own rule drops configs that cannot run for this problem (shared memory,
   registers, blocks larger than the problem, a path this CPU lacks), with the reason.
2. **Rank**: the tunable's cost model orders the survivors; nothing is measured yet.
3. **Measure** (``guided``): the default config and the best-ranked few first, then a local
   search: the current best's neighbours (one knob moved one step) are built — concurrently
   where the backend allows — checked against the reference, and timed interleaved with the
   current best; the search moves while a neighbour beats it by more than ``MIN_GAIN`` and
   stops at a local optimum or when ``max_fraction`` of the space has been measured.
   ``exhaustive`` measures every survivor (the yardstick the guided search is judged against).

4. **Confirm**: the default and the finalists (the candidates that came closest to the best
   timed *in the same measurement*) are re-timed together in one more interleaved measurement.
   The choice, the reported gain and the times the records (and so the plots) show for the
   finalists all come from that one measurement. Finalists that run alone but cannot be timed
   together are not confirmed, and the default stays.

Only candidates timed in one interleaved measurement are ever compared: timings taken at
different moments differ by more than the candidates do once the machine's load changes
(seen on a 2-core machine with busy neighbours: a 2-thread kernel took 15 us per call in one
measurement and 8 ms in the next, when a neighbour held the second core). Each step's timings
are kept as the ratio to that step's fastest, which is what ranks the finalists.

A candidate that gives a wrong result is disqualified; one that fails to build, runs out of
memory or raises is skipped and recorded. Time comes from ``clock`` (``time.perf_counter``
unless a test injects a simulated one; CUDA events on a GPU).
"""
from __future__ import annotations

import itertools
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from fxforge.autotune.measure import Clock, Timing, measure_interleaved
from fxforge.autotune.task import Tunable
from fxforge.kernels.tuning import Config

MIN_GAIN = 0.01          # a neighbour must be this much faster to move the search, and a
                         # confirmed config this much faster than the default to replace it
MAX_FINALISTS = 8        # candidates re-timed together in the confirmation, the default included
SMALL_SPACE = 8          # spaces this small are measured exhaustively
STRATEGIES = ("guided", "exhaustive")


class TuningError(RuntimeError):
    """Nothing valid to choose: every candidate was pruned, or the reference itself fails."""


class _NotTogether(Exception):
    """Candidates that each run alone could not be timed in one measurement."""


@dataclass
class CandidateRecord:
    config: Config
    status: str                      # ok | pruned | wrong | build_failed | oom | error
    timing: Optional[Timing] = None  # a finalist's from the confirmation, else its last step's
    reason: str = ""
    label: str = ""                  # the space's description of the config
    confirmed: bool = False          # re-timed with the other finalists: the choice's numbers
    search_median: Optional[float] = None   # a finalist's median in its last search step

    def to_json(self) -> dict:
        t = self.timing
        return {"config": self.label or self.config.describe(), "config_json": self.config.to_json(),
                "status": self.status, "reason": self.reason,
                "median_s": t.median if t else None, "p20_s": t.p20 if t else None,
                "p80_s": t.p80 if t else None, "confirmed": self.confirmed,
                "search_median_s": self.search_median}


@dataclass
class TuningResult:
    kernel: str
    label: str
    best: Config
    default: Config
    records: list[CandidateRecord]
    best_time: float
    default_time: float
    total: int                       # configs in the space
    strategy: str
    seconds: float
    extra: dict = field(default_factory=dict)

    def describe(self, config: Config) -> str:
        for record in self.records:
            if record.config == config and record.label:
                return record.label
        return config.describe()

    @property
    def measured(self) -> int:
        return sum(r.status not in ("pruned",) for r in self.records)

    @property
    def pruned(self) -> int:
        return sum(r.status == "pruned" for r in self.records)

    @property
    def gain(self) -> float:
        """The default's time over the chosen config's, both from the confirmation."""
        if not 0 < self.best_time < math.inf:
            return 1.0
        return self.default_time / self.best_time

    def to_json(self) -> dict:
        return {"kernel": self.kernel, "label": self.label, "config": self.best.to_json(),
                "best": self.describe(self.best), "default": self.describe(self.default),
                "default_config": self.default.to_json(), "best_s": self.best_time,
                "default_s": self.default_time, "total": self.total, "measured": self.measured,
                "pruned": self.pruned, "strategy": self.strategy, "seconds": self.seconds,
                "records": [r.to_json() for r in self.records], **self.extra}

    @staticmethod
    def from_json(data: dict) -> "TuningResult":
        records = [CandidateRecord(Config.from_json(r["config_json"]), r["status"],
                                   Timing(r["median_s"], r["p20_s"], r["p80_s"], 0)
                                   if r.get("median_s") is not None else None, r.get("reason", ""),
                                   r.get("config", ""), bool(r.get("confirmed", False)),
                                   r.get("search_median_s"))
                   for r in data.get("records", [])]
        return TuningResult(data["kernel"], data["label"], Config.from_json(data["config"]),
                            Config.from_json(data["default_config"]), records, data["best_s"],
                            data["default_s"], data["total"], data["strategy"], data["seconds"])


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or \
        "out of memory" in str(exc).lower()


class _Trial:
    """Builds, checks and times candidates of one tunable, keeping every outcome."""

    def __init__(self, tunable: Tunable, rounds: int, clock: Clock):
        self.tunable, self.rounds, self.clock = tunable, rounds, clock
        self.records: dict[Config, CandidateRecord] = {}
        self.runnables: dict[Config, Callable[[], Any]] = {}
        self.relative: dict[Config, float] = {}   # median over its step's fastest median
        self._seeds = itertools.count()           # each measurement its own round orders
        try:
            self.expected = tunable.reference()
        except Exception as exc:
            raise TuningError(f"{tunable.task.label()}: the default config fails: {exc}") from exc

    def _build(self, config: Config) -> None:
        try:
            runnable = self.tunable.build(config)
            why = self.tunable.check(runnable(), self.expected)
        except Exception as exc:  # a candidate's failure is recorded, never fatal
            status = "oom" if is_oom(exc) else "build_failed"
            self.records[config] = CandidateRecord(config, status, reason=_short(exc))
            return
        if why is not None:
            self.records[config] = CandidateRecord(config, "wrong", reason=why)
        else:
            self.runnables[config] = runnable

    def run(self, configs: list[Config], incumbent: Optional[Config] = None) -> list[Config]:
        """Build and check ``configs`` (new ones), then time them with ``incumbent`` in one
        measurement; returns the configs that measurement timed."""
        fresh = [c for c in configs if c not in self.records and c not in self.runnables]
        if self.tunable.parallel_build and len(fresh) > 1:
            with ThreadPoolExecutor(max_workers=min(len(fresh), 8)) as pool:
                list(pool.map(self._build, fresh))
        else:
            for config in fresh:
                self._build(config)
        timed = [c for c in fresh if c in self.runnables]
        if incumbent is not None and incumbent in self.runnables and incumbent not in timed:
            timed.append(incumbent)
        try:
            timings = self.measure(timed)
        except _NotTogether as exc:   # run alone, but never compared: kept out of the choice
            for config in timed:
                if config not in self.records:
                    self.records[config] = CandidateRecord(config, "error", reason=str(exc))
            return []
        fastest = min((t.median for t in timings.values()), default=0.0)
        for config, timing in timings.items():
            self.records[config] = CandidateRecord(config, "ok", timing)
            self.relative[config] = timing.median / fastest if fastest > 0 else 1.0
        return list(timings)

    def confirm(self, finalists: list[Config]) -> dict[Config, Timing]:
        """Re-time ``finalists`` together; their records then hold these timings. None is
        confirmed when they cannot be timed together (the choice then keeps the default)."""
        try:
            timings = self.measure(finalists)
        except _NotTogether:
            return {}
        for config, timing in timings.items():
            searched = self.records[config].timing
            self.records[config] = CandidateRecord(config, "ok", timing, confirmed=True,
                                                   search_median=searched and searched.median)
        return timings

    def measure(self, configs: list[Config]) -> dict[Config, Timing]:
        """The one timing protocol of a search, for its steps and its confirmation alike: one
        interleaved measurement of ``configs``. A candidate that raises while timed is found by
        timing each alone, recorded and dropped; the others are then timed together again.
        Raises :class:`_NotTogether` when they still cannot be (the failure needs company):
        timings taken apart are never returned, so they are never compared."""
        if not configs:
            return {}
        try:
            return self._interleaved(configs)
        except Exception as exc:
            failure = exc
        alone = {c: t for c in configs if (t := self._alone(c)) is not None}
        if len(alone) <= 1:            # one survivor: its own measurement is the only one
            return alone
        if len(alone) < len(configs):  # the culprits are dropped: time the others together
            try:
                return self._interleaved(list(alone))
            except Exception as exc:
                failure = exc
        raise _NotTogether(f"runs alone, but raised when timed together with {len(alone) - 1} "
                           f"other candidate(s): {_short(failure)}")

    def _interleaved(self, configs: list[Config]) -> dict[Config, Timing]:
        return measure_interleaved({c: self.runnables[c] for c in configs},
                                   device=self.tunable.device, rounds=self.rounds,
                                   seed=next(self._seeds), clock=self.clock)

    def _alone(self, config: Config) -> Optional[Timing]:
        try:
            return self._interleaved([config])[config]
        except Exception as exc:
            status = "oom" if is_oom(exc) else "error"
            self.records[config] = CandidateRecord(config, status, reason=_short(exc))
            self.runnables.pop(config, None)
            self.relative.pop(config, None)
            return None

    def best(self, among: list[Config]) -> Optional[Config]:
        """The fastest of ``among``: configs timed in one measurement, never across several."""
        pool = [c for c in among if c in self.records and self.records[c].status == "ok"]
        return min(pool, key=lambda c: self.records[c].timing.median, default=None)

    def median(self, config: Config) -> float:
        record = self.records.get(config)
        return record.timing.median if record and record.timing else math.inf

    def finalists(self, default: Config, incumbent: Optional[Config]) -> list[Config]:
        """The default, the search's final incumbent, then the candidates that came closest to
        the fastest of their own step (each step's winner at ratio 1)."""
        head = list(dict.fromkeys(c for c in (default, incumbent) if c in self.runnables))
        ranked = sorted((c for c in self.relative if c not in head and c in self.runnables),
                        key=self.relative.__getitem__)
        return head + ranked[:MAX_FINALISTS - len(head)]


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 300 else text[:297] + "..."


def neighbours(config: Config, pool: list[Config]) -> list[Config]:
    """For each knob and direction, the closest config in ``pool`` with that knob one value
    up or down (fewest other knobs changed)."""
    def knobs(c: Config) -> dict:
        return {**dict(c.params), "num_warps": c.num_warps, "num_stages": c.num_stages}
    mine = knobs(config)
    found: list[Config] = []
    for name in mine:
        values = sorted({knobs(c)[name] for c in pool if name in knobs(c)})
        if mine[name] not in values:
            continue
        at = values.index(mine[name])
        for step in (-1, 1):
            if not 0 <= at + step < len(values):
                continue
            wanted = values[at + step]
            options = [c for c in pool if knobs(c).get(name) == wanted]
            if options:
                distance = lambda c: sum(knobs(c).get(k) != v for k, v in mine.items())
                found.append(min(options, key=distance))
    return list(dict.fromkeys(found))


def search(tunable: Tunable, *, strategy: str = "guided", max_fraction: float = 0.25,
           rounds: int = 7, seeds: int = 2, progress: Optional[Callable[[int], None]] = None,
           clock: Clock = time.perf_counter) -> TuningResult:
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    start = clock()
    space, problem = tunable.space, tunable.problem
    kept, pruned = space.survivors(problem)
    default = space.default
    if default not in kept:
        raise TuningError(f"{tunable.task.label()}: the default config {default.describe()} is "
                          f"pruned: {pruned.get(default, 'not in the space')}")
    trial = _Trial(tunable, rounds, clock)
    ranked = sorted(kept, key=tunable.cost)
    if strategy == "exhaustive" or len(kept) <= SMALL_SPACE:
        used, incumbent = "exhaustive", None
        for at in range(0, len(ranked), 8):     # each batch timed with the best so far
            incumbent = trial.best(trial.run(ranked[at:at + 8], incumbent)) or incumbent
            if progress:
                progress(len(trial.records))
    else:
        used = "guided"
        incumbent = _guided(trial, ranked, default,
                            max(2, math.floor(max_fraction * len(space.configs))), seeds, progress)
    confirmed = trial.confirm(trial.finalists(default, incumbent))
    best = _choose(confirmed, default)
    best_time, default_time = (confirmed[c].median if c in confirmed else math.inf
                               for c in (best, default))
    records = [trial.records[c] for c in space.configs if c in trial.records]
    records += [CandidateRecord(c, "pruned", reason=r) for c, r in pruned.items()]
    for record in records:
        record.label = space.describe(record.config)
    return TuningResult(space.kernel, tunable.task.label(), best, default, records, best_time,
                        default_time, len(space.configs), used, clock() - start)


def _choose(confirmed: dict[Config, Timing], default: Config) -> Config:
    """The fastest confirmed config, unless the default is within ``MIN_GAIN`` of it (a change
    must earn its keep); the default when nothing was confirmed."""
    if not confirmed:
        return default
    fastest = min(confirmed, key=lambda c: confirmed[c].median)
    limit = confirmed[fastest].median * (1 + MIN_GAIN)
    return default if default in confirmed and confirmed[default].median <= limit else fastest


def _guided(trial: _Trial, ranked: list[Config], default: Config, budget: int, seeds: int,
            progress) -> Optional[Config]:
    """The local search; returns its final incumbent."""
    first = [default] + [c for c in ranked if c != default][:max(1, min(seeds, budget - 1))]
    incumbent = trial.best(trial.run(first))
    if progress:
        progress(len(trial.records))
    while incumbent is not None and len(trial.records) < budget:
        order = {c: i for i, c in enumerate(ranked)}
        fresh = [c for c in neighbours(incumbent, ranked) if c not in trial.records]
        fresh = sorted(fresh, key=order.__getitem__)[:budget - len(trial.records)]
        if not fresh:
            break
        trial.run(fresh, incumbent)
        if progress:
            progress(len(trial.records))
        challenger = trial.best(fresh)
        if challenger is None or trial.median(challenger) >= trial.median(incumbent) * (1 - MIN_GAIN):
            break
        incumbent = challenger
    return incumbent
