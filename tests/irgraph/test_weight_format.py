"""Weight formats (irgraph/weight_format.py): the registry, fxforge::linear's weight_format
argument and its view field, and how a stored graph carries it."""
import pytest
import torch

from fxforge.irgraph import SerializationError, capture_export, ir_from_json, ir_to_json
from fxforge.irgraph.ops import fxforge_linear
from fxforge.irgraph.views import Linear, LinearOperands
from fxforge.irgraph.weight_format import (DENSE, FORMATS, WeightFormatError, decode, exactly_bf16,
                                           implemented_format, weight_format)
from fxforge.passes import PassManager
from fxforge.testing import assert_close_to_eager

QUANTIZED = ["int8_channel", "int8_g32", "int4_g32", "int4_g64", "int4_g128", "w8a8"]
SLOTS = ["q4_k", "q6_k"]


def test_the_registry_holds_dense_bf16_the_quantized_formats_and_the_slots():
    assert {DENSE, "bf16", *QUANTIZED, *SLOTS} == set(FORMATS)
    assert all(FORMATS[name].implemented for name in [DENSE, "bf16", *QUANTIZED])
    for name in SLOTS:   # data only: what the GGUF work fills
        fmt = FORMATS[name]
        assert not fmt.implemented and fmt.extras and fmt.bits in (4, 6, 8), name
    assert FORMATS["int8_channel"].extras == ("scales",) and FORMATS["int8_channel"].group == 0
    assert FORMATS["int4_g64"].extras == ("scales", "offsets") and FORMATS["int4_g64"].group == 64
    assert FORMATS["int8_g32"].bits_per_weight == 8.5 and FORMATS["int4_g32"].bits_per_weight == 5.0
    with pytest.raises(WeightFormatError, match="unknown weight format 'int3'.*'bf16'"):
        weight_format("int3")
    with pytest.raises(WeightFormatError, match="'q4_k'.*declared but not implemented"):
        implemented_format("q4_k")


def test_bf16_decodes_to_the_rounded_values_and_exactly_bf16_sees_one_value_off_the_grid():
    torch.manual_seed(11)
    weight = torch.randn(5, 7)
    rounded = decode(weight, "bf16")
    assert torch.equal(rounded, weight.to(torch.bfloat16).float()) and rounded.dtype == torch.float32
    assert decode(weight, DENSE) is weight
    assert exactly_bf16(rounded) and not exactly_bf16(weight)
    rounded[2, 3] += 2 ** -20 * rounded[2, 3].abs()          # one value off the bf16 grid
    assert not exactly_bf16(rounded)
    assert not exactly_bf16(rounded.to(torch.float16))       # fp32 weights only


@pytest.mark.parametrize("seed", [0, 1])
def test_the_op_computes_on_the_weight_in_its_format(seed):
    g = torch.Generator().manual_seed(seed)
    x, weight = torch.randn(6, 40, generator=g), torch.randn(40, 24, generator=g)
    bias, residual = torch.randn(24, generator=g), torch.randn(6, 24, generator=g)
    dense = torch.ops.fxforge.linear(x, weight, bias, "gelu", residual, None)
    assert torch.equal(dense, torch.ops.fxforge.linear(x, weight, bias, "gelu", residual, None, DENSE))
    assert_close_to_eager(dense, torch.nn.functional.gelu(torch.addmm(bias, x, weight)) + residual)
    got = torch.ops.fxforge.linear(x, weight, bias, "gelu", residual, None, "bf16")
    rounded = weight.to(torch.bfloat16).float()
    assert torch.equal(got, torch.ops.fxforge.linear(x, rounded, bias, "gelu", residual, None))
    assert not torch.equal(got, dense)


@pytest.mark.parametrize("name,match", [("q6_k", "'q6_k'.*declared but not implemented"),
                                        ("fp8", "unknown weight format 'fp8'")])
def test_the_op_refuses_a_format_it_cannot_run_naming_it(name, match):
    x, weight = torch.randn(2, 4), torch.randn(4, 3)
    with pytest.raises(ValueError, match=match):
        torch.ops.fxforge.linear(x, weight, None, "none", None, None, name)
    with pytest.raises(ValueError, match=match), torch._subclasses.FakeTensorMode():
        torch.ops.fxforge.linear(torch.empty(2, 4), torch.empty(4, 3), None, "none", None, None, name)


class _Mlp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _linear_ir():
    model = _Mlp().eval()
    ir = capture_export(model, (torch.randn(3, 16),))
    ir = PassManager(["fuse_epilogues"], verify_between=True, strict=True).run(ir)
    linears = [Linear.of(n) for n in ir.call_nodes() if n.target is fxforge_linear]
    assert len(linears) == 2
    return model, ir, linears


def test_the_view_reads_and_sets_the_format():
    _, ir, linears = _linear_ir()
    assert all(lin.weight_format == DENSE for lin in linears)
    assert LinearOperands.of(linears[0].node).weight_format == DENSE
    marked = linears[0].replace(weight_format="bf16")
    assert marked.weight_format == "bf16" and LinearOperands.of(marked.node).weight_format == "bf16"
    assert marked.activation == linears[0].activation and marked.weight is linears[0].weight
    args, kwargs = Linear.arguments(x=1, weight=2, bias=None, activation="none", residual=None,
                                    weight_format="bf16")
    assert args[-1] == "bf16" and args[5] is None and not kwargs   # out_dtype's default before it


def test_a_stored_graph_keeps_the_format_and_reads_as_eager():
    model, ir, linears = _linear_ir()
    linears[1].replace(weight_format="bf16")
    data = ir_to_json(ir)
    back = ir_from_json(data, dict(ir.constants()))
    formats = [Linear.of(n).weight_format for n in back.gm.graph.nodes if Linear.of(n) is not None]
    assert formats == [DENSE, "bf16"]
    x = torch.randn(5, 16)
    with torch.no_grad():
        got, = back.gm(x)
        rounded = model.down.weight.detach().to(torch.bfloat16).float()
        want = torch.nn.functional.linear(torch.relu(model.up(x)), rounded, model.down.bias)
    assert_close_to_eager(got, want)


def _linear_entries(data):
    return [e for e in data["nodes"] if e.get("target") == "fxforge.linear.default"]


def test_a_graph_stored_before_formats_loads_as_dense():
    _, ir, _ = _linear_ir()
    data = ir_to_json(ir)
    for entry in _linear_entries(data):
        entry["args"]["tuple"] = entry["args"]["tuple"][:6]      # the six-argument op of old
    back = ir_from_json(data, dict(ir.constants()))
    assert [Linear.of(n).weight_format for n in back.gm.graph.nodes
            if Linear.of(n) is not None] == [DENSE, DENSE]


@pytest.mark.parametrize("bad,match", [("q6_k", "'q6_k'.*declared but not implemented"),
                                       ("__import__('os')", "unknown weight format"),
                                       (7, "unknown weight format '7'")])
def test_a_stored_graph_with_a_format_this_fxforge_cannot_run_is_refused_naming_it(bad, match):
    _, ir, _ = _linear_ir()
    data = ir_to_json(ir)
    entry = _linear_entries(data)[0]
    entry["args"]["tuple"] = entry["args"]["tuple"][:6] + [bad]
    with pytest.raises(SerializationError, match=match):
        ir_from_json(data, dict(ir.constants()))
