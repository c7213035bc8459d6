"""The feature maps of ``attention="linear:fitted"``: Hedgehog's softmax feature map
``phi(x) = [softmax(x W), softmax(-x W)]`` (Zhang et al., 2024), one ``W [D, M]`` per query head
and one per kv head, fitted per attention site so that the site's linear attention (or LoLCATs'
hybrid, with a window) gives the outputs its softmax attention gives.

Calibration: the compile's example inputs (``passes/gptq.py``'s :func:`calibration_inputs`). One
eager run of the graph (dense attention everywhere, so each layer sees the inputs it was trained
on) stops at each causal self-attention, takes its q, k, v (the first ``FIT_POSITIONS`` positions)
and the softmax outputs as the target, and fits the two maps there with ``steps`` Adam steps on
the mean squared output error, each step on ``FIT_ROWS`` query positions drawn at random (each
against all of its keys: the loss sees the long-range part a chunked form would hide). ``W``
starts as a scaled identity, as Hedgehog's does. Seeded: the same inputs give the same maps.
"""
from __future__ import annotations

import logging
import time

import torch
import torch.nn.functional as F

from fxforge.irgraph import IRGraph
from fxforge.irgraph.linear_ops import attention_weights, feature_map, normalise, with_ones
from fxforge.irgraph.views import Sdpa
from fxforge.passes.attention_spec import causal_self_attention
from fxforge.passes.gptq import calibration_inputs, observe_nodes

log = logging.getLogger("fxforge.passes.attention")

FIT_POSITIONS = 512    # positions of the calibration sequence a fit reads (cost ~ this)
FIT_ROWS = 64          # query rows per Adam step
# SmolLM2 at 2048 tokens: the hybrid (window 64) 75.3 perplexity (1e-2: 87.2), plain linear 194.5
# (1e-2: 177.1): set for the hybrid, the better variant (bench/RESULTS.md)
LEARNING_RATE = 3e-2


def fit_feature_maps(ir: IRGraph, window: int, steps: int) -> dict:
    """SDPA node -> (q_map [H, D, D], k_map [Hkv, D, D]) for every causal self-attention site."""
    inputs = calibration_inputs()
    if inputs is None or len(inputs) != len(ir.placeholders()):
        raise ValueError("attention 'linear:fitted' fits its feature maps on the compile's example "
                         "inputs, and there are none here (compile with example inputs, as "
                         "fxforge.compile and torch.compile do)")
    sites = [n for n in ir.call_nodes()
             if Sdpa.matches(n) and causal_self_attention(ir.gm, n) is True]
    maps: dict = {}
    started = time.perf_counter()

    def visit(node, env):
        sdpa = Sdpa.of(node)
        q, k, v = (env[x].detach().float()[:, :, :FIT_POSITIONS]
                   for x in (sdpa.query, sdpa.key, sdpa.value))
        scale = q.shape[-1] ** -0.5 if sdpa.scale is None else sdpa.scale
        maps[node], error = fit_site(q, k, v, window, scale, steps, seed=len(maps))
        log.info("attention linear:fitted: %s fitted, relative output error %.3f", node.name, error)
    # the softmax feature maps' tails and Adam's moments underflow into subnormals, which cost
    # the CPU ~2x the whole fit: flushed to zero while fitting (torch's default is off)
    torch.set_flush_denormal(True)
    try:
        observe_nodes(ir, inputs, sites, visit)
    finally:
        torch.set_flush_denormal(False)
    log.info("attention linear:fitted: %d sites fitted in %.1f s", len(maps),
             time.perf_counter() - started)
    return maps


def fit_site(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, scale: float,
             steps: int, seed: int = 0) -> tuple[tuple[torch.Tensor, torch.Tensor], float]:
    """The maps of one site, and their relative output error ``|out - softmax| / |softmax|``
    over every position (q ``[B, H, L, D]``, k/v ``[B, Hkv, L, D]``, fp32)."""
    heads, kv_heads, dim, length = q.shape[1], k.shape[1], q.shape[-1], q.shape[2]
    target = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                            enable_gqa=heads != kv_heads)
    # Hedgehog's identity start, at the scale of the softmax's own scores
    start = torch.eye(dim) * scale ** 0.5
    q_map = start.repeat(heads, 1, 1).requires_grad_()
    k_map = start.repeat(kv_heads, 1, 1).requires_grad_()
    optimizer = torch.optim.Adam([q_map, k_map], lr=LEARNING_RATE)
    gen = torch.Generator().manual_seed(seed)
    keys = torch.arange(length)
    with torch.enable_grad():
        for _ in range(steps):
            rows = torch.randperm(length, generator=gen)[:FIT_ROWS].sort().values
            out = _outputs(q[:, :, rows], k, v, rows, keys, window, scale, q_map, k_map)
            loss = F.mse_loss(out, target[:, :, rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        out = _outputs(q, k, v, keys, keys, window, scale, q_map, k_map)
        error = float((out - target).norm() / target.norm())
    return (q_map.detach().clone(), k_map.detach().clone()), error


def _outputs(q, k, v, rows, keys, window, scale, q_map, k_map) -> torch.Tensor:
    weights = attention_weights(q, k, feature_map(q, "fitted", q_map),
                                feature_map(k, "fitted", k_map), rows, keys, window, scale)
    return normalise(weights @ with_ones(v).unsqueeze(2), q.shape[1])
