"""Weight quantizers: fp32 weights -> the codes, scales and offsets of a quantized weight format
(:mod:`fxforge.irgraph.weight_format` decodes them; the codes are exact by construction).

Two roundings, both training-free and data-free:

* ``rtn``: round to nearest on the full range (int8: ``max |w| / 127`` per output channel;
  int4: a group's ``[min, max]`` over 15 steps);
* ``mse`` (the default): per channel or group, a search over clipped ranges (the range shrunk by
  a factor in :data:`CLIP_GRID`), each followed by :data:`REFITS` rounds that re-solve the scale
  (and for int4 the offset) by least squares for the codes just chosen, then re-round
  (Lloyd's iteration on a uniform grid, as llama.cpp's ``make_qkx`` quantizers do). The candidate
  with the smallest squared weight error wins. Clipping trades a few outliers' error for a finer
  step on all the other weights; the refit moves the grid onto the values it actually serves.

Scales and offsets are rounded to fp16 *before* the codes are chosen, so the codes are optimal for
the values the kernels read. Work is done in row chunks to bound memory on large matrices.
"""
from __future__ import annotations

from typing import Optional

import torch

CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)
REFITS = 2
ROUNDINGS = ("rtn", "mse", "gptq")   # gptq: passes/gptq.py (needs calibration inputs)
_ROW_CHUNK = 4096   # output rows quantized at once (x 7 candidates x K fp32 values)
_FP16_MAX = torch.finfo(torch.float16).max
_TINY = torch.finfo(torch.float16).tiny   # smallest normal fp16: the floor of a scale


class QuantizeError(ValueError):
    """A weight that cannot be quantized in the asked format (the message names it)."""


def _fp16(value: torch.Tensor) -> torch.Tensor:
    return value.to(torch.float16).to(torch.float32)


def int8_codes(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Round to nearest onto the symmetric int8 grid of ``scale``."""
    return torch.round(w / scale).clamp_(-127, 127)


def int4_codes(w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Round to nearest onto the 16 levels ``offset + q * scale``."""
    return torch.round((w - offset) / scale).clamp_(0, 15)


def int8_scale(rows: torch.Tensor, clip: float = 1.0) -> torch.Tensor:
    """The fp16-rounded scale (``[R, 1]``) that maps ``clip * max |row|`` to 127."""
    return _fp16((rows.abs().amax(dim=1, keepdim=True) * clip / 127).clamp_(min=_TINY))


def int4_range(groups: torch.Tensor, clip: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp16-rounded (scale, offset) (``[R, 1]`` each) spanning ``clip * [min, max]``."""
    low, high = groups.amin(dim=1, keepdim=True) * clip, groups.amax(dim=1, keepdim=True) * clip
    return _fp16(((high - low) / 15).clamp_(min=_TINY)), _fp16(low)


def _int8_candidate(w: torch.Tensor, clip: float, refits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scale) for rows ``w`` [R, K] at one clipping of ``max |w|``."""
    scale = int8_scale(w, clip)
    codes = int8_codes(w, scale)
    for _ in range(refits):   # least-squares scale for these codes: <q, w> / <q, q>
        qq = (codes * codes).sum(dim=1, keepdim=True)
        fitted = (codes * w).sum(dim=1, keepdim=True) / qq.clamp(min=1)
        scale = torch.where(qq > 0, _fp16(fitted.clamp(min=_TINY)), scale)
        codes = int8_codes(w, scale)
    return codes, scale


def _int4_candidate(w: torch.Tensor, clip: float, refits: int) -> tuple[torch.Tensor, ...]:
    """(codes, scale, offset) for groups ``w`` [R, G] at one clipping of ``[min, max]``."""
    scale, offset = int4_range(w, clip)
    codes = int4_codes(w, scale, offset)
    n = w.shape[1]
    for _ in range(refits):   # least squares of w ~ q * scale + offset for these codes
        sq, sw = codes.sum(dim=1, keepdim=True), w.sum(dim=1, keepdim=True)
        sqq, sqw = (codes * codes).sum(dim=1, keepdim=True), (codes * w).sum(dim=1, keepdim=True)
        det = n * sqq - sq * sq
        solvable = det > 0   # a constant group keeps its range fit
        fitted = (n * sqw - sq * sw) / torch.where(solvable, det, torch.ones_like(det))
        scale = torch.where(solvable & (fitted > 0), _fp16(fitted.clamp(min=_TINY)), scale)
        offset = torch.where(solvable, _fp16((sw - scale * sq) / n), offset)
        codes = int4_codes(w, scale, offset)
    return codes, scale, offset


def _best(w: torch.Tensor, candidate, rounding: str) -> tuple[torch.Tensor, ...]:
    """The candidate (per row of ``w``) with the least squared error over the clip grid."""
    grid, refits = (CLIP_GRID, REFITS) if rounding == "mse" else ((1.0,), 0)
    best, best_err = None, None
    for clip in grid:
        found = candidate(w, clip, refits)
        decoded = found[0] * found[1] + (found[2] if len(found) > 2 else 0)
        err = ((decoded - w) ** 2).sum(dim=1, keepdim=True)
        if best is None:
            best, best_err = list(found), err
            continue
        better = err < best_err
        best = [torch.where(better, new, old) for new, old in zip(found, best)]
        best_err = torch.minimum(err, best_err)
    return tuple(best)


def check_quantizable(weight_nk: torch.Tensor, name: str, group: Optional[int]) -> None:
    if weight_nk.dim() != 2 or not weight_nk.dtype.is_floating_point:
        raise QuantizeError(f"{name}: a 2-D float weight is quantized, got {weight_nk.dtype} "
                            f"{list(weight_nk.shape)}")
    if not bool(torch.isfinite(weight_nk).all()):
        raise QuantizeError(f"{name}: the weight holds NaN or inf")
    if group and weight_nk.shape[1] % group:
        raise QuantizeError(f"{name}: {weight_nk.shape[1]} input features are not a multiple of "
                            f"the group size {group}")
    if float(weight_nk.abs().max()) > _FP16_MAX * 15:
        raise QuantizeError(f"{name}: weights beyond the fp16 range of the scales")


def quantize_int8_channel(weight_nk: torch.Tensor, rounding: str = "mse", name: str = "weight",
                          whole_nk: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] -> (int8 codes [N, K], fp16 scales [N, 1]). ``whole_nk``: the rows ``weight_nk``
    is a slice of (``[N, K_whole]``, a tensor-parallel shard's): the scales are the whole rows',
    so the shard's codes are exactly those of the whole weight's quantization."""
    check_quantizable(weight_nk, name, None)
    codes, scales = [], []
    chunks = whole_nk.detach().float().split(_ROW_CHUNK) if whole_nk is not None else None
    for index, rows in enumerate(weight_nk.detach().float().split(_ROW_CHUNK)):
        c, s = _best(rows if chunks is None else chunks[index], _int8_candidate, rounding)
        if chunks is not None:
            c = int8_codes(rows, s)
        codes.append(c.to(torch.int8))
        scales.append(s.to(torch.float16))
    return torch.cat(codes), torch.cat(scales)


def quantize_int4(weight_nk: torch.Tensor, group: int, rounding: str = "mse",
                  name: str = "weight") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, K] -> (codes in 0..15 as uint8 [N, K], fp16 scales and offsets [N, K/group])."""
    check_quantizable(weight_nk, name, group)
    n, k = weight_nk.shape
    codes, scales, offsets = [], [], []
    for rows in weight_nk.detach().float().split(max(1, _ROW_CHUNK * 128 // k)):
        groups = rows.reshape(-1, group)
        c, s, o = _best(groups, _int4_candidate, rounding)
        codes.append(c.to(torch.uint8).reshape(rows.shape))
        scales.append(s.to(torch.float16).reshape(rows.shape[0], k // group))
        offsets.append(o.to(torch.float16).reshape(rows.shape[0], k // group))
    return torch.cat(codes), torch.cat(scales), torch.cat(offsets)
