"""Backends: lower fxforge's IR to runnable code, with eager fallback partitions."""
from fxforge.backends.base import (Backend, Fallback, LoweredGraph, available_backends, get_backend,
                                   lower, register_backend)
from fxforge.backends import reference  # noqa: F401  (registers "reference")

__all__ = ["Backend", "Fallback", "LoweredGraph", "available_backends", "get_backend", "lower",
           "register_backend"]
