"""The single-op ONNX sweep: every case of ``onnx_sweep_cases.CASES`` is a one-node model at
the op's current opset (the model imports opset 28; where ONNX Runtime lacks the op's newest
kernel there, the op's own since-version), run by ONNX Runtime (the reference) and by
``fxforge.from_onnx(model, compile=False)``; outputs must match in dtype, shape and value.
A representative subset also runs compiled (dynamo + the fxforge backend); the slow test
compiles the rest.

Every ai.onnx op is either swept, in ``UNSUPPORTED`` (checked to be refused with an
``OnnxImportError`` naming it, so the table cannot go stale) or in ``ELSEWHERE`` (imported and
tested by other files).
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx.defs
import pytest
import torch
from onnx import helper
from torch._dynamo.utils import counters

import fxforge
from fxforge.onnx import OnnxImportError, coverage_table
from tests.irgraph.onnx_sweep_cases import CASES, MS, Case

ort = pytest.importorskip("onnxruntime")

NEWEST = 28
MIN_SWEPT_OPS = 120

UNSUPPORTED: dict[str, str] = {
    **{op: "recurrent layer: export models with it unrolled or in torch" for op in
       ("RNN", "GRU", "LSTM", "Scan")},
    **{op: "sequence and optional types are not imported (tensors only)" for op in
       ("SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase", "SequenceInsert",
        "SequenceLength", "SequenceMap", "SplitToSequence", "ConcatFromSequence", "Optional",
        "OptionalGetElement", "OptionalHasElement")},
    **{op: "string tensors are not imported" for op in
       ("StringConcat", "StringNormalizer", "StringSplit", "RegexFullMatch", "TfIdfVectorizer")},
    **{op: "random op: an inference compiler does not reproduce its draws" for op in
       ("RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Bernoulli",
        "Multinomial")},
    **{op: "signal processing, not in transformer/CNN models" for op in
       ("DFT", "STFT", "MelWeightMatrix")},
    **{op: "detection op with data-dependent output, not imported" for op in
       ("NonMaxSuppression", "RoiAlign", "MaxRoiPool")},
    "MaxUnpool": "inverse of pooling indices: not in inference graphs fxforge targets",
    "Col2Im": "not in transformer/CNN inference graphs",
    "ImageDecoder": "decodes encoded image bytes",
    "DeformConv": "no ATen deformable convolution",
    "GridSample": "not yet converted (spatial transformers only)",
    "AffineGrid": "not yet converted (spatial transformers only)",
    "LinearAttention": "opset 27 linear attention with a recurrent state: not yet converted",
    "CausalConvWithState": "opset 27 stateful causal convolution: not yet converted",
    "BitCast": "opset 26 reinterpretation of bits between element types: not yet converted",
    "ConvInteger": "integer convolution: not yet converted",
    "QLinearConv": "quantized convolution: not yet converted",
    "com.microsoft::GroupQueryAttention": "KV cache, rotary and packed QKV in one op: not "
                                          "imported; export with the standard Attention op",
    "com.microsoft::MultiHeadAttention": "not yet converted",
    "SimplifiedLayerNormalization": "ONNX Runtime's contrib op in the default domain: the ONNX "
                                    "checker fxforge runs rejects it",
}
# Imported, and tested by their own files: control flow and quantization.
ELSEWHERE = {"If", "Loop", "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear",
             "MatMulInteger", "QLinearMatMul"}
# Representative cases that also run compiled in CI (the slow test compiles every case).
COMPILED_IN_CI = {
    "Conv", "ConvTranspose", "MaxPool", "AveragePool-uneven-count", "BatchNormalization",
    "LayerNormalization", "RMSNormalization", "GroupNormalization", "Attention",
    "Attention-gqa-3d-mask", "RotaryEmbedding", "Resize", "Resize-cubic", "Pad-reflect",
    "Split", "GatherND-batch", "ScatterND", "TopK", "CumSum-excl-rev", "Einsum",
    "ms.SkipLayerNormalization", "Gemm", "Softmax",
}


def _model(case: Case, opset: int) -> tuple[onnx.ModelProto, list[np.ndarray]]:
    rng = np.random.default_rng(CASES.index(case))
    names, graph_inputs, initializers, feeds = [], [], [], []
    for i, spec in enumerate(case.inputs):
        if spec is None:
            names.append("")
            continue
        value, name = spec.make(rng), f"in{i}"
        names.append(name)
        if spec.const:
            initializers.append(onnx.numpy_helper.from_array(value, name))
        else:
            graph_inputs.append(helper.make_tensor_value_info(
                name, helper.np_dtype_to_tensor_dtype(value.dtype), value.shape))
            feeds.append(value)
    outputs = [f"out{i}" for i in range(case.outputs)]
    node = helper.make_node(case.op, names, outputs, domain=case.domain, **case.attrs)
    untyped = [helper.make_value_info(o, onnx.TypeProto()) for o in outputs]
    graph = helper.make_graph([node], case.id, graph_inputs, untyped, initializers)
    imports = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(MS, 1)] if case.domain
                                                  else [])
    model = helper.make_model(graph, opset_imports=imports)
    return onnx.shape_inference.infer_shapes(model), feeds


def _typed(model: onnx.ModelProto, expected: list[np.ndarray]) -> onnx.ModelProto:
    """The outputs' types where shape inference gave none (function ops, com.microsoft ops),
    from the reference's results: fxforge's checker wants typed outputs."""
    for value, result in zip(model.graph.output, expected):
        tensor = value.type.tensor_type
        if not tensor.elem_type or not tensor.HasField("shape"):
            value.CopyFrom(helper.make_tensor_value_info(
                value.name, helper.np_dtype_to_tensor_dtype(result.dtype), result.shape))
    return model


def _reference_opsets(case: Case) -> list[int]:
    """The model's opset, then each older version of the op: ONNX Runtime lacks the newest
    kernels of a few ops (Swish, GlobalLpPool), whose newer versions only add types."""
    opset = case.opset or NEWEST
    if case.domain:
        return [opset]
    versions = [opset]
    while True:
        since = onnx.defs.get_schema(case.op, versions[-1], case.domain).since_version
        if since in versions:
            since -= 1
        if since < 13 or since in versions:
            return versions
        try:
            onnx.defs.get_schema(case.op, since, case.domain)
        except onnx.defs.SchemaError:
            return versions
        versions.append(since)


def _reference(case: Case) -> tuple[onnx.ModelProto, list[np.ndarray], list[np.ndarray]]:
    """The model at the case's opset (default 28), its inputs and the reference outputs, from
    the same model at the newest opset ONNX Runtime runs the op at."""
    model, feeds = _model(case, case.opset or NEWEST)
    if case.reference == "onnx":
        from onnx.reference import ReferenceEvaluator
        expected = list(ReferenceEvaluator(model).run(None, _named(model, feeds)))
        return _typed(model, expected), feeds, expected
    opsets = _reference_opsets(case)
    for opset in opsets:
        try:
            session = ort.InferenceSession(_model(case, opset)[0].SerializeToString(),
                                           providers=["CPUExecutionProvider"])
        except Exception as exc:   # ONNX Runtime lacks this version's kernel: an older one
            if "NOT_IMPLEMENTED" not in str(exc) or opset == opsets[-1]:
                raise
            continue
        expected = session.run(None, _named(model, feeds))
        return _typed(model, expected), feeds, expected
    raise AssertionError("unreachable")


def _named(model: onnx.ModelProto, feeds: list[np.ndarray]) -> dict:
    return {v.name: x for v, x in zip(model.graph.input, feeds)}


def _check(case: Case, got, expected: list[np.ndarray]) -> None:
    got = list(got) if isinstance(got, (tuple, list)) else [got]
    assert len(got) == len(expected), case.id
    for index, (ours, theirs) in enumerate(zip(got, expected)):
        theirs = torch.from_numpy(np.asarray(theirs).copy())
        where = f"{case.id} output {index}"
        assert ours.dtype == theirs.dtype, f"{where}: dtype {ours.dtype} vs {theirs.dtype}"
        assert ours.shape == theirs.shape, f"{where}: shape {list(ours.shape)} vs " \
                                           f"{list(theirs.shape)}"
        exact = not theirs.dtype.is_floating_point
        torch.testing.assert_close(ours, theirs, rtol=0 if exact else case.tol,
                                   atol=0 if exact else case.tol, equal_nan=True, msg=where)


def _run(case: Case, compile: bool) -> None:
    model, feeds, expected = _reference(case)
    inputs = [torch.from_numpy(x.copy()) for x in feeds]
    module = fxforge.from_onnx(model, compile=compile)
    with torch.no_grad():
        _check(case, module(*inputs), expected)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_op_matches_onnxruntime(case: Case):
    _run(case, compile=False)


COMPILED = [c for c in CASES if c.compiled and c.id in COMPILED_IN_CI]
SLOW_COMPILED = [c for c in CASES if c.compiled and c.id not in COMPILED_IN_CI]


@pytest.mark.parametrize("case", COMPILED, ids=[c.id for c in COMPILED])
def test_op_compiled_matches_onnxruntime(case: Case):
    torch._dynamo.reset()
    _run(case, compile=True)


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW_COMPILED, ids=[c.id for c in SLOW_COMPILED])
def test_op_compiled_matches_onnxruntime_all(case: Case):
    torch._dynamo.reset()
    _run(case, compile=True)


def test_compiled_subset_is_in_the_table():
    assert {c.id for c in COMPILED} == COMPILED_IN_CI


def _swept() -> set[str]:
    """Ops the sweep runs at their current opset (the opset-13 cases are extra)."""
    return {f"{c.domain}::{c.op}" if c.domain else c.op for c in CASES if c.opset is None}


def test_sweep_covers_enough_ops():
    # Every case above is a hard test (no skip, no xfail): when this file passes, each of these
    # ops matched ONNX Runtime at its current opset.
    swept = _swept()
    assert len(swept) >= MIN_SWEPT_OPS, f"{len(swept)} ops swept"
    assert not swept & set(UNSUPPORTED)


def test_every_onnx_op_is_swept_or_listed():
    ops = {s.name for s in onnx.defs.get_all_schemas() if s.domain in ("", "ai.onnx") and
           not s.deprecated and s.since_version <= NEWEST}
    missing = ops - _swept() - set(UNSUPPORTED) - ELSEWHERE
    assert not missing, f"ai.onnx ops neither swept nor listed UNSUPPORTED: {sorted(missing)}"


@pytest.mark.parametrize("qualified", sorted(UNSUPPORTED))
def test_unsupported_op_is_refused_by_name(qualified: str):
    domain, _, op = qualified.rpartition("::")
    node = helper.make_node(op, ["x"], ["y"], domain=domain)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", 1, [2])],
                              [helper.make_tensor_value_info("y", 1, [2])])
    imports = [helper.make_opsetid("", NEWEST)] + ([helper.make_opsetid(domain, 1)] if domain
                                                   else [])
    model = helper.make_model(graph, opset_imports=imports)
    with pytest.raises(OnnxImportError, match=f"::{op} "):
        fxforge.from_onnx(model, compile=False)


def test_coverage_table_lists_the_swept_ops():
    table = coverage_table()
    rows = {tuple(line.split()[:2]) for line in table.splitlines()[2:]}
    for name in _swept():
        domain, _, op = name.rpartition("::")
        assert ((domain or "ai.onnx"), op) in rows, name


def test_shape_chain_folds_for_dynamic_dims_compiled():
    # Shape -> Gather -> Unsqueeze -> Concat -> Reshape on a dynamic batch: the chain folds to
    # the symbolic size, so one compiled graph serves both batch sizes.
    const = onnx.numpy_helper.from_array
    nodes = [helper.make_node("Shape", ["x"], ["shape"]),
             helper.make_node("Gather", ["shape", "zero"], ["batch"], axis=0),
             helper.make_node("Unsqueeze", ["batch", "zero1"], ["batch1"]),
             helper.make_node("Concat", ["batch1", "rest"], ["target"], axis=0),
             helper.make_node("Reshape", ["x", "target"], ["flat"]),
             helper.make_node("Relu", ["flat"], ["y"])]
    graph = helper.make_graph(
        nodes, "dims", [helper.make_tensor_value_info("x", 1, ["batch", 4, 6])],
        [helper.make_tensor_value_info("y", 1, ["batch", 24])],
        [const(np.array(0, np.int64), "zero"), const(np.array([0], np.int64), "zero1"),
         const(np.array([24], np.int64), "rest")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", NEWEST)])
    _compiled_matches_at(model, [(2, 4, 6), (5, 4, 6)])


def _compiled_matches_at(model: onnx.ModelProto, shapes: list[tuple]) -> None:
    """The compiled model matches ONNX Runtime at each input shape, from one graph."""
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    torch._dynamo.reset()
    counters.clear()
    compiled = fxforge.from_onnx(model)
    for seed, shape in enumerate(shapes):
        x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
        expected = session.run(None, {model.graph.input[0].name: x})[0]
        with torch.no_grad():
            got = compiled(torch.from_numpy(x))
        torch.testing.assert_close(got, torch.from_numpy(expected))
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_resize_of_dynamic_axes_compiled(mode: str):
    # Whole scale factors resize dynamic axes: output sizes stay symbolic (h * 2).
    scales = onnx.numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    node = helper.make_node("Resize", ["x", "", "scales"], ["y"], mode=mode)
    graph = helper.make_graph(
        [node], "resize", [helper.make_tensor_value_info("x", 1, ["n", 3, "h", "w"])],
        [helper.make_tensor_value_info("y", 1, None)], [scales])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", NEWEST)])
    _compiled_matches_at(onnx.shape_inference.infer_shapes(model), [(2, 3, 4, 5), (3, 3, 6, 3)])
