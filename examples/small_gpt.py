"""A small nanoGPT-style language model and an MLP block, written in plain torch.

These are the compiler's "home-grown" workloads: every op is spelled out
(explicit q/k/v matmuls, scale, causal mask via ``masked_fill`` on a registered
``tril`` buffer, softmax, matmul) so that the captured FX graph contains the
primitive attention pattern rather than a fused ``scaled_dot_product_attention``
call. There is no KV cache: ``forward`` recomputes the whole prefix.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 512
    block_size: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    bias: bool = True


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention with the mask applied by ``masked_fill``."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        if cfg.n_embd % cfg.n_head:
            raise ValueError(f"n_embd={cfg.n_embd} is not divisible by n_head={cfg.n_head}")
        self.n_head = cfg.n_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        tril = torch.tril(torch.ones(cfg.block_size, cfg.block_size, dtype=torch.bool))
        self.register_buffer("tril", tril.view(1, 1, cfg.block_size, cfg.block_size), persistent=False)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.n_head, self.head_dim).transpose(1, 2)  # B, H, T, D

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self._heads(self.q_proj(x)), self._heads(self.k_proj(x)), self._heads(self.v_proj(x))
        att = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
        att = att.masked_fill(~self.tril[:, :, :t, :t], float("-inf"))
        att = F.softmax(att, dim=-1)
        y = torch.matmul(att, v)  # B, H, T, D
        y = y.transpose(1, 2).contiguous().view(b, t, c)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool = True):
        super().__init__()
        self.c_fc = nn.Linear(dim, hidden, bias=bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class SmallGPT(nn.Module):
    """Decoder-only LM: token + learned position embeddings, tied ``lm_head``."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying
        self.apply(self._init_weights)
        # GPT-2 scales residual projections by 1/sqrt(2 * n_layer) so that
        # activations keep a sane magnitude through depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        _, t = idx.shape
        if t > self.config.block_size:
            raise ValueError(f"sequence length {t} exceeds block_size {self.config.block_size}")
        pos = torch.arange(t, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def make_model(seed: int = 0, **overrides) -> SmallGPT:
    """Build a ``SmallGPT`` with deterministic random weights, in eval mode.

    ``overrides`` replace fields of the default :class:`GPTConfig`.
    """
    cfg = replace(GPTConfig(), **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SmallGPT(cfg)
    return model.eval()


def example_inputs(batch: int = 1, seq: int = 32, seed: int = 0, vocab_size: int = GPTConfig.vocab_size):
    """Random token ids ``(idx,)`` of shape ``[batch, seq]``."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, vocab_size, (batch, seq), generator=gen),)


class MLPBlock(nn.Module):
    """``LayerNorm(x + Linear(GELU(Linear(x))))``: the classic post-LN feed-forward block."""

    def __init__(self, dim: int = 512, hidden: int = 2048):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.fc2(self.act(self.fc1(x))))


def make_mlp_block(seed: int = 0, dim: int = 512, hidden: int = 2048) -> MLPBlock:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        block = MLPBlock(dim, hidden)
    return block.eval()


def mlp_example_inputs(batch: int = 8, seq: int = 64, dim: int = 512, seed: int = 0):
    """A float input ``(x,)`` of shape ``[batch, seq, dim]``."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, seq, dim, generator=gen),)
