"""Frozen weights: the per-call check that they still hold, and the builds kept per weight set.

A compiled graph bakes its weights in as constants (folded, packed). Before each call it checks
that the weights dynamo passes are the ones a build froze, and unchanged:

* the same tensor objects (a new ``nn.Parameter``; ``load_state_dict(..., assign=True)``);
* the same version counters (in-place ops on the parameter: ``p.mul_()``, ``p.copy_()`` under
  ``no_grad``, ``load_state_dict``);
* the same data pointers (``p.data = t``, ``p.set_(t)``: the version counter does not move);
* the same bytes in ``SAMPLED_WORDS`` evenly spaced 8-byte words of each CPU weight (the first
  and the last included). Writes through the ``.data`` alias (``p.data.copy_(t)``,
  ``p.data.normal_()``) bump that alias's own version counter, not the parameter's (by design
  in PyTorch), so only the content shows them; inference-mode tensors keep no counter at all.

Not seen: a write through ``.data`` (or into an inference-mode tensor) that leaves every sampled
word as it was, e.g. a change to a few rows of an embedding table; and content-only writes to
weights that are not on the CPU (sampling those would cost a device sync per call).

A graph called with several weight sets (two instances of one model class share one dynamo
graph) keeps one build per set, ``MAX_WEIGHT_SETS`` at most, least recently used evicted.
"""
from __future__ import annotations

import collections
import logging
import weakref
from typing import Any, Optional, Sequence

import numpy as np
import torch

from fxforge.irgraph.safe_parse import torch_name

log = logging.getLogger("fxforge")

SAMPLED_WORDS = 8      # per CPU weight; cost measured in docs/ARCHITECTURE.md ("Weights and freezing")
MAX_WEIGHT_SETS = 4    # builds kept per compiled graph; each holds its own packed weights
_WORD = 8
_DATA_PTR = torch.Tensor.data_ptr


def _byte_span(tensor: torch.Tensor) -> int:
    """Bytes from the tensor's first element to the end of its last (strides are never < 0)."""
    if tensor.numel() == 0:
        return 0
    last = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
    return (last + 1) * tensor.element_size()


def _data_pointer(tensor: torch.Tensor) -> Optional[int]:
    """The data pointer, or None for a tensor without one (a wrapper subclass, a sparse one)."""
    if tensor.layout is not torch.strided:
        return None
    try:
        return tensor.data_ptr()
    except (RuntimeError, NotImplementedError):   # "... doesn't have storage"
        return None


class _RawWords:
    """``words`` uint64s at address ``low``, for numpy (read-only; no copy, nothing read yet)."""

    def __init__(self, low: int, words: int):
        self.__array_interface__ = {"data": (low, True), "shape": (words,), "typestr": "<u8",
                                    "version": 3}


class _SampledWords:
    """``SAMPLED_WORDS`` words of each CPU weight, read in one numpy ``take``.

    One uint64 array is laid over the address range from the lowest sampled word to the highest;
    only the sampled indices are ever read. (``torch.cat`` of one strided view per weight gives
    the same answer but pays a dispatcher round per view: some 30x slower for SmolLM2's 272.)
    Every word read is mapped memory: it holds a byte of a tensor whose storage
    ``FrozenWeights`` keeps alive, and an aligned 8-byte word never crosses a page."""

    def __init__(self, tensors: Sequence[torch.Tensor], owners: Sequence[int]):
        addresses, owner_of_word = [], []
        for tensor, owner in zip(tensors, owners):
            start, span = tensor.data_ptr(), _byte_span(tensor)
            if span == 0:
                continue
            picks = {(start + (span - 1) * i // max(SAMPLED_WORDS - 1, 1)) & ~(_WORD - 1)
                     for i in range(SAMPLED_WORDS)}
            addresses += sorted(picks)
            owner_of_word += [owner] * len(picks)
        self._owners = owner_of_word
        if not addresses:
            self._memory = self._index = self._expected = None
            return
        low = min(addresses)
        words = (max(addresses) - low) // _WORD + 1
        self._memory = np.asarray(_RawWords(low, words))
        self._index = (np.asarray(addresses, dtype=np.int64) - low) // _WORD
        self._expected = self._memory.take(self._index)

    def first_change(self) -> Optional[int]:
        """The index (among all weights) of a weight whose sampled words changed, or None."""
        if self._index is None:
            return None
        now = self._memory.take(self._index)
        if np.array_equal(now, self._expected):
            return None
        return self._owners[int(np.flatnonzero(now != self._expected)[0])]


class FrozenWeights:
    """What one build froze, and the per-call test that the weights passed are still that."""

    def __init__(self, weights: Sequence[torch.Tensor]):
        self.alive = True   # False once a frozen weight object is gone: no call can pass it again
        self._ids = [id(w) for w in weights]
        self._refs = [weakref.ref(w, self._died) for w in weights]   # not kept alive here
        # The storages, not the objects: an address seen again is the storage that was frozen
        # (never a new one reusing freed memory), and the sampled words stay readable.
        self._storages = [w.detach() for w in weights]
        # The per-call reads take every weight in one comprehension where they can (the usual
        # case), and index lists only where some weight lacks a counter or a pointer.
        self._versioned = [i for i, w in enumerate(weights) if not w.is_inference()]
        self._pointed = [i for i, w in enumerate(weights) if _data_pointer(w) is not None]
        self._all_versioned = len(self._versioned) == len(weights)
        self._all_pointed = len(self._pointed) == len(weights)
        self._versions = self._read_versions(weights)
        self._pointers = self._read_pointers(weights)
        sampled = [i for i in self._pointed if weights[i].device.type == "cpu"]
        self._words = _SampledWords([self._storages[i] for i in sampled], sampled)
        if len(self._versioned) < len(weights):
            log.info("fxforge: %d weights are inference-mode tensors (no version counter): an "
                     "in-place change to them is seen only where it changes a sampled word",
                     len(weights) - len(self._versioned))
        if len(sampled) < len(weights):
            log.info("fxforge: %d weights are not CPU tensors with storage: a write through "
                     "`.data` to them is seen only if it gives them new storage",
                     len(weights) - len(sampled))

    def _died(self, _ref) -> None:
        self.alive = False

    def holds(self, weights: Sequence[torch.Tensor]) -> bool:
        """Are these the very tensor objects frozen (in order)?"""
        return self.alive and [id(w) for w in weights] == self._ids

    def _read_versions(self, weights: Sequence[torch.Tensor]) -> list[int]:
        if self._all_versioned:
            return [w._version for w in weights]
        return [weights[i]._version for i in self._versioned]

    def _read_pointers(self, weights: Sequence[torch.Tensor]) -> list[int]:
        if self._all_pointed:
            return list(map(_DATA_PTR, weights))
        return [weights[i].data_ptr() for i in self._pointed]

    def change(self, weights: Sequence[torch.Tensor]) -> Optional[str]:
        """For the objects ``holds`` accepted: None if no check sees a change, else what changed."""
        versions = self._read_versions(weights)
        if versions != self._versions:
            index = self._versioned[_first_difference(versions, self._versions)]
            return f"{_name(weights, index)} was modified in place"
        pointers = self._read_pointers(weights)
        if pointers != self._pointers:
            index = self._pointed[_first_difference(pointers, self._pointers)]
            return f"{_name(weights, index)} has new storage (e.g. `.data = tensor`)"
        index = self._words.first_change()
        if index is not None:
            return (f"{_name(weights, index)} has new values and no version bump (a write "
                    "through `.data`)")
        return None

    def key(self) -> tuple:
        return tuple(self._ids)


def _name(weights: Sequence[torch.Tensor], index: int) -> str:
    weight = weights[index]
    return f"weight {index} ({torch_name(weight.dtype)}{list(weight.shape)})"


def _first_difference(a: Sequence[Any], b: Sequence[Any]) -> int:
    return next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)


class WeightSetCache:
    """Builds by weight set (the identities of the frozen tensors), least recently used first.

    A key is unique while its build is cached: a weight whose object dies marks its build dead
    (dropped at the next lookup) before Python can reuse that object's id."""

    def __init__(self, limit: int = MAX_WEIGHT_SETS):
        self.limit = limit
        self._builds: "collections.OrderedDict[tuple, Any]" = collections.OrderedDict()

    def find(self, weights: Sequence[torch.Tensor]) -> Optional[Any]:
        self._drop_dead()
        build = self._builds.get(tuple(id(w) for w in weights))
        if build is None or not build.frozen.holds(weights):
            return None
        self._builds.move_to_end(build.frozen.key())
        return build

    def put(self, build: Any) -> None:
        self._builds[build.frozen.key()] = build
        self._builds.move_to_end(build.frozen.key())
        while len(self._builds) > self.limit:
            self._builds.popitem(last=False)
            log.warning("fxforge: one compiled graph is used with more than %d weight sets (model "
                        "instances); dropping the least recently used: its next call re-freezes "
                        "(a compile's time)", self.limit)

    def _drop_dead(self) -> None:
        for key in [k for k, b in self._builds.items() if not b.frozen.alive]:
            del self._builds[key]
