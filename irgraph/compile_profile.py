"""Where compile time goes: a per-graph record of phases, filled by every layer of the pipeline.

The backend opens a :class:`CompileProfile` for each graph it compiles (:func:`profiling`);
the layers below add to the one open in their thread: capture (dynamo's tracing, aot_autograd),
freezing, each pass and the pass manager's graph copies, the KV step, lowering, the C++ kernel
builds and cache loads, and the autotuner's measurements. ``FXFORGE_PROFILE=1`` prints each
graph's table when its compile ends; the compiled graph keeps its profile either way (``explain``
shows it). Phases nest (``lower`` contains the kernel builds and measurements it triggered):
the table shows each phase's own time and, for a phase with parts, what the parts took.

A leaf module: it imports nothing of fxforge, so kernels and autotune can record into it.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

ENV = "FXFORGE_PROFILE"
_CURRENT: contextvars.ContextVar[Optional["CompileProfile"]] = contextvars.ContextVar(
    "fxforge_compile_profile", default=None)
_OPEN: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar(
    "fxforge_compile_phases", default=())


@dataclass
class Phase:
    seconds: float = 0.0
    calls: int = 0


@dataclass
class CompileProfile:
    """Phases by path (``("lower", "kernel builds")``), in the order first seen."""
    label: str = "graph"
    phases: dict[tuple[str, ...], Phase] = field(default_factory=dict)
    total: float = 0.0
    before: float = 0.0   # time spent before the profile opened (dynamo's tracing), in total

    def add(self, path: tuple[str, ...], seconds: float, calls: int = 1) -> None:
        phase = self.phases.setdefault(path, Phase())
        phase.seconds += seconds
        phase.calls += calls

    def seconds(self, *path: str) -> float:
        """A phase's time (its parts included); 0 when it did not run."""
        phase = self.phases.get(tuple(path))
        return phase.seconds if phase else 0.0

    def table(self) -> str:
        lines = [f"fxforge compile profile: {self.label}: {self.total * 1e3:.0f} ms in all",
                 f"  {'phase':<44} {'ms':>9} {'share':>6} {'calls':>6}"]
        for path, phase in self.phases.items():
            name = "  " * (len(path) - 1) + path[-1]
            share = phase.seconds / self.total if self.total > 0 else 0.0
            lines.append(f"  {name:<44} {phase.seconds * 1e3:9.1f} {share:6.1%} {phase.calls:6d}")
        covered = sum(p.seconds for path, p in self.phases.items() if len(path) == 1)
        if self.total > 0:
            lines.append(f"  {'(not in a phase)':<44} {(self.total - covered) * 1e3:9.1f} "
                         f"{(self.total - covered) / self.total:6.1%}")
        return "\n".join(lines)


def enabled() -> bool:
    return os.environ.get(ENV, "") not in ("", "0")


def current() -> Optional[CompileProfile]:
    return _CURRENT.get()


@contextlib.contextmanager
def profiling(label: str) -> Iterator[CompileProfile]:
    """Open a profile for one graph's compile (the one already open, if any: a compile started
    inside another adds to it), print it on exit if FXFORGE_PROFILE."""
    outer = _CURRENT.get()
    if outer is not None:
        yield outer
        return
    profile = CompileProfile(label)
    token, open_token = _CURRENT.set(profile), _OPEN.set(())
    start = time.perf_counter()
    try:
        yield profile
    finally:
        profile.total = time.perf_counter() - start + profile.before
        _CURRENT.reset(token)
        _OPEN.reset(open_token)
        if enabled():
            print(profile.table(), file=sys.stderr, flush=True)


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Time the block as ``name``, inside the phase open around it (if a profile is open)."""
    profile = _CURRENT.get()
    if profile is None:
        yield
        return
    path = _OPEN.get() + (name,)
    profile.phases.setdefault(path, Phase())   # listed before the parts it contains
    token = _OPEN.set(path)
    start = time.perf_counter()
    try:
        yield
    finally:
        _OPEN.reset(token)
        profile.add(path, time.perf_counter() - start)


def record(name: str, seconds: float, calls: int = 1) -> None:
    """Add a time measured elsewhere as ``name`` inside the phase open now."""
    profile = _CURRENT.get()
    if profile is not None:
        profile.add(_OPEN.get() + (name,), seconds, calls)


def record_before(name: str, seconds: float) -> None:
    """A top-level phase that ran before the profile opened (it counts in the total)."""
    profile = _CURRENT.get()
    if profile is not None:
        profile.add((name,), seconds)
        profile.before += seconds
