"""The row program: the loop IR fused pointwise/row-reduction groups are lowered to, and the
binding of its sizes to runtime tensors.

:func:`fxforge.kernels.fused.build_program` produces a :class:`RowProgram` from a fusion
group; the code generators (:mod:`fxforge.kernels.fused_cpp`, :mod:`fxforge.kernels.fused_triton`)
consume it. The iteration space is ``rows x N``; every value is computed per element (``ELEM``),
once per row (``ROW``) or once per kernel (``CONST``). :func:`bind_shapes` takes sizes and strides
from the runtime tensors (a program never holds a size: they may be symbolic at compile time).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from fxforge.errors import FxforgeError

CONST, ROW, ELEM = 0, 1, 2
FLOATS = (torch.float32, torch.bfloat16, torch.float16)
INTS = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
REDUCTIONS = ("sum", "max", "min")


class Unsupported(FxforgeError, NotImplementedError):
    """The group is outside the fused-kernel contract; the backend runs it op by op."""


def kind_of(dtype: torch.dtype) -> str:
    """How a dtype is held in a kernel register: 'f' (fp32), 'i' (int64) or 'b' (bool)."""
    if dtype in FLOATS:
        return "f"
    if dtype in INTS:
        return "i"
    if dtype == torch.bool:
        return "b"
    raise Unsupported(f"dtype {dtype} is not supported by fused kernels")


@dataclass(frozen=True)
class Value:
    op: str                 # "load", "load_at", "const", "ncols", "sum"/"max"/"min",
                            # "select_col", or a pointwise op
    args: tuple[int, ...]   # ids of earlier values
    dtype: torch.dtype      # result dtype; bf16/fp16 results are rounded to it
    level: int              # CONST, ROW or ELEM
    attr: Any = None        # input index (load), literal (const), exponent (pow), ...
    ctype: str = "f"        # register kind the operands are converted to before the op


@dataclass(frozen=True)
class InputSpec:
    dtype: torch.dtype
    rank: int
    level: int              # ROW: its last dim is a literal 1 (loaded once per row)


@dataclass(frozen=True)
class OutputSpec:
    value: int
    dtype: torch.dtype
    shape: str              # "full", "row_keep" ([..., 1]) or "row_drop" (last dim removed)


@dataclass(frozen=True)
class RowProgram:
    rank: int
    inputs: tuple[InputSpec, ...]
    values: tuple[Value, ...]
    outputs: tuple[OutputSpec, ...]
    tensor_args: tuple[int, ...]   # positions of the tensor arguments (SymInt ones are skipped)
    n_args: int

    def signature(self) -> str:
        """A canonical text of the program: equal programs give equal kernels."""
        lines = [f"rank {self.rank} args {self.tensor_args}/{self.n_args}"]
        lines += [f"in{i} {s.dtype} r{s.rank} l{s.level}" for i, s in enumerate(self.inputs)]
        lines += [f"v{i} = {v.op}{v.args} {v.dtype} l{v.level} {v.ctype} {v.attr!r}"
                  for i, v in enumerate(self.values)]
        lines += [f"out v{o.value} {o.dtype} {o.shape}" for o in self.outputs]
        return "\n".join(lines)

    def digest(self) -> str:
        return hashlib.sha256(self.signature().encode()).hexdigest()[:20]

    def reductions(self) -> list[int]:
        return [i for i, v in enumerate(self.values) if v.op in REDUCTIONS]


@dataclass(frozen=True)
class Bound:
    """Runtime sizes: rows x ncols, leading sizes, and each input's R strides (0 = broadcast)."""
    rows: int
    ncols: int
    lead: tuple[int, ...]
    strides: tuple[tuple[int, ...], ...]
    out_shapes: tuple[tuple[int, ...], ...]


def bind_shapes(program: RowProgram, inputs: Sequence[torch.Tensor]) -> Bound:
    """Broadcast the runtime inputs to the iteration shape (a ValueError if they do not)."""
    rank = program.rank
    if len(inputs) != len(program.inputs):
        raise ValueError(f"fused kernel takes {len(program.inputs)} tensors, got {len(inputs)}")
    shape = [1] * rank
    for t, spec in zip(inputs, program.inputs):
        if t.dim() != spec.rank:
            raise ValueError(f"fused kernel compiled for rank-{spec.rank} input, got {t.dim()}")
        for k, size in enumerate(t.shape[::-1]):
            pos = rank - 1 - k
            if size != 1:
                if shape[pos] not in (1, size):
                    raise ValueError(f"fused kernel: shapes do not broadcast at dim {pos}")
                shape[pos] = size
    strides = []
    for t in inputs:
        pad = rank - t.dim()
        strides.append(tuple(0 if k < pad or t.shape[k - pad] == 1 else t.stride(k - pad)
                             for k in range(rank)))
    rows = 1
    for size in shape[:-1]:
        rows *= size
    full, lead = tuple(shape), tuple(shape[:-1])
    out_shapes = tuple(full if o.shape == "full" else (lead + (1,) if o.shape == "row_keep"
                                                       else lead) for o in program.outputs)
    return Bound(rows, shape[-1], lead, tuple(strides), out_shapes)


def needed_by(program: RowProgram, roots: Sequence[int]) -> list[int]:
    """The ids (in order) of the values ``roots`` depend on, roots included."""
    seen: set[int] = set()
    stack = list(roots)
    while stack:
        i = stack.pop()
        if i not in seen:
            seen.add(i)
            stack.extend(program.values[i].args)
    return sorted(seen)
