"""Structured pruning (option ``prune``): MLP channels and decoder blocks on the nine CI
architectures. Every pruned compile is checked against the eager model pruned by hand: the same
channels sliced out of its parameters, the same blocks skipped by a forward hook."""
import copy

import pytest
import torch
import torch.nn as nn

pytest.importorskip("transformers")

import fxforge  # noqa: E402
from fxforge.compiler import recording  # noqa: E402
from fxforge.examples.hf_models import LogitsOnly, build, example_inputs  # noqa: E402
from fxforge.passes.prune_mlp import keep_count  # noqa: E402
from fxforge.passes.prune_spec import PruneSpecError, parse_prune  # noqa: E402

CORE = ("gpt2", "llama", "mistral", "qwen2", "phi3", "opt", "gpt_neox", "bert", "t5")
TOL = dict(rtol=1e-4, atol=1e-4)


def _seed() -> int:
    return int(torch.randint(0, 2**30, ()))


def _compile(model, inputs, **options):
    with recording() as graphs:
        compiled = fxforge.compile(model, inputs, dynamic=True, **options)
    return compiled, graphs[0]


# ---------------------------------------------------------------- hand-pruned references

def _owner(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name.rsplit(".", 1)[0])


def _is_conv1d(module: nn.Module) -> bool:   # GPT-2 stores its weights [in, out]
    return type(module).__name__ == "Conv1D"


def _keep_outputs(model: nn.Module, name: str, index: torch.Tensor) -> None:
    module = _owner(model, name)
    module.weight = nn.Parameter(module.weight.index_select(1 if _is_conv1d(module) else 0, index))
    if module.bias is not None:
        module.bias = nn.Parameter(module.bias.index_select(0, index))
    if _is_conv1d(module):
        module.nf = index.numel()


def _keep_inputs(model: nn.Module, name: str, index: torch.Tensor) -> None:
    module = _owner(model, name)
    module.weight = nn.Parameter(module.weight.index_select(0 if _is_conv1d(module) else 1, index))


def hand_pruned_mlps(model: nn.Module, rows: list[dict]) -> nn.Module:
    pruned = copy.deepcopy(model)
    for row in rows:
        keep = torch.tensor(row["kept_channels"])
        for producer in row["producers"]:
            _keep_outputs(pruned, producer["name"],
                          torch.cat([offset + keep for offset in producer["offsets"]]))
        _keep_inputs(pruned, row["name"], keep)
    return pruned


def hand_skipped_blocks(model: nn.Module, rows: list[dict]) -> nn.Module:
    """The model with each named block replaced by the identity on its hidden states."""
    skipped = copy.deepcopy(model)

    def identity(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
    for row in rows:
        skipped.get_submodule(row["name"]).register_forward_hook(identity, with_kwargs=True)
    return skipped


# ---------------------------------------------------------------- MLP channels

@pytest.mark.parametrize("arch", CORE)
def test_mlp_channels_match_hand_slicing(arch):
    model = LogitsOnly(build(arch, seed=_seed()))
    inputs = example_inputs(arch, batch=2, seq=12, seed=_seed())
    compiled, graph = _compile(model, inputs, prune={"mlp": 0.25, "compensate": "off"})
    rows = graph.ir.info["prune"]["mlp"]
    assert len(rows) == (4 if arch == "t5" else 2)   # T5: encoder and decoder stacks
    for row in rows:
        assert row["width"] == 128 and row["kept"] == len(row["kept_channels"]) == 96
    assert graph.ir.info["prune"]["bytes_after"] < graph.ir.info["prune"]["bytes_before"]
    check = example_inputs(arch, batch=2, seq=9, seed=_seed())
    with torch.no_grad():
        torch.testing.assert_close(compiled(*check), hand_pruned_mlps(model, rows)(*check), **TOL)


def test_mlp_shapes_shrink_in_the_compiled_graph():
    model = LogitsOnly(build("llama", seed=_seed()))
    _, graph = _compile(model, example_inputs("llama", seq=12, seed=_seed()), prune="mlp:0.5")
    widths = sorted({lin.weight.meta["val"].shape[0] for lin in _linears(graph)})
    assert 64 in widths and 128 not in widths   # the down projections read 64 channels, not 128


def _linears(graph):
    from fxforge.irgraph.views import Linear
    return [lin for n in graph.ir.gm.graph.nodes if (lin := Linear.of(n)) is not None]


def test_compensation_folds_the_removed_mean_into_the_bias():
    model = LogitsOnly(build("llama", seed=_seed()))
    inputs = example_inputs("llama", batch=2, seq=16, seed=_seed())
    compiled, graph = _compile(model, inputs, prune={"mlp": 0.25, "compensate": "on"})
    rows = graph.ir.info["prune"]["mlp"]
    assert all(row["compensated"] for row in rows)
    reference = hand_pruned_mlps(model, rows)
    for row in rows:   # the bias by hand: the removed channels' mean input, through their weights
        seen = []
        down = model.get_submodule(row["name"].rsplit(".", 1)[0])
        hook = down.register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
        with torch.no_grad():
            model(*inputs)
        hook.remove()
        x = seen[0].reshape(-1, row["width"])
        removed = torch.tensor(sorted(set(range(row["width"])) - set(row["kept_channels"])))
        bias = x[:, removed].mean(0) @ down.weight[:, removed].t()
        _owner(reference, row["name"]).bias = nn.Parameter(bias)
    with torch.no_grad():
        torch.testing.assert_close(compiled(*inputs), reference(*inputs), **TOL)


def test_wanda_and_magnitude_rank_channels_differently():
    model = LogitsOnly(build("llama", seed=_seed()))
    inputs = example_inputs("llama", batch=2, seq=16, seed=_seed())
    kept = {}
    for score in ("wanda", "magnitude"):
        _, graph = _compile(model, inputs, prune={"mlp": 0.5, "score": score})
        kept[score] = [row["kept_channels"] for row in graph.ir.info["prune"]["mlp"]]
        torch._dynamo.reset()
    assert kept["wanda"] != kept["magnitude"]


def test_keep_count_is_aligned():
    assert keep_count(1536, 0.25) == 1152
    assert keep_count(128, 0.25) == 96
    assert keep_count(100, 0.25) == 75          # not a multiple of 32: exact
    assert keep_count(64, 0.9) == 32 and keep_count(8, 0.9) == 1


# ---------------------------------------------------------------- decoder blocks

# Four stack shapes run in CI (pre-norm decoder, GPT-2's Conv1D, post-norm encoder, encoder-
# decoder); the other five, which repeat the pre-norm decoder's structure, under -m slow.
BLOCK_CI = ("llama", "gpt2", "bert", "t5")


@pytest.mark.parametrize("arch", [pytest.param(a, marks=() if a in BLOCK_CI else pytest.mark.slow)
                                  for a in CORE])
def test_dropped_block_matches_skipping_it(arch):
    model = LogitsOnly(build(arch, seed=_seed(), num_hidden_layers=3)
                       if arch not in ("gpt2", "t5", "bert", "opt", "gpt_neox")
                       else build(arch, seed=_seed()))
    inputs = example_inputs(arch, batch=2, seq=12, seed=_seed())
    compiled, graph = _compile(model, inputs, prune={"drop_layers": [0]})
    rows = graph.ir.info["prune"]["layers"]
    assert [row["index"] for row in rows] == [0] and rows[0]["name"]
    assert rows[0]["influence"] is not None and 0 <= rows[0]["influence"] <= 2
    check = example_inputs(arch, batch=2, seq=7, seed=_seed())
    with torch.no_grad():
        torch.testing.assert_close(compiled(*check), hand_skipped_blocks(model, rows)(*check), **TOL)


def test_layers_removes_the_least_influential_block():
    """A block whose attention and MLP write nothing to the residual stream has influence 0."""
    model = LogitsOnly(build("llama", seed=_seed(), num_hidden_layers=4))
    quiet = model.model.model.layers[2]
    with torch.no_grad():
        quiet.self_attn.o_proj.weight.zero_()
        quiet.mlp.down_proj.weight.zero_()
    inputs = example_inputs("llama", batch=2, seq=16, seed=_seed())
    _, graph = _compile(model, inputs, prune={"layers": 1})
    rows = graph.ir.info["prune"]["layers"]
    assert [row["name"] for row in rows] == ["model.model.layers.2"]
    assert rows[0]["influence"] == pytest.approx(0.0, abs=1e-6)


def test_kv_cache_shrinks_with_the_blocks_and_decodes_like_the_reference():
    # SDPA attention: eager attention's scale becomes a runtime input under dynamic shapes
    model = LogitsOnly(build("llama", seed=_seed(), num_hidden_layers=3, attn_implementation="sdpa"))
    prompt = example_inputs("llama", batch=1, seq=10, seed=_seed())[0]
    _, full = _compile(model, (prompt,), kv_cache=True)
    torch._dynamo.reset()
    compiled, graph = _compile(model, (prompt,), kv_cache=True,
                               prune={"layers": 1, "mlp": 0.25, "compensate": "off"})
    assert len(graph.kv.plan.caches) == len(full.kv.plan.caches) * 2 // 3
    reference = hand_pruned_mlps(hand_skipped_blocks(model, graph.ir.info["prune"]["layers"]),
                                 graph.ir.info["prune"]["mlp"])
    tokens = fxforge.generate(compiled, prompt, 8)
    expected = fxforge.generate(reference, prompt, 8)
    assert torch.equal(tokens, expected)
    assert graph.kv.stats["steps"] >= 7


# ---------------------------------------------------------------- the option

def test_option_forms_and_errors():
    spec = parse_prune({"mlp": 0.25, "layers": 2})
    assert parse_prune(str(spec)) == spec
    assert parse_prune("drop_layers:3+5").drop_layers == (3, 5)
    for bad, words in [({"mlp": 1.5}, "mlp"), ({"layers": -1}, "layers"), ({}, "removes nothing"),
                       ({"layers": 1, "drop_layers": [1]}, "not both"), ({"score": "l2"}, "score"),
                       ({"heads_x": 1}, "unknown"), ("mlp=0.2", "cannot read"),
                       ({"sparsity": "1:4"}, "2:4")]:
        with pytest.raises(PruneSpecError, match=words):
            parse_prune(bad)


def test_semi_structured_sparsity_is_refused_on_the_cpu():
    model = LogitsOnly(build("llama", seed=_seed()))
    with pytest.raises(fxforge.OptionsError, match="GPU-only"):
        fxforge.compile(model, example_inputs("llama"), prune={"sparsity": "2:4"})


def test_too_many_blocks_is_a_clear_error():
    model = LogitsOnly(build("llama", seed=_seed()))
    with pytest.raises(Exception, match="removable block"):
        fxforge.compile(model, example_inputs("llama"), prune={"layers": 2})


# ---------------------------------------------------------------- SmolLM2 (real weights)

def _smollm2_heads_by_hand(model: nn.Module, rows: list[dict], head_dim: int) -> None:
    def blocks(kept, width):
        return torch.cat([torch.arange(k * width, (k + 1) * width) for k in kept])
    for row in rows:
        attn = model.get_submodule(row["name"])
        query = blocks(row["kept_groups"], row["heads"] // row["kv_heads"] * head_dim)
        kv = blocks(row["kept_groups"], head_dim)
        for proj, index in ((attn.q_proj, query), (attn.k_proj, kv), (attn.v_proj, kv)):
            proj.weight = nn.Parameter(proj.weight.index_select(0, index))
        attn.o_proj.weight = nn.Parameter(attn.o_proj.weight.index_select(1, query))


@pytest.mark.slow
def test_smollm2_every_kind_matches_the_model_pruned_by_hand():
    from fxforge.calibration import calibration_text
    from fxforge.examples.smollm2 import load_smollm2, smollm2_available
    if not smollm2_available():
        pytest.skip("SmolLM2 is not installed")
    model, tokenizer = load_smollm2(progress=False)
    text = calibration_text(tokenizer, 256, 2)
    wrapped = LogitsOnly(model)
    compiled, graph = _compile(wrapped, (text[:1],), kv_cache=True,
                               prune={"mlp": 0.25, "heads": 0.34, "drop_layers": [12],
                                      "compensate": "off"})
    info = graph.ir.info["prune"]
    assert len(info["mlp"]) == 29 and all(r["kept"] == 1152 for r in info["mlp"])
    assert len(info["heads"]) == 29 and all(r["kv_heads_after"] == 2 for r in info["heads"])
    assert [r["name"] for r in info["layers"]] == ["model.model.layers.12"]
    assert {spec.heads for spec in graph.kv.plan.caches} == {2}   # the KV cache shrank
    reference = hand_pruned_mlps(hand_skipped_blocks(wrapped, info["layers"]), info["mlp"])
    _smollm2_heads_by_hand(reference, info["heads"], model.config.head_dim)
    with torch.no_grad():
        torch.testing.assert_close(compiled(text[1:]), reference(text[1:]), rtol=1e-4, atol=2e-3)
