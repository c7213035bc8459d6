"""The ``torch.compile(model, backend="fxforge", options={...})`` entry point.

Registered through the ``torch_dynamo_backends`` entry point (so it works without importing
fxforge first) and with ``register_backend`` when fxforge is imported. Whatever goes wrong while
compiling a graph, the graph still runs: eagerly, with the reason logged.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.fx as fx

from fxforge.options import parse_options

log = logging.getLogger("fxforge")


def fxforge_backend(gm: fx.GraphModule, example_inputs: Sequence[Any],
                    options: Optional[Mapping[str, Any]] = None, mode: Optional[str] = None) -> Callable:
    """Dynamo backend. Bad options raise (a user error); a failed compile falls back to eager."""
    opts = parse_options(options)
    if mode not in (None, "default"):
        log.info("fxforge: torch.compile mode=%r has no effect; use options={...}", mode)
    needs_grad = torch.is_grad_enabled() and any(
        isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs)
    if needs_grad:
        log.warning("fxforge compiles for inference: this graph runs eagerly because autograd is "
                    "recording (call the model under torch.no_grad() or torch.inference_mode())")
        return gm.forward
    from fxforge.compiler import compile_captured
    from fxforge.irgraph import capture_aot_inference, dynamo_weight_indices

    weight_indices = dynamo_weight_indices(gm, example_inputs)

    def compile_ir(ir, positions):
        return compile_captured(ir, opts, positions, example_inputs)

    try:
        return capture_aot_inference(gm, example_inputs, weight_indices, compile_ir)
    except Exception as exc:
        if _is_dynamo_restart(exc) or (_strict() and _is_fxforge_bug(exc)):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        log.warning("fxforge: could not compile a graph of %d nodes (%s: %s); it runs eagerly",
                    len(gm.graph.nodes), type(exc).__name__, first[:300])
        return gm.forward


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
