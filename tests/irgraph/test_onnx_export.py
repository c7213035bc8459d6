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
from fxforge.examples.small_cnn import make_cnn  # noqa: E402
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


def test_cnn_with_a_dynamic_batch(tmp_path):
    model = make_cnn(seed=_seed())
    exported = fxforge.export_onnx(model, tmp_path / "cnn.onnx", example_inputs=(torch.randn(2, 3, 16, 16),),
                                   dynamic_shapes=({0: BATCH},))
    assert {"Conv", "BatchNormalization", "MaxPool", "AveragePool", "Gemm"} <= _ops(exported)
    assert _axis_names(exported) == [["batch", 3, 16, 16]]
    session = _session(tmp_path / "cnn.onnx")
    for batch in (2, 5):
        x = torch.randn(batch, 3, 16, 16)
        assert_close_to_eager(_run(session, x)[0], _eager(model, x), f"batch {batch}")


INT8, UINT8, UINT4 = onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.UINT4


@pytest.mark.parametrize("scheme, quant_format, opset, op, code_type", [
    ("int8", "auto", 23, "DequantizeLinear", INT8),
    ("int4:g64", "auto", 23, "MatMulNBits", UINT8),
    pytest.param("int4:g32", "qdq", 21, "DequantizeLinear", UINT4, marks=pytest.mark.slow),
    pytest.param("int4:g128", "matmulnbits", 17, "MatMulNBits", UINT8, marks=pytest.mark.slow),
    pytest.param("w8a8", "auto", 23, "MatMulInteger", INT8, marks=pytest.mark.slow),
], ids=["int8-qdq", "int4-matmulnbits", "int4-qdq", "int4-opset17", "w8a8"])
def test_quantized_artifact_keeps_its_codes_and_matches_fxforge(tmp_path, scheme, quant_format,
                                                               opset, op, code_type):
    """Quantization is lossy, so the reference is fxforge's own quantized output (the
    artifact's, on the reference backend); the file holds the integer codes, not fp32 weights."""
    model = small_gpt.make_model(seed=_seed(), n_layer=1)
    example = small_gpt.example_inputs(batch=2, seq=16, seed=_seed())
    artifact = fxforge.aot_compile(model, example, tmp_path / "art", dynamic_shapes=({1: SEQ},),
                                   quantize=scheme, backend="reference")
    exported = fxforge.export_onnx(artifact, tmp_path / "q.onnx", quant_format=quant_format,
                                   opset=opset)
    assert op in _ops(exported)
    codes = [t for t in exported.graph.initializer if t.data_type == code_type and len(t.dims) >= 2]
    linears = sum(n.op_type in ("DequantizeLinear", "MatMulNBits", "MatMulInteger")
                  for n in exported.graph.node)
    assert len(codes) == linears == 5   # q/k/v fused, attention out, fc, proj, lm_head
    float_values = sum(onnx.numpy_helper.to_array(t).size for t in exported.graph.initializer
                       if t.data_type == onnx.TensorProto.FLOAT)
    # the token and position tables, then scales, offsets, biases, norms: under a quarter of
    # the 262,144 values the five linears' weights would add in fp32
    assert float_values < 512 * 128 + 256 * 128 + 262_144 // 4
    session = _session(tmp_path / "q.onnx")
    for length in (16, 29):
        ids = torch.randint(0, 512, (2, length))
        torch.testing.assert_close(_run(session, ids)[0], artifact(ids), rtol=1e-5, atol=1e-5)


class Unexportable(nn.Module):
    def forward(self, x):
        values, _ = torch.sort(x, dim=-1)
        return torch.cumprod(values, dim=-1) + torch.fft.fft(x).real


def test_unsupported_ops_are_listed_together_in_one_error(tmp_path):
    with pytest.raises(OnnxExportError) as error:
        fxforge.export_onnx(Unexportable(), tmp_path / "x.onnx", example_inputs=(torch.randn(3, 8),))
    message = str(error.value)
    for op in ("aten.sort", "aten.cumprod", "aten._fft_r2c"):
        assert op in message, message
    assert not (tmp_path / "x.onnx").exists()


def test_compiled_module_static_export_and_external_weights(tmp_path, monkeypatch):
    """A ``fxforge.compile`` result exports its model with its options; ``dynamic=False``
    fixes every size; weights past the threshold go to ``<file>.data``, checked from disk."""
    import fxforge.onnx_export
    monkeypatch.setattr(fxforge.onnx_export, "EXTERNAL_DATA_BYTES", 0)
    block = small_gpt.make_mlp_block(seed=_seed(), dim=32, hidden=64)
    x = small_gpt.mlp_example_inputs(batch=2, seq=5, dim=32, seed=_seed())
    compiled = fxforge.compile(block, x)
    exported = fxforge.export_onnx(compiled, tmp_path / "mlp.onnx", example_inputs=x, dynamic=False)
    assert _axis_names(exported) == [[2, 5, 32]]
    assert (tmp_path / "mlp.onnx.data").stat().st_size >= 4 * 2 * 32 * 64   # both fp32 weights
    onnx.checker.check_model(str(tmp_path / "mlp.onnx"), full_check=True)
    assert_close_to_eager(_run(_session(tmp_path / "mlp.onnx"), *x)[0], compiled(*x))


def test_artifact_directory_keeps_the_axis_names_it_was_compiled_with(gpt, tmp_path):
    example = small_gpt.example_inputs(batch=2, seq=12, seed=_seed())
    fxforge.aot_compile(gpt, example, tmp_path / "art", dynamic_shapes=({1: SEQ},), backend="reference")
    exported = fxforge.export_onnx(tmp_path / "art", tmp_path / "gpt.onnx")
    assert _axis_names(exported) == [[2, "seq"]]
    ids = torch.randint(0, 512, (2, 21))
    assert_close_to_eager(_run(_session(tmp_path / "gpt.onnx"), ids)[0], _eager(gpt, ids))
    from fxforge.__main__ import main   # the CLI writes the same graph at the opset it is given
    assert main(["export-onnx", str(tmp_path / "art"), "-o", str(tmp_path / "cli.onnx"),
                 "--opset", "21"]) == 0
    written = onnx.load(tmp_path / "cli.onnx")
    assert written.opset_import[0].version == 21 and "Attention" not in _ops(written)
    assert_close_to_eager(_run(_session(tmp_path / "cli.onnx"), ids)[0], _eager(gpt, ids))


@pytest.mark.parametrize("opset, blocked", [(21, True), (17, False)], ids=["blocked-dq", "opset17"])
def test_int8_g32_weights_are_blocked_dequantize(tmp_path, opset, blocked):
    """int8_g32 (GGUF Q8_0's layout) comes from GGUF files only; here each int8_channel linear
    of a quantized graph is restated as int8_g32 with its channel scale in every block: the
    same weights, so ONNX Runtime must give the graph's own output."""
    from fxforge.irgraph import capture_export
    from fxforge.irgraph.onnx_export import export_graph
    from fxforge.irgraph.views import Linear, Permute
    from fxforge.options import parse_options
    from fxforge.orchestrate import compile_graph
    model = small_gpt.make_model(seed=_seed(), n_layer=1)
    example = small_gpt.example_inputs(batch=2, seq=16, seed=_seed())
    ir = capture_export(model, example, dynamic_shapes=({1: SEQ},))
    ir = compile_graph(ir, parse_options({"quantize": "int8", "backend": "reference"}),
                       stages=("passes",)).ir
    for node in ir.call_nodes():
        linear = Linear.of(node)
        if linear is not None and linear.weight_format == "int8_channel":
            stored = Permute.of(linear.scales)   # scales [1, N]: a view of the stored [N, 1]
            channel_scales = getattr(ir.gm, stored.input.target).permute(stored.dims)
            blocks = linear.weight.meta["fxf"].shape[0] // 32
            blocked_scales = ir.add_constant("g32_scales", channel_scales.expand(blocks, -1).contiguous(), node)
            linear.replace(weight_format="int8_g32", scales=blocked_scales)
    ir.recompile()
    exported = export_graph(ir, opset=opset)
    onnx.checker.check_model(exported, full_check=True)
    blocked_nodes = [n for n in exported.graph.node if n.op_type == "DequantizeLinear"
                     and any(a.name == "block_size" and a.i == 32 for a in n.attribute)]
    assert len(blocked_nodes) == (5 if blocked else 0)
    onnx.save(exported, tmp_path / "g32.onnx")
    ids = torch.randint(0, 512, (2, 23))
    with torch.no_grad():
        expected = ir.gm(ids)[0]
    torch.testing.assert_close(_run(_session(tmp_path / "g32.onnx"), ids)[0], expected,
                               rtol=1e-5, atol=1e-5)
