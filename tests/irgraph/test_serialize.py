"""IR serialization round trip, and a loader that resolves only known ops."""
import json

import pytest
import torch

from fxforge.irgraph import SerializationError, capture_export, ir_from_json, ir_to_json
from fxforge.examples.small_gpt import example_inputs, make_model
from fxforge.testing import assert_close_to_eager


def test_round_trip_runs_the_same_with_dynamic_shapes():
    model = make_model(seed=1, n_layer=2)
    (idx,) = example_inputs(batch=2, seq=12)
    seq = torch.export.Dim("seq", min=2, max=100)
    ir = capture_export(model, (idx,), dynamic_shapes=({1: seq},))
    data = json.loads(json.dumps(ir_to_json(ir)))
    loaded = ir_from_json(data, ir.constants())
    assert [n.op for n in loaded.gm.graph.nodes] == [n.op for n in ir.gm.graph.nodes]
    for node_a, node_b in zip(ir.gm.graph.nodes, loaded.gm.graph.nodes):
        assert node_a.meta.get("fxf") == node_b.meta.get("fxf"), node_a.name
    for seq_len in (12, 31):
        x = torch.randint(0, 512, (2, seq_len))
        with torch.no_grad():
            assert_close_to_eager(loaded.gm(x), ir.gm(x))


def _tiny_json():
    ir = capture_export(torch.nn.Linear(4, 4), (torch.randn(2, 4),))
    return ir, ir_to_json(ir)


def test_unknown_ops_and_python_callables_are_refused():
    ir, data = _tiny_json()
    call = next(e for e in data["nodes"] if e["op"] == "call_function")
    call["target"] = "aten.no_such_op.default"
    with pytest.raises(SerializationError, match="unknown op"):
        ir_from_json(data, ir.constants())
    for target in ("os.system", "builtins.exec", "torch.load", "math.factorial",
                   "operator.attrgetter", "prims.add.default", "import_module.__call__.__call__",
                   "aten.__class__.__call__"):
        call["target"] = target
        with pytest.raises(SerializationError, match="not one fxforge loads"):
            ir_from_json(data, ir.constants())
    call["target"] = "aten.from_file.default"
    with pytest.raises(SerializationError, match="outside the graph"):
        ir_from_json(data, ir.constants())
    call["target"] = "aten.add_.Tensor"
    with pytest.raises(SerializationError, match="writes to its arguments"):
        ir_from_json(data, ir.constants())


def test_missing_constant_and_format_are_reported():
    ir, data = _tiny_json()
    with pytest.raises(SerializationError, match="missing from the weights"):
        ir_from_json(data, {})
    data["format"] = 999
    with pytest.raises(SerializationError, match="format"):
        ir_from_json(data, ir.constants())
