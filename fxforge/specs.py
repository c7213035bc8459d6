"""Input specs: the ``--example`` strings of the CLI, and the checks an artifact runs on inputs.

Spec grammar: ``DTYPE[DIM,...]`` with an optional value range ``{LOW..HIGH}`` for integer inputs.
A DIM is a size (``16``) or a named dynamic size ``NAME=SIZE`` with an optional range
``NAME=SIZE:MIN..MAX``. Example: ``int64[1,seq=16:2..512]{0..49152}``.
Inputs whose dims share a name share one dynamic size.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import sympy
import torch

from fxforge.errors import InputSpecError

_SPEC = re.compile(r"^\s*(\w+)\s*\[([^\]]*)\]\s*(?:\{\s*(-?\d+)\s*\.\.\s*(-?\d+)\s*\})?\s*$")
_DIM = re.compile(r"^\s*(?:(\w+)\s*=\s*)?(\d+)\s*(?::\s*(\d+)\s*\.\.\s*(\d+))?\s*$")


@dataclass(frozen=True)
class DimSpec:
    size: int
    name: Optional[str] = None
    min: Optional[int] = None
    max: Optional[int] = None


@dataclass(frozen=True)
class InputSpec:
    dtype: torch.dtype
    dims: tuple[DimSpec, ...]
    low: Optional[int] = None
    high: Optional[int] = None

    def example(self, generator: torch.Generator) -> torch.Tensor:
        shape = [d.size for d in self.dims]
        if self.dtype.is_floating_point or self.dtype.is_complex:
            return torch.randn(shape, dtype=self.dtype, generator=generator)
        if self.dtype == torch.bool:
            return torch.randint(0, 2, shape, generator=generator).bool()
        low = 0 if self.low is None else self.low
        high = 2 if self.high is None else self.high
        return torch.randint(low, high, shape, dtype=self.dtype, generator=generator)


def parse_spec(text: str) -> InputSpec:
    match = _SPEC.match(text)
    if not match:
        raise InputSpecError(f"bad input spec {text!r}; expected e.g. 'float32[2,8]' or "
                             "'int64[1,seq=16:2..512]{0..1000}'")
    dtype = getattr(torch, match.group(1), None)
    if not isinstance(dtype, torch.dtype):
        raise InputSpecError(f"bad input spec {text!r}: unknown dtype {match.group(1)!r}")
    dims = []
    for part in filter(None, (p.strip() for p in match.group(2).split(","))):
        dim = _DIM.match(part)
        if not dim:
            raise InputSpecError(f"bad input spec {text!r}: bad dimension {part!r}")
        name, size, lo, hi = dim.groups()
        dims.append(DimSpec(int(size), name, int(lo) if lo else None, int(hi) if hi else None))
    low, high = match.group(3), match.group(4)
    return InputSpec(dtype, tuple(dims), int(low) if low else None, int(high) if high else None)


def export_dynamic_shapes(specs: Sequence[InputSpec]) -> Optional[tuple]:
    """torch.export ``dynamic_shapes`` for positional inputs (one Dim object per name)."""
    from torch.export import Dim
    made: dict[str, Any] = {}
    out, any_dynamic = [], False
    for spec in specs:
        entry = {}
        for i, d in enumerate(spec.dims):
            if d.name is None:
                continue
            any_dynamic = True
            if d.name not in made:
                made[d.name] = Dim(d.name, min=d.min if d.min is not None else 0,
                                   max=d.max if d.max is not None else int(2 ** 31 - 2))
            entry[i] = made[d.name]
        out.append(entry or None)
    return tuple(out) if any_dynamic else None


@dataclass(frozen=True)
class TensorSignature:
    """What an artifact accepts for one input: dtype and shape expressions over symbols."""

    name: str
    dtype: torch.dtype
    shape: tuple  # ints and sympy expressions

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": str(self.dtype).replace("torch.", ""),
                "shape": [str(d) for d in self.shape]}

    @staticmethod
    def from_json(data: dict) -> "TensorSignature":
        shape = tuple(int(s) if s.lstrip("-").isdigit() else sympy.sympify(s) for s in data["shape"])
        return TensorSignature(data["name"], getattr(torch, data["dtype"]), shape)


def check_inputs(args: Sequence[Any], signature: Sequence[TensorSignature],
                 ranges: dict[str, tuple[int, Optional[int]]]) -> None:
    """Raise InputSpecError naming the first input that does not fit the signature."""
    if len(args) != len(signature):
        raise InputSpecError(f"expected {len(signature)} inputs "
                             f"({', '.join(s.name for s in signature)}), got {len(args)}")
    bound: dict[sympy.Symbol, int] = {}
    deferred = []
    for arg, sig in zip(args, signature):
        if not isinstance(arg, torch.Tensor):
            raise InputSpecError(f"input {sig.name}: expected a tensor, got {type(arg).__name__}")
        if arg.dtype != sig.dtype:
            raise InputSpecError(f"input {sig.name}: expected dtype {sig.dtype}, got {arg.dtype}")
        if arg.dim() != len(sig.shape):
            raise InputSpecError(f"input {sig.name}: expected {len(sig.shape)} dims "
                                 f"{list(sig.shape)}, got shape {list(arg.shape)}")
        for axis, (size, want) in enumerate(zip(arg.shape, sig.shape)):
            if isinstance(want, int):
                if size != want:
                    raise InputSpecError(f"input {sig.name}: dim {axis} must be {want}, got {size} "
                                         f"(shape {list(arg.shape)})")
            elif isinstance(want, sympy.Symbol):
                _bind(sig.name, axis, want, int(size), bound, ranges)
            else:
                deferred.append((sig.name, axis, want, int(size)))
    for name, axis, expr, size in deferred:
        value = expr.subs(bound)
        if value.free_symbols or int(value) != size:
            raise InputSpecError(f"input {name}: dim {axis} must equal {expr} "
                                 f"(= {value} here), got {size}")


def _bind(name: str, axis: int, sym: sympy.Symbol, size: int, bound: dict, ranges: dict) -> None:
    if sym in bound and bound[sym] != size:
        raise InputSpecError(f"input {name}: dim {axis} is the dynamic size {sym}, which another "
                             f"input fixes at {bound[sym]}; got {size}")
    low, high = ranges.get(str(sym), (0, None))
    if size < low or (high is not None and size > high):
        raise InputSpecError(f"input {name}: dim {axis} ({sym}) = {size} is outside the compiled "
                             f"range [{low}, {high if high is not None else 'inf'}]")
    bound[sym] = size
