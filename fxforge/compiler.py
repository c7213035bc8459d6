"""IR -> runnable: freeze weights, run the pass pipeline, lower through a backend.

Weights arrive from dynamo as graph inputs. Freezing turns them into constants so passes can
fold and prepack them. The runtime guards that assumption before each call
(:mod:`fxforge.weight_sets` says exactly what it sees): weights changed since their build are
re-frozen, and a graph called with another set of weights (another instance of the model)
keeps one build per set.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import functools
import logging
import threading
import time
from typing import Any, Callable, Optional, Sequence

import torch

from fxforge.autotune import session as tuning
from fxforge.backends import Backend, LoweredGraph, lower, resolve_backend
from fxforge.errors import VerificationError
from fxforge.irgraph import IRGraph, build_ir
from fxforge.options import CompileOptions
from fxforge.passes import PassManager, default_pipeline
from fxforge.weight_sets import FrozenWeights, WeightSetCache

log = logging.getLogger("fxforge")

# Compiled graphs made while a ``recording()`` block is open (fxforge.explain reads them).
_RECORDERS: list[list] = []


@contextlib.contextmanager
def recording():
    """Collect every :class:`CompiledGraph` built inside the block (innermost block only)."""
    graphs: list = []
    _RECORDERS.append(graphs)
    try:
        yield graphs
    finally:
        _RECORDERS.remove(graphs)

# Tolerances for comparing against eager, by dtype (verify=True and the tests use these).
# fp32 allows for reassociation (a different reduction order), nothing more.
TOLERANCES = {torch.float32: (1.3e-5, 1e-5), torch.float64: (1e-7, 1e-7),
              torch.bfloat16: (1.6e-2, 1e-3), torch.float16: (1e-3, 1e-4),
              torch.complex64: (1.3e-5, 1e-5), torch.complex128: (1e-7, 1e-7)}


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, atol) for comparing a compiled result of ``dtype`` with eager."""
    return TOLERANCES.get(dtype, (0.0, 0.0))


def effective_options(options: CompileOptions, backend: Backend) -> CompileOptions:
    """The options the pipeline runs with on ``backend``: a low precision the hardware has no
    fast math path for (bf16 on a CPU without AMX or AVX512-BF16) runs as the backend's
    weight-only variant where it has one (``bf16_weights``: low-precision weight storage, fp32
    math), and otherwise stays fp32, which would only lose accuracy and time; the log says which
    and why."""
    if options.precision == "fp32":
        return options
    reason = backend.precision_unsupported(options.precision)
    if reason is None:
        return options
    weight_only = backend.weight_only_precision(options.precision)
    if weight_only is not None:
        log.warning("fxforge: precision=%r on the %s backend: %s; weights are rounded to %s and "
                    "stored so where a kernel reads them (C++ GEMM/GEMV: half the bytes), math stays "
                    "fp32 (precision %r)", options.precision, backend.name, reason,
                    options.precision, weight_only)
        return dataclasses.replace(options, precision=weight_only)
    log.warning("fxforge: precision=%r runs in fp32 on the %s backend: %s", options.precision,
                backend.name, reason)
    return dataclasses.replace(options, precision="fp32")


def optimize(ir: IRGraph, options: CompileOptions, backend: Optional[Backend] = None) -> IRGraph:
    """Run the pipeline for ``options`` (adjusted to ``backend``'s hardware when given)."""
    if backend is not None:
        options = effective_options(options, backend)
    out = PassManager(default_pipeline(options.to_dict())).run(ir)
    out.info["precision"] = options.precision
    return out


@contextlib.contextmanager
def tuning_session(mode: str, overlay=None):
    """The autotuning session lowering runs in: an enclosing one (a ``fxforge tune`` run, an
    artifact's shipped results) wins; else one for the ``autotune`` option; else none."""
    outer = tuning.current()
    if outer is not None:
        yield outer
    elif mode != "off" or overlay is not None:
        with tuning.session(mode if mode != "off" else "cache", overlay=overlay) as active:
            yield active
    else:
        yield None


def freeze(ir: IRGraph, positions: Sequence[int], values: Sequence[torch.Tensor]) -> IRGraph:
    """Placeholders at ``positions`` become constants holding ``values``."""
    placeholders = ir.placeholders()
    constants = {placeholders[p].name: v for p, v in zip(positions, values)}
    # build_ir makes the GraphModule: the copy needs no code of its own.
    frozen = build_ir(ir.copy(recompile=False).gm, ir.fake_mode, constants, ir.info)
    frozen.info["frozen_weights"] = len(constants)
    return frozen


class _Active:
    """The active build and its weights, held by reference: dynamo and aot_autograd wrap the
    compiled graph with ``functools.wraps``, which copies its ``__dict__`` into each wrapper, so
    a build stored there directly would pin the first one (its weights and packs) for good."""
    build: "Build"
    weights: list


def _of_active_build(name: str) -> property:
    return property(lambda self: getattr(self._active.build, name))


class CompiledGraph:
    """The callable handed back to dynamo/aot_autograd for one captured graph."""

    # What the active build (the one reports describe) holds.
    ir, lowered, kv = _of_active_build("ir"), _of_active_build("lowered"), _of_active_build("kv")
    tuning, compile_seconds = _of_active_build("tuning"), _of_active_build("compile_seconds")
    weights = property(lambda self: self._active.weights)

    def __init__(self, captured: IRGraph, options: CompileOptions, weight_positions: Sequence[int],
                 weights: Sequence[torch.Tensor]):
        self._active = _Active()
        self.captured = captured  # before freezing and passes: the eager oracle for verify
        self.options = options
        self.weight_positions = list(weight_positions) if options.freeze_weights else []
        skip = set(self.weight_positions)
        self.runtime_positions = [i for i in range(len(captured.placeholders())) if i not in skip]
        self._weight_sets = WeightSetCache()
        self._build_lock = threading.Lock()
        frozen = [weights[i] for i in self.weight_positions]
        self._activate(self._build(frozen), frozen)
        if _RECORDERS:
            _RECORDERS[-1].append(self)

    def _build(self, weights: list[torch.Tensor]) -> "Build":
        """Freeze ``weights``, optimize and lower; the result is kept for this weight set."""
        start = time.perf_counter()
        frozen = FrozenWeights(weights)   # stamped before freezing reads the values
        # The pass manager never modifies its input, so the captured graph needs no copy here.
        ir = freeze(self.captured, self.weight_positions, weights) if weights else self.captured
        backend = resolve_backend(self.options.backend, ir)
        ir = optimize(ir, self.options, backend)
        with tuning_session(self.options.autotune) as active:
            first = len(active.picks) if active else 0
            lowered = lower(ir, backend)
            kv = self._kv_cache(ir, lowered, backend) if self.options.kv_cache else None
            tuning = list(dict.fromkeys(active.picks[first:])) if active else []
        release_lowered_irs([(ir, lowered)] + ([(kv.plan.ir, kv.step)] if kv is not None else []))
        seconds = time.perf_counter() - start   # passes + lowering (+ tuning)
        log.info("fxforge: compiled a graph of %d nodes into %d (%d frozen weights, %d eager "
                 "fallbacks) in %.1f ms", len(self.captured.gm.graph.nodes), len(ir.gm.graph.nodes),
                 len(weights), len(lowered.fallbacks), seconds * 1e3)
        build = Build(frozen, ir, lowered, kv, tuning, seconds)
        self._weight_sets.put(build)
        return build

    def _kv_cache(self, ir: IRGraph, lowered: LoweredGraph, backend: Backend):
        """The incremental decoder over the KV-cache pass's step graph, or None (logged)."""
        from fxforge.kv_runtime import IncrementalDecoder, describe
        from fxforge.passes.kv_cache import insert_kv_cache
        plan = insert_kv_cache(ir)
        if isinstance(plan, str):
            log.info("fxforge: kv_cache: not applied (%s); the graph runs uncached", plan)
            return None
        log.info("fxforge: %s", describe(plan))
        return IncrementalDecoder(plan, lower(plan.ir, backend), lowered,
                                  self.options.max_seq_len, self.options.decode_replay,
                                  self.options.max_sessions)

    def _build_for(self, args: Sequence[Any]) -> "Build":
        """The build frozen from exactly the weights in ``args``: the active one (the common
        case, checked without a lock), another kept one, or a new one."""
        weights = [args[p] for p in self.weight_positions]
        active = self._active.build
        if active.frozen.holds(weights) and active.frozen.change(weights) is None:
            return active
        with self._build_lock:   # one thread builds; the others then find its build
            build = self._weight_sets.find(weights)
            change = build.frozen.change(weights) if build is not None else None
            if build is None:
                log.info("fxforge: a graph compiled for other weights is called with a new set "
                         "(another model instance or new parameters): freezing it")
                build = self._build(weights)
            elif change is not None:
                log.warning("fxforge: model weights changed since compilation (%s); re-freezing "
                            "them", change)
                build = self._build(weights)
            self._activate(build, weights)
            return build

    def _activate(self, build: "Build", weights: list[torch.Tensor]) -> None:
        """Make ``build`` the one reports describe and the lock-free check tries first. Only
        the active set's weights are held here: a kept build holds none, so a replaced
        parameter is freed and its build dropped."""
        # In place: the wrappers' copies of ``__dict__`` hold this same object. The lock-free
        # check reads only ``build``, so a reader between the two stores is never misled.
        self._active.weights = weights
        self._active.build = build

    def __call__(self, *args):
        build = self._build_for(args) if self.weight_positions else self._active.build
        runtime_args = [args[i] for i in self.runtime_positions]
        outputs = build.kv(runtime_args) if build.kv is not None else build.lowered(*runtime_args)
        if self.options.verify:
            check_against_eager(outputs, self.captured.gm(*args), build.ir.info.get("precision", "fp32"))
        return outputs


@dataclasses.dataclass
class Build:
    """One frozen weight set and what was compiled from it."""
    frozen: FrozenWeights
    ir: IRGraph
    lowered: LoweredGraph
    kv: Any                       # the incremental decoder (kv_cache=True), or None
    tuning: list
    compile_seconds: float


def release_lowered_irs(pairs: Sequence[tuple[IRGraph, Any]]) -> None:
    """After lowering: each (IR, lowered callable) pair's IR stays for reports (``explain``),
    but its constants (folded weights such as the concatenated q/k/v projections; an
    artifact's whole weights) would be a second copy beside the kernels' packed ones: they are
    released where the lowered module is not the IR's own (the reference backend and an eager
    fallback run the IR's module itself). Then the freed heap goes back to the OS."""
    released = sum(ir.release_constants() for ir, lowered in pairs
                   if getattr(lowered, "gm", None) is not ir.gm)
    return_freed_memory()
    log.debug("fxforge: released %.1f MB of constants held by lowered IRs", released / 2**20)


@functools.lru_cache(maxsize=1)
def _libc_trim() -> Optional[Callable[[int], int]]:
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim") if name else None
    except (OSError, AttributeError):   # not glibc: nothing to call
        return None


def return_freed_memory() -> None:
    """Give the C heap's free pages back to the OS after a compile. Packing reads transposed
    copies of every weight; glibc keeps such freed blocks (its mmap threshold rises after the
    first large free, so later ones come from the heap), and SmolLM2's process stayed ~535 MB
    larger than it needed (2369 -> 1833 MB RSS after ``malloc_trim``). A no-op without glibc."""
    trim = _libc_trim()
    if trim is not None:
        trim(0)


_LOW = {"bf16": torch.bfloat16, "fp16": torch.float16, "bf16_weights": torch.bfloat16}


def check_against_eager(outputs: Any, expected: Any, precision: str = "fp32") -> None:
    """Compare with eager at the output dtype's tolerance, or at the compute precision's when
    matmuls ran in bf16/fp16 (a lossy option the user asked for)."""
    flat_out, _ = torch.utils._pytree.tree_flatten(outputs)
    flat_exp, _ = torch.utils._pytree.tree_flatten(expected)
    if len(flat_out) != len(flat_exp):
        raise VerificationError(f"compiled graph returned {len(flat_out)} values, eager {len(flat_exp)}")
    for i, (got, want) in enumerate(zip(flat_out, flat_exp)):
        if not isinstance(want, torch.Tensor):
            if got != want:
                raise VerificationError(f"output {i}: compiled {got!r} != eager {want!r}")
            continue
        if got.shape != want.shape or got.dtype != want.dtype:
            raise VerificationError(f"output {i}: compiled {got.dtype}{list(got.shape)} vs eager "
                                    f"{want.dtype}{list(want.shape)}")
        rtol, atol = tolerance(want.dtype)
        if precision in _LOW and want.is_floating_point():
            rtol, atol = (max(a, b) for a, b in zip((rtol, atol), _low_tolerance(want, precision)))
        if not torch.allclose(got, want, rtol=rtol, atol=atol, equal_nan=True):
            diff = (got.double() - want.double()).abs().nan_to_num(0).max().item()
            raise VerificationError(f"output {i} ({want.dtype}{list(want.shape)}) differs from eager: "
                                    f"max abs diff {diff:.3g} over rtol={rtol}, atol={atol}")


def _low_tolerance(want: torch.Tensor, precision: str) -> tuple[float, float]:
    """Errors of a low-precision forward scale with the output's magnitude, not per element:
    allow the dtype's relative tolerance (x4 for accumulation through layers) of max |eager|."""
    rtol, _ = tolerance(_LOW[precision])
    scale = want.detach().abs().max().item() if want.numel() else 1.0
    return rtol, 4 * rtol * max(scale, 1.0)


def compile_captured(ir: IRGraph, options: CompileOptions, weight_positions: Sequence[int],
                     example_inputs: Sequence[Any]) -> Callable:
    return CompiledGraph(ir, options, weight_positions, list(example_inputs))
