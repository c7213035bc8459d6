"""Per-layout kernel plans, shared by every thread that calls the kernel.

A C++ kernel wrapper caches what it derives from its inputs' shapes and strides (a metadata
array whose raw address the kernel reads, output shapes, a path decision), so a decode loop pays
for it once per layout. The wrappers belong to a compiled graph that many threads may call at
once: a lookup is one dict read (atomic), building a plan needs no lock (two threads may build the
same one; either is right), and storing one holds a lock, clearing the table when it is full.
Each plan keeps alive everything its addresses point to, so a clear never frees the metadata of
a call running in another thread (it holds the plan), nor that of a decode-step recording (it
keeps the plan too: ``kernels/replay.launch``'s ``keep``).
"""
from __future__ import annotations

import threading
from typing import Any, Hashable, Optional


class PlanCache:
    """At most ``limit`` plans by key; full, it starts over (decode steps vary one length, so
    old layouts are rarely needed again)."""

    def __init__(self, limit: int):
        self.limit = limit
        self._plans: dict[Hashable, Any] = {}
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Optional[Any]:
        return self._plans.get(key)

    def add(self, key: Hashable, plan: Any) -> Any:
        """Store ``plan`` under ``key`` and return it."""
        with self._lock:
            if len(self._plans) >= self.limit:
                self._plans = {}   # a new table: readers of the old one finish undisturbed
            self._plans[key] = plan
        return plan
