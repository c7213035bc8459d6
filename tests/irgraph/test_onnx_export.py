"""ONNX export of the optimized IR: torch model -> fxforge passes -> export_onnx -> ONNX Runtime.

Every exported model passes onnx's full checker and strict shape inference (export_onnx runs
both before it writes); here each one also runs in ONNX Runtime at two sizes of its dynamic
axis against eager (lossless passes: fp32 tolerance) or, for quantized graphs, against
fxforge's own quantized output (the artifact's). Weights are fresh random draws per test.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import fxforge  # noqa: E402
from fxforge.examples import small_gpt  # noqa: E402
from fxforge.irgraph.onnx_export import OnnxExportError  # noqa: E402
from fxforge.testing import assert_close_to_eager  # noqa: E402

SEQ = torch.export.Dim("seq", min=2, max=64)
BATCH = torch.export.Dim("batch", min=1, max=32)


def _seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()))


def _session(path) -> "ort.InferenceSession":
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _run(session, *inputs: torch.Tensor) -> list[torch.Tensor]:
    names = [i.name for i in session.get_inputs()]
    feeds = {name: t.numpy() for name, t in zip(names, inputs)}
    return [torch.from_numpy(out) for out in session.run(None, feeds)]


def _ops(model) -> set[str]:
    return {node.op_type for node in model.graph.node}


def _axis_names(model) -> list[list]:
    return [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in model.graph.input]


def _eager(model, *inputs):
    with torch.no_grad():
        return model(*inputs)


@pytest.fixture(scope="module")
def gpt():
    return small_gpt.make_model(seed=_seed(), n_layer=2)


@pytest.mark.parametrize("opset, attention_op", [(23, True), (17, False)], ids=["Attention", "decomposed"])
def test_small_gpt_runs_in_onnxruntime_like_eager_at_two_lengths(gpt, tmp_path, opset, attention_op):
    example = small_gpt.example_inputs(batch=2, seq=16, seed=_seed())
    model = fxforge.export_onnx(gpt, tmp_path / "gpt.onnx", example_inputs=example,
                                dynamic_shapes=({1: SEQ},), opset=opset)
    assert model.opset_import[0].version == opset
    assert ("Attention" in _ops(model)) is attention_op
    assert attention_op or {"Softmax", "MatMul"} <= _ops(model)
    assert _axis_names(model) == [[2, "seq"]]
    assert model.graph.output[0].type.tensor_type.shape.dim[1].dim_param == "seq"
    session = _session(tmp_path / "gpt.onnx")
    for length in (16, 37):
        ids = torch.randint(0, 512, (2, length))
        assert_close_to_eager(_run(session, ids)[0], _eager(gpt, ids), f"seq {length}")


CORE = ("gpt2", "llama", "mistral", "qwen2", "phi3", "opt", "gpt_neox", "bert", "t5")
# torch.export costs 3-12 s a model: CI runs four that between them hold every op family
# (GQA + rotary + RMSNorm, learned positions, parallel residual, an encoder's padding mask)
FAST = ("llama", "opt", "gpt_neox", "bert")


@pytest.mark.parametrize("arch", [pytest.param(a, marks=() if a in FAST else (pytest.mark.slow,))
                                  for a in CORE])
def test_ci_architectures_run_in_onnxruntime_like_eager(arch, tmp_path):
    """The nine CI architectures (tiny configs, eager attention fused by fxforge), the
    sequence length dynamic; every model's own mask and position code exported with it."""
    pytest.importorskip("transformers")
    from fxforge.examples import hf_models
    model = hf_models.LogitsOnly(hf_models.build(arch, seed=_seed()))
    example = hf_models.example_inputs(arch, batch=2, seq=8, seed=_seed())
    shapes = tuple({1: torch.export.Dim(f"seq{i}", min=2, max=64)} for i in range(len(example)))
    fxforge.export_onnx(model, tmp_path / f"{arch}.onnx", example_inputs=example,
                        dynamic_shapes=shapes)
    session = _session(tmp_path / f"{arch}.onnx")
    for seq in (8, 13):
        inputs = hf_models.example_inputs(arch, batch=2, seq=seq, seed=_seed())
        assert_close_to_eager(_run(session, *inputs)[0], _eager(model, *inputs), f"{arch} seq {seq}")


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AvgPool2d(2), nn.AdaptiveAvgPool2d(1))
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(torch.flatten(self.features(x), 1))


def test_cnn_with_a_dynamic_batch(tmp_path):
    model = SmallCNN().eval()
    for norm in (model.features[1], model.features[5]):   # statistics that matter
        norm.running_mean.normal_()
        norm.running_var.uniform_(0.5, 2.0)
    exported = fxforge.export_onnx(model, tmp_path / "cnn.onnx", example_inputs=(torch.randn(2, 3, 16, 16),),
                                   dynamic_shapes=({0: BATCH},))
    assert {"Conv", "BatchNormalization", "MaxPool", "AveragePool", "Gemm"} <= _ops(exported)
    assert _axis_names(exported) == [["batch", 3, 16, 16]]
    session = _session(tmp_path / "cnn.onnx")
    for batch in (2, 5):
        x = torch.randn(batch, 3, 16, 16)
        assert_close_to_eager(_run(session, x)[0], _eager(model, x), f"batch {batch}")
