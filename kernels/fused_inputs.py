"""Example inputs of a fusion group's row program, shared by the C++ and Triton tuners:
the group's input shapes at their example sizes, random tensors of those shapes (timing does
not depend on the values), and the rows x columns the program iterates over."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.fx as fx

from fxforge.kernels.row_program import RowProgram, bind_shapes


def _example(size) -> Optional[int]:
    if isinstance(size, torch.SymInt):
        return size.node.hint if size.node.has_hint() else None
    return int(size)


def example_shapes(program: RowProgram, gm: fx.GraphModule) -> Optional[list[tuple]]:
    """(shape, dtype) of the group's tensor inputs at the example sizes, or None if unknown."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    shapes = []
    for position in program.tensor_args:
        val = placeholders[position].meta.get("val")
        if not isinstance(val, torch.Tensor):
            return None
        dims = [_example(d) for d in val.shape]
        if any(d is None for d in dims):
            return None
        shapes.append((tuple(dims), val.dtype))
    return shapes


def random_inputs(shapes: Sequence[tuple], seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for shape, dtype in shapes:
        if dtype == torch.bool:
            out.append(torch.rand(shape, generator=g) > 0.5)
        elif dtype.is_floating_point:
            out.append(torch.randn(shape, generator=g).to(dtype))
        else:
            out.append(torch.randint(0, 4, shape, generator=g).to(dtype))
    return out


def rows_and_cols(program: RowProgram, shapes: list[tuple]) -> tuple[int, int]:
    meta = [torch.empty_strided(s, [0] * len(s), dtype=d) for s, d in shapes]  # no memory
    bound = bind_shapes(program, meta)
    return bound.rows, bound.ncols
