"""The tensor-parallel pass in one process: each rank's graph is made with an explicit
:class:`Mesh`, and the ranks run side by side in threads whose collectives meet in memory
(the real ones over gloo: tests/fxforge/test_tensor_parallel_ranks.py)."""
from __future__ import annotations

import functools
import json
import os
import threading

import pytest
import torch

import fxforge
from fxforge.errors import OptionsError, TensorParallelError
from fxforge.examples import hf_models
from fxforge.examples.small_gpt import GPTConfig, SmallGPT
from fxforge.irgraph import capture_export, ir_from_json, ir_to_json, verify
from fxforge.irgraph.collectives import ALL_GATHER, ALL_REDUCE, WAIT, rebind_group
from fxforge.irgraph.serialize import SerializationError, resolve_target
from fxforge.passes import PassManager
from fxforge.passes.tensor_parallel import Mesh, check_fits, tensor_parallel_pass
from fxforge.testing import assert_close_to_eager, run_in_threads
from tests.passes.helpers import fresh_generator


class _Meeting:
    """Collectives between threads: each rank leaves its value, all wait, all read the same
    sum (in rank order) or concatenation."""

    def __init__(self, world: int):
        self.values = [None] * world
        # a rank that fails aborts the barrier; the timeout only ends a deadlock, so it is long
        self.barrier = threading.Barrier(world, timeout=600)

    def _exchange(self, rank: int, value: torch.Tensor) -> list:
        self.values[rank] = value
        self.barrier.wait()
        seen = list(self.values)
        self.barrier.wait()
        return seen

    def all_reduce(self, rank, value):
        return functools.reduce(torch.add, self._exchange(rank, value))

    def all_gather(self, rank, value):
        return torch.cat(self._exchange(rank, value))


class _Rank(torch.fx.Interpreter):
    """Runs one rank's graph, its collectives through the meeting."""

    def __init__(self, ir, meeting: _Meeting, rank: int):
        super().__init__(ir.gm)
        self.meeting, self.rank = meeting, rank

    def call_function(self, target, args, kwargs):
        if target is ALL_REDUCE:
            return self.meeting.all_reduce(self.rank, args[0])
        if target is ALL_GATHER:
            return self.meeting.all_gather(self.rank, args[0])
        if target is WAIT:
            return args[0]
        return super().call_function(target, args, kwargs)


def _run_ranks(ranks: list, inputs: tuple) -> list:
    meeting, outputs = _Meeting(len(ranks)), [None] * len(ranks)

    def run(rank):
        try:
            with torch.no_grad():
                outputs[rank] = _Rank(ranks[rank], meeting, rank).run(*inputs)
        except BaseException:
            meeting.barrier.abort()   # the other ranks stop waiting for this one
            raise
    run_in_threads([functools.partial(run, r) for r in range(len(ranks))])
    return outputs


def _sharded(model, inputs, world: int) -> list:
    captured = capture_export(model, inputs)
    ranks = []
    for rank in range(world):
        # as in the pipeline: after no-op removal (eval dropout's clones) and CSE
        ir = PassManager(["remove_noops", "cse", tensor_parallel_pass(Mesh(world, rank, "test"))],
                         strict=True).run(captured)
        verify(ir)
        ranks.append(ir)
    return ranks


def _first(outputs):
    return outputs[0] if isinstance(outputs, (tuple, list)) else outputs


MODELS = {
    "small_gpt_odd_vocab": lambda: SmallGPT(GPTConfig(vocab_size=333, block_size=32, n_layer=2,
                                                      n_head=4, n_embd=32)).eval(),
    "llama": lambda: hf_models.LogitsOnly(hf_models.build("llama", seed=11)),
    "qwen2": lambda: hf_models.LogitsOnly(hf_models.build("qwen2", seed=12)),
    "gpt2_fused_qkv": lambda: hf_models.LogitsOnly(hf_models.build("gpt2", seed=13)),
    "gemma2_logit_softcap": lambda: hf_models.LogitsOnly(hf_models.build("gemma2", seed=14)),
}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("world", [2, 4])
def test_ranks_together_compute_the_whole_model(name, world):
    gen = fresh_generator()
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    model = MODELS[name]()
    inputs = (torch.randint(3, 300, (2, 9), generator=gen),)
    with torch.no_grad():
        expected = _first(model(*inputs))
    ranks = _sharded(model, inputs, world)
    outputs = [_first(o) for o in _run_ranks(ranks, inputs)]
    for out in outputs:
        assert_close_to_eager(out, expected)
    report = ranks[0].info["tensor_parallel"]
    assert len(report["attention"]) == 2 and len(report["mlp"]) == 2
    assert len(report["embeddings"]) == 1 and len(report["lm_heads"]) == 1
    # each rank holds its shard: about 1/world of the weights (norms and positions stay whole)
    assert report["bytes_after"] < report["bytes_before"] / world * 1.25
    collectives = [n.target for n in ranks[1].gm.graph.nodes if n.target in (ALL_REDUCE, ALL_GATHER)]
    assert collectives.count(ALL_REDUCE) == 2 * 2 + 1      # per block two, the embedding one
    assert collectives.count(ALL_GATHER) == 1              # the logits


def test_gqa_shards_whole_kv_groups():
    model = hf_models.LogitsOnly(hf_models.build("qwen2", seed=3))   # q/k/v biases, 2 kv heads
    for ir in _sharded(model, (torch.randint(3, 300, (1, 6)),), 2):
        shapes = sorted(tuple(v.shape) for k, v in ir.gm.named_buffers() if "pruned_weight" in k)
        # per layer q: 2 of 4 heads x 16 rows; k, v: 1 of 2 kv heads; o: 32 of 64 inputs;
        # gate, up: 64 of 128 channels; down: 64 of 128 inputs
        assert shapes.count((32, 64)) == 2 and shapes.count((16, 64)) == 4, shapes
        assert shapes.count((64, 32)) == 2 and shapes.count((64, 64)) == 6


def test_row_parallel_biases_are_added_on_rank_zero_only():
    model = SmallGPT(GPTConfig(vocab_size=100, block_size=16, n_layer=2, n_head=4, n_embd=32))
    for rank, ir in enumerate(_sharded(model.eval(), (torch.randint(0, 100, (1, 6)),), 2)):
        summed = [n.args[0] for n in ir.gm.graph.nodes if n.target is ALL_REDUCE]
        linears = [n.target for n in summed if n.target is not torch.ops.aten.masked_fill.Scalar]
        assert len(linears) == 4
        want = torch.ops.aten.addmm.default if rank == 0 else torch.ops.aten.mm.default
        assert linears == [want] * 4


def test_a_kv_head_count_that_does_not_divide_is_an_error_naming_it():
    model = hf_models.LogitsOnly(hf_models.build("llama", num_attention_heads=6,
                                                 num_key_value_heads=3, hidden_size=96))
    with pytest.raises(TensorParallelError, match=r"3 key/value heads \(6 query heads\).*2 ranks.*divides 3, or a multiple of 3 that divides 6"):
        _sharded(model, (torch.randint(3, 300, (1, 6)),), 2)


def test_an_mlp_width_that_does_not_divide_is_an_error_naming_it():
    model = hf_models.LogitsOnly(hf_models.build("llama", intermediate_size=129))
    with pytest.raises(TensorParallelError, match=r"MLP .*down_proj.*129 hidden channels.*2 ranks"):
        _sharded(model, (torch.randint(3, 300, (1, 6)),), 2)


def test_multi_query_attention_stays_whole_with_its_reason_and_the_rest_is_sharded():
    model = hf_models.LogitsOnly(hf_models.build("llama", num_key_value_heads=1, seed=5))
    inputs = (torch.randint(3, 300, (1, 7)),)
    with torch.no_grad():
        expected = model(*inputs)
    ranks = _sharded(model, inputs, 2)
    report = ranks[0].info["tensor_parallel"]
    assert report["attention"] == [] and len(report["replicated"]) == 2
    assert all("multi-query" in why for why in report["replicated"].values())
    assert len(report["mlp"]) == 2
    for out in _run_ranks(ranks, inputs):
        assert_close_to_eager(_first(out), expected)


def test_weights_that_do_not_fit_name_the_world_size_that_would():
    check_fits(3 * 2**30, Mesh(2, 0, "g"), available=4 * 2**30)
    with pytest.raises(TensorParallelError, match=r"3.00 GiB.*2.00 GiB.*world size of at least 3"):
        check_fits(3 * 2**30, Mesh(2, 0, "g"), available=2 * 2**30)


def test_options_say_what_is_missing_or_conflicting():
    with pytest.raises(TensorParallelError, match="torchrun --nproc-per-node 2"):
        fxforge.parse_options(tensor_parallel=2)
    with pytest.raises(OptionsError, match="True, False or a world size"):
        fxforge.parse_options(tensor_parallel="two")
    with pytest.raises(OptionsError, match="prune"):
        fxforge.parse_options(tensor_parallel=True, prune="mlp:0.25")
    with pytest.raises(OptionsError, match="freeze_weights=True"):
        fxforge.parse_options(tensor_parallel=True, freeze_weights=False)
    with pytest.raises(OptionsError, match="calibrates"):
        fxforge.parse_options(tensor_parallel=True, quantize="int4:gptq")
    assert fxforge.parse_options().tensor_parallel is False


def test_a_sharded_graph_is_stored_with_its_collectives_and_rebound_on_load():
    model = hf_models.LogitsOnly(hf_models.build("llama", seed=2))
    ir = _sharded(model, (torch.randint(3, 300, (1, 5)),), 2)[1]
    stored = json.loads(json.dumps(ir_to_json(ir)))
    loaded = ir_from_json(stored, dict(ir.constants()))
    assert rebind_group(loaded, "mine") == 6
    groups = {n.args[2] for n in loaded.gm.graph.nodes if n.target in (ALL_REDUCE, ALL_GATHER)}
    assert groups == {"mine"}
    # only the collectives and their wait load from their namespace
    with pytest.raises(SerializationError, match="broadcast"):
        resolve_target("_c10d_functional.broadcast.default")


@pytest.mark.parametrize("rounding", ["rtn", "mse"])
def test_a_row_parallel_shard_is_quantized_with_its_whole_rows_scales(rounding):
    from fxforge.passes.quantize_math import quantize_int8_channel
    whole = torch.randn(48, 64, generator=fresh_generator())
    codes, scales = quantize_int8_channel(whole, rounding)
    for start in (0, 32):   # each rank's half of the input features
        piece_codes, piece_scales = quantize_int8_channel(whole[:, start:start + 32], rounding,
                                                          whole_nk=whole)
        assert torch.equal(piece_scales, scales)
        assert torch.equal(piece_codes, codes[:, start:start + 32])


class _TiedHeadThenLogSoftmax(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(64, 16)
        self.head = torch.nn.Linear(16, 64, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return torch.log_softmax(self.head(torch.tanh(self.embed(ids))), dim=-1)


def test_a_table_tied_to_a_head_that_stays_whole_stays_whole_too(caplog):
    model, inputs = _TiedHeadThenLogSoftmax().eval(), (torch.randint(0, 64, (1, 5)),)
    with torch.no_grad():
        expected = model(*inputs)
    ranks = _sharded(model, inputs, 2)
    report = ranks[0].info["tensor_parallel"]
    # the head feeds a log_softmax over the vocabulary: it and its tied table are not split
    assert report["lm_heads"] == [] and report["embeddings"] == []
    assert report["bytes_after"] == report["bytes_before"]
    assert "nothing in this graph" in caplog.text
    for out in _run_ranks(ranks, inputs):
        assert_close_to_eager(out, expected)


@pytest.mark.slow
@pytest.mark.parametrize("arch", hf_models.ARCHITECTURES)
def test_every_zoo_architecture_splits_exactly(arch):
    model = hf_models.LogitsOnly(hf_models.build(arch, seed=21))
    inputs = hf_models.example_inputs(arch, batch=1, seq=8, seed=int.from_bytes(os.urandom(2), "little"))
    with torch.no_grad():
        expected = _first(model(*inputs))
    ranks = _sharded(model, inputs, 2)
    for out in _run_ranks(ranks, inputs):
        assert_close_to_eager(_first(out), expected)
    report = ranks[0].info["tensor_parallel"]
    assert report["embeddings"] and report["lm_heads"], report
    assert report["mlp"] or arch == "mixtral"      # experts are not split (they stay whole)
    assert report["bytes_after"] < 0.8 * report["bytes_before"]
