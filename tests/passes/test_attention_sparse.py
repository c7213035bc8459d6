"""``attention="block_sparse:..."``: the option, the op and its CPU kernel against an oracle
written from the pattern's definition, whole models (eager with the pattern as its mask), the KV
cache (sparse prefill, dense decode), and patterns chosen per head on calibration inputs."""
import copy
import logging

import pytest
import torch

import fxforge
from fxforge.compiler import recording
from fxforge.errors import OptionsError
from fxforge.examples.small_gpt import make_model
from fxforge.irgraph.views import BlockSparseAttention
from fxforge.kernels.sparse_attention_cpu import cpu_block_sparse_attention
from fxforge.passes.attention_modes import AttentionSpecError, parse_attention
from fxforge.passes.attention_sparse import DENSE, BlockSparseSpec, choose_pattern, cost
from tests.passes.helpers import fresh_generator, greedy_loop, random_qkv

block_sparse_attention = torch.ops.fxforge.block_sparse_attention


pytestmark = pytest.mark.usefixtures("fresh_measurements")



def sees(pattern, block, i, j) -> bool:
    """The definition: query i sees key j (independent of sparse_ops' tensor code)."""
    local, global_, stride, window, sinks = pattern
    qb, kb = i // block, j // block
    near = local == 0 or qb - kb < local
    strided = stride > 0 and (qb - kb) % stride == 0
    in_window = window == 0 or j < sinks or i - j < window
    return j <= i and (near or kb < global_ or strided) and in_window


def oracle(q, k, v, patterns, block, scale=None):
    """One query row at a time over the keys it sees, in float64."""
    q, k, v = q.double(), k.double(), v.double()
    groups = q.shape[1] // k.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=torch.float64)
    for h in range(q.shape[1]):
        pattern = patterns[0] if len(patterns) == 1 else patterns[h]
        for i in range(q.shape[2]):
            seen = [j for j in range(i + 1) if sees(pattern, block, i, j)]
            scores = (k[:, h // groups, seen] @ q[:, h, i, :, None]).squeeze(-1) * scale
            out[:, h, i] = (scores.softmax(-1)[..., None] * v[:, h // groups, seen]).sum(1)
    return out



# ---- the option --------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, want", [
    ("block_sparse:64", BlockSparseSpec(64, 4, 1, 0)),
    ("block_sparse:32,local:2,global:0,stride:8", BlockSparseSpec(32, 2, 0, 8)),
    ("block_sparse:auto", BlockSparseSpec(64, auto=True, mass=0.95)),
    ("block_sparse:auto,block:16,mass:0.9", BlockSparseSpec(16, auto=True, mass=0.9))])
def test_the_option_parses(spec, want):
    assert parse_attention(spec) == want
    assert parse_attention(str(want)) == want


@pytest.mark.parametrize("spec, message", [
    ("block_sparse:48", "block 48 is not one of 16, 32, 64, 128, 256"),
    ("block_sparse:64,local:0", "local must be an integer >= 1"),
    ("block_sparse:64,mass:0.9", "unknown field 'mass'"),
    ("block_sparse:auto,mass:1.5", r"mass must be a number in \[0.0, 1.0\]"),
    ("block_sparse:auto,local:2", "unknown field 'local'"),
    ("block_sparse:sparse", "block must be an integer")])
def test_bad_options_are_clear_errors(spec, message):
    with pytest.raises(AttentionSpecError, match=message):
        parse_attention(spec)
    with pytest.raises(OptionsError, match=message):
        fxforge.compile(torch.nn.Linear(4, 4), (torch.randn(2, 4),), attention=spec)


# ---- the op and the kernel against the oracle ----------------------------------------------------

@pytest.mark.parametrize("batch, heads, kv_heads, length, block, patterns", [
    (1, 2, 2, 37, 16, [(2, 1, 0, 0, 0)]), (2, 4, 2, 130, 16, [(1, 0, 3, 0, 0)]),
    (3, 6, 3, 64, 32, [(1, 1, 0, 0, 0)]), (1, 2, 1, 100, 16, [(0, 0, 0, 20, 3)]),
    (2, 4, 1, 90, 16, [(1, 0, 0, 0, 0), (0, 0, 0, 0, 0), (2, 1, 2, 0, 0), (3, 0, 0, 9, 1)]),
    (1, 2, 2, 5, 16, [(1, 0, 0, 0, 0)]), (2, 4, 2, 40, 16, [DENSE] * 4),
    (1, 6, 2, 70, 16, [DENSE, (1, 1, 0, 0, 0), DENSE, DENSE, (2, 0, 0, 0, 0), DENSE])])
def test_the_op_and_the_kernel_follow_the_pattern(batch, heads, kv_heads, length, block, patterns):
    gen = fresh_generator()
    q, k, v = random_qkv(gen, batch, heads, kv_heads, length)
    flat = [x for p in patterns for x in p]
    want = oracle(q, k, v, patterns, block, scale=0.3)
    torch.testing.assert_close(block_sparse_attention(q, k, v, flat, block, 0.3).double(), want,
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cpu_block_sparse_attention(q, k, v, flat, block, 0.3).double(),
                               want, rtol=1e-5, atol=1e-5)


def test_inputs_the_kernel_declines_take_the_reference(caplog):
    gen = fresh_generator()
    q, k, v = random_qkv(gen, 1, 2, 1, 40)
    flat = [1, 1, 0, 0, 0]
    with caplog.at_level(logging.INFO, "fxforge.kernels"):
        got = cpu_block_sparse_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), flat, 16)
    torch.testing.assert_close(got.double(), oracle(q, k, v, [flat], 16), rtol=3e-2, atol=3e-2)
    assert "fp32 only" in caplog.text


def test_wrong_patterns_are_clear_errors():
    q, k, v = random_qkv(fresh_generator(), 1, 4, 2, 8)
    with pytest.raises(ValueError, match="5 per head"):
        block_sparse_attention(q, k, v, [1, 0, 0, 0, 0] * 2, 16)
    with pytest.raises(ValueError, match="negative pattern field"):
        block_sparse_attention(q, k, v, [1, -1, 0, 0, 0], 16)


def test_cost_counts_the_blocks_a_pattern_reads():
    assert cost(DENSE, 64) == 1.0
    assert cost((1, 0, 0, 0, 0), 64, 64 * 4) == pytest.approx(4 / 10)
    assert cost((2, 1, 0, 0, 0), 64, 64 * 4) == pytest.approx(9 / 10)   # 1 + 2 + 3 + 3


def test_auto_takes_the_cheapest_pattern_that_keeps_the_mass():
    blocks = 8
    local = torch.eye(blocks)                                   # all mass on the diagonal block
    assert choose_pattern(local, 64, 0.95) == ((1, 0, 0, 0, 0), 1.0)
    sink = 0.5 * torch.eye(blocks)
    sink[:, 0] += 0.5                                           # half on the first block
    assert choose_pattern(sink, 64, 0.95)[0] == (1, 1, 0, 0, 0)
    uniform = torch.tril(torch.ones(blocks, blocks))
    uniform = uniform / uniform.sum(1, keepdim=True)
    assert choose_pattern(uniform, 64, 0.99) == (DENSE, 1.0)


# ---- whole models --------------------------------------------------------------------------------

def _masked_eager(model, allowed):
    """The same model in eager with ``allowed(n)`` ([n, n] bool) as its attention mask
    (small_gpt masks with a registered bool buffer)."""
    ref = copy.deepcopy(model)
    for module in ref.modules():
        if hasattr(module, "tril"):
            module.tril = allowed(module.tril.shape[-1]).view(1, 1, *module.tril.shape[-2:])
    return ref


def _pattern_mask(pattern, block, prompt=None):
    def allowed(n):
        i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
        mask = torch.tensor([[sees(pattern, block, a, b) for b in range(n)] for a in range(n)])
        return mask if prompt is None else torch.where(i < prompt, mask, j <= i)
    return allowed


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_a_model_compiled_with_the_option_matches_eager_with_the_pattern(backend):
    gen = fresh_generator()
    model = make_model(n_layer=2).eval()
    ids = torch.randint(0, 512, (2, 45), generator=gen)
    with recording() as graphs:
        compiled = fxforge.compile(model, (ids,), backend=backend,
                                   attention="block_sparse:16,local:1,global:1,stride:0")
        got = compiled(ids)
    with torch.no_grad():
        want = _masked_eager(model, _pattern_mask((1, 1, 0, 0, 0), 16))(ids)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert (got - model(ids)).abs().max() > 1e-3   # lossy: not the dense model
    counts = [p.counts for p in graphs[0].ir.info["passes"] if p.name == "attention_sparse"]
    assert counts == [{"sparse_sites": 2, "dense_sites": 0}]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_the_kv_cache_keeps_the_pattern_in_the_prefill_and_decodes_densely(backend):
    gen = fresh_generator()
    model = make_model(n_layer=2).eval()
    prompt = torch.randint(0, 512, (2, 40), generator=gen)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="fxforge", options={
        "kv_cache": True, "max_seq_len": 64, "backend": backend,
        "attention": "block_sparse:16,local:1,global:0,stride:2"})
    with torch.no_grad(), recording() as graphs:
        # the first call (40 tokens) runs the static graph; the second (41) fills the cache
        # in one prefill, so positions up to 40 follow the pattern and the later ones are dense
        ref = _masked_eager(model, _pattern_mask((1, 0, 2, 0, 0), 16, prompt=41))
        want_ids, want = greedy_loop(ref, prompt, 8)
        got_ids, got = greedy_loop(compiled, prompt, 8)
    assert torch.equal(got_ids, want_ids)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    (decoder,) = [g.kv for g in graphs if g.kv is not None]
    assert decoder.stats["uncached"] == 0 and decoder.stats["steps"] == 6


def test_auto_measures_a_pattern_per_head_and_runs_it(caplog):
    """Each head gets its own pattern; the model then equals eager with, per layer and head,
    the mask of the pattern the graph holds."""
    gen = fresh_generator()
    model = make_model(n_layer=2).eval()
    ids = torch.randint(0, 512, (1, 64), generator=gen)
    with recording() as graphs, caplog.at_level(logging.INFO, "fxforge.passes.attention"):
        compiled = fxforge.compile(model, (ids,), backend="cpu",
                                   attention="block_sparse:auto,block:16,mass:0.6")
        got = compiled(ids)
    (counts,) = [p.counts for p in graphs[0].ir.info["passes"] if p.name == "attention_sparse"]
    heads = model.blocks[0].attn.n_head
    assert counts["sparse_sites"] == 2 and counts["sparse_heads"] + counts["dense_heads"] == 2 * heads
    assert counts["sparse_heads"] > 0 and 0 < counts["work_vs_dense"] < 1
    assert "site 0" in caplog.text and "holds" in caplog.text
    ops = [BlockSparseAttention.of(n) for n in graphs[0].ir.gm.graph.nodes
           if BlockSparseAttention.matches(n)]
    ref = copy.deepcopy(model)
    for block, op in zip(ref.blocks, ops):
        patterns = [tuple(op.patterns[i:i + 5]) for i in range(0, len(op.patterns), 5)]
        block.attn.tril = torch.stack([_pattern_mask(p, 16)(64) for p in patterns])[None]
    with torch.no_grad():
        torch.testing.assert_close(got, ref(ids), rtol=1e-4, atol=1e-4)


def test_auto_needs_a_calibration_sequence_of_several_blocks(caplog):
    """Too short to measure: the graph keeps dense attention, with the reason logged."""
    model = make_model(n_layer=1).eval()
    ids = torch.randint(0, 512, (1, 20), generator=fresh_generator())
    with caplog.at_level(logging.WARNING, "fxforge.passes.attention"):
        compiled = fxforge.compile(model, (ids,), backend="cpu", attention="block_sparse:auto,block:16")
    assert "choosing patterns (4 blocks) needs at least 64" in caplog.text and "stays dense" in caplog.text
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids), model(ids), rtol=1e-4, atol=1e-4)
