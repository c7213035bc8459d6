"""``com.microsoft`` ops that ONNX Runtime's transformer optimizer writes into exported models:
the fused layer norms with a residual input, the GELU variants and its rotary embedding.

They are written with the same torch ops as their unfused forms, so the IR holds
``native_layer_norm`` / ``rms_norm`` / ``gelu`` where fxforge's passes look for them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fxforge.irgraph.onnx_import.ops_attention import pick_positions, rotate
from fxforge.irgraph.onnx_import.ops_tensor import outputs
from fxforge.irgraph.onnx_import.table import MS_DOMAIN, NodeView, converter

MS_EPSILON = 1e-12   # ONNX Runtime's default for its skip layer norms


def _skip_sum(x, skip, bias):
    total = x + skip
    return total if bias is None else total + bias


# The statistics outputs are computed whenever the node declares them (a converter cannot
# tell a declared-but-unnamed output from a used one); unused, they are dead code in the graph.
@converter("SkipLayerNormalization", domain=MS_DOMAIN, since=1)
def skip_layer_norm(node: NodeView, x, skip, gamma, beta=None, bias=None):
    total = _skip_sum(x, skip, bias)
    eps = node.attr("epsilon", MS_EPSILON)
    y = F.layer_norm(total, total.shape[-1:], gamma, beta, eps)
    if node.num_outputs == 1:
        return y
    mean = total.mean(-1, keepdim=True)
    inv_std = torch.rsqrt(((total - mean) ** 2).mean(-1, keepdim=True) + eps)
    return outputs(node, y, mean, inv_std, total)


@converter("SkipSimplifiedLayerNormalization", domain=MS_DOMAIN, since=1)
def skip_simplified_layer_norm(node: NodeView, x, skip, gamma, bias=None):
    total = _skip_sum(x, skip, bias)
    eps = node.attr("epsilon", MS_EPSILON)
    y = F.rms_norm(total, total.shape[-1:], gamma, eps)
    if node.num_outputs == 1:
        return y
    inv_std = torch.rsqrt((total * total).mean(-1, keepdim=True) + eps)
    return outputs(node, y, None, inv_std, total)


@converter("FastGelu", domain=MS_DOMAIN, since=1)
def fast_gelu(node: NodeView, x, bias=None):
    return F.gelu(x if bias is None else x + bias, approximate="tanh")


@converter("BiasGelu", domain=MS_DOMAIN, since=1)
def bias_gelu(node: NodeView, x, bias):
    return F.gelu(x + bias)


@converter("Gelu", domain=MS_DOMAIN, since=1)
def ms_gelu(node: NodeView, x):
    return F.gelu(x)


@converter("QuickGelu", domain=MS_DOMAIN, since=1)
def quick_gelu(node: NodeView, x):
    return x * torch.sigmoid(node.attr("alpha", 1.702) * x)


@converter("RotaryEmbedding", domain=MS_DOMAIN, since=1)
def ms_rotary_embedding(node: NodeView, x, position_ids, cos, sin):
    if node.attr("is_packed_batching", 0):
        raise ValueError(f"{node.label()}: attribute is_packed_batching=1 is not imported")
    if node.attr("scale", 1.0) != 1.0:
        raise ValueError(f"{node.label()}: attribute scale={node.attr('scale')} is not imported")
    four_d = x.dim() == 4   # (B, N, S, H)
    seq = x.shape[2] if four_d else x.shape[1]
    rotary_dim = node.attr("rotary_embedding_dim", 0) or 2 * cos.shape[-1]
    if four_d:
        heads = x.transpose(1, 2)
    else:   # without num_heads, the head size is the rotary size the caches imply
        count = node.attr("num_heads", 0) or x.shape[-1] // rotary_dim
        heads = x.reshape(x.shape[0], seq, count, -1)
    if position_ids.numel() == 1:   # a start offset for the whole batch
        position_ids = position_ids.reshape(1, 1) + torch.arange(seq, device=x.device)
    cos, sin = pick_positions(cos, position_ids), pick_positions(sin, position_ids)
    out = rotate(heads, cos, sin, rotary_dim, bool(node.attr("interleaved", 0)))
    return out.transpose(1, 2) if four_d else out.reshape(x.shape)
