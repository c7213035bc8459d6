"""``fxforge.compile``: compile a module for the given example inputs, return a callable."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from fxforge.backend_entry import backend_for
from fxforge.errors import FxforgeError
from fxforge.options import parse_options


class CompiledModule(torch.nn.Module):
    """Wraps ``torch.compile(model, backend=fxforge)``; calls run under inference mode."""

    def __init__(self, model: torch.nn.Module, compiled: Any, options, dynamic: Optional[bool] = None):
        super().__init__()
        self.model = model
        self.__dict__["_compiled"] = compiled  # not a submodule: it wraps ``model`` itself
        self.options = options
        # A KV-cached model is called on ever longer sequences: its tokens' length (dim 1 of
        # the first input) is dynamic from the first call, so one graph serves them all, not a
        # static one dynamo replaces at the second call (SmolLM2: 12 s of compile for nothing).
        self._length_dynamic = options.kv_cache and dynamic is None

    def forward(self, *args, **kwargs):
        if self._length_dynamic and args and isinstance(args[0], torch.Tensor) and args[0].dim() >= 2:
            torch._dynamo.maybe_mark_dynamic(args[0], 1)
        with torch.no_grad():
            try:
                return self._compiled(*args, **kwargs)
            except torch._dynamo.exc.BackendCompilerFailed as exc:
                inner = getattr(exc, "inner_exception", None)
                if isinstance(inner, FxforgeError):   # a user error: no dynamo traceback
                    raise inner.with_traceback(None) from None
                raise


def compile(model: torch.nn.Module, example_inputs: Sequence[Any] = (), *,
            dynamic: Optional[bool] = None, **options: Any) -> CompiledModule:
    """Compile ``model``; if ``example_inputs`` are given, compile now rather than on first call.

    Options are those of ``torch.compile(..., backend="fxforge", options=...)``; unknown keys
    raise ``OptionsError`` here, before anything runs.
    """
    if not isinstance(model, torch.nn.Module) and not callable(model):
        raise TypeError(f"fxforge.compile expects an nn.Module or a callable, got {type(model).__name__}")
    opts = parse_options(options)
    compiled = CompiledModule(model, torch.compile(model, backend=backend_for(opts), dynamic=dynamic,
                                                   options=_guard_options(model)), opts, dynamic)
    if example_inputs:
        compiled(*example_inputs)
    return compiled


def _guard_options(model: Any) -> Optional[dict]:
    """torch.compile's options for a module that names, in ``static_attributes``, attributes it
    never changes after construction (an imported ONNX model's program: thousands of Python
    objects its forward walks): dynamo installs no guards under them, so a call does not check
    them all again (~60k guards, 7 ms a call for SmolLM2's)."""
    static = tuple(f"self.{name}" for name in getattr(model, "static_attributes", ()))
    if not static:
        return None

    def under_static(name: str) -> bool:
        name = name.replace("L['self']", "self", 1)   # the source's spelling differs by version
        return any(name == root or name.startswith((root + ".", root + "[")) for root in static)

    def keep(entries: list) -> list[bool]:
        return [not under_static(e.name) for e in entries]
    return {"guard_filter_fn": keep}
