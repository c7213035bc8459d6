"""The lossless ``exact_bf16_weights`` pass (passes/precision.py): fp32 linear weights whose values
are all bf16 values get weight_format "bf16" at compile time, on backends that store bf16; the
kernels read the format from the op. Also: a backend without a format falls back, logged."""
import logging

import pytest
import torch

import fxforge
from fxforge.backends import get_backend, lower
from fxforge.irgraph import capture_export
from fxforge.irgraph.views import Linear
from fxforge.kernels import gemv_cpu
from fxforge.passes import PassManager, default_pipeline
from fxforge.testing import assert_close_to_eager

needs_cpp = pytest.mark.skipif(gemv_cpu.gemv_unavailable() is not None,
                               reason="no C++ compiler for the CPU linear kernels")


class _Block(torch.nn.Module):
    def __init__(self, width=32):
        super().__init__()
        self.up, self.down = torch.nn.Linear(width, 2 * width), torch.nn.Linear(2 * width, width)
        self.norm = torch.nn.LayerNorm(width)

    def forward(self, x):
        return self.norm(self.down(torch.nn.functional.silu(self.up(x))) + x)


def _bf16_valued_model(seed, off_grid=False):
    """A model whose linear weights hold bf16 values (a checkpoint upcast from bf16); with
    ``off_grid`` one value of ``down``'s weight is moved off the bf16 grid."""
    torch.manual_seed(seed)
    model = _Block().eval()
    with torch.no_grad():
        for lin in (model.up, model.down):
            lin.weight.copy_(lin.weight.to(torch.bfloat16).float())
        if off_grid:
            model.down.weight[3, 5] += 2 ** -20 * model.down.weight[3, 5].abs()
    return model


def _formats(ir):
    return {lin.weight.name: lin.weight_format
            for lin in map(Linear.of, ir.call_nodes()) if lin is not None}


def _optimize(model, x, formats):
    ir = capture_export(model, (x,))
    out = PassManager(default_pipeline({}, formats), verify_between=True, strict=True).run(ir)
    stats = next(s.counts for s in out.info["passes"] if s.name == "exact_bf16_weights")
    return out, stats


def test_the_pipeline_marks_only_for_backends_that_store_bf16():
    plain, with_bf16 = default_pipeline({}), default_pipeline({}, ("dense", "bf16"))
    assert "exact_bf16_weights" not in plain
    assert with_bf16.index("exact_bf16_weights") == with_bf16.index("constant_fold", 7) + 1
    assert [p for p in with_bf16 if p != "exact_bf16_weights"] == plain
    assert get_backend("reference").weight_formats == {"dense"}


@pytest.mark.parametrize("seed", [0, 1])
def test_bf16_valued_weights_get_the_format_and_the_graph_equals_eager_bit_for_bit(seed):
    model = _bf16_valued_model(seed)
    x = torch.randn(2, 5, 32)
    ir, stats = _optimize(model, x, ("dense", "bf16"))
    assert stats == {"weights_bf16": 2, "dense": 0, "not_constant": 0}
    assert sorted(_formats(ir).values()) == ["bf16", "bf16"]
    with torch.no_grad():
        got, = ir.gm(x)                       # the op's reference decodes: the same values
        assert torch.equal(got, model(x))


def test_one_value_off_the_grid_keeps_that_weight_dense():
    model = _bf16_valued_model(2, off_grid=True)
    x = torch.randn(2, 5, 32)
    ir, stats = _optimize(model, x, ("dense", "bf16"))
    assert stats == {"weights_bf16": 1, "dense": 1, "not_constant": 0}
    with torch.no_grad():
        got, = ir.gm(x)
        assert torch.equal(got, model(x))


def test_random_fp32_weights_stay_dense():
    torch.manual_seed(3)
    ir, stats = _optimize(_Block().eval(), torch.randn(1, 3, 32), ("dense", "bf16"))
    assert stats["weights_bf16"] == 0 and set(_formats(ir).values()) == {"dense"}


@needs_cpp
def test_the_cpu_backend_stores_them_in_bf16_and_explain_says_why():
    model = _bf16_valued_model(4)
    x = torch.randn(1, 1, 32)                 # one row: the GEMV
    report = fxforge.explain(model, (x,), backend="cpu", count_eager=False)
    assert "exact_bf16_weights" in report.text and "weights_bf16=2" in report.text
    torch._dynamo.reset()
    compiled = fxforge.compile(model, (x,), backend="cpu")
    for rows in (1, 3):
        x = torch.randn(1, rows, 32)
        with torch.no_grad():
            assert_close_to_eager(compiled(x), model(x))
    paths = [c.path for g in report.graphs for c in g.choices if "GEMV" in c.path or "GEMM" in c.path]
    assert len(paths) == 2 and all("bf16" in p for p in paths), paths


def test_a_kernel_without_the_format_falls_back_to_the_reference_logged(caplog):
    """The Triton matmul stores dense weights only: a bf16 linear stays on the op's reference,
    with a WARNING naming the format (under TRITON_INTERPRET the Triton backend runs on CPU)."""
    pytest.importorskip("triton")
    if get_backend("triton").unavailable() is not None:
        pytest.skip("Triton cannot run here")
    model = _bf16_valued_model(5)
    x = torch.randn(4, 32)
    ir = capture_export(model, (x,))
    ir = PassManager(["fuse_epilogues"], verify_between=True, strict=True).run(ir)
    first = next(lin for lin in map(Linear.of, ir.call_nodes()) if lin is not None)
    first.replace(weight_format="bf16")
    with caplog.at_level(logging.WARNING, logger="fxforge"):
        lowered = lower(ir, get_backend("triton"))
    fallback = [c for c in lowered.choices if c.node == first.node.name]
    assert fallback and fallback[0].path == "ATen (fallback)"
    assert "weight format 'bf16'" in fallback[0].reason and "weight format 'bf16'" in caplog.text
    with torch.no_grad():
        got, = lowered.gm(x)
        assert_close_to_eager(got, model(x))
