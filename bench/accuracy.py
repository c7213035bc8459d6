"""Accuracy on real text, shared by the accuracy benches: fixed windows of CPython's
``pydoc_data.topics`` tokenized for a model, perplexity, next-token KL divergence against a
reference, top-1 agreement and the largest logit difference."""
from __future__ import annotations

import math
import sys
import time

import torch
import torch.nn.functional as F

from fxforge.calibration import calibration_text
from fxforge.irgraph.views import Linear
from fxforge.irgraph.weight_format import weight_format
from fxforge.examples.smollm2 import load_smollm2, smollm2_status


def token_windows(tokenizer, n_windows: int, length: int):
    """``[n_windows, length]`` token ids: consecutive, non-overlapping slices of the text
    (fxforge's own real-text calibration windows, ``fxforge.calibration``)."""
    ids = calibration_text(tokenizer, n_windows * length, n_windows)
    if ids.numel() < n_windows * length:
        raise SystemExit(f"the text has {ids.numel()} tokens, fewer than {n_windows} x {length}")
    return ids


def smollm2_windows(n_windows: int, length: int):
    """(SmolLM2, scored windows ``[n_windows, length]``, a calibration window ``[1, length]``
    that follows them and is never scored), or None when SmolLM2 cannot load (reason printed)."""
    available, reason = smollm2_status()
    if not available:
        print(f"SmolLM2 unavailable: {reason}", file=sys.stderr)
        return None
    model, tokenizer = load_smollm2(progress=False)
    *scored, calibration = token_windows(tokenizer, n_windows + 1, length)
    return model, torch.stack(scored), calibration.unsqueeze(0)


def run_windows(forward, windows) -> tuple:
    """(logits ``[n_windows, length, vocab]``, seconds of the first call): one batch-1 window per
    call, so a compiler sees one static shape and compiles on the first call."""
    logits, first_s = [], 0.0
    for window in windows:
        start = time.perf_counter()
        logits.append(forward(window.unsqueeze(0)))
        first_s = first_s or time.perf_counter() - start
    return torch.cat(logits), first_s


def score(logits, windows, eager_logits) -> dict:
    """Perplexity of ``windows`` under ``logits``, and how far ``logits`` are from eager's."""
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), windows[:, 1:].flatten(), reduction="sum")
    diff = (logits - eager_logits).abs().max() / eager_logits.abs().max()
    agree = (logits.argmax(-1) == eager_logits.argmax(-1)).float().mean()
    return {"perplexity": math.exp(nll.item() / windows[:, 1:].numel()),
            "max_rel_logit_diff": diff.item(), "top1_agreement": agree.item()}


def next_token_kl(logits, reference_logits) -> float:
    """Mean over positions of KL(reference || logits) of the next-token distributions (nats)."""
    ref = F.log_softmax(reference_logits.float(), dim=-1)
    got = F.log_softmax(logits.float(), dim=-1)
    return float((ref.exp() * (ref - got)).sum(-1).mean())


def linear_shapes(graphs) -> list[tuple[str, int, int, float]]:
    """(weight format, K, N, stored bits per weight with scales and offsets) of every linear of
    the compiled ``graphs`` (``fxforge.compiler.recording``)."""
    found = []
    for graph in graphs:
        for node in graph.ir.gm.graph.nodes:
            if (linear := Linear.of(node)) is None:
                continue
            fmt, meta = weight_format(linear.weight_format), linear.weight.meta["val"]
            k = fmt.in_features(meta) if fmt.code_dtype is not None else meta.shape[0]
            found.append((fmt.name, k, meta.shape[1], fmt.bits_per_weight or meta.element_size() * 8))
    return found
