"""ONNX element types <-> torch dtypes, and TensorProto <-> torch.Tensor: one table for the
importer and the exporter."""
from __future__ import annotations

from typing import Optional

import numpy as np
import onnx
import onnx.numpy_helper
import torch

_T = onnx.TensorProto
TO_TORCH: dict[int, torch.dtype] = {
    _T.FLOAT: torch.float32, _T.DOUBLE: torch.float64, _T.FLOAT16: torch.float16,
    _T.BFLOAT16: torch.bfloat16, _T.INT8: torch.int8, _T.UINT8: torch.uint8,
    _T.INT16: torch.int16, _T.UINT16: torch.uint16, _T.INT32: torch.int32,
    _T.UINT32: torch.uint32, _T.INT64: torch.int64, _T.UINT64: torch.uint64, _T.BOOL: torch.bool,
    _T.FLOAT8E4M3FN: torch.float8_e4m3fn, _T.FLOAT8E5M2: torch.float8_e5m2,
    _T.FLOAT8E4M3FNUZ: torch.float8_e4m3fnuz, _T.FLOAT8E5M2FNUZ: torch.float8_e5m2fnuz,
}
TO_ONNX: dict[torch.dtype, int] = {v: k for k, v in TO_TORCH.items()}
# dtypes numpy lacks (or holds as ml_dtypes): their bytes travel as integers of the same width
_BITS = {torch.bfloat16: torch.int16, torch.float8_e4m3fn: torch.uint8,
         torch.float8_e5m2: torch.uint8, torch.float8_e4m3fnuz: torch.uint8,
         torch.float8_e5m2fnuz: torch.uint8}
# 4-bit codes have no torch dtype: they load as int8/uint8 values (one per element)
_WIDENED = {_T.INT4: torch.int8, _T.UINT4: torch.uint8}


def torch_dtype(elem_type: int, what: str = "a value") -> torch.dtype:
    dtype = TO_TORCH.get(elem_type) or _WIDENED.get(elem_type)
    if dtype is None:
        raise TypeError(f"{what} has ONNX element type "
                        f"{onnx.TensorProto.DataType.Name(elem_type)}, which fxforge does not import")
    return dtype


class UnsupportedDtypeError(TypeError):
    """A torch dtype with no ONNX element type (complex, say)."""


def onnx_type(dtype: torch.dtype) -> int:
    if dtype not in TO_ONNX:
        raise UnsupportedDtypeError(f"no ONNX element type for {dtype}")
    return TO_ONNX[dtype]


def to_torch(proto: onnx.TensorProto) -> torch.Tensor:
    """A TensorProto's values as a torch tensor of the matching dtype (a copy: ONNX buffers are
    read-only)."""
    dtype = torch_dtype(proto.data_type, f"initializer {proto.name!r}")
    array = onnx.numpy_helper.to_array(proto)
    if proto.data_type in _WIDENED:
        return torch.from_numpy(array.astype(np.int8 if dtype == torch.int8 else np.uint8))
    if dtype in _BITS:   # numpy holds these as ml_dtypes: move their bits
        bits = np.uint16 if dtype.itemsize == 2 else np.uint8
        return torch.from_numpy(np.ascontiguousarray(array).view(bits).copy()).view(dtype)
    return torch.from_numpy(np.array(array, copy=True))


def tensor_proto(name: str, tensor: torch.Tensor, elem_type: Optional[int] = None,
                 dims: Optional[tuple[int, ...]] = None) -> onnx.TensorProto:
    """``tensor`` as an initializer, its bytes copied raw (little-endian, row-major: the layout
    ONNX's ``raw_data`` has for every type, bf16 and bool included). ``elem_type``/``dims``
    override the tensor's own, for packed types: a uint4 ``[N, K]`` is stored as the uint8
    ``[N, K/2]`` bytes whose low nibble holds the even element, which is what ONNX's 4-bit raw
    data is."""
    proto = onnx.TensorProto()
    proto.name = name
    proto.data_type = onnx_type(tensor.dtype) if elem_type is None else elem_type
    proto.dims.extend(tensor.shape if dims is None else dims)
    data = tensor.detach().cpu().contiguous()
    proto.raw_data = data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b""
    return proto
