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
from fxforge.irgraph.safe_parse import (DTYPES, ParseError, check_name, parse_dtype, parse_size,
                                        short_repr, torch_name)

_SPEC = re.compile(r"^\s*(\w+)\s*\[([^\]]*)\]\s*(?:\{\s*(-?\d+)\s*\.\.\s*(-?\d+)\s*\})?\s*$")
_DIM = re.compile(r"^\s*(?:(\w+)\s*=\s*)?(\d+)\s*(?::\s*(\d+)\s*\.\.\s*(\d+))?\s*$")
MAX_DIM = 2 ** 31 - 2            # torch.export's largest dynamic size
MAX_EXAMPLE_ELEMENTS = 2 ** 31   # an example input is random data made in memory


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
    """An InputSpec, or InputSpecError naming what is wrong with ``text``."""
    match = _SPEC.match(text)
    if not match:
        raise InputSpecError(f"bad input spec {text!r}; expected e.g. 'float32[2,8]' or "
                             "'int64[1,seq=16:2..512]{0..1000}'")
    if match.group(1) not in DTYPES:
        raise InputSpecError(f"bad input spec {text!r}: unknown dtype {match.group(1)!r} "
                             f"(one of {', '.join(DTYPES)})")
    dtype = DTYPES[match.group(1)]
    dims = []
    for part in filter(None, (p.strip() for p in match.group(2).split(","))):
        dim = _DIM.match(part)
        if not dim:
            raise InputSpecError(f"bad input spec {text!r}: bad dimension {part!r}")
        name, size, lo, hi = dim.groups()
        dims.append(_dim_spec(text, part, name, int(size), int(lo) if lo else None,
                              int(hi) if hi else None))
    _check_shared_names(text, dims)
    numel = 1
    for d in dims:
        numel *= d.size
    if numel > MAX_EXAMPLE_ELEMENTS:
        raise InputSpecError(f"bad input spec {text!r}: an example of {numel} elements is too "
                             f"large (at most {MAX_EXAMPLE_ELEMENTS})")
    low, high = (int(g) if g else None for g in match.group(3, 4))
    _check_value_range(text, dtype, low, high)
    return InputSpec(dtype, tuple(dims), low, high)


def _dim_spec(text: str, part: str, name: Optional[str], size: int, lo: Optional[int],
              hi: Optional[int]) -> DimSpec:
    if name is not None and not name.isidentifier():
        raise InputSpecError(f"bad input spec {text!r}: dimension name {name!r} is not an "
                             "identifier")
    if size > MAX_DIM or (hi is not None and hi > MAX_DIM):
        raise InputSpecError(f"bad input spec {text!r}: {part!r} exceeds the largest size "
                             f"{MAX_DIM}")
    if lo is not None and not lo <= size <= hi:
        raise InputSpecError(f"bad input spec {text!r}: in {part!r} the size {size} is not within "
                             f"its range {lo}..{hi} (MIN <= SIZE <= MAX)")
    return DimSpec(size, name, lo, hi)


def _check_shared_names(text: str, dims: list[DimSpec]) -> None:
    seen: dict[str, DimSpec] = {}
    for d in dims:
        if d.name is None:
            continue
        if d.name in seen and seen[d.name] != d:
            raise InputSpecError(f"bad input spec {text!r}: the dynamic size {d.name} is given "
                                 "twice with different sizes or ranges")
        seen[d.name] = d


def _check_value_range(text: str, dtype: torch.dtype, low: Optional[int],
                       high: Optional[int]) -> None:
    if low is None:
        return
    if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
        raise InputSpecError(f"bad input spec {text!r}: a value range {{LOW..HIGH}} applies to "
                             f"integer inputs, not {torch_name(dtype)}")
    info = torch.iinfo(dtype)
    if not info.min <= low < high <= info.max + 1:
        raise InputSpecError(f"bad input spec {text!r}: the value range {low}..{high} must have "
                             f"LOW < HIGH within {torch_name(dtype)}'s {info.min}..{info.max + 1}")


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
        return {"name": self.name, "dtype": torch_name(self.dtype),
                "shape": [str(d) for d in self.shape]}

    def describe(self) -> str:
        """``int64['2', 'seq']``: the dtype and the shape as the manifest writes them."""
        return f"{torch_name(self.dtype)}{[str(d) for d in self.shape]}"

    @staticmethod
    def from_json(data: Any) -> "TensorSignature":
        """The inverse of ``to_json``, read without evaluating anything: ParseError naming what
        is not a name, dtype and list of size strings (an artifact's manifest is data)."""
        if not isinstance(data, dict) or not isinstance(data.get("shape"), list):
            raise ParseError(f"bad input {short_repr(data)}")
        name = check_name(data.get("name"), "input name")
        for dim in data["shape"]:
            if not isinstance(dim, str):
                raise ParseError(f"input {name}: bad size {short_repr(dim)}")
        shape = tuple(parse_size(s, symbol=sympy.Symbol) for s in data["shape"])
        return TensorSignature(name, parse_dtype(data.get("dtype")), shape)


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
