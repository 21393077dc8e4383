"""Numpy arrays and images to the protocol's messages and back, for both clients.

- Inputs travel in `raw_input_contents`, one entry per input in order, as
  tritonclient sends them; outputs are read from `raw_output_contents`, which
  cnnserve always answers (Open Inference Protocol, Triton's gRPC fields).
- Raw data is little-endian. A BYTES element is a 4-byte little-endian length
  followed by the bytes.
- Classify takes encoded images; PIL images are encoded here as PNG, which is
  lossless, so the server sees exactly the pixels the caller had.
"""

from __future__ import annotations

import io
import math
import os
import struct
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
from google.protobuf import json_format
from PIL import Image

from cnnserve.client.errors import InvalidArgument, ProtocolError
from cnnserve.client.results import ClassifiedImage, ClassScore, InferResult, ModelInfo
from cnnserve.v1 import classification_pb2, inference_pb2

ImageLike: TypeAlias = "str | os.PathLike[str] | bytes | bytearray | memoryview | Image.Image"
Inputs: TypeAlias = "Mapping[str, Any] | Sequence[Any] | np.ndarray"
Version: TypeAlias = "str | int"  # "" is the server's choice; 1 and "1" are the same

# protocol datatype -> numpy dtype of its raw (little-endian) form
_WIRE: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
_BY_KIND = {(dtype.kind, dtype.itemsize): name for name, dtype in _WIRE.items()}
_PNG_MODES = {"1", "L", "LA", "I;16", "P", "RGB", "RGBA"}  # as Pillow writes them to PNG


def datatype_of(array: np.ndarray) -> str:
    """The protocol datatype for a numpy array: FP32 for float32, BYTES for str/bytes/object."""
    if array.dtype.kind in "OSU":
        return "BYTES"
    name = _BY_KIND.get((array.dtype.kind, array.dtype.itemsize))
    if name is None:
        raise TypeError(f"numpy {array.dtype} has no Open Inference Protocol datatype")
    return name


def _raw(array: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        items = [v if isinstance(v, bytes) else str(v).encode() for v in array.flat]
        return b"".join(struct.pack("<I", len(v)) + v for v in items)
    # A no-op for the usual C-contiguous little-endian array, so tobytes is the only copy.
    return np.ascontiguousarray(array, dtype=_WIRE[datatype]).tobytes()


def named_inputs(inputs: Inputs, names: Sequence[str] | None) -> dict[str, np.ndarray]:
    """Inputs by name; a sequence (or one array) is matched to the model's inputs in order."""
    if isinstance(inputs, Mapping):
        return {str(k): np.asarray(v) for k, v in inputs.items()}
    arrays = [inputs] if isinstance(inputs, np.ndarray) else list(inputs)
    if names is None or len(arrays) != len(names):
        raise ValueError(f"{len(arrays)} input arrays for the model's inputs {list(names or [])}")
    return {name: np.asarray(a) for name, a in zip(names, arrays, strict=True)}


def infer_request(
    model: str,
    inputs: Mapping[str, np.ndarray],
    *,
    version: str = "",
    outputs: Sequence[str] | None = None,
    class_count: int = 0,
    request_id: str = "",
) -> Any:
    request = inference_pb2.ModelInferRequest(
        model_name=model, model_version=version, id=request_id
    )
    for name, array in inputs.items():
        datatype = datatype_of(array)
        request.inputs.add(name=name, datatype=datatype, shape=array.shape)
        request.raw_input_contents.append(_raw(array, datatype))
    for name in outputs or ():
        wanted = request.outputs.add(name=name)
        if class_count:
            # Triton's classification extension: a BYTES [batch, N] of "score:index:label".
            wanted.parameters["classification"].int64_param = class_count
    return request


def _split_bytes(raw: bytes, count: int) -> np.ndarray:
    items, at = np.empty(count, dtype=np.object_), 0
    for i in range(count):
        (n,) = struct.unpack_from("<I", raw, at)
        items[i] = raw[at + 4 : at + 4 + n]
        at += 4 + n
    if at != len(raw):
        raise ProtocolError(f"BYTES output: {len(raw)} bytes, not {at} for {count} elements")
    items.flags.writeable = False  # read-only, as the numeric outputs are
    return items


def _output(datatype: str, shape: tuple[int, ...], raw: bytes) -> np.ndarray:
    count = math.prod(shape)
    if datatype == "BYTES":
        try:
            return _split_bytes(raw, count).reshape(shape)
        except struct.error:
            raise ProtocolError("BYTES output ends inside a length prefix") from None
    dtype = _WIRE.get(datatype)
    if dtype is None:
        raise ProtocolError(f"unknown output datatype {datatype!r}")
    if len(raw) != count * dtype.itemsize:
        raise ProtocolError(f"{len(raw)} bytes for a {datatype} output of shape {list(shape)}")
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def infer_result(response: Any) -> InferResult:
    if len(response.raw_output_contents) != len(response.outputs):
        raise ProtocolError("the response does not carry its outputs in raw_output_contents")
    outputs = {
        tensor.name: _output(tensor.datatype, tuple(tensor.shape), raw)
        for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    }
    return InferResult(response.model_name, response.model_version, response.id, outputs)


def one_or_many(images: ImageLike | Iterable[ImageLike]) -> list[ImageLike]:
    # A path string is iterable too; one image must not become a list of characters.
    if isinstance(images, str | bytes | bytearray | memoryview | os.PathLike | Image.Image):
        return [images]
    return list(images)


def encode_image(image: ImageLike) -> bytes:
    """An image as the encoded bytes Classify takes: files are read, PIL images become PNG."""
    if isinstance(image, bytes | bytearray | memoryview):
        return bytes(image)
    if isinstance(image, Image.Image):
        if image.mode not in _PNG_MODES:
            image = image.convert("RGB")
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()
    if isinstance(image, str | os.PathLike):
        return Path(image).read_bytes()
    raise TypeError(f"cannot classify a {type(image).__name__}: give a path, bytes or PIL image")


_FIELD_FRAMING = 6  # a repeated bytes field's tag and length, at most, per image


def chunks(images: Sequence[bytes], budget: int) -> list[tuple[int, int]]:
    """(start, end) ranges of images whose bytes fit one message; at least one range."""
    ranges, start, size = [], 0, 0
    for i, data in enumerate(images):
        framed = len(data) + _FIELD_FRAMING
        if i > start and size + framed > budget:
            ranges.append((start, i))
            start, size = i, 0
        size += framed
    ranges.append((start, len(images)))
    return ranges


def classify_request(model: str, images: Sequence[bytes], top_k: int, version: str) -> Any:
    return classification_pb2.ClassifyRequest(
        model_name=model, model_version=version, images=images, top_k=top_k
    )


def classified(response: Any) -> list[ClassifiedImage]:
    return [
        ClassifiedImage(
            response.model_name,
            response.model_version,
            [ClassScore(int(c.index), c.label, float(c.score)) for c in result.classes],
        )
        for result in response.results
    ]


def shift_image_error(error: InvalidArgument, offset: int) -> InvalidArgument:
    """A chunk's "image N: ..." error renumbered to the caller's list."""
    index = error.image_index
    if index is None or offset == 0:
        return error
    reason = error.details.split(": ", 1)[1]
    return InvalidArgument(error.code, f"image {index + offset}: {reason}")


def model_infos(index: Any, providers: Mapping[tuple[str, str], str]) -> list[ModelInfo]:
    return [
        ModelInfo(m.name, m.version, m.state, m.reason, providers.get((m.name, m.version), ""))
        for m in index.models
    ]


def provider_of(config_response: Any) -> str:
    parameter = config_response.config.parameters.get("execution_provider")
    return parameter.string_value if parameter is not None else ""


def to_json(message: Any) -> dict[str, Any]:
    """A protobuf answer as tritonclient's `as_json=True` gives it."""
    return dict(json_format.MessageToDict(message, preserving_proto_field_name=True))
