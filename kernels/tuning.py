"""The tuning contract between kernels and the autotuner (a leaf: imports no fxforge module).

Every kernel family (``kernels/<op>.py``) publishes a :class:`TuningSpace`. A :class:`Config`
is a set of named integer parameters (block sizes, ``GROUP_M``, thread counts, ...) plus the
Triton launch knobs ``num_warps``/``num_stages`` (ignored by CPU kernels). ``prune`` returns
the reason a config cannot run for a given problem (shared-memory or register limits, a block
larger than the problem), or ``None``: the autotuner measures only what survives.

A kernel describes one problem as a :class:`TuningTask`, registers a factory that turns such a
task into a :class:`Tunable` (``register_family``), and asks :func:`choose` for its config.
The layering: ``autotune/`` imports this module (and no other kernel code but the cache folder
of ``kernels/cache_trust.py``); kernels consult the autotuner only through this module, never by
importing ``autotune/``: the open tuning session (``fxforge.autotune.session``) installs itself
here with :func:`consulted`, and :func:`choose` hands it the space and the task.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional, Protocol

import torch


@dataclass(frozen=True)
class Config:
    params: tuple[tuple[str, int], ...]
    num_warps: int = 4
    num_stages: int = 2

    @staticmethod
    def of(num_warps: int = 4, num_stages: int = 2, **params: int) -> "Config":
        return Config(tuple(sorted(params.items())), num_warps, num_stages)

    def __getitem__(self, name: str) -> int:
        return dict(self.params)[name]

    def kwargs(self) -> dict[str, int]:
        return dict(self.params)

    def describe(self) -> str:
        inner = ", ".join(f"{k}={v}" for k, v in self.params)
        return f"{inner}, warps={self.num_warps}, stages={self.num_stages}"

    def to_json(self) -> dict:
        return {"params": dict(self.params), "num_warps": self.num_warps,
                "num_stages": self.num_stages}

    @staticmethod
    def from_json(data: Any) -> "Config":
        """The inverse of ``to_json``; ValueError on anything that is not one."""
        if not isinstance(data, dict) or not isinstance(data.get("params"), dict):
            raise ValueError(f"not a config: {data!r}")
        ints = [data.get("num_warps"), data.get("num_stages"), *data["params"].values()]
        if not all(type(v) is int for v in ints) or not all(isinstance(k, str) for k in data["params"]):
            raise ValueError(f"config values must be integers: {data!r}")
        return Config(tuple(sorted(data["params"].items())), data["num_warps"], data["num_stages"])


Problem = Mapping[str, Any]  # e.g. {"M": 128, "N": 768, "K": 256, "dtype": torch.bfloat16}


@dataclass(frozen=True)
class TuningSpace:
    kernel: str
    configs: tuple[Config, ...]
    default: Config
    prune: Callable[[Config, Problem], Optional[str]] = field(default=lambda config, problem: None)
    describe: Callable[[Config], str] = field(default=Config.describe)  # for reports and plots

    def survivors(self, problem: Problem) -> tuple[list[Config], dict[Config, str]]:
        """The configs worth measuring for ``problem``, and the pruned ones with the reason."""
        kept, pruned = [], {}
        for config in self.configs:
            reason = self.prune(config, problem)
            if reason is None:
                kept.append(config)
            else:
                pruned[config] = reason
        return kept, pruned


@dataclass(frozen=True)
class TuningTask:
    """What the autotuner tunes: a kernel family and a problem, as plain data (picklable,
    JSON-able apart from ``payload``), so that it can travel to a worker process, another GPU
    or a Ray node and be rebuilt there: the worker imports ``module``, which registers
    ``family``, and calls its factory (``fxforge.autotune.task.make_tunable``)."""
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


FAMILIES: dict[str, Callable[[TuningTask], Tunable]] = {}   # family name -> factory


def register_family(name: str, factory: Callable[[TuningTask], Tunable]) -> None:
    FAMILIES[name] = factory


def bucket(size: int) -> int:
    """Shape bucket of a size that varies between calls (rows = batch x sequence): the next
    power of two, so a config tuned for 100 rows serves 65..128."""
    return 1 if size <= 1 else 1 << (int(size) - 1).bit_length()


class Consultant(Protocol):
    """What kernels see of an open tuning session (``fxforge.autotune.session.Session``)."""
    mode: str                        # "off" | "cache" | "tune" | "collect"

    def choose(self, space: TuningSpace, task: TuningTask) -> Config: ...


_ACTIVE: contextvars.ContextVar[Optional[Consultant]] = contextvars.ContextVar(
    "fxforge_autotune_session", default=None)


@contextlib.contextmanager
def consulted(session: Consultant) -> Iterator[Consultant]:
    """Make ``session`` the one kernels consult for the block (the innermost one answers)."""
    token = _ACTIVE.set(session)
    try:
        yield session
    finally:
        _ACTIVE.reset(token)


def current() -> Optional[Consultant]:
    """The open tuning session, or None."""
    return _ACTIVE.get()


def choose(space: TuningSpace, task: Callable[[], TuningTask]) -> Config:
    """The config a kernel should use: ``task`` is built only when a session is open."""
    active = _ACTIVE.get()
    if active is None or active.mode == "off":
        return space.default
    return active.choose(space, task())
