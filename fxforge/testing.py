"""Helpers for testing compiled models against eager PyTorch (used by fxforge's own tests)."""
from __future__ import annotations

import threading
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


def assert_close_to_sum(actual: torch.Tensor, expected: torch.Tensor, magnitude: torch.Tensor,
                        residual: torch.Tensor | None = None, what: str = "output") -> None:
    """Compare an fp32 linear's output with a reference that sums in another order.

    A fixed (rtol, atol) cannot fit every K: an fp32 sum's rounding error is bounded by a
    multiple of eps * sum|terms| (Higham's gamma_K; random-sign rounding keeps it near sqrt(K)
    eps), so it grows with K and with the size of the terms, not with the result. ``magnitude``
    is that sum with the kernel's terms (``|x| @ |w|^T``, or the quantized kernels' |q s| + |o|).
    Measured on Zen 4 the error of every CPU GEMV stays under 2.7 eps * magnitude, so 32x is
    margin, while a wrong weight, scale or row is off by the magnitude itself. The activation
    (kernel formulas against ATen's, a few ulps) and the residual add add relative terms."""
    eps = torch.finfo(torch.float32).eps
    tol = 32 * eps * magnitude + 1e-5 * expected.abs() + 1e-6
    if residual is not None:
        tol = tol + 2 * eps * residual.abs()
    bad = (actual - expected).abs() > tol
    assert not bad.any(), f"{what}: {int(bad.sum())} outputs off, max error " \
                          f"{(actual - expected).abs().max().item():.3g}"


def run_in_threads(jobs) -> None:
    """Run each job in its own thread, all released at once; re-raise the first error a thread
    met (an exception or a failed assert inside a thread fails the test, not just that thread)."""
    errors = []
    start = threading.Barrier(len(jobs))

    def run(job):
        try:
            start.wait(60)
            job()
        except BaseException as exc:  # noqa: BLE001  (handed to the test's thread)
            errors.append(exc)
    threads = [threading.Thread(target=run, args=(job,)) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
