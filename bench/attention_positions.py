"""Sliding window + sinks on SmolLM2-135M: keys at their original positions, or at their slots
in the cache (StreamingLLM)? Teacher-forced perplexity on one long sequence of real text.

    python bench/attention_positions.py [--tokens 12288] [--report 4096,8192] [--windows 256,1024]
    python bench/attention_positions.py --quick     # 1024 tokens, window 128, no fxforge check

fxforge caches each key rotated at its true position, so query ``i`` sees sink ``s`` at distance
``i - s``, which grows without bound. StreamingLLM caches keys before RoPE and rotates them by
their slot (sinks at ``0..S-1``, the window at ``S..S+W-1``), so no distance exceeds ``S+W-1``.
RoPE scores depend only on ``pos_q - pos_k``; window keys keep their offset ``i - j`` under both
schemes, and sink ``s`` moves to ``p_i - s`` with ``p_i = min(i, S+W-1)``. So "cache positions"
is computed here from the model's post-RoPE q and k: for the sink columns only, query ``i`` is
rotated on by ``p_i - i`` (:func:`rotate_by`). tests/test_bench_attention_positions.py checks
this against keys rotated explicitly at their cache slots.

Variants: dense (HF's own sdpa), window only (S = 0, where the two schemes coincide), window +
S sinks at original positions (checked against fxforge's compiled ``sliding_window:W,sinks:S``),
and window + S sinks at cache positions. One forward of ``--tokens`` per variant: the model is
causal, so the perplexity over the first N positions equals that of an N-token run, and
``--report`` lengths are read off the same run. Writes ``--out``/attention_positions.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ATTN_NAME = "fxforge_window_positions"
SINKS = 4
QUERY_CHUNK = 512       # queries per block: scores are [heads, 512, <= S + W + 511], not L x L
# Set by `use_window` before a forward: window, sinks, cache_positions, inv_freq.
CONFIG: dict = {}


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """HF Llama's convention: the two halves of the head dim form the (re, im) pairs."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate_by(x: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate ``x[..., n, :]`` by ``delta[n]`` positions. RoPE rotations compose, so a vector
    rotated at position ``i`` and then by ``p - i`` is the vector rotated at ``p``."""
    freqs = delta.to(torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return x * emb.cos() + rotate_half(x) * emb.sin()


def window_attention(q, k, v, window: int, sinks: int, scale: float, cache_positions: bool,
                     inv_freq: torch.Tensor | None = None) -> torch.Tensor:
    """Query ``i`` attends key ``j <= i`` with ``j < S`` or ``i - j < W`` (fxforge's
    ``irgraph.window_ops.visible``). q ``[B, H, L, D]`` and k, v ``[B, Hkv, L, D]`` carry RoPE at
    their original positions. With ``cache_positions`` the sink scores use query ``i`` moved to
    cache slot ``min(i, S+W-1)``. Returns ``[B, H, L, D]``."""
    length, group = q.shape[2], q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    for start in range(0, length, QUERY_CHUNK):
        stop = min(start + QUERY_CHUNK, length)
        lo = max(0, start - window + 1)      # the oldest key any query of this block keeps in its window
        cols = torch.cat((torch.arange(min(sinks, lo)), torch.arange(lo, stop)))
        keys = k[:, :, cols].repeat_interleave(group, dim=1)
        values = v[:, :, cols].repeat_interleave(group, dim=1)
        queries = q[:, :, start:stop]
        rows = torch.arange(start, stop)
        scores = queries @ keys.transpose(-1, -2)
        sink_cols = cols < sinks
        if cache_positions and sink_cols.any():
            # Only sinks move: a window key's slot offset from the query equals i - j. A sink
            # also inside query i's window means i < S+W-1, where the shift is zero.
            moved = rotate_by(queries, rows.clamp(max=sinks + window - 1) - rows, inv_freq)
            scores[..., sink_cols] = moved @ keys[:, :, sink_cols].transpose(-1, -2)
        seen = (cols[None, :] <= rows[:, None]) & (
            (cols[None, :] < sinks) | (rows[:, None] - cols[None, :] < window))
        scores = (scores * scale).masked_fill(~seen, float("-inf"))
        out[:, :, start:stop] = scores.softmax(-1) @ values
    return out


def _hf_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """transformers' attention interface: q, k, v ``[B, heads, L, D]`` after RoPE; returns
    ``([B, L, H, D], weights)``. The positions must be 0..L-1 (one sequence from its start)."""
    positions = kwargs.get("position_ids")
    if positions is not None and not torch.equal(positions[0], torch.arange(query.shape[2])):
        raise ValueError("attention_positions expects one sequence at positions 0..L-1")
    out = window_attention(query, key, value, CONFIG["window"], CONFIG["sinks"], scaling,
                           CONFIG["cache_positions"], CONFIG["inv_freq"])
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    AttentionInterface.register(ATTN_NAME, _hf_attention)
    # No L x L mask: the window function builds each block's own.
    AttentionMaskInterface.register(ATTN_NAME, lambda *args, **kwargs: None)


def use_window(model, window: int | None, sinks: int = 0, cache_positions: bool = False) -> None:
    """``window=None``: HF's own sdpa (dense causal). Else the window function above."""
    rotary = model.model.rotary_emb
    if rotary.attention_scaling != 1.0 or model.config.rope_parameters["rope_type"] != "default":
        raise SystemExit("rotate_by assumes plain RoPE (rope_type default, no scaling)")
    CONFIG.update(window=window, sinks=sinks, cache_positions=cache_positions,
                  inv_freq=rotary.inv_freq.float())
    model.config._attn_implementation = "sdpa" if window is None else ATTN_NAME


def nll(model, ids: torch.Tensor) -> torch.Tensor:
    """Next-token NLL at every position but the last; the LM head runs in slices so that
    16k x 49k fp32 logits never exist at once."""
    with torch.inference_mode():
        hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state[0, :-1]
        targets = ids[0, 1:]
        return torch.cat([F.cross_entropy(model.lm_head(hidden[s:s + 1024]).float(),
                                          targets[s:s + 1024], reduction="none")
                          for s in range(0, hidden.shape[0], 1024)])


def fxforge_check(model, ids: torch.Tensor, window: int, sinks: int) -> dict:
    """Original positions here against fxforge's compiled ``sliding_window:W,sinks:S``."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from attention_window import nll_and_top1
    use_window(model, None)     # fxforge traces the model; its attention pass does the windowing
    theirs = float(nll_and_top1(model, ids, {"attention": f"sliding_window:{window},sinks:{sinks}"})[0].mean().exp())
    use_window(model, window, sinks, cache_positions=False)
    ours = float(nll(model, ids).mean().exp())
    use_window(model, None)
    return {"tokens": ids.shape[1], "window": window, "sinks": sinks, "fxforge_ppl": theirs,
            "this_ppl": ours, "relative_diff": abs(ours - theirs) / theirs}


def variants(windows: list[int]) -> dict:
    """Short key (for --variants) -> (label, window, sinks, cache_positions). With no sinks the
    two schemes coincide (every cached key keeps its offset), so window-only runs once."""
    table = {"dense": ("dense (HF sdpa)", None, 0, False)}
    for w in windows:
        table[f"w{w}orig"] = (f"window {w} + {SINKS} sinks, original positions", w, SINKS, False)
        table[f"w{w}cache"] = (f"window {w} + {SINKS} sinks, cache positions", w, SINKS, True)
        table[f"w{w}s0"] = (f"window {w}, no sinks", w, 0, False)
    return table


def summarize(losses: torch.Tensor, report: list[int], trained: int) -> dict:
    """ppl over the first N positions per report length, and over the predictions of tokens
    past the trained context (target positions >= max_position_embeddings)."""
    row = {f"ppl_first_{n}": float(losses[:n - 1].mean().exp()) for n in report}
    row["ppl_all"] = float(losses.mean().exp())
    past = losses[trained - 1:]
    row["ppl_past_trained"] = float(past.mean().exp()) if past.numel() else None
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=12288, help="one sequence of this many tokens")
    p.add_argument("--report", default="4096,8192", help="also the ppl over these prefixes")
    p.add_argument("--windows", default="256,1024")
    p.add_argument("--check-tokens", type=int, default=2048, help="fxforge check length (0: skip)")
    p.add_argument("--variants", default="all", help="comma-separated keys: dense, w256orig, "
                   "w256cache, w256s0, ... (all: every one)")
    p.add_argument("--out", default=".bench/attention_positions")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.report, args.windows, args.check_tokens = 1024, "512", "128", 0
    from fxforge.examples.smollm2 import load_smollm2, smollm2_status
    from fxforge.kernels.cpu_isa import cpu_features
    from fxforge.calibration import calibration_text
    available, reason = smollm2_status()
    if not available:
        print(f"SmolLM2 unavailable: {reason}", file=sys.stderr)
        return 1
    model, tokenizer = load_smollm2(progress=False)
    register()
    trained = model.config.max_position_embeddings
    ids = calibration_text(tokenizer, args.tokens, 1)
    if ids.shape[1] < args.tokens:
        raise SystemExit(f"pydoc_data.topics gave {ids.shape[1]} tokens, fewer than {args.tokens}")
    report = [n for n in map(int, args.report.split(",")) if n < args.tokens]
    results = {"cpu": cpu_features().describe(), "threads": torch.get_num_threads(),
               "tokens": args.tokens, "max_position_embeddings": trained, "rows": []}
    print(f"SmolLM2-135M-Instruct, max_position_embeddings {trained}; {results['cpu']}; "
          f"{results['threads']} threads; {args.tokens} tokens", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = variants([int(w) for w in args.windows.split(",")])
    keys = list(table) if args.variants == "all" else args.variants.split(",")
    for key in keys:
        label, window, sinks, cache_positions = table[key]
        use_window(model, window, sinks, cache_positions)
        start = time.perf_counter()
        row = {"attention": label, "window": window, "sinks": sinks,
               "positions": "cache" if cache_positions else "original",
               **summarize(nll(model, ids), report, trained),
               "seconds": time.perf_counter() - start}
        results["rows"].append(row)
        print(f"{label:<44} " + "  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} -"
                                           for k, v in row.items() if k.startswith("ppl")) +
              f"  ({row['seconds']:.0f} s)", flush=True)
        (out / "attention_positions.json").write_text(json.dumps(results, indent=2))  # so far
    if args.check_tokens:   # last: the long runs matter more on a slow host
        w = int(args.windows.split(",")[0])
        results["fxforge_check"] = check = fxforge_check(model, ids[:, :args.check_tokens], w, SINKS)
        print(f"check at {check['tokens']} tokens, window {w} + {SINKS} sinks: fxforge "
              f"{check['fxforge_ppl']:.4f}, here {check['this_ppl']:.4f} "
              f"(rel diff {check['relative_diff']:.1e})", flush=True)
    (out / "attention_positions.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {out / 'attention_positions.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
