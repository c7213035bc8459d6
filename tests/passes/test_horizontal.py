"""Horizontal fusion of projections sharing an input: what fuses, what must not, numerics."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from fxforge.irgraph import capture_export
from fxforge.passes import PassManager
from fxforge.testing import assert_close_to_eager

PIPELINE = ["remove_noops", "cse", "fuse_projections", "constant_fold", "cse", "dce"]


def run(model, inputs):
    model = model.eval()
    ir = capture_export(model, inputs)
    out = PassManager(PIPELINE, verify_between=True, strict=True).run(ir)
    with torch.no_grad():
        expected = model(*inputs)
        got = out.gm(*inputs)
        assert_close_to_eager(list(got) if isinstance(expected, tuple) else got[0],
                              list(expected) if isinstance(expected, tuple) else expected)
    stats = {s.name: s.counts for s in out.info["passes"]}
    return out, stats["fuse_projections"]


class QKV(nn.Module):
    def __init__(self, dim=32, kv=16):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, kv), nn.Linear(dim, kv)
        self.gate, self.up = nn.Linear(dim, 48, bias=False), nn.Linear(dim, 48, bias=False)

    def forward(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        h = (q[..., :16] * k + v).sum(-1, keepdim=True) + x
        return F.silu(self.gate(h)) * self.up(h)


def test_qkv_and_gate_up_become_one_matmul_each():
    ir, counts = run(QKV(), (torch.randn(2, 5, 32),))
    assert counts == {"projections_fused": 5, "groups_declined": 0}
    ops = ir.op_counts()
    assert ops["aten.addmm.default"] == 1 and ops["aten.mm.default"] == 1
    assert ops["aten.split_with_sizes.default"] == 2
    assert "aten.cat.default" not in ops  # the weight concatenations were folded
    shapes = sorted(tuple(c.shape) for c in ir.constants().values())
    assert (32, 64) in shapes and (32, 96) in shapes and (64,) in shapes


class NearMisses(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
        self.c = nn.Linear(8, 8, bias=False)
        self.d = nn.Linear(8, 8).double()

    def forward(self, x, y, w):
        return (self.a(x) + self.b(y)            # different inputs
                + x @ w + self.c(x)              # a runtime weight; mm vs addmm don't mix
                + self.d(x.double()).float())    # another dtype, another input


def test_near_misses_do_not_fuse():
    inputs = (torch.randn(3, 8), torch.randn(3, 8), torch.randn(8, 8))
    ir, counts = run(NearMisses(), inputs)
    assert counts == {"projections_fused": 0, "groups_declined": 0}
    assert "aten.split_with_sizes.default" not in ir.op_counts()


class Flattened(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 6, bias=False), nn.Linear(8, 4, bias=False)

    def forward(self, x):
        # view(-1) needs a contiguous input: a strided piece of the fused result is not one.
        return torch.ops.aten.view.default(self.a(x), [-1]), self.b(x)


def test_a_consumer_that_cannot_take_a_strided_piece_declines_the_group():
    ir, counts = run(Flattened(), (torch.randn(3, 8),))
    assert counts == {"projections_fused": 0, "groups_declined": 1}
    assert ir.op_counts()["aten.mm.default"] == 2
