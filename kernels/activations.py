"""The activations a linear's epilogue applies: one registry, with each target's spelling.

The names and the reference functions are the IR's (``irgraph/ops.py`` ``ACTIVATIONS``). A
compiled kernel selects an activation by its ``code`` (the C++ GEMM and GEMV by the template
argument of ``act_of``, the Triton matmul by a constexpr): one numbering for every kernel.
Adding an activation is one ``REGISTRY`` entry (and its IR reference op): the C++ kernels'
runtime dispatch (:func:`cpp_act_switch`) is generated from it, the ATen epilogue calls ``aten_``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from fxforge.irgraph.ops import ACTIVATIONS


@dataclass(frozen=True)
class Activation:
    name: str
    code: int                   # how a compiled kernel selects it
    cpp: str                    # C++ on the float ``v`` (the fxf_* math of fused_cpp_math.MATH)
    onednn: tuple[str, str]     # oneDNN unary post-op (attr, algorithm)
    aten_: Callable[[torch.Tensor], object]  # the ATen in-place op (the reference's kernels)


REGISTRY = (
    Activation("none", 0, "v", ("none", ""), lambda y: y),
    Activation("relu", 1, "v < 0.0f ? 0.0f : v", ("relu", ""), torch.Tensor.relu_),
    Activation("silu", 2, "v / (1.0f + fxf_exp(-v))", ("swish", ""),
               lambda y: torch.nn.functional.silu(y, inplace=True)),
    # torch._C._nn.gelu_ directly: the torch.ops.aten.gelu_ wrapper costs microseconds a call
    Activation("gelu", 3, "0.5f * v * (1.0f + fxf_erf(v * 0.7071067811865476f))", ("gelu", "none"),
               torch._C._nn.gelu_),
    Activation("gelu_tanh", 4,
               "0.5f * v * (1.0f + fxf_tanh(0.7978845608028654f * (v + 0.044715f * v * v * v)))",
               ("gelu", "tanh"), lambda y: torch._C._nn.gelu_(y, approximate="tanh")),
)
BY_NAME = {a.name: a for a in REGISTRY}
ACTIVATION_CODES = {a.name: a.code for a in REGISTRY}
assert set(BY_NAME) == set(ACTIVATIONS), "every IR activation needs a kernel spelling"
assert sorted(ACTIVATION_CODES.values()) == list(range(len(REGISTRY))), "codes are 0..n-1"

# The activations as C++, selected at compile time by ACT (the same formulas as the reference ops)
ACT_OF_CPP = ("\ntemplate <int ACT> static inline float act_of(float v) {\n"
              + "".join(f"  if (ACT == {a.code}) return {a.cpp};\n" for a in REGISTRY if a.code)
              + "  return v;\n}\n")


def cpp_act_switch(call: str) -> str:
    """A C++ ``switch (act)`` over the runtime code ``act`` that runs ``call`` (one statement,
    e.g. ``"gemm<W, {act}>(...);"``) with ``{act}`` set to that activation's code (the template
    argument of ``act_of``); an unknown code runs the identity (``{act}`` = 0)."""
    cases = "".join(f"    case {a.code}: {call.format(act=a.code)} break;\n" for a in REGISTRY if a.code)
    return f"  switch (act) {{\n{cases}    default: {call.format(act=0)}\n  }}\n"
