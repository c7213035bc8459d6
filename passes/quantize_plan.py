"""``quantize="auto"``'s budget, speed table and choice (``passes/quantize_auto.py`` measures
the accuracy side and applies the plan).

* :func:`parse_budget`: ``accuracy_budget={"kl": 0.01}`` (mean KL divergence of the next-token
  distributions against fp32, nats), ``{"ppl": 0.02}`` (relative perplexity increase: +2%) or
  ``{"mse": 1e-3}`` (the output's squared error relative to its squared norm) -> ``("kl", 0.01)``.
* :func:`layer_seconds`: seconds per call at M = 1 (one decode token) of each candidate format
  on one ``K x N`` shape, from the measurement installed by :func:`measuring_speed` (the compile
  driver installs the CPU backend's kernel timings, ``fxforge/quant_speed.py``; tests inject
  their own and never time anything), else the bytes read.
* :func:`choose`: per layer the format that minimises the summed seconds subject to the summed
  accuracy cost staying within the budget: a multiple-choice knapsack solved exactly by dynamic
  programming over the budget cut into :data:`BUDGET_STEPS` units (each layer's cost rounded
  *up* to whole units, so a choice that fits in units fits in the real budget).
* :func:`upper_bound`: what a plan's measured total is held to. The budget bounds the metric on
  the user's text, of which the calibration inputs are a sample: a plan is accepted when a
  one-sided 90% upper confidence bound on its mean stays within the budget, not the sample mean
  alone (which let a plan at 0.0500 on calibration score 0.0509 on the text that followed it).
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import math
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import torch

log = logging.getLogger("fxforge.passes.quantize")

BUDGET_METRICS = {"kl": "mean next-token KL divergence vs fp32 (nats)",
                  "ppl": "relative perplexity increase vs fp32",
                  "mse": "output squared error relative to its squared norm"}
BUDGET_STEPS = 1000
BACKOFF_ROUNDS = 6
# Student's t at one-sided 90% for 1..15 degrees of freedom: the bound over contiguous chunks.
T90 = (3.078, 1.886, 1.638, 1.533, 1.476, 1.440, 1.415, 1.397, 1.383, 1.372, 1.363, 1.356,
       1.350, 1.345, 1.341)
CONFIDENCE_CHUNKS = len(T90) + 1
DENSE = "dense"
# What a layer may become, fastest last on CPUs where bytes decide; "dense" keeps fp32.
CANDIDATES = ("int8", "int4:g128", "int4:g64", "int4:g32")
Seconds = dict[str, float]                      # format -> seconds per call at M = 1
Measure = Callable[[int, int, Sequence[str]], Seconds]   # (K, N, formats) -> seconds
_MEASURE: contextvars.ContextVar[Optional[Measure]] = contextvars.ContextVar(
    "fxforge_quant_auto_measure", default=None)


class BudgetError(ValueError):
    """An accuracy budget that names no known metric or no usable bound."""


def parse_budget(spec: Any) -> Optional[tuple[str, float]]:
    """``{"kl": 0.01}`` (or the parsed ``("kl", 0.01)``, back from JSON as a list) -> the pair."""
    if spec is None:
        return None
    if isinstance(spec, Mapping):
        items = list(spec.items())
    elif isinstance(spec, (tuple, list)) and len(spec) == 2 and isinstance(spec[0], str):
        items = [tuple(spec)]
    else:
        raise BudgetError(f"accuracy_budget must be a dict like {{'kl': 0.01}}, got {spec!r}")
    if len(items) != 1:
        raise BudgetError(f"accuracy_budget names one metric, got {len(items)}: {spec!r}")
    metric, bound = items[0]
    if metric not in BUDGET_METRICS:
        raise BudgetError(f"unknown accuracy_budget metric {metric!r}; one of "
                          + ", ".join(f"{k!r} ({v})" for k, v in BUDGET_METRICS.items()))
    if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not math.isfinite(bound) \
            or bound < 0:
        raise BudgetError(f"accuracy_budget {metric!r} must be a finite number >= 0, got {bound!r}")
    return metric, float(bound)


def upper_bound(terms: torch.Tensor) -> float:
    """A one-sided 90% upper confidence bound on the mean of ``terms`` (per position values in
    text order). Neighbouring tokens' errors are correlated, so the spread comes from the means
    of up to :data:`CONFIDENCE_CHUNKS` contiguous chunks, not from single tokens; with fewer
    than two positions the mean itself."""
    terms = terms.detach().double().flatten()
    mean = float(terms.mean()) if terms.numel() else 0.0
    chunks = min(CONFIDENCE_CHUNKS, terms.numel())
    if chunks < 2:
        return mean
    means = torch.stack([c.mean() for c in torch.tensor_split(terms, chunks)])
    return mean + T90[chunks - 2] * float(means.std()) / math.sqrt(chunks)


# ---- speed -----------------------------------------------------------------------------------

@contextlib.contextmanager
def measuring_speed(measure: Measure) -> Iterator[None]:
    """Use ``measure`` instead of timing kernels (tests; a bench with its own timer)."""
    token = _MEASURE.set(measure)
    try:
        yield
    finally:
        _MEASURE.reset(token)


def installed_measure() -> Optional[Measure]:
    """The measurement :func:`measuring_speed` installed in this context, or None."""
    return _MEASURE.get()


def formats_for(k: int) -> tuple[str, ...]:
    """:data:`DENSE` and the :data:`CANDIDATES`' formats whose group divides ``k``."""
    from fxforge.irgraph.weight_format import weight_format
    from fxforge.passes.quantize import parse_scheme
    formats = [parse_scheme(s).split(":")[0] for s in CANDIDATES]
    return (DENSE, *(f for f in formats if not k % (weight_format(f).group or k)))


def bytes_per_call(k: int, n: int, fmt: str) -> int:
    """Bytes of weight one call reads (codes, scales, offsets; fp32 for dense)."""
    from fxforge.irgraph.weight_format import weight_format
    bits = 32 if fmt == DENSE else weight_format(fmt).bits_per_weight
    return int(k * n * bits / 8)


def bytes_seconds(k: int, n: int, formats: Sequence[str], why: str) -> Seconds:
    """The bytes read standing in for the time (a bandwidth-bound decode), when nothing can be
    measured: ``why`` is logged."""
    log.warning("quantize auto: %s; bytes read per token stand in for speed", why)
    return {fmt: bytes_per_call(k, n, fmt) * 1e-10 for fmt in formats}


def layer_seconds(k: int, n: int, formats: Sequence[str]) -> Seconds:
    """Seconds per M = 1 call of each of ``formats`` on a ``K x N`` weight, from the
    measurement :func:`measuring_speed` installed (the compile driver installs the CPU
    backend's, ``fxforge/quant_speed.py``; tests their own), else the bytes read."""
    measure = _MEASURE.get()
    if measure is None:
        return bytes_seconds(k, n, formats, "no speed measurement for this backend")
    return {fmt: float(t) for fmt, t in measure(k, n, list(formats)).items()}


# ---- the choice --------------------------------------------------------------------------------

def choose(costs: Sequence[Mapping[str, float]], seconds: Sequence[Mapping[str, float]],
           budget: float) -> list[str]:
    """Per layer the format minimising the summed seconds with the summed cost within ``budget``.

    ``costs[i][fmt]``: the accuracy cost of layer i in ``fmt`` alone (a negative one counts as
    0: noise that happened to help is not budget to spend); ``seconds[i][fmt]``: its time. Every
    layer must offer :data:`DENSE` at cost 0. Costs are assumed additive across layers (the
    caller verifies the plan's real total). Exact over costs rounded up to ``budget /
    BUDGET_STEPS``; ties go to the fewer seconds, then the lower cost, then the format name, so
    the same tables give the same plan."""
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    unit = budget / BUDGET_STEPS if budget > 0 else None
    best = torch.zeros(BUDGET_STEPS + 1, dtype=torch.float64)   # min seconds within b units
    picks = []
    for cost, time in zip(costs, seconds):
        options = sorted((float(time[f]), max(float(cost[f]), 0.0), f) for f in cost if f in time)
        if DENSE not in {f for _, _, f in options}:
            raise ValueError("every layer must offer the dense format")
        new = torch.full_like(best, math.inf)
        pick = torch.zeros(BUDGET_STEPS + 1, dtype=torch.int16)
        for index, (t, c, _) in enumerate(options):
            units = 0 if c == 0 else (math.ceil(c / unit - 1e-9) if unit else BUDGET_STEPS + 1)
            if units > BUDGET_STEPS:
                continue
            shifted = torch.full_like(best, math.inf)
            shifted[units:] = best[:BUDGET_STEPS + 1 - units] + t
            better = shifted < new
            new[better], pick[better] = shifted[better], index
        best = new
        picks.append((options, pick))
    chosen, b = [], BUDGET_STEPS
    for options, pick in reversed(picks):
        t, c, fmt = options[int(pick[b])]
        chosen.append(fmt)
        b -= 0 if c == 0 else math.ceil(c / unit - 1e-9)
    return chosen[::-1]


def plan_within(costs: Sequence[Mapping[str, float]], seconds: Sequence[Mapping[str, float]],
                limit: float, verify: Callable[[list[str]], float]) -> tuple[list[str], float, int]:
    """(formats, their measured total, rounds): :func:`choose` under ``limit``, then ``verify``
    (the plan's real total, all its layers at once). Where the layers' costs do not add up and
    the total exceeds ``limit``, choose again under a budget shrunk by the overshoot (the layers
    dearest per second saved go back first), at most :data:`BACKOFF_ROUNDS` times; then every
    layer stays dense (cost 0)."""
    target, tried = limit, []
    for rounds in range(1, BACKOFF_ROUNDS + 1):
        formats = choose(costs, seconds, target)
        if formats in tried:   # shrinking changed nothing (costs counted as 0): give up
            break
        measured = verify(formats) if any(f != DENSE for f in formats) else 0.0
        if measured <= limit:
            return formats, measured, rounds
        tried.append(formats)
        target *= min(0.8, limit / measured)
    log.warning("quantize auto: no plan within %g after %d rounds; every candidate stays fp32",
                limit, len(tried))
    return [DENSE] * len(costs), 0.0, len(tried)
