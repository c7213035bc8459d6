"""The cpu and triton backends end to end: fused kernels, prepacked linears and flash attention
match eager; a broken kernel build falls back with its reason; precision follows the hardware."""
import logging
import os
from collections import Counter

import pytest
import torch

import fxforge
from fxforge.compiler import recording
from fxforge.irgraph.views import Linear
from fxforge.testing import assert_close_to_eager


def _compile(model, inputs, **options):
    with recording() as graphs, torch.no_grad():
        compiled = fxforge.compile(model, inputs, **options)
        got = compiled(*inputs)
        want = model(*inputs)
    assert graphs, "fxforge compiled no graph"
    return got, want, graphs


def _paths(graphs) -> Counter:
    return Counter(c.path.split(",")[0].split(" (")[0] for g in graphs for c in g.lowered.choices)


def _small_gpt():
    from fxforge.examples.small_gpt import example_inputs, make_model
    return make_model(n_layer=2).eval(), example_inputs(batch=2, seq=24)


def _hf(arch):
    from fxforge.examples.hf_models import LogitsOnly, build
    return LogitsOnly(build(arch)).eval(), (torch.randint(3, 1000, (2, 17)),)


@pytest.mark.parametrize("make", [_small_gpt, lambda: _hf("gpt2"), lambda: _hf("llama")],
                         ids=["small_gpt", "gpt2", "llama"])
def test_cpu_backend_matches_eager_and_uses_its_kernels(make):
    model, inputs = make()
    got, want, graphs = _compile(model, inputs, backend="cpu")
    assert_close_to_eager(got, want)
    paths = _paths(graphs)
    # Residual adds and activations go into the linears' epilogues; norms and the rest fuse here.
    assert paths["generated C++"] >= 1 and paths["tiled C++ attention"] == 2
    linears = [c for g in graphs for c in g.lowered.choices if c.op.rsplit(".", 2)[-2:-1] in (["linear"], ["addmm"], ["mm"])]
    assert len(linears) >= 6 and all(any(w in c.path for w in ("prepacked", "pre-transposed", "packed in"))
                                     for c in linears)
    assert not [c for g in graphs for c in g.lowered.choices if "fallback" in c.path]
    eager_graph = graphs[0].lowered
    assert eager_graph.kernels is not None and eager_graph.kernels < len(graphs[0].captured.call_nodes())


def test_broken_kernel_builds_fall_back_with_their_reason(monkeypatch, caplog):
    from fxforge.kernels import fused_cpp, linear_cpu_tuning
    from fxforge.kernels.toolchain import KernelBuildError

    def broken_build(gm):
        raise KernelBuildError("g++ exploded (injected)")

    class BrokenLinear:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("oneDNN unavailable (injected)")

    monkeypatch.setattr(fused_cpp, "compile_fused_cpu", broken_build)
    monkeypatch.setattr(linear_cpu_tuning, "PackedLinear", BrokenLinear)
    model, inputs = _small_gpt()
    with caplog.at_level(logging.WARNING, logger="fxforge"):
        got, want, graphs = _compile(model, inputs, backend="cpu")
    assert_close_to_eager(got, want)
    reasons = [c.reason for g in graphs for c in g.lowered.choices if "fallback" in c.path]
    assert any("g++ exploded" in r for r in reasons) and any("oneDNN unavailable" in r for r in reasons)
    assert "g++ exploded" in caplog.text


def test_bf16_without_bf16_units_or_gemv_stays_fp32(monkeypatch, caplog):
    from fxforge.kernels import gemv_cpu, linear_cpu   # (imported first: it binds the name)
    monkeypatch.setenv("FXFORGE_CPU_ISA", "avx2")
    for module in (gemv_cpu, linear_cpu):
        monkeypatch.setattr(module, "gemv_unavailable", lambda: "no compiler (injected)")
    model, inputs = _small_gpt()
    with caplog.at_level(logging.WARNING, logger="fxforge"):
        got, want, graphs = _compile(model, inputs, backend="cpu", precision="bf16")
    assert "runs in fp32" in caplog.text and "AVX512-BF16" in caplog.text
    assert_close_to_eager(got, want)  # fp32 tolerance: nothing was lowered to bf16
    assert graphs[0].ir.info["precision"] == "fp32"


def test_bf16_without_bf16_units_stores_bf16_weights(monkeypatch, caplog):
    """No bf16 math here: the weights are rounded to bf16 values (math stays fp32), so a decode
    step's GEMV can read them as bf16: half the bytes, with no loss beyond the rounding."""
    monkeypatch.setenv("FXFORGE_CPU_ISA", "avx2")
    model, _ = _small_gpt()
    one_token = (torch.randint(0, 64, (1, 1)),)
    with caplog.at_level(logging.WARNING, logger="fxforge"):
        got, want, graphs = _compile(model, one_token, backend="cpu", precision="bf16")
    assert "bf16_weights" in caplog.text and graphs[0].ir.info["precision"] == "bf16_weights"
    stats = [s.counts for s in graphs[0].ir.info["passes"] if s.name == "precision_bf16_weights"]
    assert stats and stats[0]["weights_rounded"] >= 6
    ir = graphs[0].ir
    formats = [lin.weight_format for lin in map(Linear.of, ir.call_nodes()) if lin is not None]
    assert formats.count("bf16") >= 6 and ir.info.get("constants_released")   # the kernels hold them
    paths = [c.path for c in graphs[0].lowered.choices if "GEMV" in c.path]
    # a kernel stores its weight in bf16 because the op's weight format says so
    assert len(paths) >= 6 and all("weights stored in bf16" in p for p in paths)
    error = (got - want).abs().max() / want.abs().max()
    assert 0 < error < 2e-2


def test_one_copy_of_each_weight_after_lowering():
    """The optimized IR keeps its graph for reports but not its folded constants (the q/k/v
    and gate/up concatenations), the lowered module drops the weights its kernels packed, and
    a second compile of the same weights reuses the packs (kernels/shared_packs.py)."""
    from fxforge.kernels.gemm_cpu import TiledLinear
    model, inputs = _hf("llama")
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    got, want, graphs = _compile(model, inputs, backend="cpu")
    assert_close_to_eager(got, want)
    ir, lowered = graphs[0].ir, graphs[0].lowered
    assert ir.info["constants_released"] and all(t.is_meta for t in ir.gm._buffers.values())
    assert ir.info["passes"] and fxforge.explain(model, inputs, backend="cpu").text   # reports work
    kept = [t for t in lowered.gm._buffers.values() if t.untyped_storage().data_ptr() not in params]
    assert not [t for t in kept if t.dim() == 2 and t.numel() >= 64 * 64], "a folded weight is kept"
    kernels = [n.target for n in lowered.gm.graph.nodes if isinstance(getattr(n.target, "impl", None),
                                                                      TiledLinear)]
    assert len(kernels) >= 4
    torch._dynamo.reset()   # a real second compile: equal options would reuse dynamo's graph
    again, _, graphs2 = _compile(model, (torch.randint(3, 1000, (2, 17)),), backend="cpu")
    panels = {id(n.target.impl.panels) for n in graphs2[0].lowered.gm.graph.nodes
              if isinstance(getattr(n.target, "impl", None), TiledLinear)}
    assert {id(k.impl.panels) for k in kernels} == panels


@pytest.mark.parametrize("isa, runs", [("amx", "bf16"), ("avx512_bf16", "bf16_weights")])
def test_bf16_math_runs_with_amx_and_bf16_weights_without(monkeypatch, isa, runs):
    """AMX tiles: the precision pass (bf16 math). AVX512-BF16 alone: bf16-stored weights with
    fp32 math, which decoded faster than bf16 math with casts (backends/cpu.py)."""
    monkeypatch.setenv("FXFORGE_CPU_ISA", isa)  # dispatch as on such a CPU
    model, inputs = _small_gpt()
    got, want, graphs = _compile(model, inputs, backend="cpu", precision="bf16")
    assert graphs[0].ir.info["precision"] == runs
    constants = graphs[0].ir.constants().values()
    if runs == "bf16":
        assert any(t.dtype == torch.bfloat16 for t in constants)
    else:   # the weights stay fp32 in the IR; their format says bf16
        assert {linear.weight_format for n in graphs[0].ir.gm.graph.nodes
                if (linear := Linear.of(n)) is not None} == {"bf16"}
    error = (got - want).abs().max() / want.abs().max()
    assert 0 < error < 2e-2


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="Triton kernels run on the CPU only with TRITON_INTERPRET=1 set at start-up "
                           "(make test sets it)")
def test_triton_backend_under_the_interpreter():
    pytest.importorskip("triton")
    from fxforge.examples.small_gpt import example_inputs, make_model
    model = make_model(n_layer=1, n_embd=32, n_head=2, vocab_size=64).eval()
    inputs = example_inputs(batch=1, seq=8, vocab_size=64)
    got, want, graphs = _compile(model, inputs, backend="triton")
    assert_close_to_eager(got, want)
    paths = _paths(graphs)
    assert paths["generated Triton"] >= 1 and paths["Triton flash attention"] == 1
    assert paths["Triton matmul template"] >= 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_triton_backend_on_the_gpu_matches_eager_with_cuda_graphs():
    from fxforge.backends.triton import CUDAGraphRunner
    from fxforge.examples.small_gpt import example_inputs, make_model
    model = make_model(n_layer=2).eval().cuda()
    inputs = tuple(x.cuda() for x in example_inputs(batch=2, seq=64))
    got, want, graphs = _compile(model, inputs)  # backend="auto" picks Triton for CUDA tensors
    assert_close_to_eager(got, want)
    assert graphs[0].lowered.backend == "triton"
    assert isinstance(graphs[0].lowered.gm, CUDAGraphRunner)
    compiled = fxforge.compile(model, inputs)
    with torch.no_grad():
        for _ in range(4):  # warm-up, capture, replays
            assert_close_to_eager(compiled(*inputs), want)
