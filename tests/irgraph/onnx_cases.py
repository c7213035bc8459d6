"""Helpers of the ONNX import tests: single-graph models built with ``onnx.helper`` and ONNX
Runtime as the reference (its graph optimizations off: some of them quantize activations, so
only the plain kernels give the model's own meaning)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx
import torch
from onnx import TensorProto as T
from onnx import helper, numpy_helper

ort = __import__("pytest").importorskip("onnxruntime")


def model_of(nodes: Sequence[onnx.NodeProto], inputs: Sequence[tuple], outputs: Sequence[tuple],
             initializers: Sequence[onnx.TensorProto] = (), opset: int = 21,
             ms_domain: bool = False) -> onnx.ModelProto:
    """``inputs``/``outputs``: (name, elem type, shape with ints or names)."""
    graph = helper.make_graph(list(nodes), "case",
                              [helper.make_tensor_value_info(*i) for i in inputs],
                              [helper.make_tensor_value_info(*o) for o in outputs],
                              initializer=list(initializers))
    opsets = [helper.make_opsetid("", opset)]
    if ms_domain:
        opsets.append(helper.make_opsetid("com.microsoft", 1))
    return helper.make_model(graph, opset_imports=opsets)


def run_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def as_list(out) -> list[torch.Tensor]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def assert_matches_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray], module,
                       rtol: float = 1e-5, atol: float = 1e-5) -> None:
    want = run_ort(model, feeds)
    got = as_list(module(*[torch.from_numpy(v) for v in feeds.values()]))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        expected = torch.from_numpy(np.asarray(w))
        assert g.dtype == expected.dtype, (g.dtype, expected.dtype)
        torch.testing.assert_close(g.detach(), expected, rtol=rtol, atol=atol)


def tensor(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(array, name)


__all__ = ["T", "as_list", "assert_matches_ort", "helper", "model_of", "run_ort", "tensor"]
