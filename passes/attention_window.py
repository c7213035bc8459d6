"""``options={"attention": "sliding_window:W,sinks:S"}``: StreamingLLM-style attention for models
trained with full attention, opt-in and lossy.

Each causal self-attention (a ``scaled_dot_product_attention`` that ``fuse_attention`` proved
causal, by ``is_causal`` or a mask that is the causal triangle) becomes
``fxforge::window_attention``: the query at position ``i`` sees the first ``S`` positions (the
"attention sinks", which the softmax of a model trained with full attention leans on) and the last
``W`` positions, itself included (:mod:`fxforge.irgraph.window_ops`). With ``kv_cache=True`` the
KV-cache pass then keeps ``S + W`` slots per layer, a ring past the sinks: the cache's memory and a
decode step's time stay flat however long the generation runs, and it may run past
``max_seq_len``. Keys are cached at their original positions (rotary embeddings as the model
applied them).

Any other attention (bidirectional, cross-attention, a mask other than the causal one) stays
dense, with the reason logged; the pass's counts say how many sites were rewritten.
"""
from __future__ import annotations

from dataclasses import dataclass

from fxforge.irgraph import IRGraph
from fxforge.irgraph.views import WindowAttention
from fxforge.passes.attention_spec import (check_fields, int_field, rewrite_causal_attention)
from fxforge.passes.base import Pass, PassResult

DEFAULT_SINKS = 4   # StreamingLLM's choice: four initial tokens suffice for the models it tried


@dataclass(frozen=True)
class WindowSpec:
    window: int
    sinks: int = DEFAULT_SINKS
    calibrates = False   # nothing fitted: the pass needs no calibration inputs

    def __str__(self) -> str:
        return f"sliding_window:{self.window},sinks:{self.sinks}"

    def make_pass(self) -> Pass:
        return Pass("attention_window", lambda ir: window_rewrite(ir, self),
                    f"attention {self}: causal self-attention to sinks plus a window")


def parse_window(spec: str, value: str, fields: dict) -> WindowSpec:
    """``sliding_window:W[,sinks:S]`` (sinks default to 4)."""
    check_fields(spec, fields, ("sinks",))
    window = int_field(spec, "sliding_window", value, 1)
    return WindowSpec(window, int_field(spec, "sinks", fields.get("sinks", str(DEFAULT_SINKS)), 0))


def window_rewrite(ir: IRGraph, spec: WindowSpec) -> PassResult:
    """Every causal self-attention becomes ``fxforge::window_attention`` (module docstring)."""
    def build(graph, sdpa, _):
        return WindowAttention.create(graph, q=sdpa.query, k=sdpa.key, v=sdpa.value,
                                      window=spec.window, sinks=spec.sinks, scale=sdpa.scale)
    return rewrite_causal_attention(ir, str(spec), build, "window_sites")
