"""``options={"attention": "linear:FEATURE[,window:W][,steps:N]"}``: feature-map linear attention
for models trained with softmax attention, opt-in and lossy.

Each causal self-attention (as ``attention_spec.causal_self_attention`` decides) becomes
``fxforge::linear_attention`` (:mod:`fxforge.irgraph.linear_ops`): with ``window:W`` (LoLCATs'
hybrid) a softmax over the last ``W`` keys plus linear attention over the older ones, in one
normalisation; without it plain causal linear attention. Prefill time grows as ``O(L)`` (the CPU
kernel goes in chunks), and with ``kv_cache=True`` the KV-cache pass keeps a fixed-size state per
layer (plus a ring of ``W`` keys): generation may run past ``max_seq_len``.

The feature map: ``elu`` (``elu(x) + 1``, nothing fitted) or ``fitted`` (Hedgehog's softmax
feature map, fitted per layer on the compile's example inputs by
:mod:`fxforge.passes.attention_linear_fit`, ``steps`` Adam steps; the maps become constants of
the graph). Neither is trained end to end, so expect a real loss of accuracy (LoLCATs and
Hedgehog fine-tune afterwards): measure it (``bench/attention_linear.py``).

Any other attention stays dense, with the reason logged; the counts say how many sites changed.
"""
from __future__ import annotations

from dataclasses import dataclass

from fxforge.irgraph import IRGraph
from fxforge.irgraph.linear_ops import FEATURES
from fxforge.irgraph.views import LinearAttention
from fxforge.passes.attention_spec import (AttentionSpecError, check_fields, int_field,
                                           rewrite_causal_attention)
from fxforge.passes.base import Pass, PassResult

DEFAULT_STEPS = 100   # Adam steps per layer (SmolLM2, 30 layers: ~2-4 min on 2 shared cores)


@dataclass(frozen=True)
class LinearSpec:
    feature: str
    window: int = 0
    steps: int = DEFAULT_STEPS   # the fitted map's only

    @property
    def calibrates(self) -> bool:
        """Whether the pass fits on the compile's example inputs (``calibration_inputs``)."""
        return self.feature == "fitted"

    def __str__(self) -> str:
        window = f",window:{self.window}" if self.window else ""
        steps = f",steps:{self.steps}" if self.feature == "fitted" else ""
        return f"linear:{self.feature}{window}{steps}"

    def make_pass(self) -> Pass:
        return Pass("attention_linear", lambda ir: linear_rewrite(ir, self),
                    f"attention {self}: causal self-attention as feature-map linear attention")


def parse_linear(spec: str, value: str, fields: dict) -> LinearSpec:
    """``linear:elu|fitted[,window:W][,steps:N]`` (``steps`` for ``fitted`` only)."""
    if value not in FEATURES:
        raise AttentionSpecError(f"option attention={spec!r}: the feature map must be one of "
                                 f"{', '.join(FEATURES)}, got {value!r}")
    check_fields(spec, fields, ("window", "steps") if value == "fitted" else ("window",))
    window = int_field(spec, "window", fields.get("window", "0"), 0)
    steps = int_field(spec, "steps", fields.get("steps", str(DEFAULT_STEPS)), 0)
    return LinearSpec(value, window, steps)


def linear_rewrite(ir: IRGraph, spec: LinearSpec) -> PassResult:
    """Every causal self-attention becomes ``fxforge::linear_attention`` (module docstring); a
    fitted map is fitted first, on the graph as it stands (dense attention upstream)."""
    maps: dict = {}
    if spec.feature == "fitted":
        from fxforge.passes.attention_linear_fit import fit_feature_maps
        maps = fit_feature_maps(ir, spec.window, spec.steps)

    def build(graph, sdpa, _):
        q_map = k_map = None
        if spec.feature == "fitted":
            fitted_q, fitted_k = maps[sdpa.node]
            q_map = ir.add_constant("linear_attention_q_map", fitted_q, sdpa.node)
            k_map = ir.add_constant("linear_attention_k_map", fitted_k, sdpa.node)
        return LinearAttention.create(graph, q=sdpa.query, k=sdpa.key, v=sdpa.value,
                                      feature=spec.feature, window=spec.window, scale=sdpa.scale,
                                      q_map=q_map, k_map=k_map)
    return rewrite_causal_attention(ir, str(spec), build, "linear_sites")
