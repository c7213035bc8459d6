"""bench/attention_positions.py's chunked window attention on toy shapes: at original positions
it is fxforge's window reference; at cache positions (re-rotating post-RoPE queries for the sink
columns) it is StreamingLLM computed from scratch, with raw keys rotated at their cache slots."""
import sys
from pathlib import Path

import pytest
import torch

from fxforge.irgraph.window_ops import window_attention as fxforge_window_attention

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import attention_positions  # noqa: E402

HEAD_DIM, HEADS, KV_HEADS, LENGTH = 8, 4, 2, 40
INV_FREQ = 1.0 / (10000 ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float) / HEAD_DIM))


def rope(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """HF Llama's RoPE, x ``[B, H, L, D]`` at ``positions`` ``[L]``, written out afresh."""
    freqs = positions.float()[:, None] * INV_FREQ[None, :]
    cos, sin = torch.cat((freqs, freqs), -1).cos(), torch.cat((freqs, freqs), -1).sin()
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


def streaming_llm(q_raw, k_raw, v, window: int, sinks: int, scale: float) -> torch.Tensor:
    """Per query: the cache it would hold (sinks, then the last keys, at most S + W), each key
    rotated by its slot index and the query by its own (the last) slot."""
    group = q_raw.shape[1] // k_raw.shape[1]
    k_raw, v = k_raw.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    out = torch.empty_like(q_raw)
    for i in range(q_raw.shape[2]):
        kept = [j for j in range(i + 1) if j < sinks or i - j < window]
        slots = torch.arange(len(kept))
        keys = rope(k_raw[:, :, kept], slots)
        query = rope(q_raw[:, :, i:i + 1], slots[-1:])
        weights = (query @ keys.transpose(-1, -2) * scale).softmax(-1)
        out[:, :, i:i + 1] = weights @ v[:, :, kept]
    return out


@pytest.mark.parametrize("window,sinks", [(6, 2), (5, 0), (1, 3), (64, 4)])
def test_cache_and_original_positions(monkeypatch, window, sinks):
    monkeypatch.setattr(attention_positions, "QUERY_CHUNK", 7)   # several blocks, ragged last
    gen = torch.Generator().manual_seed(window * 10 + sinks)
    q_raw = torch.randn(1, HEADS, LENGTH, HEAD_DIM, generator=gen)
    k_raw, v = (torch.randn(1, KV_HEADS, LENGTH, HEAD_DIM, generator=gen) for _ in range(2))
    positions = torch.arange(LENGTH)
    q, k = rope(q_raw, positions), rope(k_raw, positions)   # what the model hands the attention
    scale = HEAD_DIM ** -0.5

    original = attention_positions.window_attention(q, k, v, window, sinks, scale, False)
    torch.testing.assert_close(original, fxforge_window_attention(q, k, v, window, sinks, scale))

    cached = attention_positions.window_attention(q, k, v, window, sinks, scale, True, INV_FREQ)
    torch.testing.assert_close(cached, streaming_llm(q_raw, k_raw, v, window, sinks, scale),
                               rtol=1e-5, atol=1e-5)
    if sinks and LENGTH > sinks + window:   # past S + W the sink distances differ
        assert not torch.allclose(cached[:, :, -1], original[:, :, -1])
    else:
        torch.testing.assert_close(cached, original)
