"""A GGUF file's own Q8_0 / Q4_0 / Q4_1 blocks, found for the fp32 weights a model holds.

transformers' ``from_pretrained(..., gguf_file=...)`` dequantizes every tensor of the file to
fp32, so a linear's weight is exactly the file's decoded values; re-quantizing it would lose the
file's grid and spend time. :class:`GGUFBlocks` goes the other way: given such a weight it finds
the file tensor holding the same rows and returns that tensor's blocks as a fxforge weight format
(:mod:`fxforge.irgraph.weight_format`), bit-exact:

* Q8_0 (fp16 ``d`` + 32 int8, 34 B)  -> ``int8_g32``: codes ``q``, scales ``d``;
* Q4_1 (fp16 ``d``, ``m`` + 16 B)     -> ``int4_g32``: codes ``q``, scales ``d``, offsets ``m``;
* Q4_0 (fp16 ``d`` + 16 B)            -> ``int4_g32`` with offsets ``-8 d`` (``(q - 8) d`` and
  ``q d + (-8 d)`` are equal in fp32: every product and the sum are exact, an fp16 ``d`` has 11
  significant bits and ``q - 8`` at most 4; only a zero's sign can differ, see
  :func:`_row_digests`).

Rows are matched by content, not by name: transformers reverse-permutes Llama's q/k rows (so a
weight's row order is not the file's), and the tied LM head has no name of its own in the file.
Each candidate file tensor (same ``[N, K]`` shape) is decoded once and indexed by a digest of each
fp32 row; a weight maps when every one of its rows is found. The result is checked with
``weight_format.decode`` against the weight before it is returned: a mismatch gives None, never
wrong values. Other types (F32, F16, the K-quants) and a K that is not a multiple of 32 are not
mapped; :meth:`GGUFBlocks.summary` counts them.

The file is read as data (``gguf.GGUFReader``'s memory map and numpy views of the raw bytes):
nothing in it is evaluated or unpickled.
"""
from __future__ import annotations

import hashlib
import os
import threading
from collections import Counter, OrderedDict
from typing import Optional

import numpy as np
import torch

from fxforge.irgraph.weight_format import decode, pack_nibbles

MAGIC = b"GGUF"
GROUP = 32
# GGUF type name -> (fxforge format, bytes per block, byte offset of the codes in a block)
_BLOCKS = {"Q8_0": ("int8_g32", 34, 2), "Q4_0": ("int4_g32", 18, 2), "Q4_1": ("int4_g32", 20, 4)}
Mapping = tuple[str, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]


class GGUFError(ValueError):
    """A GGUF file that is missing, unreadable or not GGUF (the message names the path)."""


def _parse_blocks(raw: np.ndarray, qtype: str) -> Mapping:
    """Raw rows ``[R, K/32 * block bytes]`` of a Q8_0/Q4_0/Q4_1 tensor -> (format, codes,
    scales, offsets) in the IR's ``[K, N]`` orientation, stored ``[N, ...]``-major (each a
    transposed view of a contiguous ``[R, ...]`` tensor, as the quantize pass stores its own)."""
    fmt, size, start = _BLOCKS[qtype]
    rows = raw.shape[0]
    blocks = np.ascontiguousarray(raw).reshape(rows, -1, size)
    # copies: the fp16 fields sit at byte offsets a view could not reinterpret in place
    d = torch.from_numpy(blocks[:, :, 0:2].copy().view(np.float16).reshape(rows, -1))
    if qtype == "Q8_0":
        q = torch.from_numpy(blocks[:, :, start:].copy().view(np.int8).reshape(rows, -1))
        return fmt, q.t(), d.t(), None
    nibbles = torch.from_numpy(blocks[:, :, start:].copy())          # [R, K/32, 16]
    # GGUF puts a block's elements 0..15 in the low nibbles and 16..31 in the high ones;
    # fxforge pairs neighbours (k = 2j low, 2j+1 high): unpack to values, then repack
    values = torch.cat((nibbles & 15, nibbles >> 4), dim=2).reshape(rows, -1)   # [R, K]
    codes = pack_nibbles(values.t()).t().contiguous().t()                       # [K/2, R]
    if qtype == "Q4_1":
        m = torch.from_numpy(blocks[:, :, 2:4].copy().view(np.float16).reshape(rows, -1))
    else:   # Q4_0: w = (q - 8) d = q d + (-8 d); -8 d is exact in fp16 unless it overflows
        m = (d.float() * -8).half()   # (an overflow decodes to inf and fails the final check)
    return fmt, codes, d.t(), m.t()


class _Tensor:
    """One mappable tensor of the file: its name, GGUF type, raw ``[N, bytes]`` rows (a view
    of the memory map) and, once built, the digest -> row index of its decoded rows."""

    def __init__(self, name: str, qtype: str, raw: np.ndarray):
        self.name, self.qtype, self.raw = name, qtype, raw
        self.rows: Optional[dict[bytes, int]] = None


def _row_digests(values_nk: torch.Tensor) -> list[bytes]:
    """A 128-bit digest of each fp32 row's bytes, zeros made +0.0 first (``x + 0.0``): Q4_0's
    ``(q - 8) d`` at ``q = 8`` is -0.0 for a negative ``d`` where ``q d + (-8 d)`` is +0.0.
    The two are equal values (``torch.equal`` holds; a product with either adds nothing to a
    sum), the only bits a mapping may differ in. A NaN's row hashes but never verifies."""
    rows = (values_nk.detach() + 0.0).contiguous().numpy()
    return [hashlib.blake2b(rows[i], digest_size=16).digest() for i in range(rows.shape[0])]


def _decodes_to(mapping: Mapping, weight_nk: torch.Tensor) -> bool:
    fmt, codes, scales, offsets = mapping
    return torch.equal(decode(codes, fmt, scales, offsets), weight_nk.t())


class GGUFBlocks:
    """A GGUF file's Q8_0/Q4_0/Q4_1 tensors, indexed to map fp32 weights back to their blocks."""

    def __init__(self, path: str, reader) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._types: Counter = Counter()
        self._unmapped: Counter = Counter()
        self._by_shape: dict[tuple[int, int], list[_Tensor]] = {}
        self._rows_by_k: dict[int, dict[bytes, tuple[_Tensor, int]]] = {}   # _rows_of_width
        for t in reader.tensors:
            qtype = t.tensor_type.name
            self._types[qtype] += 1
            dims = [int(s) for s in t.shape]   # GGUF order: the fastest dimension first
            if qtype not in _BLOCKS:
                self._unmapped[f"type {qtype}"] += 1
            elif len(dims) != 2 or dims[0] % GROUP:
                self._unmapped[f"{qtype} not 2-D with K a multiple of {GROUP}"] += 1
            else:
                k, n = dims
                raw = np.asarray(t.data).reshape(n, -1)
                if raw.dtype != np.uint8 or raw.shape[1] != k // GROUP * _BLOCKS[qtype][1]:
                    self._unmapped[f"{qtype} with an unexpected block layout"] += 1
                    continue
                self._by_shape.setdefault((n, k), []).append(_Tensor(t.name, qtype, raw))
        self._reader = reader   # holds the memory map the raw views point into

    @classmethod
    def open(cls, path) -> "GGUFBlocks":
        """Read ``path``'s tensor table (the data stays memory-mapped); a GGUFError naming the
        path when it is missing, unreadable or not a GGUF file."""
        path = os.fspath(path)
        try:
            with open(path, "rb") as f:
                magic = f.read(4)
        except OSError as exc:
            raise GGUFError(f"GGUF file {path!r} cannot be read: {exc.strerror or exc}") from exc
        if magic != MAGIC:
            raise GGUFError(f"{path!r} is not a GGUF file (it starts with {magic!r}, "
                            f"not {MAGIC!r})")
        try:
            import gguf
            reader = gguf.GGUFReader(path, "r")
        except ImportError as exc:
            raise GGUFError(f"reading GGUF file {path!r} needs the 'gguf' package") from exc
        except Exception as exc:   # a truncated or corrupt file: the reader's own reason
            raise GGUFError(f"GGUF file {path!r} cannot be parsed: "
                            f"{type(exc).__name__}: {exc}") from exc
        return cls(path, reader)

    def _index(self, tensor: _Tensor) -> dict[bytes, int]:
        """Decode ``tensor`` once (through fxforge's own decode, the values the mapping will
        compute with) and keep only its row digests: a whole file decoded would not fit
        comfortably (SmolLM2-135M is ~540 MB in fp32)."""
        with self._lock:
            if tensor.rows is None:
                fmt, codes, scales, offsets = _parse_blocks(tensor.raw, tensor.qtype)
                digests = _row_digests(decode(codes, fmt, scales, offsets).t())
                index: dict[bytes, int] = {}
                for row, digest in enumerate(digests):
                    index.setdefault(digest, row)   # equal rows: any one of them will do
                tensor.rows = index
            return tensor.rows

    def find(self, weight_nk: torch.Tensor) -> Optional[Mapping]:
        """The file's blocks for the fp32 ``[N, K]`` weight ``weight_nk`` as (format name,
        codes, scales, offsets) in the IR's ``[K, N]`` layout, rows gathered in the weight's
        order, such that ``decode(codes, fmt, scales, offsets)`` equals ``weight_nk.t()``
        exactly; None when the file's Q8_0/Q4_0/Q4_1 tensors do not hold exactly these rows.
        A tensor of the same shape is tried first; then rows from several tensors of the same
        K (a projection fxforge fused from several linears: q/k/v, gate/up)."""
        if not isinstance(weight_nk, torch.Tensor) or weight_nk.dim() != 2 or \
                weight_nk.dtype != torch.float32 or weight_nk.numel() == 0:
            return None
        weight = weight_nk.detach().cpu().contiguous()
        digests = _row_digests(weight)
        for tensor in self._by_shape.get(tuple(weight.shape), []):
            index = self._index(tensor)
            if digests[0] not in index:   # the usual miss (another layer's tensor), seen at once
                continue
            rows = [index.get(d) for d in digests]
            if any(r is None for r in rows):
                continue
            mapping = _parse_blocks(tensor.raw[np.asarray(rows, dtype=np.int64)], tensor.qtype)
            if _decodes_to(mapping, weight):
                return mapping
            # a digest collision (rows matched, values not): try the other candidates
        return self._find_across(weight, digests)

    def _rows_of_width(self, k: int) -> dict[bytes, tuple[_Tensor, int]]:
        """Row digest -> (tensor, row) over every mappable tensor with K = ``k``, built once
        (a model's fused projections all ask for the same K)."""
        if k not in self._rows_by_k:
            where: dict[bytes, tuple[_Tensor, int]] = {}
            for tensor in [t for (_, width), ts in self._by_shape.items() if width == k for t in ts]:
                for digest, row in self._index(tensor).items():
                    where.setdefault(digest, (tensor, row))
            with self._lock:
                self._rows_by_k.setdefault(k, where)
        return self._rows_by_k[k]

    def _find_across(self, weight: torch.Tensor, digests: list[bytes]) -> Optional[Mapping]:
        """Rows gathered from any of the file's tensors with the weight's K, one format."""
        where = self._rows_of_width(weight.shape[1])
        found = [where.get(d) for d in digests]
        if any(f is None for f in found) or \
                len({_BLOCKS[t.qtype][0] for t, _ in found}) != 1:   # Q8_0 rows beside Q4 rows
            return None
        parts = []   # consecutive rows from one tensor, parsed together
        for tensor, row in found:
            if parts and parts[-1][0] is tensor:
                parts[-1][1].append(row)
            else:
                parts.append((tensor, [row]))
        pieces = [_parse_blocks(t.raw[np.asarray(rows, dtype=np.int64)], t.qtype) for t, rows in parts]
        fmt = pieces[0][0]
        joined = [torch.cat([p[i] for p in pieces], dim=1).t().contiguous().t()
                  if pieces[0][i] is not None else None for i in (1, 2, 3)]
        mapping = (fmt, *joined)
        return mapping if _decodes_to(mapping, weight) else None

    def summary(self) -> dict:
        """Counts per GGUF type, how many tensors are mappable, and why the others are not."""
        mappable = sum(len(ts) for ts in self._by_shape.values())
        indexed = sum(t.rows is not None for ts in self._by_shape.values() for t in ts)
        return {"path": self.path, "tensors": sum(self._types.values()),
                "types": dict(self._types), "mappable": mappable,
                "not_mappable": dict(self._unmapped), "indexed": indexed}


_CACHE: "OrderedDict[tuple, GGUFBlocks]" = OrderedDict()
_CACHE_SIZE = 4   # each entry holds a memory map and its row digests (~20 MB for SmolLM2)
_CACHE_LOCK = threading.Lock()


def open_blocks(path) -> GGUFBlocks:
    """:meth:`GGUFBlocks.open`, cached in-process per (real path, mtime, size): a large file's
    tensors are decoded and indexed once however many compiles ask, and a rewritten file is
    read afresh."""
    path = os.fspath(path)
    try:
        real = os.path.realpath(path)
        st = os.stat(real)
    except OSError as exc:
        raise GGUFError(f"GGUF file {path!r} cannot be read: {exc.strerror or exc}") from exc
    key = (real, st.st_mtime_ns, st.st_size)
    with _CACHE_LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    blocks = GGUFBlocks.open(real)
    with _CACHE_LOCK:
        blocks = _CACHE.setdefault(key, blocks)
        _CACHE.move_to_end(key)
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return blocks
