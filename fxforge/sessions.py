"""Who owns a KV cache: explicit sessions, and the pool behind the transparent mode.

A compiled ``kv_cache`` graph (``fxforge/kv_runtime.py``) is shared by every caller: its lowered
graphs, packed weights and kernels are read-only. What changes from call to call -- the cached
tokens, the K/V buffers, the output buffers and the decode-step recording -- is a
:class:`~fxforge.kv_runtime.DecodeState`, and each state serves one call at a time:

* a :class:`Session` owns one state per compiled graph it runs through. Activate it with
  ``with session:`` (or pass ``session=`` to ``fxforge.generate``); calls inside the block, in
  that thread or asyncio task (the activation is a context variable), use its states. Its caches
  stay its own between blocks (a chat's next turn extends the last one from the cache) until
  :meth:`Session.close`, or until it is garbage-collected. A session keeps no compiled graph
  alive: the pool holds the states, and a graph that is dropped takes its states with it.
* without a session, the graph's :class:`StatePool` picks a state per call: the free state whose
  tokens the call extends (a longer match first) or, where the plan rolls back, one that shares
  a prefix with them longer than what it would drop, else a fresh one, else the least recently used
  free one (evicted, logged). So the plain loop just works, in any thread, and loops interleaved
  in one thread each keep their cache. The pool keeps at most ``max_sessions`` states (a compile
  option); a call that finds all of them busy runs uncached (correct, logged once).

Sessions are never refused a state: states they hold count towards ``max_sessions`` but may
exceed it while held; once handed back they are the first to be reused.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
import weakref
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

from fxforge.errors import SessionInUseError

if TYPE_CHECKING:
    import torch

    from fxforge.kv_runtime import DecodeState, IncrementalDecoder

log = logging.getLogger("fxforge")

# The sessions activated in the caller's context, innermost last: a context variable, so that
# each thread and each asyncio task (which runs in a copy of its creator's context) has its own.
_ACTIVE: contextvars.ContextVar[tuple["Session", ...]] = contextvars.ContextVar(
    "fxforge_sessions", default=())
_CALL = "a call"          # holder of a state while a transparent call uses it
_RETIRED = "retired"      # holder of a state its session handed back: reused first


def active_session() -> Optional["Session"]:
    """The session activated (``with session:``) in the caller's context, or None."""
    active = _ACTIVE.get()
    return active[-1] if active else None


class Session:
    """The decoding state of one sequence (a batch of rows), owned by its user.

    ``with session:`` makes calls in the block (in this thread or task) use its KV caches;
    a session serves one call at a time: a call while another thread's call through the same
    session runs raises :class:`~fxforge.errors.SessionInUseError` (give each thread its own).
    :attr:`stats` counts the session's calls; :meth:`close` hands its caches back to the pools.
    Blocks nest, and asyncio tasks sharing a thread each see their own blocks.

    ::

        session = fxforge.Session()
        ids = fxforge.generate(model, prompt, 64, session=session)     # a first turn
        ids = fxforge.generate(model, torch.cat([ids, next_message], 1), 64, session=session)
        with session:
            logits = model(ids)                                        # the same cache
        session.close()
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # decoder -> a weak reference to this session's state in the decoder's pool: the pool
        # holds it for as long as this session lives; a strong one would keep the graph alive
        self._states: "weakref.WeakKeyDictionary[IncrementalDecoder, weakref.ref[DecodeState]]" \
            = weakref.WeakKeyDictionary()
        self._busy: set["DecodeState"] = set()     # the states a call is using now
        self._counts: dict[str, int] = {}          # what its calls ran, over every graph

    def __enter__(self) -> "Session":
        _ACTIVE.set(_ACTIVE.get() + (self,))
        return self

    def __exit__(self, *exc: Any) -> None:
        active = _ACTIVE.get()
        if not active or active[-1] is not self:
            raise RuntimeError("fxforge.Session: leaving a `with session:` block that this "
                               "context did not enter last")
        _ACTIVE.set(active[:-1])

    @contextlib.contextmanager
    def state_for(self, decoder: "IncrementalDecoder",
                  ids: "torch.Tensor") -> Iterator[tuple["DecodeState", Optional[int]]]:
        """This session's state for ``decoder`` (taken from its pool on first use), held for
        the duration of one call, with how many leading positions of ``ids`` it holds where
        the pool just compared them (None: the call compares)."""
        with self._lock:
            mine = self._states.get(decoder)
            state, cached = (mine() if mine is not None else None), None
            if state is None:
                state, cached = decoder.pool.take(ids, holder=weakref.ref(self))
                self._states[decoder] = weakref.ref(state)
            if state in self._busy:
                raise SessionInUseError("this fxforge.Session is already running a call (from "
                                        "another thread?): give each thread its own Session")
            self._busy.add(state)
            before = dict(state.stats)
        try:
            yield state, cached
        finally:
            with self._lock:
                self._busy.discard(state)
                for key, value in _since(state, before).items():
                    self._counts[key] = self._counts.get(key, 0) + value

    @property
    def stats(self) -> dict:
        """This session's ``prefills``, ``steps``, ``positions``, ``replayed`` steps and
        ``rollbacks``, over every compiled graph it ran through: calls before a :meth:`close`,
        and calls through graphs dropped since, still count."""
        with self._lock:
            return dict(self._counts)

    def close(self) -> None:
        """Hand the caches back (their pools reuse them first); the session stays usable and
        starts over at its next call."""
        with self._lock:
            if self._busy:
                raise SessionInUseError("cannot close a fxforge.Session while a call runs in it")
            held = [(decoder, mine()) for decoder, mine in self._states.items()]
            self._states = weakref.WeakKeyDictionary()
        for decoder, state in held:
            if state is not None:
                decoder.pool.release(state, retired=True)


def _since(state: "DecodeState", baseline: dict) -> dict:
    return {key: value - baseline.get(key, 0) for key, value in state.stats.items()
            if key != "uncached"}


class StatePool:
    """The states of one decoder, least recently used first, each with its holder: None (free),
    ``_RETIRED`` (free, handed back by a session), ``_CALL`` or a weak reference to the session
    holding it (a session that was garbage-collected frees its states). ``new_state`` makes a
    state; ``cap`` is ``max_sessions``."""

    def __init__(self, new_state: Callable[[], "DecodeState"], cap: int):
        self.new_state, self.cap = new_state, cap
        self._lock = threading.Lock()
        self._holders: dict["DecodeState", Any] = {}   # insertion order: least recently used first
        self._told_busy = False

    def states(self) -> list["DecodeState"]:
        with self._lock:
            return list(self._holders)

    def checkout(self, ids: "torch.Tensor") -> Optional[tuple["DecodeState", int]]:
        """A state for one transparent call on ``ids`` and how many leading positions of ``ids``
        its cache holds (compared here: the call need not compare them again); give the state
        back with :meth:`release`. None when ``cap`` states exist and every one is busy."""
        with self._lock:
            state, cached = self._extended_by(ids)
            if state is None:
                state = self._spare(ids)
            if state is None:
                if not self._told_busy:
                    self._told_busy = True
                    log.info("fxforge: kv_cache: all %d states (max_sessions) are in use: a call "
                             "runs uncached until one is free", self.cap)
                return None
            self._hold(state, _CALL)
            return state, cached

    def take(self, ids: "torch.Tensor", holder: Any) -> tuple["DecodeState", int]:
        """A state for a session to keep: as :meth:`checkout`, but past ``cap`` when need be."""
        with self._lock:
            state, cached = self._extended_by(ids)
            if state is None:
                state = self._spare(ids)
            if state is None:
                state = self.new_state()
                log.info("fxforge: kv_cache: %d sessions hold states, more than max_sessions=%d",
                         len(self._holders) + 1, self.cap)
            self._hold(state, holder)
            return state, cached

    def release(self, state: "DecodeState", retired: bool = False) -> None:
        with self._lock:
            if state in self._holders:
                self._holders[state] = _RETIRED if retired else None
            self._trim()

    def _free(self, holder: Any) -> bool:
        return holder is None or holder is _RETIRED or (
            isinstance(holder, weakref.ref) and holder() is None)

    def _extended_by(self, ids: "torch.Tensor") -> tuple[Optional["DecodeState"], int]:
        """The free state whose cache serves the most leading positions of ``ids`` and how many
        (``DecodeState.cached_prefix``). When none does, (None, 0): every free state that could
        serve a prefix was compared, so the spare :meth:`_spare` picks holds none (the call
        starts it over, comparing nothing). A decode step's ids are a state's tokens plus one:
        states of that length are tried first, most recently used first, and the first whose
        tokens the ids extend is the best possible (a token comparison costs a few
        microseconds, and a device sync on a GPU; most states differ in batch or length and
        cost nothing). A state the ids diverge from (rolled back, where its plan allows) is
        taken only when it keeps more positions than it drops: two interleaved loops that share
        a system prompt would otherwise take each other's state at every call and compute
        everything past the shared part again each time."""
        free = [s for s, h in reversed(self._holders.items())
                if self._free(h) and s.tokens is not None and s.tokens.shape[0] == ids.shape[0]]
        compared: dict["DecodeState", int] = {}
        for state in free:
            if state.tokens.shape[1] == ids.shape[1] - 1:
                cached = compared[state] = state.cached_prefix(ids)
                if cached == state.tokens.shape[1]:
                    return state, cached
        best, longest = None, 0
        for state in free:
            held = state.tokens.shape[1]
            if held <= longest or (held >= ids.shape[1] - 1 and state.decoder.no_rollback):
                continue   # it cannot serve more than the best so far
            cached = compared[state] if state in compared else state.cached_prefix(ids)
            if cached > longest and cached > held - cached:
                best, longest = state, cached
        return best, longest

    def _spare(self, ids: "torch.Tensor") -> Optional["DecodeState"]:
        """A state for a new sequence: a retired one (its caches' batch size first: they and
        its recording are kept), else a new one below ``cap``, else the least recently used
        free one (evicted), else None."""
        free = [s for s, h in self._holders.items() if self._free(h)]
        retired = [s for s in free if self._holders[s] is not None]
        if retired:
            return next((s for s in retired if s.caches and s.caches[0].shape[0] == ids.shape[0]),
                        retired[0])
        if len(self._holders) < self.cap:
            return self.new_state()
        if not free:
            return None
        evicted = free[0]
        log.info("fxforge: kv_cache: %d states (max_sessions) live: the least recently used one "
                 "(%s tokens cached) is reused for a new sequence", len(self._holders),
                 "no" if evicted.tokens is None else list(evicted.tokens.shape))
        return evicted

    def _hold(self, state: "DecodeState", holder: Any) -> None:
        self._holders.pop(state, None)      # re-inserted last: the most recently used
        self._holders[state] = holder

    def _trim(self) -> None:
        """Drop the least recently used free states beyond ``cap``."""
        extra = len(self._holders) - self.cap
        if extra <= 0:
            return
        for state in [s for s, h in self._holders.items() if self._free(h)][:extra]:
            del self._holders[state]
