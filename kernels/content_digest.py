"""Digests of weights and cache files: XXH3-128 (the ``xxhash`` package).

fxforge hashes every weight at compile time (packs shared by content, ``shared_packs.py``; the
graph cache's key, ``fxforge/graph_cache.py``) and every graph-cache file it writes and reads.
SHA-256 took 319 ms of SmolLM2's compile for the packs alone on a 2-core Zen 4 (2026-12-04), at
~1.7 GB/s; XXH3 reads tens of GB/s. A collision would hand a kernel another weight's pack, so the
digest is 128 bits; the weights and the per-user cache are the user's own (no one picks them to
collide; an artifact, which may come from anyone, is checked with SHA-256 in ``fxforge/aot.py``).
Without the package (a machine installed with ``--no-deps``) SHA-256 serves; its digests carry
another prefix, so the two never compare equal.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

try:
    import xxhash

    def _hasher():
        return xxhash.xxh3_128()
    _PREFIX = "xxh3:"
except ImportError:   # installed without its dependencies: slower, the same role
    def _hasher():
        return hashlib.sha256()
    _PREFIX = "sha256:"


def tensor_digest(tensor: torch.Tensor) -> str:
    """A digest of the tensor's bytes (not of its dtype or shape); "" for an empty tensor."""
    data = tensor.detach().to("cpu").contiguous().reshape(-1)
    if not data.numel():
        return ""
    hasher = _hasher()
    hasher.update(data.view(torch.uint8).numpy())
    return _PREFIX + hasher.hexdigest()


def file_digest(path: Path) -> str:
    """A digest of the file's bytes, read in 4 MB blocks."""
    hasher = _hasher()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            hasher.update(block)
    return _PREFIX + hasher.hexdigest()
