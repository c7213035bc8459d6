"""Lowering with eager fallback partitions: unsupported ops and broken partitions still run."""
import logging

import torch
import torch.nn as nn

from fxforge.backends import Backend, get_backend, lower, register_backend
from fxforge.irgraph import capture_export
from fxforge.testing import assert_close_to_eager

aten = torch.ops.aten


class NoSin(Backend):
    """A backend that cannot run sin: it must end up in an eager partition."""

    name = "test-nosin"

    def __init__(self):
        self.compiled = []

    def supports(self, node):
        return "sin is not supported here" if node.target is aten.sin.default else None

    def compile_partition(self, gm):
        self.compiled.append(sorted(str(n.target) for n in gm.graph.nodes if n.op == "call_function"))
        return gm


class Broken(Backend):
    name = "test-broken"

    def supports(self, node):
        return None

    def compile_partition(self, gm):
        raise RuntimeError("kernel build failed")


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)).sin() * 2)


def test_unsupported_op_runs_eagerly_between_compiled_partitions(caplog):
    model = Model().eval()
    x = torch.randn(3, 6)
    ir = capture_export(model, (x,))
    backend = NoSin()
    with caplog.at_level(logging.WARNING, logger="fxforge.backends"):
        lowered = lower(ir, backend)
    assert [f.op for f in lowered.fallbacks] == ["aten.sin.default"]
    assert "aten.sin.default (sin) runs eagerly: sin is not supported here" in caplog.text
    assert lowered.partitions == 2 and len(backend.compiled) == 2
    assert all("aten.sin.default" not in ops for ops in backend.compiled)
    with torch.no_grad():
        assert_close_to_eager(lowered(x)[0], model(x))


def test_a_partition_that_fails_to_compile_falls_back(caplog):
    model = Model().eval()
    x = torch.randn(3, 6)
    with caplog.at_level(logging.WARNING, logger="fxforge.backends"):
        lowered = lower(capture_export(model, (x,)), Broken())
    assert "kernel build failed" in caplog.text and "runs eagerly" in caplog.text
    with torch.no_grad():
        assert_close_to_eager(lowered(x)[0], model(x))


def test_reference_backend_declines_non_ir_callables():
    ref = get_backend("reference")

    class FakeNode:
        target = print
    assert "not an IR op" in ref.supports(FakeNode())

    class AtenNode:
        target = aten.add.Tensor
    assert ref.supports(AtenNode()) is None


def test_backend_registry():
    register_backend("test-nosin", NoSin)
    assert isinstance(get_backend("test-nosin"), NoSin)


def _interleaved_group_graph():
    """x -> a = relu(x) [group g] -> m = mm(a, w) (outside the group, before its last member)
    -> b = exp(a) [group g]; outputs (m, b)."""
    import torch.fx as fx
    from fxforge.irgraph import GROUP_KEY
    aten = torch.ops.aten
    graph = fx.Graph()
    x, w = graph.placeholder("x"), graph.placeholder("w")
    a = graph.call_function(aten.relu.default, (x,))
    m = graph.call_function(aten.mm.default, (a, w))
    b = graph.call_function(aten.exp.default, (a,))
    graph.output((m, b))
    a.meta[GROUP_KEY] = b.meta[GROUP_KEY] = "g"
    return fx.GraphModule(torch.nn.Module(), graph)


def test_collapsing_a_group_orders_its_outside_users_after_it():
    from fxforge.backends.kernel_lowering import KernelTable, _collapse_groups
    gm = _interleaved_group_graph()
    x, w = torch.randn(3, 4), torch.randn(4, 5)
    expected = gm(x, w)
    built = []

    def fused(sub):
        built.append(sub)
        return (lambda *args: tuple(sub(*args))), "the group's own module"
    choices = []
    _collapse_groups(gm, KernelTable("test", fused), choices)
    gm.recompile()
    ops = [n.op for n in gm.graph.nodes]
    assert ops.count("call_function") == 4 and len(built) == 1   # call, 2 getitems, mm
    assert [c.path for c in choices] == ["the group's own module"]
    for got, want in zip(gm(x, w), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_group_whose_kernel_fails_runs_as_its_own_module(caplog):
    from fxforge.backends.kernel_lowering import KernelTable, _collapse_groups

    def failing(sub):
        raise RuntimeError("no kernel for this")
    gm = _interleaved_group_graph()
    x, w = torch.randn(3, 4), torch.randn(4, 5)
    expected = gm(x, w)
    choices = []
    with caplog.at_level(logging.WARNING, logger="fxforge.backends"):
        _collapse_groups(gm, KernelTable("test", failing), choices)
    gm.recompile()
    assert choices[0].path == "eager fallback" and "no kernel for this" in caplog.text
    assert [n.op for n in gm.graph.nodes].count("call_module") == 1
    for got, want in zip(gm(x, w), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
