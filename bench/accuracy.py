"""Accuracy on real text, shared by the accuracy benches: fixed windows of CPython's
``pydoc_data.topics`` tokenized for a model, perplexity, next-token KL divergence against a
reference, top-1 agreement and the largest logit difference."""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from fxforge.examples.smollm2 import reference_text


def token_windows(tokenizer, n_windows: int, length: int):
    """``[n_windows, length]`` token ids: consecutive, non-overlapping slices of the text."""
    ids = tokenizer(reference_text(), return_tensors="pt")["input_ids"][0]
    if ids.numel() < n_windows * length:
        raise SystemExit(f"the text has {ids.numel()} tokens, fewer than {n_windows} x {length}")
    return ids[: n_windows * length].view(n_windows, length)


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
