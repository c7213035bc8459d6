"""Backends: lower fxforge's IR to runnable code, with eager fallback partitions."""
from fxforge.backends.base import (Backend, Fallback, LoweredGraph, available_backends, get_backend,
                                   lower, register_backend)
from fxforge.backends import cpu, reference, triton  # noqa: F401  (register "cpu", "reference", "triton")
from fxforge.backends.kernel_lowering import KernelChoice, kernel_count
from fxforge.backends.select import backend_unavailable, resolve_backend

__all__ = ["Backend", "Fallback", "KernelChoice", "LoweredGraph", "available_backends",
           "backend_unavailable", "get_backend", "kernel_count", "lower", "register_backend",
           "resolve_backend"]
