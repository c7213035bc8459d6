"""kv_cache_dtype="int8": the option, the cached ops (reference and C++ kernel) against a float64
oracle of the quantization rule written from its definition, the ring buffer wrapping many
times, the ISA variants, whole models through fxforge.compile + generate, the cache's bytes and
an AOT round trip."""
import json
import os

import pytest
import torch

import fxforge
from fxforge.compiler import recording
from fxforge.errors import ArtifactError, OptionsError
from fxforge.examples.small_gpt import make_model
from fxforge.irgraph.window_ops import slot_of
from fxforge.kernels import decode_attention_cpu
from fxforge.kernels.decode_attention_cpu import CpuDecodeAttention, cpu_cached_attention
from fxforge.kernels.window_attention_cpu import cpu_cached_window_attention
from fxforge.options import parse_options
from tests.passes.helpers import greedy_loop

cached_attention = torch.ops.fxforge.cached_attention
cached_window_attention = torch.ops.fxforge.cached_window_attention


def _generator() -> torch.Generator:
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))


# ---- the option ------------------------------------------------------------------------------

def test_the_option_parses_and_is_lossy():
    assert parse_options(kv_cache=True, kv_cache_dtype="int8").lossy
    assert parse_options(kv_cache=True, kv_cache_dtype=None).kv_cache_dtype == "auto"
    assert not parse_options(kv_cache=True, kv_cache_dtype="auto").lossy


@pytest.mark.parametrize("value, message", [("fp8", "must be one of ('auto', 'int8')"),
                                            ("INT8", "got 'INT8'"), (8, "got 8"),
                                            (torch.int8, "got torch.int8")])
def test_bad_values_are_clear_errors(value, message):
    with pytest.raises(OptionsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_options(kv_cache=True, kv_cache_dtype=value)


def test_int8_without_a_kv_cache_is_an_error():
    with pytest.raises(OptionsError, match="needs kv_cache=True"):
        parse_options(kv_cache_dtype="int8")


@pytest.mark.parametrize("attention", ["block_sparse:64", "per_head:256"])
def test_int8_with_a_mode_whose_cache_cannot_hold_it_is_an_error(attention):
    with pytest.raises(OptionsError, match="not available with attention mode"):
        parse_options(kv_cache=True, kv_cache_dtype="int8", attention=attention)
    assert parse_options(kv_cache=True, kv_cache_dtype="int8",
                         attention="sliding_window:64").kv_cache_dtype == "int8"


# ---- the ops against the definition ----------------------------------------------------------

def definition(x: torch.Tensor) -> torch.Tensor:
    """The rule, read back in float64: scale = absmax / 127 per row and code = round(x / scale)
    (half to even), both in fp32 as the cache stores and computes them (in float64 a ratio
    near a half can round the other way: one code a step off, a flaky mismatch)."""
    x = x.float()
    scale = x.abs().amax(-1, keepdim=True) / 127
    codes = torch.where(scale > 0, (x / scale).round().clamp(-127, 127), 0)
    return codes.double() * scale.double()


def attend(q, keys, values, visible_keys, scale=None):
    """float64 softmax attention of each query row over its visible key rows (GQA by groups)."""
    q = q.double()
    groups = q.shape[1] // keys.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = torch.zeros(*q.shape[:-1], values.shape[-1], dtype=torch.float64)
    for r, seen in enumerate(visible_keys):
        for h in range(q.shape[1]):
            scores = (keys[:, h // groups, seen] @ q[:, h, r, :, None]).squeeze(-1) * scale
            out[:, h, r] = (scores.softmax(-1)[..., None] * values[:, h // groups, seen]).sum(1)
    return out


def _int8_caches(batch, kv_heads, capacity, dim):
    return (torch.zeros(batch, kv_heads, capacity, dim, dtype=torch.int8),
            torch.zeros(batch, kv_heads, capacity, dim, dtype=torch.int8),
            torch.zeros(batch, kv_heads, capacity, 1), torch.zeros(batch, kv_heads, capacity, 1))


def _run(op, window, q, k, v, caches, position, scale=None):
    kc, vc, ks, vs = caches
    if window is None:
        return op(q, k, v, kc, vc, position, scale, ks, vs)
    return op(q, k, v, kc, vc, position, *window, scale, ks, vs)


OPS = {"reference": (cached_attention, cached_window_attention),
       "cpu": (cpu_cached_attention, cpu_cached_window_attention)}


@pytest.mark.parametrize("impl", sorted(OPS))
@pytest.mark.parametrize("window", [None, (5, 2)], ids=["plain", "window5+2"])
def test_the_ops_match_the_definition_over_many_steps(impl, window):
    """Chunks then single steps (for the window: past 8 wrap-arounds of the ring). Every output
    against float64 attention over the definition's round trip of every key and value; the
    caches hold the definition's codes and scales."""
    gen = _generator()
    batch, heads, kv_heads, dim, total = 2, 6, 2, 24, 48
    q = torch.randn(batch, heads, total, dim, generator=gen)
    k, v = (torch.randn(batch, kv_heads, total, dim, generator=gen) * 3 for _ in range(2))
    k[:, :, 7] = v[:, :, 7] = 0                          # all-zero rows: scale 0, codes 0
    caches = _int8_caches(batch, kv_heads, total if window is None else sum(window), dim)
    want_k, want_v = definition(k), definition(v)
    op = OPS[impl][window is not None]
    spans = [(0, 5), (5, 6), (6, 9)] + [(i, i + 1) for i in range(9, total)]
    position = torch.zeros(1, dtype=torch.int64)
    for start, end in spans:
        position.fill_(start)
        got = _run(op, window, q[:, :, start:end], k[:, :, start:end], v[:, :, start:end],
                   caches, position)
        seen = [[j for j in range(i + 1) if window is None or j < window[1] or i - j < window[0]]
                for i in range(start, end)]
        want = attend(q[:, :, start:end], want_k, want_v, seen)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        for i in range(start, end):   # what the cache holds for each new position
            slot = i if window is None else slot_of(i, *window)
            for codes, scales, x in ((caches[0], caches[2], k), (caches[1], caches[3], v)):
                torch.testing.assert_close((codes[:, :, slot].double() * scales[:, :, slot]),
                                           definition(x[:, :, i]), rtol=1e-6, atol=1e-6)
                assert i != 7 or (scales[:, :, slot].eq(0).all() and codes[:, :, slot].eq(0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_kernel_writes_what_the_reference_writes(dtype):
    """Same inputs, same caches, bit for bit (the C++ quantization is the reference's rule), and
    outputs within the dtype's rounding."""
    gen = _generator()
    batch, heads, kv_heads, dim = 3, 4, 1, 72   # 72: the AVX2 loops' 32- and 8-wide tails
    ref, got = _int8_caches(batch, kv_heads, 20, dim), _int8_caches(batch, kv_heads, 20, dim)
    position = torch.zeros(1, dtype=torch.int64)
    for start, end in [(0, 3)] + [(i, i + 1) for i in range(3, 20)]:
        q = torch.randn(batch, heads, end - start, dim, generator=gen).to(dtype)
        k, v = (torch.randn(batch, kv_heads, end - start, dim, generator=gen).to(dtype) for _ in "kv")
        position.fill_(start)
        want = _run(cached_attention, None, q, k, v, ref, position, 0.3)
        out = _run(cpu_cached_attention, None, q, k, v, got, position, 0.3)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out, want, rtol=tol, atol=tol)
    for a, b in zip(ref, got):
        assert torch.equal(a, b)


def test_the_avx2_and_portable_builds_agree(monkeypatch):
    from fxforge.kernels import cpu_isa
    if not (cpu_isa.hardware().avx2 and cpu_isa.hardware().fma):
        pytest.skip("no AVX2 on this CPU")
    assert decode_attention_cpu.built_q8_isa("avx2") == 2
    assert decode_attention_cpu.built_q8_isa("portable") == 0
    monkeypatch.setenv(cpu_isa.ISA_ENV, "none")
    assert decode_attention_cpu.q8_isa() == "portable"   # FXFORGE_CPU_ISA forces the lower path
    gen = _generator()
    q = torch.randn(2, 6, 1, 64, generator=gen)
    k, v = (torch.randn(2, 2, 1, 64, generator=gen) for _ in "kv")
    filled = _int8_caches(2, 2, 40, 64)
    for t in filled[:2]:
        t.random_(-127, 128, generator=gen)
    for t in filled[2:]:
        t.uniform_(0.001, 0.05, generator=gen)
    outputs, caches = [], []
    for isa in ("portable", "avx2"):
        monkeypatch.setattr(decode_attention_cpu, "q8_isa", lambda isa=isa: isa)
        decode_attention_cpu.entry.cache_clear()
        cache = [t.clone() for t in filled]
        out = CpuDecodeAttention()(q, k, v, cache[0], cache[1], torch.tensor([33]),
                                   k_scale=cache[2], v_scale=cache[3])
        outputs.append(out)
        caches.append(cache)
    decode_attention_cpu.entry.cache_clear()
    # the two builds sum in different orders: agreement to fp32 rounding of the terms (values
    # up to 127 x 0.05), not of an output that cancels to near 0
    value_scale = float((filled[1].abs().amax(-1, keepdim=True) * filled[3]).max())
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-6 * value_scale)
    assert all(torch.equal(a, b) for a, b in zip(*caches))


# ---- whole models ----------------------------------------------------------------------------

def _compiled(model, **options):
    torch._dynamo.reset()
    return torch.compile(model, backend="fxforge", options={"kv_cache": True, "backend": "cpu",
                                                            **options})


def _decoder(graphs):
    (decoder,) = [g.kv for g in graphs if g.kv is not None]
    return decoder


# Fitted on these models: int8 keys/values move logits by ~0.3-1% of their largest magnitude
# (measured up to 0.8%); 3% leaves margin and still fails a cache read from the wrong slot.
LOGIT_TOL = 0.03


def _close_logits(got, want):
    err = (got - want).abs().max().item()
    assert err <= LOGIT_TOL * want.abs().max().item(), err
    return err


def _near_tie(eager_logits: torch.Tensor, chosen: int, best: int) -> bool:
    """Whether eager's logit for ``chosen`` is within the int8 logit tolerance of ``best``'s:
    the only flips of a greedy token an int8 cache may cause."""
    margin = (eager_logits[best] - eager_logits[chosen]).item()
    return margin <= 2 * LOGIT_TOL * eager_logits.abs().max().item()


@pytest.mark.parametrize("arch", ["gpt", "llama_gqa"])
def test_generate_int8_close_to_fp32_and_a_quarter_of_the_bytes(arch):
    """fxforge.generate's greedy tokens from an int8 cache against an fp32 one (they may part
    only at a near-tie), each step's logits against eager, and the cache's bytes from the
    allocated buffers."""
    model = make_model(n_layer=2).eval() if arch == "gpt" else _llama()
    vocab = 512 if arch == "gpt" else 1000
    prompt = torch.randint(0, vocab, (2, 6), generator=_generator())
    runs = {}
    for dtype in ("auto", "int8"):
        with torch.no_grad(), recording() as graphs:
            compiled = _compiled(model, kv_cache_dtype=dtype, max_seq_len=64)
            tokens = fxforge.generate(compiled, prompt, 24)
            ids, logits = greedy_loop(compiled, prompt, 12)   # the steps' logits, same cache path
        decoder = _decoder(graphs)
        assert decoder.stats["steps"] >= 20 and decoder.stats["uncached"] == 0
        runs[dtype] = tokens, ids, logits, decoder.states()[0]
    errors = []
    with torch.no_grad():
        fp32_tokens, int8_tokens = runs["auto"][0], runs["int8"][0]
        for row in range(prompt.shape[0]):
            differ = (fp32_tokens[row] != int8_tokens[row]).nonzero()
            if len(differ):
                at = int(differ[0])
                eager = model(fp32_tokens[row:row + 1, :at])[0, -1]
                assert _near_tie(eager, int(int8_tokens[row, at]), int(fp32_tokens[row, at]))
        for dtype in ("auto", "int8"):
            _, ids, logits, _ = runs[dtype]
            eager = model(ids)
            errors.append(max(_close_logits(g, eager[:, :g.shape[1]]) for g in logits))
            for g in logits:   # teacher-forced: eager's next token unless a near-tie
                for row in range(ids.shape[0]):
                    want = eager[row, g.shape[1] - 1]
                    assert _near_tie(want, int(g[row, -1].argmax()), int(want.argmax()))
    assert errors[1] > 10 * errors[0]   # the int8 cache was read (its rounding shows)
    fp32_state, int8_state = runs["auto"][3], runs["int8"][3]
    codes = [t for t in int8_state.caches if t.dtype == torch.int8]
    scales = [t for t in int8_state.caches if t.dtype == torch.float32]
    assert len(codes) == len(scales) == len(fp32_state.caches)
    assert 4 * sum(t.numel() for t in codes) == fp32_state.cache_bytes
    assert all(t.shape[-1] == 1 for t in scales)
    assert int8_state.cache_bytes == fp32_state.cache_bytes // 4 + sum(4 * t.numel() for t in scales)


def _llama():
    transformers = pytest.importorskip("transformers")
    from fxforge.examples.hf_models import LogitsOnly
    config = transformers.LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, use_cache=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return LogitsOnly(transformers.LlamaForCausalLM(config).eval())


def test_a_bf16_model_caches_half_the_bytes():
    model = make_model(n_layer=1).eval().to(torch.bfloat16)
    prompt = torch.randint(0, 512, (1, 5), generator=_generator())
    states = {}
    for dtype in ("auto", "int8"):
        with torch.no_grad(), recording() as graphs:
            fxforge.generate(_compiled(model, kv_cache_dtype=dtype, max_seq_len=32), prompt, 4)
        states[dtype] = _decoder(graphs).states()[0]
    bf16 = states["auto"].cache_bytes
    assert {t.dtype for t in states["auto"].caches} == {torch.bfloat16}
    codes = sum(t.numel() for t in states["int8"].caches if t.dtype == torch.int8)
    assert 2 * codes == bf16 and states["int8"].cache_bytes == bf16 // 2 + 4 * codes // 32


def test_a_sliding_window_on_an_int8_ring_runs_past_max_seq_len():
    from tests.passes.test_attention_window import _windowed_eager
    model = make_model(n_layer=2).eval()
    prompt = torch.randint(0, 512, (2, 6), generator=_generator())
    with torch.no_grad(), recording() as graphs:
        compiled = _compiled(model, kv_cache_dtype="int8", max_seq_len=16,
                             attention="sliding_window:5,sinks:2")
        ids, logits = greedy_loop(compiled, prompt, 34)   # 40 positions: the ring wraps 7 times
        eager = _windowed_eager(model, 5, 2)(ids)
    for g in logits:
        _close_logits(g, eager[:, :g.shape[1]])
    decoder = _decoder(graphs)
    assert decoder.stats["uncached"] == 0 and decoder.stats["replayed"] > 20
    (state,) = decoder.states()
    assert {(tuple(t.shape), t.dtype) for t in state.caches} == \
        {((2, 4, 7, 32), torch.int8), ((2, 4, 7, 1), torch.float32)}


def test_an_artifact_keeps_the_int8_caches(tmp_path):
    model = make_model(n_layer=1).eval()
    ids = torch.randint(0, 512, (1, 8), generator=_generator())
    seq = torch.export.Dim("seq", min=2, max=64)
    fxforge.aot_compile(model, (ids,), tmp_path / "q8", dynamic_shapes=({1: seq},), backend="cpu",
                        kv_cache=True, kv_cache_dtype="int8", max_seq_len=32)
    loaded = fxforge.load(tmp_path / "q8")
    specs = loaded.kv.plan.caches
    assert [(s.dtype, s.head_dim, s.scales_for) for s in specs] == [
        (torch.int8, 32, None), (torch.int8, 32, None),
        (torch.float32, 1, "kv_cache_k0"), (torch.float32, 1, "kv_cache_v0")]
    with torch.no_grad(), recording() as graphs:
        want = fxforge.generate(_compiled(model, kv_cache_dtype="int8", max_seq_len=32), ids, 12)
    assert _decoder(graphs).stats["steps"] > 0
    assert torch.equal(fxforge.generate(loaded, ids, 12), want)
    assert loaded.kv.stats["uncached"] == 0 and loaded.kv.stats["steps"] > 0
    manifest_path = tmp_path / "q8" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["kv_cache"]["scales_for"][2] = "kv_cache_k9"   # names no cache input
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="scales_for"):
        fxforge.load(tmp_path / "q8")
