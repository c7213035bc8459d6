"""IR serialization round trip, and a loader that resolves only known ops."""
import json

import pytest
import torch

from fxforge.irgraph import SerializationError, capture_export, ir_from_json, ir_to_json
from fxforge.irgraph.serialize import resolve_target
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
    with pytest.raises(SerializationError, match="reads a file"):
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


# Ops that change process-wide state (the RNG, grad mode, autograd, plan caches) or reach
# outside the process, and TorchScript builtins that are not tensor operators at all.
STATEFUL_OPS = [
    "aten.manual_seed.default", "aten.set_grad_enabled.default", "aten.backward.default",
    "aten._backward.default", "aten.dist_backward.default", "aten.grad.default",
    "aten._cufft_set_plan_cache_max_size.default", "aten._cufft_clear_plan_cache.default",
    "aten.get_gradients.default", "aten._print.default", "aten.warn.default",
    "aten.to_here.default", "aten.mul.left_t", "aten.save.default", "aten.wait.default",
    "aten.from_file.default", "aten.set_.source_Tensor", "aten.record_stream.default",
]


@pytest.mark.parametrize("name", STATEFUL_OPS)
def test_ops_with_effects_beyond_their_results_are_refused(name):
    with pytest.raises(SerializationError, match=f"op '{name}'"):
        resolve_target(name)


# Every op target in the IRs fxforge writes to artifacts (the model zoo's and the test suite's),
# the runtime checks export inserts, and ordinary functional ATen ops.
IR_OPS = [
    "aten._softmax.default", "aten.add.Tensor", "aten.addmm.default", "aten.arange.start_step",
    "aten.bitwise_not.default", "aten.bmm.default", "aten.clone.default",
    "aten.embedding.default", "aten.expand.default", "aten.gelu.default", "aten.mm.default",
    "aten.mul.Tensor", "aten.native_layer_norm.default", "aten.permute.default",
    "aten.scalar_tensor.default", "aten.scaled_dot_product_attention.default",
    "aten.slice.Tensor", "aten.split_with_sizes.default", "aten.sym_size.int",
    "aten.view.default", "aten.where.self", "fxforge.cached_attention.default",
    "fxforge.linear.default", "aten._assert_scalar.default", "aten._assert_async.msg",
    "aten._assert_tensor_metadata.default", "aten.sym_constrain_range_for_size.default",
    "aten._local_scalar_dense.default", "aten.randn.default", "aten.empty.memory_format",
    "aten.cat.default", "aten.max.dim", "aten.topk.default", "aten.copy.default",
    "aten.__and__.Tensor",
]


@pytest.mark.parametrize("name", IR_OPS)
def test_the_ops_fxforge_ir_holds_resolve(name):
    assert str(resolve_target(name)._schema).startswith(name.split(".")[0] + "::")


def test_integer_arguments_must_fit_in_int64():
    ir, data = _tiny_json()
    call = next(e for e in data["nodes"] if e["op"] == "call_function")
    call["args"]["tuple"].append(2 ** 63)
    with pytest.raises(SerializationError, match="out of range"):
        ir_from_json(data, ir.constants())
    call["args"]["tuple"][-1] = -2 ** 63 - 1
    with pytest.raises(SerializationError, match="out of range"):
        ir_from_json(data, ir.constants())
    call["args"]["tuple"][-1] = -2 ** 63   # in range (the node then has too many arguments)
    assert ir_from_json(data, ir.constants()) is not None


@pytest.mark.parametrize("name", ["torch", "self", "inf", "nan", "device", "pytree",
                                  "fx_pytree", "NoneType"])
def test_node_names_that_shadow_the_generated_code_are_refused(name):
    ir, data = _tiny_json()
    text = json.dumps(data).replace('"input"', json.dumps(name)).replace('"x"', json.dumps(name))
    with pytest.raises(SerializationError, match=f"{name!r} is reserved"):
        ir_from_json(json.loads(text), ir.constants())


@pytest.mark.parametrize("name", ["graph", "code", "training", "forward", "_modules",
                                  "recompile", "state_dict"])
def test_constant_names_that_are_module_attributes_are_refused(name):
    ir, data = _tiny_json()
    constants = ir.constants()
    entry = next(e for e in data["nodes"] if e["op"] == "get_attr")
    constants[name] = constants.pop(entry["target"])
    entry["target"] = name
    with pytest.raises(SerializationError, match=f"constant name {name!r}"):
        ir_from_json(data, constants)
