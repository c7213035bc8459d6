"""The cases of the single-op ONNX sweep (``test_onnx_ops_sweep.py``): one node each, its
attributes and how to draw its inputs.

Inputs are drawn per case from a fresh generator seeded with the case's index; they are never
zeros (``randn``), positive where the op needs it (``positive``), in the op's domain (``unit``,
``above_one``) and in range where they index (``ints``). ``const`` inputs (shapes, axes, pads,
k) become initializers, as exporters write them; the rest are graph inputs.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import numpy as np
from onnx import TensorProto as T

MS = "com.microsoft"


@dataclasses.dataclass(frozen=True)
class Input:
    make: Callable[[np.random.Generator], np.ndarray]
    const: bool = False


def randn(*shape, dtype=np.float32) -> Input:
    return Input(lambda g: g.standard_normal(shape).astype(dtype))


def uniform(low: float, high: float, *shape) -> Input:
    return Input(lambda g: g.uniform(low, high, shape).astype(np.float32))


def positive(*shape) -> Input:
    return uniform(0.5, 2.0, *shape)


def unit(*shape) -> Input:
    return uniform(-0.9, 0.9, *shape)


def ints(low: int, high: int, *shape, dtype=np.int64, const=False) -> Input:
    return Input(lambda g: g.integers(low, high, shape).astype(dtype), const)


def boolean(*shape) -> Input:
    return Input(lambda g: g.integers(0, 2, shape).astype(bool))


def const(values, dtype=np.int64) -> Input:
    return Input(lambda g: np.array(values, dtype=dtype), const=True)


def given(values, dtype=np.float32) -> Input:
    """Fixed values as a graph input (special values: infinities, NaN, halves)."""
    return Input(lambda g: np.array(values, dtype=dtype))


@dataclasses.dataclass(frozen=True)
class Case:
    op: str
    inputs: tuple                   # Input or None (an omitted optional input)
    attrs: dict = dataclasses.field(default_factory=dict)
    outputs: int = 1
    domain: str = ""
    opset: Optional[int] = None     # the model's opset when not the op's current one
    name: str = ""
    tol: float = 1e-5
    compiled: bool = True           # False: output shape depends on data (eager only)
    reference: str = "ort"          # "onnx": onnx.reference, where ONNX Runtime lacks the op

    @property
    def id(self) -> str:
        tag = f"{self.op}@{self.opset}" if self.opset else self.op
        tag = f"ms.{tag}" if self.domain else tag
        return f"{tag}-{self.name}" if self.name else tag


def c(op, *inputs, name="", outputs=1, domain="", opset=None, tol=1e-5, compiled=True,
      reference="ort", **attrs) -> Case:
    return Case(op, inputs, attrs, outputs, domain, opset, name, tol, compiled, reference)


X = randn(2, 3, 4)
IMG = randn(2, 4, 6, 6)

UNARY = ["Abs", "Asinh", "Atan", "Ceil", "Cos", "Cosh", "Erf", "Exp", "Floor", "Neg", "Relu",
         "Round", "Sigmoid", "Sign", "Sin", "Sinh", "Tan", "Tanh", "Softplus", "Softsign", "Mish",
         "Elu", "Selu", "Celu", "LeakyRelu", "HardSigmoid", "HardSwish", "ThresholdedRelu",
         "Identity", "Gelu"]
BINARY = ["Add", "Sub", "Mul", "Div", "Equal", "Less", "LessOrEqual", "Greater",
          "GreaterOrEqual"]
REDUCE = ["ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1",
          "ReduceL2", "ReduceSumSquare", "ReduceLogSumExp"]

CASES: list[Case] = [
    *[c(op, X) for op in UNARY],
    c("Gelu", X, name="tanh", approximate="tanh"),
    c("Log", positive(2, 3, 4)), c("Sqrt", positive(2, 3, 4)), c("Reciprocal", positive(2, 3)),
    c("Acos", unit(2, 3)), c("Asin", unit(2, 3)), c("Atanh", unit(2, 3)),
    c("Acosh", uniform(1.1, 3.0, 2, 3)),
    c("Round", given([0.5, 1.5, 2.5, -0.5, -1.5, 0.4, 2.6]), name="halves"),
    c("IsNaN", given([1.0, np.nan, -np.inf, 0.5])),
    c("IsInf", given([1.0, np.nan, -np.inf, np.inf]), detect_negative=0),
    c("Not", boolean(3, 4)), c("BitwiseNot", ints(-50, 50, 3, 4, dtype=np.int32)),
    c("PRelu", X, randn(4)),
    c("Clip", X, const(-0.5, np.float32), const(0.5, np.float32)),
    c("Clip", X, None, const(0.2, np.float32), name="max-only"),
    c("Softmax", X, axis=1), c("LogSoftmax", X), c("Hardmax", X, axis=1),
    c("Swish", X, alpha=1.5),
    c("SwiGLU", X, randn(2, 3, 4), reference="onnx"),
    *[c(op, X, randn(3, 4)) for op in BINARY],
    c("Pow", positive(2, 3), randn(2, 3)),
    c("Mod", ints(-20, 20, 3, 4), ints(1, 7, 3, 4)),
    c("Mod", randn(3, 4), positive(3, 4), name="fmod", fmod=1),
    *[c(op, boolean(3, 4), boolean(3, 4)) for op in ("And", "Or", "Xor")],
    *[c(op, ints(-99, 99, 3, 4, dtype=np.int32), ints(-99, 99, 4, dtype=np.int32))
      for op in ("BitwiseAnd", "BitwiseOr", "BitwiseXor")],
    c("BitShift", ints(0, 255, 3, 4, dtype=np.uint8), ints(0, 4, 3, 4, dtype=np.uint8),
      direction="LEFT"),
    c("BitShift", ints(0, 255, 3, 4, dtype=np.uint8), ints(0, 4, 4, dtype=np.uint8),
      name="right", direction="RIGHT"),
    c("Where", boolean(3, 4), randn(3, 4), randn(4)),
    c("Max", X, randn(3, 4), randn(4)), c("Min", X, randn(4)), c("Sum", X, X, randn(4)),
    c("Mean", X, randn(3, 4)),
    c("MatMul", randn(2, 3, 4), randn(4, 5)),
    c("Gemm", randn(3, 4), randn(5, 4), randn(5), transB=1, alpha=0.5, beta=2.0),
    *[c(op, X, const([1, -1]), keepdims=0, name="axes") for op in REDUCE],
    *[c(op, X) for op in REDUCE[:3]],
    c("ReduceLogSum", positive(2, 3, 4), const([2])),
    c("ReduceSum", X, const([], np.int64), noop_with_empty_axes=1, name="noop"),
    c("ArgMax", X, axis=1), c("ArgMin", X, axis=-1, keepdims=0),
    c("ArgMax", given([[1.0, 3.0, 3.0], [2.0, 2.0, 0.0]]), name="last", select_last_index=1),
    c("Cast", X, to=T.INT32), c("Cast", ints(-5, 5, 3, 4), name="bool", to=T.BOOL),
    c("CastLike", X, given([1], np.float64)),
    c("Shape", X, start=1), c("Size", X),
    c("Reshape", X, const([0, -1])), c("Flatten", X, axis=2),
    c("Expand", randn(3, 1), const([2, 3, 4])),
    c("Transpose", X, perm=[2, 0, 1]),
    c("Squeeze", randn(2, 1, 4), const([1])), c("Unsqueeze", X, const([0, -1])),
    c("Concat", X, randn(2, 5, 4), axis=1),
    c("Slice", X, const([0, 1]), const([2, 4]), const([1, 2])),
    c("Slice", X, const([-1]), const([-100]), const([2]), const([-2]), name="backwards"),
    c("Gather", X, ints(-3, 3, 2, 2), axis=1),
    c("Constant", value_floats=[1.5, -2.0]),
    c("ConstantOfShape", const([2, 3])),
    c("Range", const(1, np.float32), given(7.5), const(1.5, np.float32), compiled=False),
    # ops_tensor
    c("Split", randn(2, 6, 3), const([1, 5]), axis=1, outputs=2),
    c("Split", randn(2, 7, 3), axis=1, outputs=3, num_outputs=3, name="num_outputs"),
    c("Tile", X, const([1, 2, 3])),
    c("Pad", X, const([0, 1, 2, 1, 0, 3]), const(1.5, np.float32)),
    c("Pad", X, const([1, -1, 2, 2]), None, const([1, 2]), name="axes"),
    *[c("Pad", X, const([0, 2, 3, 0, 1, 2]), mode=mode, name=mode)
      for mode in ("reflect", "edge", "wrap")],
    c("Trilu", randn(3, 4, 5), const(1)),
    c("Trilu", randn(4, 5), const(-1), upper=0, name="lower"),
    c("ScatterElements", randn(3, 4), ints(-3, 3, 2, 4), randn(2, 4), reduction="add"),
    c("ScatterElements", randn(3, 4), Input(lambda g: np.stack([g.permutation(4)[:3]
                                                                for _ in range(3)])),
      randn(3, 3), axis=1, name="none"),
    c("ScatterND", randn(4, 3, 2), Input(lambda g: g.permutation(4)[:3, None].astype(np.int64)),
      randn(3, 3, 2)),
    c("ScatterND", randn(4, 3), ints(0, 3, 5, 2), randn(5), reduction="max", name="max"),
    c("ScatterND", randn(4, 3), ints(0, 3, 5, 2), randn(5), reduction="mul", name="mul"),
    c("ScatterElements", randn(3, 4), ints(0, 3, 3, 4), randn(3, 4), reduction="min",
      name="min"),
    c("GatherElements", X, ints(-3, 3, 2, 2, 4), axis=1),
    c("GatherND", randn(3, 4, 5), ints(0, 3, 2, 2)),
    c("GatherND", randn(3, 4, 5), ints(0, 4, 3, 2, 1), batch_dims=1, name="batch"),
    c("TopK", X, const([2]), outputs=2),
    c("TopK", X, const([3]), axis=1, largest=0, outputs=2, name="smallest"),
    c("CumSum", X, const(1)),
    c("CumSum", ints(-9, 9, 3, 4), const(-1), exclusive=1, reverse=1, name="excl-rev"),
    c("CumProd", uniform(0.5, 1.5, 3, 4), const(1), exclusive=1),
    c("Einsum", randn(2, 3, 4), randn(2, 4, 5), equation="bij,bjk->bik"),
    c("Einsum", randn(3, 3), equation="ii->i", name="diag"),
    c("Einsum", randn(2, 3, 4), randn(4, 5), equation="...ij, jk -> ...ik", name="ellipsis"),
    c("OneHot", ints(-4, 4, 2, 3), const(5), const([0.0, 2.5], np.float32), axis=1),
    c("NonZero", boolean(3, 4), compiled=False),
    c("Compress", X, boolean(3), axis=1, compiled=False),
    c("Compress", X, boolean(20), name="flat", compiled=False),
    c("EyeLike", randn(4, 5), k=1, dtype=T.INT32),
    c("Shrink", X, bias=0.1, lambd=0.3),
    c("Det", randn(2, 3, 3), compiled=False),
    c("ReverseSequence", randn(4, 3, 2), const([4, 2, 1]), time_axis=0, batch_axis=1),
    c("Unique", given([2.0, 1.0, 1.0, 3.0, 4.0, 3.0]), outputs=4, sorted=0, compiled=False),
    c("Unique", ints(0, 3, 5, 2), outputs=4, axis=0, name="axis", compiled=False),
    c("TensorScatter", randn(2, 3, 8, 4), randn(2, 3, 2, 4), const([1, 6]), mode="circular"),
    c("CenterCropPad", randn(5, 4, 3), const([3, 7]), axes=[0, 1]),
    *[c(op, const(8), periodic=p, name=f"periodic{p}") for op in
      ("HannWindow", "HammingWindow", "BlackmanWindow") for p in (0, 1)],
    c("NegativeLogLikelihoodLoss", randn(3, 5, 2), ints(0, 5, 3, 2), positive(5)),
    c("SoftmaxCrossEntropyLoss", randn(4, 5), ints(0, 5, 4), reduction="sum", ignore_index=1,
      outputs=2),
    c("SoftmaxCrossEntropyLoss", randn(4, 5, 3), ints(0, 5, 4, 3), positive(5), name="weighted"),
    c("NegativeLogLikelihoodLoss", randn(3, 5), ints(0, 5, 3), reduction="none", name="none"),
    # ops_nn
    c("Conv", IMG, randn(6, 2, 3, 3), randn(6), group=2, pads=[1, 0, 1, 2], strides=[2, 1]),
    c("Conv", randn(1, 2, 7), randn(3, 2, 3), auto_pad="SAME_LOWER", strides=[2], name="1d"),
    c("Conv", randn(1, 2, 4, 5, 5), randn(2, 2, 2, 3, 3), dilations=[1, 2, 1], name="3d"),
    c("ConvTranspose", IMG, randn(4, 3, 3, 3), randn(3), strides=[2, 2], pads=[1, 0, 0, 1],
      output_padding=[1, 1]),
    c("ConvTranspose", randn(1, 2, 5), randn(2, 2, 3), strides=[2], output_shape=[10],
      name="output_shape"),
    c("MaxPool", IMG, kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], outputs=2),
    c("MaxPool", IMG, kernel_shape=[2, 3], pads=[0, 2, 1, 0], dilations=[2, 1],
      name="uneven"),
    c("MaxPool", randn(1, 2, 7, 7), kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1,
      name="ceil"),
    c("AveragePool", IMG, kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2]),
    c("AveragePool", IMG, kernel_shape=[3, 2], pads=[1, 0, 0, 1], count_include_pad=1,
      name="uneven-count"),
    c("AveragePool", randn(1, 2, 7, 7), kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1,
      name="ceil"),
    c("AveragePool", randn(1, 2, 7), kernel_shape=[3], auto_pad="SAME_UPPER", name="same"),
    c("AveragePool", randn(1, 2, 7, 7), kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
      ceil_mode=1, count_include_pad=1, name="ceil-count"),
    c("Conv", IMG, randn(3, 4, 3, 2), auto_pad="SAME_UPPER", strides=[2, 2], name="same"),
    c("LpPool", IMG, kernel_shape=[2, 2], strides=[2, 2], p=3),
    c("LpPool", randn(1, 2, 7, 6), kernel_shape=[3, 2], strides=[2, 2], pads=[1, 0, 0, 1],
      ceil_mode=1, name="ceil"),
    c("GlobalAveragePool", IMG), c("GlobalMaxPool", IMG), c("GlobalLpPool", IMG, p=3),
    c("Dropout", X, outputs=2),
    c("Dropout", X, const(0.3, np.float32), const(False, np.bool_), name="inputs"),
    # ops_norm
    c("BatchNormalization", IMG, randn(4), randn(4), randn(4), positive(4), epsilon=1e-3),
    c("InstanceNormalization", IMG, randn(4), randn(4)),
    c("LayerNormalization", X, randn(3, 4), randn(3, 4), axis=1),
    c("LayerNormalization", X, randn(4), outputs=3, name="stats"),
    c("GroupNormalization", IMG, randn(4), randn(4), num_groups=2),
    c("RMSNormalization", X, randn(4)),
    c("RMSNormalization", X, randn(1, 4), axis=1, name="broadcast"),
    c("LpNormalization", X, axis=1), c("LpNormalization", X, p=1, name="p1"),
    c("MeanVarianceNormalization", IMG, axes=[0, 2, 3]),
    c("LRN", IMG, size=5, alpha=0.01, beta=0.6, bias=1.5),
    # ops_resize
    c("Resize", IMG, None, const([1, 1, 2, 1.5], np.float32), mode="linear"),
    c("Resize", IMG, None, None, const([2, 4, 4, 9]), mode="linear",
      coordinate_transformation_mode="align_corners", name="align_corners"),
    c("Resize", IMG, None, const([1, 1, 0.6, 1.7], np.float32), mode="cubic",
      name="cubic"),
    c("Resize", IMG, None, const([1, 1, 1.5, 0.5], np.float32), mode="cubic",
      exclude_outside=1, cubic_coeff_a=-0.5, coordinate_transformation_mode="asymmetric",
      name="cubic-exclude"),
    *[c("Resize", IMG, None, const([1, 1, 1.5, 2.5], np.float32), nearest_mode=rounding,
        coordinate_transformation_mode=transform, name=f"{rounding}-{transform}")
      for rounding, transform in (("round_prefer_floor", "half_pixel"),
                                  ("round_prefer_ceil", "asymmetric"),
                                  ("floor", "pytorch_half_pixel"),
                                  ("ceil", "tf_half_pixel_for_nn"))],
    c("Resize", IMG, None, const([1, 1, 2, 1.5], np.float32), mode="linear",
      coordinate_transformation_mode="half_pixel_symmetric", name="symmetric"),
    c("Resize", IMG, const([0.2, 0.1, 0.9, 0.8], np.float32), None, const([5, 3]), axes=[2, 3],
      mode="linear", coordinate_transformation_mode="tf_crop_and_resize",
      extrapolation_value=-1.0, name="crop"),
    c("Resize", IMG, None, None, const([9, 4]), axes=[2, 3],
      keep_aspect_ratio_policy="not_larger", name="not_larger"),
    c("DepthToSpace", randn(2, 8, 3, 2), blocksize=2),
    c("DepthToSpace", randn(2, 8, 3, 2), blocksize=2, mode="CRD", name="crd"),
    c("SpaceToDepth", randn(2, 2, 4, 6), blocksize=2),
    # ops_attention
    c("Attention", randn(2, 4, 5, 8), randn(2, 4, 5, 8), randn(2, 4, 5, 8), is_causal=1),
    c("Attention", randn(2, 5, 32), randn(2, 7, 16), randn(2, 7, 16), boolean(2, 1, 5, 7),
      q_num_heads=4, kv_num_heads=2, name="gqa-3d-mask"),
    c("Attention", randn(1, 2, 3, 8), randn(1, 2, 3, 8), randn(1, 2, 3, 8), randn(3, 5),
      randn(1, 2, 2, 8), randn(1, 2, 2, 8), is_causal=1, scale=0.3, outputs=3,
      name="past-float-mask"),
    c("Attention", randn(1, 2, 4, 8), randn(1, 2, 6, 8), randn(1, 2, 6, 8), softcap=2.0,
      outputs=4, qk_matmul_output_mode=3, name="softcap"),
    c("Attention", randn(2, 2, 4, 8), randn(2, 2, 6, 8), randn(2, 2, 6, 8), None, None, None,
      const([5, 3], np.int64), is_causal=1, name="nonpad"),
    c("Attention", randn(1, 2, 5, 8), randn(1, 2, 5, 8), randn(1, 2, 5, 8),
      left_window_size=2, right_window_size=1, name="window"),
    c("Attention", randn(1, 4, 3, 8), randn(1, 2, 3, 8), randn(1, 2, 3, 8), outputs=4,
      is_causal=1, name="qk-raw"),
    c("RotaryEmbedding", randn(2, 3, 5, 8), randn(5, 4), randn(5, 4), ints(0, 5, 2, 5)),
    c("RotaryEmbedding", randn(2, 5, 12), randn(2, 5, 2), randn(2, 5, 2), interleaved=1,
      num_heads=2, rotary_embedding_dim=4, name="partial-3d"),
    # com.microsoft
    c("SkipLayerNormalization", X, randn(2, 3, 4), randn(4), randn(4), randn(4), domain=MS,
      outputs=4, epsilon=1e-5),
    c("SkipSimplifiedLayerNormalization", X, randn(2, 3, 4), randn(4), domain=MS,
      epsilon=1e-5),
    c("FastGelu", X, randn(4), domain=MS),
    c("BiasGelu", X, randn(4), domain=MS),
    c("Gelu", X, domain=MS),
    c("QuickGelu", X, domain=MS, alpha=1.5),
    c("RotaryEmbedding", randn(2, 3, 16), ints(0, 6, 2, 3), randn(6, 4), randn(6, 4),
      domain=MS, num_heads=2),
    # Opset 13, where later versions changed the op's inputs or attributes.
    c("Split", randn(2, 6), const([2, 4]), axis=1, outputs=2, opset=13),
    c("Split", randn(2, 6), axis=1, outputs=3, opset=13, name="equal"),
    c("ReduceSum", X, const([1]), opset=13),
    c("ReduceMean", X, axes=[0, 2], keepdims=0, opset=13),
    c("ReduceMax", X, axes=[1], opset=13),
    c("Pad", X, const([0, 1, 2, 1, 0, 3]), mode="reflect", opset=13),
    c("Resize", IMG, const([], np.float32), const([1, 1, 2, 2], np.float32), opset=13),
]
