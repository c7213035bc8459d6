"""W8A8 (``quantize="w8a8"``): SmoothQuant-style smoothing (Xiao et al., 2022) from calibration
data, and the outlier guard that keeps a linear weight-only where int8 activations would cost too
much.

Per-token int8 activations lose precision when a few input channels carry values far above the
rest (a row's one scale is set by its largest value). Smoothing moves that range into the weight:
per input channel j, ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` (``alpha`` =
:data:`ALPHA`; ``max|X_j|`` over the calibration rows, ``max|W_j|`` over the weight's output
channels), the weight becomes ``W * s`` (quantized per output channel as ``int8_channel`` is) and
the activations ``x / s``, which the kernel does while it quantizes them (the format's smoothing
vector is ``1 / s``): ``(x / s) (s W) = x W``.

The guard: on the same calibration rows, each W8A8 linear's relative output error from quantizing
its (smoothed) activations alone, ``||(Q(x/s) - x/s) (s W)^T|| / ||x W^T||`` (Frobenius), is
measured; above :data:`GUARD_MAX_ERROR` the linear stays weight-only ``int8_channel`` (INFO log
with its name and the measured error; the pass counts ``w8a8_guarded``).

On SmolLM2-135M (2 x 512 tokens of pydoc_data.topics, bench/quant_accuracy.py) per-token int8
activations without smoothing cost +4.9% perplexity (mean next-token KL 0.038), with it +1.05%
(KL 0.013); int8 weight-only +0.22%.

The calibration rows are the compile's example inputs (``passes/gptq.calibration_inputs``). Without
them there is nothing to smooth by or measure: no smoothing and no guard (logged).

Scheme strings: ``"w8a8"`` (smoothing and guard), ``"w8a8:nosmooth"``, ``"w8a8:noguard"``, both;
parsed to ``"w8a8:smooth+guard"``, ``"w8a8:guard"``, ``"w8a8:smooth"``, ``"w8a8:plain"``.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Optional

import torch
import torch.fx as fx

from fxforge.irgraph import IRGraph
from fxforge.irgraph.weight_format import W8A8, w8a8_quantize_rows
from fxforge.passes.gptq import calibration_inputs, observe_linear_inputs
from fxforge.passes.quantize_math import quantize_int8_channel

log = logging.getLogger("fxforge.passes.quantize")
ALPHA = 0.5
# Relative output error of a linear from its int8 activations above which it stays weight-only.
# Measured on SmolLM2-135M (its 121 linears after projection fusion, 512 calibration tokens of
# pydoc_data.topics): smoothed, every layer lies in 0.006-0.030 (median 0.012; unsmoothed
# 0.011-0.054, median 0.025), and guarding the 14 above 0.02 moved the next-token KL by -7% and
# perplexity by +0.2% (noise): none is an outlier layer. A linear fed an outlier channel that
# smoothing is not given (tests/passes/test_quantize_w8a8.py) measures ~0.6. 0.05 keeps every
# smoothed SmolLM2 layer in W8A8 (1.7x its worst) and catches errors several times the typical one.
GUARD_MAX_ERROR = 0.05
_FLAGS = ("smooth", "guard")
_PLAIN = "plain"


class W8A8SpecError(ValueError):
    """A w8a8 scheme with an unknown modifier."""


def parse_w8a8(text: str) -> str:
    """``"w8a8[:nosmooth][:noguard]"`` (or an already parsed form) -> ``"w8a8:<flags>"``."""
    parts = text.split(":")
    if parts[0] != W8A8:
        raise W8A8SpecError(f"{text!r} is not a w8a8 scheme")
    if len(parts) == 2 and (parts[1] == _PLAIN or set(parts[1].split("+")) <= set(_FLAGS)):
        return text   # parsed already
    flags = set(_FLAGS)
    for modifier in parts[1:]:
        if modifier not in ("nosmooth", "noguard"):
            raise W8A8SpecError(f"unknown w8a8 modifier {modifier!r} in {text!r}; "
                                "use 'w8a8', 'w8a8:nosmooth', 'w8a8:noguard' or both")
        flags.discard(modifier[2:])
    return f"{W8A8}:{'+'.join(f for f in _FLAGS if f in flags) or _PLAIN}"


def scheme_flags(scheme: str) -> tuple[bool, bool]:
    """(smooth, guard) of a parsed w8a8 scheme."""
    flags = scheme.split(":", 1)[1].split("+")
    return "smooth" in flags, "guard" in flags


@dataclasses.dataclass
class W8A8Choice:
    """A linear's calibrated W8A8 plan: its smoothing (``s``, None: none) and, where measured,
    its activation-quantization error; ``guarded``: it stays weight-only int8."""
    s: Optional[torch.Tensor] = None
    error: Optional[float] = None
    guarded: bool = False


def smoothing_factors(act_absmax: torch.Tensor, weight_nk: torch.Tensor,
                      alpha: float = ALPHA) -> torch.Tensor:
    """``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` (fp32 [K]); 1 where a channel is dead
    (never active or all-zero weights) or the ratio is not finite."""
    w_absmax = weight_nk.detach().float().abs().amax(dim=0)
    s = act_absmax.float().pow(alpha) / w_absmax.pow(1 - alpha)
    usable = (act_absmax > 0) & (w_absmax > 0) & torch.isfinite(s) & (s > 0)
    return torch.where(usable, s, torch.ones_like(s))


def activation_error(rows: torch.Tensor, s: torch.Tensor, weight_nk: torch.Tensor) -> tuple:
    """(squared error, squared norm) of the outputs ``rows @ W^T`` from quantizing the smoothed
    rows to int8 per row (the weight kept fp32: the activations' share of the error alone)."""
    smooth = 1 / s
    codes, scales = w8a8_quantize_rows(rows, smooth)
    w_s = weight_nk.detach().float() * s
    delta = (codes.float() * scales.unsqueeze(1) - rows * smooth) @ w_s.t()
    return float(delta.square().sum()), float((rows @ weight_nk.detach().float().t()).square().sum())


def calibrate(ir: IRGraph, wanted: list[tuple[fx.Node, str, str]],
              weight_of: Callable[[fx.Node], torch.Tensor]) -> dict:
    """node -> :class:`W8A8Choice` for the ``(linear node, parsed scheme, name)`` of every
    linear the pass makes W8A8; ``weight_of(node)`` its fp32 ``[N, K]`` weight. Runs the fp32
    graph on the calibration inputs (twice with the guard: absmax, then the errors)."""
    if not wanted:
        return {}
    inputs = calibration_inputs()
    if inputs is None or len(inputs) != len(ir.placeholders()):
        log.warning("quantize: w8a8 smoothing and its outlier guard need the compile's example "
                    "inputs to calibrate on (none here): %d linears are W8A8 without smoothing "
                    "and unguarded", len(wanted))
        return {node: W8A8Choice() for node, _, _ in wanted}
    nodes = [node for node, _, _ in wanted]
    absmax = observe_linear_inputs(ir, inputs, nodes, lambda node, m, x: torch.maximum(
        m, x.abs().amax(dim=0)) if m is not None else x.abs().amax(dim=0))
    choices = {}
    for node, scheme, _ in wanted:
        smooth, _ = scheme_flags(scheme)
        choices[node] = W8A8Choice(smoothing_factors(absmax[node], weight_of(node))
                                   if smooth else None)
    guarded = [node for node, scheme, _ in wanted if scheme_flags(scheme)[1]]
    if guarded:
        def fold(node, acc, x):
            s = choices[node].s if choices[node].s is not None else torch.ones(x.shape[1])
            err, norm = activation_error(x, s, weight_of(node))
            return (acc[0] + err, acc[1] + norm) if acc is not None else (err, norm)
        sums = observe_linear_inputs(ir, inputs, guarded, fold)
        names = {node: name for node, _, name in wanted}
        for node in guarded:
            err, norm = sums[node]
            choice = choices[node]
            choice.error = (err / norm) ** 0.5 if norm > 0 else 0.0
            choice.guarded = not choice.error <= GUARD_MAX_ERROR   # NaN: guarded
            if choice.guarded:
                log.info("quantize: %s: int8 activations would add a %.4f relative output error "
                         "on the calibration rows (> %.4f): weight-only int8", names[node],
                         choice.error, GUARD_MAX_ERROR)
    return choices


def w8a8_choices(ir: IRGraph, plan: list, weight_of: Callable[[fx.Node], torch.Tensor]) -> dict:
    """:func:`calibrate` for the w8a8 entries of the quantize pass's plan ``(Linear, scheme,
    names)``; the other entries are not touched."""
    return calibrate(ir, [(linear.node, scheme, names) for linear, scheme, names in plan
                          if scheme.startswith(W8A8 + ":")], weight_of)


def encode_w8a8(weight_nk: torch.Tensor, choice: W8A8Choice, name: str) -> tuple:
    """(format, codes [N, K], scales [N, 1], smoothing [1, K] or None) in ``[N, ...]`` orientation:
    ``int8_channel`` of the weight itself when the guard kept it weight-only, else ``w8a8`` of
    the smoothed weight with the smoothing vector ``1 / s``."""
    if choice.guarded:
        return ("int8_channel", *quantize_int8_channel(weight_nk, "rtn", name), None)
    k = weight_nk.shape[1]
    s = choice.s if choice.s is not None else torch.ones(k)
    smooth = (1 / s).float()
    codes, scales = quantize_int8_channel(weight_nk.detach().float() / smooth, "rtn", name)
    return W8A8, codes, scales, smooth.reshape(1, k)
