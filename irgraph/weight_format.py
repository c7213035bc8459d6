"""Weight formats: how a linear's weight is stored, as data the IR carries and kernels read.

``fxforge::linear(..., weight_format)`` names one of :data:`FORMATS`. A pass sets it (``precision``
``bf16_weights``, the lossless ``exact_bf16_weights``; the quantization passes later); a kernel
reads it from the op and never infers a format from the weight's values. The op's reference
computes the linear on :meth:`WeightFormat.decode` of the weight, so a graph means the same thing
on every backend, and a backend that stores a format natively (the CPU C++ GEMM/GEMV keep bf16
weights in bf16) gives the same numbers.

The formats:

* ``dense``: the weight's own dtype, as it is (the default; graphs stored before formats existed
  load as ``dense``);
* ``bf16``: the weight's values rounded to bfloat16 (round to nearest even), math in the
  activations' dtype; lossless for a weight whose values are all bf16 already
  (:func:`exactly_bf16`);
* ``int8_channel``: symmetric int8 codes, one scale per output channel (``w = q * scale``);
* ``int4_g32``/``g64``/``g128``: 4-bit codes ``q`` in 0..15, two per byte along K (the low
  nibble holds the even k), an fp16 ``scale`` and ``offset`` per group of G values along K
  (``w = q * scale + offset``: GGUF Q4_1's form; a symmetric int4 has ``offset = -8 * scale``);
* ``int8_g32``: int8 codes with an fp16 scale per group of 32 along K (``w = q * scale``);
* ``w8a8``: ``int8_channel``'s codes and scales of the *smoothed* weight ``W * s`` (SmoothQuant:
  ``s`` per input channel) and, in the ``offsets`` slot, ``smooth = 1 / s`` (fp32 ``[K, 1]``);
  the activations are quantized too, per row at run time: ``x * smooth`` to symmetric int8 codes
  with one fp32 scale per row (:func:`w8a8_quantize_rows`), an exact int32 dot product with the
  codes, then ``acc * scale_w[n] * scale_x[m]`` (:func:`w8a8_matmul`, the reference; the one
  format whose math is not ``x @ decode(weight)``).

GGUF's Q8_0 blocks are ``int8_g32`` and its Q4_0/Q4_1 blocks ``int4_g32`` value for value (the
same codes, scales and minimums, laid out per format here; ``irgraph/gguf.py`` maps a file's
blocks). The K-quants are declared slots for later work: ``q4_k``, ``q6_k``. A slot has no
decoding yet: naming one in an op, a kernel or an artifact is a clear error naming it.

Orientation: the op's ``weight`` is ``[K, N]`` (a transposed view of a ``[N, K]`` storage), and
every extra tensor is ``[rows, N]`` the same way: ``scales`` ``[1, N]`` (int8) or ``[K/G, N]``
(int4, int8_g32); int4 codes are ``uint8 [K/2, N]``. :meth:`WeightFormat.in_features` is K from the
stored weight.

To add a format: an entry in :data:`FORMATS` with its ``decode`` (the reference), then the
kernels that store it natively list it in their own table of implemented formats; a kernel that
does not implement it raises :func:`not_implemented_by`, and lowering leaves that linear on its
reference with the reason logged.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

DENSE = "dense"
W8A8 = "w8a8"


class WeightFormatError(ValueError):
    """An unknown weight format, a declared one that nothing implements yet, or one a kernel
    does not implement."""


@dataclasses.dataclass(frozen=True)
class WeightFormat:
    name: str
    bits: Optional[int]             # bits per stored value (None: the weight's own dtype)
    bits_per_weight: Optional[float]   # bytes read per weight, scales included, x 8
    group: Optional[int]            # values sharing one scale: 0 a whole output channel, None none
    extras: tuple[str, ...]         # tensors a linear in this format carries beside its weight
    description: str
    # (weight, *extras) -> the dense values; None: a declared slot
    decode: Optional[Callable[..., torch.Tensor]] = None
    code_dtype: Optional[torch.dtype] = None   # the stored weight's dtype (None: a float)
    # (x, weight, *extras) -> x @ W in fp32, for a format that quantizes the activations too
    # (w8a8); None: the op computes x @ decode(weight)
    matmul: Optional[Callable[..., torch.Tensor]] = None

    @property
    def implemented(self) -> bool:
        return self.decode is not None

    @property
    def codes_per_row(self) -> int:
        """Values of K one stored row of the weight holds (two nibbles per byte for 4 bits)."""
        return 2 if self.bits == 4 else 1

    def in_features(self, weight: torch.Tensor) -> int:
        return weight.shape[0] * self.codes_per_row

    def check_extras(self, weight: torch.Tensor, extras: tuple) -> None:
        """The stored weight and its extras have this format's dtypes and shapes (a
        WeightFormatError naming the first that does not)."""
        given = tuple(e is not None for e in extras)
        if given != tuple(name in self.extras for name in ("scales", "offsets")):
            raise WeightFormatError(f"weight format {self.name!r} takes "
                                    f"{', '.join(self.extras) or 'no extra tensors'}; got "
                                    f"{[n for n, g in zip(('scales', 'offsets'), given) if g]}")
        if self.code_dtype is None:
            return
        if weight.dtype != self.code_dtype or weight.dim() != 2:
            raise WeightFormatError(f"weight format {self.name!r}: the weight must be 2-D "
                                    f"{self.code_dtype}, got {weight.dtype} {list(weight.shape)}")
        rows = 1 if self.group == 0 else self.in_features(weight) // self.group
        for name, extra in zip(("scales", "offsets"), extras):
            dtype, shape = torch.float16, [rows, weight.shape[1]]
            if name == "offsets" and self.name == W8A8:   # the smoothing: one per input channel
                dtype, shape = torch.float32, [weight.shape[0], 1]
            if extra is not None and (extra.dtype != dtype or list(extra.shape) != shape):
                raise WeightFormatError(f"weight format {self.name!r}: {name} must be "
                                        f"{str(dtype).replace('torch.', '')} {shape}, got "
                                        f"{extra.dtype} {list(extra.shape)}")


def _round_to_bf16(weight: torch.Tensor) -> torch.Tensor:
    if weight.dtype == torch.bfloat16:
        return weight
    return weight.to(torch.bfloat16).to(weight.dtype)


def _slot(name: str, bits: int, bits_per_weight: float, group: int, extras: tuple[str, ...],
          description: str) -> WeightFormat:
    return WeightFormat(name, bits, bits_per_weight, group, extras, description)


def unpack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 ``[K/2, N]`` -> the 4-bit values ``[K, N]`` (uint8): row 2j is byte j's low nibble."""
    return torch.stack((codes & 15, codes >> 4), dim=1).reshape(-1, codes.shape[1])


def pack_nibbles(values: torch.Tensor) -> torch.Tensor:
    """``[K, N]`` values in 0..15 -> uint8 ``[K/2, N]`` (the inverse of :func:`unpack_nibbles`)."""
    pairs = values.to(torch.uint8).reshape(-1, 2, values.shape[1])
    return pairs[:, 0] | (pairs[:, 1] << 4)


def _decode_int8_channel(codes: torch.Tensor, scales: torch.Tensor, offsets=None) -> torch.Tensor:
    return codes.float() * scales.float()


def _decode_int8_g32(codes: torch.Tensor, scales: torch.Tensor, offsets=None) -> torch.Tensor:
    return codes.float() * scales.float().repeat_interleave(32, dim=0)


def _decode_int4(group: int) -> Callable[..., torch.Tensor]:
    def decode(codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        # two ops, multiply then add, as GGUF's reference dequantization writes them
        spread = lambda t: t.float().repeat_interleave(group, dim=0)  # noqa: E731
        return unpack_nibbles(codes).float() * spread(scales) + spread(offsets)
    return decode


def w8a8_quantize_rows(x: torch.Tensor, smooth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (any float) -> (codes int8 [M, K], scales fp32 [M]) of ``x * smooth``: per row,
    ``scale = max|row| / 127`` and ``codes = round(row * (127 / max|row|))`` (half to even),
    fp32 math in this order (the CPU kernel's, bit for bit). A row that holds a NaN or an inf
    (or overflows fp32 once smoothed) has no int8 scale: codes 0, scale NaN, so its outputs are
    NaN (never finite garbage); an all-zero row has scale 0."""
    rows = x.float() * smooth.reshape(-1).float()
    amax = rows.abs().amax(dim=1) if rows.shape[1] else rows.new_zeros(rows.shape[0])
    finite = torch.isfinite(rows).all(dim=1)
    amax = torch.where(finite, amax, torch.zeros_like(amax))
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    codes = torch.round(rows * inv.unsqueeze(1)).clamp_(-127, 127)
    codes = torch.where(finite.unsqueeze(1), codes, torch.zeros_like(codes)).to(torch.int8)
    scales = torch.where(finite, amax / 127, torch.full_like(amax, float("nan")))
    return codes, scales


def w8a8_matmul(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                smooth: torch.Tensor) -> torch.Tensor:
    """The reference of ``w8a8``: x [M, K] times the codes [K, N] -> fp32 [M, N] as
    ``(acc * scale_w[n]) * scale_x[m]``, ``acc`` the int32 dot product of the codes (computed in
    fp64 here, exact: |acc| <= K * 127^2 < 2^53; a kernel's int32 holds it for K < 2^17)."""
    x_codes, x_scales = w8a8_quantize_rows(x, smooth)
    acc = x_codes.double() @ codes.double()
    return acc.float() * scales.float() * x_scales.unsqueeze(1)


def _decode_w8a8(codes: torch.Tensor, scales: torch.Tensor, smooth: torch.Tensor) -> torch.Tensor:
    """The dense weight the codes stand for (W = q * scale_w / s): what a weight-only fallback
    or a report reads; the op's reference is :func:`w8a8_matmul`."""
    return codes.float() * scales.float() * smooth.float()


_INT4 = tuple(WeightFormat(f"int4_g{g}", 4, 4 + 2 * 16 / g, g, ("scales", "offsets"),
                           f"4-bit codes in groups of {g} along K, an fp16 scale and offset per group",
                           _decode_int4(g), torch.uint8)
              for g in (32, 64, 128))

FORMATS: dict[str, WeightFormat] = {f.name: f for f in (
    WeightFormat(DENSE, None, None, None, (), "the weight's own dtype", lambda w: w),
    WeightFormat("bf16", 16, 16.0, None, (), "bfloat16 values (the weight rounded to nearest even)",
                 _round_to_bf16),
    WeightFormat("int8_channel", 8, 8.0, 0, ("scales",),
                 "symmetric int8 codes, an fp16 scale per output channel", _decode_int8_channel,
                 torch.int8),
    WeightFormat("int8_g32", 8, 8.5, 32, ("scales",),
                 "int8 codes in groups of 32 along K, an fp16 scale per group (GGUF Q8_0)",
                 _decode_int8_g32, torch.int8),
    *_INT4,
    WeightFormat(W8A8, 8, 8.0, 0, ("scales", "offsets"),
                 "int8 codes and an fp16 scale per output channel of the smoothed weight, "
                 "activations quantized to int8 per row at run time (offsets: fp32 smoothing)",
                 _decode_w8a8, torch.int8, w8a8_matmul),
    _slot("q4_k", 4, 4.5, 256, ("blocks",), "GGUF Q4_K: super-blocks of 256, 6-bit sub-scales (144 B)"),
    _slot("q6_k", 6, 6.5625, 256, ("blocks",), "GGUF Q6_K: super-blocks of 256, 8-bit sub-scales (210 B)"),
)}
QUANTIZED = tuple(name for name, f in FORMATS.items() if f.implemented and f.code_dtype is not None)


def weight_format(name: object) -> WeightFormat:
    """The registered format ``name``, or a WeightFormatError naming it and the known ones."""
    if not isinstance(name, str) or name not in FORMATS:
        raise WeightFormatError(f"unknown weight format {str(name)[:60]!r}; the formats are "
                                f"{sorted(FORMATS)}")
    return FORMATS[name]


def implemented_format(name: object) -> WeightFormat:
    """Like :func:`weight_format`, and an error naming a declared slot nothing implements yet."""
    fmt = weight_format(name)
    if not fmt.implemented:
        raise WeightFormatError(f"weight format {fmt.name!r} ({fmt.description}; carries "
                                f"{', '.join(fmt.extras)}) is declared but not implemented yet")
    return fmt


def not_implemented_by(kernel: str, name: str, implemented) -> WeightFormatError:
    """The error a kernel raises for a format it does not store (lowering then leaves the linear
    on its reference and logs this)."""
    fmt = weight_format(name)
    return WeightFormatError(f"{kernel}: weight format {fmt.name!r} ({fmt.description}) is not "
                             f"implemented by this kernel; it runs {', '.join(implemented)}")


def decode(weight: torch.Tensor, name: str, scales: Optional[torch.Tensor] = None,
           offsets: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The dense values a linear in format ``name`` computes with (the reference), ``[K, N]``."""
    fmt = implemented_format(name)
    if fmt.code_dtype is None:
        return fmt.decode(weight)
    fmt.check_extras(weight, (scales, offsets))
    return fmt.decode(weight, scales, offsets)


def exactly_bf16(weight: torch.Tensor) -> bool:
    """Every value of the fp32 ``weight`` is a bf16 value, so format ``bf16`` loses nothing.
    (A bf16 is the top half of its fp32: exact iff the low 16 bits are zero; NaN and inf too.)"""
    return weight.dtype == torch.float32 and \
        not bool((weight.detach().contiguous().view(torch.int32) & 0xFFFF).any())
