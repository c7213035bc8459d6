"""Passes and the pass manager.

A pass is a named function ``IRGraph -> PassResult`` registered once with :func:`register_pass`.
The manager hands each pass its own copy of the graph, so a pass that fails leaves the previous
graph intact: in strict mode (tests, ``FXFORGE_VERIFY=1``) the error names the failing pass and
the ones before it; otherwise the pass is skipped with a logged reason. Per-pass match counts and
time are logged and kept in ``ir.info["passes"]`` where tests can read them.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

from fxforge.irgraph import IRGraph, verify

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
        """A new IRGraph; ``ir`` itself, its graph and its info, are left as they were."""
        original = ir
        history: list[PassStats] = list(ir.info.get("passes", []))
        if self.verify_between:
            verify(ir)
        for p in self.passes:
            ir = self._run_one(p, ir, history)
        if ir is original:  # no pass succeeded: still hand back a graph of its own
            ir = ir.copy(recompile=False)
        ir.info["passes"] = history
        ir.recompile()  # passes work on uncompiled copies: generate the module's code once
        return ir

    def _run_one(self, p: Pass, ir: IRGraph, history: list[PassStats]) -> IRGraph:
        before = len(ir.gm.graph.nodes)
        start = time.perf_counter()
        try:
            result = p(ir.copy(recompile=False))
            result.ir.gm.graph.lint()
            if self.verify_between:
                verify(result.ir)
        except Exception as exc:
            done = [s.name for s in history]
            msg = f"pass {p.name!r} failed after [{', '.join(done)}]: {type(exc).__name__}: {exc}"
            if self.strict:
                raise PassError(msg) from exc
            log.warning("%s; skipping it and keeping the graph from before it", msg)
            history.append(PassStats(p.name, {}, time.perf_counter() - start, before, before, msg))
            return ir
        stats = PassStats(p.name, result.counts, time.perf_counter() - start, before,
                          len(result.ir.gm.graph.nodes))
        result.ir.info["passes"] = history
        history.append(stats)
        log.info("pass %-16s %6.1f ms  nodes %d -> %d  %s", p.name, stats.seconds * 1e3, before,
                 stats.nodes_after, {k: v for k, v in result.counts.items() if v})
        return result.ir
