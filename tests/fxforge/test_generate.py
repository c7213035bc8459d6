"""fxforge.generate: greedy equals a hand-written eager loop, ragged batches, stops, sampling, streaming."""
import json
import math

import pytest
import torch

import fxforge
from fxforge.examples.small_gpt import make_model

transformers = pytest.importorskip("transformers")
from fxforge.examples.hf_models import LogitsOnly  # noqa: E402  (needs transformers)

STEPS = 32


@pytest.fixture(scope="module")
def gpt():
    return make_model(seed=1, n_layer=2)


@pytest.fixture(scope="module")
def llama():
    config = transformers.LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, use_cache=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config).eval()
    return LogitsOnly(model)


@pytest.fixture(params=["gpt", "llama"])
def model(request):
    return request.getfixturevalue(request.param)


def vocab_of(model):
    return 512 if not isinstance(model, LogitsOnly) else 1000


def prompts(batch, length, vocab, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=gen)


def eager_greedy(model, ids, steps):
    """The reference: the hand-written no-cache greedy loop."""
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


class Counting:
    """A model wrapper counting calls and recording input shapes."""

    def __init__(self, model):
        self.model, self.shapes = model, []

    def __call__(self, ids):
        self.shapes.append(tuple(ids.shape))
        return self.model(ids)


class FixedLogits:
    """A model whose next-token logits are always `logits` (as a tuple output, [B, T, V])."""

    def __init__(self, logits):
        self.logits = torch.tensor(logits)

    def __call__(self, ids):
        return (self.logits.expand(ids.shape[0], ids.shape[1], -1),)


@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_matches_the_eager_loop(model, batch):
    ids = prompts(batch, 8, vocab_of(model))
    counted = Counting(model)
    out = fxforge.generate(counted, ids, STEPS)
    assert torch.equal(out, eager_greedy(model, ids, STEPS))
    # the loop's exact form: the full sequence so far, same batch, one token longer each call
    assert counted.shapes == [(batch, 8 + i) for i in range(STEPS)]


def test_hf_model_output_and_one_dimensional_prompt(llama):
    ids = prompts(1, 6, 1000)
    hf = llama.model
    out = fxforge.generate(lambda x: hf(x, use_cache=False), ids[0], 10)
    assert out.shape == (16,)
    assert torch.equal(out, eager_greedy(llama, ids, 10)[0])


def test_ragged_prompts_equal_each_row_alone(model):
    vocab = vocab_of(model)
    rows = [prompts(1, n, vocab, seed=n)[0] for n in (5, 9, 7)]
    as_lists = [rows[0].tolist(), rows[1], rows[2].tolist()]
    out = fxforge.generate(model, as_lists, STEPS)
    assert isinstance(out, list) and len(out) == 3
    for got, row in zip(out, rows):
        assert torch.equal(got, eager_greedy(model, row[None], STEPS)[0])


def test_equal_length_rows_are_batched_together(gpt):
    rows = [prompts(1, n, 512, seed=i)[0] for i, n in enumerate((5, 9, 5))]
    calls = []
    out = fxforge.generate(gpt, rows, 4, stream=lambda step, tokens, r: calls.append((step, list(r))))
    assert calls == [(s, [0, 2]) for s in range(4)] + [(s, [1]) for s in range(4)]
    batched = eager_greedy(gpt, torch.stack([rows[0], rows[2]]), 4)
    assert torch.equal(out[0], batched[0]) and torch.equal(out[2], batched[1])
    assert torch.equal(out[1], eager_greedy(gpt, rows[1][None], 4)[0])


def test_stop_token_stops_rows_and_pads(gpt):
    ids = prompts(3, 8, 512, seed=4)
    reference = eager_greedy(gpt, ids, STEPS)
    stop = int(reference[0, 8 + 3])  # row 0 certainly emits it at step 3
    out, stats = fxforge.generate(gpt, ids, STEPS, stop_tokens=[stop], pad_token_id=511,
                                  return_stats=True)
    stop_steps = []
    for row in range(3):
        hits = (reference[row, 8:] == stop).nonzero()
        stop_steps.append(int(hits[0]) if len(hits) else None)
    assert stop_steps[0] <= 3
    steps = STEPS if None in stop_steps else max(stop_steps) + 1
    assert out.shape == (3, 8 + steps) and stats["steps"] == steps
    for row, at in enumerate(stop_steps):
        end = 8 + (steps if at is None else at + 1)
        assert torch.equal(out[row, :end], reference[row, :end])
        assert bool((out[row, end:] == 511).all())
    assert stats["new_tokens"] == sum(steps if at is None else at + 1 for at in stop_steps)
    assert set(stats) == {"steps", "direct_steps", "new_tokens", "seconds", "tokens_per_second"}
    assert stats["direct_steps"] == 0    # an eager model: every step is a model call
    assert stats["tokens_per_second"] == pytest.approx(stats["new_tokens"] / stats["seconds"])


def test_all_rows_stopped_ends_the_loop_and_lists_are_trimmed(gpt):
    row = prompts(1, 6, 512, seed=5)[0]
    reference = eager_greedy(gpt, row[None], STEPS)[0]
    first = int((reference[6:] == reference[6 + 3]).nonzero()[0])
    counted = Counting(gpt)
    out = fxforge.generate(counted, row[None], STEPS, stop_tokens={int(reference[6 + 3]), 100000})
    assert torch.equal(out[0], reference[:6 + first + 1]) and len(counted.shapes) == first + 1
    listed = fxforge.generate(gpt, [row, reference[:9]], STEPS, stop_tokens=int(reference[6 + 3]))
    assert torch.equal(listed[0], reference[:6 + first + 1])
    # the second prompt is the first one plus 3 greedy tokens: its first new token is the stop token
    assert torch.equal(listed[1], reference[:10])


def test_sampling_is_reproducible_with_a_seed_and_leaves_the_global_rng_alone(model):
    ids = prompts(2, 5, vocab_of(model))
    state = torch.get_rng_state()
    first = fxforge.generate(model, ids, 16, temperature=1.5, seed=123)
    again = fxforge.generate(model, ids, 16, temperature=1.5, seed=123)
    other = fxforge.generate(model, ids, 16, temperature=1.5, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert not torch.equal(first, eager_greedy(model, ids, 16))


def test_degenerate_sampling_equals_greedy(gpt):
    ids = prompts(2, 5, 512, seed=9)
    greedy = eager_greedy(gpt, ids, 12)
    assert torch.equal(fxforge.generate(gpt, ids, 12, do_sample=True, top_k=1, seed=0), greedy)
    assert torch.equal(fxforge.generate(gpt, ids, 12, temperature=1e-4, seed=0), greedy)
    assert torch.equal(fxforge.generate(gpt, ids, 12, top_p=1e-6, seed=0), greedy)
    assert torch.equal(fxforge.generate(gpt, ids, 12, do_sample=False, temperature=5.0, seed=0), greedy)


@pytest.mark.parametrize("option, allowed", [({"top_k": 2}, {0, 1}), ({"top_p": 0.6}, {0, 1}),
                                             ({"top_p": 0.5}, {0}), ({"top_p": 1.0}, {0, 1, 2, 3})])
def test_top_k_and_top_p_keep_only_the_likeliest_tokens(option, allowed):
    model = FixedLogits([math.log(p) for p in (0.5, 0.3, 0.15, 0.05)])
    out = fxforge.generate(model, [[0]], 300, seed=0, **option)[0][1:]
    assert set(out.tolist()) == allowed


def test_stream_receives_every_step_in_order(gpt):
    ids = prompts(3, 7, 512, seed=2)
    seen = []
    out = fxforge.generate(gpt, ids, 10, stream=lambda step, tokens, rows: seen.append((step, tokens, rows)))
    assert [s for s, _, _ in seen] == list(range(10))
    assert all(rows == [0, 1, 2] for _, _, rows in seen)
    assert torch.equal(torch.stack([t for _, t, _ in seen], dim=1), out[:, 7:])


def test_max_seq_len_and_zero_new_tokens(gpt):
    ids = prompts(1, 8, 512)
    with pytest.raises(ValueError, match=r"longest prompt \(9 tokens\).*max_seq_len=16"):
        fxforge.generate(gpt, [ids[0], prompts(1, 9, 512)[0]], 8, max_seq_len=16)
    assert fxforge.generate(gpt, ids, 8, max_seq_len=16).shape == (1, 16)
    counted = Counting(gpt)
    assert torch.equal(fxforge.generate(counted, ids, 0), ids) and counted.shapes == []


@pytest.mark.parametrize("kwargs, error, message", [
    ({"input_ids": torch.zeros(1, 0, dtype=torch.long)}, ValueError, "empty"),
    ({"input_ids": [[1, 2], []]}, ValueError, r"input_ids\[1\] is empty"),
    ({"input_ids": []}, ValueError, "no prompts"),
    ({"input_ids": torch.ones(1, 4)}, TypeError, "integer token ids"),
    ({"input_ids": [[1, 2.5]]}, TypeError, "non-integer token id: 2.5"),
    ({"input_ids": [1, 2, 3]}, TypeError, "flat list"),
    ({"input_ids": torch.tensor([[1, -2]])}, ValueError, "negative"),
    ({"max_new_tokens": -1}, ValueError, "max_new_tokens must be >= 0"),
    ({"max_new_tokens": 2.0}, TypeError, "max_new_tokens must be an int"),
    ({"top_p": 0.0}, ValueError, r"top_p must be in \(0, 1\]"),
    ({"top_p": 1.5}, ValueError, r"top_p must be in \(0, 1\]"),
    ({"top_k": 0}, ValueError, "top_k must be >= 1"),
    ({"temperature": 0.0}, ValueError, "temperature must be > 0 when sampling"),
    ({"do_sample": True, "temperature": -1.0}, ValueError, "temperature must be > 0"),
    ({"stop_tokens": [1, "x"]}, ValueError, "stop_tokens must be non-negative ints"),
])
def test_bad_arguments_name_the_problem(gpt, kwargs, error, message):
    args = {"input_ids": prompts(1, 4, 512), "max_new_tokens": 4, **kwargs}
    with pytest.raises(error, match=message):
        fxforge.generate(gpt, args.pop("input_ids"), args.pop("max_new_tokens"), **args)


def test_a_model_that_does_not_return_logits_is_reported(gpt):
    with pytest.raises(TypeError, match="must return logits"):
        fxforge.generate(lambda ids: "text", [[1, 2]], 2)
    with pytest.raises(ValueError, match=r"expected \[B, T, V\]"):
        fxforge.generate(lambda ids: torch.zeros(5), [[1, 2]], 2)


def test_compiled_module_gives_eager_tokens(gpt):
    torch._dynamo.reset()
    compiled = torch.compile(gpt, backend="fxforge")
    ids = prompts(1, 8, 512, seed=11)
    assert torch.equal(fxforge.generate(compiled, ids, 8), eager_greedy(gpt, ids, 8))


@pytest.mark.parametrize("inference_mode", [False, True])
def test_a_kv_cached_model_compiles_one_graph_for_every_length(llama, inference_mode):
    """The loop's calls grow by a token each: ``fxforge.compile(kv_cache=True)`` compiles one
    graph dynamic in the length (not a static one dynamo replaces at the second call), and under
    inference_mode a prompt made outside it is not a second kind of input for dynamo's guards."""
    from fxforge.compiler import recording
    torch._dynamo.reset()
    compiled = fxforge.compile(llama, kv_cache=True, max_seq_len=64)
    ids = prompts(1, 9, 1000, seed=13)
    with recording() as graphs, torch.inference_mode(inference_mode):
        out = fxforge.generate(compiled, ids, 6)
    assert len(graphs) == 1
    assert torch.equal(out, eager_greedy(llama, ids, 6))


def test_aot_artifact_gives_eager_tokens(gpt, tmp_path):
    seq = torch.export.Dim("seq", min=2, max=64)
    ids = prompts(1, 8, 512, seed=12)
    artifact = fxforge.aot_compile(gpt, (ids,), tmp_path / "gpt", dynamic_shapes=({1: seq},))
    assert torch.equal(fxforge.generate(artifact, ids, 8), eager_greedy(gpt, ids, 8))


def test_aot_artifact_carries_the_cached_step_graph(gpt, tmp_path):
    """kv_cache=True: the artifact ships the step graph and its plan; after a fresh load,
    generation runs incrementally (one prefill, then one-token steps) with eager's tokens."""
    seq = torch.export.Dim("seq", min=2, max=64)
    ids = prompts(1, 8, 512, seed=13)
    fxforge.aot_compile(gpt, (ids,), tmp_path / "gpt", dynamic_shapes=({1: seq},),
                        kv_cache=True, max_seq_len=64)
    manifest = json.loads((tmp_path / "gpt" / "manifest.json").read_text())
    assert manifest["kv_cache"]["sites"] == 2 and "step_graph.json" in manifest["files"]
    artifact = fxforge.load(tmp_path / "gpt")
    assert artifact.kv is not None
    assert torch.equal(fxforge.generate(artifact, ids, 12), eager_greedy(gpt, ids, 12))
    assert artifact.kv.stats["prefills"] == 1 and artifact.kv.stats["steps"] == 11
    edited = ids.clone()
    edited[0, 0] = (edited[0, 0] + 1) % 512          # a new prompt: a fresh prefill, still exact
    assert torch.equal(fxforge.generate(artifact, edited, 4), eager_greedy(gpt, edited, 4))
    assert artifact.kv.stats["prefills"] == 2


def _kv_decoder(graphs):
    decoders = [g.kv for g in graphs if g.kv is not None]
    assert decoders, "no graph got a KV cache"
    return decoders[-1]


def _replay(decoder):
    """The one-token decode-step replay of the decoder's one state (each ``generate`` call's
    session hands its state back; the next one reuses it), or None."""
    (state,) = decoder.states()
    return state.replay.spans.get(1) if state.replay is not None else None


@pytest.mark.parametrize("batch", [1, 3])
def test_decode_steps_are_replayed_after_one_validated_recording(gpt, batch):
    from fxforge.compiler import recording
    torch._dynamo.reset()
    ids = prompts(batch, 7, 512, seed=21)
    with recording() as graphs:
        compiled = torch.compile(gpt, backend="fxforge", options={"kv_cache": True})
        assert torch.equal(fxforge.generate(compiled, ids, 16), eager_greedy(gpt, ids, 16))
    decoder = _kv_decoder(graphs)
    assert _replay(decoder).off is None and _replay(decoder).validated
    assert decoder.stats["replayed"] >= decoder.stats["steps"] - 2 > 0   # all but record + check
    again = prompts(batch, 5, 512, seed=22)   # a new prompt, same batch: the caches and the
    replayed = decoder.stats["replayed"]      # recording over them are kept
    assert torch.equal(fxforge.generate(compiled, again, 6), eager_greedy(gpt, again, 6))
    assert _replay(decoder).recordings == 1 and decoder.stats["replayed"] == replayed + 5
    other = prompts(batch + 1, 5, 512, seed=25)   # another batch (another graph for dynamo)
    assert torch.equal(fxforge.generate(compiled, other, 6), eager_greedy(gpt, other, 6))


def test_decode_replay_can_be_turned_off(gpt):
    from fxforge.compiler import recording
    torch._dynamo.reset()
    ids = prompts(1, 6, 512, seed=23)
    with recording() as graphs:
        compiled = torch.compile(gpt, backend="fxforge",
                                 options={"kv_cache": True, "decode_replay": False})
        assert torch.equal(fxforge.generate(compiled, ids, 8), eager_greedy(gpt, ids, 8))
    decoder = _kv_decoder(graphs)
    assert _replay(decoder) is None and decoder.stats["replayed"] == 0


def test_a_replay_that_disagrees_turns_replay_off(gpt, monkeypatch, caplog):
    from fxforge.compiler import recording
    from fxforge.kernels.replay import Recording
    real_replay = Recording.replay

    def corrupted(self, args):
        return [o + 1 for o in real_replay(self, args)]
    monkeypatch.setattr(Recording, "replay", corrupted)
    torch._dynamo.reset()
    ids = prompts(1, 6, 512, seed=24)
    with recording() as graphs, caplog.at_level("WARNING", logger="fxforge"):
        compiled = torch.compile(gpt, backend="fxforge", options={"kv_cache": True})
        assert torch.equal(fxforge.generate(compiled, ids, 10), eager_greedy(gpt, ids, 10))
    decoder = _kv_decoder(graphs)
    assert _replay(decoder).off is not None and decoder.stats["replayed"] == 0
    assert "replay off" in caplog.text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["gpt", "llama"])
def test_gpu_decode_steps_replay_as_cuda_graphs(request, name):
    """On a GPU the Triton backend's decode steps are captured as one CUDA graph each shape,
    validated against a normal step, then replayed; tokens equal the eager loop's."""
    from fxforge.compiler import recording
    torch._dynamo.reset()
    module = request.getfixturevalue(name).cuda()
    try:
        ids = prompts(1, 7, 512, seed=31).cuda()
        with recording() as graphs:
            compiled = torch.compile(module, backend="fxforge", options={"kv_cache": True})
            got = fxforge.generate(compiled, ids, 12)
        assert torch.equal(got, eager_greedy(module, ids, 12))
    finally:
        module.cpu()   # the fixture is shared with CPU tests
    decoder = _kv_decoder(graphs)
    replay = _replay(decoder)
    assert replay is not None and replay.off is None, replay.off
    assert replay.validated and decoder.stats["replayed"] >= decoder.stats["steps"] - 2 > 0
