"""StepReplay: record, validate, replay; inputs that change identity are learned and copied."""
import torch

from fxforge.kv_runtime import StepReplay


def _step(tokens, scale, eps, position, cache):
    cache[:, position] = tokens.to(torch.float32) * scale.sum() + eps
    return [cache.sum(1, keepdim=True) * scale[0]]


def test_a_new_tensor_at_every_call_is_copied_after_one_more_recording():
    torch.manual_seed(0)
    replay, stats = StepReplay(n_caches=1), {"replayed": 0}
    cache, expected_cache = torch.zeros(1, 16), torch.zeros(1, 16)
    for pos in range(1, 12):
        tokens = torch.randint(0, 9, (1, 1))
        scale = torch.rand(3) + pos                      # a new object, new values, every call
        eps = torch.tensor(1e-5, dtype=torch.float64)    # a new 0-d tensor every call
        args = [tokens, scale, eps, torch.tensor([pos]), cache]
        got = replay(_step, args, seq_outputs=[], stats=stats)
        want = _step(tokens, scale, eps, torch.tensor([pos]), expected_cache)
        torch.testing.assert_close(got, want)
    assert replay.off is None and replay.validated
    assert replay.recordings == 2 and 1 in replay.varying and 2 not in replay.varying
    assert stats["replayed"] >= 11 - 4


def _span_step(tokens, scale, position, cache):
    """A step of ``t`` new positions; a 2-position span reads a value into Python (unreplayable)."""
    t = tokens.shape[1]
    if t == 2:
        float(scale[0].item())
    at = position + torch.arange(t)   # positions read from the input, as a recording needs
    cache.index_copy_(1, at, tokens.to(torch.float32) * scale)
    return [cache.cumsum(1).index_select(1, at) * scale]


def test_each_span_length_records_validates_and_turns_off_on_its_own():
    """One-token steps replay from their first recording; a verify span (3 positions) from its
    second call; a span seen once never records; a span that cannot be recorded runs op by op
    without turning the other lengths off."""
    from fxforge.kv_runtime import SpanReplays
    gen = torch.Generator().manual_seed(11)
    replays, stats = SpanReplays(n_caches=1), {"replayed": 0}
    scale = torch.rand(1, generator=gen) + 0.5
    cache, expected = torch.zeros(1, 256), torch.zeros(1, 256)
    pos, spans = 0, [1, 3, 1, 1, 3, 2, 1, 3, 2, 3, 1, 2, 3, 5, 1, 3, 1]
    for t in spans:
        tokens = torch.randint(1, 9, (1, t), generator=gen)
        got = replays(_span_step, [tokens, scale, torch.tensor(pos), cache], [], stats, t)
        want = _span_step(tokens, scale, torch.tensor(pos), expected)
        torch.testing.assert_close(got, want)
        pos += t
    assert torch.equal(cache, expected)
    assert set(replays.spans) == {1, 2, 3}                       # 5 came once: never recorded
    assert replays.spans[1].off is None and replays.spans[1].validated
    assert replays.spans[3].off is None and replays.spans[3].validated
    assert "Python" in replays.spans[2].off or "value" in replays.spans[2].off
    # span 1: record, validate, then 4 replays; span 3: plain, record, validate, then 3 replays
    assert stats["replayed"] == (spans.count(1) - 2) + (spans.count(3) - 3)
