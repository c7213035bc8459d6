"""Small pieces the pass tests share."""
import torch
import torch.nn as nn


class Fn(nn.Module):
    """A function as a module, for torch.compile and torch.export."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def greedy_loop(fn, ids, steps):
    """The user's loop: the whole sequence every call; the final ids and every call's logits."""
    outs = []
    for _ in range(steps):
        logits = fn(ids)
        outs.append(logits)
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return ids, outs


def fresh_generator() -> torch.Generator:
    """A generator on a fresh seed (each run its own random inputs)."""
    import os
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))


def random_qkv(gen, batch, heads, kv_heads, length, dim=16):
    """q ``[batch, heads, length, dim]`` and k, v ``[batch, kv_heads, length, dim]``."""
    return (torch.randn(batch, heads, length, dim, generator=gen),
            torch.randn(batch, kv_heads, length, dim, generator=gen),
            torch.randn(batch, kv_heads, length, dim, generator=gen))
