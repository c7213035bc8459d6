"""GPTQ rounding (Frantar et al., 2022): quantize a weight one input column at a time and spread
each column's rounding error onto the columns not yet quantized, weighted by the inverse of the
layer's input Hessian ``H = X^T X`` measured on calibration inputs. Columns the calibration
activations use little absorb the error of those they use much, so the layer's *outputs* on such
inputs move less than round to nearest moves them; no training, one pass over the weight.

The calibration inputs are the compile's own example inputs (``fxforge.compile``'s
``example_inputs``, the first call's inputs under ``torch.compile``, ``aot_compile``'s example),
set by the orchestrator with :func:`calibrating` while the passes run; :func:`linear_hessians`
runs the graph on them once, eagerly, and sums ``X^T X`` at every ``fxforge::linear``.

Group parameters (int4: an fp16 scale and offset per group of G columns) are round to nearest's
(``quantize_math.int4_range``: the group's min and max) as the weight stands when the group's
first column is reached (earlier columns' errors included), as the paper's grouped variant does;
int8 keeps one scale per output row (``quantize_math.int8_scale``), fitted before the first
column.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.fx as fx

from fxforge.irgraph import IRGraph
from fxforge.irgraph.views import LinearOperands
from fxforge.passes.quantize_math import int4_codes, int4_range, int8_codes, int8_scale

DAMPING = 0.01   # of the Hessian's mean diagonal: keeps the Cholesky factorisation stable
BLOCK = 128      # columns updated lazily as one block (the paper's batching); groups divide it
_INPUTS: contextvars.ContextVar[Optional[tuple]] = contextvars.ContextVar("fxforge_calibration",
                                                                          default=None)


@contextlib.contextmanager
def calibrating(inputs: Optional[Sequence]) -> Iterator[None]:
    """The graph's runtime inputs to calibrate on while passes run in this context."""
    token = _INPUTS.set(tuple(inputs) if inputs is not None else None)
    try:
        yield
    finally:
        _INPUTS.reset(token)


def calibration_inputs() -> Optional[tuple]:
    return _INPUTS.get()


class _Observer(fx.Interpreter):
    """Runs the graph, calling ``visit(node, env)`` before each wanted node runs (``env``: the
    values computed so far, by node), or ``after(node, value)`` once it ran."""

    def __init__(self, gm: fx.GraphModule, wanted: set, visit: Optional[Callable],
                 after: Optional[Callable] = None):
        super().__init__(gm)
        self.wanted, self.visit, self.after = wanted, visit, after

    def run_node(self, node: fx.Node):
        if node in self.wanted and self.visit is not None:
            self.visit(node, self.env)
        value = super().run_node(node)
        if node in self.wanted and self.after is not None:
            self.after(node, value)
        return value


def observe_nodes(ir: IRGraph, inputs: Sequence, nodes: Sequence[fx.Node], visit: Callable) -> None:
    """``visit(node, env)`` at each of ``nodes`` in one eager run of ``ir`` on ``inputs`` (walks
    the graph: no generated code needed)."""
    with torch.no_grad():
        _Observer(ir.gm, set(nodes), visit).run(*inputs)


def observe_values(ir: IRGraph, inputs: Sequence, nodes: Sequence[fx.Node], after: Callable) -> None:
    """``after(node, value)`` with the value each of ``nodes`` computes in one eager run."""
    with torch.no_grad():
        _Observer(ir.gm, set(nodes), None, after).run(*inputs)


def observe_linear_inputs(ir: IRGraph, inputs: Sequence, nodes: Sequence[fx.Node],
                          fold: Callable) -> dict:
    """node -> ``fold(node, value so far or None, rows)`` over the activations ``[rows, K]``
    (fp32) each of ``nodes`` (``fxforge::linear``, ``mm``, ``addmm``: ``LinearOperands``)
    multiplies in one eager run of ``ir`` on ``inputs``."""
    values: dict = {}

    def visit(node, env):
        x = env[LinearOperands.of(node).x].detach().float()
        values[node] = fold(node, values.get(node), x.reshape(-1, x.shape[-1]))
    observe_nodes(ir, inputs, nodes, visit)
    return values


def linear_hessians(ir: IRGraph, inputs: Sequence, nodes: Sequence[fx.Node]) -> dict:
    """``X^T X`` (fp32 ``[K, K]``) of the activations each of ``nodes`` multiplies, summed over
    the rows of one eager run of ``ir`` on ``inputs``."""
    return observe_linear_inputs(ir, inputs, nodes, lambda node, h, x: x.t() @ x + (
        h if h is not None else 0))


def _inverse_factor(hessian: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The upper Cholesky factor of ``H^-1`` (damped; dead inputs' columns zeroed in ``weight``)."""
    h = hessian.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    weight[:, dead] = 0
    h += DAMPING * torch.diag(h).mean() * torch.eye(h.shape[0])
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


def gptq_quantize(weight_nk: torch.Tensor, hessian: torch.Tensor, group: Optional[int]) -> tuple:
    """int4 (``group``) -> (codes uint8 [N, K], scales, offsets fp16 [N, K/group]); int8 per
    channel (``group`` None) -> (codes int8 [N, K], scales fp16 [N, 1])."""
    w = weight_nk.detach().float().clone()
    n, k = w.shape
    hinv = _inverse_factor(hessian, w)
    codes = torch.empty(n, k)
    if group is None:
        scale = int8_scale(w).squeeze(1)
        offset = torch.zeros(n)
        scales, offsets = scale.unsqueeze(1), None
    else:
        scales, offsets = torch.empty(n, k // group), torch.empty(n, k // group)
    for start in range(0, k, BLOCK):
        stop = min(k, start + BLOCK)
        block, errors = w[:, start:stop].clone(), torch.zeros(n, stop - start)
        for i in range(stop - start):
            column = start + i
            if group is not None and column % group == 0:   # a group lies within one block
                scale, offset = (t.squeeze(1) for t in int4_range(block[:, i:i + group]))
                scales[:, column // group], offsets[:, column // group] = scale, offset
            q = int8_codes(block[:, i], scale) if group is None else \
                int4_codes(block[:, i], scale, offset)
            codes[:, column] = q
            error = (block[:, i] - (q * scale + offset)) / hinv[column, column]
            block[:, i:] -= error.unsqueeze(1) * hinv[column, column:stop].unsqueeze(0)
            errors[:, i] = error
        w[:, stop:] -= errors @ hinv[start:stop, stop:]
    if group is None:
        return codes.to(torch.int8), scales.to(torch.float16)
    return codes.to(torch.uint8), scales.to(torch.float16), offsets.to(torch.float16)
