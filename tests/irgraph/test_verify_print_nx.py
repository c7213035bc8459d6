"""The verifier catches broken invariants; the printer and networkx view describe the graph."""
import pytest
import torch
import torch.nn as nn

from fxforge.irgraph import (IRVerificationError, META_KEY, capture_export, format_ir,
                             to_networkx, verify, would_create_cycle)


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return torch.relu(self.lin(x)) + x.sin()


def _ir():
    return capture_export(Small().eval(), (torch.randn(4, 8),))


def test_a_well_formed_graph_verifies():
    verify(_ir())


def test_missing_and_stale_metadata_are_reported():
    ir = _ir()
    relu = next(n for n in ir.call_nodes() if "relu" in str(n.target))
    del relu.meta[META_KEY]
    with pytest.raises(IRVerificationError, match="no typed metadata"):
        verify(ir)
    ir = _ir()
    sin = next(n for n in ir.call_nodes() if "sin" in str(n.target))
    sin.meta["val"] = torch.empty(3, 3, device="meta")
    with pytest.raises(IRVerificationError, match="disagrees"):
        verify(ir)


def test_mutation_and_bad_order_are_reported():
    ir = _ir()
    sin = next(n for n in ir.call_nodes() if "sin" in str(n.target))
    sin.target = torch.ops.aten.sin_.default
    with pytest.raises(IRVerificationError, match="mutating op"):
        verify(ir)
    verify(ir, allow_mutation=True)
    ir = _ir()
    relu = next(n for n in ir.call_nodes() if "relu" in str(n.target))
    ir.output_node().append(relu)  # a node after the output, after its own users
    with pytest.raises(IRVerificationError):
        verify(ir)


def test_constant_that_disagrees_with_its_metadata_is_reported():
    ir = _ir()
    name = next(iter(ir.constants()))
    setattr(ir.gm, name, torch.zeros(1))
    with pytest.raises(IRVerificationError, match="constant"):
        verify(ir)


def test_printer_shows_ops_and_shapes():
    text = format_ir(_ir())
    assert "input  %x: float32[4,8]" in text
    assert "aten.addmm.default(" in text and "aten.relu.default" in text
    assert text.splitlines()[-1].strip().startswith("return")


def test_networkx_view_and_cycle_check():
    ir = _ir()
    g = to_networkx(ir)
    assert g.number_of_nodes() == len(ir.gm.graph.nodes)
    relu = next(n.name for n in ir.call_nodes() if "relu" in str(n.target))
    add = next(n.name for n in ir.call_nodes() if n.target == torch.ops.aten.add.Tensor)
    sin = next(n.name for n in ir.call_nodes() if "sin" in str(n.target))
    assert g.has_edge(relu, add) and g.has_edge(sin, add)
    addmm = next(n.name for n in ir.call_nodes() if "addmm" in str(n.target))
    assert not would_create_cycle(g, {addmm, relu})
    assert would_create_cycle(g, {addmm, add})  # the path addmm -> relu -> add leaves the group
