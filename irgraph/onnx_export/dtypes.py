"""torch dtypes <-> ONNX element types, and torch tensors as ONNX initializers.

(A twin of this table lives on the import side, ``irgraph/onnx_dtypes.py``; the two merge later.)
"""
from __future__ import annotations

import torch
from onnx import TensorProto

TORCH_TO_ONNX: dict[torch.dtype, int] = {
    torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16,
    torch.bfloat16: TensorProto.BFLOAT16, torch.float64: TensorProto.DOUBLE,
    torch.int8: TensorProto.INT8, torch.uint8: TensorProto.UINT8,
    torch.int16: TensorProto.INT16, torch.int32: TensorProto.INT32,
    torch.int64: TensorProto.INT64, torch.bool: TensorProto.BOOL,
    torch.uint16: TensorProto.UINT16, torch.uint32: TensorProto.UINT32,
    torch.uint64: TensorProto.UINT64,
}


class UnsupportedDtypeError(TypeError):
    """A torch dtype with no ONNX element type (complex, float8 variants ONNX spells otherwise)."""


def onnx_dtype(dtype: torch.dtype) -> int:
    if dtype not in TORCH_TO_ONNX:
        raise UnsupportedDtypeError(f"no ONNX element type for {dtype}")
    return TORCH_TO_ONNX[dtype]


def tensor_proto(name: str, tensor: torch.Tensor, elem_type: int | None = None,
                 dims: tuple[int, ...] | None = None) -> TensorProto:
    """``tensor`` as an initializer, its bytes copied raw (little-endian, row-major: the layout
    ONNX's ``raw_data`` has for every type, bf16 and bool included). ``elem_type``/``dims``
    override the tensor's own, for packed types: a uint4 ``[N, K]`` is stored as the uint8
    ``[N, K/2]`` bytes whose low nibble holds the even element, which is what ONNX's 4-bit raw
    data is."""
    proto = TensorProto()
    proto.name = name
    proto.data_type = onnx_dtype(tensor.dtype) if elem_type is None else elem_type
    proto.dims.extend(tensor.shape if dims is None else dims)
    data = tensor.detach().cpu().contiguous()
    proto.raw_data = data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b""
    return proto
