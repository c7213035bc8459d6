"""fxforge.generate's greedy pick (numpy's argmax on CPU fp32/fp64) equals torch.argmax on the
logits that make the two differ if anything does: ties, NaN, infinities, strided rows; and the
loop without stop tokens counts its new tokens as the masked loop did."""
import pytest
import torch

import fxforge
from fxforge.generate import greedy

VOCAB = 257   # odd: no SIMD-width multiple


def random_logits(seed: int, batch: int, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, VOCAB, generator=gen, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", [3, 17, 101])
def test_greedy_equals_torch_argmax_on_hostile_rows(dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = random_logits(seed, 7, dtype)
    top = logits.max().item() + 1.0
    first, second = sorted(torch.randperm(VOCAB, generator=gen)[:2].tolist())
    logits[0, first] = logits[0, second] = top                 # a tie: the first index wins
    logits[1, second] = float("nan")                           # NaN beats every number
    logits[1, first] = float("inf")
    logits[2, :] = float("-inf")                               # all -inf: index 0
    logits[3, first] = logits[3, second] = float("nan")        # the first NaN
    logits[4, -1] = float("inf")                               # the last position
    logits[5, :] = 0.0                                         # all equal
    got, want = greedy(logits), logits.argmax(dim=-1)
    assert got.dtype == want.dtype == torch.int64
    assert torch.equal(got, want), (got, want)


def test_greedy_on_strided_views_and_other_dtypes_equals_torch_argmax():
    seq = random_logits(5, 3 * 4, torch.float32).reshape(3, 4, VOCAB)
    last = seq[:, -1]                           # generate's view: rows VOCAB * 4 apart
    assert not last.is_contiguous() or last.stride(0) != VOCAB
    assert torch.equal(greedy(last), last.argmax(-1))
    transposed = random_logits(6, VOCAB, torch.float32)[:, :5].t()   # last dim strided
    assert torch.equal(greedy(transposed), transposed.argmax(-1))
    for dtype in (torch.bfloat16, torch.float16):   # the torch path
        low = random_logits(7, 4, torch.float32).to(dtype)
        assert torch.equal(greedy(low), low.argmax(-1))


def test_an_empty_vocabulary_fails_as_torch_argmax_does():
    with pytest.raises((IndexError, RuntimeError)):
        greedy(torch.empty(2, 0))


class Scripted:
    """A model whose last-position logits pick ``script[call]`` for every row (cycling: each
    group of equal-length prompts starts the script over)."""

    def __init__(self, script: list[int], vocab: int = 11):
        self.script, self.vocab, self.calls = script, vocab, 0

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(ids.shape[0], ids.shape[1], self.vocab)
        logits[:, -1, self.script[self.calls % len(self.script)]] = 1.0
        self.calls += 1
        return logits


def test_without_stop_tokens_every_row_counts_every_step():
    prompt = torch.tensor([[1, 2], [3, 4], [5, 6]])
    ids, stats = fxforge.generate(Scripted([7, 0, 9, 7]), prompt, 4, return_stats=True)
    assert ids[:, 2:].tolist() == [[7, 0, 9, 7]] * 3
    assert stats["steps"] == 4 and stats["new_tokens"] == 12
    rows = fxforge.generate(Scripted([7, 0, 9]), [[1, 2, 3], [4]], 3)   # two groups, unpadded
    assert [r.tolist() for r in rows] == [[1, 2, 3, 7, 0, 9], [4, 7, 0, 9]]


def test_with_a_stop_token_rows_are_still_masked_and_counted():
    ids, stats = fxforge.generate(Scripted([7, 9, 9, 9]), torch.tensor([[1, 2]]), 4,
                                  stop_tokens=7, pad_token_id=10, return_stats=True)
    assert ids.tolist() == [[1, 2, 7]] and stats["new_tokens"] == 1
