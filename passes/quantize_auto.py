"""``quantize="auto"`` with ``accuracy_budget``: a format per linear, chosen for decode speed
within a measured accuracy budget.

1. **Calibration**: the compile's example inputs (``passes/gptq.py``'s :func:`calibration_inputs`:
   ``fxforge.compile``'s example, ``torch.compile``'s first call, ``aot_compile``'s example). Give
   real text: ``fxforge.calibration.calibration_text(tokenizer)`` returns token windows
   of CPython's own ``pydoc_data.topics``, the built-in default text.
2. **Metric** on the graph's first floating-point output against the fp32 graph's: ``kl`` (mean
   next-token KL divergence; the output must be logits ``[..., V]`` of a graph with integer token
   inputs), ``ppl`` (relative perplexity increase; logits ``[B, T, V]`` of token ids ``[B, T]``,
   scored on the next token) or ``mse`` (any output). The budget's metric is the one measured.
3. **Sensitivity**: each candidate linear alone at each candidate format (int8, int4 g128/g64/g32,
   round to nearest), the metric's change measured by running the graph on the calibration
   inputs. Only the nodes downstream of that linear are recomputed; the rest comes from the
   fp32 run (one run of the whole graph, kept). Beyond :data:`MAX_SINGLE_LINEARS` linears, the
   linears of one block (``layers.3``) are measured and chosen together (:func:`units_of`).
4. **Speed** per layer and format measured on this machine (``quantize_plan.layer_seconds``).
5. **Choice**: the fastest plan whose summed per-layer changes fit the budget
   (``quantize_plan.choose``), assuming the changes add up across layers. The assumption is
   checked: the plan runs whole on the calibration inputs, and while its measured total (an
   upper confidence bound on it: ``quantize_plan.upper_bound``) exceeds the budget the choice is
   made again against a budget shrunk by the overshoot (``quantize_plan.plan_within``).

The plan (per layer: format, bytes, measured change, seconds) is kept in ``ir.info`` under
:data:`INFO_KEY` for ``fxforge.explain``; the quantized graph stores the formats themselves, so
an AOT artifact runs them as they are and its load never searches or measures again.
"""
from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F

from fxforge.irgraph import IRGraph
from fxforge.irgraph.views import Linear
from fxforge.irgraph.weight_format import decode
from fxforge.passes.gptq import calibration_inputs
from fxforge.passes.quantize_plan import (BUDGET_METRICS, CANDIDATES, DENSE, BudgetError,
                                          bytes_per_call, formats_for, layer_seconds,
                                          plan_within, upper_bound)

log = logging.getLogger("fxforge.passes.quantize")
INFO_KEY = "quantize_auto"
MAX_SINGLE_LINEARS = 48


@dataclass
class Candidate:
    """One linear ``quantize="auto"`` may quantize."""
    linear: Linear
    names: str              # the model's weight names (comma-joined for a fused projection)
    weight_kn: torch.Tensor
    schemes: dict           # format -> the scheme quantize._encode takes ("int4_g64:rtn")


class _Run(fx.Interpreter):
    """One eager run of the graph that keeps the values of the nodes in ``keep``; with ``base``
    (such kept values) only the nodes in ``dirty`` are computed (the others' values are in
    ``base`` where a dirty node needs them); ``weights`` replace a linear's weight while it runs."""

    def __init__(self, gm: fx.GraphModule, base: Optional[dict] = None, dirty: frozenset = frozenset(),
                 weights: Optional[dict] = None, keep: frozenset = frozenset()):
        super().__init__(gm, garbage_collect_values=True)
        self.base, self.dirty, self.weights = base, dirty, weights or {}
        self.keep, self.kept = keep, {}

    def run_node(self, node: fx.Node) -> Any:
        if self.base is not None and node not in self.dirty:
            return self.base.get(node)
        value = self._computed(node)
        if node in self.keep:
            self.kept[node] = value
        return value

    def _computed(self, node: fx.Node) -> Any:
        replaced = self.weights.get(node)
        if replaced is None:
            return super().run_node(node)
        weight = Linear.of(node).weight
        kept, self.env[weight] = self.env[weight], replaced
        try:
            return super().run_node(node)
        finally:
            self.env[weight] = kept


class Scorer:
    """The budget's metric of a perturbed run against the fp32 run on the calibration inputs.
    ``groups``: the sets of linears that will be perturbed together; of the fp32 run only the
    values some perturbed run reuses are kept (those feeding a node downstream of a group)."""

    def __init__(self, ir: IRGraph, inputs: Sequence, metric: str, groups: Sequence[set]):
        self.gm, self.metric, self.output = ir.gm, metric, ir.output_node()
        run = _Run(ir.gm, keep=_reused(ir.gm, groups))
        with torch.no_grad():
            outputs = run.run(*inputs)
        self.base = run.kept
        self.index = _first_float(outputs)
        self.reference = _flat(outputs)[self.index].detach().float()
        self.ids = _check_metric(metric, self.reference, inputs)
        # kl: the reference's (log-)probabilities, once (every measured plan compares with them)
        self.log_ref = F.log_softmax(self.reference, dim=-1) if metric == "kl" else None
        self.p_ref = self.log_ref.exp() if metric == "kl" else None
        self.reference_terms = self._terms(self.reference)

    def _terms(self, out: torch.Tensor) -> torch.Tensor:
        """The metric at each position, in text order, whose mean is the metric: per token
        (kl: its KL; ppl: its NLL, nats), per output row (mse: its squared error over the mean
        row's squared norm)."""
        ref = self.reference
        if self.metric == "kl":
            return (self.p_ref * (self.log_ref - F.log_softmax(out, dim=-1))).sum(-1).flatten()
        if self.metric == "ppl":   # ppl = exp(mean NLL)
            return F.cross_entropy(out[:, :-1].flatten(0, 1), self.ids[:, 1:].flatten(),
                                   reduction="none")
        rows = max(ref.numel() // max(ref.shape[-1], 1), 1) if ref.dim() else 1
        error = ((out - ref) ** 2).reshape(rows, -1).sum(-1)
        return error * rows / (ref ** 2).sum().clamp_min(1e-30)

    def change(self, weights: dict[fx.Node, torch.Tensor]) -> torch.Tensor:
        """Per position, the metric with ``weights`` in place of those linears' weights (ppl:
        the NLL's change, so that means add and exp(sum) - 1 is the ppl change)."""
        dirty = _downstream(self.gm, weights)
        if self.output not in dirty:   # dead linears
            return torch.zeros_like(self.reference_terms)
        with torch.no_grad():
            out = _flat(_Run(self.gm, self.base, dirty, weights).run())[self.index].float()
        terms = self._terms(out)
        return terms - self.reference_terms if self.metric == "ppl" else terms

    def cost(self, weights: dict[fx.Node, torch.Tensor]) -> float:
        """The metric's mean change with ``weights`` in place (kl, mse: >= 0)."""
        return float(self.change(weights).mean())

    def bound(self, budget: float) -> float:
        """The budget in :meth:`cost`'s units."""
        return math.log1p(budget) if self.metric == "ppl" else budget

    def in_budget_units(self, cost: float) -> float:
        """The inverse of :meth:`bound` (a summed NLL change as a relative ppl change)."""
        return math.expm1(cost) if self.metric == "ppl" else cost


def _flat(outputs: Any) -> list:
    return list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]


def _first_float(outputs: Any) -> int:
    for i, out in enumerate(_flat(outputs)):
        if isinstance(out, torch.Tensor) and out.is_floating_point():
            return i
    raise BudgetError("quantize='auto' measures the graph's first floating-point output, and "
                      "this graph returns none")


def _check_metric(metric: str, out: torch.Tensor, inputs: Sequence) -> Optional[torch.Tensor]:
    """The token ids ``ppl`` scores, after checking the output suits ``metric``."""
    if metric == "mse":
        return None
    tokens = [t for t in inputs if isinstance(t, torch.Tensor) and not t.is_floating_point()
              and t.dtype != torch.bool]
    vocab = out.shape[-1] if out.dim() else 0
    if vocab < 2 or not tokens or any(int(t.max()) >= vocab or int(t.min()) < 0
                                      for t in tokens if t.numel()):
        raise BudgetError(f"accuracy_budget {metric!r} ({BUDGET_METRICS[metric]}) needs logits "
                          f"[..., vocab] of integer token ids; this graph's output is "
                          f"{list(out.shape)} with inputs {[_describe(t) for t in inputs]}: use "
                          "{'mse': ...} (relative squared error of the output)")
    if metric == "ppl":
        ids = next((t for t in tokens if tuple(t.shape) == tuple(out.shape[:-1])), None)
        if ids is None or ids.dim() != 2 or ids.shape[1] < 2:
            raise BudgetError(f"accuracy_budget 'ppl' scores next-token logits [B, T, V] of ids "
                              f"[B, T >= 2]; got logits {list(out.shape)} and inputs "
                              f"{[_describe(t) for t in inputs]}: use {{'kl': ...}}")
        return ids.long()
    return None


def _describe(value: Any) -> str:
    return f"{value.dtype} {list(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__


def _downstream(gm: fx.GraphModule, linears: Any) -> frozenset:
    """The nodes whose values change when ``linears`` change (themselves included)."""
    dirty = set(linears)
    for node in gm.graph.nodes:
        if node not in dirty and any(i in dirty for i in node.all_input_nodes):
            dirty.add(node)
    return frozenset(dirty)


def _reused(gm: fx.GraphModule, groups: Sequence[set]) -> frozenset:
    """The nodes whose fp32 values a perturbed run of any of ``groups`` reads: inputs of its
    downstream nodes that are not downstream themselves."""
    reused = set()
    for group in groups:
        dirty = _downstream(gm, group)
        reused.update(i for node in dirty for i in node.all_input_nodes if i not in dirty)
    return frozenset(reused)


def fake_quantized(weight_kn: torch.Tensor, scheme: str, names: str) -> torch.Tensor:
    """The [K, N] fp32 values a linear quantized by ``scheme`` multiplies by (its group divides
    K: :func:`candidate` offers no other)."""
    from fxforge.passes.quantize import _encode
    fmt, codes, scales, offsets = _encode(weight_kn.t(), scheme, names)
    return decode(codes.t(), fmt, scales.t(), offsets.t() if offsets is not None else None)


@dataclass
class Unit:
    """Linears whose sensitivity is measured together and which get one format."""
    name: str
    members: list[Candidate]
    formats: list[str]        # the quantized formats every member offers

    def weights(self, fmt: str) -> dict[fx.Node, torch.Tensor]:
        return {c.linear.node: fake_quantized(c.weight_kn, c.schemes[fmt], c.names)
                for c in self.members}


def _block(names: str) -> str:
    """A weight's block: its name up to the first numbered module (``model.layers.3``)."""
    found = re.match(r"(.*?\.\d+)\.", names.split(",")[0])
    return found.group(1) if found else names


def units_of(candidates: list[Candidate]) -> list[Unit]:
    """One unit per linear, or per block (``_block``) beyond :data:`MAX_SINGLE_LINEARS`
    linears: measuring a linear re-runs the graph after it once per format, so per linear
    costs (linears x formats) half-graph runs (SmolLM2: 121 x 4); per block, a quarter of that."""
    key = (lambda c: c.names) if len(candidates) <= MAX_SINGLE_LINEARS else (lambda c: _block(c.names))
    groups: dict[str, list[Candidate]] = {}
    for cand in candidates:
        groups.setdefault(key(cand), []).append(cand)
    return [Unit(name, members, [f for f in members[0].schemes
                                 if all(f in c.schemes for c in members)])
            for name, members in groups.items()]


def _sensitivities(scorer: Scorer, units: list[Unit]) -> list[dict[str, float]]:
    """Per unit: format -> the metric with that unit alone quantized (dense: 0)."""
    return [{DENSE: 0.0, **{fmt: scorer.cost(unit.weights(fmt)) for fmt in unit.formats}}
            for unit in units]


def _layer_seconds(candidates: list[Candidate]) -> list[dict[str, float]]:
    """Per candidate: format -> seconds per token (one measurement per shape)."""
    speeds: dict[tuple, dict] = {}
    for cand in candidates:
        shape = (*cand.weight_kn.shape, DENSE, *cand.schemes)
        if shape not in speeds:
            speeds[shape] = layer_seconds(shape[0], shape[1], shape[2:])
    return [speeds[(*c.weight_kn.shape, DENSE, *c.schemes)] for c in candidates]


def auto_formats(ir: IRGraph, candidates: list[Candidate], budget: tuple[str, float]) -> list:
    """The scheme (or None: fp32) for each candidate, and the report in ``ir.info``."""
    metric, bound = budget
    inputs = calibration_inputs()
    if inputs is None or len(inputs) != len(ir.placeholders()):
        log.warning("quantize auto: no calibration inputs (the compile's example inputs) to "
                    "measure the accuracy budget on; %d linears stay fp32", len(candidates))
        return [None] * len(candidates)
    started = time.perf_counter()
    units = units_of(candidates)
    scorer = Scorer(ir, inputs, metric, [{c.linear.node for c in u.members} for u in units])
    speed = dict(zip(map(id, candidates), _layer_seconds(candidates)))
    seconds = [{f: sum(speed[id(c)][f] for c in unit.members) for f in (DENSE, *unit.formats)}
               for unit in units]
    costs = _sensitivities(scorer, units)
    log.info("quantize auto: %d units, %d runs of the graph after them, in %.1f s",
             len(units), sum(len(u.formats) for u in units), time.perf_counter() - started)

    means: dict[tuple, float] = {}

    def upper(plan: list[str]) -> float:
        """The plan's whole change on the calibration inputs: its upper confidence bound
        (what the budget holds), its mean kept for the report."""
        weights: dict = {}
        for unit, fmt in zip(units, plan):
            weights.update(unit.weights(fmt) if fmt != DENSE else {})
        change = scorer.change(weights)
        means[tuple(plan)] = float(change.mean())
        return upper_bound(change)

    formats, total, rounds = plan_within(costs, seconds, scorer.bound(bound), upper)
    chosen = {id(c): fmt for unit, fmt in zip(units, formats) for c in unit.members}
    _report(ir, units, formats, costs, speed, budget, scorer, (means.get(tuple(formats), 0.0), total),
            rounds)
    return [None if chosen[id(c)] == DENSE else c.schemes[chosen[id(c)]] for c in candidates]


def _report(ir: IRGraph, units: list[Unit], formats: list[str], costs: list, speed: dict,
            budget: tuple[str, float], scorer: Scorer, measured: tuple[float, float],
            rounds: int) -> None:
    """``ir.info[INFO_KEY]`` (plain data): per layer its format, bytes, the measured change of
    its unit (in the budget's units) and microseconds per token; the plan's totals (its mean
    change and the upper confidence bound the budget held)."""
    layers = {}
    for unit, fmt, cost in zip(units, formats, costs):
        for cand in unit.members:
            k, n = cand.weight_kn.shape
            times = speed[id(cand)]
            layers[cand.names] = {"format": fmt, "K": k, "N": n, "unit": unit.name,
                                  "bytes": bytes_per_call(k, n, fmt),
                                  "delta": scorer.in_budget_units(cost[fmt]),
                                  "us": times[fmt] * 1e6, "dense_us": times[DENSE] * 1e6}
    predicted = sum(max(c[f], 0.0) for c, f in zip(costs, formats))
    ir.info[INFO_KEY] = {"metric": scorer.metric, "budget": budget[1],
                         "measured": scorer.in_budget_units(measured[0]),
                         "upper": scorer.in_budget_units(measured[1]),
                         "predicted": scorer.in_budget_units(predicted), "rounds": rounds,
                         "units": len(units), "layers": layers}
    log.info("quantize auto: %s %.4g measured, %.4g upper bound (budget %g) in %d round(s); %s",
             scorer.metric, ir.info[INFO_KEY]["measured"], ir.info[INFO_KEY]["upper"], budget[1],
             rounds,
             {f: formats.count(f) for f in sorted(set(formats))})


def candidate(linear: Linear, names: str, weight_kn: torch.Tensor) -> Candidate:
    """The candidate formats of one linear: those whose group divides its K."""
    from fxforge.passes.quantize import parse_scheme
    fits = formats_for(weight_kn.shape[0])
    schemes = {scheme.split(":")[0]: scheme for scheme in map(parse_scheme, CANDIDATES)}
    return Candidate(linear, names, weight_kn, {f: s for f, s in schemes.items() if f in fits})
