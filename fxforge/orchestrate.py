"""The compile orchestrator: the one path from a graph to what runs, for every way in.

:func:`compile_graph` runs these stages, in order:

1. ``passes``: the pass pipeline for the options, adjusted to the backend's hardware
   (:func:`effective_options`);
2. ``kv_step`` (``kv_cache=True``): the KV-cache pass's cached step graph, run as a managed stage
   (:data:`KV_STEP`: by the pass manager, so it is timed, verified with its cache writes allowed,
   strict in tests, and recorded in the step graph's pass history); or, for an artifact, the
   plan it stored;
3. ``lower``: the graph and its step graph, each through the backend into a
   :class:`~fxforge.backends.LoweredGraph` with its own kernel choices, inside one autotuning
   session (:func:`tuning_session`) whose picks the result keeps; then the lowered IRs'
   constants are released (:func:`release_lowered_irs`).

``fxforge.compile`` (:class:`fxforge.compiler.CompiledGraph`) runs all three; ``aot_compile``
runs ``passes`` and ``kv_step`` and stores their graphs; ``fxforge.load`` runs ``lower`` on what
it read, once (``aot_compile`` returns that load: nothing is lowered twice). ``fxforge.explain``
reports the :class:`Compilation` of each graph.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import functools
import logging
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from fxforge.autotune import session as tuning
from fxforge.backends import Backend, LoweredGraph, lower, resolve_backend
from fxforge.irgraph import IRGraph
from fxforge.irgraph.compile_profile import phase
from fxforge.options import CompileOptions
from fxforge.passes import Pass, PassManager, PassResult, default_pipeline

log = logging.getLogger("fxforge")
STAGES = ("passes", "kv_step", "lower")


@dataclasses.dataclass
class Compilation:
    """What the orchestrator made of one graph (plain data; the stages not run leave None)."""
    ir: IRGraph                          # the optimized IR (its constants released once lowered)
    backend: Backend
    plan: Any = None                     # the KV-cache plan over the step graph (kv_cache=True)
    lowered: Optional[LoweredGraph] = None
    kv: Any = None                       # the incremental decoder over the lowered step graph
    tuning: list = dataclasses.field(default_factory=list)   # autotune picks made or read
    session: Any = None                  # the tuning session lowering ran in (its keys)


def compile_graph(ir: IRGraph, options: CompileOptions, *, stages: Sequence[str] = STAGES,
                  plan: Any = None, tuning_overlay: Optional[Path] = None,
                  measure: bool = True, calibration: Optional[Sequence] = None) -> Compilation:
    """Run ``stages`` on ``ir`` (module docstring). ``plan``: a KV-cache plan read from an
    artifact (instead of the ``kv_step`` stage); ``tuning_overlay``/``measure``: an artifact's
    shipped tuning results, used and never re-measured (``measure=False``); ``calibration``:
    runtime inputs of ``ir`` that passes which calibrate (gptq rounding) run it on."""
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown compile stages {sorted(unknown)}; the stages are {STAGES}")
    backend = resolve_backend(options.backend, ir)
    if "passes" in stages:
        from fxforge.passes.gptq import calibrating
        with calibrating(calibration), _format_speeds(backend), phase("passes"):
            ir = optimize(ir, options, backend)
    if "kv_step" in stages and options.kv_cache:
        with phase("kv step"):
            plan = kv_step(ir, options.kv_cache_dtype)
    result = Compilation(ir, backend, plan)
    if "lower" in stages:
        with phase("lower"):
            _lower(result, options, tuning_overlay, measure)
    return result


def _format_speeds(backend: Backend):
    """``quantize="auto"`` weighs formats by their kernels' measured speed on the CPU backend
    (``fxforge/quant_speed.py``); elsewhere, or under a measurement a caller installed, the
    pass's own rule applies."""
    from fxforge.passes.quantize_plan import installed_measure, measuring_speed
    if backend.name != "cpu" or installed_measure() is not None:
        return contextlib.nullcontext()
    from fxforge.quant_speed import cpu_layer_seconds
    return measuring_speed(cpu_layer_seconds)


def _lower(result: Compilation, options: CompileOptions, overlay: Optional[Path],
           measure: bool) -> None:
    """Stage 3: lower the graph and its step graph in one tuning session, then release the
    IRs' constants (kept when ``verify`` checks a lossy compile against the optimized IR)."""
    from fxforge.kv_runtime import IncrementalDecoder
    mode = options.autotune if measure else ("off" if options.autotune == "off" else "cache")
    with tuning_session(mode, overlay=overlay) as active:
        first = len(active.picks) if active else 0
        with phase("graph"):
            result.lowered = lower(result.ir, result.backend)
        if result.plan is not None:
            with phase("step graph"):
                step = lower(result.plan.ir, result.backend)
            result.kv = IncrementalDecoder(result.plan, step,
                                           result.lowered, options.max_seq_len,
                                           options.decode_replay, options.max_sessions)
        result.tuning = list(dict.fromkeys(active.picks[first:])) if active else []
        result.session = active
    if options.verify and options.lossy:
        return   # verify runs the optimized graph itself (a lossy option's meaning): keep it whole
    release_lowered_irs([(result.ir, result.lowered)]
                        + ([(result.plan.ir, result.kv.step)] if result.kv is not None else []))


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
    """Stage 1: the pipeline for ``options`` (adjusted to ``backend``'s hardware when given)."""
    if backend is not None:
        options = effective_options(options, backend)
    formats = backend.weight_formats if backend is not None else ("dense",)
    out = PassManager(default_pipeline(options.to_dict(), formats)).run(ir)
    out.info["precision"] = options.precision
    return out


def _kv_cache_step(ir: IRGraph, kv_dtype: str = "auto") -> PassResult:
    """The KV-cache pass's cached step graph (the graph itself if the pass declines; the reason
    is kept in ``info["kv_cache_declined"]``); ``kv_dtype``: the option ``kv_cache_dtype``."""
    from fxforge.passes.kv_cache import insert_kv_cache
    plan = insert_kv_cache(ir, kv_dtype)
    if isinstance(plan, str):
        ir.info["kv_cache_declined"] = plan
        return PassResult(ir, {"sites": 0})
    plan.ir.info["allow_mutation"] = True   # cached attention writes its K/V buffers
    plan.ir.info["kv_plan"] = plan
    return PassResult(plan.ir, {"sites": plan.sites, "positions": plan.positions})


# Not in the pass registry: its result is another graph (the step), never a pipeline's next one.
KV_STEP = Pass("kv_cache_step", _kv_cache_step, "the KV-cache pass's cached step graph")


def kv_step(ir: IRGraph, kv_dtype: str = "auto") -> Any:
    """Stage 2: the KV-cache plan over ``ir``'s cached step graph, or None (the reason logged).
    ``ir`` is left as it was; ``kv_dtype``: the option ``kv_cache_dtype``."""
    from fxforge.kv_runtime import describe
    managed = KV_STEP if kv_dtype == "auto" else \
        Pass(KV_STEP.name, functools.partial(_kv_cache_step, kv_dtype=kv_dtype), KV_STEP.doc)
    step = PassManager([managed]).run(ir)
    plan = step.info.pop("kv_plan", None)
    if plan is None:   # declined, or (outside strict mode) failed and skipped
        history = step.info.get("passes", [])
        why = step.info.get("kv_cache_declined") or (history[-1].error if history else None)
        log.info("fxforge: kv_cache: not applied (%s); the graph runs uncached", why)
        return None
    log.info("fxforge: %s", describe(plan))
    return plan


@contextlib.contextmanager
def tuning_session(mode: str, overlay=None):
    """The autotuning session lowering runs in: an enclosing one (a ``fxforge tune`` run, an
    ``aot_compile`` lowering through ``load``) wins; else one for the ``autotune`` option (or an
    artifact's shipped results: ``overlay``); else none."""
    outer = tuning.current()
    if outer is not None:
        yield outer
    elif mode != "off" or overlay is not None:
        with tuning.session(mode if mode != "off" else "cache", overlay=overlay) as active:
            yield active
    else:
        yield None


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
