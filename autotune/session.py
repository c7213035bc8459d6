"""The tuning session kernels consult while a graph is lowered.

A kernel that has a tuning space asks :func:`choose` for its config. Outside a session (or in
mode ``off``) that is the space's default and costs nothing. Inside one:

``cache``    a valid cached config if there is one, else the default (never measures: the
             deployment mode, and how an AOT artifact's shipped tuning results are used);
``tune``     the cached config, or a search now whose result is stored (``autotune=True``);
``collect``  like ``cache``, and every missing task is remembered, so a tuning run can farm
             them out (other GPUs, a Ray cluster) before compiling again.

A cached config is used only if it is still a member of the kernel's space and passes its
pruning rule for the problem: a stale or foreign entry can cost a re-tune, never a wrong config.
One search per distinct task per session: thirty layers of the same shape are tuned once.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

from fxforge.autotune.cache import CacheKey, TuningCache
from fxforge.autotune.search import TuningError, TuningResult, search
from fxforge.autotune.task import TuningTask, make_tunable
from fxforge.kernels.tuning import Config, TuningSpace, choose, consulted, current  # noqa: F401

log = logging.getLogger("fxforge.autotune")
MODES = ("off", "cache", "tune", "collect")


@dataclass(eq=False)       # hashed by identity: one Pick per distinct task and session
class Pick:
    """One kernel's config and where it came from, for reports."""
    task: TuningTask
    config: Config
    source: str                        # "default" | "cache" | "tuned" | "failed"
    result: Optional[TuningResult] = None
    reason: str = ""
    key: Optional[CacheKey] = None     # where the config is (or would be) cached


class Session:
    def __init__(self, mode: str = "tune", cache: Optional[TuningCache] = None,
                 strategy: str = "guided", max_fraction: float = 0.25,
                 overlay: Optional[str | Path] = None,
                 on_tuned: Optional[Callable[[Pick], None]] = None):
        if mode not in MODES:
            raise ValueError(f"autotune mode must be one of {MODES}, got {mode!r}")
        self.mode, self.strategy, self.max_fraction = mode, strategy, max_fraction
        self.cache = cache if cache is not None else TuningCache()
        if overlay is not None:
            self.cache.add_overlay(overlay)
        self.on_tuned = on_tuned
        self.picks: list[Pick] = []
        self.missing: dict[TuningTask, TuningSpace] = {}
        self.keys: list[CacheKey] = []     # every key looked up: what an artifact ships
        self._memo: dict[TuningTask, Pick] = {}

    def choose(self, space: TuningSpace, task: TuningTask) -> Config:
        known = self._memo.get(task)
        if known is None:
            known = self._resolve(space, task)
            self._memo[task] = known
        self.picks.append(known)
        return known.config

    def _resolve(self, space: TuningSpace, task: TuningTask) -> Pick:
        key = CacheKey.make(space.kernel, task.source_hash, task.problem_dict, device=task.device)
        self.keys.append(key)
        pick = self._pick(space, task, key)
        pick.key = key
        return pick

    def _pick(self, space: TuningSpace, task: TuningTask, key: CacheKey) -> Pick:
        cached = self._cached(space, task, key)
        if cached is not None:
            return cached
        if self.mode != "tune":
            if self.mode == "collect":
                self.missing[task] = space
            return Pick(task, space.default, "default", reason="not in the tuning cache")
        try:
            result = search(make_tunable(task), strategy=self.strategy,
                            max_fraction=self.max_fraction)
        except TuningError as exc:
            log.warning("fxforge autotune: %s: %s; using the default config", task.label(), exc)
            return Pick(task, space.default, "failed", reason=str(exc))
        self.cache.put(key, result.to_json())
        pick = Pick(task, result.best, "tuned", result)
        log.info("fxforge autotune: %s -> %s (%.2fx over default; measured %d of %d, %d pruned, "
                 "%.1f s)", task.label(), result.describe(result.best), result.gain, result.measured,
                 result.total, result.pruned, result.seconds)
        if self.on_tuned:
            self.on_tuned(pick)
        return pick

    def _cached(self, space: TuningSpace, task: TuningTask, key: CacheKey) -> Optional[Pick]:
        record = self.cache.get(key)
        if record is None:
            return None
        try:
            config = Config.from_json(record["config"])
        except (KeyError, ValueError):
            config = None
        if config not in space.configs or space.prune(config, task.problem_dict) is not None:
            log.warning("fxforge autotune: ignoring the cached config for %s: it is not a valid "
                        "config of %s any more", task.label(), space.kernel)
            return None
        try:
            result = TuningResult.from_json(record)
        except (KeyError, ValueError, TypeError):
            result = None
        return Pick(task, config, "cache", result)

    def stats(self) -> dict:
        distinct = list(self._memo.values())
        return {source: sum(p.source == source for p in distinct)
                for source in ("default", "cache", "tuned", "failed")}


@contextlib.contextmanager
def session(mode: str = "tune", **kwargs) -> Iterator[Session]:
    """Open a tuning session for the block (sessions nest: the innermost one answers). Kernels
    find it through ``kernels/tuning.py`` (``current``, ``choose``: re-exported here)."""
    with consulted(Session(mode, **kwargs)) as active:
        yield active
