"""The declarative matcher: op sets, commutative operands, captures, literals, predicates,
single use, rule tables combined with ``+``, rewriting to a fixed point with counts."""
import math

import pytest
import torch

from fxforge.irgraph import capture_export, verify
from fxforge.irgraph.pattern import (ANY, Lit, Op, Pat, PatternMatcher, graph_rewrite, has_dtype,
                                    has_rank)
from fxforge.testing import assert_close_to_eager
from tests.passes.helpers import Fn

aten = torch.ops.aten
sigmoid, tanh, neg = Op(aten.sigmoid.default), Op(aten.tanh.default), Op(aten.neg.default)
X = Pat.var("x")


def capture(fn, *inputs):
    return capture_export(Fn(fn).eval(), inputs)


def rewrite(ir, matcher, **kwargs):
    counts = graph_rewrite(ir, matcher, **kwargs)
    ir.recompile()
    verify(ir)
    return counts


def to_silu(m):
    return m.call(aten.silu.default, m.x)


def calls(ir, name):
    return ir.op_counts().get(f"aten.{name}", 0)


def test_commutative_operands_match_either_order_and_a_capture_binds_one_node():
    def fn(a, b):
        return a * torch.sigmoid(a), torch.sigmoid(b) * b, a * torch.sigmoid(b)  # last: near miss
    a, b = torch.randn(3, 5), torch.randn(3, 5)
    ir = capture(fn, a, b)
    assert rewrite(ir, PatternMatcher([(X * sigmoid(X), to_silu)])) == {"to_silu": 2}
    assert calls(ir, "silu.default") == 2 and calls(ir, "sigmoid.default") == 1
    assert_close_to_eager(list(ir.gm(a, b)), list(fn(a, b)))

    in_order = Pat(aten.mul.Tensor, (X, sigmoid(X)))  # not commutative: only a * sigmoid(a)
    assert rewrite(capture(fn, a, b), PatternMatcher([(in_order, to_silu)])) == {"to_silu": 1}


def test_gelu_tanh_reads_like_the_math_and_matches_any_operand_order():
    expr = 0.5 * X * (1 + tanh(math.sqrt(2 / math.pi) * (X + 0.044715 * X ** 3)))
    c = math.sqrt(2.0 / math.pi)

    def fn(h):
        textbook = 0.5 * h * (1.0 + torch.tanh(c * (h + 0.044715 * torch.pow(h, 3.0))))
        swapped = (torch.tanh((0.044715 * h ** 3 + h) * c) + 1.0) * (h * 0.5)
        other_constant = 0.5 * h * (1.0 + torch.tanh(c * (h + 0.05 * torch.pow(h, 3.0))))
        return textbook, swapped, other_constant

    def to_gelu(m):
        return m.call(aten.gelu.default, m.x, approximate="tanh")
    h = torch.randn(4, 8)
    ir = capture(fn, h)
    assert rewrite(ir, PatternMatcher([(expr, to_gelu)])) == {"to_gelu": 2}
    assert calls(ir, "gelu.default") == 2 and calls(ir, "tanh.default") == 1
    assert_close_to_eager(list(ir.gm(h)), list(fn(h)))


def test_op_sets_overload_packets_and_named_arguments():
    def fn(x):
        return torch.relu(x), torch.sigmoid(x), torch.nn.functional.gelu(x, approximate="tanh"), x.exp()
    x = torch.randn(6)
    seen = []

    def record(m):
        seen.append(m.root.target)
    either = Pat({aten.relu.default, aten.sigmoid.default})
    packet = Pat(aten.exp)                                  # any overload of exp
    tanh_gelu = Op(aten.gelu.default)(X, approximate="tanh")
    erf_gelu = Op(aten.gelu.default)(X, approximate="none")
    assert rewrite(capture(fn, x), PatternMatcher([(p, record) for p in (either, packet, tanh_gelu, erf_gelu)])) == {}
    assert sorted(map(str, seen)) == ["aten.exp.default", "aten.gelu.default", "aten.relu.default",
                                      "aten.sigmoid.default"]
    ir = capture(fn, x)
    act = (Pat(aten.relu.default) | Pat(aten.sigmoid.default)).named("act")
    matched = [m["act"].target for m in map(act.match, ir.call_nodes()) if m is not None]
    assert matched == [aten.relu.default, aten.sigmoid.default]


def test_literals_match_up_to_rounding_and_any_matches_anything():
    ir = capture(lambda x: (x * 0.5000001, x * 0.6, x * x), torch.randn(4))
    nodes = [n for n in ir.call_nodes() if n.target is aten.mul.Tensor]
    half = Pat(aten.mul.Tensor, (X, Lit(0.5)))
    assert [half.match(n) is not None for n in nodes] == [True, False, False]
    anything = Pat(aten.mul.Tensor, (X, ANY))
    assert all(anything.match(n) is not None for n in nodes)
    assert Pat(aten.mul.Tensor, (X, X)).match(nodes[2])["x"] is nodes[2].all_input_nodes[0]


def test_predicates_see_the_metadata():
    def fn(x):
        xd, xt = x.double(), x.t()
        return x * torch.sigmoid(x), xd * torch.sigmoid(xd), xt * torch.sigmoid(xt)
    x = torch.randn(3, 5)
    fp32 = Pat.var("x", where=has_dtype(torch.float32))
    ir = capture(fn, x)
    assert rewrite(ir, PatternMatcher([(fp32 * sigmoid(fp32), to_silu)])) == {"to_silu": 2}
    assert calls(ir, "silu.default") == 2
    transposed = Pat.var("x", where=[has_dtype(torch.float32), lambda n: n.target is aten.permute.default])
    assert rewrite(capture(fn, x), PatternMatcher([(transposed * sigmoid(transposed), to_silu)])) == {"to_silu": 1}
    assert rewrite(capture(fn, x), PatternMatcher([(Pat(aten.mul.Tensor, where=has_rank(3)), to_silu)])) == {}


def test_single_use_inner_values():
    def fn(x):
        s = torch.sigmoid(x)
        return x * s, s + 1   # s is read outside ``x * s``
    x = torch.randn(4)
    assert rewrite(capture(fn, x), PatternMatcher([((X * sigmoid(X)).inner_single_use(), to_silu)])) == {}
    assert rewrite(capture(fn, x), PatternMatcher([(X * sigmoid(X), to_silu)])) == {"to_silu": 1}
    for graph_fn, inside in ((fn, False), (lambda x: x * torch.sigmoid(x), True)):
        ir = capture(graph_fn, x)
        m = (X * sigmoid(X)).match(next(n for n in ir.call_nodes() if n.target is aten.mul.Tensor))
        sig = next(n for n in m.nodes if n.target is aten.sigmoid.default)
        assert m.read_only_inside(sig) is inside and not m.read_only_inside(m.root)
    # a capture is a leaf: its other users do not matter
    ir = capture(lambda x: (x * torch.sigmoid(x), x + 1), x)
    assert rewrite(ir, PatternMatcher([((X * sigmoid(X)).inner_single_use(), to_silu)])) == {"to_silu": 1}


def double(m):
    return m.call(aten.mul.Tensor, m.x, 2)


def fold(m):
    return m.call(aten.mul.Tensor, m.x, 4)


DOUBLE = PatternMatcher([(Pat(aten.add.Tensor, (X, X)), double)])
FOLD = PatternMatcher([(Pat(aten.mul.Tensor, (Pat(aten.mul.Tensor, (X, 2)), 2)), fold)])


def test_tables_combine_and_rewrite_to_a_fixed_point_with_counts():
    def fn(x):
        y = x + x
        return y + y
    x = torch.randn(5)
    ir = capture(fn, x)
    # sweep 1 doubles both adds (the new mul is made before the second add); sweep 2 folds
    # the product of the two muls the first sweep made; sweep 3 finds nothing
    assert rewrite(ir, DOUBLE + FOLD) == {"double": 2, "fold": 1}
    assert calls(ir, "mul.Tensor") == 1 and calls(ir, "add.Tensor") == 0
    assert torch.equal(ir.gm(x)[0], fn(x))
    assert rewrite(capture(fn, x), DOUBLE + FOLD, max_sweeps=1) == {"double": 2}


def test_rules_in_table_order_and_a_declining_rule_leaves_nothing_behind():
    tried = []

    def declines(m):
        tried.append("declines")
        m.call(aten.neg.default, m.x)   # made, then dropped when the rule returns None
        return None

    def cancels(m):
        tried.append("cancels")
        return m.x
    ir = capture(lambda x: -(-x), torch.randn(3))
    table = PatternMatcher([(neg(neg(X)), declines)]) + PatternMatcher([(neg(neg(X)), cancels)])
    assert rewrite(ir, table) == {"cancels": 1}
    assert tried == ["declines", "cancels"]
    assert "aten.neg.default" not in ir.op_counts()


def test_a_replacement_of_another_type_is_refused_and_a_root_needs_an_op():
    ir = capture(lambda x: x * torch.sigmoid(x), torch.randn(4))
    with pytest.raises(AssertionError, match="replaced float32\\[4\\] with float32\\[\\]"):
        graph_rewrite(ir, PatternMatcher([(X * sigmoid(X), lambda m: m.call(aten.sum.default, m.x))]))
    with pytest.raises(ValueError, match="root op"):
        PatternMatcher([(Pat.var("x"), to_silu)])
    with pytest.raises(ValueError, match="two src"):
        Pat(aten.neg.default, (X,), commutative=True)
