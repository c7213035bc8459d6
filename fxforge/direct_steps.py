"""Decode steps past dynamo: ``fxforge.generate`` calls a compiled model's fxforge graph directly.

A ``torch.compile``'d model pays, at every call, dynamo's guards over the whole module tree and
aot_autograd's runtime wrapper over every parameter it passes: for SmolLM2 batch-1 decode a
sizeable share of a quantized token (bench/RESULTS.md has the figures). Within one group of one
``generate`` call the loop knows what changes between calls: only the ids, one token longer (with
a speculative draft, several longer, or shorter: a round's rejected tokens dropped). After
watching decode calls go through dynamo, the next calls go straight to the graph those calls
ran, with the same arguments but the new ids and their length, when all of this holds
(anything else: every call goes through dynamo, as before):

* the model is a dynamo-compiled module or function (``torch.compile``, ``fxforge.compile``);
* ``OBSERVED_CALLS - 1`` consecutive decode calls each ran exactly one fxforge graph, the same
  one (a side effect that changes what dynamo guards would recompile in between), a KV-cache
  graph whose sequence length is an input and whose aot_autograd wrapper only passes outputs
  through (no input mutation to copy back, no output rebuilt as a view:
  :meth:`CompiledGraph.step_positions`);
* the ids the model got are that graph's token argument (the same tensor), its length
  argument is their length, and the logits the model returned are one of its outputs;
* the forward has no Python side effects a skipped call would miss. With ``direct_steps=None``
  (``generate``'s default) that is proven from dynamo's compiled code: in every cache entry it
  loads parameters, calls one graph and returns, nothing else (models whose wrappers set
  context variables or attributes, as transformers 5's do, fail this). ``direct_steps=True``
  is the caller's word for it (the checks above still hold); ``False`` turns the shortcut off.

The graph's own checks still run at every step: the frozen weights are checked, the KV cache
compares the new ids with the old (ids that diverge roll it back or start it over,
``fxforge/kv_runtime.py``: the direct call hands the graph the whole ids, as dynamo would). What is not re-checked between steps of a group is the rest
of what dynamo guards (the module tree, its attributes, global state): a ``stream`` callback or
another thread that rewires the model in the middle of a ``generate`` call is not seen until
the next call or group.
"""
from __future__ import annotations

import dis
import logging
from typing import Any, Callable, Optional

import torch

from fxforge.compiler import observing_calls

log = logging.getLogger("fxforge")

# What dynamo's compiled code for a pure forward reads: its own helpers' module and one
# compiled graph (globals), the module tree's parameter/buffer dicts and the helpers named here.
_DYNAMO_UTILS = "__import_torch_dot__dynamo_dot_utils"
_PURE_ATTRIBUTES = frozenset({"_modules", "_parameters", "_buffers", "call_size",
                              "record_pregraph_bytecode_enter", "record_pregraph_bytecode_exit"})
_PURE_OPS = frozenset({"RESUME", "LOAD_FAST", "LOAD_CONST", "LOAD_GLOBAL", "LOAD_ATTR",
                       "BINARY_SUBSCR", "BUILD_LIST", "BUILD_TUPLE", "LIST_EXTEND", "PRECALL",
                       "CALL", "PUSH_NULL", "KW_NAMES", "STORE_FAST", "DELETE_FAST", "POP_TOP",
                       "COPY", "SWAP", "UNPACK_SEQUENCE", "RETURN_VALUE", "EXTENDED_ARG", "NOP",
                       "CACHE", "COPY_FREE_VARS", "MAKE_CELL", "LOAD_DEREF", "RETURN_CONST"})
OBSERVED_CALLS = 3   # the prefill, then two decode steps through dynamo (the first may recompile)


class DirectSteps:
    """``model(ids)`` for one group of one ``generate`` call: through the model for the first
    ``OBSERVED_CALLS`` calls, then straight to its fxforge graph where that is sound."""

    def __init__(self, model: Callable[..., Any], logits_of: Callable[[Any], Any],
                 vouched: Optional[bool] = None):
        """``vouched``: ``generate``'s ``direct_steps`` (None: prove the forward pure)."""
        self.model, self.logits_of, self.vouched = model, logits_of, vouched
        self.code = _compiled_code(model) if vouched is not False else None
        self.calls = 0
        self.seen: list = []   # the single graph each observed decode call ran
        # (graph, arguments, token position, length positions, output index) once taken
        self.direct: Optional[tuple] = None
        self.direct_calls = 0

    def __call__(self, ids: torch.Tensor) -> Any:
        if self.direct is not None:
            return self._step(ids)
        self.calls += 1
        if self.code is None or self.calls == 1:
            return self.model(ids)
        with observing_calls() as calls:
            out = self.model(ids)
        self.seen.append(calls[0][0] if len(calls) == 1 else None)
        if self.calls == OBSERVED_CALLS:
            why = _impure(self.code) if self.vouched is None else None
            if why is None and (len(set(map(id, self.seen))) != 1 or self.seen[0] is None):
                why = "its decode calls did not each run the same single fxforge graph"
            self.direct = _shortcut(calls, ids, self.logits_of(out), why)
            self.code = None   # one try per group
        return out

    def _step(self, ids: torch.Tensor) -> Any:
        graph, arguments, token, lengths, output = self.direct
        arguments = list(arguments)
        arguments[token] = ids
        for position in lengths:
            arguments[position] = ids.shape[1]
        self.direct_calls += 1
        return graph(*arguments)[output]


def _compiled_code(model: Any) -> Optional[Any]:
    """The code object dynamo compiled for ``model``'s calls, or None: not a dynamo-compiled
    module or function (an eager module, an AOT artifact: nothing to skip)."""
    target = model.__dict__.get("_compiled", model) if hasattr(model, "__dict__") else model
    original = getattr(target, "_orig_mod", None)
    if isinstance(original, torch.nn.Module):
        forward = original.forward
        return getattr(getattr(forward, "__func__", forward), "__code__", None)
    function = getattr(target, "_torchdynamo_orig_callable", None)
    return getattr(function, "__code__", None)


def _impure(code: Any) -> Optional[str]:
    """None when each compiled version of ``code`` only loads parameters, calls one graph and
    returns its result; else what else it does."""
    try:
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list
        entries = _debug_get_cache_entry_list(code)
    except (ImportError, AttributeError, TypeError) as exc:
        return f"dynamo's cache entries are not readable ({exc})"
    if not entries:
        return "no compiled code for the model's forward"
    for entry in entries:
        instructions = list(dis.get_instructions(entry.code))
        other = sorted({i.opname for i in instructions} - _PURE_OPS)
        names = {str(i.argval) for i in instructions if i.opname == "LOAD_GLOBAL"}
        graphs = {n for n in names if n.startswith("__compiled_fn")}
        attributes = {str(i.argval) for i in instructions if i.opname == "LOAD_ATTR"}
        unexplained = (other or sorted(names - graphs - {_DYNAMO_UTILS})
                       or sorted(attributes - _PURE_ATTRIBUTES)
                       or ([f"{len(graphs)} graphs"] if len(graphs) != 1 else []))
        if unexplained:
            return (f"its compiled code does more than call one graph ({', '.join(unexplained[:4])}"
                    "): pass direct_steps=True if its Python side effects need not run each step")
    return None


def _shortcut(calls: list, ids: torch.Tensor, logits: Any, why: Optional[str]) -> Optional[tuple]:
    """The direct call's (graph, arguments, token position, length positions, output index)
    from the last observed model call, or None (logged at DEBUG with ``why`` or the reason)."""
    found = None
    if why is None:
        graph, arguments, outputs = calls[0]
        positions = graph.step_positions()
        output = next((i for i, o in enumerate(outputs) if o is logits), None)
        if positions is None:
            why = "its graph has no KV cache over a dynamic length, or wraps its outputs"
        elif arguments[positions[0]] is not ids or any(arguments[p] != ids.shape[1]
                                                       for p in positions[1]):
            why = "the graph's arguments are not the ids and their length"
        elif output is None:
            why = "the logits returned are not one of the graph's outputs"
        else:
            found = (graph, tuple(arguments), positions[0], positions[1], output)
    if why is not None:
        log.debug("fxforge: generate: every step goes through the compiled model: %s", why)
    return found
