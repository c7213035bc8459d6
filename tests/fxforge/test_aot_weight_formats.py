"""AOT artifacts carry each linear's weight format: stored, read back, run; a format this fxforge
cannot run is refused at load with an ArtifactError naming it."""
import json

import pytest
import torch

import fxforge
from fxforge.irgraph.views import Linear
from fxforge.kernels import gemv_cpu
from tests.fxforge.hostile_crafting import Hostile, craft

pytestmark = pytest.mark.skipif(gemv_cpu.gemv_unavailable() is not None,
                                reason="the CPU backend marks bf16 weights only with its C++ kernels")


class _Mlp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(24, 48), torch.nn.Linear(48, 24)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)))


@pytest.fixture(scope="module")
def bf16_artifact(tmp_path_factory):
    torch.manual_seed(7)
    model = _Mlp().eval()
    with torch.no_grad():
        model.up.weight.copy_(model.up.weight.to(torch.bfloat16).float())   # down stays fp32
    path = tmp_path_factory.mktemp("formats") / "mlp"
    fxforge.aot_compile(model, (torch.randn(3, 24),), path, backend="cpu")
    return model, path


def _formats(ir):
    return sorted(lin.weight_format for lin in map(Linear.of, ir.gm.graph.nodes) if lin is not None)


def test_the_format_round_trips_through_an_artifact(bf16_artifact):
    model, path = bf16_artifact
    stored = [e for e in json.loads((path / "graph.json").read_text())["nodes"]
              if e.get("target") == "fxforge.linear.default"]
    # the seventh argument, or its default for a linear that never got one
    assert sorted((e["args"]["tuple"][6:] or ["dense"])[0] for e in stored) == ["bf16", "dense"]
    art = fxforge.load(path)
    assert _formats(art.ir) == ["bf16", "dense"]
    x = torch.randn(3, 24)
    with torch.no_grad():
        torch.testing.assert_close(art(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad,match", [("q4_k", "'q4_k'.*declared but not implemented"),
                                       ("fp4", "unknown weight format 'fp4'")])
def test_an_artifact_with_a_format_this_fxforge_cannot_run_is_refused(bf16_artifact, tmp_path,
                                                                      bad, match):
    def edit(graph):
        entry = next(e for e in graph["nodes"] if e.get("target") == "fxforge.linear.default")
        entry["args"]["tuple"] = entry["args"]["tuple"][:6] + [bad]

    art = craft(bf16_artifact[1], tmp_path / "art", Hostile(graph=edit))
    with pytest.raises(fxforge.ArtifactError, match=match):
        fxforge.load(art)
