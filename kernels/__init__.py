"""Kernels: one file a family (``kernels/<op>.py``): reference, Triton kernel + launcher +
tuning space, CPU implementation. The reference backend needs none; the fusion backends add them."""
