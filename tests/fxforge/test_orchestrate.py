"""The compile orchestrator: one path from a graph to what runs (passes, KV step, lowering,
tuning, released constants), taken by ``fxforge.compile``, ``aot_compile`` and ``load`` alike."""
import logging

import pytest
import torch

import fxforge
from fxforge.backends import get_backend, lower, lowered_passes
from fxforge.backends.cpu import CPUBackend
from fxforge.backends.lowered_passes import (LOWERED_PASSES, LOWERED_PASSES_KEY, LoweredPass,
                                             LoweredPassError, run_lowered_passes)
from fxforge.compiler import recording
from fxforge.examples.small_gpt import make_model
from fxforge.irgraph import capture_export, format_ir, verify
from fxforge.options import parse_options
from fxforge.orchestrate import optimize
from fxforge.testing import assert_close_to_eager

aten = torch.ops.aten

SDPA, CACHED = "aten.scaled_dot_product_attention.default", "fxforge.cached_attention.default"


def _kv_graph():
    """The dynamic graph of a tiny GPT compiled with ``kv_cache`` (its step graph lowered)."""
    torch._dynamo.reset()
    model = make_model(seed=2, n_layer=1, n_embd=32, n_head=2).eval()
    compiled = torch.compile(model, backend="fxforge",
                             options={"kv_cache": True, "max_seq_len": 32, "backend": "cpu"})
    with torch.no_grad(), recording() as graphs:
        for length in (5, 6):   # dynamo's second graph has a symbolic length: the KV pass takes it
            compiled(torch.randint(0, 512, (1, length)))
    (graph,) = [g for g in graphs if g.kv is not None]
    return graph


def test_each_lowered_graph_reports_only_its_own_kernel_choices():
    """The graph and its KV step are lowered by one backend; each report lists what that
    lowering chose: the step's has its cached attention and none of the graph's choices."""
    graph = _kv_graph()
    full, step = graph.lowered.choices, graph.kv.step.choices
    assert [c.op for c in full].count(SDPA) == 1 and CACHED not in [c.op for c in full]
    assert [c.op for c in step].count(CACHED) == 1 and SDPA not in [c.op for c in step]
    assert len({c.node for c in step}) == len(step), [c.node for c in step]   # none twice


class _CpuWithoutSin(CPUBackend):
    """The CPU backend, but sin runs eagerly: the graph is lowered in several partitions."""

    name = "test-orchestrate-cpu-nosin"

    def supports(self, node):
        return "sin is not supported here" if node.target is aten.sin.default else super().supports(node)


class _Mlp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(6, 8), torch.nn.Linear(8, 6)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)).sin() * 2).view(3, 2, 6).view(36)


def test_lowering_in_partitions_leaves_the_optimized_ir_as_it_was():
    """``fxforge.explain`` reports ``compiled.ir`` as the optimized IR. It once re-ran the passes
    when that IR held ``call_module`` nodes, as if partitioning had rewritten it in place; but
    lowering partitions a copy, so the IR stays as the passes left it, fit for the report."""
    model, x = _Mlp().eval(), torch.randn(6, 6)
    ir = optimize(capture_export(model, (x,)), parse_options())
    before = format_ir(ir)
    lowered = lower(ir, _CpuWithoutSin())
    assert lowered.partitions == 2 and [f.op for f in lowered.fallbacks] == ["aten.sin.default"]
    assert format_ir(ir) == before and not [n for n in ir.gm.graph.nodes if n.op == "call_module"]
    verify(ir)
    with torch.no_grad():
        assert_close_to_eager([lowered(x)], [model(x)])


def test_post_lowering_rewrites_are_named_counted_passes():
    model, x = _Mlp().eval(), torch.randn(6, 6)
    ir = optimize(capture_export(model, (x,)), parse_options())
    lowered = lower(ir, get_backend("cpu"))
    counts = lowered.gm.meta[LOWERED_PASSES_KEY]
    assert list(counts) == [p.name for p in LOWERED_PASSES]
    # the two views became reshapes, and the outer one now reads the linear's result directly
    assert counts["views_to_reshapes"] == 2 and counts["collapse_reshapes"] == 1
    assert counts["shape_ops_as_methods"] >= 2
    with torch.no_grad():
        assert_close_to_eager([lowered(x)], [model(x)])


def test_a_post_lowering_pass_that_breaks_the_graph_is_named_and_the_graph_runs_eagerly(
        monkeypatch, caplog):
    def swap_output(gm):   # returns the graph's input instead of its result
        output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
        output.args = (next(n for n in gm.graph.nodes if n.op == "placeholder"),)
        return 1
    broken = LoweredPass("swap_output", swap_output)
    monkeypatch.setattr(lowered_passes, "LOWERED_PASSES", lowered_passes.LOWERED_PASSES[:1] + (broken,))
    model, x = _Mlp().eval(), torch.randn(6, 6)
    ir = optimize(capture_export(model, (x,)), parse_options())
    with caplog.at_level(logging.WARNING, logger="fxforge.backends"):
        lowered = lower(ir, get_backend("cpu"))
    assert "post-lowering pass 'swap_output' failed after [views_to_reshapes]" in caplog.text
    assert "runs eagerly" in caplog.text and lowered.choices == []
    with torch.no_grad():
        assert_close_to_eager([lowered(x)], [model(x)])
    with pytest.raises(LoweredPassError, match="output 0"):
        gm = capture_export(model, (x,)).gm
        run_lowered_passes(gm, [broken])


def test_aot_compile_lowers_once_and_returns_what_load_builds(tmp_path, monkeypatch):
    """``aot_compile`` writes the optimized graphs and lowers them once, by loading them (its
    result is that load); the step graph of a ``kv_cache`` artifact is lowered once too."""
    import fxforge.orchestrate as orchestrate
    lowered = []
    real = orchestrate.lower

    def counting(ir, backend):
        lowered.append(ir.info.get("capture"))
        return real(ir, backend)
    monkeypatch.setattr(orchestrate, "lower", counting)
    model = make_model(seed=4, n_layer=1, n_embd=32, n_head=2)
    ids = torch.randint(0, 512, (1, 6))
    seq = torch.export.Dim("seq", min=2, max=32)
    artifact = fxforge.aot_compile(model, (ids,), tmp_path / "a", dynamic_shapes=({1: seq},),
                                   kv_cache=True, max_seq_len=32)
    assert lowered == ["artifact", "artifact"]   # the graph and its step graph, as loaded
    assert artifact.kv is not None and artifact.kv.step.choices
    with torch.no_grad():
        assert_close_to_eager([artifact(ids)], [model(ids)])


@pytest.mark.parametrize("lossy", [{"quantize": "int8"}, {"attention": "sliding_window:6,sinks:2"},
                                   {"attention": "block_sparse:16,local:1"}])
def test_verify_checks_a_lossy_compile_against_the_optimized_graph(lossy):
    """verify runs the optimized IR for a lossy option: its constants stay (they are released
    after lowering otherwise)."""
    model = make_model(n_layer=1).eval()
    ids = torch.randint(0, 512, (2, 40))
    torch._dynamo.reset()
    compiled = fxforge.compile(model, (ids,), backend="cpu", verify=True, **lossy)
    assert compiled(ids).shape == (2, 40, 512)
