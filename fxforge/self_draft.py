"""``draft="self"``: a speculative draft derived from the target by fxforge's own passes.

The target's original ``nn.Module`` (a ``fxforge.compile`` result's ``.model``, a
``torch.compile`` wrapper's ``._orig_mod``, or the module itself) is compiled again with
``kv_cache=True`` and lossy options (``SELF_DRAFT`` by default): a quantized copy that drafts
cheaply and agrees with the target most of the time.

Drafts are remembered per (module, options), so repeated ``generate`` calls compile once. The
cache is keyed by a weak reference to the module, and the draft compiles a shallow copy of it
(the same parameter tensors: no second copy of the weights): so the cache holds no reference
to the module, and an entry goes when its module does (a draft holding the module itself
would keep its own key alive for ever).
"""
from __future__ import annotations

import copy
import threading
import weakref
from typing import Any, Callable, Optional

import torch

# The options a derived draft compiles with by default. On SmolLM2 (bench/speculative.py,
# bench/RESULTS.md 2026-12-04 (speculative)) an int8 draft agreed with the fp32 target on 92% of
# its tokens and decoded at ~1.9x its speed, the best trade measured: int4 g128 agreed on 40%,
# int4 g64 with GPTQ on 57%, and dropping even 2 blocks halved the agreement.
SELF_DRAFT: dict = {"quantize": "int8"}

_DRAFTS: "weakref.WeakKeyDictionary[torch.nn.Module, dict[str, Any]]" = weakref.WeakKeyDictionary()
# one lock for lookups and compiles: two threads asking for one draft compile it once
_LOCK = threading.Lock()


def original_module(model: Any) -> Optional[torch.nn.Module]:
    """The ``nn.Module`` behind ``model``, or None (a function, an AOT artifact)."""
    from fxforge.api import CompiledModule
    if isinstance(model, CompiledModule):
        return model.model
    original = getattr(model, "_orig_mod", None)
    if isinstance(original, torch.nn.Module):
        return original
    return model if isinstance(model, torch.nn.Module) else None


def self_draft(model: Any, options: Optional[dict],
               example_ids: torch.Tensor) -> tuple[Callable[..., Any], str]:
    """The draft derived from ``model`` with ``options`` (``SELF_DRAFT`` when None), compiled on
    ``example_ids`` the first time, and a description of it."""
    options = dict(SELF_DRAFT if options is None else options) if isinstance(options, (dict, type(None))) else None
    if options is None or "kv_cache" in options:
        raise ValueError("draft_options must be a dict of fxforge compile options (kv_cache is "
                         "always on for a draft)")
    module = original_module(model)
    if module is None:
        raise ValueError(f"draft='self' needs the target's nn.Module, and a "
                         f"{type(model).__name__} does not expose one (a fxforge.compile or "
                         "torch.compile result, or a module, does): pass draft=<a logits "
                         "callable> instead")
    key = repr(sorted(options.items()))
    settings = ", ".join(f"{name}={value}" for name, value in options.items()) or "no options"
    description = f"self ({type(module).__name__}, {settings})"
    with _LOCK:
        drafts = _DRAFTS.setdefault(module, {})
        if key not in drafts:
            drafts[key] = _compile(module, options, example_ids)
        return drafts[key], description


def _compile(module: torch.nn.Module, options: dict, example_ids: torch.Tensor) -> Any:
    """``fxforge.compile`` of a shallow copy of ``module`` with a KV cache, dynamic in the
    sequence only (a batch dimension made symbolic too leads Hugging Face models' mask code to
    ops the KV-cache pass cannot prove causal)."""
    import fxforge
    example = example_ids.clone()
    torch._dynamo.mark_dynamic(example, 1)
    try:
        return fxforge.compile(copy.copy(module), (example,), kv_cache=True, **options)
    except fxforge.OptionsError:
        raise
    except Exception as exc:
        raise ValueError(f"draft='self': fxforge could not compile {type(module).__name__} "
                         f"with {options} ({type(exc).__name__}: {exc}); pass draft=<a logits "
                         "callable> instead") from exc
