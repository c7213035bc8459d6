"""What the autotuner tunes: a :class:`TuningTask` names a kernel family and a problem; the
family's factory (registered by the kernel's own module) turns it into a :class:`Tunable`.

A task is plain data (picklable, JSON-able apart from ``payload``) so that it can travel to a
worker process, another GPU or a Ray node and be rebuilt there: the worker imports
``task.module``, which registers the family, and calls its factory. The tunable then builds one
runnable per config, a reference output to check each candidate against, and a cost estimate
that ranks candidates before anything is measured.
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from fxforge.kernels.tuning import Config, TuningSpace


@dataclass(frozen=True)
class TuningTask:
    family: str                      # a registered family: "linear_cpu", "fused_cpp", ...
    module: str                      # the module whose import registers ``family``
    problem: tuple                   # sorted (name, value) pairs: shape bucket, dtypes, flags
    source_hash: str                 # the kernel's source (generated code or its module file)
    device: str = "cpu"
    payload: Any = field(default=None, compare=False, hash=False)  # rebuild data (not keyed)

    @staticmethod
    def make(family: str, module: str, problem: dict, source_hash: str, device: str = "cpu",
             payload: Any = None) -> "TuningTask":
        return TuningTask(family, module, tuple(sorted(problem.items())), source_hash, device,
                          payload)

    @property
    def problem_dict(self) -> dict:
        return dict(self.problem)

    def label(self) -> str:
        shape = " ".join(f"{k}={v}" for k, v in self.problem)
        return f"{self.family} {shape}"


class Tunable:
    """One problem of one kernel family, ready to build and run candidates.

    Subclasses set ``space`` and implement ``build``; ``reference`` defaults to the space's
    default config's output, ``check`` to ``allclose`` at the output dtype's tolerance and
    ``cost`` (a model of the run time, used only to rank) to "no preference".
    """

    space: TuningSpace
    device: str = "cpu"
    parallel_build = True            # candidates may be compiled concurrently (threads)

    def __init__(self, task: TuningTask):
        self.task = task
        self.problem = task.problem_dict

    def build(self, config: Config) -> Callable[[], Any]:
        """A zero-argument runnable for ``config``; raises if the candidate cannot be built."""
        raise NotImplementedError

    def reference(self) -> Any:
        return self.build(self.space.default)()

    def check(self, output: Any, expected: Any) -> Optional[str]:
        return compare_outputs(output, expected)

    def cost(self, config: Config) -> float:
        return 0.0


TOLERANCE = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (2e-2, 1e-2), torch.float16: (2e-3, 1e-3)}


def compare_outputs(output: Any, expected: Any) -> Optional[str]:
    """``None`` if ``output`` matches ``expected`` (tensors, or tuples of them), else why not."""
    outs = output if isinstance(output, (tuple, list)) else (output,)
    wants = expected if isinstance(expected, (tuple, list)) else (expected,)
    if len(outs) != len(wants):
        return f"returned {len(outs)} outputs, expected {len(wants)}"
    for i, (got, want) in enumerate(zip(outs, wants)):
        if not isinstance(got, torch.Tensor) or got.shape != want.shape or got.dtype != want.dtype:
            return f"output {i}: {_describe(got)} instead of {_describe(want)}"
        rtol, atol = TOLERANCE.get(want.dtype, (0.0, 0.0))
        if not torch.allclose(got, want, rtol=rtol, atol=atol, equal_nan=True):
            diff = (got.double() - want.double()).abs().nan_to_num(math.inf).max().item()
            return f"output {i}: max abs diff {diff:.3g} from the reference"
    return None


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype}{list(value.shape)}"
    return type(value).__name__


_FAMILIES: dict[str, Callable[[TuningTask], Tunable]] = {}


def register_family(name: str, factory: Callable[[TuningTask], Tunable]) -> None:
    _FAMILIES[name] = factory


def make_tunable(task: TuningTask) -> Tunable:
    if task.family not in _FAMILIES:
        importlib.import_module(task.module)
    if task.family not in _FAMILIES:
        raise KeyError(f"module {task.module} does not register tuning family {task.family!r}")
    return _FAMILIES[task.family](task)


def bucket(size: int) -> int:
    """Shape bucket of a size that varies between calls (rows = batch x sequence): the next
    power of two, so a config tuned for 100 rows serves 65..128."""
    return 1 if size <= 1 else 1 << (int(size) - 1).bit_length()
