"""bench/peers.py, the side-by-side peers of the benches (torchao, ONNX Runtime), on a tiny
model: each runner computes what the model computes (within its quantization's error), and a
config that cannot quantize anything is reported, not run as if it had."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import peers  # noqa: E402


class TinyLM(torch.nn.Module):
    """ids -> logits of every position, through two linears whose K divides 32 and 64."""

    def __init__(self, vocab: int = 112, hidden: int = 64):   # N % 16: tinygemm CPU int4
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.mlp = torch.nn.Linear(hidden, 128)
        self.head = torch.nn.Linear(128, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.mlp(self.embed(ids))))


def _model(seed: int) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM().eval()


@pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao not installed")
@pytest.mark.parametrize("scheme", list(peers.TORCHAO_SCHEMES))
def test_torchao_schemes_quantize_and_stay_close(scheme):
    model = _model(int(torch.randint(0, 2**31, ()).item()))
    ids = torch.randint(0, 112, (1, 9))
    quantized, why = peers.torchao_model(model, scheme, compile=False)
    assert why is None and quantized is not None
    assert not any(type(m.weight.data) is torch.Tensor for m in (quantized.mlp, quantized.head))
    with torch.no_grad():
        ref, got = model(ids), quantized(ids)
    error = float((got - ref).abs().max() / ref.abs().max())
    assert 0 < error < (0.5 if "int4" in scheme else 0.1), error   # quantized, and close


@pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao not installed")
def test_a_group_that_divides_no_linear_is_reported():
    quantized, why = peers.torchao_model(_model(0), "int4wo:g48", compile=False)
    assert quantized is None and "quantized none of the 2 linears" in why
    with pytest.raises(ValueError, match="unknown torchao scheme"):
        peers.torchao_config("int3")


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None
                    or importlib.util.find_spec("onnxscript") is None,
                    reason="onnxruntime/onnxscript not installed")
def test_onnx_runner_matches_eager_at_every_length(tmp_path):
    model = _model(int(torch.randint(0, 2**31, ()).item()))
    run, why, how = peers.onnx_runner(model, torch.randint(0, 112, (1, 8)), 1, tmp_path)
    assert why is None and "onnxruntime" in how
    for length in (3, 8, 21):   # the sequence length is dynamic in the export
        ids = torch.randint(0, 112, (1, length))
        with torch.no_grad():
            torch.testing.assert_close(run(ids), model(ids), rtol=1e-4, atol=1e-5)
