"""Epilogue fusion: what folds into fxforge.linear, the near misses that must not, numerics."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxforge.compiler
import fxforge.passes.epilogue  # noqa: F401  (registers fuse_epilogues)
from fxforge.examples import hf_models, small_gpt
from fxforge.irgraph import capture_export
from fxforge.irgraph.views import Linear
from fxforge.passes import PassManager
from fxforge.testing import assert_close_to_eager

PIPELINE = ["remove_noops", "cse", "fuse_projections", "fuse_epilogues", "constant_fold", "cse", "dce"]
# The unit modules below apply several linears to one input: keep them apart.
UNFUSED = [p for p in PIPELINE if p != "fuse_projections"]


def run(model, inputs, exact=True, passes=UNFUSED):
    """Capture, run ``passes``, compare with eager (bit for bit if ``exact``)."""
    model = model.eval()
    ir = capture_export(model, inputs)
    out = PassManager(passes, verify_between=True, strict=True).run(ir)
    with torch.no_grad():
        expected = model(*inputs)
        got = out.gm(*inputs)
    expected = list(expected) if isinstance(expected, tuple) else [expected]
    assert_close_to_eager(list(got), expected)
    if exact:
        assert all(torch.equal(g, e) for g, e in zip(got, expected))
    return out, {s.name: s.counts for s in out.info["passes"]}["fuse_epilogues"]


def linears(ir):
    return [view for view in map(Linear.of, ir.gm.graph.nodes) if view is not None]


class Epilogues(nn.Module):
    """One linear per epilogue shape: act + residual + cast, then each activation alone."""

    def __init__(self, dim=16):
        super().__init__()
        self.fc = nn.ModuleList(nn.Linear(dim, dim) for _ in range(4))
        self.plain = nn.Linear(dim, dim, bias=False)

    def forward(self, x, r):
        full = (r + F.silu(self.fc[0](x))).to(torch.float64)        # residual on the left
        gelu = F.gelu(self.fc[1](x), approximate="tanh")
        relu = torch.relu(self.fc[2](x)) + r
        erf = F.gelu(self.fc[3](x))
        return full, gelu, relu, erf, self.plain(x)


def test_bias_activation_residual_and_cast_fold_into_one_node_each():
    x, r = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    ir, counts = run(Epilogues(), (x, r))
    assert counts == {"linear_fused": 5, "bias": 4, "activation": 4, "residual": 2, "cast": 1,
                      "declined": 0}
    ops = ir.op_counts()
    assert ops["fxforge.linear.default"] == 5
    for gone in ("aten.addmm.default", "aten.mm.default", "aten.silu.default", "aten.gelu.default",
                 "aten.relu.default", "aten.add.Tensor", "aten._to_copy.default"):
        assert gone not in ops
    fields = linears(ir)
    assert sorted(f.activation for f in fields) == ["gelu", "gelu_tanh", "none", "relu", "silu"]
    full = next(f for f in fields if f.activation == "silu")
    assert full.residual is not None and full.out_dtype == torch.float64
    assert full.bias is not None
    assert next(f for f in fields if f.activation == "none").bias is None


class WrittenOut(nn.Module):
    def __init__(self, dim=16):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(dim, 32), nn.Linear(dim, 32), nn.Linear(dim, 32)

    def forward(self, x):
        h = self.a(x)
        gelu_new = 0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * torch.pow(h, 3.0))))
        k = self.b(x)
        m = self.c(x)
        return gelu_new, k * torch.sigmoid(k), 0.5 * m * (1 + torch.erf(m / math.sqrt(2)))


def test_written_out_activations_become_the_aten_ones():
    ir, counts = run(WrittenOut(), (torch.randn(3, 4, 16),), exact=False)  # equal up to rounding
    assert counts["activation"] == 3 and counts["linear_fused"] == 3
    assert sorted(f.activation for f in linears(ir)) == ["gelu", "gelu_tanh", "silu"]
    ops = ir.op_counts()
    assert not {"aten.tanh.default", "aten.sigmoid.default", "aten.erf.default", "aten.mul.Tensor"} & set(ops)


def test_small_gpt_is_bit_exact_and_fully_fused():
    model = small_gpt.make_model(n_layer=2, n_embd=32, n_head=4, vocab_size=64, block_size=16)
    ir, counts = run(model, small_gpt.example_inputs(batch=2, seq=8, vocab_size=64), passes=PIPELINE)
    # per layer: fused qkv (bias), attn out (bias, residual), fc (bias, gelu), proj (bias,
    # residual); then lm_head (no bias)
    assert counts == {"linear_fused": 9, "bias": 8, "activation": 2, "residual": 4, "cast": 0,
                      "declined": 0}
    assert "aten.addmm.default" not in ir.op_counts() and "aten.gelu.default" not in ir.op_counts()


def test_dynamic_sequence_length():
    model = small_gpt.make_model(n_layer=1, n_embd=32, n_head=2, vocab_size=64, block_size=32).eval()
    (idx,) = small_gpt.example_inputs(batch=2, seq=8, vocab_size=64)
    seq = torch.export.Dim("seq", min=2, max=31)
    ir = capture_export(model, (idx,), dynamic_shapes=({1: seq},))
    out = PassManager(PIPELINE, verify_between=True, strict=True).run(ir)
    counts = out.info["passes"][3].counts
    assert (counts["linear_fused"], counts["residual"], counts["activation"]) == (5, 2, 1)
    for length in (3, 8, 13):  # the residual views back to [-1, N] with a symbolic M
        idx = torch.randint(0, 64, (2, length))
        with torch.no_grad():
            assert torch.equal(out.gm(idx)[0], model(idx))


def test_gpt2_gelu_new_and_llama_after_horizontal_fusion():
    gpt2 = hf_models.LogitsOnly(hf_models.build("gpt2"))
    ir, counts = run(gpt2, hf_models.example_inputs("gpt2", batch=2, seq=8), exact=False, passes=PIPELINE)
    assert counts == {"linear_fused": 9, "bias": 8, "activation": 2, "residual": 4, "cast": 0,
                      "declined": 0}
    assert [f.activation for f in linears(ir)].count("gelu_tanh") == 2
    assert "aten.tanh.default" not in ir.op_counts()

    llama = hf_models.LogitsOnly(hf_models.build("llama"))
    ir, counts = run(llama, hf_models.example_inputs("llama", batch=2, seq=8), passes=PIPELINE)
    # gate/up share one matmul: its pieces feed silu and mul, so no activation folds
    assert counts == {"linear_fused": 9, "bias": 0, "activation": 0, "residual": 4, "cast": 0,
                      "declined": 0}
    assert ir.op_counts()["aten.silu.default"] == 2


class NearMisses(nn.Module):
    def __init__(self, dim=8):
        super().__init__()
        self.fc = nn.ModuleList(nn.Linear(dim, dim) for _ in range(7))
        self.row_bias = nn.Parameter(torch.randn(3, dim))
        self.w = nn.Parameter(torch.randn(dim, dim))

    def forward(self, x, r, w_runtime):
        h = self.fc[0](x)
        shared = F.gelu(h) + h.sum()                       # h has two users: gelu stays
        broadcast = self.fc[1](x) + r[0]                   # the residual broadcasts
        doubled = self.fc[2](x) + self.fc[2](x)            # after CSE: add(y, y), a cycle
        scaled = torch.add(self.fc[3](x), r, alpha=2.0)    # alpha
        unsupported = torch.tanh(self.fc[4](x))            # not an ACTIVATIONS entry
        r_t = torch.stack([r, r], 1).transpose(0, 1)       # [2, 3, 8], not viewable as [6, 8]
        strided = self.fc[5](torch.stack([x, x])) + r_t    # so the residual cannot go inside
        # add(r_t, y) takes r_t's column-major layout; y + r_t inside the linear would not
        layout = r.t().contiguous().t() + self.fc[6](x)
        beta = torch.addmm(self.row_bias[0], x, self.w, beta=0.5)
        bias_2d = torch.addmm(self.row_bias, x, self.w)    # bias [M, N], not [N]
        runtime = x @ w_runtime                            # weight is not a constant
        return shared, broadcast, doubled, scaled, unsupported, strided, layout, beta, bias_2d, runtime


def test_near_misses_decline_with_a_reason_and_stay_exact():
    inputs = (torch.randn(3, 8), torch.randn(3, 8), torch.randn(8, 8))
    ir, counts = run(NearMisses(), inputs)
    assert counts == {"linear_fused": 7, "bias": 7, "activation": 0, "residual": 0, "cast": 0,
                      "declined": 9}
    reasons = sorted(ir.info["fuse_epilogues_declined"].values())
    assert reasons == sorted(["the matmul result has other users", "the residual broadcasts",
                              "the residual depends on the matmul", "add with alpha",
                              "the replacement does not type-check", "addmm with alpha/beta",
                              "the replacement's metadata differs",
                              "bias is not 1-D [N]", "weight is not a constant"])
    ops = ir.op_counts()
    assert ops["aten.gelu.default"] == 1 and ops["aten.tanh.default"] == 1
    assert ops["aten.addmm.default"] == 2 and ops["aten.mm.default"] == 1
    assert all(f.activation == "none" and f.residual is None for f in linears(ir))


def test_torch_compile_with_the_pass_list_matches_eager(monkeypatch):
    built = []
    original = fxforge.compiler.compile_captured
    monkeypatch.setattr(fxforge.compiler, "compile_captured",
                        lambda *a, **k: built.append(original(*a, **k)) or built[-1])
    model = small_gpt.make_model(n_layer=1, n_embd=32, n_head=4, vocab_size=64, block_size=16)
    (idx,) = small_gpt.example_inputs(batch=2, seq=8, vocab_size=64)
    compiled = torch.compile(model, backend="fxforge", options={"passes": PIPELINE, "backend": "reference"})
    with torch.no_grad():
        got, expected = compiled(idx), model(idx)
    assert torch.equal(got, expected)
    (graph,) = built
    stats = {s.name: s.counts for s in graph.ir.info["passes"]}["fuse_epilogues"]
    assert stats["linear_fused"] == 5 and stats["residual"] == 2 and stats["activation"] == 1


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_dtypes_fuse_too(dtype):
    model = Epilogues().to(dtype)
    x, r = torch.randn(2, 5, 16, dtype=dtype), torch.randn(2, 5, 16, dtype=dtype)
    _, counts = run(model, (x, r))
    assert counts["linear_fused"] == 5 and counts["residual"] == 2
