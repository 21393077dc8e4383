"""Open Inference Protocol messages ↔ numpy arrays, with validation.

Inputs are taken zero-copy from `raw_input_contents` (read-only views); typed
`contents` are accepted too, but never both in one request. Sizes are checked
against the declared shape before anything is allocated. Outputs are always
answered raw, since tritonclient reads only `raw_output_contents`.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence

import numpy as np

from cnnserve.server.errors import InvalidInput
from cnnserve.server.stats import Duration, VersionStats
from cnnserve.server.tensors import TensorSpec, from_numpy, numpy_dtype
from cnnserve.v1 import inference_pb2 as pb

# datatype -> the InferTensorContents field that carries it in typed form
_TYPED_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
MAX_ELEMENTS = 1 << 31


class DecodedRequest:
    """A request's arrays and what it asked for. A plain class: one is made per request."""

    __slots__ = ("inputs", "rows", "outputs", "timeout_us")

    def __init__(
        self,
        inputs: dict[str, np.ndarray],
        rows: int,
        outputs: Sequence[tuple[str, int]],
        timeout_us: int | None,
    ) -> None:
        self.inputs = inputs
        self.rows = rows  # batch size; 1 for a model without a batch dimension
        self.outputs = outputs  # (output name, classification count or 0)
        self.timeout_us = timeout_us


def _param_int(param: pb.InferParameter, name: str, kinds: Sequence[str]) -> int:
    kind = param.WhichOneof("parameter_choice")
    if kind not in kinds:
        raise InvalidInput(f"parameter {name!r} must be {' or '.join(kinds)}, not {kind}")
    value = int(getattr(param, kind))
    if value < 0:
        raise InvalidInput(f"parameter {name!r} must not be negative")
    return value


def _check_shape(
    tensor: pb.ModelInferRequest.InferInputTensor, spec: TensorSpec
) -> tuple[int, ...]:
    shape = tuple(tensor.shape)
    if shape and min(shape) < 0:
        raise InvalidInput(f"input {spec.name!r}: negative dimension in shape {list(shape)}")
    if not spec.matches(shape):
        raise InvalidInput(
            f"input {spec.name!r}: shape {list(shape)} does not match "
            f"the model's {list(spec.shape)}"
        )
    if math.prod(shape) > MAX_ELEMENTS:
        raise InvalidInput(f"input {spec.name!r}: shape {list(shape)} is too large")
    return shape


def _from_raw(raw: bytes, spec: TensorSpec, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    count = math.prod(shape)
    if spec.datatype == "BYTES":
        return _strings(_split_bytes(raw, count, spec.name), shape, spec.name)
    want = count * dtype.itemsize
    if len(raw) != want:
        raise InvalidInput(
            f"input {spec.name!r}: {len(raw)} bytes of raw data, expected {want} for shape "
            f"{list(shape)} of {spec.datatype}"
        )
    return np.ndarray(shape, dtype, raw)  # a read-only view of the request's bytes


def _split_bytes(raw: bytes, count: int, name: str) -> list[bytes]:
    """BYTES in raw form: each element is a 4-byte little-endian length, then the bytes."""
    items, at = [], 0
    for _ in range(count):
        if at + 4 > len(raw):
            raise InvalidInput(f"input {name!r}: BYTES data ends inside a length prefix")
        (n,) = struct.unpack_from("<I", raw, at)
        at += 4
        if at + n > len(raw):
            raise InvalidInput(f"input {name!r}: BYTES element runs past the end of the data")
        items.append(raw[at : at + n])
        at += n
    if at != len(raw):
        raise InvalidInput(f"input {name!r}: {len(raw) - at} bytes left after {count} elements")
    return items


def _strings(items: Sequence[bytes], shape: tuple[int, ...], name: str) -> np.ndarray:
    """BYTES elements as the str objects onnxruntime's string tensors take (UTF-8 only)."""
    array = np.empty(len(items), dtype=np.object_)
    try:
        array[:] = [bytes(item).decode("utf-8") for item in items]
    except UnicodeDecodeError:
        raise InvalidInput(f"input {name!r}: BYTES elements must be UTF-8 text") from None
    return array.reshape(shape)


def _from_typed(
    contents: pb.InferTensorContents, spec: TensorSpec, shape: tuple[int, ...]
) -> np.ndarray:
    field = _TYPED_FIELD.get(spec.datatype)
    if field is None:
        raise InvalidInput(f"input {spec.name!r}: {spec.datatype} must be sent as raw data")
    values = getattr(contents, field)
    count = math.prod(shape)
    if len(values) != count:
        others = sorted({f for f in _TYPED_FIELD.values() if f != field and getattr(contents, f)})
        if others and not values:
            raise InvalidInput(
                f"input {spec.name!r} is {spec.datatype}: its values go in {field}, "
                f"not {', '.join(others)}"
            )
        raise InvalidInput(
            f"input {spec.name!r}: {len(values)} values in {field}, expected {count}"
        )
    if spec.datatype == "BYTES":
        return _strings(values, shape, spec.name)
    try:
        return np.array(values, dtype=numpy_dtype(spec.datatype)).reshape(shape)
    except (OverflowError, ValueError) as exc:
        raise InvalidInput(f"input {spec.name!r}: {exc}") from exc


_SHARED_MEMORY = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")


def _no_shared_memory(kind: str, name: str, parameters: Mapping[str, pb.InferParameter]) -> None:
    """Refuse a tensor placed in shared memory: no region can be registered here, and an
    output answered in the response instead would leave the client reading stale memory."""
    for key in _SHARED_MEMORY:
        if key in parameters:
            region = parameters[key].string_param if key == _SHARED_MEMORY[0] else ""
            raise InvalidInput(
                f"{kind} {name!r}: shared memory region {region!r} is not registered; "
                "cnnserve offers no shared memory, so send the data in the request"
                if region
                else f"{kind} {name!r}: {key} given, but cnnserve offers no shared memory"
            )


def _outputs(request: pb.ModelInferRequest, known: dict[str, TensorSpec]) -> list[tuple[str, int]]:
    chosen: list[tuple[str, int]] = []
    for out in request.outputs:
        if out.name not in known:
            raise InvalidInput(f"unknown output {out.name!r}; the model has {sorted(known)}")
        if any(out.name == name for name, _ in chosen):
            raise InvalidInput(f"output {out.name!r} is requested twice")
        if out.parameters:
            _no_shared_memory("output", out.name, out.parameters)
        count = 0
        if "classification" in out.parameters:
            if known[out.name].datatype in ("BYTES", "BOOL"):
                raise InvalidInput(f"output {out.name!r} holds no scores to classify")
            count = _param_int(
                out.parameters["classification"], "classification", ["int64_param", "uint64_param"]
            )
            if count < 1:
                raise InvalidInput("parameter 'classification' must be at least 1")
        chosen.append((out.name, count))
    return chosen


class RequestDecoder:
    """Checks ModelInferRequests against one model version's inputs and outputs, and
    decodes them. Made once per version, so that a request pays only for its own checks."""

    def __init__(
        self, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], max_batch_size: int
    ) -> None:
        self._inputs = {s.name: s for s in inputs}
        self._dtypes = {s.name: numpy_dtype(s.datatype) for s in inputs}
        self._outputs = {s.name: s for s in outputs}
        self._every_output = tuple((s.name, 0) for s in outputs)
        self._max_batch_size = max_batch_size

    def decode(self, request: pb.ModelInferRequest) -> DecodedRequest:
        """Validate a ModelInferRequest against the model and return its arrays."""
        arrays = self._arrays(request)
        rows = self._rows(arrays)
        timeout_us = None
        parameters = request.parameters
        if parameters:
            if "timeout" in parameters:
                timeout_us = _param_int(
                    parameters["timeout"], "timeout", ["int64_param", "uint64_param"]
                )
            if "priority" in parameters:
                _param_int(parameters["priority"], "priority", ["uint64_param", "int64_param"])
        outputs = _outputs(request, self._outputs) if request.outputs else self._every_output
        return DecodedRequest(arrays, rows, outputs, timeout_us)

    def _arrays(self, request: pb.ModelInferRequest) -> dict[str, np.ndarray]:
        raw = request.raw_input_contents
        tensors = request.inputs
        count = len(tensors)
        if raw and len(raw) != count:
            raise InvalidInput(f"{len(raw)} raw_input_contents for {count} inputs")
        arrays: dict[str, np.ndarray] = {}
        for i in range(count):
            tensor = tensors[i]
            if raw and tensor.HasField("contents"):
                raise InvalidInput(
                    "a request carries either raw_input_contents or typed contents, not both"
                )
            name = tensor.name
            if tensor.parameters:
                _no_shared_memory("input", name, tensor.parameters)
            spec = self._inputs.get(name)
            if spec is None:
                raise InvalidInput(f"unknown input {name!r}; the model has {sorted(self._inputs)}")
            if name in arrays:
                raise InvalidInput(f"input {name!r} given twice")
            if tensor.datatype != spec.datatype:
                raise InvalidInput(
                    f"input {name!r}: datatype {tensor.datatype!r}, expected {spec.datatype}"
                )
            shape = _check_shape(tensor, spec)
            arrays[name] = (
                _from_raw(raw[i], spec, shape, self._dtypes[name])
                if raw
                else _from_typed(tensor.contents, spec, shape)
            )
        if len(arrays) != len(self._inputs):
            raise InvalidInput(f"missing inputs {sorted(set(self._inputs) - set(arrays))}")
        return arrays

    def _rows(self, arrays: dict[str, np.ndarray]) -> int:
        if self._max_batch_size == 0:
            return 1
        sizes = {a.shape[0] for a in arrays.values()}
        if len(sizes) != 1:
            raise InvalidInput(f"inputs disagree on the batch size: {sorted(sizes)}")
        rows = int(sizes.pop())
        if rows < 1 or rows > self._max_batch_size:
            raise InvalidInput(f"batch size {rows} is outside 1..{self._max_batch_size}")
        return rows


def _bytes_tensor(items: Sequence[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def classify_rows(scores: np.ndarray, count: int, labels: Sequence[str]) -> list[list[bytes]]:
    """Triton's classification extension: the top `count` of each row as b"score:index:label"."""
    flat = scores.reshape(scores.shape[0], -1) if scores.ndim > 1 else scores.reshape(1, -1)
    count = min(count, flat.shape[1])
    top = np.argsort(-flat, axis=1, kind="stable")[:, :count]
    rows = []
    for row, indices in zip(flat, top, strict=True):
        entries = []
        for i in indices:
            label = f":{labels[i]}" if i < len(labels) else ""
            entries.append(f"{row[i]:f}:{i}{label}".encode())
        rows.append(entries)
    return rows


def encode_response(
    response: pb.ModelInferResponse,
    decoded: DecodedRequest,
    arrays: dict[str, np.ndarray],
    labels: dict[str, list[str]],
    batched: bool,
) -> None:
    """Fill the response's outputs, all in raw form, in the order they were requested."""
    for name, count in decoded.outputs:
        array = arrays[name]
        out = response.outputs.add()
        out.name = name
        if count:
            rows = classify_rows(
                array if batched else array[np.newaxis], count, labels.get(name, [])
            )
            out.datatype = "BYTES"
            out.shape.extend([len(rows), len(rows[0])] if batched else [len(rows[0])])
            response.raw_output_contents.append(_bytes_tensor([b for r in rows for b in r]))
            continue
        out.datatype = from_numpy(array.dtype)
        out.shape.extend(array.shape)
        if out.datatype == "BYTES":
            items = [v.encode() if isinstance(v, str) else bytes(v) for v in array.flat]
            response.raw_output_contents.append(_bytes_tensor(items))
        else:
            response.raw_output_contents.append(array.tobytes())  # C order, whatever the layout


def _duration(target: pb.StatisticDuration, source: Duration) -> None:
    target.count = source.count
    target.ns = source.ns


def encode_statistics(
    target: pb.ModelStatistics, name: str, version: str, stats: VersionStats
) -> None:
    """Fill Triton's ModelStatistics from our cumulative figures."""
    target.name = name
    target.version = version
    target.last_inference = stats.last_inference_ms
    target.inference_count = stats.inference_count
    target.execution_count = stats.execution_count
    s = target.inference_stats
    for field_name in (
        "success",
        "fail",
        "queue",
        "compute_input",
        "compute_infer",
        "compute_output",
    ):
        _duration(getattr(s, field_name), getattr(stats, field_name))
    for size, b in sorted(stats.batches.items()):
        entry = target.batch_stats.add(batch_size=size)
        _duration(entry.compute_input, b.compute_input)
        _duration(entry.compute_infer, b.compute_infer)
        _duration(entry.compute_output, b.compute_output)
