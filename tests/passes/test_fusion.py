"""Vertical fusion groups: what groups, what must not, and that no group closes a cycle."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from fxforge.irgraph import capture_export, groups, to_networkx, would_create_cycle
from fxforge.passes import PassManager
from fxforge.testing import assert_close_to_eager
from tests.passes.helpers import Fn

PIPELINE = ["remove_noops", "cse", "constant_fold", "dce", "fuse_elementwise"]


def run(model, *inputs):
    model = model.eval()
    ir = capture_export(model, inputs)
    out = PassManager(PIPELINE, verify_between=True, strict=True).run(ir)
    with torch.no_grad():
        assert_close_to_eager(out.gm(*inputs)[0], model(*inputs))
    stats = {s.name: s.counts for s in out.info["passes"]}["fuse_elementwise"]
    found = {name: sorted(str(n.target).split(".")[1] for n in nodes
                          if n.op == "call_function" and "getitem" not in str(n.target))
             for name, nodes in groups(out).items()}
    nxg = to_networkx(out)
    for nodes in groups(out).values():
        assert not would_create_cycle(nxg, {n.name for n in nodes})
    return stats, sorted(found.values())


def test_residual_layernorm_is_one_group():
    ln = nn.LayerNorm(16)
    stats, found = run(Fn(lambda x, r: ln(x + r)), torch.randn(2, 3, 16), torch.randn(2, 3, 16))
    assert found == [["add", "native_layer_norm"]]
    assert stats["groups"] == 1


def test_rmsnorm_as_hf_writes_it_is_one_group():
    w = torch.randn(16)

    def rms(x):
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return w * h.to(x.dtype)

    stats, found = run(Fn(rms), torch.randn(2, 5, 16))
    assert len(found) == 1 and {"pow", "mean", "rsqrt", "mul", "add"} <= set(found[0])


def test_masked_softmax_and_gelu_tanh_chains():
    def f(s, m):
        return F.softmax(s * 0.125 + m, dim=-1)
    stats, found = run(Fn(f), torch.randn(1, 2, 8, 8), torch.randn(1, 1, 8, 8))
    assert found == [["_softmax", "add", "mul"]]
    stats, found = run(Fn(lambda x: F.gelu(x, approximate="tanh") * 2.0), torch.randn(4, 32))
    assert found == [["gelu", "mul"]]


def test_two_producer_groups_of_one_domain_merge():
    stats, found = run(Fn(lambda a, b: torch.exp(a * 2) + torch.sin(b * 3)), torch.randn(4, 8), torch.randn(4, 8))
    assert stats["groups"] == 1 and len(found[0]) == 5


def test_near_misses_do_not_fuse():
    # softmax over a non-last dim is no row reduction
    stats, found = run(Fn(lambda x: F.softmax(x * 2, dim=1)), torch.randn(3, 5, 7))
    assert found == []
    # a view between two elementwise ops ends the group
    stats, found = run(Fn(lambda x: (x * 2).view(4, 8).exp()), torch.randn(2, 16))
    assert found == []
    # a lone op is not a group
    stats, found = run(Fn(lambda x: x.exp()), torch.randn(4, 4))
    assert stats["groups"] == 0 and stats["left_single"] == 1


def test_no_cycle_through_a_matmul():
    w = torch.randn(8, 8)

    def f(x):
        a = torch.relu(x * 2)      # group candidate
        y = a @ w                  # outside any group, reads a
        return (a + y).exp()       # would join a's group: a cycle through the matmul

    stats, found = run(Fn(f), torch.randn(4, 8))
    assert ["mul", "relu"] in found and ["add", "exp"] in found


def test_hf_rotary_with_rotate_half_is_one_group():
    def rotate_half(x):
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    def rotary(q, cos, sin):
        q = q.transpose(1, 2)   # [B, T, H, D] -> [B, H, T, D]
        return q * cos + rotate_half(q) * sin

    q, cos, sin = torch.randn(2, 5, 3, 8), torch.randn(1, 1, 5, 8), torch.randn(1, 1, 5, 8)
    stats, found = run(Fn(rotary), q, cos, sin)
    assert found == [["add", "cat", "mul", "mul", "neg", "slice", "slice"]]
    assert stats["groups"] == 1


def test_slice_used_outside_the_cat_stays_out_of_groups():
    def fn(x, w):
        tail = x[..., 4:]
        return torch.cat((-tail, x[..., :4]), dim=-1) * w + tail.repeat(1, 2)

    stats, found = run(Fn(fn), torch.randn(3, 8), torch.randn(8))
    assert all("cat" not in ops and "slice" not in ops for ops in found)
