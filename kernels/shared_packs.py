"""One packed copy of a weight, however many compiled graphs use it.

A model compiled by ``torch.compile`` is often lowered more than once: dynamo recompiles when a
dimension turns dynamic (a generation loop's growing sequence makes a static and a dynamic
graph), and ``kv_cache=True`` lowers a decode-step graph beside the plain one. Each lowering
packs its linears' weights at compile time; without sharing, SmolLM2-135M (538 MB of fp32
linear weights) held one packed copy per graph. Packs are looked up by the *content* of the
weight they were made from (``content_digest.tensor_digest`` of its bytes), not by tensor
identity: a horizontally fused projection's weight is a new concatenation in every graph, with
the same bytes.

The table holds its packs weakly: a pack lives as long as some kernel object uses it. Packs
are read-only for the kernels (none writes its weight), so sharing one is safe.
"""
from __future__ import annotations

import threading
import weakref
from typing import Callable

import torch

from fxforge.kernels.content_digest import tensor_digest

_PACKS: "weakref.WeakValueDictionary[tuple, torch.Tensor]" = weakref.WeakValueDictionary()
_LOCK = threading.Lock()


def content_key(tensor: torch.Tensor) -> tuple:
    """dtype, shape and digest of the values: equal keys, equal tensors."""
    return str(tensor.dtype), tuple(tensor.shape), tensor_digest(tensor)


def shared_pack(kind: str, weight: torch.Tensor,
                pack: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``pack(weight)``, or the pack of kind ``kind`` made earlier from a weight of equal
    content (and still alive). ``kind`` names the layout (and anything else ``pack`` depends
    on): packs of different kinds never stand in for each other."""
    key = (kind, *content_key(weight))
    with _LOCK:
        packed = _PACKS.get(key)
    if packed is not None:
        return packed
    packed = pack(weight)
    with _LOCK:   # two threads packing the same weight at once: the first stored wins
        return _PACKS.setdefault(key, packed)


def live_packs() -> int:
    """How many packs the table holds now (for tests and memory reports)."""
    with _LOCK:
        return len(_PACKS)
