"""Passes and the pass manager.

A pass is a named function ``IRGraph -> PassResult`` registered once with :func:`register_pass`.
The manager copies its input graph once and the passes rewrite that copy in place; in strict
mode (tests, ``FXFORGE_VERIFY=1``) a failing pass raises an error naming it and the ones before
it; otherwise the pipeline runs again from a new copy without it, with a logged reason.
Per-pass match counts and time are logged and kept in ``ir.info["passes"]`` where tests can
read them.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

from fxforge.errors import FxforgeError
from fxforge.irgraph import IRGraph, verify
from fxforge.irgraph.compile_profile import phase, record

log = logging.getLogger("fxforge.passes")


@dataclass
class PassResult:
    ir: IRGraph
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return any(self.counts.values())


@dataclass(frozen=True)
class Pass:
    name: str
    fn: Callable[[IRGraph], PassResult]
    doc: str = ""
    # A required pass's failure is the compile's: it is never skipped (tensor parallelism:
    # a rank that ran without it would hold the whole model and call no collective).
    required: bool = False

    def __call__(self, ir: IRGraph) -> PassResult:
        return self.fn(ir)


_REGISTRY: dict[str, Pass] = {}


def register_pass(name: str) -> Callable[[Callable[[IRGraph], PassResult]], Pass]:
    def wrap(fn: Callable[[IRGraph], PassResult]) -> Pass:
        if name in _REGISTRY:
            raise ValueError(f"pass {name!r} is already registered")
        _REGISTRY[name] = Pass(name, fn, (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else "")
        return _REGISTRY[name]
    return wrap


def get_pass(name: str) -> Pass:
    if name not in _REGISTRY:
        raise KeyError(f"unknown pass {name!r}; registered passes: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def registered_passes() -> dict[str, Pass]:
    return dict(_REGISTRY)


class PassError(RuntimeError):
    """A pass raised or produced an invalid IR (strict mode)."""


@dataclass
class PassStats:
    name: str
    counts: dict[str, int]
    seconds: float
    nodes_before: int
    nodes_after: int
    error: Optional[str] = None


def verify_enabled() -> bool:
    return os.environ.get("FXFORGE_VERIFY", "") not in ("", "0")


class PassManager:
    def __init__(self, passes: Iterable[Pass | str], verify_between: Optional[bool] = None,
                 strict: Optional[bool] = None):
        self.passes = [get_pass(p) if isinstance(p, str) else p for p in passes]
        self.verify_between = verify_enabled() if verify_between is None else verify_between
        self.strict = self.verify_between if strict is None else strict

    def run(self, ir: IRGraph) -> IRGraph:
        """A new IRGraph; ``ir`` itself, its graph and its info, are left as they were.

        The passes rewrite one copy of ``ir`` in place, one after another (a copy per pass took
        1.3 s of SmolLM2's 3 s of passes). A pass that fails (outside strict mode) may leave that
        copy half rewritten, so the undo is a replay: the pipeline starts again from a new copy
        and skips the pass. Only a failure pays for it."""
        if self.verify_between:
            verify(ir)
        failed: dict[int, PassStats] = {}
        while True:
            with phase("graph copies"):
                work = ir.copy(recompile=False)
            history: list[PassStats] = list(ir.info.get("passes", []))
            done = self._run_all(work, history, failed)
            if done is not None:
                break
        done.info["passes"] = history
        with phase("recompile"):
            done.recompile()  # passes work on an uncompiled copy: generate the module's code once
        return done

    def _run_all(self, ir: IRGraph, history: list[PassStats],
                 failed: dict[int, PassStats]) -> Optional[IRGraph]:
        """``ir`` through every pass not in ``failed``; None when one fails (it is added)."""
        for index, p in enumerate(self.passes):
            if index in failed:
                history.append(failed[index])
                continue
            result = self._run_one(p, ir, history)
            if isinstance(result, PassStats):
                failed[index] = result
                return None
            ir = result
        return ir

    def _run_one(self, p: Pass, ir: IRGraph, history: list[PassStats]) -> IRGraph | PassStats:
        """The IR after ``p`` (rewritten in place, or the pass's new one), or the failure's
        stats outside strict mode."""
        before = len(ir.gm.graph.nodes)
        start = time.perf_counter()
        try:
            result = p(ir)
            record(p.name, time.perf_counter() - start)
            result.ir.gm.graph.lint()
            if self.verify_between:
                with phase("verify"):
                    verify(result.ir)
        except Exception as exc:
            done = [s.name for s in history]
            msg = f"pass {p.name!r} failed after [{', '.join(done)}]: {type(exc).__name__}: {exc}"
            if p.required and isinstance(exc, FxforgeError):
                raise
            if self.strict or p.required:
                raise PassError(msg) from exc
            log.warning("%s; running the pipeline again from its input without it", msg)
            return PassStats(p.name, {}, time.perf_counter() - start, before, before, msg)
        stats = PassStats(p.name, result.counts, time.perf_counter() - start, before,
                          len(result.ir.gm.graph.nodes))
        result.ir.info["passes"] = history
        history.append(stats)
        log.info("pass %-16s %6.1f ms  nodes %d -> %d  %s", p.name, stats.seconds * 1e3, before,
                 stats.nodes_after, {k: v for k, v in result.counts.items() if v})
        return result.ir
