"""Helpers for testing compiled models against eager PyTorch (used by fxforge's own tests)."""
from __future__ import annotations

from typing import Any

import torch
from torch.utils import _pytree as pytree

from fxforge.compiler import tolerance


def assert_close_to_eager(actual: Any, expected: Any, what: str = "output") -> None:
    """Compare (nested) outputs leaf by leaf with the dtype's tolerance from ``tolerance``."""
    flat_a, spec_a = pytree.tree_flatten(actual)
    flat_e, spec_e = pytree.tree_flatten(expected)
    assert len(flat_a) == len(flat_e), f"{what}: {len(flat_a)} leaves vs eager's {len(flat_e)}"
    for i, (a, e) in enumerate(zip(flat_a, flat_e)):
        if isinstance(e, torch.Tensor):
            assert isinstance(a, torch.Tensor), f"{what}[{i}]: got {type(a).__name__}, eager a tensor"
            rtol, atol = tolerance(e.dtype)
            torch.testing.assert_close(a, e, rtol=rtol, atol=atol, equal_nan=True,
                                       msg=lambda m, i=i: f"{what}[{i}]: {m}")
        else:
            assert a == e, f"{what}[{i}]: {a!r} != eager {e!r}"
