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
* declared slots, which the quantization issue fills (each lists the tensors it will carry
  beside the weight): ``int8_channel``, ``int4_g32``/``g64``/``g128``, and the GGUF blocks
  ``q8_0``, ``q4_0``, ``q4_1``, ``q4_k``, ``q6_k``. A slot has no decoding yet: naming one in an
  op, a kernel or an artifact is a clear error naming it.

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
    decode: Optional[Callable[[torch.Tensor], torch.Tensor]] = None   # None: a declared slot

    @property
    def implemented(self) -> bool:
        return self.decode is not None


def _round_to_bf16(weight: torch.Tensor) -> torch.Tensor:
    if weight.dtype == torch.bfloat16:
        return weight
    return weight.to(torch.bfloat16).to(weight.dtype)


def _slot(name: str, bits: int, bits_per_weight: float, group: int, extras: tuple[str, ...],
          description: str) -> WeightFormat:
    return WeightFormat(name, bits, bits_per_weight, group, extras, description)


_INT4 = tuple(_slot(f"int4_g{g}", 4, 4 + 2 * 16 / g, g, ("scales", "zeros"),
                    f"4-bit groups of {g} along K, an fp16/bf16 scale and zero point per group")
              for g in (32, 64, 128))

FORMATS: dict[str, WeightFormat] = {f.name: f for f in (
    WeightFormat(DENSE, None, None, None, (), "the weight's own dtype", lambda w: w),
    WeightFormat("bf16", 16, 16.0, None, (), "bfloat16 values (the weight rounded to nearest even)",
                 _round_to_bf16),
    _slot("int8_channel", 8, 8.0, 0, ("scales",), "symmetric int8, one scale per output channel"),
    *_INT4,
    _slot("q8_0", 8, 8.5, 32, ("blocks",), "GGUF Q8_0: blocks of 32 int8 and an fp16 scale (34 B)"),
    _slot("q4_0", 4, 4.5, 32, ("blocks",), "GGUF Q4_0: blocks of 32 nibbles and an fp16 scale (18 B)"),
    _slot("q4_1", 4, 5.0, 32, ("blocks",), "GGUF Q4_1: Q4_0 plus an fp16 minimum (20 B)"),
    _slot("q4_k", 4, 4.5, 256, ("blocks",), "GGUF Q4_K: super-blocks of 256, 6-bit sub-scales (144 B)"),
    _slot("q6_k", 6, 6.5625, 256, ("blocks",), "GGUF Q6_K: super-blocks of 256, 8-bit sub-scales (210 B)"),
)}


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


def decode(weight: torch.Tensor, name: str) -> torch.Tensor:
    """The dense values a linear in format ``name`` computes with (the reference)."""
    return implemented_format(name).decode(weight)


def exactly_bf16(weight: torch.Tensor) -> bool:
    """Every value of the fp32 ``weight`` is a bf16 value, so format ``bf16`` loses nothing.
    (A bf16 is the top half of its fp32: exact iff the low 16 bits are zero; NaN and inf too.)"""
    return weight.dtype == torch.float32 and \
        not bool((weight.detach().contiguous().view(torch.int32) & 0xFFFF).any())
