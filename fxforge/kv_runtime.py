"""Transparent incremental decoding (``options={"kv_cache": True}``).

The classic loop ``logits = model(ids); ids = cat(ids, next)`` calls the compiled graph with
the whole sequence every step. A :class:`DecodeState` keeps one sequence's tokens, the
per-layer K/V buffers the KV-cache pass added and the outputs so far. When a call's tokens
*extend* the state's (same batch, the old tokens unchanged: checked, not assumed), only the new
positions run through the cached step graph. When they share only a prefix of ``p`` positions
with the state's (every row equal up to ``p``: a speculative draft's rejected tokens, an edited
reply), the state *rolls back*: positions from ``p`` on run again and overwrite the stale cache
entries, which attention never reads (it reads positions below ``L + t`` only); where ``p`` is
the whole call, its last position runs again (it writes the same keys and values). Anything
else (a new prompt, another batch size) starts the state over with a fresh prefill, and so does
every divergence on a plan that cannot roll back (:func:`rollback_blocker`). Past ``max_seq_len`` the plain
graph runs, uncached and correct; a plan whose caches are all bounded (sliding windows:
``plan.bounded``) keeps caching at any length.

Who owns a state (``fxforge/sessions.py``): the :class:`~fxforge.sessions.Session` active in the
caller's context, or else the decoder's pool, which hands each call the state whose tokens the
call extends, or shares the longest prefix with where it rolls back (so loops interleaved in one thread, or running in several threads, each keep
their own cache), a fresh one, or the least recently used one, up to ``max_sessions`` states.
A state serves one call at a time; what every state shares (the lowered graphs, their packed
weights and kernels) is read-only.

Sequence outputs (logits) are written into a buffer of ``max_seq_len`` positions (doubled when a
bounded plan runs past it) and returned as a view of the first ``L + t``: a step costs the new
positions only. A fresh buffer is made
for every new prompt, so a view returned earlier is never overwritten.
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Optional, Sequence

import torch

from fxforge.draft_length import MAX_K
from fxforge.irgraph.collectives import has_collectives
from fxforge.irgraph.meta import META_KEY, SymMeta
from fxforge.options import CompileOptions
from fxforge.sessions import StatePool, active_session

log = logging.getLogger("fxforge")

# Where decode steps can be replayed, (backend, device type) -> recording class name in
# kernels/replay.py: the CPU backend's every kernel launch goes through ``kernels.replay.launch``
# (recorded launches); the Triton backend's steps on a GPU are captured as CUDA graphs (its kernels
# read the cache length on the device: no host sync).
RECORDERS = {("cpu", "cpu"): "Recording", ("triton", "cuda"): "CudaGraphRecording"}
# The longest span of new positions a recording is made for: a speculative round's k + 1
MAX_REPLAY_SPAN = MAX_K + 1
# what a decoder counts; ``rollbacks``: of the ``steps``, those that first dropped cached positions
STATS = ("prefills", "steps", "uncached", "positions", "replayed", "rollbacks")


class IncrementalDecoder:
    """What every sequence of one compiled graph shares: the plan, the lowered step graph and the
    plain one (read-only), the pool of :class:`DecodeState`, and the counts over all of them."""

    def __init__(self, plan, step: Callable, full: Callable, max_seq_len: int,
                 replay: bool = False, max_sessions: int = CompileOptions.max_sessions):
        """``step``/``full``: the lowered step graph and the plain one; ``replay``: replay decode
        steps where that is sound (``RECORDERS``; elsewhere the option has no effect);
        ``max_sessions``: the pool's cap on live states (``fxforge/sessions.py``)."""
        self.plan, self.step, self.full, self.max_seq_len = plan, step, full, max_seq_len
        self.backend = getattr(step, "backend", None)
        self.no_rollback = rollback_blocker(plan)   # None: a diverging call may roll back
        # A replay copies each recorded op's result as the op returns; a collective's result
        # is complete only at its wait, and every rank must run the same steps: not replayed.
        self.replay = replay and self.backend in {b for b, _ in RECORDERS} \
            and not has_collectives(plan.ir.gm)
        placeholders = plan.ir.placeholders()[:_original_inputs(plan)]
        self.size_inputs = [i for i, p in enumerate(placeholders)
                            if isinstance(p.meta.get(META_KEY), SymMeta)
                            and p.meta[META_KEY].expr == plan.seq_symbol]
        self.pool = StatePool(lambda: DecodeState(self), max_sessions)
        self._counts = dict.fromkeys(STATS, 0)
        self._counts_lock = threading.Lock()

    @property
    def stats(self) -> dict:
        """Calls and positions over every state, evicted ones included: ``prefills`` and
        ``steps`` (calls that started a sequence / extended one), ``uncached`` (calls past
        ``max_seq_len``, or while every state was busy), ``positions`` run through the step
        graph, ``replayed`` steps, ``rollbacks`` (steps that dropped cached positions first)."""
        with self._counts_lock:
            return dict(self._counts)

    def count(self, counts: dict) -> None:
        with self._counts_lock:
            for key, value in counts.items():
                self._counts[key] += value

    def states(self) -> list["DecodeState"]:
        """The live states, least recently used first (for tests and reports)."""
        return self.pool.states()

    def __call__(self, args: Sequence[Any]) -> list:
        ids = args[self.plan.tokens]
        session = active_session()
        if ids.shape[1] <= self.max_seq_len or self.plan.bounded:
            if session is not None:
                with session.state_for(self, ids) as (state, cached):
                    return state(args, cached)
            found = self.pool.checkout(ids)
            if found is not None:
                state, cached = found
                try:
                    return state(args, cached)
                finally:
                    self.pool.release(state)
        self.count({"uncached": 1})
        return list(self.full(*args))


class DecodeState:
    """One sequence's KV cache for one decoder: the tokens its caches hold, the per-layer K/V
    buffers, the sequence outputs so far and the decode-step recording. One call at a time uses
    it (its holder, a session or a pool checkout, sees to that)."""

    def __init__(self, decoder: IncrementalDecoder):
        self.decoder = decoder
        self.replay = SpanReplays(len(decoder.plan.caches), decoder.backend) \
            if decoder.replay else None
        self.tokens: Optional[torch.Tensor] = None   # what the cache holds
        self.caches: list[torch.Tensor] = []
        self.buffers: dict[int, torch.Tensor] = {}
        self.stats = dict.fromkeys(STATS, 0)

    def __call__(self, args: Sequence[Any], start: Optional[int] = None) -> list:
        """One call; ``start``: how many leading positions of its tokens the cache holds, where
        the caller just compared them (the pool does: a comparison costs a few microseconds,
        and a device sync on a GPU), else None and they are compared here."""
        decoder, counts = self.decoder, dict.fromkeys(STATS, 0)
        ids = args[decoder.plan.tokens]
        if start is None:
            start = self.cached_prefix(ids)
        published = 0 if self.tokens is None else self.tokens.shape[1]   # what views show
        if start == 0:
            self._reset(ids)
        elif start < published:
            counts["rollbacks"] += 1
            # entries from ``start`` on are overwritten below: a step that fails half-way leaves
            # only the first ``start`` tokens' entries intact
            self.tokens = self.tokens[:, :start]
        counts["steps" if start else "prefills"] += 1
        new = ids[:, start:]
        step_args = list(args)
        step_args[decoder.plan.tokens] = new
        for i in decoder.size_inputs:
            step_args[i] = new.shape[1]
        position = torch.tensor([start], dtype=torch.int64, device=ids.device)
        step_args += [position, *self.caches]
        try:
            if self.replay is not None and start > 0 and new.shape[1] <= MAX_REPLAY_SPAN:
                # decode steps and speculative verify spans (a step after a rollback is one too:
                # the recording reads its position from the input); a longer span (a prompt
                # continued in chunks) runs as it is
                outputs = self.replay(decoder.step, step_args, decoder.plan.seq_outputs, counts,
                                      new.shape[1])
            else:
                outputs = list(decoder.step(*step_args))
            self.tokens = ids.clone()
            counts["positions"] += new.shape[1]
            return [self._assemble(i, out, start, ids.shape[1], published)
                    for i, out in enumerate(outputs)]
        finally:
            for key, value in counts.items():
                self.stats[key] += value
            decoder.count(counts)

    def cached_prefix(self, ids: torch.Tensor) -> int:
        """How many leading positions of ``ids`` the cache holds and the call need not run again
        (0: start over): all of the state's tokens where ``ids`` extend them; else, where the
        plan can roll back, the prefix every row shares with them (all of ``ids`` but the last
        position at most: a call runs one position at least)."""
        old = self.tokens
        if old is None or ids.shape[0] != old.shape[0] or ids.device != old.device:
            return 0
        if ids.shape[1] > old.shape[1] and torch.equal(ids[:, :old.shape[1]], old):
            return old.shape[1]
        if self.decoder.no_rollback is not None:
            return 0
        return min(common_prefix(ids, old), ids.shape[1] - 1)

    @property
    def cache_bytes(self) -> int:
        """Bytes of this state's cache buffers (an int8 cache's scales included)."""
        return sum(t.numel() * t.element_size() for t in self.caches)

    def _reset(self, ids: torch.Tensor) -> None:
        """A new prompt: the caches of the same batch size and device are kept (attention reads
        positions below L + t only, so neither stale entries nor fresh memory are ever seen:
        no zeroing, which cost a 30-layer model ~70 ms, and a decode-step recording over these
        caches stays valid); otherwise new ones. The old tokens are dropped first: a prefill
        that fails half-way has overwritten their cache entries."""
        self.tokens = None
        batch = ids.shape[0]
        if not self.caches or self.caches[0].shape[0] != batch or self.caches[0].device != ids.device:
            if self.replay is not None:
                self.replay.forget()   # it points into the old caches
            self.caches = allocate_caches(self.decoder.plan, batch, self.decoder.max_seq_len,
                                          ids.device)
        self.buffers = {}

    def _assemble(self, index: int, out: Any, start: int, end: int, published: int) -> Any:
        """``out`` (the new positions) written after the first ``start`` positions of the
        output's buffer, and the first ``end`` returned. A rollback (``start`` below the
        ``published`` positions earlier views show) writes into a new buffer holding a copy of
        the first ``start``: a view returned earlier is never overwritten (copying them costs
        ``start`` positions; a speculative round does it once)."""
        if index not in self.decoder.plan.seq_outputs or not isinstance(out, torch.Tensor):
            return out
        buffer = self.buffers.get(index)
        if buffer is None or buffer.shape[1] < end or start < published:
            size = max(self.decoder.max_seq_len, end)
            if buffer is not None:   # past max_seq_len (bounded caches): grow
                size = max(size, buffer.shape[1] * (2 if buffer.shape[1] < end else 1))
            fresh = out.new_empty((out.shape[0], size, *out.shape[2:]))
            if buffer is not None:
                fresh[:, :start].copy_(buffer[:, :start])
            buffer = self.buffers[index] = fresh
        buffer[:, start:end].copy_(out)
        return buffer[:, :end]


def common_prefix(ids: torch.Tensor, old: torch.Tensor) -> int:
    """How many leading positions ``ids`` and ``old`` (same batch) hold equal in every row."""
    n = min(ids.shape[1], old.shape[1])
    differs = (ids[:, :n] != old[:, :n]).any(dim=0)
    return int(differs.int().argmax()) if bool(differs.any()) else n


def rollback_blocker(plan) -> Optional[str]:
    """None where a call whose tokens diverge from a state's after ``p`` positions may keep the
    first ``p`` positions' cache entries and overwrite the rest; else why not. Only caches of
    ``max_seq_len`` positions indexed by position allow that: a bounded cache (a sliding
    window's or a per-head streaming ring, ``spec.capacity``) has already overwritten the
    slots of positions before ``p`` with those after it, and a linear-attention state sums
    every position into a fixed buffer that cannot give one back. Decided once per plan."""
    bounded = [c.placeholder for c in plan.caches if c.capacity is not None]
    if bounded:
        return (f"its caches {', '.join(bounded[:3])} have a fixed number of slots (a ring or "
                "a running state): entries before the divergence are already overwritten")
    return None


def allocate_caches(plan, batch: int, max_seq_len: int, device) -> list[torch.Tensor]:
    """Fresh (uninitialised) buffers for ``plan.caches``: K/V of the model's dtype or int8, and
    an int8 cache's scales (``CacheSpec``, passes/kv_cache.py)."""
    return [torch.empty(batch, spec.heads, spec.capacity or max_seq_len, spec.head_dim,
                        dtype=spec.dtype, device=device) for spec in plan.caches]


def reference_prefill(plan, args: Sequence[Any], max_seq_len: int) -> list:
    """The step graph's own meaning for ``args`` as a prefill (fresh caches, its ops' reference
    implementations): what a lossy cache (``kv_cache_dtype="int8"``) is checked against, since
    the plain graph knows nothing of the cache's rounding."""
    ids = args[plan.tokens]
    caches = allocate_caches(plan, ids.shape[0], max_seq_len, ids.device)
    position = torch.zeros(1, dtype=torch.int64, device=ids.device)
    return list(plan.ir.gm(*args, position, *caches))


def _original_inputs(plan) -> int:
    return len(plan.ir.placeholders()) - 1 - len(plan.caches)


def describe(plan) -> str:
    return (f"KV cache: {plan.sites} causal attention site(s) cached, {plan.positions} position "
            f"input(s) offset, {len(plan.caches)} buffers")


class SpanReplays:
    """A :class:`StepReplay` per number of new positions: one-token decode steps, and the spans
    of ``k + 1`` positions a speculative target verifies (and a draft catches up on) each round.
    A span other than one token is recorded from its second call, so a length seen once (a
    short chat turn) never pays for a recording. Each length records, validates and turns off
    on its own: a span whose path reads the cache length into Python keeps one-token steps
    replayed."""

    def __init__(self, n_caches: int, backend: str = "cpu"):
        self.n_caches, self.backend = n_caches, backend
        self.spans: dict[int, StepReplay] = {}
        self.calls: dict[int, int] = {}   # calls of each span longer than one position

    def forget(self) -> None:
        for replay in self.spans.values():
            replay.forget()

    def __call__(self, step: Callable, args: list, seq_outputs, stats: dict, span: int) -> list:
        """``step(*args)``, a call of ``span`` new positions, replayed where that span can be."""
        if span > 1 and span not in self.spans:
            self.calls[span] = self.calls.get(span, 0) + 1
            if self.calls[span] < 2:
                return list(step(*args))
        if span not in self.spans:
            self.spans[span] = StepReplay(self.n_caches, self.backend, span)
        return self.spans[span](step, args, seq_outputs, stats)


class StepReplay:
    """Decode steps replayed from a recording (``kernels/replay.py``: recorded launches on the
    CPU, a CUDA graph on a GPU): the first step of a shape is recorded, the next one runs both
    ways and must give identical outputs, and from then on steps of that shape replay. A
    recording that cannot be made or that disagrees turns replay off for this state, with the
    reason logged; a shape change, or an input that turns out to be a new tensor at each call,
    re-records (at most ``MAX_RECORDINGS`` times). Each :class:`DecodeState` has its own: a
    recording holds raw pointers into its state's caches and buffers. Running a step twice is
    harmless: it writes the same keys and values at the same cache positions."""

    MAX_RECORDINGS = 8

    def __init__(self, n_caches: int, backend: str = "cpu", span: int = 1):
        self.n_caches, self.backend, self.span = n_caches, backend, span
        self.recording = None
        self.validated = False
        self.recordings = 0
        self.varying: set[int] = set()   # tensor inputs seen to be new objects at each call
        self.off: Optional[str] = None

    def forget(self) -> None:
        self.recording, self.validated = None, False

    def __call__(self, step: Callable, args: list, seq_outputs, stats: dict) -> list:
        from fxforge.kernels.replay import Unreplayable
        if self.off is not None:
            return list(step(*args))
        rec = self.recording
        why = rec.mismatch(args) if rec is not None else "nothing recorded yet"
        try:
            if why is None:   # the inputs are where the recording's were: no device check needed
                if self.validated:
                    stats["replayed"] += 1
                    return _own(rec.replay(args), seq_outputs)
                return self._validate(rec, step, args, seq_outputs)
            recorder = _recorder(args, self.backend)
            if recorder is None:
                return list(step(*args))
            if self.recordings >= self.MAX_RECORDINGS:
                return self._turn_off(f"{self.recordings} recordings: the step's inputs keep "
                                      f"changing (last: {why})", step, args)
            if rec is not None:   # inputs seen changing identity are copied from now on
                self.varying |= {i for i in rec.keep if i < len(args) and args[i] is not rec.inputs[i]}
            self.recordings += 1
            rec = recorder(step, args, self._kept(args))
            self.recording, self.validated = rec, False
            return _own(rec.outputs, seq_outputs)
        except Unreplayable as exc:
            return self._turn_off(str(exc), step, args)

    def _kept(self, args: list) -> list[int]:
        """The tensor inputs a recording uses in place (they must be the same objects at every
        step): not the new tokens or the cache length (integer tensors; the position input sits
        just before the caches), not 0-d tensors (dynamo passes a float that changed between
        compiles, such as a norm's eps, as a new 0-d tensor each call) and not those seen
        changing. Those are copied into the recording's buffers instead."""
        position = len(args) - self.n_caches - 1
        return [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.dim() > 0
                and i != position and i not in self.varying
                and (i > position or a.is_floating_point())]

    def _validate(self, rec, step, args: list, seq_outputs) -> list:
        replayed = [o.clone() if isinstance(o, torch.Tensor) else o for o in rec.replay(args)]
        outputs = list(step(*args))
        same = all(torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
                   for a, b in zip(replayed, outputs))
        if not same:
            self.forget()
            self.off = "a replayed step differed from the step it recorded"
            log.warning("fxforge: kv_cache: decode-step replay off (steps of %d positions): %s",
                        self.span, self.off)
        self.validated = same
        return outputs

    def _turn_off(self, reason: str, step: Callable, args: list) -> list:
        self.forget()
        self.off = reason
        log.info("fxforge: kv_cache: decode steps of %d positions run op by op (no replay): %s",
                 self.span, reason)
        return list(step(*args))


def _recorder(args: list, backend: str):
    """The recording class for a step of ``backend`` on these inputs (``RECORDERS``), or None:
    inputs on several devices, or a pairing that cannot be recorded (the Triton interpreter's
    kernels on the CPU are invisible to a recording)."""
    from fxforge.kernels import replay
    devices = {a.device.type for a in args if isinstance(a, torch.Tensor)}
    name = RECORDERS.get((backend, devices.pop())) if len(devices) == 1 else None
    return getattr(replay, name) if name else None


def _own(outputs, seq_outputs) -> list:
    """Outputs a caller may keep: sequence outputs are copied out by ``_assemble`` anyway; any
    other tensor is the recording's buffer and is cloned."""
    return [o.clone() if isinstance(o, torch.Tensor) and i not in seq_outputs else o
            for i, o in enumerate(outputs)]
