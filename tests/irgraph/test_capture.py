"""Capture through torch.export and through dynamo/aot_autograd into the IR."""
import sympy
import torch
import torch.nn as nn
import torch.nn.functional as F

from fxforge.irgraph import (KEPT_OPS, META_KEY, SymMeta, TensorMeta, capture_aot_inference,
                             capture_export, dynamo_weight_indices, verify)
from fxforge.testing import assert_close_to_eager

aten = torch.ops.aten


class Block(nn.Module):
    def __init__(self, dim=16):
        super().__init__()
        self.ln = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.up = nn.Linear(dim, 2 * dim)
        self.down = nn.Linear(2 * dim, dim)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln(x)).view(b, t, 3, 2, d // 2).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        h = x + a
        return torch.softmax(h + self.down(F.silu(self.up(h)) * F.gelu(h.repeat(1, 1, 2))), dim=-1)


def _allowed(target) -> bool:
    if not isinstance(target, torch._ops.OpOverload):
        return getattr(target, "__module__", "") in ("_operator", "operator")
    return torch.Tag.core in target.tags or target in KEPT_OPS or target.namespace != "aten" or \
        target in (aten.sym_size.int, aten._assert_tensor_metadata.default)


def test_export_capture_gives_core_aten_with_kept_ops_and_weights_as_constants():
    model = Block().eval()
    x = torch.randn(2, 8, 16)
    ir = capture_export(model, (x,))
    verify(ir)
    assert [p.name for p in ir.placeholders()] == ["x"]
    assert len(ir.constants()) == len(model.state_dict())
    counts = ir.op_counts()
    for kept in ("aten.scaled_dot_product_attention.default", "aten.native_layer_norm.default",
                 "aten._softmax.default", "aten.silu.default", "aten.gelu.default"):
        assert counts.get(kept) == 1, (kept, counts)
    bad = [n.target for n in ir.call_nodes() if not _allowed(n.target)]
    assert not bad, f"ops outside core ATen + KEPT_OPS: {bad}"
    with torch.no_grad():
        assert_close_to_eager(ir.gm(x)[0], model(x))


def test_dynamic_dims_are_sympy_symbols():
    model = Block().eval()
    x = torch.randn(2, 8, 16)
    seq = torch.export.Dim("seq", min=2, max=64)
    ir = capture_export(model, (x,), dynamic_shapes=({1: seq},))
    meta = ir.placeholders()[0].meta[META_KEY]
    assert isinstance(meta, TensorMeta) and meta.shape[0] == 2 and meta.shape[2] == 16
    assert isinstance(meta.shape[1], sympy.Symbol) and not meta.is_static
    assert ir.info["range_constraints"][str(meta.shape[1])] == (2, 64)
    sym_nodes = [n for n in ir.gm.graph.nodes if isinstance(n.meta.get(META_KEY), SymMeta)]
    assert sym_nodes, "expected sym_size nodes carrying SymMeta"
    y = torch.randn(2, 13, 16)
    with torch.no_grad():
        assert_close_to_eager(ir.gm(y)[0], model(y))


def test_dynamo_path_gives_the_same_op_set_and_marks_weights():
    model = Block().eval()
    seen = {}

    def grab(ir, positions):
        seen["ir"], seen["positions"] = ir, positions
        return ir.gm

    def backend(gm, example_inputs):
        return capture_aot_inference(gm, example_inputs, dynamo_weight_indices(gm, example_inputs), grab)

    x = torch.randn(2, 8, 16)
    with torch.no_grad():
        out = torch.compile(model, backend=backend)(x)
        assert_close_to_eager(out, model(x))
    ir = seen["ir"]
    verify(ir)
    assert len(seen["positions"]) == len(list(model.parameters()))
    bad = [n.target for n in ir.call_nodes() if not _allowed(n.target)]
    assert not bad, bad
    assert ir.op_counts().get("aten.native_layer_norm.default") == 1


def test_prims_convert_element_type_becomes_to_copy():
    """aot_autograd can leave ``prims.convert_element_type`` (seen on an RMSNorm's 0-d float64
    eps); the prim runs through Python at each call, so capture makes it ``aten._to_copy``."""
    from torch.fx.experimental.proxy_tensor import make_fx
    from fxforge.irgraph.capture import _fake_mode_of, build_ir
    fn = lambda x, eps: x * torch.ops.prims.convert_element_type(eps, torch.float32)  # noqa: E731
    x, eps = torch.randn(3, 5), torch.tensor(0.25, dtype=torch.float64)
    gm = make_fx(fn, tracing_mode="fake")(x, eps)
    assert any(n.target is torch.ops.prims.convert_element_type.default for n in gm.graph.nodes)
    ir = build_ir(gm, _fake_mode_of(gm), {}, {})
    targets = [n.target for n in ir.call_nodes()]
    assert torch.ops.aten._to_copy.default in targets
    assert torch.ops.prims.convert_element_type.default not in targets
    out = ir.gm(x, eps)
    assert torch.equal(out[0] if isinstance(out, (tuple, list)) else out, fn(x, eps))
