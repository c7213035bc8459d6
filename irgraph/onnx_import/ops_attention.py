"""The standard ``Attention`` (opset 23-25) and ``RotaryEmbedding`` (opset 23) ops.

Attention maps onto ``scaled_dot_product_attention``, which fxforge keeps whole in its IR and
its attention passes match: plain causal attention becomes ``is_causal=True``; any other mask
(ONNX's bottom-right causal frontier after a cache, sliding windows, ``nonpad_kv_seqlen``, the
``attn_mask`` input) is built as one boolean or additive mask. Softcapping, a softmax precision
other than the inputs' and the ``qk_matmul_output`` output need the scores themselves, so they
take the written-out path (matmul, softmax, matmul).
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F

from fxforge.irgraph.onnx_dtypes import torch_dtype
from fxforge.irgraph.onnx_import.ops_tensor import outputs
from fxforge.irgraph.onnx_import.table import NodeView, converter


def _heads(x: torch.Tensor, heads: Optional[int], node: NodeView, what: str) -> torch.Tensor:
    """(B, S, H*D) -> (B, H, S, D); 4-D inputs are already so."""
    if x.dim() == 4:
        return x
    if not heads:
        raise ValueError(f"{node.label()}: 3-D inputs need the {what} attribute")
    return x.reshape(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Each k/v head shared by ``groups`` query heads (GQA/MQA), as expand + reshape."""
    if groups == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, groups, s, d).reshape(b, h * groups, s, d)


def _allowed(node: NodeView, q, total: int, past: int, nonpad) -> Optional[torch.Tensor]:
    """The boolean (B|1, 1, S_q, L) set of keys each query may attend, None when all."""
    causal = bool(node.attr("is_causal", 0))
    left, right = node.attr("left_window_size", -1), node.attr("right_window_size", -1)
    keys = torch.arange(total, device=q.device).reshape(1, 1, 1, -1)
    allowed: Optional[torch.Tensor] = None

    def both(a, b):
        return b if a is None else a & b
    if causal or left >= 0 or right >= 0:
        # Query i sits at absolute position i + offset: the cached keys before its block.
        offset: Any = past
        if nonpad is not None and not past:
            offset = (nonpad.to(torch.int64) - q.shape[2]).reshape(-1, 1, 1, 1)
        position = torch.arange(q.shape[2], device=q.device).reshape(1, 1, -1, 1) + offset
        if causal:
            allowed = both(allowed, keys <= position)
        if left >= 0:
            allowed = both(allowed, keys >= position - left)
        if right >= 0:
            allowed = both(allowed, keys <= position + right)
    if nonpad is not None:
        allowed = both(allowed, keys < nonpad.to(torch.int64).reshape(-1, 1, 1, 1))
    return allowed


def _pad_mask(mask: torch.Tensor, total: int) -> torch.Tensor:
    """A mask shorter than the keys: the missing keys are masked out."""
    short = total - mask.shape[-1]
    if short == 0:
        return mask
    return F.pad(mask, [0, short], value=False if mask.dtype == torch.bool else float("-inf"))


@converter("Attention", since=23)
def attention(node: NodeView, q, k, v, mask=None, past_key=None, past_value=None, nonpad=None):
    if (past_key is None) != (past_value is None):
        raise ValueError(f"{node.label()}: past_key and past_value come together")
    three_d = q.dim() == 3
    batch, q_len = q.shape[0], q.shape[-2] if not three_d else q.shape[1]
    q = _heads(q, node.attr("q_num_heads"), node, "q_num_heads")
    k = _heads(k, node.attr("kv_num_heads"), node, "kv_num_heads")
    v = _heads(v, node.attr("kv_num_heads"), node, "kv_num_heads")
    past = 0
    if past_key is not None:
        past = past_key.shape[2]
        k, v = torch.cat([past_key, k], 2), torch.cat([past_value, v], 2)
    present_k, present_v = k, v
    k, v = _repeat_kv(k, q.shape[1] // k.shape[1]), _repeat_kv(v, q.shape[1] // v.shape[1])
    total = k.shape[2]
    scale = node.attr("scale") or 1.0 / math.sqrt(q.shape[-1])
    allowed = _allowed(node, q, total, past, nonpad)
    bias = None
    if mask is not None:
        mask = _pad_mask(mask, total)
        if mask.dtype == torch.bool:
            allowed = mask if allowed is None else allowed & mask
        else:
            bias = mask
    precision = node.attr("softmax_precision")
    precision = torch_dtype(precision, node.label()) if precision is not None else q.dtype
    if node.num_outputs > 3 or node.attr("softcap", 0.0) or precision != q.dtype:
        y, scores = _written_out(node, q, k, v, scale, allowed, bias, precision)
    else:
        scores = None
        if bias is None and allowed is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=False, scale=scale)
        elif bias is None and node.attr("is_causal", 0) and _plain_causal(node, past, nonpad):
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=_as_mask(allowed, bias, q),
                                               scale=scale)
            if allowed is not None:   # a row with no key allowed is zeros, not NaN
                y = torch.where(allowed.any(-1, keepdim=True), y, torch.zeros_like(y))
    if three_d:
        y = y.transpose(1, 2).reshape(batch, q_len, -1)
    return outputs(node, y, present_k, present_v, scores)


def _plain_causal(node: NodeView, past: int, nonpad) -> bool:
    """Causal with no cache offset and no window: torch's top-left ``is_causal``."""
    return not past and nonpad is None and node.attr("left_window_size", -1) < 0 and \
        node.attr("right_window_size", -1) < 0


def _as_mask(allowed: Optional[torch.Tensor], bias: Optional[torch.Tensor], q,
             additive: bool = False) -> torch.Tensor:
    """One sdpa mask: boolean while there is no float mask (unless ``additive``), else float."""
    if bias is None and not additive:
        return allowed
    if allowed is None:
        return bias
    blocked = torch.where(allowed, 0.0, float("-inf")).to(q.dtype)
    return blocked if bias is None else bias + blocked


def _written_out(node: NodeView, q, k, v, scale, allowed, bias, precision):
    """Attention as matmul/softmax/matmul, and the ``qk_matmul_output`` its mode asks for."""
    mode = node.attr("qk_matmul_output_mode", 0)
    if mode not in (0, 1, 2, 3):
        raise ValueError(f"{node.label()}: attribute qk_matmul_output_mode={mode} is not 0-3")
    scores = (q * scale) @ k.transpose(-1, -2)
    stages = [scores]
    softcap = node.attr("softcap", 0.0)
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    stages.append(scores)
    if bias is not None or allowed is not None:
        scores = scores + _as_mask(allowed, bias, q, additive=True)
    stages.append(scores)
    probs = torch.softmax(scores.to(precision), -1).to(q.dtype)
    if allowed is not None:
        probs = torch.where(allowed.any(-1, keepdim=True), probs, torch.zeros_like(probs))
    stages.append(probs)
    return probs @ v, stages[mode]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int,
           interleaved: bool) -> torch.Tensor:
    """RoPE on (B, S, H, D) ``x`` with (B, S, rotary_dim/2) ``cos``/``sin``: the first
    ``rotary_dim`` features rotate in pairs (halves, or neighbours when ``interleaved``)."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    head, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    if interleaved:
        x1, x2 = head[..., 0::2], head[..., 1::2]
    else:
        x1, x2 = head.chunk(2, -1)
    real, imag = cos * x1 - sin * x2, sin * x1 + cos * x2
    if interleaved:
        head = torch.stack([real, imag], -1).reshape(head.shape)
    else:
        head = torch.cat([real, imag], -1)
    return torch.cat([head, rest], -1)


def pick_positions(cache: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return cache.index_select(0, positions.reshape(-1)).reshape(*positions.shape, -1)


@converter("RotaryEmbedding", since=23)
def rotary_embedding(node: NodeView, x, cos, sin, position_ids=None):
    four_d = x.dim() == 4
    heads = x.transpose(1, 2) if four_d else \
        _heads(x, node.attr("num_heads"), node, "num_heads").transpose(1, 2)
    if position_ids is not None:
        cos, sin = pick_positions(cos, position_ids), pick_positions(sin, position_ids)
    rotary_dim = node.attr("rotary_embedding_dim", 0) or heads.shape[-1]
    out = rotate(heads, cos, sin, rotary_dim, bool(node.attr("interleaved", 0)))
    return out.transpose(1, 2) if four_d else out.reshape(x.shape)
