"""torch.compile(backend="fxforge"): registration, options, verify, weight changes, fallbacks."""
import logging
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

import fxforge
from fxforge.passes import Pass, PassResult
from fxforge.testing import assert_close_to_eager

aten = torch.ops.aten


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        return self.norm(x + self.fc2(torch.nn.functional.gelu(self.fc1(x))))


def test_backend_is_found_through_the_entry_point_without_importing_fxforge():
    code = textwrap.dedent("""
        import sys, torch
        m = torch.nn.Linear(4, 4).eval()
        x = torch.randn(2, 4)
        with torch.no_grad():
            out = torch.compile(m, backend="fxforge")(x)
        assert torch.allclose(out, m(x), rtol=1.3e-5, atol=1e-5)
        print("fxforge imported by the entry point:", "fxforge" in sys.modules)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "fxforge imported by the entry point: True" in result.stdout


def test_compiled_module_matches_eager_across_shapes():
    model = MLP().eval()
    compiled = fxforge.compile(model, (torch.randn(4, 8),))
    for shape in [(4, 8), (7, 8), (2, 3, 8)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            assert_close_to_eager(compiled(x), model(x))


def test_unknown_and_unavailable_options_are_clear_errors():
    with pytest.raises(fxforge.OptionsError, match="unknown fxforge option.*'tile_size'"):
        fxforge.compile(MLP(), tile_size=64)
    with pytest.raises(fxforge.OptionsError, match="precision must be one of"):
        fxforge.compile(MLP(), precision="int3")
    with pytest.raises(fxforge.OptionsError, match="unknown pass"):
        fxforge.compile(MLP(), passes=["dce", "warp_speed"])
    with pytest.raises(Exception, match="unknown fxforge option"):
        with torch.no_grad():
            torch.compile(MLP(), backend="fxforge", options={"nope": 1})(torch.randn(2, 8))


def _register_wrong_pass():
    """A deliberately wrong pass (add -> sub), to prove that verify=True catches mismatches."""
    from fxforge.passes.base import _REGISTRY

    def wrong(ir):
        n = 0
        for node in ir.call_nodes():
            if node.target is aten.add.Tensor:
                node.target = aten.sub.Tensor
                n += 1
        return PassResult(ir, {"broken": n})
    _REGISTRY.setdefault("test_wrong_add", Pass("test_wrong_add", wrong))


def test_verify_option_raises_on_a_mismatch_and_passes_otherwise():
    _register_wrong_pass()
    model = MLP().eval()
    x = torch.randn(4, 8)
    ok = fxforge.compile(model, verify=True)
    assert_close_to_eager(ok(x), model(x))
    torch._dynamo.reset()
    bad = fxforge.compile(model, verify=True, passes=["test_wrong_add"])
    with pytest.raises(fxforge.VerificationError, match="differs from eager"):
        bad(x)


def test_changed_weights_are_refrozen(caplog):
    model = MLP().eval()
    x = torch.randn(4, 8)
    compiled = fxforge.compile(model, (x,))
    with torch.no_grad():
        model.fc1.weight.mul_(-0.5)  # in place: same tensor object, new version
        with caplog.at_level(logging.WARNING, logger="fxforge"):
            assert_close_to_eager(compiled(x), model(x))
        assert "re-freezing" in caplog.text
        model.fc2.weight = nn.Parameter(torch.randn(8, 16))  # a new tensor object
        assert_close_to_eager(compiled(x), model(x))


def test_grad_mode_runs_eagerly_with_a_logged_reason(caplog):
    model = MLP()
    x = torch.randn(4, 8)
    with caplog.at_level(logging.WARNING, logger="fxforge"):
        out = torch.compile(model, backend="fxforge")(x)
    assert "compiles for inference" in caplog.text
    out.sum().backward()
    assert model.fc1.weight.grad is not None


def test_a_graph_that_cannot_be_captured_falls_back(caplog, monkeypatch):
    import fxforge.irgraph.capture as capture

    def broken(*args, **kwargs):
        raise RuntimeError("capture exploded")
    monkeypatch.setattr(capture, "build_ir", broken)
    model = MLP().eval()
    x = torch.randn(3, 8)
    with caplog.at_level(logging.WARNING, logger="fxforge"), torch.no_grad():
        out = torch.compile(model, backend="fxforge")(x)
    assert "could not compile a graph" in caplog.text and "capture exploded" in caplog.text
    assert_close_to_eager(out, model(x))


def test_a_model_built_in_inference_mode_compiles(caplog):
    with torch.inference_mode():
        model = MLP().eval()
        x = torch.randn(3, 8)
        with caplog.at_level(logging.INFO, logger="fxforge"):
            out = torch.compile(model, backend="fxforge")(x)
        assert "runs eagerly" not in caplog.text and "inference-mode tensors" in caplog.text
        assert_close_to_eager(out, model(x))
