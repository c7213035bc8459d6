"""Record one CPU call of a graph and replay it without Python glue (CUDA graphs, for the CPU).

A decode step runs a few hundred tiny operations; on the CPU each costs ~3-25 us of Python
(view/reshape calls, output allocation, argument checks, ctypes marshalling) on top of its work,
which for a 30-layer model adds up to a third of the step. With fixed shapes the step is the same
sequence every time: the same C kernels on the same buffers, only their contents change. So
:class:`Recording` runs the step once while recording

* every C kernel launch (``launch`` below: every ctypes kernel call in ``fxforge.kernels`` goes
  through it) with its raw arguments (data pointers, sizes, thread counts), and
* every ATen operation (a ``TorchDispatchMode``): views and allocations are only kept alive
  (their memory is where the kernels read and write), ops without tensor inputs are constants,
  and every other op is replayed and its results copied into the tensors the recording produced
  (so what reads them sees the new values; an in-place op's result is its input already);

then :meth:`Recording.replay` copies new input values into the recorded input buffers and runs
the list. Anything a replay cannot reproduce makes the recording refuse with the reason: a value
read back into Python (``.item()``, data-dependent shapes), random ops, non-tensor results. A
replay is only valid for the same shapes, the same non-tensor inputs and the same persistent
buffers (the KV caches); the caller checks that, and validates a new recording against a normal
run before trusting it (``fxforge/kv_runtime.py``).

A recording sees only its own thread: the recording in progress is per thread (``_ACTIVE``), as
is torch's dispatch-mode stack. Another thread's launches carry raw pointers into that thread's
temporaries: a replay of them would write through those pointers after the memory is freed.
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Optional, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from fxforge.irgraph.graph import schema_arguments

aten = torch.ops.aten
_ACTIVE = threading.local()   # .recording: this thread's recording in progress, or absent
_ALLOCATIONS = {aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default,
                aten.new_empty.default, aten.new_empty_strided.default}


def launch(fn: Callable, args: tuple, keep: Any = None) -> Any:
    """``fn(*args)`` (a compiled kernel); while a recording is in progress, note the call for its
    replay, with ``keep``: what must stay alive for the raw addresses in ``args`` to stay valid
    (a metadata array a kernel's plan cache may drop)."""
    result = fn(*args)
    recording = getattr(_ACTIVE, "recording", None)
    if recording is not None:
        recording.note_call(fn, args, result, keep)
    return result


class Unreplayable(RuntimeError):
    """The recorded run did something a replay cannot reproduce."""


class _AtenRecorder(TorchDispatchMode):
    def __init__(self, recording: "Recording"):
        super().__init__()
        self.recording = recording

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.recording.note_aten(func, args, kwargs, out)
        return out


class Recording:
    """One recorded call of ``fn``: ``Recording(fn, args, keep)`` runs ``fn(*args)`` once (its
    outputs are :attr:`outputs`). Tensor arguments are copied into buffers the recording owns,
    except those at positions in ``keep`` (persistent buffers such as KV caches, used as they are
    and required to be the same objects at replay)."""

    def __init__(self, fn: Callable, args: Sequence[Any], keep: Sequence[int] = ()):
        self._own_inputs(args, keep)
        self.steps: list[Callable[[], None]] = []
        self.labels: list[str] = []      # what each step runs: a kernel's symbol or an ATen op
        self.alive: list[Any] = []       # every tensor the recorded run touched
        self.problem: Optional[str] = None
        outer = getattr(_ACTIVE, "recording", None)
        _ACTIVE.recording = self
        try:
            with _AtenRecorder(self):
                self.outputs = fn(*self.inputs)
        finally:
            _ACTIVE.recording = outer
        if self.problem is not None:
            raise Unreplayable(self.problem)

    def _own_inputs(self, args: Sequence[Any], keep: Sequence[int]) -> None:
        """The inputs a replay reads: the kept tensors themselves, copies of the others."""
        self.keep = set(keep)
        self.inputs = [a if i in self.keep or not isinstance(a, torch.Tensor) else a.clone()
                       for i, a in enumerate(args)]

    def note_call(self, fn: Callable, args: tuple, result: Any, keep: Any) -> None:
        """A kernel launch, in execution order with the ATen ops around it."""
        self.steps.append(_kernel_step(fn, args, result))
        self.labels.append(getattr(fn, "__name__", "kernel"))
        self.alive.append(keep)

    def note_aten(self, func, args, kwargs, out) -> None:
        self.alive.append((args, kwargs, out))
        flat_out = [o for o in tree_flatten(out)[0]]
        if func is aten._local_scalar_dense.default or not all(
                isinstance(o, torch.Tensor) for o in flat_out):
            self.problem = self.problem or f"{func} reads a tensor's value into Python"
        elif torch.Tag.nondeterministic_seeded in func.tags and not _without_dropout(func, args, kwargs):
            self.problem = self.problem or f"{func} is random"
        elif func in _ALLOCATIONS or (func.is_view and _aliases(flat_out, args)) or \
                not any(isinstance(a, torch.Tensor) for a in tree_flatten((args, kwargs))[0]):
            return   # memory the kernels use, a view of it, or a constant
        else:
            self.steps.append(_op_step(func, args, kwargs, flat_out))
            self.labels.append(f"aten:{func}")

    def matches(self, args: Sequence[Any]) -> bool:
        """Can :meth:`replay` take ``args``: same persistent buffers, same non-tensor values,
        tensors of the same shape, dtype and device."""
        return self.mismatch(args) is None

    def mismatch(self, args: Sequence[Any]) -> Optional[str]:
        """Why :meth:`replay` cannot take ``args``, or None."""
        if len(args) != len(self.inputs):
            return f"{len(args)} inputs, recorded with {len(self.inputs)}"
        for i, (new, old) in enumerate(zip(args, self.inputs)):
            if i in self.keep:
                if new is not old:
                    return f"input {i} is another tensor than the recorded buffer"
            elif isinstance(old, torch.Tensor):
                if not isinstance(new, torch.Tensor) or new.shape != old.shape \
                        or new.dtype != old.dtype or new.device != old.device:
                    return f"input {i} is not a {old.dtype} tensor of shape {list(old.shape)}"
            elif new != old:
                return f"input {i} is {new!r}, recorded with {old!r}"
        return None

    def replay(self, args: Sequence[Any]) -> Any:
        """The recorded call on new input values (check :meth:`matches` first). The outputs are
        the recording's own tensors, overwritten by the next replay."""
        self.load_inputs(args)
        for step in self.steps:
            step()
        return self.outputs

    def load_inputs(self, args: Sequence[Any]) -> None:
        """Copy the new values of the copied (not kept) tensor inputs into their buffers."""
        for i, (new, old) in enumerate(zip(args, self.inputs)):
            if i not in self.keep and isinstance(old, torch.Tensor):
                old.copy_(new)


class CudaGraphRecording(Recording):
    """The same contract on a CUDA device: the call is captured as one CUDA graph, so a replay is
    one launch instead of a step's few hundred. A warm-up run on a side stream first compiles and
    tunes every kernel outside the capture; a call the capture refuses (a host sync such as
    ``.item()``, an op CUDA graphs do not allow) raises :class:`Unreplayable` with the reason.
    Each state captures its own graph, maybe while other threads run or capture theirs. CUDA
    refuses potentially unsafe calls (a device sync, a ``cudaMalloc``) during a capture: in
    torch's default ``global`` mode in every thread, so another thread's decode step would fail;
    ``thread_local`` refuses them in the capturing thread only."""

    def __init__(self, fn: Callable, args: Sequence[Any], keep: Sequence[int] = ()):
        self._own_inputs(args, keep)
        self.labels = ["cuda graph"]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self.outputs = fn(*self.inputs)
        except Exception as exc:   # noqa: BLE001  (capture errors come from many layers)
            raise Unreplayable(f"CUDA graph capture failed: {type(exc).__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
        self.graph.replay()        # a capture runs nothing: fill the outputs of this call

    def replay(self, args: Sequence[Any]) -> Any:
        self.load_inputs(args)
        self.graph.replay()
        return self.outputs


def _without_dropout(func, args, kwargs) -> bool:
    """An op tagged random only for its dropout (attention kernels) called with ``dropout_p=0``."""
    bound = schema_arguments(func, args, kwargs)
    return "dropout_p" in bound and bound["dropout_p"] == 0


def _aliases(outs: list, args) -> bool:
    """Whether every output shares memory with a tensor input: a view op's usual result. Some
    ops declared as views copy when they cannot view (``reshape`` of a permuted tensor: an
    attention output of several positions); those are replayed like any op."""
    bases = {a.untyped_storage().data_ptr() for a in tree_flatten(args)[0]
             if isinstance(a, torch.Tensor)}
    return all(o.untyped_storage().data_ptr() in bases for o in outs)


def _kernel_step(fn: Callable, args: tuple, result: Any) -> Callable[[], None]:
    def run() -> None:
        if fn(*args) != result:
            raise Unreplayable(f"kernel {getattr(fn, '__name__', fn)} returned another status "
                               "than when recorded")
    return run


def _op_step(func, args, kwargs, outs: list) -> Callable[[], None]:
    """Run the op again; copy each result into the recorded one, except results that are one of
    the op's inputs (an in-place op returns what it wrote into)."""
    inputs = tree_flatten((args, kwargs))[0]
    fresh = [i for i, out in enumerate(outs) if not any(out is a for a in inputs)]

    def run() -> None:
        results = tree_flatten(func(*args, **kwargs))[0]
        for i in fresh:
            outs[i].copy_(results[i])
    return run
