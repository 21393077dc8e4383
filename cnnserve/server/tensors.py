"""Datatypes and tensor specs, in the Open Inference Protocol's terms.

One table maps each protocol datatype ("FP32") to its numpy dtype, its
ModelConfig enum (TYPE_FP32) and onnxruntime's type string ("tensor(float)").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cnnserve.v1 import model_config_pb2 as mc

# protocol datatype -> (numpy dtype, config enum, onnxruntime type)
_TABLE: dict[str, tuple[np.dtype, int, str]] = {
    "BOOL": (np.dtype(np.bool_), mc.TYPE_BOOL, "tensor(bool)"),
    "UINT8": (np.dtype(np.uint8), mc.TYPE_UINT8, "tensor(uint8)"),
    "UINT16": (np.dtype(np.uint16), mc.TYPE_UINT16, "tensor(uint16)"),
    "UINT32": (np.dtype(np.uint32), mc.TYPE_UINT32, "tensor(uint32)"),
    "UINT64": (np.dtype(np.uint64), mc.TYPE_UINT64, "tensor(uint64)"),
    "INT8": (np.dtype(np.int8), mc.TYPE_INT8, "tensor(int8)"),
    "INT16": (np.dtype(np.int16), mc.TYPE_INT16, "tensor(int16)"),
    "INT32": (np.dtype(np.int32), mc.TYPE_INT32, "tensor(int32)"),
    "INT64": (np.dtype(np.int64), mc.TYPE_INT64, "tensor(int64)"),
    "FP16": (np.dtype(np.float16), mc.TYPE_FP16, "tensor(float16)"),
    "FP32": (np.dtype(np.float32), mc.TYPE_FP32, "tensor(float)"),
    "FP64": (np.dtype(np.float64), mc.TYPE_FP64, "tensor(double)"),
    "BYTES": (np.dtype(np.object_), mc.TYPE_STRING, "tensor(string)"),
}
_BY_ENUM = {enum: name for name, (_, enum, _) in _TABLE.items()}
_BY_ORT = {ort: name for name, (_, _, ort) in _TABLE.items()}
_BY_NUMPY = {np_dtype: name for name, (np_dtype, _, _) in _TABLE.items()}

DATATYPES = frozenset(_TABLE)


def numpy_dtype(datatype: str) -> np.dtype:
    return _TABLE[datatype][0]


def config_enum(datatype: str) -> int:
    return _TABLE[datatype][1]


def from_config_enum(enum: int) -> str | None:
    return _BY_ENUM.get(enum)


def from_onnx_type(ort_type: str) -> str | None:
    return _BY_ORT.get(ort_type)


def from_numpy(dtype: np.dtype) -> str:
    name = _BY_NUMPY.get(np.dtype(dtype))
    if name is None:
        raise ValueError(f"no protocol datatype for numpy {dtype}")
    return name


def element_size(datatype: str) -> int:
    """Bytes per element in raw form; BYTES has no fixed size (0)."""
    return 0 if datatype == "BYTES" else _TABLE[datatype][0].itemsize


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output as clients see it.

    `shape` includes the batch dimension (-1) when the model batches; -1 marks
    any variable dimension, as in the protocol's metadata. `model_shape` is what
    the graph takes or gives, which differs only under a config `reshape`.
    """

    name: str
    datatype: str
    shape: tuple[int, ...]
    model_shape: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.model_shape:
            object.__setattr__(self, "model_shape", self.shape)

    def matches(self, shape: tuple[int, ...]) -> bool:
        if len(shape) != len(self.shape):
            return False
        if self.shape[1:] == shape[1:] and self.shape[:1] in ((-1,), shape[:1]):
            return True  # the common case, a batch of fixed-size rows, without a loop
        return all(want in (-1, got) for want, got in zip(self.shape, shape, strict=True))
