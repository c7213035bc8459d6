"""fxforge: a compiler for PyTorch inference.

Ways in:
  * ``torch.compile(model, backend="fxforge", options={...})``
  * ``fxforge.compile(model, example_inputs, **options)``
  * ``fxforge.aot_compile(...)`` / ``python -m fxforge compile`` and ``fxforge.load(dir)``
  * ``fxforge.generate(model, input_ids, max_new_tokens, ...)`` decodes with any of them
  * ``fxforge.Session()`` owns one sequence's KV caches (``with session:``, ``generate(..., session=)``)

Every ``import fxforge.<folder>.<module>`` runs this file first, so it loads only leaves (the
errors, the options and the backend registration, which import no other fxforge module); the
compile driver, AOT, explain, generate and sessions load on first use of their names (PEP 562),
so importing a kernel or an IR module never runs the compiler (tests/test_packaging.py).
"""
from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

from fxforge.errors import (ArtifactError, FxforgeError, InputSpecError, OptionsError,
                            SessionInUseError, VerificationError, WeightsChangedError)
from fxforge.options import CompileOptions, parse_options
from fxforge.backend_entry import fxforge_backend, register as _register_backend

_register_backend()

# public name -> the module that defines it, imported on first use
_LAZY = {"compile": "fxforge.api", "Artifact": "fxforge.aot", "aot_compile": "fxforge.aot",
         "load": "fxforge.aot", "ExplainReport": "fxforge.explain", "explain": "fxforge.explain",
         "generate": "fxforge.generate", "Session": "fxforge.sessions",
         "from_onnx": "fxforge.onnx", "export_onnx": "fxforge.onnx_export"}

__all__ = ["Artifact", "ArtifactError", "CompileOptions", "ExplainReport", "FxforgeError",
           "InputSpecError", "OptionsError", "Session", "SessionInUseError", "VerificationError",
           "WeightsChangedError", "__version__", "aot_compile", "compile", "explain",
           "export_onnx", "from_onnx", "fxforge_backend", "generate", "load", "parse_options"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'fxforge' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _Package(types.ModuleType):
    """``fxforge.explain`` and ``fxforge.generate`` are functions named like the modules that
    define them. Loading such a module makes the import system set the package attribute to
    the module; that is skipped here, so the name keeps resolving to the function."""

    def __setattr__(self, name: str, value) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
