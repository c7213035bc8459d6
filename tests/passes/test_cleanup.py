"""Each clean-up pass: the structure it promises (match counts, op counts) and the numbers."""
import pytest
import torch
import torch.nn as nn

from fxforge.irgraph import capture_export
from fxforge.passes import PassManager
from fxforge.testing import assert_close_to_eager

aten = torch.ops.aten


def run(model, inputs, passes, dynamic_shapes=None):
    """Capture, run ``passes``, check the result against eager; return the IR and its stats."""
    model = model.eval()
    ir = capture_export(model, inputs, dynamic_shapes=dynamic_shapes)
    out = PassManager(passes, verify_between=True, strict=True).run(ir)
    with torch.no_grad():
        expected = model(*inputs)
        got = out.gm(*inputs)
        assert_close_to_eager(list(got) if isinstance(expected, (tuple, list)) else got[0],
                              list(expected) if isinstance(expected, (tuple, list)) else expected)
    stats: dict = {}
    for s in out.info["passes"]:  # a pass that runs twice: its counts add up
        stats[s.name] = {k: stats.get(s.name, {}).get(k, 0) + v for k, v in s.counts.items()}
    return out, stats


class Fn(nn.Module):
    def __init__(self, fn, **weights):
        super().__init__()
        self.fn = fn
        for name, value in weights.items():
            self.register_parameter(name, nn.Parameter(value, requires_grad=False))

    def forward(self, *args):
        return self.fn(self, *args)


def test_dce_drops_unused_branches_and_constants():
    model = Fn(lambda m, x: x.sin() + m.w, w=torch.randn(4)).eval()
    x = torch.randn(3, 4)
    ir = capture_export(model, (x,))
    placeholder = ir.placeholders()[0]
    const = ir.add_constant("unused", torch.randn(4), before=ir.output_node())
    with ir.graph.inserting_before(ir.output_node()):  # a dead branch: cos(x) * unused
        cos = ir.graph.call_function(aten.cos.default, (placeholder,))
        dead = ir.graph.call_function(aten.mul.Tensor, (cos, const))
    ir.infer(cos), ir.infer(dead)
    out = PassManager(["dce"], verify_between=True, strict=True).run(ir)
    assert out.info["passes"][-1].counts == {"nodes_removed": 3, "constants_removed": 1}
    assert set(out.op_counts()) == {"aten.sin.default", "aten.add.Tensor"}
    assert "unused" not in out.constants() and len(out.constants()) == 1
    assert_close_to_eager(out.gm(x)[0], model(x))


def test_cse_merges_pure_calls_but_not_random_ones():
    model = Fn(lambda m, x: x.exp() * 2 + x.exp() + torch.relu(x) * torch.relu(x))
    ir, stats = run(model, (torch.randn(5, 3),), ["cse", "dce"])
    assert stats["cse"]["merged"] == 2
    assert ir.op_counts()["aten.exp.default"] == 1 and ir.op_counts()["aten.relu.default"] == 1
    noisy = Fn(lambda m, x: torch.rand_like(x) + torch.rand_like(x))
    ir = capture_export(noisy, (torch.randn(3),))
    out = PassManager(["cse"], verify_between=True, strict=True).run(ir)
    assert out.info["passes"][-1].counts["merged"] == 0


def test_noop_views_clones_and_casts_are_removed():
    def fn(m, x):
        y = x.clone().view(x.shape).to(torch.float32).contiguous()[:, :]
        return (y.permute(0, 1) + 1).reshape(6, 4)
    ir, stats = run(Fn(fn), (torch.randn(6, 4),), ["remove_noops", "dce"])
    assert stats["remove_noops"]["identity"] >= 4
    assert set(ir.op_counts()) == {"aten.add.Tensor"}  # the final reshape of an intermediate too


def test_layout_changing_clone_and_output_aliases_are_kept():
    # Near misses: the clone makes a transposed tensor contiguous before a view; the last clone
    # is a graph output, and removing it would make the output alias the input.
    def fn(m, x):
        return x.t().contiguous().view(-1) * 2, x.clone()
    model = Fn(fn).eval()
    x = torch.randn(3, 5)
    ir = capture_export(model, (x,))
    out = PassManager(["remove_noops"], verify_between=True, strict=True).run(ir)
    assert out.op_counts()["aten.clone.default"] == 2
    got = out.gm(x)
    assert_close_to_eager(list(got), list(model(x)))
    assert got[1].data_ptr() != x.data_ptr()


def test_weight_only_subgraphs_fold_once():
    def fn(m, x):
        w = (m.w * 2 + 1).to(torch.float64).t().contiguous()
        return x.double() @ w + m.b.exp()
    model = Fn(fn, w=torch.randn(4, 3), b=torch.randn(4))
    x = torch.randn(2, 3)
    ir, stats = run(model, (x,), ["constant_fold", "dce"])
    assert stats["constant_fold"]["folded"] == 2  # the cast+transposed copy of w, and exp(b)
    counts = ir.op_counts()
    assert "aten.exp.default" not in counts and "aten.mul.Tensor" not in counts
    assert counts.get("aten.mm.default") == 1


def test_views_and_blowups_of_weights_are_not_materialised():
    def fn(m, x):
        return x + m.w.t() + m.v.expand(512, 512)
    model = Fn(fn, w=torch.randn(512, 512), v=torch.randn(1, 512))
    ir, stats = run(model, (torch.randn(512, 512),), ["constant_fold", "dce"])
    assert stats["constant_fold"]["folded"] == 0
    assert ir.op_counts()["aten.expand.default"] == 1
    assert sum(c.numel() for c in ir.constants().values()) == 512 * 512 + 512


class Masked(nn.Module):
    def forward(self, x):
        t = x.shape[1]
        mask = torch.ones(t, t).tril()
        return x @ mask + torch.ones(4, 4).tril().sum()


def test_dynamic_shapes_block_folding_of_shape_dependent_factories():
    seq = torch.export.Dim("seq", min=2, max=64)
    ir, stats = run(Masked(), (torch.randn(3, 8),), ["constant_fold", "dce"], dynamic_shapes=({1: seq},))
    # Folded: the static 4x4 mask's sum and the scalar fill value; the s x s mask stays.
    assert stats["constant_fold"]["folded"] == 2
    assert ir.op_counts().get("aten.arange.start_step") == 2 and "aten.sum.dim_IntList" not in ir.op_counts()
    y = torch.randn(3, 17)
    assert_close_to_eager(ir.gm(y)[0], Masked()(y))


@pytest.mark.parametrize("seed", range(3))
def test_default_pipeline_is_lossless_on_a_small_gpt(seed):
    from fxforge.examples.small_gpt import example_inputs, make_model
    from fxforge.passes import default_pipeline
    model = make_model(seed=seed, n_layer=2)
    ir, stats = run(model, example_inputs(batch=2, seq=24, seed=seed), default_pipeline({}))
    assert stats["constant_fold"]["folded"] >= 1  # the causal mask slice


class FactoryOutputs(nn.Module):
    def forward(self, x):
        return x + 1, torch.arange(3.0), torch.ones(2, 2).view(4), x + 1


def test_outputs_never_share_memory_with_folded_constants_or_each_other():
    # Folded factory outputs are copied per call; CSE keeps two equal outputs two tensors.
    model = FactoryOutputs()
    x = torch.randn(3)
    ir, stats = run(model, (x,), ["constant_fold", "cse", "remove_noops", "dce"])
    assert stats["constant_fold"]["folded"] == 2
    first, second = ir.gm(x), ir.gm(x)
    first[1].add_(10), first[2].add_(10)
    assert_close_to_eager(list(second), list(model(x)))
    assert_close_to_eager(list(ir.gm(x)), list(model(x)))
    assert first[0].data_ptr() != first[3].data_ptr()


class SplitCopy(nn.Module):
    def forward(self, x):
        return torch.split_with_sizes_copy(x, [1, 3, 1])


def test_noop_removal_follows_views_through_multi_output_ops():
    x = torch.randn(5, 2)
    ir, _ = run(SplitCopy(), (x,), ["remove_noops", "dce"])
    storage = x.untyped_storage().data_ptr()
    assert all(out.untyped_storage().data_ptr() != storage for out in ir.gm(x))


class CloneThenView(nn.Module):
    def forward(self, x):
        return x.clone().view(-1), x.to(torch.float32, copy=True).t()


def test_a_copy_whose_view_is_an_output_is_kept():
    x = torch.randn(2, 3)
    ir, _ = run(CloneThenView(), (x,), ["remove_noops", "dce"])
    outs = ir.gm(x)
    assert all(o.untyped_storage().data_ptr() != x.untyped_storage().data_ptr() for o in outs)


def _rms_with_eps_input(self, x, eps):
    variance = x.pow(2).mean(-1, keepdim=True)
    scaled_eps = eps * 3.0                       # 0-d float64 math: must stay float64
    return self.w * (x * torch.rsqrt(variance + eps)), x * scaled_eps


def test_narrow_scalar_inputs_casts_a_0d_float64_input_once_and_exactly():
    """dynamo passes a float attribute that differs between models (an RMSNorm's eps) as a 0-d
    float64 input; fp32 ops that read it compute in fp32 anyway, so one cast at the top gives
    the same bits, and lets the norm fuse (the fused kernels hold no float64)."""
    model = Fn(_rms_with_eps_input, w=torch.randn(16))
    x, eps = torch.randn(3, 16), torch.tensor(1e-6, dtype=torch.float64)
    ir, stats = run(model, (x, eps), ["narrow_scalar_inputs"])
    assert stats["narrow_scalar_inputs"] == {"inputs": 1, "uses": 1}
    casts = [n for n in ir.call_nodes() if n.target is aten._to_copy.default]
    assert len(casts) == 1 and casts[0].args[0].op == "placeholder"
    f64_users = [u for u in casts[0].args[0].users if u is not casts[0]]
    assert f64_users and all(u.meta["val"].dtype == torch.float64 for u in f64_users)
    with torch.no_grad():
        for got, want in zip(ir.gm(x, eps), model(x, eps)):
            assert torch.equal(got, want)        # bit for bit: the cast ATen does anyway


def test_a_norm_with_an_eps_input_fuses_on_the_cpu_backend():
    import fxforge
    from fxforge.compiler import recording
    model = Fn(lambda self, x, eps: self.w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)),
               w=torch.randn(64))
    x, eps = torch.randn(5, 64), torch.tensor(1e-5, dtype=torch.float64)
    with recording() as graphs, torch.no_grad():
        got = torch.compile(model, backend="fxforge", options={"backend": "cpu"})(x, eps)
    assert_close_to_eager(got, model(x, eps))
    paths = [c.path for g in graphs for c in g.lowered.choices]
    assert any("generated C++" in p for p in paths) and not any("fallback" in p for p in paths)
