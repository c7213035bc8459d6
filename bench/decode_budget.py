"""Where a batch-1 decode token's time goes, against the memory-bandwidth limit.

Used by ``bench/generate.py``: a decode step must read every weight a token passes through
(and the KV cache so far), so ``bytes per token / measured read bandwidth`` is the least time a
token can take. :func:`bytes_per_token` counts those bytes, :func:`read_bandwidth` measures the
bandwidth the way a decode step reads (a sum over a buffer far larger than the caches), and
:func:`step_breakdown` times, during one real ``fxforge.generate`` call, the kernels of the
compiled step by kind (the linears, the attention, the fused pointwise/norm groups) and splits the
rest of a token, its per-token overhead, by layer: the generate loop's sampling, dynamo's guards
and wrappers, fxforge's entry (the frozen weights' check), the KV runtime and the replay loop.
"""
from __future__ import annotations

import collections
import statistics
import time
from contextlib import contextmanager

import torch

import fxforge


def bytes_per_token(model: torch.nn.Module, position: int, linear_itemsize: float = 0,
                    head_itemsize: float = 0) -> int:
    """Weights a decode step reads (an embedding table only as one row unless a linear also
    uses it, as tied LM heads do) plus the K/V cache up to ``position``; ``linear_itemsize``:
    bytes per linear weight where they are stored in another format (2: bf16 weights; 0.625:
    int4 g32 with its scales and offsets), ``head_itemsize`` the same for a tied LM head."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    matmul_weights = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    total, seen = 0, set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        rows_only = id(p) in embeddings and id(p) not in matmul_weights
        itemsize = p.element_size()
        if linear_itemsize and id(p) in matmul_weights:
            tied_head = id(p) in embeddings and head_itemsize
            itemsize = head_itemsize if tied_head else linear_itemsize
        total += (p[0].numel() if rows_only else p.numel()) * itemsize
    config = model.config
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    itemsize = next(model.parameters()).element_size()   # the caches take the model's dtype
    kv = 2 * config.num_hidden_layers * heads * head_dim * position * itemsize
    return total + kv


def read_bandwidth(megabytes: int = 512, rounds: int = 7) -> float:
    """Bytes/s of a torch ``sum`` over a fresh fp32 buffer (median of rounds)."""
    buffer = torch.rand(megabytes * 2 ** 20 // 4)
    buffer.sum()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        buffer.sum()
        times.append(time.perf_counter() - start)
    return buffer.numel() * 4 / statistics.median(times)


@contextmanager
def _timing(targets: dict[str, tuple[type, str]]):
    """Accumulate wall time per label while the wrapped methods run (restored on exit)."""
    spent: collections.Counter = collections.Counter()
    originals = []
    for label, (cls, name) in targets.items():
        original = getattr(cls, name)
        originals.append((cls, name, original))

        def timed(self, *args, _original=original, _label=label, **kwargs):
            start = time.perf_counter()
            try:
                return _original(self, *args, **kwargs)
            finally:
                spent[_label] += time.perf_counter() - start
        setattr(cls, name, timed)
    try:
        yield spent
    finally:
        for cls, name, original in originals:
            setattr(cls, name, original)


def _kind(label: str) -> str:
    """A replayed step's kind, from its label (a kernel's C symbol or ``aten:<op>``)."""
    if label.startswith("aten:"):
        return "ATen ops"
    if "gemv" in label or "gemm" in label:   # fxf_gemv, fxf_gemm: the C++ linears
        return "linears"
    return "attention" if "attention" in label else "fused groups"


def _timed_replay(spent: collections.Counter):
    """A ``Recording.replay`` that adds each step's time to ``spent`` under its kind, and the
    whole replay (input copies and the Python loop included) under ``replay``."""
    from fxforge.kernels.replay import Recording

    def replay(self, args):
        clock = time.perf_counter
        begin = clock()
        self.load_inputs(args)
        for step, label in zip(self.steps, self.labels):
            start = clock()
            step()
            spent[_kind(label)] += clock() - start
        spent["replay"] += clock() - begin
        return self.outputs
    return (Recording, "replay", replay)


class _TimedModel:
    """``module(ids)`` with its time added to ``spent["model call"]``: what ``fxforge.generate``
    waits for, dynamo's guards and wrappers included (the cache keys on the ids, not on this)."""

    def __init__(self, module, spent: collections.Counter):
        self.module, self.spent = module, spent

    def __call__(self, ids):
        start = time.perf_counter()
        try:
            return self.module(ids)
        finally:
            self.spent["model call"] += time.perf_counter() - start


KERNEL_KINDS = ("linears", "attention", "fused groups", "ATen ops")
OVERHEAD = "per-token overhead"   # a token's time outside the kernels


def step_breakdown(compiled, prompt: torch.Tensor, new_tokens: int) -> dict[str, float]:
    """Milliseconds per decode token by kind, from one ``fxforge.generate`` on the CPU backend
    (the prefill, timed separately, is subtracted). Op-by-op steps are timed at the kernels'
    Python entry points (their call overhead included); replayed steps per replayed kernel.
    Outside the kernels, from the outside in: the generate loop (sampling, appending the token),
    dynamo (guard evaluation, its and AOT autograd's wrappers), fxforge's entry (the frozen
    weights' check, argument lists), the KV runtime (session/state lookup, the extension check,
    the state's bookkeeping, copying the new logits out) and the replay's own loop."""
    from fxforge.compiler import CompiledGraph
    from fxforge.kernels.decode_attention_cpu import CpuDecodeAttention
    from fxforge.kernels.fused_cpp import CpuFusedKernel
    from fxforge.kernels.linear_cpu import PackedLinear
    from fxforge.kernels.quant_linear_cpu import QuantLinear
    from fxforge.kv_runtime import IncrementalDecoder
    targets = {"linears": (PackedLinear, "__call__"), "quantized linears": (QuantLinear, "__call__"),
               "attention": (CpuDecodeAttention, "__call__"),
               "fused groups": (CpuFusedKernel, "__call__"), "step": (IncrementalDecoder, "__call__"),
               "entry": (CompiledGraph, "__call__")}
    runs = {}
    for tokens in (1, new_tokens):
        with _timing(targets) as spent:
            cls, name, replay = _timed_replay(spent)
            original = getattr(cls, name)
            setattr(cls, name, replay)
            try:
                start = time.perf_counter()
                fxforge.generate(_TimedModel(compiled, spent), prompt, tokens)
                spent["token"] = time.perf_counter() - start
            finally:
                setattr(cls, name, original)
        runs[tokens] = spent
    keys = set(runs[1]) | set(runs[new_tokens])
    per = {k: (runs[new_tokens][k] - runs[1][k]) / (new_tokens - 1) * 1e3 for k in keys}
    per["linears"] = per.get("linears", 0.0) + per.pop("quantized linears", 0.0)   # one kind
    return _outside_the_kernels(per)


def _outside_the_kernels(per: dict[str, float]) -> dict[str, float]:
    """The breakdown's rows from the nested timings (each part = its timer minus the one inside)."""
    inside = sum(per.get(k, 0.0) for k in KERNEL_KINDS)
    step, replayed = per.get("step", 0.0), per.get("replay", 0.0)
    out = {"token": per["token"], **{k: per.get(k, 0.0) for k in KERNEL_KINDS}}
    out["replay loop, op-by-op glue"] = (replayed if replayed > 0 else step) - inside
    out["KV runtime (state, extension check, logits copy)"] = step - replayed if replayed > 0 else 0.0
    out["fxforge entry (weights check, arguments)"] = per.get("entry", 0.0) - step
    out["dynamo (guards, wrappers)"] = per.get("model call", 0.0) - per.get("entry", 0.0)
    out["generate loop (sampling, ids append)"] = per["token"] - per.get("model call", 0.0)
    out[OVERHEAD] = per["token"] - inside
    return out


def _stored_itemsize(label: str) -> tuple[float, float]:
    """(bytes per linear weight, per tied-head weight) of a runner's format, or (0, 0) for fp32:
    from the runner's label (``bench/generate.py``'s) and the formats' registry."""
    from fxforge.irgraph.weight_format import FORMATS
    from fxforge.passes.quantize import parse_scheme
    if label.endswith(" bf16"):
        return 2, 2
    if label.startswith("llama.cpp "):   # its quantize puts the tied embedding in Q6_K, which
        # falls back to Q8_0 at K = 576 (its log says so): counted as Q8_0
        kind = label.split()[-1]
        per = {"F32": (4, 4), "BF16": (2, 2), "Q8_0": (8.5 / 8, 8.5 / 8),
               "Q4_0": (4.5 / 8, 8.5 / 8), "Q4_1": (5 / 8, 8.5 / 8)}
        return per.get(kind, (0, 0))
    scheme = label.split("kv_cache ", 1)[1] if "kv_cache " in label else ""
    if scheme.startswith("gguf:"):   # SmolLM2's file: Q4_1 linears, a Q8_0 tied head
        return FORMATS["int4_g32"].bits_per_weight / 8, FORMATS["int8_g32"].bits_per_weight / 8
    if not scheme:
        return 0, 0
    fmt = FORMATS[parse_scheme(scheme).split(":")[0]]
    return fmt.bits_per_weight / 8, fmt.bits_per_weight / 8


def report(model: torch.nn.Module, compiled: dict, prompt: torch.Tensor, new_tokens: int,
           rates: dict[str, float]) -> list[str]:
    """Lines: the bandwidth limit, each runner's fraction of it, and the per-token breakdown of
    each compiled module in ``compiled`` (runner label -> module)."""
    position = prompt.shape[1] + new_tokens // 2
    nbytes = bytes_per_token(model, position)
    bandwidth = read_bandwidth()
    limit = bandwidth / nbytes
    lines = [f"bandwidth limit: {nbytes / 1e6:.0f} MB per token (weights + KV at position "
             f"{position}) / {bandwidth / 1e9:.1f} GB/s measured read = {limit:.1f} tok/s"]
    for label, rate in rates.items():
        itemsize, head = _stored_itemsize(label)
        own = bytes_per_token(model, position, itemsize, head) if itemsize else nbytes
        lines.append(f"  {label[:40]:<40} {rate:6.1f} tok/s = {rate / (bandwidth / own):6.1%} of its "
                     f"limit ({own / 1e6:.0f} MB a token: {bandwidth / own:.1f} tok/s)")
    for label, module in compiled.items():
        parts = step_breakdown(module, prompt, new_tokens)
        token = parts.pop("token")
        overhead = parts.pop(OVERHEAD)
        lines.append(f"  {label[:40]}, per decode token {token:.2f} ms (instrumented run, every "
                     f"step through dynamo: no direct steps), of "
                     f"which {overhead:.2f} ms ({overhead / token:.0%}) outside the kernels: " +
                     ", ".join(f"{k} {v:.2f} ms ({v / token:.0%})" for k, v in parts.items()))
        weights_read = bytes_per_token(model, 0, *_stored_itemsize(label))
        if parts["linears"] > 0:
            lines.append(f"  its linears read the weights at ~"
                         f"{weights_read / parts['linears'] / 1e6:.1f} GB/s")
    return lines
