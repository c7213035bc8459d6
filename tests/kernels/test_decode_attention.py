"""``fxforge::cached_attention`` kernels against the op's reference: the CPU path (C++ decode
kernel, SDPA fallback) and the Triton split-K kernel (under ``TRITON_INTERPRET=1`` on the CPU),
outputs and cache contents, and their lowering by the cpu and triton backends."""
import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

import fxforge.irgraph  # noqa: F401  (registers torch.ops.fxforge.*)
from fxforge.irgraph import set_meta
from fxforge.kernels import decode_attention_cpu
from fxforge.kernels.decode_attention_cpu import (TILED_MIN_ROWS, cpu_cached_attention,
                                                  cpu_decode_path, sdpa_cached_attention)
from fxforge.kernels.matmul import interpreting
from fxforge.kernels.toolchain import KernelBuildError, find_compiler

reference = torch.ops.fxforge.cached_attention.default
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}
needs_interpreter = pytest.mark.skipif(not interpreting(), reason="CPU runs need TRITON_INTERPRET=1")


def _has_compiler() -> bool:
    try:
        find_compiler()
        return True
    except KernelBuildError:
        return False


def _inputs(B=1, H=4, Hkv=2, L=0, t=1, D=32, Dv=None, capacity=48, dtype=torch.float32,
            projected=False):
    """Random q/k/v and caches full of random values (never zeros), cache_pos = L. With
    ``projected``, q/k/v are [B, t, H, D] projections viewed as [B, H, t, D], as models make them."""
    Dv = D if Dv is None else Dv
    def make(heads, dim):
        if projected:
            return torch.randn(B, t, heads, dim).to(dtype).transpose(1, 2)
        return torch.randn(B, heads, t, dim).to(dtype)
    q, k, v = make(H, D), make(Hkv, D), make(Hkv, Dv)
    k_cache = torch.randn(B, Hkv, capacity, D).to(dtype)
    v_cache = torch.randn(B, Hkv, capacity, Dv).to(dtype)
    return q, k, v, k_cache, v_cache, torch.tensor([L])


def _check(kernel, inputs, scale=None, **kwargs):
    """``kernel`` and the reference on copies of the same caches: outputs and caches agree."""
    q, k, v, k_cache, v_cache, pos = inputs
    want_k, want_v = k_cache.clone(), v_cache.clone()
    expected = reference(q, k, v, want_k, want_v, pos, scale)
    got = kernel(q, k, v, k_cache, v_cache, pos, scale, **kwargs)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    tol = TOL[q.dtype]
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v), "cache contents differ"
    return got


# ------------------------------------------------------------------------------- CPU path
CPU_CASES = {"prefill L=0 t=7": (0, 7), "decode L=1": (1, 1), "decode L=31": (31, 1),
             "decode L=200": (200, 1), "chunk t=4 at L=10": (10, 4)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("heads", [(4, 2), (4, 4)], ids=["gqa", "mha"])
@pytest.mark.parametrize("case", list(CPU_CASES))
def test_cpu_path_matches_reference(case, heads, dtype):
    L, t = CPU_CASES[case]
    inputs = _inputs(B=1, H=heads[0], Hkv=heads[1], L=L, t=t, D=64, capacity=256, dtype=dtype,
                     projected=True)
    if _has_compiler():
        assert cpu_decode_path(*inputs) == "C++ decode kernel"
    _check(cpu_cached_attention, inputs)
    fresh = _inputs(B=1, H=heads[0], Hkv=heads[1], L=L, t=t, D=64, capacity=256, dtype=dtype)
    _check(sdpa_cached_attention, fresh)


@pytest.mark.skipif(not _has_compiler(), reason="no C++ compiler")
@pytest.mark.parametrize("L,heads", [(0, (4, 2)), (37, (4, 2)), (5, (3, 3))], ids=["empty-gqa", "L37-gqa", "L5-mha"])
def test_many_new_positions_take_the_tiled_prefill_kernel(L, heads, monkeypatch):
    """A prompt through the cache: the tiled kernel with the causal diagonal shifted by L."""
    from fxforge.kernels import attention_cpp
    t = TILED_MIN_ROWS + 3
    inputs = _inputs(B=2, H=heads[0], Hkv=heads[1], L=L, t=t, D=32, capacity=L + t + 5,
                     projected=True)
    assert cpu_decode_path(*inputs) == "tiled C++ prefill attention over the cache"
    calls = []
    real = attention_cpp.tiled_attention
    monkeypatch.setattr(decode_attention_cpu, "tiled_attention",
                        lambda *a, **kw: calls.append(kw["causal_offset"]) or real(*a, **kw))
    _check(cpu_cached_attention, inputs, scale=0.2 if L == 5 else None)
    assert calls == [L]


@pytest.mark.skipif(not _has_compiler(), reason="no C++ compiler")
def test_a_prefill_past_the_tiled_kernels_key_limit_takes_the_decode_kernel(monkeypatch):
    from fxforge.kernels import attention_cpp
    monkeypatch.setattr(attention_cpp, "MAX_KEYS", TILED_MIN_ROWS + 10)
    inputs = _inputs(L=20, t=TILED_MIN_ROWS, D=16, capacity=TILED_MIN_ROWS + 40)
    monkeypatch.setattr(decode_attention_cpu, "tiled_attention", None)   # must not be called
    _check(cpu_cached_attention, inputs)


@pytest.mark.parametrize("kernel", [cpu_cached_attention, sdpa_cached_attention], ids=["cpu", "sdpa"])
def test_cpu_batch_scale_head_dims_and_odd_sizes(kernel):
    _check(kernel, _inputs(B=2, H=6, Hkv=2, L=19, t=3, D=40, Dv=24, capacity=30), scale=0.3)
    _check(kernel, _inputs(B=3, H=3, Hkv=1, L=70, t=1, D=128, capacity=80, dtype=torch.float16))


def test_cpu_path_falls_back_for_a_cache_of_another_dtype():
    q, k, v, k_cache, v_cache, pos = _inputs(L=9, t=2)
    inputs = (q, k, v, k_cache.bfloat16(), v_cache.bfloat16(), pos)
    assert cpu_decode_path(*inputs).startswith("SDPA on the cache views")
    _check(cpu_cached_attention, inputs)


@pytest.mark.parametrize("kernel", [cpu_cached_attention, sdpa_cached_attention], ids=["cpu", "sdpa"])
def test_cpu_overflow_names_the_cache_size(kernel):
    q, k, v, k_cache, v_cache, _ = _inputs(L=0, t=3, capacity=32)
    before = k_cache.clone()
    with pytest.raises(ValueError, match=r"30 cached \+ 3 new positions exceed its 32 positions"):
        kernel(q, k, v, k_cache, v_cache, torch.tensor([30]))
    assert torch.equal(k_cache, before), "a failed call wrote into the cache"
    kernel(q, k, v, k_cache, v_cache, torch.tensor([29]))  # exactly full is fine


def _decode_loop(kernel, B, H, Hkv, D, prompt, steps, capacity, dtype=torch.float32):
    """A prefill of ``prompt`` positions, then ``steps`` single-position steps, from an empty
    cache: the outputs equal one causal SDPA over the whole sequence."""
    total = prompt + steps
    q, k, v = (torch.randn(B, heads, total, D).to(dtype) for heads in (H, Hkv, Hkv))
    k_cache = torch.randn(B, Hkv, capacity, D).to(dtype)  # garbage past the length: never read
    v_cache = torch.randn(B, Hkv, capacity, D).to(dtype)
    outs, length = [], 0
    for new in [prompt] + [1] * steps:
        span = slice(length, length + new)
        outs.append(kernel(q[:, :, span], k[:, :, span], v[:, :, span], k_cache, v_cache,
                           torch.tensor([length])))
        length += new
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=H != Hkv)
    tol = TOL[dtype]
    torch.testing.assert_close(torch.cat(outs, dim=2), expected, rtol=tol, atol=tol)
    torch.testing.assert_close(k_cache[:, :, :total], k, rtol=0, atol=0)
    torch.testing.assert_close(v_cache[:, :, :total], v, rtol=0, atol=0)


def test_cpu_decode_steps_equal_one_causal_attention():
    _decode_loop(cpu_cached_attention, B=1, H=9, Hkv=3, D=64, prompt=6, steps=40, capacity=64)
    _decode_loop(cpu_cached_attention, B=2, H=4, Hkv=4, D=32, prompt=1, steps=12, capacity=16)


# ---------------------------------------------------------------------------- Triton kernel
# A reduced space: one split and several, BLOCK_N below, at and above the key counts.
def _reduced_space():
    from fxforge.kernels.decode_attention import _config
    return [_config(16, 1, 2, 2), _config(16, 4, 4, 2), _config(32, 2, 4, 3), _config(64, 8, 8, 2)]


TRITON_SHAPES = [  # (B, Hkv, D); H = 4
    (1, 2, 16), (2, 4, 32), (1, 4, 16), (2, 2, 32), (1, 2, 32), (2, 4, 16)]


@needs_interpreter
@pytest.mark.parametrize("config", _reduced_space(), ids=lambda c: c.describe())
def test_triton_every_config_of_a_reduced_space(config):
    from fxforge.kernels.decode_attention import triton_cached_attention
    cases = [(L, t) for L in (0, 5, 37) for t in (1, 3)]
    for (L, t), (B, Hkv, D) in zip(cases, TRITON_SHAPES):  # every length once, shapes rotated
        _check(triton_cached_attention, _inputs(B=B, H=4, Hkv=Hkv, L=L, t=t, D=D, capacity=40),
               config=config)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_triton_low_precision(dtype):
    from fxforge.kernels.decode_attention import _config, triton_cached_attention
    _check(triton_cached_attention, _inputs(B=1, H=4, Hkv=2, L=21, t=2, D=32, dtype=dtype),
           config=_config(16, 2, 4, 2))


@needs_interpreter
def test_triton_head_dims_strides_scale_and_many_rows():
    """D=128 with Dv=64, [B, t, H, D] views, an explicit scale; then a prefill chunk of 40
    positions (80 rows of a GQA group: two row blocks, each stopping at its own diagonal)."""
    from fxforge.kernels.decode_attention import triton_cached_attention
    _check(triton_cached_attention, _inputs(B=1, H=4, Hkv=4, L=9, t=1, D=128, Dv=64, capacity=16,
                                            projected=True), scale=0.2)
    _check(triton_cached_attention, _inputs(B=1, H=4, Hkv=2, L=5, t=40, D=16, capacity=48))


@needs_interpreter
def test_triton_decode_steps_equal_one_causal_attention():
    from fxforge.kernels.decode_attention import triton_cached_attention
    _decode_loop(triton_cached_attention, B=1, H=4, Hkv=2, D=16, prompt=3, steps=5, capacity=12)


@needs_interpreter
def test_triton_overflow_names_the_cache_size():
    from fxforge.kernels.decode_attention import triton_cached_attention
    q, k, v, k_cache, v_cache, _ = _inputs(L=0, t=3, capacity=32)
    before = k_cache.clone()
    with pytest.raises(ValueError, match="exceed its 32 positions"):
        triton_cached_attention(q, k, v, k_cache, v_cache, torch.tensor([30]))
    assert torch.equal(k_cache, before)


def test_triton_bad_inputs_raise_clear_errors():
    from fxforge.kernels.decode_attention import triton_cached_attention
    q, k, v, k_cache, v_cache, pos = _inputs(H=4, Hkv=2, t=2, D=16)
    cases = [
        ((q[0], k, v, k_cache, v_cache, pos), "4-D"),
        ((q[:, :3], k, v, k_cache, v_cache, pos), "GQA groups"),
        ((q, k, v, k_cache, v_cache, torch.tensor([1, 2])), "one integer"),
        ((q, k, v[:, :, :1], k_cache, v_cache, pos), "disagree"),
        ((q, k, v, k_cache.half(), v_cache, pos), "must share one of"),
        ((q, k, v, k_cache.to("meta"), v_cache, pos), "different devices"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            triton_cached_attention(*args)
    big = _inputs(D=320)
    with pytest.raises(ValueError, match="at most 256"):
        triton_cached_attention(*big)


# ------------------------------------------------------------------- tuning space (no kernel)
def test_prune_rules():
    from fxforge.kernels.decode_attention import _config, prune
    long = {"H": 32, "Hkv": 8, "T": 1, "Lk": 4096, "D": 128, "dtype": torch.bfloat16}
    assert prune(_config(64, 16, 4, 2), long) is None
    assert "shared memory" in prune(_config(128, 16, 4, 3), {**long, "dtype": torch.float32,
                                                              "smem_limit": 101376})
    assert "registers" in prune(_config(128, 16, 4, 2), {**long, "T": 16})  # 64 rows a block
    assert prune(_config(128, 16, 8, 2), {**long, "T": 16}) is None         # twice the threads
    assert "BLOCK_N=128 larger than Lk=40" in prune(_config(128, 1, 4, 2), {**long, "Lk": 40})
    assert "only 1 of SPLITS=4 get keys" in prune(_config(64, 4, 4, 2), {**long, "Lk": 60})


@pytest.mark.parametrize("Lk", [1, 37, 512, 4096, 32768])
@pytest.mark.parametrize("shape", [(1, 9, 3, 1, 64), (8, 32, 8, 1, 128), (1, 4, 4, 300, 256)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_some_config_survives_every_problem(Lk, shape, dtype):
    from fxforge.kernels.decode_attention import TUNING_SPACE, choose_config
    B, H, Hkv, T, D = shape
    problem = {"B": B, "H": H, "Hkv": Hkv, "T": T, "Lk": max(Lk, T), "D": D, "dtype": dtype}
    survivors, _ = TUNING_SPACE.survivors(problem)
    assert survivors and choose_config(problem) in survivors


def test_default_splits_fill_the_gpu_for_long_caches():
    from fxforge.kernels.decode_attention import choose_config
    problem = {"B": 1, "H": 32, "Hkv": 8, "T": 1, "Lk": 4096, "D": 128, "dtype": torch.bfloat16}
    assert choose_config(problem)["SPLITS"] == 32    # 8 kv heads x 32 splits >= 132 SMs
    assert choose_config({**problem, "Lk": 60})["SPLITS"] == 1    # one key block: one split
    assert choose_config({**problem, "Lk": 200})["SPLITS"] == 4   # four blocks, one a split
    assert choose_config({**problem, "B": 32})["SPLITS"] == 1     # 256 programs already


# ------------------------------------------------------------------------------- lowering
def _op_graph(inputs, scale=None) -> fx.GraphModule:
    """placeholders q, k, v, k_cache, v_cache, cache_pos -> fxforge::cached_attention -> output,
    with the example values as metadata (as the IR carries them)."""
    graph = fx.Graph()
    names = ("q", "k", "v", "k_cache", "v_cache", "cache_pos")
    nodes = [graph.placeholder(name) for name in names]
    for node, value in zip(nodes, inputs):
        set_meta(node, value)
    call = graph.call_function(reference, tuple(nodes), {"scale": scale} if scale else {})
    set_meta(call, reference(*[t.clone() for t in inputs], scale))
    graph.output(call)
    return fx.GraphModule(torch.nn.Module(), graph)


def _lower_and_check(table, inputs, path, scale=None):
    from fxforge.backends.kernel_lowering import lower_to_kernels
    lowered, choices = lower_to_kernels(_op_graph(inputs, scale), table)
    assert [c.path for c in choices] == [path]
    _check(lambda *args: lowered(*args[:6]), inputs, scale=scale)
    return choices[0]


def test_cpu_backend_lowers_the_op_to_the_cpu_kernel():
    from fxforge.backends.cpu import make_table
    choice = _lower_and_check(make_table(), _inputs(H=6, Hkv=2, L=7, t=1, D=64, projected=True),
                              "CPU cached attention (decode)", scale=0.25)
    assert choice.reason == ("C++ decode kernel" if _has_compiler() else choice.reason)
    _lower_and_check(make_table(), _inputs(H=4, Hkv=4, L=3, t=5), "CPU cached attention (decode)")


@needs_interpreter
def test_triton_backend_lowers_the_op_to_the_split_k_kernel():
    from fxforge.backends.triton import make_table
    _lower_and_check(make_table(), _inputs(B=2, H=4, Hkv=2, L=11, t=2, D=16),
                     "Triton split-K decode attention")


def test_a_graph_that_writes_its_kv_cache_is_never_replayed_as_a_cuda_graph():
    """CUDAGraphRunner copies inputs into private buffers: cache writes would be lost there."""
    import torch.fx as fx
    from fxforge.backends.triton import _static_cuda
    from fxforge.irgraph.meta import META_KEY, TensorMeta

    def graph(with_cache_write: bool) -> fx.GraphModule:
        g = fx.Graph()
        names = ("q", "k", "v", "k_cache", "v_cache", "cache_pos")
        nodes = [g.placeholder(n) for n in names]
        for node in nodes:
            node.meta[META_KEY] = TensorMeta((1, 2, 4, 8), (64, 32, 8, 1), torch.float32,
                                             torch.device("cuda"))
        if with_cache_write:
            out = g.call_function(torch.ops.fxforge.cached_attention.default, tuple(nodes))
        else:
            out = g.call_function(torch.ops.aten.add.Tensor, (nodes[0], nodes[1]))
        g.output(out)
        return fx.GraphModule(torch.nn.Module(), g)
    assert _static_cuda(graph(False))
    assert not _static_cuda(graph(True))
