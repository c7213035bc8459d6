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
