"""fxforge: a compiler for PyTorch inference.

Ways in:
  * ``torch.compile(model, backend="fxforge", options={...})``
  * ``fxforge.compile(model, example_inputs, **options)``
  * ``fxforge.aot_compile(...)`` / ``python -m fxforge compile`` and ``fxforge.load(dir)``
  * ``fxforge.generate(model, input_ids, max_new_tokens, ...)`` decodes with any of them
  * ``fxforge.Session()`` owns one sequence's KV caches (``with session:``, ``generate(..., session=)``)
"""
from __future__ import annotations

__version__ = "0.1.0"

from fxforge.errors import (ArtifactError, FxforgeError, InputSpecError, OptionsError,
                            SessionInUseError, VerificationError)
from fxforge.options import CompileOptions, parse_options
from fxforge.backend_entry import fxforge_backend, register as _register_backend
from fxforge.api import compile
from fxforge.aot import Artifact, aot_compile, load
from fxforge.explain import ExplainReport, explain
from fxforge.generate import generate
from fxforge.sessions import Session

_register_backend()

__all__ = ["Artifact", "ArtifactError", "CompileOptions", "ExplainReport", "FxforgeError",
           "InputSpecError", "OptionsError", "Session", "SessionInUseError", "VerificationError",
           "__version__", "aot_compile", "compile", "explain", "fxforge_backend", "generate",
           "load", "parse_options"]
