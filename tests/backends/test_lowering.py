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
