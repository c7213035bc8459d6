"""ONNX import: quantized weights onto fxforge's formats, If/Loop, malformed models, shape
chains, and the command line. ONNX Runtime (plain kernels) is the reference."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from fxforge.irgraph.onnx_import import OnnxImportError, import_model
from fxforge.kernels.row_program import ROW
from fxforge.onnx import from_onnx

from tests.irgraph.onnx_cases import T, assert_matches_ort, helper, model_of, tensor


def _formats(module) -> list[str]:
    return [s.node.attrs["format"] for s in module.program.steps if "format" in s.node.attrs]


# ---- quantized ops ----------------------------------------------------------------------------

def _nbits_model(rng, k, n, block, symmetric: bool, bias: bool):
    codes = rng.integers(0, 16, (n, k)).astype(np.uint8)
    pairs = codes.reshape(n, k // 2, 2)
    packed = (pairs[..., 0] | (pairs[..., 1] << 4)).reshape(n, k // block, block // 2)
    scales = (rng.random(n * k // block) * 0.1 + 0.01).astype(np.float16).astype(np.float32)
    inits = [tensor("B", packed.astype(np.uint8)), tensor("s", scales)]
    names = ["x", "B", "s"]
    if not symmetric:
        zps = rng.integers(0, 16, (n, k // block))
        names.append("zp")
        inits.append(tensor("zp", (zps[:, 0::2] | (zps[:, 1::2] << 4)).astype(np.uint8).reshape(-1)))
    if bias:
        names += [""] * (5 - len(names)) + ["bias"]
        inits.append(tensor("bias", rng.standard_normal(n).astype(np.float32)))
    node = helper.make_node("MatMulNBits", names, ["y"], domain="com.microsoft", K=k, N=n, bits=4,
                            block_size=block)
    return model_of([node], [("x", T.FLOAT, ["rows", k])], [("y", T.FLOAT, ["rows", n])], inits,
                    ms_domain=True)


@pytest.mark.parametrize("block,bias", [(32, False), (64, True), (128, False)])
def test_symmetric_matmul_nbits_becomes_an_int4_linear_exactly(block, bias):
    rng = np.random.default_rng(block)
    model = _nbits_model(rng, 256, 24, block, symmetric=True, bias=bias)
    feeds = {"x": rng.standard_normal((5, 256)).astype(np.float32)}
    eager = from_onnx(model, compile=False)
    assert _formats(eager) == [f"int4_g{block}"]
    assert_matches_ort(model, feeds, eager)
    assert_matches_ort(model, feeds, from_onnx(model))


def test_asymmetric_matmul_nbits_stays_dense_unless_nearest_is_asked():
    rng = np.random.default_rng(3)
    model = _nbits_model(rng, 128, 16, 32, symmetric=False, bias=False)
    feeds = {"x": rng.standard_normal((3, 128)).astype(np.float32)}
    exact = from_onnx(model, compile=False)
    assert _formats(exact) == []   # fp16 cannot hold zero point x scale: kept dense
    assert_matches_ort(model, feeds, exact)
    nearest = from_onnx(model, compile=False, quantized_weights="nearest")
    assert _formats(nearest) == ["int4_g32"]
    assert_matches_ort(model, feeds, nearest, rtol=1e-2, atol=5e-2)


def _dq_matmul(codes: onnx.TensorProto, scale: np.ndarray, k: int, n: int, zero=None, **attrs):
    inputs = ["W", "scale"] + (["zero"] if zero is not None else [])
    inits = [codes, tensor("scale", scale)] + ([zero] if zero is not None else [])
    nodes = [helper.make_node("DequantizeLinear", inputs, ["Wd"], **attrs),
             helper.make_node("MatMul", ["x", "Wd"], ["y"])]
    return model_of(nodes, [("x", T.FLOAT, ["rows", k])], [("y", T.FLOAT, ["rows", n])], inits)


def _fp16_exact(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16).astype(np.float32)


@pytest.mark.parametrize("kind", ["int8_channel", "int8_g32", "int4_g64"])
def test_dequantized_weights_become_fxforge_formats(kind):
    rng = np.random.default_rng(len(kind))
    k, n = 128, 12
    if kind == "int8_channel":
        codes = tensor("W", rng.integers(-127, 128, (k, n)).astype(np.int8))
        model = _dq_matmul(codes, _fp16_exact(rng.random(n) * 0.02), k, n, axis=1)
    elif kind == "int8_g32":
        codes = tensor("W", rng.integers(-127, 128, (k, n)).astype(np.int8))
        model = _dq_matmul(codes, _fp16_exact(rng.random((k // 32, n)) * 0.02), k, n, axis=0,
                           block_size=32)
    else:   # signed int4, symmetric: the offset is -8 x scale after the shift to 0..15
        codes = helper.make_tensor("W", T.INT4, [k, n], rng.integers(-8, 8, k * n).tolist())
        model = _dq_matmul(codes, _fp16_exact(rng.random((k // 64, n)) * 0.1), k, n, axis=0,
                           block_size=64)
    feeds = {"x": rng.standard_normal((4, k)).astype(np.float32)}
    eager = from_onnx(model, compile=False)
    assert _formats(eager) == [kind]
    assert_matches_ort(model, feeds, eager)
    assert_matches_ort(model, feeds, from_onnx(model))


def test_dynamic_quantize_and_matmul_integer_are_exact():
    rng = np.random.default_rng(7)
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
             helper.make_node("MatMulInteger", ["xq", "W", "xz", "wz"], ["acc"])]
    inits = [tensor("W", rng.integers(0, 256, (32, 8)).astype(np.uint8)),
             tensor("wz", np.array(131, np.uint8))]
    model = model_of(nodes, [("x", T.FLOAT, ["rows", 32])],
                     [("acc", T.INT32, ["rows", 8]), ("xs", T.FLOAT, []), ("xz", T.UINT8, [])],
                     inits)
    feeds = {"x": (rng.standard_normal((6, 32)) * 3).astype(np.float32)}
    assert_matches_ort(model, feeds, from_onnx(model, compile=False), rtol=0, atol=0)


@pytest.mark.parametrize("elem,zero", [(T.UINT8, 3), (T.INT4, -2), (T.INT8, 0)])
def test_quantize_linear_rounds_half_to_even_and_saturates(elem, zero):
    rng = np.random.default_rng(elem)
    zp = helper.make_tensor("zp", elem, [], [zero])
    nodes = [helper.make_node("QuantizeLinear", ["x", "scale", "zp"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "scale", "zp"], ["y"])]
    model = model_of(nodes, [("x", T.FLOAT, [64])], [("y", T.FLOAT, [64])],
                     [tensor("scale", np.array(0.25, np.float32)), zp])
    x = np.concatenate([np.arange(-8, 8, 0.5), rng.standard_normal(32) * 40]).astype(np.float32)
    assert_matches_ort(model, {"x": x}, from_onnx(model, compile=False), rtol=0, atol=0)


# ---- If / Loop --------------------------------------------------------------------------------

def _branch(name: str, op: str) -> onnx.GraphProto:
    return helper.make_graph([helper.make_node(op, ["x"], [f"{name}_out"])], name, [],
                             [helper.make_tensor_value_info(f"{name}_out", T.FLOAT, None)])


def _if_model(cond_from_input: bool) -> onnx.ModelProto:
    if_node = helper.make_node("If", ["cond"], ["y"], name="pick",
                               then_branch=_branch("then", "Relu"),
                               else_branch=_branch("else", "Neg"))
    inputs = [("x", T.FLOAT, ["n"])] + ([("cond", T.BOOL, [])] if cond_from_input else [])
    inits = [] if cond_from_input else [tensor("cond", np.array(False))]
    return model_of([if_node], inputs, [("y", T.FLOAT, ["n"])], inits)


def test_if_with_a_constant_condition_is_inlined():
    model = _if_model(cond_from_input=False)
    module = from_onnx(model, compile=False)
    assert module.program.inlined == 1
    x = np.random.default_rng(0).standard_normal(9).astype(np.float32)
    assert_matches_ort(model, {"x": x}, module)
    assert_matches_ort(model, {"x": x}, from_onnx(model))


def test_if_on_run_time_data_is_a_clear_error_naming_the_node():
    with pytest.raises(OnnxImportError, match="If node 'pick'.*condition is computed at run time"):
        import_model(_if_model(cond_from_input=True))


def _loop_model(trip_from_input: bool) -> onnx.ModelProto:
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Mul", ["acc_in", "w"], ["acc_out"]),
         helper.make_node("Add", ["acc_out", "x"], ["scan"])],
        "body",
        [helper.make_tensor_value_info("i", T.INT64, []),
         helper.make_tensor_value_info("cond_in", T.BOOL, []),
         helper.make_tensor_value_info("acc_in", T.FLOAT, ["n"])],
        [helper.make_tensor_value_info("cond_out", T.BOOL, []),
         helper.make_tensor_value_info("acc_out", T.FLOAT, ["n"]),
         helper.make_tensor_value_info("scan", T.FLOAT, ["n"])])
    loop = helper.make_node("Loop", ["trip", "", "x"], ["acc", "scans"], name="repeat", body=body)
    inputs = [("x", T.FLOAT, ["n"])] + ([("trip", T.INT64, [])] if trip_from_input else [])
    inits = [tensor("w", np.float32(0.5) * np.ones(1, np.float32))]
    if not trip_from_input:
        inits.append(tensor("trip", np.array(4, np.int64)))
    return model_of([loop], inputs, [("acc", T.FLOAT, ["n"]), ("scans", T.FLOAT, [4, "n"])],
                    inits)


def test_loop_with_a_constant_trip_count_is_unrolled():
    model = _loop_model(trip_from_input=False)
    module = from_onnx(model, compile=False)
    assert module.program.inlined == 1
    x = np.random.default_rng(1).standard_normal(5).astype(np.float32)
    assert_matches_ort(model, {"x": x}, module)
    assert_matches_ort(model, {"x": x}, from_onnx(model))


def test_loop_with_a_run_time_trip_count_is_a_clear_error():
    with pytest.raises(OnnxImportError, match="Loop node 'repeat'.*trip count is computed"):
        import_model(_loop_model(trip_from_input=True))


# ---- malformed models -------------------------------------------------------------------------

def _relu_model(opset: int = 21) -> onnx.ModelProto:
    return model_of([helper.make_node("Relu", ["x"], ["y"])], [("x", T.FLOAT, [3])],
                    [("y", T.FLOAT, [3])], opset=opset)


@pytest.mark.parametrize("opset", [7, 12, 99])
def test_an_opset_out_of_range_is_named(opset):
    model = _relu_model()
    model.opset_import[0].version = opset
    with pytest.raises(OnnxImportError, match=f"opset {opset} of the default domain.*13 to"):
        import_model(model)


def test_a_missing_initializer_is_named():
    model = model_of([helper.make_node("Add", ["x", "bias"], ["y"], name="add_bias")],
                     [("x", T.FLOAT, [3])], [("y", T.FLOAT, [3])])
    with pytest.raises(OnnxImportError, match="Add node 'add_bias' reads 'bias'.*missing initializer"):
        import_model(model)


def test_a_cyclic_graph_is_named():
    nodes = [helper.make_node("Add", ["x", "b"], ["a"], name="first"),
             helper.make_node("Relu", ["a"], ["b"], name="second")]
    model = model_of(nodes, [("x", T.FLOAT, [3])], [("b", T.FLOAT, [3])])
    with pytest.raises(OnnxImportError, match="cycle: .*'first'.*'second'|cycle: .*'second'.*'first'"):
        import_model(model)


def test_wrong_types_are_a_clear_error():
    model = model_of([helper.make_node("Add", ["x", "i"], ["y"])],
                     [("x", T.FLOAT, [3]), ("i", T.INT64, [3])], [("y", T.FLOAT, [3])])
    with pytest.raises(OnnxImportError, match="the ONNX model is invalid"):
        import_model(model)


def test_every_unsupported_op_is_listed_at_once():
    nodes = [helper.make_node("Relu", ["x"], ["a"]),
             helper.make_node("FancyOp", ["a"], ["b"], domain="acme"),
             helper.make_node("OtherOp", ["b"], ["c"], domain="acme"),
             helper.make_node("FancyOp", ["c"], ["y"], domain="acme")]
    model = model_of(nodes, [("x", T.FLOAT, [3])], [("y", T.FLOAT, [3])])
    model.opset_import.append(helper.make_opsetid("acme", 1))
    with pytest.raises(OnnxImportError, match=r"2 op\(s\).*acme::FancyOp \(opset 1, 2 nodes\), "
                                              r"acme::OtherOp \(opset 1, 1 node\)"):
        import_model(model)


def test_bytes_that_are_not_a_model_are_named(tmp_path):
    path = tmp_path / "junk.onnx"
    path.write_bytes(b"\x00\xffnot a protobuf" * 10)
    with pytest.raises(OnnxImportError, match="junk.onnx.*not an ONNX model|holds no ONNX graph"):
        import_model(path)
    with pytest.raises(OnnxImportError, match="no ONNX file"):
        import_model(tmp_path / "absent.onnx")


def _with_external_weight(tmp_path, location: str) -> onnx.ModelProto:
    weight = tensor("w", np.arange(3, dtype=np.float32) + 1)
    model = model_of([helper.make_node("Mul", ["x", "w"], ["y"])], [("x", T.FLOAT, [3])],
                     [("y", T.FLOAT, [3])], [weight])
    onnx.external_data_helper.convert_model_to_external_data(
        model, all_tensors_to_one_file=True, location=location, size_threshold=0)
    return model


def test_external_data_is_read_from_the_models_folder(tmp_path):
    model = _with_external_weight(tmp_path, "weights.bin")
    onnx.save_model(model, str(tmp_path / "m.onnx"))
    module = import_model(tmp_path / "m.onnx")
    got = module(torch.ones(3))
    torch.testing.assert_close(got, torch.tensor([1.0, 2.0, 3.0]))


def test_external_data_outside_the_models_folder_is_refused(tmp_path):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.arange(3, dtype=np.float32).tobytes())
    model = _with_external_weight(tmp_path, "weights.bin")
    for entry in model.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = "../secret.bin"
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "m.onnx").write_bytes(model.SerializeToString())
    with pytest.raises(OnnxImportError, match="outside the model's folder; refused"):
        import_model(folder / "m.onnx")


# ---- shape chains fold ------------------------------------------------------------------------

def _shape_chain_model() -> onnx.ModelProto:
    """y = reshape(x, [shape(x)[0], -1]) * 2: the exporters' Shape->Gather->Concat idiom."""
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "zero"], ["b"], axis=0),
             helper.make_node("Unsqueeze", ["b", "axes"], ["b1"]),
             helper.make_node("Concat", ["b1", "minus_one"], ["shape"], axis=0),
             helper.make_node("Reshape", ["x", "shape"], ["r"]),
             helper.make_node("Mul", ["r", "two"], ["y"])]
    inits = [tensor("zero", np.array(0, np.int64)), tensor("axes", np.array([0], np.int64)),
             tensor("minus_one", np.array([-1], np.int64)), tensor("two", np.array(2, np.float32))]
    return model_of(nodes, [("x", T.FLOAT, ["batch", "seq", 4])], [("y", T.FLOAT, ["batch", None])],
                    inits)


def test_shape_gather_concat_chains_fold_to_symbolic_sizes():
    model = _shape_chain_model()
    module = import_model(model)
    dims = torch.export.Dim("batch"), torch.export.Dim("seq")
    exported = torch.export.export(module, (torch.randn(3, 5, 4),),
                                   dynamic_shapes=(({0: dims[0], 1: dims[1]},),))
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert not targets & {"aten.stack.default", "aten.scalar_tensor.default", "aten.cat.default"}
    compiled = from_onnx(model)
    for shape in [(3, 5, 4), (2, 7, 4)]:
        x = np.random.default_rng(shape[1]).standard_normal(shape).astype(np.float32)
        assert_matches_ort(model, {"x": x}, compiled)


def _rms_norm_model() -> onnx.ModelProto:
    """RMSNorm as exporters write it: the exponent and epsilon are 0-d initializers."""
    nodes = [helper.make_node("Pow", ["x", "two"], ["sq"]),
             helper.make_node("ReduceMean", ["sq", "axes"], ["ms"], keepdims=1),
             helper.make_node("Add", ["ms", "eps"], ["var"]),
             helper.make_node("Sqrt", ["var"], ["root"]),
             helper.make_node("Reciprocal", ["root"], ["inv"]),
             helper.make_node("Mul", ["x", "inv"], ["normed"]),
             helper.make_node("Mul", ["w", "normed"], ["y"])]
    rng = np.random.default_rng(0)
    inits = [tensor("two", np.array(2.0, np.float32)), tensor("axes", np.array([-1], np.int64)),
             tensor("eps", np.array(1e-5, np.float32)),
             tensor("w", rng.standard_normal(16).astype(np.float32))]
    return model_of(nodes, [("x", T.FLOAT, ["batch", 16])], [("y", T.FLOAT, ["batch", 16])], inits)


def test_one_element_constants_become_literals_and_rms_norm_stays_per_row():
    """A 0-d epsilon read as a tensor made the fused kernel take 1/sqrt per element (6x slower);
    as a literal the whole chain is per row. Same values as ONNX Runtime either way."""
    from fxforge.compiler import recording
    model = _rms_norm_model()
    module = import_model(model)
    exported = torch.export.export(module, (torch.randn(3, 16),))
    adds = [n for n in exported.graph.nodes if n.target == torch.ops.aten.add.Tensor]
    assert adds and all(isinstance(n.args[1], float) for n in adds)
    with recording() as graphs:
        compiled = from_onnx(model)
        x = np.random.default_rng(1).standard_normal((5, 16)).astype(np.float32)
        assert_matches_ort(model, {"x": x}, compiled)
    programs = [getattr(n.target, "call", n.target).program for g in graphs
                for n in g.lowered.gm.graph.nodes if n.meta.get("fxf_kernel_group")]
    assert programs
    for program in programs:   # sqrt and reciprocal: once per row, not per element
        levels = {v.op: v.level for v in program.values if v.op in ("sqrt", "reciprocal")}
        assert levels and set(levels.values()) == {ROW}, program.signature()


def test_the_compiled_model_does_not_guard_on_its_program(monkeypatch):
    """A call checks the inputs, not the thousands of Python objects of the imported program
    (SmolLM2's: ~60k dynamo guards, 7 ms a call): fxforge.compile drops the guards under an
    OnnxModule's static attributes, and keeps those on the inputs."""
    import fxforge.api
    seen: list = []
    make = fxforge.api._guard_options

    def watching(model):
        options = make(model)
        keep = options["guard_filter_fn"]

        def record(entries):
            kept = keep(entries)
            seen.extend(zip((e.name for e in entries), kept))
            return kept
        return {"guard_filter_fn": record}
    monkeypatch.setattr(fxforge.api, "_guard_options", watching)
    model = _shape_chain_model()
    compiled = from_onnx(model)
    x = np.random.default_rng(1).standard_normal((3, 5, 4)).astype(np.float32)
    assert_matches_ort(model, {"x": x}, compiled)
    dropped = [name for name, kept in seen if not kept]
    assert dropped and all(".program" in n or "._const_paths" in n or ".input_specs" in n
                           for n in dropped)
    assert any(kept and "program" not in name and "args" in name for name, kept in seen)
    assert not [n for n, kept in seen if kept and ".program" in n]


# ---- the command line -------------------------------------------------------------------------

def _cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fxforge", *args], capture_output=True,
                          text=True, cwd=cwd, env={**__import__("os").environ, "PYTHONSAFEPATH": "1"})


def test_cli_compiles_an_onnx_file_with_its_named_dynamic_dims(tmp_path):
    import fxforge
    model = _shape_chain_model()
    onnx.save_model(model, str(tmp_path / "chain.onnx"))
    done = _cli("compile", str(tmp_path / "chain.onnx"), "--dim", "batch=3", "--dim", "seq=6",
                "-o", str(tmp_path / "art"))
    assert done.returncode == 0, done.stderr[-2000:]
    artifact = fxforge.load(tmp_path / "art")
    assert [str(d) for d in artifact.signature[0].shape] == ["batch", "seq", "4"]
    x = np.random.default_rng(5).standard_normal((2, 9, 4)).astype(np.float32)
    assert_matches_ort(model, {"x": x}, artifact)


def test_cli_lists_the_imported_ops_and_errors_in_one_line(tmp_path):
    done = _cli("onnx-ops")
    assert done.returncode == 0 and "com.microsoft   MatMulNBits" in done.stdout
    assert "ai.onnx         Reshape" in done.stdout
    broken = _relu_model()
    broken.opset_import[0].version = 7
    onnx.save_model(broken, str(tmp_path / "old.onnx"))
    done = _cli("compile", str(tmp_path / "old.onnx"), "-o", str(tmp_path / "out"))
    assert done.returncode == 2 and done.stderr.startswith("error: the model imports opset 7")
