"""Autotuning: search over the tuning spaces kernels expose, and the persistent tuning cache."""
