"""precision_bf16 / precision_fp16: what runs in low precision, what stays fp32, the numbers."""
import operator

import pytest
import torch
import torch.nn as nn

import fxforge.compiler
import fxforge.passes.epilogue  # noqa: F401  (registers fuse_epilogues)
import fxforge.passes.precision  # noqa: F401  (registers precision_bf16 / precision_fp16)
from fxforge.examples import hf_models, small_gpt
from fxforge.irgraph import capture_export
from fxforge.irgraph.meta import META_KEY, TensorMeta
from fxforge.irgraph.ops import fxforge_linear
from fxforge.irgraph.query import alias_root, is_view_op
from fxforge.irgraph.views import Linear
from fxforge.passes import PassManager
from fxforge.passes.precision import LOW_INPUTS

aten = torch.ops.aten
LOW = {"bf16": torch.bfloat16, "fp16": torch.float16}
STAY_FP32 = (aten.native_layer_norm.default, aten._softmax.default, aten.rms_norm.default,
             aten.mean.dim, aten.sum.dim_IntList, aten.add.Tensor)


def pipeline(precision, epilogues=True):
    fuse = ["fuse_projections", "fuse_epilogues"] if epilogues else ["fuse_projections"]
    return ["remove_noops", "cse", *fuse, f"precision_{precision}", "constant_fold", "cse", "dce"]


def run(model, inputs, passes):
    """The IR after ``passes`` and the counts of the (first) precision pass."""
    ir = capture_export(model.eval(), inputs)
    out = PassManager(passes, verify_between=True, strict=True).run(ir)
    return out, next(s.counts for s in out.info["passes"] if s.name.startswith("precision_"))


def relative_error(got, expected):
    return ((got.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


def check_logits(model, inputs, ir):
    with torch.no_grad():
        expected, (got,) = model(*inputs), ir.gm(*inputs)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert relative_error(got, expected) < 2e-2


def dtype_of(node):
    return node.meta[META_KEY].dtype


def check_structure(ir, low):
    """Low precision lives only in casts, weights and the matmul/attention ops themselves;
    every weight cast was folded; norms, softmax, reductions and adds read fp32."""
    for node in ir.call_nodes():
        meta = node.meta.get(META_KEY)
        if node.target is aten._to_copy.default:
            assert alias_root(node.args[0]).op != "get_attr", f"{node.name} casts a weight per call"
        elif node.target in STAY_FP32:
            tensors = [i for i in node.all_input_nodes if isinstance(i.meta.get(META_KEY), TensorMeta)]
            assert all(dtype_of(i) != low for i in tensors), f"{node.name} reads low precision"
        elif getattr(meta, "dtype", None) == low:
            source = node.args[0] if node.target is operator.getitem else node  # attention's output
            assert source.target in LOW_INPUTS or (is_view_op(node.target) and
                                                   alias_root(node).op == "get_attr"), node.format_node()


def small_model():
    # head_dim 16: q @ k^T runs low; att @ v has K = seq 8, too small, and stays fp32
    return small_gpt.make_model(n_layer=2, n_embd=64, n_head=4, vocab_size=128, block_size=16)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("epilogues", [False, True])
def test_small_gpt_structure_and_numerics(precision, epilogues):
    model, inputs = small_model(), small_gpt.example_inputs(batch=2, seq=8, vocab_size=128)
    passes = pipeline(precision, epilogues) + [f"precision_{precision}"]  # a second run: no-op
    ir, counts = run(model, inputs, passes)
    again = ir.info["passes"][-1].counts  # its inputs are low precision now: skipped, as such
    assert (again["matmuls"], again["casts"], again["skipped_not_fp32"]) == (0, 0, 11)
    low = LOW[precision]
    # per layer: qkv, attn out, fc, proj, q @ k^T; then lm_head
    assert counts["matmuls"] == 11 and counts["attention"] == 0
    assert counts["skipped_small_k"] == 2 and counts["skipped_not_fp32"] == 0
    # per layer: qkv weight and bias (concatenated), 3 x (weight, bias); lm_head weight
    assert counts["weight_casts"] == 17
    # activations into them: x of the 4 projections and q, k per layer, x of lm_head; results
    # back to fp32: one per matmul, unless fxforge.linear does it with out_dtype
    results_back = 2 if epilogues else 11  # with epilogues: only the 2 q @ k^T bmms
    assert counts["casts"] == 17 + (6 * 2 + 1) + results_back
    assert ir.op_counts()["aten._to_copy.default"] == counts["casts"] - counts["weight_casts"]
    low_constants = [c for c in ir.constants().values() if c.dtype == low]
    assert len(low_constants) == 17
    assert len({c.data_ptr() for c in low_constants}) == 17  # each stored once
    check_structure(ir, low)
    if epilogues:
        fields = [view for view in map(Linear.of, ir.gm.graph.nodes) if view is not None]
        assert len(fields) == 9 and all(f.out_dtype == torch.float32 for f in fields)
        residuals = [f.residual for f in fields if f.residual is not None]
        assert len(residuals) == 4 and all(dtype_of(r) == torch.float32 for r in residuals)
        assert all(dtype_of(f.bias) == low for f in fields if f.bias is not None)
    check_logits(model, inputs, ir)


@pytest.mark.parametrize("arch,precision,attention", [
    ("gpt2", "bf16", "eager"), ("llama", "fp16", "sdpa")])
def test_hf_models_stay_close_to_fp32(arch, precision, attention):
    model = hf_models.LogitsOnly(hf_models.build(arch, attn_implementation=attention))
    inputs = hf_models.example_inputs(arch, batch=2, seq=8)
    ir, counts = run(model, inputs, pipeline(precision))
    low = LOW[precision]
    assert counts["matmuls"] >= 9 and counts["skipped_not_fp32"] == 0
    assert counts["attention"] == (2 if attention == "sdpa" else 0)
    check_structure(ir, low)
    if arch == "llama":  # RMSNorm, written out: the mean of squares reads fp32
        assert ir.op_counts()["aten.mean.dim"] == 5
    check_logits(model, inputs, ir)


class Skips(nn.Module):
    def __init__(self):
        super().__init__()
        self.narrow = nn.Linear(4, 32)                      # K = 4
        self.wide = nn.Linear(32, 32)
        self.table = nn.Parameter(torch.randint(-3, 3, (32, 8)), requires_grad=False)

    def forward(self, x, ids):
        return self.wide(self.narrow(x)), ids @ self.table  # an integer matmul


def test_skips_are_counted_with_their_reason():
    model = Skips()
    inputs = (torch.randn(3, 4), torch.randint(-3, 3, (3, 32)))
    ir, counts = run(model, inputs, pipeline("bf16"))
    assert (counts["matmuls"], counts["skipped_small_k"], counts["skipped_integer"]) == (1, 1, 1)
    with torch.no_grad():
        expected, got = model(*inputs), ir.gm(*inputs)
    assert torch.equal(got[1], expected[1])
    assert relative_error(got[0], expected[0]) < 2e-2

    double = small_gpt.make_model(n_layer=1, n_embd=32, vocab_size=64, block_size=16).double()
    ir, counts = run(double, small_gpt.example_inputs(batch=1, seq=8, vocab_size=64), pipeline("bf16"))
    assert counts["matmuls"] == 0 and counts["skipped_not_fp32"] >= 5 and counts["casts"] == 0
    assert "aten._to_copy.default" not in ir.op_counts()


def test_chained_matmuls_skip_the_fp32_round_trip():
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 16))
    x = torch.randn(4, 32)
    ir, counts = run(model, (x,), pipeline("bf16", epilogues=False))
    assert counts["matmuls"] == 2 and counts["weight_casts"] == 4
    # x in, the last result out: the first result feeds the second matmul in bf16 directly
    casts = [n for n in ir.call_nodes() if n.target is aten._to_copy.default]
    assert [n.kwargs["dtype"] for n in casts] == [torch.bfloat16, torch.float32]
    mm_inputs = [n.args[1] for n in ir.call_nodes() if n.target is aten.addmm.default]
    assert mm_inputs[1].target is aten.addmm.default
    with torch.no_grad():
        assert relative_error(ir.gm(x)[0], model(x)) < 2e-2


def test_torch_compile_with_the_pass_list(monkeypatch):
    built = []
    original = fxforge.compiler.compile_captured
    monkeypatch.setattr(fxforge.compiler, "compile_captured",
                        lambda *a, **k: built.append(original(*a, **k)) or built[-1])
    model = hf_models.LogitsOnly(hf_models.build("llama", attn_implementation="sdpa"))
    (ids,) = hf_models.example_inputs("llama", batch=1, seq=8)
    compiled = torch.compile(model, backend="fxforge",
                             options={"passes": pipeline("bf16"), "backend": "reference"})
    with torch.no_grad():
        got, expected = compiled(ids), model(ids)
    assert got.dtype == torch.float32 and relative_error(got, expected) < 2e-2
    (graph,) = built
    counts = {s.name: s.counts for s in graph.ir.info["passes"]}["precision_bf16"]
    assert counts["matmuls"] == 9 and counts["attention"] == 2
    check_structure(graph.ir, torch.bfloat16)


class _TwoLinears(nn.Module):
    """A weight linear, a tiny-K one (kept fp32) and an activation-by-activation matmul."""

    def __init__(self):
        super().__init__()
        self.up, self.tiny = nn.Linear(32, 48), nn.Linear(8, 48)

    def forward(self, x, small):
        h = self.up(x) + self.tiny(small)
        return h @ h.transpose(-1, -2)


def test_bf16_weights_rounds_linear_weights_and_keeps_the_math_fp32():
    """The rounding is the linear's weight format (set through its view), not casts of values:
    the weight constant is the model's own, the format says how it is stored."""
    model = _TwoLinears().eval()
    x, small = torch.randn(3, 32), torch.randn(3, 8)
    ir, counts = run(model, (x, small), pipeline("bf16_weights"))
    assert counts["weights_rounded"] == 1 and counts["skipped_small_k"] == 1
    linears = {Linear.of(n).x.meta[META_KEY].shape[-1]: Linear.of(n) for n in ir.call_nodes()
               if n.target is fxforge_linear}
    assert linears[32].weight_format == "bf16" and linears[8].weight_format == "dense"  # K=8 < MIN_K
    weight = getattr(ir.gm, alias_root(linears[32].weight).target)
    assert torch.equal(weight, model.up.weight.detach())                   # the values as they are
    assert all(dtype_of(n) == torch.float32 for n in ir.call_nodes() if n.op == "call_function"
               and isinstance(n.meta.get(META_KEY), TensorMeta) and n.meta[META_KEY].dtype.is_floating_point)
    assert not [n for n in ir.call_nodes() if n.target is aten._to_copy.default]   # no casts
    rounded = model.up.weight.detach().to(torch.bfloat16).float()
    h = x @ rounded.t() + model.up.bias + model.tiny(small)
    with torch.no_grad():
        got, = ir.gm(x, small)
        torch.testing.assert_close(got, h @ h.t(), rtol=1e-5, atol=1e-4)   # exact but for order
        assert relative_error(got, model(x, small)) > 0                     # and lossy vs fp32
