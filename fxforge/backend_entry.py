"""The ``torch.compile(model, backend="fxforge", options={...})`` entry point.

Registered through the ``torch_dynamo_backends`` entry point (so it works without importing
fxforge first) and with ``register_backend`` when fxforge is imported. Whatever goes wrong while
compiling a graph, the graph still runs: eagerly, with the reason logged.
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.fx as fx

from fxforge.options import CompileOptions, parse_options

log = logging.getLogger("fxforge")
_DYNAMO_LOGGER = "torch._dynamo.convert_frame"   # where dynamo reports its recompile limit
_used = False   # has fxforge compiled a graph in this process (its warnings concern us)?


def fxforge_backend(gm: fx.GraphModule, example_inputs: Sequence[Any],
                    options: Optional[Mapping[str, Any]] = None, mode: Optional[str] = None) -> Callable:
    """Dynamo backend. Bad options raise (a user error); a failed compile falls back to eager."""
    global _used
    _used = True
    opts = parse_options(options)
    if mode not in (None, "default"):
        log.info("fxforge: torch.compile mode=%r has no effect; use options={...}", mode)
    needs_grad = torch.is_grad_enabled() and any(
        isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs)
    if needs_grad:
        log.warning("fxforge compiles for inference: this graph runs eagerly because autograd is "
                    "recording (call the model under torch.no_grad() or torch.inference_mode())")
        return gm.forward
    from fxforge.irgraph import dynamo_weight_indices
    from fxforge.irgraph.compile_profile import profiling, record_before

    weight_indices = dynamo_weight_indices(gm, example_inputs)
    try:
        with profiling(f"a graph of {len(gm.graph.nodes)} nodes from dynamo"):
            record_before("capture: dynamo tracing", _dynamo_tracing_seconds())
            return _compile_or_reuse(gm, example_inputs, weight_indices, opts)
    except Exception as exc:
        if _is_dynamo_restart(exc) or (_strict() and _is_fxforge_bug(exc)):
            raise
        if opts.tensor_parallel:   # eager here would be the whole model on this rank alone,
            raise                  # while the others wait in a collective: never fall back
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        log.warning("fxforge: could not compile a graph of %d nodes (%s: %s); it runs eagerly",
                    len(gm.graph.nodes), type(exc).__name__, first[:300])
        return gm.forward


def _compile_or_reuse(gm: fx.GraphModule, example_inputs: Sequence[Any],
                      weight_indices: list[int], opts: CompileOptions) -> Callable:
    """The graph cache's entry for this graph, lowered; else capture (aot_autograd) and the
    whole compile, whose optimized graph is then stored. Only a graph aot_autograd calls with
    dynamo's own inputs and whose outputs it passes through is stored: a cached one runs
    without aot_autograd's wrapper."""
    from fxforge import graph_cache
    from fxforge.compiler import CachedGraph, compile_captured
    from fxforge.irgraph import capture_aot_inference
    from fxforge.irgraph.compile_profile import phase

    with phase("graph cache: lookup"):
        key = graph_cache.graph_key(gm, example_inputs, weight_indices, opts)
        stored = graph_cache.load(key) if key is not None else None
    if stored is not None and stored.weight_positions == weight_indices:
        log.info("fxforge: a graph of %d nodes came from the graph cache (entry %s): no capture "
                 "or pass runs, only lowering", len(gm.graph.nodes), key)

        # dynamo's fake inputs (no data: nothing of this call's weights is kept for later)
        fakes = [n.meta.get("example_value") for n in gm.graph.nodes if n.op == "placeholder"]

        def recapture(args: Sequence[Any]) -> Callable:
            return capture_aot_inference(gm, fakes, weight_indices, lambda ir, positions:
                                         compile_captured(ir, opts, positions, list(args)))
        return CachedGraph(stored, opts, gm, example_inputs, recapture)

    def compile_ir(ir, positions):
        storable = (key is not None and positions == weight_indices
                    and ir.info.get("plain_outputs"))
        return compile_captured(ir, opts, positions, example_inputs,
                                cache_key=key if storable else None)

    return capture_aot_inference(gm, example_inputs, weight_indices, compile_ir)


def _dynamo_tracing_seconds() -> float:
    """How long dynamo traced the frame it hands us now (its own metric, recorded before it
    calls the backend; 0 where this torch keeps none)."""
    try:
        from torch._dynamo.utils import compilation_time_metrics
        return float(compilation_time_metrics.get("bytecode_tracing", [0.0])[-1])
    except (ImportError, IndexError, TypeError, ValueError):
        return 0.0


@functools.lru_cache(maxsize=None)
def backend_for(options: CompileOptions) -> Callable:
    """The one backend callable per option set. Dynamo reuses a compiled graph only for an equal
    backend, and two ``functools.partial`` objects are never equal: a new one per
    ``fxforge.compile`` made every compile of a model class a recompile of its ``forward``, and
    past ``torch._dynamo.config.recompile_limit`` (8) dynamo ran it eagerly."""
    return functools.partial(fxforge_backend, options=options.to_dict())


class _RecompileLimitWarning(logging.Filter):
    """Repeats dynamo's recompile-limit warning on fxforge's logger. Past the limit dynamo runs
    the function eagerly (new inputs no cached graph accepts never reach fxforge again), and it
    says so only on torch's logger, which an fxforge user may not watch."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _used and isinstance(record.msg, str) and record.msg.startswith("torch._dynamo hit config."):
            args = record.args if isinstance(record.args, tuple) and len(record.args) >= 4 else None
            what = (f"config.{args[0]} = {args[1]} for {args[2]}; last reason: {args[3]}" if args
                    else record.getMessage().splitlines()[0])
            log.warning("fxforge: torch._dynamo hit its recompile limit (%s): inputs its cached "
                        "graphs do not accept now run eagerly, not through fxforge. Compile once "
                        "and reuse the module, or raise the limit", what)
        return True


def _is_dynamo_restart(exc: BaseException) -> bool:
    """Dynamo's own control flow (e.g. TensorifyScalarRestartAnalysis under dynamic=True): it
    restarts the compile on seeing it; swallowing it would run the whole graph eagerly."""
    from torch._dynamo import exc as dynamo_exc
    restart = getattr(dynamo_exc, "RestartAnalysis", ())
    return isinstance(exc, restart) if restart else False


def _strict() -> bool:
    from fxforge.passes import verify_enabled
    return verify_enabled()


def _is_fxforge_bug(exc: BaseException) -> bool:
    """A pass or the verifier failed: in strict mode (tests) that must surface, not fall back."""
    from fxforge.irgraph import IRVerificationError
    from fxforge.passes import PassError
    while exc is not None:
        if isinstance(exc, (PassError, IRVerificationError)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def register() -> None:
    from torch._dynamo.backends.registry import _BACKENDS, register_backend
    if "fxforge" not in _BACKENDS or _BACKENDS["fxforge"] is None:
        register_backend(fxforge_backend, name="fxforge")
    dynamo_log = logging.getLogger(_DYNAMO_LOGGER)
    if not any(isinstance(f, _RecompileLimitWarning) for f in dynamo_log.filters):
        dynamo_log.addFilter(_RecompileLimitWarning())
