"""The pattern-rewrite utility: torch-code patterns, checks that decline, counted matches."""
import pytest
import torch
import torch.nn as nn

from fxforge.irgraph import TensorMeta, capture_export, verify
from fxforge.passes import Rewrite, RuleTable
from fxforge.passes.pattern import Match
from fxforge.testing import assert_close_to_eager

aten = torch.ops.aten


class SiluTwice(nn.Module):
    def forward(self, x, y):
        a = x * torch.sigmoid(x)          # matches
        yd = y.double()
        b = yd * torch.sigmoid(yd)        # matches only if the check allows float64
        c = x * torch.sigmoid(y)          # near miss: different inputs
        return a + c, b


def silu_rewrite(check=None):
    return Rewrite("x_sigmoid_to_silu", pattern=lambda x: x * torch.sigmoid(x),
                   replacement=lambda x: torch.nn.functional.silu(x),
                   example_inputs=lambda: (torch.randn(4),), check=check)


def _capture():
    model = SiluTwice().eval()
    inputs = (torch.randn(3, 5), torch.randn(3, 5))
    return model, inputs, capture_export(model, inputs)


def test_rewrite_matches_each_occurrence_and_stays_exact():
    model, inputs, ir = _capture()
    assert silu_rewrite().apply(ir) == 2
    ir.recompile()
    verify(ir)
    assert ir.op_counts()["aten.silu.default"] == 2
    assert ir.op_counts()["aten.sigmoid.default"] == 1  # the near miss is untouched
    assert_close_to_eager(list(ir.gm(*inputs)), list(model(*inputs)))


def test_check_sees_matched_metadata_and_can_decline():
    seen = []

    def only_fp32(match: Match) -> bool:
        meta = match.meta(next(iter(match.inputs)))
        seen.append(meta)
        return isinstance(meta, TensorMeta) and meta.dtype == torch.float32

    model, inputs, ir = _capture()
    assert silu_rewrite(only_fp32).apply(ir) == 1
    assert {m.dtype for m in seen} == {torch.float32, torch.float64}
    ir.recompile()
    verify(ir)
    assert_close_to_eager(list(ir.gm(*inputs)), list(model(*inputs)))


def test_a_replacement_that_changes_the_result_type_is_refused():
    bad = Rewrite("bad", pattern=lambda x: x * torch.sigmoid(x),
                  replacement=lambda x: torch.nn.functional.silu(x).sum(),
                  example_inputs=lambda: (torch.randn(4),))
    _, _, ir = _capture()
    with pytest.raises(AssertionError, match="replaced"):
        bad.apply(ir)


def test_rule_table_counts_and_declines():
    table = RuleTable()

    @table.add(aten.neg.default, "double_negation")
    def double_neg(node, ir):
        inner = node.args[0]
        if getattr(inner, "target", None) is aten.neg.default:
            return inner.args[0]
        return None

    class Negs(nn.Module):
        def forward(self, x):
            return (-(-x)) + (-x)

    x = torch.randn(4)
    ir = capture_export(Negs(), (x,))
    counts = table.apply(ir)
    ir.recompile()
    verify(ir)
    assert counts == {"double_negation": 1}
    assert ir.op_counts()["aten.neg.default"] == 1
    assert_close_to_eager(ir.gm(x)[0], Negs()(x))
