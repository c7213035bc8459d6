"""Attention fusion: each pattern fuses into one SDPA node, each near-miss does not; numerics
match eager; tiny transformers fuse once per layer."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxforge.compiler
import fxforge.passes.attention  # noqa: F401  (registers fuse_attention)
from fxforge.testing import assert_close_to_eager

PIPELINE = ["remove_noops", "cse", "constant_fold", "fuse_attention", "dce"]
SDPA = torch.ops.aten.scaled_dot_product_attention.default
B, H, L, D = 2, 4, 8, 16


@pytest.fixture
def compile_model():
    """Compile through torch.compile; return the optimized IRs of the captured graphs."""
    def run(model, inputs, dynamic=None, more_inputs=()):
        compiled = torch.compile(model, backend="fxforge", dynamic=dynamic,
                                 options={"passes": PIPELINE, "backend": "reference"})
        with fxforge.compiler.recording() as graphs, torch.no_grad():
            for args in (inputs, *more_inputs):
                assert_close_to_eager(compiled(*args), model(*args))
        assert graphs, "nothing was compiled"
        return [g.ir for g in graphs]
    return run


def counts(ir):
    return [s.counts for s in ir.info["passes"] if s.name == "fuse_attention"][-1]


def sdpa_nodes(ir):
    return [n for n in ir.gm.graph.nodes if n.target is SDPA]


def qkv(lk=L, heads_kv=H):
    return torch.randn(B, H, L, D), torch.randn(B, heads_kv, lk, D), torch.randn(B, heads_kv, lk, D)


class Explicit(nn.Module):
    """softmax(q k^T * scale [masked]) v, with the mask given as a constant buffer."""

    def __init__(self, mask=None, how="masked_fill"):
        super().__init__()
        self.how = how
        if mask is not None:
            self.register_buffer("mask", mask)

    def forward(self, q, k, v):
        scores = q @ k.transpose(-2, -1) / math.sqrt(D)
        if self.how == "masked_fill":  # mask: True = keep
            scores = scores.masked_fill(~self.mask, float("-inf"))
        elif self.how == "where_keep":
            scores = torch.where(self.mask, scores, torch.tensor(float("-inf")))
        elif self.how == "additive":
            scores = scores + self.mask
        return F.softmax(scores, dim=-1) @ v


def tril(n=L):
    return torch.ones(n, n, dtype=torch.bool).tril()


@pytest.mark.parametrize("how", ["masked_fill", "where_keep", "additive"])
def test_constant_causal_mask_becomes_is_causal(compile_model, how):
    mask = tril().view(1, 1, L, L)
    if how == "additive":
        mask = torch.zeros(1, 1, L, L).masked_fill(~mask, torch.finfo(torch.float32).min)
    ir, = compile_model(Explicit(mask, how), qkv())
    assert counts(ir) == {"attention_fused": 1, "normalized": 0, "causal": 1, "masked": 0, "gqa": 0,
                          "declined": 0}
    node, = sdpa_nodes(ir)
    assert node.args[3] is None and node.args[5] is True
    assert node.kwargs["scale"] == pytest.approx(1 / math.sqrt(D))
    assert "aten._softmax.default" not in ir.op_counts() and "aten.bmm.default" not in ir.op_counts()


class SlicedBuffer(nn.Module):
    """nanoGPT: a block_size tril buffer sliced to the sequence length (dynamic under export)."""

    def __init__(self, block=16):
        super().__init__()
        causal = torch.ones(block, block, dtype=torch.bool).tril()
        self.register_buffer("bias", causal.view(1, 1, block, block))

    def forward(self, q, k, v):
        t = q.shape[2]
        att = (q * D ** -0.5) @ k.transpose(-2, -1)  # the scale on q, before the matmul
        att = att.masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf"))
        return F.softmax(att, dim=-1) @ v


def test_sliced_causal_buffer_with_dynamic_length(compile_model):
    more = [tuple(torch.randn(B, H, 11, D) for _ in range(3))]
    irs = compile_model(SlicedBuffer(), qkv(), dynamic=True, more_inputs=more)
    for ir in irs:
        assert counts(ir)["causal"] == 1 and counts(ir)["attention_fused"] == 1
        node, = sdpa_nodes(ir)
        assert node.kwargs["scale"] == pytest.approx(D ** -0.5)
    assert any(not n.meta["fxf"].is_static for ir in irs for n in sdpa_nodes(ir))


NON_CAUSAL = {"triu": lambda: torch.ones(L, L, dtype=torch.bool).triu(),
              "random": lambda: torch.rand(L, L) > 0.5,
              "flipped_tril": lambda: tril().flip(0)}


@pytest.mark.parametrize("kind", sorted(NON_CAUSAL))
def test_non_causal_constant_mask_stays_a_mask(compile_model, kind):
    mask = NON_CAUSAL[kind]() | torch.eye(L, dtype=torch.bool)  # every query keeps a key (no NaN rows)
    ir, = compile_model(Explicit(mask), qkv())
    assert counts(ir)["attention_fused"] == 1 and counts(ir)["causal"] == 0 and counts(ir)["masked"] == 1
    node, = sdpa_nodes(ir)
    assert node.args[5] is False
    const = getattr(ir.gm, node.args[3].target)
    assert torch.equal(const, mask)  # True = keep: masked_fill(~mask) polarity handled


def test_constant_mask_with_an_empty_row_declines(compile_model):
    mask = tril()
    mask[3] = False  # eager: NaN in row 3; SDPA would give 0
    ir, = compile_model(Explicit(mask), qkv())
    assert counts(ir)["attention_fused"] == 0 and counts(ir)["declined"] == 1


class RuntimeMask(nn.Module):
    def __init__(self, bool_mask):
        super().__init__()
        self.bool_mask = bool_mask

    def forward(self, q, k, v, mask):
        scores = torch.matmul(q, k.transpose(2, 3)) * 0.125
        scores = scores.masked_fill(mask, -1e38) if self.bool_mask else scores + mask
        return torch.softmax(scores, -1) @ v


@pytest.mark.parametrize("bool_mask", [True, False], ids=["finite_fill", "additive"])
def test_runtime_mask_is_passed_through(compile_model, bool_mask):
    drop = torch.rand(B, 1, L, L) > 0.7
    mask = drop if bool_mask else torch.randn(B, 1, L, L)
    ir, = compile_model(RuntimeMask(bool_mask), (*qkv(), mask))
    assert counts(ir)["attention_fused"] == 1 and counts(ir)["masked"] == 1 and counts(ir)["causal"] == 0
    node, = sdpa_nodes(ir)
    assert node.meta["fxf"].dtype == torch.float32 and node.args[3].meta["fxf"].dtype == torch.float32


class RepeatKV(nn.Module):
    """Llama-style grouped-query attention: k/v heads repeated by expand + reshape."""

    def forward(self, q, k, v):
        def repeat(x):
            b, h, s, d = x.shape
            return x[:, :, None].expand(b, h, H // h, s, d).reshape(b, H, s, d)
        return F.softmax(q @ repeat(k).transpose(-1, -2) * 0.25, dim=-1) @ repeat(v)


def test_repeat_kv_becomes_enable_gqa(compile_model):
    ir, = compile_model(RepeatKV(), qkv(heads_kv=2))
    assert counts(ir)["attention_fused"] == 1 and counts(ir)["gqa"] == 1
    node, = sdpa_nodes(ir)
    assert node.kwargs["enable_gqa"] and node.args[1].meta["fxf"].shape[1] == 2
    assert "aten.expand.default" not in ir.op_counts()


class CrossAttention(nn.Module):
    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v


def test_unscaled_cross_attention_with_other_key_length(compile_model):
    ir, = compile_model(CrossAttention(), qkv(lk=5))
    assert counts(ir)["attention_fused"] == 1
    assert sdpa_nodes(ir)[0].kwargs["scale"] == 1.0


class SDPAStyle(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def test_dynamo_cpu_flash_attention_is_normalized(compile_model):
    ir, = compile_model(SDPAStyle(), qkv())
    assert counts(ir)["normalized"] == 1 and counts(ir)["causal"] == 1
    assert "aten._scaled_dot_product_flash_attention_for_cpu.default" not in ir.op_counts()


class NearMiss(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind

    def forward(self, q, k, v):
        if self.kind == "k_not_transposed":  # q @ k with k already [B, H, D, L]: no transpose
            return torch.softmax(q @ k.reshape(B, H, D, L) * 0.25, -1) @ v
        scores = q @ k.transpose(-2, -1)
        if self.kind == "softmax_not_last":
            return torch.softmax(scores * 0.25, dim=-2) @ v
        if self.kind == "softmax_over_flattened_rows":
            return torch.softmax(scores.reshape(B, H, L * L), -1).reshape(B, H, L, L) @ v
        if self.kind == "scale_after_softmax":
            return (torch.softmax(scores, dim=-1) * 0.25) @ v
        weights = torch.softmax(scores * 0.25, dim=-1)
        if self.kind == "weights_returned":
            return weights @ v, weights
        if self.kind == "scores_reused":
            return weights @ v + scores.mean()
        raise ValueError(self.kind)


@pytest.mark.parametrize("kind", ["softmax_not_last", "softmax_over_flattened_rows", "scale_after_softmax",
                                  "weights_returned", "scores_reused", "k_not_transposed"])
def test_near_misses_do_not_fuse(compile_model, kind):
    ir, = compile_model(NearMiss(kind), qkv())
    assert counts(ir)["attention_fused"] == 0 and counts(ir)["declined"] == 1
    assert not sdpa_nodes(ir)


def test_runs_twice_without_change(compile_model):
    """Idempotent: a second run finds nothing left to fuse, and no stray constants stay."""
    from fxforge.passes import PassManager
    ir, = compile_model(Explicit((torch.rand(L, L) > 0.3) | torch.eye(L, dtype=torch.bool)), qkv())
    again = PassManager(["fuse_attention", "dce"], verify_between=True, strict=True).run(ir)
    assert counts(again) == dict.fromkeys(counts(ir), 0)


def test_small_gpt_fuses_each_layer_causally(compile_model):
    from fxforge.examples.small_gpt import make_model
    model = make_model(n_layer=2, n_embd=32, block_size=16)
    ids = torch.randint(0, 512, (2, 8))
    irs = compile_model(model, (ids,), more_inputs=[(ids[:, :5],)])  # the second length: dynamic
    assert len(irs) == 2 and any(not n.meta["fxf"].is_static for n in sdpa_nodes(irs[1]))
    for ir in irs:
        assert counts(ir) == {"attention_fused": 2, "normalized": 0, "causal": 2, "masked": 0, "gqa": 0,
                              "declined": 0}


@pytest.mark.parametrize("batch", [1, 2])
def test_a_single_token_forward_fuses(compile_model, batch):
    """One query and one key: every score row is [1, 1], so size-1 dims must not read as a
    reshape of the rows (layout canonicalisation once split one view into two here)."""
    from fxforge.examples.small_gpt import make_model
    model = make_model(n_layer=2, n_embd=32, block_size=16)
    (ir,) = compile_model(model, (torch.randint(0, 512, (batch, 1)),))
    assert counts(ir)["attention_fused"] == 2 and counts(ir)["declined"] == 0
    assert len(sdpa_nodes(ir)) == 2


@pytest.mark.parametrize("arch", ["gpt2", "llama", "mistral", "qwen2", "bert"])
def test_hf_models_fuse_once_per_layer(compile_model, arch):
    from fxforge.examples import hf_models
    model = hf_models.LogitsOnly(hf_models.build(arch))
    ir, = compile_model(model, hf_models.example_inputs(arch, batch=2, seq=8))
    layers = hf_models.LAYERS
    assert counts(ir) == {"attention_fused": layers, "normalized": 0, "declined": 0, "masked": 0,
                          "causal": 0 if arch == "bert" else layers,
                          "gqa": layers if arch in ("llama", "mistral", "qwen2") else 0}
    assert len(sdpa_nodes(ir)) == layers and "aten._softmax.default" not in ir.op_counts()


def _cuda_variant_ir(call, *inputs):
    """The IR of ``call`` traced with fake tensors: the CUDA kernel ops have shape functions on any
    device, so their graphs (what dynamo's capture gives on a GPU) can be built and rewritten here."""
    from torch.fx.experimental.proxy_tensor import make_fx
    from fxforge.irgraph.capture import _fake_mode_of, build_ir
    gm = make_fx(call, tracing_mode="fake")(*inputs)
    return build_ir(gm, _fake_mode_of(gm), {}, {})


aten = torch.ops.aten
CUDA_VARIANTS = {   # (q, k, v, mask) -> output 0 of the op, as the CUDA dispatcher calls it
    "flash causal": (lambda q, k, v, m: aten._scaled_dot_product_flash_attention(
        q, k, v, 0.0, True, False, scale=0.3)[0], True, False),
    "efficient, additive bias": (lambda q, k, v, m: aten._scaled_dot_product_efficient_attention(
        q, k, v, m, False, 0.0, False, scale=0.3)[0], False, True),
    "cudnn causal, no bias": (lambda q, k, v, m: aten._scaled_dot_product_cudnn_attention(
        q, k, v, None, False, 0.0, True, False, scale=0.3)[0], True, False),
}


@pytest.mark.parametrize("case", CUDA_VARIANTS)
def test_cuda_sdpa_kernel_ops_are_normalized(case):
    """On a GPU a traced SDPA is one of CUDA's kernel ops; fuse_attention must make each the
    canonical op (the KV-cache pass and the Triton backend know only that), with its meaning."""
    from fxforge.passes.attention import fuse_attention
    call, causal, masked = CUDA_VARIANTS[case]
    q, k, v = (torch.randn(B, H, L, D) for _ in range(3))
    mask = torch.randn(B, H, L, L)
    ir = _cuda_variant_ir(call, q, k, v, mask)
    result = fuse_attention(ir)
    assert result.counts["normalized"] == 1 and result.counts["masked"] == int(masked)
    assert [n.target for n in result.ir.call_nodes()].count(SDPA) == 1
    assert not any("_scaled_dot_product_" in str(t) for t in result.ir.op_counts())
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask if masked else None,
                                          is_causal=causal, scale=0.3)
    result.ir.gm.recompile()   # the pass manager does this between passes
    assert_close_to_eager(result.ir.gm(q, k, v, mask), want)


def test_cuda_sdpa_with_its_logsumexp_used_is_not_normalized():
    from fxforge.passes.attention import fuse_attention
    q, k, v = (torch.randn(B, H, L, D) for _ in range(3))
    ir = _cuda_variant_ir(lambda q, k, v: aten._scaled_dot_product_efficient_attention(
        q, k, v, None, True, 0.0, True)[:2], q, k, v)
    result = fuse_attention(ir)
    assert result.counts["normalized"] == 0 and result.counts["declined"] == 1


class NanGuarded(nn.Module):
    """ONNX exports of SDPA write ``where(isnan(p), fill, p)`` over the weights: rows whose keys
    are all masked become ``fill`` (0 is the fused kernel's own result for such rows)."""

    def __init__(self, fill: float):
        super().__init__()
        self.fill = fill

    def forward(self, q, k, v, keep):
        scores = (q @ k.transpose(-2, -1) * 0.25).masked_fill(~keep, float("-inf"))
        p = F.softmax(scores, dim=-1)
        return torch.where(torch.isnan(p), torch.tensor(self.fill), p) @ v


def test_the_nan_guard_of_onnx_exports_fuses_and_keeps_all_masked_rows_zero(compile_model):
    keep = torch.rand(B, 1, L, L) > 0.4
    keep[0, 0, 3] = False          # a query row with every key masked
    ir, = compile_model(NanGuarded(0.0), (*qkv(), keep))
    assert counts(ir)["attention_fused"] == 1 and len(sdpa_nodes(ir)) == 1
    q, k, v = qkv()
    assert torch.equal(NanGuarded(0.0)(q, k, v, keep)[0, :, 3], torch.zeros(H, D))


def test_a_nan_guard_with_another_fill_does_not_fuse(compile_model):
    keep = torch.rand(B, 1, L, L) > 0.4
    ir, = compile_model(NanGuarded(1.0), (*qkv(), keep))
    assert counts(ir)["attention_fused"] == 0 and not sdpa_nodes(ir)
