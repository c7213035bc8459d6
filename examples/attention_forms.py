"""Tiny causal decoders whose attention is written in the many ways people write it.

Each entry of :data:`FORMS` computes ``softmax(q k^T * scale + causal mask) v`` for one block of
:class:`FormDecoder` in one written form: the operators (``@``, ``torch.matmul``, ``einsum`` in
several index namings, ``baddbmm``), where the scale goes (scores, q or k; multiply or divide),
how the causal mask is made (``tril``/``triu`` buffers or calls, ``arange`` comparisons, additive
``-inf`` buffers), how softmax is spelled (``F.softmax``, ``.softmax``, ``torch.softmax``, exp
over sum), grouped-query k/v (``repeat_interleave``, Hugging Face's ``repeat_kv``, broadcasting)
and how a fused qkv projection is split (``split``, ``chunk``, ``view`` + ``unbind``).
``tests/passes/test_attention_forms.py`` checks that every form fuses into one attention op and
decodes incrementally under ``kv_cache``; ``bench/attention_forms.py`` times its decode steps.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

VOCAB, DIM, HEADS, HEAD_DIM, BLOCK = 64, 32, 4, 8, 512
SCALE = 1.0 / math.sqrt(HEAD_DIM)


class FormDecoder(nn.Module):
    """tokens -> embeddings + learned positions -> x + attention(x) (written in ``form``) -> logits."""

    def __init__(self, form: str, kv_heads: int = HEADS, block: int = BLOCK):
        super().__init__()
        if form not in FORMS:
            raise ValueError(f"unknown attention form {form!r}; known: {', '.join(FORMS)}")
        self.form, self.kv_heads = form, kv_heads
        self.tok, self.pos = nn.Embedding(VOCAB, DIM), nn.Embedding(block, DIM)
        self.qkv = nn.Linear(DIM, DIM + 2 * kv_heads * HEAD_DIM)
        self.out, self.head = nn.Linear(DIM, DIM), nn.Linear(DIM, VOCAB)
        self.register_buffer("tril", torch.ones(block, block, dtype=torch.bool).tril()[None, None],
                             persistent=False)
        self.register_buffer("minus_inf_above", torch.full((block, block), float("-inf")).triu(1),
                             persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        return self.head(x + self.out(FORMS[self.form](self, x)))

    def split_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q ``[B, H, T, D]``, k and v ``[B, Hkv, T, D]`` from the fused projection (``split``)."""
        b, t, _ = x.shape
        kv = self.kv_heads * HEAD_DIM
        q, k, v = self.qkv(x).split([DIM, kv, kv], dim=-1)
        return (q.view(b, t, HEADS, HEAD_DIM).transpose(1, 2),
                k.view(b, t, self.kv_heads, HEAD_DIM).transpose(1, 2),
                v.view(b, t, self.kv_heads, HEAD_DIM).transpose(1, 2))


def merge_heads(y: torch.Tensor) -> torch.Tensor:
    """``[B, H, T, D]`` -> ``[B, T, H * D]``."""
    b, h, t, d = y.shape
    return y.transpose(1, 2).reshape(b, t, h * d)


def matmul_operator(m: FormDecoder, x: torch.Tensor) -> torch.Tensor:
    """nanoGPT: ``@``, scale on the scores, ``masked_fill`` with a sliced ``tril`` buffer."""
    q, k, v = m.split_heads(x)
    t = x.shape[1]
    att = q @ k.transpose(-2, -1) * SCALE
    att = att.masked_fill(~m.tril[:, :, :t, :t], float("-inf"))
    return merge_heads(F.softmax(att, dim=-1) @ v)


def torch_matmul_divide(m: FormDecoder, x: torch.Tensor) -> torch.Tensor:
    """``torch.matmul``, divided by sqrt(d), mask ``torch.ones(t, t).tril() == 0``, ``.softmax``."""
    q, k, v = m.split_heads(x)
    t = x.shape[1]
    att = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(HEAD_DIM)
    att = att.masked_fill(torch.ones(t, t, device=x.device).tril() == 0, float("-inf"))
    return merge_heads(torch.matmul(att.softmax(-1), v))


def einsum_heads_first(m: FormDecoder, x: torch.Tensor) -> torch.Tensor:
    """``einsum("bhqd,bhkd->bhqk")`` and ``einsum("bhqk,bhkd->bhqd")``, ``triu`` mask, ``torch.softmax``."""
    q, k, v = m.split_heads(x)
    t = x.shape[1]
    att = torch.einsum("bhqd,bhkd->bhqk", q, k) * SCALE
    above = torch.triu(torch.ones(t, t, dtype=torch.bool, device=x.device), diagonal=1)
    att = att.masked_fill(above, float("-inf"))
    return merge_heads(torch.einsum("bhqk,bhkd->bhqd", torch.softmax(att, dim=-1), v))


def einsum_sequence_first(m: FormDecoder, x: torch.Tensor) -> torch.Tensor:
    """Heads never transposed: ``einsum("bihd,bjhd->bhij")``, a mask from ``arange`` comparisons,
    ``torch.where``, output ``einsum("bhij,bjhd->bihd")``."""
    b, t, _ = x.shape
    q, k, v = (y.reshape(b, t, HEADS, HEAD_DIM) for y in m.qkv(x).split(DIM, dim=-1))
    att = torch.einsum("bihd,bjhd->bhij", q * SCALE, k)
    position = torch.arange(t, device=x.device)
    keep = position[:, None] >= position[None, :]
    att = torch.where(keep, att, torch.tensor(float("-inf"), device=x.device))
    return torch.einsum("bhij,bjhd->bihd", F.softmax(att, -1), v).reshape(b, t, DIM)


def baddbmm_additive(m: FormDecoder, x: torch.Tensor) -> torch.Tensor:
    """BLOOM-style: flattened heads, ``baddbmm(additive -inf buffer, q, k^T, alpha=scale)``."""
    q, k, v = m.split_heads(x)
    b, t = x.shape[:2]
    q3, k3, v3 = (y.reshape(b * HEADS, t, HEAD_DIM) for y in (q, k, v))
    att = torch.baddbmm(m.minus_inf_above[:t, :t], q3, k3.transpose(1, 2), beta=1.0, alpha=SCALE)
    y = torch.bmm(F.softmax(att, dim=-1), v3)
    return merge_heads(y.view(b, HEADS, t, HEAD_DIM))


def baddbmm_zeros(m: FormDecoder, x: torch.Tensor) -> torch.Tensor:
    """GPT-NeoX-style: ``baddbmm(zeros, q, k^T, beta=0, alpha=scale)``, then ``masked_fill``."""
    q, k, v = m.split_heads(x)
    b, t = x.shape[:2]
    q3, k3 = q.reshape(b * HEADS, t, HEAD_DIM), k.reshape(b * HEADS, t, HEAD_DIM)
    zeros = torch.zeros(b * HEADS, t, t, dtype=q.dtype, device=x.device)
    att = torch.baddbmm(zeros, q3, k3.transpose(1, 2), beta=0.0, alpha=SCALE).view(b, HEADS, t, t)
    att = att.masked_fill(~m.tril[:, :, :t, :t], torch.finfo(att.dtype).min)
    return merge_heads(torch.matmul(nn.functional.softmax(att, dim=-1), v))


def scale_on_key(m: FormDecoder, x: torch.Tensor) -> torch.Tensor:
    """The scale on k, an additive ``-inf`` buffer, softmax as exp over sum (max subtracted)."""
    q, k, v = m.split_heads(x)
    t = x.shape[1]
    att = q @ (k * SCALE).transpose(-2, -1) + m.minus_inf_above[:t, :t]
    att = (att - att.amax(dim=-1, keepdim=True)).exp()
    return merge_heads((att / att.sum(dim=-1, keepdim=True)) @ v)


def scale_on_query_divide(m: FormDecoder, x: torch.Tensor) -> torch.Tensor:
    """q divided by sqrt(d), k transposed by ``.mT``, ``torch.tril`` mask, plain exp over sum."""
    q, k, v = m.split_heads(x)
    t = x.shape[1]
    att = (q / math.sqrt(HEAD_DIM)) @ k.mT
    att = att.masked_fill(torch.tril(torch.ones(t, t, device=x.device)) == 0, float("-inf"))
    weights = torch.exp(att)
    return merge_heads(weights / torch.sum(weights, dim=-1, keepdim=True) @ v)


def gqa_repeat_interleave(m: FormDecoder, x: torch.Tensor) -> torch.Tensor:
    """Grouped k/v repeated by ``repeat_interleave``."""
    q, k, v = m.split_heads(x)
    rep = HEADS // m.kv_heads
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return matmul_attention(m, q, k, v, x.shape[1])


def gqa_repeat_kv(m: FormDecoder, x: torch.Tensor) -> torch.Tensor:
    """Hugging Face ``repeat_kv``: ``[:, :, None].expand(...).reshape(...)``."""
    q, k, v = m.split_heads(x)

    def repeat_kv(y: torch.Tensor) -> torch.Tensor:
        b, h, s, d = y.shape
        return y[:, :, None, :, :].expand(b, h, HEADS // h, s, d).reshape(b, HEADS, s, d)
    return matmul_attention(m, q, repeat_kv(k), repeat_kv(v), x.shape[1])


def gqa_broadcast(m: FormDecoder, x: torch.Tensor) -> torch.Tensor:
    """Grouped heads by broadcasting: q ``[B, Hkv, rep, T, D]`` against k ``[B, Hkv, 1, T, D]``."""
    q, k, v = m.split_heads(x)
    b, t = x.shape[:2]
    q5 = q.view(b, m.kv_heads, HEADS // m.kv_heads, t, HEAD_DIM)
    att = q5 @ k.unsqueeze(2).transpose(-1, -2) * SCALE
    att = att.masked_fill(~m.tril[:, :, :t, :t].unsqueeze(2), float("-inf"))
    y = att.softmax(dim=-1) @ v.unsqueeze(2)
    return merge_heads(y.reshape(b, HEADS, t, HEAD_DIM))


def qkv_chunk(m: FormDecoder, x: torch.Tensor) -> torch.Tensor:
    """A fused projection split by ``chunk``; heads by ``view`` + ``permute``."""
    b, t, _ = x.shape
    q, k, v = (y.view(b, t, HEADS, HEAD_DIM).permute(0, 2, 1, 3) for y in m.qkv(x).chunk(3, dim=-1))
    return matmul_attention(m, q, k, v, t)


def qkv_unbind(m: FormDecoder, x: torch.Tensor) -> torch.Tensor:
    """timm-style: ``view(B, T, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)``."""
    b, t, _ = x.shape
    q, k, v = m.qkv(x).view(b, t, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4).unbind(0)
    return matmul_attention(m, q, k, v, t)


def key_pre_transposed(m: FormDecoder, x: torch.Tensor) -> torch.Tensor:
    """k laid out ``[B, H, D, T]`` straight from the projection by one ``permute(0, 2, 3, 1)``."""
    b, t, _ = x.shape
    q, k, v = (y.view(b, t, HEADS, HEAD_DIM) for y in m.qkv(x).split(DIM, dim=-1))
    att = q.permute(0, 2, 1, 3) @ k.permute(0, 2, 3, 1) * SCALE
    att = att.masked_fill(~m.tril[:, :, :t, :t], float("-inf"))
    return merge_heads(F.softmax(att, dim=-1) @ v.permute(0, 2, 1, 3))


def contiguous_copies(m: FormDecoder, x: torch.Tensor) -> torch.Tensor:
    """``.contiguous()`` and ``.clone()`` around the contractions; flattened ``torch.bmm``."""
    q, k, v = m.split_heads(x)
    b, t = x.shape[:2]
    q3 = q.contiguous().view(b * HEADS, t, HEAD_DIM)
    kt3 = k.transpose(-2, -1).contiguous().view(b * HEADS, HEAD_DIM, t)
    att = torch.mul(torch.bmm(q3, kt3).view(b, HEADS, t, t).clone(), SCALE)
    att = att.masked_fill(m.tril[:, :, :t, :t].logical_not(), float("-inf"))
    y = torch.bmm(F.softmax(att, dim=-1).contiguous().view(b * HEADS, t, t), v.reshape(b * HEADS, t, HEAD_DIM))
    return merge_heads(y.view(b, HEADS, t, HEAD_DIM))


def matmul_attention(m: FormDecoder, q, k, v, t: int) -> torch.Tensor:
    """The plain form the GQA and projection-split variants share."""
    att = q @ k.transpose(-2, -1) * SCALE
    att = att.masked_fill(~m.tril[:, :, :t, :t], float("-inf"))
    return merge_heads(F.softmax(att, dim=-1) @ v)


FORMS: dict[str, Callable[[FormDecoder, torch.Tensor], torch.Tensor]] = {
    f.__name__: f for f in (
        matmul_operator, torch_matmul_divide, einsum_heads_first, einsum_sequence_first,
        baddbmm_additive, baddbmm_zeros, scale_on_key, scale_on_query_divide,
        gqa_repeat_interleave, gqa_repeat_kv, gqa_broadcast, qkv_chunk, qkv_unbind,
        key_pre_transposed, contiguous_copies)}
GROUPED = {"gqa_repeat_interleave", "gqa_repeat_kv", "gqa_broadcast"}   # built with 2 kv heads


def make_model(form: str, block: int = BLOCK) -> FormDecoder:
    return FormDecoder(form, kv_heads=2 if form in GROUPED else HEADS, block=block).eval()
