"""Attention-head pruning (``prune={"heads": f}``): whole kv groups leave, tracked by axes.

The oracle is the Hugging Face model pruned by hand: a deep copy whose q/k/v/o weights keep
the report's kept groups (sliced here, from the architecture's own layout) and whose head
counts are set where its eager code reads them."""
import copy

import pytest
import torch

import fxforge
from fxforge.compiler import recording
from fxforge.passes.prune_spec import PruneSpecError, parse_prune
from fxforge.testing import assert_close_to_eager

hf_models = pytest.importorskip("fxforge.examples.hf_models")

HEAD_DIM = hf_models.HIDDEN // hf_models.HEADS
SEQ = 8


def _blocks(kept: list[int], width: int) -> torch.Tensor:
    """The indices of blocks ``kept`` of ``width`` consecutive features each."""
    return torch.cat([torch.arange(k * width, (k + 1) * width) for k in kept])


def _keep_out(layer, index: torch.Tensor, dim: int = 0) -> None:
    """Keep output features ``index`` (dim 0 of an nn.Linear's weight, 1 of a Conv1D's)."""
    layer.weight = torch.nn.Parameter(layer.weight.detach().index_select(dim, index))
    if getattr(layer, "bias", None) is not None:
        layer.bias = torch.nn.Parameter(layer.bias.detach()[index])


def _keep_in(layer, index: torch.Tensor, dim: int = 1) -> None:
    layer.weight = torch.nn.Parameter(layer.weight.detach().index_select(dim, index))


def _prune_llama(attn, kept, heads, kv_heads):
    query = _blocks(kept, heads // kv_heads * HEAD_DIM)
    for proj, index in ((attn.q_proj, query), (attn.k_proj, _blocks(kept, HEAD_DIM)),
                        (attn.v_proj, _blocks(kept, HEAD_DIM))):
        _keep_out(proj, index)
    _keep_in(attn.o_proj, query)


def _prune_phi3(attn, kept, heads, kv_heads):
    query, kv = _blocks(kept, heads // kv_heads * HEAD_DIM), _blocks(kept, HEAD_DIM)
    q_width, kv_width = heads * HEAD_DIM, kv_heads * HEAD_DIM
    _keep_out(attn.qkv_proj, torch.cat([query, q_width + kv, q_width + kv_width + kv]))
    _keep_in(attn.o_proj, query)
    attn.config.num_attention_heads = heads // kv_heads * len(kept)   # (shared by the layers)
    attn.num_key_value_heads = len(kept)


def _prune_gpt2(attn, kept, heads, kv_heads):
    width, index = heads * HEAD_DIM, _blocks(kept, HEAD_DIM)
    _keep_out(attn.c_attn, torch.cat([index, width + index, 2 * width + index]), dim=1)
    attn.c_attn.nf = 3 * len(index)
    _keep_in(attn.c_proj, index, dim=0)
    attn.split_size = attn.embed_dim = len(index)
    attn.num_heads = len(kept)


def _prune_opt(attn, kept, heads, kv_heads):
    index = _blocks(kept, HEAD_DIM)
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
        _keep_out(proj, index)
    _keep_in(attn.out_proj, index)
    attn.num_heads = len(kept)


def _prune_gpt_neox(attn, kept, heads, kv_heads):
    _keep_out(attn.query_key_value, _blocks(kept, 3 * HEAD_DIM))   # per head: its q, k, v
    _keep_in(attn.dense, _blocks(kept, HEAD_DIM))


def _prune_bert(attention, kept, heads, kv_heads):
    index = _blocks(kept, HEAD_DIM)
    for proj in (attention.self.query, attention.self.key, attention.self.value):
        _keep_out(proj, index)
    _keep_in(attention.output.dense, index)
    attention.self.num_attention_heads = len(kept)
    attention.self.all_head_size = len(index)


BY_HAND = {"llama": _prune_llama, "mistral": _prune_llama, "qwen2": _prune_llama,
           "qwen3": _prune_llama,   # (its per-head q/k norms reduce along the head dim)
           "phi3": _prune_phi3, "gpt2": _prune_gpt2, "opt": _prune_opt,
           "gpt_neox": _prune_gpt_neox, "bert": _prune_bert}


def _pruned_by_hand(model, arch: str, rows: list[dict]):
    pruned = copy.deepcopy(model)
    for row in rows:
        BY_HAND[arch](pruned.get_submodule(row["name"]), row["kept_groups"], row["heads"],
                      row["kv_heads"])
    return pruned


def _compile(model, inputs, **options):
    torch._dynamo.reset()
    with recording() as graphs:
        compiled = fxforge.compile(model, inputs, dynamic=True, **options)
    return compiled, graphs[0]


# CI runs GQA Llama (its literals coincide: 2 kv heads of 2 query heads each); the others
# (fused projections sliced or split, interleaved per head, MHA, an encoder) cost ~10 s of
# capture each and run with `-m slow`.
ARCHS = [a if a == "llama" else pytest.param(a, marks=pytest.mark.slow) for a in sorted(BY_HAND)]


@pytest.mark.parametrize("arch", ARCHS)
def test_pruned_heads_match_the_model_pruned_by_hand(arch):
    model = hf_models.LogitsOnly(hf_models.build(arch))
    inputs = hf_models.example_inputs(arch, batch=2, seq=SEQ)
    compiled, graph = _compile(model, inputs, prune={"heads": 0.5})
    report = graph.ir.info["prune"]
    rows = report["heads"]
    assert len(rows) == hf_models.LAYERS and not report["heads_declined"]
    for row in rows:
        groups_after = row["kv_heads"] // 2
        assert row["kv_heads_after"] == len(row["kept_groups"]) == groups_after
        assert row["heads_after"] == row["heads"] // row["kv_heads"] * groups_after
        assert row["bytes_saved"] > 0 and row["measured"]
    assert report["bytes_after"] < report["bytes_before"]
    with torch.no_grad():
        want = _pruned_by_hand(model, arch, rows)(*inputs)
        assert_close_to_eager(compiled(*inputs), want)
        longer = hf_models.example_inputs(arch, batch=2, seq=SEQ + 3, seed=1)   # (same graph)
        assert_close_to_eager(compiled(*longer), _pruned_by_hand(model, arch, rows)(*longer))
        assert not torch.allclose(want, model(*inputs), atol=1e-3)   # something was removed


def test_gqa_keeps_whole_groups_and_the_kv_cache_shrinks():
    """Llama with fused attention (SDPA, which the KV-cache pass caches): 4 query heads in 2 kv
    groups; the kept group's two query heads stay together (the eager oracle keeps exactly
    them) and the cache buffers hold one kv head."""
    model = hf_models.LogitsOnly(hf_models.build("llama", attn_implementation="sdpa"))
    ids = hf_models.example_inputs("llama", batch=1, seq=SEQ)[0]
    compiled, graph = _compile(model, (ids,), prune={"heads": 0.5, "score": "magnitude"},
                               kv_cache=True, max_seq_len=32)
    rows = graph.ir.info["prune"]["heads"]
    assert [r["kv_heads_after"] for r in rows] == [1, 1] and not rows[0]["measured"]
    caches = graph.kv.plan.caches
    assert len(caches) == 2 * hf_models.LAYERS
    assert all(c.heads == 1 and c.head_dim == HEAD_DIM for c in caches)
    pruned = _pruned_by_hand(model, "llama", rows)
    with torch.no_grad():
        for _ in range(4):   # a prefill, then one-token steps from the cache
            got = compiled(ids)
            assert_close_to_eager(got, pruned(ids))
            ids = torch.cat([ids, got[:, -1].argmax(-1, keepdim=True)], 1)
    assert graph.kv.stats["steps"] >= 2


@pytest.mark.slow
def test_t5_declines_for_its_per_head_position_bias():
    model = hf_models.LogitsOnly(hf_models.build("t5"))
    inputs = hf_models.example_inputs("t5", batch=2, seq=SEQ)
    compiled, graph = _compile(model, inputs, prune={"heads": 0.5})
    report = graph.ir.info["prune"]
    assert report["heads_declined"]
    assert all("per-head side input" in why for why in report["heads_declined"].values())
    with torch.no_grad():
        assert_close_to_eager(compiled(*inputs), model(*inputs))   # nothing else changed


def test_the_spec_reads_and_writes_heads():
    spec = parse_prune("heads:0.25")
    assert spec.heads == 0.25 and spec.needs_calibration
    assert parse_prune(str(spec)) == spec and str(spec) == "heads:0.25,score:wanda"
    assert not parse_prune({"heads": 0.5, "score": "magnitude"}).needs_calibration
    with pytest.raises(PruneSpecError, match="heads must be a fraction"):
        parse_prune({"heads": 1.0})


def test_the_axes_put_each_query_head_with_its_kv_group():
    """The axis algebra alone, on tiny Llama's numbers (kv heads == query heads per group == 2):
    q's 64 columns view as [4 heads, 16]; the bmm unifies those 4 heads with k's [2 groups,
    2 broadcast], so q's heads split as [group, head in group] by position, not by value."""
    from fxforge.passes.prune_axes import Atom, find, group_ids, new_size, reshape, unify
    q_columns, k_columns = Atom(64, column=True), Atom(32, column=True)
    q_heads, _ = reshape([[q_columns]], [4, 16])
    k_heads, _ = reshape([[k_columns]], [2, 16])
    unify(q_heads, k_heads + [Atom(2, broadcast=True)])
    group = find(k_heads[0])

    def is_group(atom):
        return find(atom) is group
    assert group_ids([q_columns], is_group).tolist() == [0] * 32 + [1] * 32
    assert group_ids([k_columns], is_group).tolist() == [0] * 16 + [1] * 16
    kept = torch.tensor([1])
    assert new_size([q_columns], is_group, kept) == 32 and new_size(q_heads, is_group, kept) == 2
