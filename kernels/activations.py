"""The activations a linear's epilogue applies: one registry, with each target's spelling.

The names and the reference functions are the IR's (``irgraph/ops.py`` ``ACTIVATIONS``). A
compiled kernel selects an activation by its ``code`` (the C++ GEMM and GEMV by the template
argument of ``act_of``, the Triton matmul by a constexpr): one numbering for every kernel.
"""
from __future__ import annotations

from dataclasses import dataclass

from fxforge.irgraph.ops import ACTIVATIONS


@dataclass(frozen=True)
class Activation:
    name: str
    code: int                   # how a compiled kernel selects it
    cpp: str                    # C++ on the float ``v`` (the fxf_* math of fused_cpp_math.MATH)
    onednn: tuple[str, str]     # oneDNN unary post-op (attr, algorithm)


REGISTRY = (
    Activation("none", 0, "v", ("none", "")),
    Activation("relu", 1, "v < 0.0f ? 0.0f : v", ("relu", "")),
    Activation("silu", 2, "v / (1.0f + fxf_exp(-v))", ("swish", "")),
    Activation("gelu", 3, "0.5f * v * (1.0f + fxf_erf(v * 0.7071067811865476f))", ("gelu", "none")),
    Activation("gelu_tanh", 4,
               "0.5f * v * (1.0f + fxf_tanh(0.7978845608028654f * (v + 0.044715f * v * v * v)))",
               ("gelu", "tanh")),
)
BY_NAME = {a.name: a for a in REGISTRY}
ACTIVATION_CODES = {a.name: a.code for a in REGISTRY}
assert set(BY_NAME) == set(ACTIVATIONS), "every IR activation needs a kernel spelling"
assert sorted(ACTIVATION_CODES.values()) == list(range(len(REGISTRY))), "codes are 0..n-1"

# The activations as C++, selected at compile time by ACT (the same formulas as the reference ops)
ACT_OF_CPP = ("\ntemplate <int ACT> static inline float act_of(float v) {\n"
              + "".join(f"  if (ACT == {a.code}) return {a.cpp};\n" for a in REGISTRY if a.code)
              + "  return v;\n}\n")
