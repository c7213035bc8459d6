"""IR -> runnable: freeze weights, then :func:`fxforge.orchestrate.compile_graph` (passes, KV
step, lowering through a backend, tuning), one build per weight set.

Weights arrive from dynamo as graph inputs. Freezing turns them into constants so passes can
fold and prepack them. The runtime guards that assumption before each call
(:mod:`fxforge.weight_sets` says exactly what it sees): weights changed since their build are
re-frozen (a quantized build raises WeightsChangedError instead, unless compiled with
``requantize_on_change``), and a graph called with another set of weights (another instance of
the model) keeps one build per set.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from typing import Any, Callable, Optional, Sequence

import torch

from fxforge.backends import LoweredGraph
from fxforge.errors import VerificationError, WeightsChangedError
from fxforge.irgraph import IRGraph, build_ir
from fxforge.irgraph.compile_profile import current as current_profile, phase
from fxforge.options import CompileOptions
from fxforge.orchestrate import compile_graph
from fxforge.weight_sets import FrozenWeights, WeightSetCache

log = logging.getLogger("fxforge")

# Compiled graphs made while a ``recording()`` block is open (fxforge.explain reads them).
_RECORDERS: list[list] = []
# Per thread: the list an ``observing_calls()`` block collects calls into, if one is open.
_OBSERVED = threading.local()


@contextlib.contextmanager
def recording():
    """Collect every :class:`CompiledGraph` built inside the block (innermost block only)."""
    graphs: list = []
    _RECORDERS.append(graphs)
    try:
        yield graphs
    finally:
        _RECORDERS.remove(graphs)

@contextlib.contextmanager
def observing_calls():
    """Collect ``(graph, args, outputs)`` of every :class:`CompiledGraph` call this thread makes
    inside the block (``fxforge/direct_steps.py`` reads them)."""
    calls: list = []
    prior = getattr(_OBSERVED, "calls", None)
    _OBSERVED.calls = calls
    try:
        yield calls
    finally:
        _OBSERVED.calls = prior

# Tolerances for comparing against eager, by dtype (verify=True and the tests use these).
# fp32 allows for reassociation (a different reduction order), nothing more.
TOLERANCES = {torch.float32: (1.3e-5, 1e-5), torch.float64: (1e-7, 1e-7),
              torch.bfloat16: (1.6e-2, 1e-3), torch.float16: (1e-3, 1e-4),
              torch.complex64: (1.3e-5, 1e-5), torch.complex128: (1e-7, 1e-7)}


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(rtol, atol) for comparing a compiled result of ``dtype`` with eager."""
    return TOLERANCES.get(dtype, (0.0, 0.0))


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
                 weights: Sequence[torch.Tensor], cache_key: Optional[str] = None):
        """``cache_key``: the graph cache's entry for these weights, written once the first
        build's passes have run (:mod:`fxforge.graph_cache`)."""
        # captured: before freezing and passes, the eager oracle for verify
        self._setup(captured, options, weight_positions, len(captured.placeholders()))
        self._cache_key = cache_key
        # the example's runtime inputs, kept only for passes that calibrate on them (the
        # quantizers, the attention modes that measure the heads)
        self._calibration = (_concrete([weights[i] for i in self.runtime_positions])
                             if options.lossy else None)
        frozen = [weights[i] for i in self.weight_positions]
        self._activate(self._build(frozen), frozen)
        self._record()

    def _setup(self, captured: Any, options: CompileOptions, weight_positions: Sequence[int],
               inputs: int) -> None:
        """The state every compiled graph keeps, before its first build."""
        self._active = _Active()
        self._cache_key = None
        self._calibration = None
        self.captured = captured
        self.options = options
        self.weight_positions = list(weight_positions) if options.freeze_weights else []
        skip = set(self.weight_positions)
        self.runtime_positions = [i for i in range(inputs) if i not in skip]
        self._weight_sets = WeightSetCache()
        self._build_lock = threading.Lock()
        self.profile = current_profile()   # where this graph's compile time went (or None)

    def _record(self) -> None:
        if _RECORDERS:
            _RECORDERS[-1].append(self)

    def _build(self, weights: list[torch.Tensor]) -> "Build":
        """Freeze ``weights``, optimize and lower; the result is kept for this weight set."""
        start = time.perf_counter()
        frozen = FrozenWeights(weights)   # stamped before freezing reads the values
        # The pass manager never modifies its input, so the captured graph needs no copy here.
        with phase("freeze"):
            ir = freeze(self.captured, self.weight_positions, weights) if weights else self.captured
        done = compile_graph(ir, self.options, stages=("passes", "kv_step"),
                             calibration=self._calibration)
        if self._cache_key is not None:   # the first build's weights are the key's
            from fxforge import graph_cache
            with phase("graph cache: store"):
                graph_cache.store(self._cache_key, done.ir, done.plan, self.weight_positions)
            self._cache_key = None
        done = compile_graph(done.ir, self.options, stages=("lower",), plan=done.plan)
        seconds = time.perf_counter() - start
        log.info("fxforge: compiled a graph of %d nodes into %d (%d frozen weights, %d eager "
                 "fallbacks) in %.1f ms", len(self.captured.gm.graph.nodes),
                 len(done.ir.gm.graph.nodes), len(weights), len(done.lowered.fallbacks), seconds * 1e3)
        build = Build(frozen, done.ir, done.lowered, done.kv, done.tuning, seconds)
        self._weight_sets.put(build)
        return build

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
                self._refuse_stale_codes(change)
                log.warning("fxforge: model weights changed since compilation (%s); re-freezing "
                            "them%s", change, " and quantizing them again" if self.options.quantize
                            else "")
                build = self._build(weights)
            self._activate(build, weights)
            return build

    def _refuse_stale_codes(self, change: str) -> None:
        """A quantized build's codes hold the weights it froze; re-quantizing on the fly would
        silently redo a lossy (and, with calibration or ``quantize="auto"``, slow) step in the
        middle of a call, so it happens only when the compile asked for it."""
        if self.options.quantize and not self.options.requantize_on_change:
            raise WeightsChangedError(
                f"fxforge: {change} after it was quantized at compile time, so its quantized "
                "codes are stale. Change weights before compiling; or compile with "
                "requantize_on_change=True (options={'requantize_on_change': True}) to "
                "re-quantize a changed weight at its next call (compiling again with the same "
                "options reuses this graph, unless torch._dynamo.reset() came first)")

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
        if self.options.verify:   # lossy passes: against the optimized graph's own meaning
            expected = build.ir.gm(*runtime_args) if self.options.lossy else self.captured.gm(*args)
            precision = build.ir.info.get("precision", "fp32")
            # an int8 KV cache rounds what the plain graph computes exactly: its tolerance
            check_against_eager(outputs, expected, KV_INT8 if build.kv is not None and
                                self.options.int8_kv_cache else precision)
        calls = getattr(_OBSERVED, "calls", None)
        if calls is not None:
            calls.append((self, args, outputs))
        return outputs

    def step_positions(self) -> Optional[tuple[int, list[int]]]:
        """(position of the token ids, positions of the sequence length) among this graph's
        arguments, for a caller that calls it directly with longer ids
        (``fxforge/direct_steps.py``); None where that is not sound: no KV cache, a length that
        is not an input (a graph specialized to one length), or an aot_autograd wrapper that
        does more than pass the outputs through."""
        kv = self._active.build.kv
        if kv is None or not kv.size_inputs or not self.captured.info.get("plain_outputs"):
            return None
        runtime = self.runtime_positions
        return runtime[kv.plan.tokens], [runtime[i] for i in kv.size_inputs]


def _concrete(inputs: list) -> Optional[list]:
    """The example inputs with each symbolic size (dynamo passes a ``SymInt`` for a dynamic
    dim) replaced by the value it holds, or None when one has none. A calibrating pass runs the
    graph on them: on the SymInt itself every op would add a guard on its value, specializing
    the dynamic size, so a decode loop would recompile at every new length."""
    concrete = []
    for value in inputs:
        if isinstance(value, torch.SymInt):
            value = value.node.hint
            if value is None:
                return None
        concrete.append(value)
    return concrete


@dataclasses.dataclass
class Build:
    """One frozen weight set and what was compiled from it."""
    frozen: FrozenWeights
    ir: IRGraph
    lowered: LoweredGraph
    kv: Any                       # the incremental decoder (kv_cache=True), or None
    tuning: list
    compile_seconds: float


_LOW = {"bf16": torch.bfloat16, "fp16": torch.float16, "bf16_weights": torch.bfloat16}
# check_against_eager's precision for outputs read through an int8 KV cache: every cached key
# and value is off by up to half a step (absmax / 254) of its row, so outputs move by about
# that fraction of their magnitude (tests/passes/test_kv_int8.py measures the margin).
KV_INT8 = "int8_kv"
KV_INT8_RTOL = 2 ** -5


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
        if precision == KV_INT8 and want.is_floating_point():
            scale = want.detach().abs().max().item() if want.numel() else 1.0
            rtol, atol = max(rtol, KV_INT8_RTOL), max(atol, KV_INT8_RTOL * max(scale, 1.0))
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
                     example_inputs: Sequence[Any], cache_key: Optional[str] = None) -> Callable:
    return CompiledGraph(ir, options, weight_positions, list(example_inputs), cache_key)


@dataclasses.dataclass
class _DynamoGraph:
    """What a cached graph has in place of its captured IR: dynamo's graph (verify's eager
    oracle) and the one fact about the capture the runtime reads."""
    gm: Any
    info: dict


class CachedGraph(CompiledGraph):
    """A graph whose optimized IR came from the graph cache: only lowered here. Called with
    other weights than the cached ones, it compiles the graph as a cold start would, once
    (``recapture(args)`` -> the callable), and hands every call to that."""

    def __init__(self, stored: Any, options: CompileOptions, gm: Any,
                 example_inputs: Sequence[Any], recapture: Callable[[Sequence[Any]], Callable]):
        start = time.perf_counter()
        self._setup(_DynamoGraph(gm, dict(stored.info)), options, stored.weight_positions,
                    len(example_inputs))
        self._recapture, self._full = recapture, None
        weights = [example_inputs[i] for i in self.weight_positions]
        frozen = FrozenWeights(weights)
        done = compile_graph(stored.ir, options, stages=("lower",), plan=stored.plan)
        build = Build(frozen, done.ir, done.lowered, done.kv, done.tuning,
                      time.perf_counter() - start)
        self._weight_sets.put(build)
        self._activate(build, weights)
        self._record()

    def _build(self, weights: list[torch.Tensor]) -> "Build":
        raise AssertionError("a cached graph hands calls with other weights to a full compile")

    def __call__(self, *args):
        if self._full is None:
            weights = [args[p] for p in self.weight_positions]
            active = self._active.build
            if active.frozen.holds(weights) and active.frozen.change(weights) is None:
                return super().__call__(*args)
            with self._build_lock:
                if self._full is None:
                    log.info("fxforge: a graph from the graph cache is called with other weights "
                             "than it was stored for: capturing and compiling it")
                    self._full = self._recapture(args)
        return self._full(*args)
