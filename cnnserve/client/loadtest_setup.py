"""What `cnnserve loadtest` sends, built from the server's ModelMetadata.

The input tensors' names, datatypes and shapes come from ModelMetadata (any
Open Inference Protocol server); `classify` mode sends a generated JPEG of the
model's input size to cnnserve's ImageClassifier instead. The server-side split
is read from ModelStatistics where the server offers it.
"""

from __future__ import annotations

import datetime
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from PIL import Image

from cnnserve import __version__
from cnnserve.client import protocol
from cnnserve.client.connection import Connection
from cnnserve.client.loadtest_engine import (
    CLASSIFY_METHOD,
    INFER_METHOD,
    ChannelFactory,
    StatsReader,
    Workload,
)
from cnnserve.client.loadtest_report import StatsSnapshot
from cnnserve.client.protocol import _WIRE as WIRE_DTYPES
from cnnserve.v1 import classification_pb2, grpc_service_pb2_grpc
from cnnserve.v1 import inference_pb2 as pb


class SetupError(Exception):
    """The target cannot be measured: unreachable, unknown model, unusable metadata."""


@dataclass
class Target:
    """A model on a server, ready to be loaded: what to send, and how to read its statistics."""

    workload: Workload
    make_channel: ChannelFactory
    stats: StatsReader | None
    header: dict[str, Any]


# -- building the request ------------------------------------------------------------


def _shape(name: str, dims: Sequence[int], batch: int) -> list[int]:
    shape = list(dims)
    if shape and shape[0] == -1:
        shape[0] = batch
    elif batch != 1:
        raise SetupError(f"input {name!r} {shape} has no batch dimension; use --batch-size 1")
    if any(d < 0 for d in shape):
        raise SetupError(f"input {name!r} has variable dimensions {shape} besides the batch")
    return shape


def infer_workload(metadata: Any, model: str, version: str, batch: int) -> Workload:
    """One ModelInferRequest of seeded random data, shaped as ModelMetadata says."""
    rng = np.random.default_rng(0)
    arrays: dict[str, np.ndarray] = {}
    for tensor in metadata.inputs:
        shape = _shape(tensor.name, tensor.shape, batch)
        if tensor.datatype == "BYTES":
            arrays[tensor.name] = np.full(shape, b"loadtest", dtype=np.object_)
        elif tensor.datatype in WIRE_DTYPES:
            arrays[tensor.name] = (rng.random(shape) * 8).astype(WIRE_DTYPES[tensor.datatype])
        else:
            raise SetupError(f"input {tensor.name!r}: unknown datatype {tensor.datatype!r}")
    if not arrays:
        raise SetupError(f"ModelMetadata of {model!r} lists no inputs")
    request = protocol.infer_request(model, arrays, version=version)
    return Workload(INFER_METHOD, request.SerializeToString(), batch)


def sample_jpeg(height: int, width: int, channels: int) -> bytes:
    """A photo-like JPEG: smooth gradients with a little noise (pure noise compresses badly)."""
    y, x = np.mgrid[0:height, 0:width]
    noise = np.random.default_rng(0).normal(0, 12, (height, width, 3))
    planes = np.stack([x * 255 / width, y * 255 / height, (x + y) * 128 / (height + width)], -1)
    pixels = np.clip(planes + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB").convert("L" if channels == 1 else "RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def classify_workload(metadata: Any, model: str, version: str, batch: int) -> Workload:
    """One ClassifyRequest of `batch` JPEGs of the model's input size (NCHW or NHWC)."""
    if len(metadata.inputs) != 1 or len(metadata.inputs[0].shape) != 4:
        raise SetupError(f"{model!r} is not an image model: classify needs one [N, C, H, W] input")
    _, a, b, c = _shape(metadata.inputs[0].name, metadata.inputs[0].shape, 1)
    channels, height, width = (a, b, c) if a in (1, 3) else (c, a, b)
    image = sample_jpeg(height, width, channels)
    request = classification_pb2.ClassifyRequest(
        model_name=model, model_version=version, images=[image] * batch, top_k=1
    )
    return Workload(CLASSIFY_METHOD, request.SerializeToString(), batch)


# -- the target ------------------------------------------------------------------------


def channel_factory(connection: Connection) -> ChannelFactory:
    """Channels with their own TCP connection each (a local subchannel pool)."""
    options = [*connection.options, ("grpc.use_local_subchannel_pool", 1)]

    def make(index: int) -> grpc.aio.Channel:
        if connection.credentials is None:
            return grpc.aio.insecure_channel(connection.url, options=options)
        return grpc.aio.secure_channel(connection.url, connection.credentials, options=options)

    return make


def stats_reader(stub: Any, metadata: Any, model: str, version: str) -> StatsReader:
    """ModelStatistics snapshots; None where one failed (a model reloading, say), and
    from the first UNIMPLEMENTED on (a server without the statistics extension)."""
    working = True

    async def read() -> StatsSnapshot | None:
        nonlocal working
        if not working:
            return None
        request = pb.ModelStatisticsRequest(name=model, version=version)
        try:
            response = await stub.ModelStatistics(request, timeout=5, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            working = exc.code() != grpc.StatusCode.UNIMPLEMENTED
            return None
        return StatsSnapshot.from_response(response, model, version)

    return read


async def prepare(
    connection: Connection, model: str, version: str, mode: str, batch: int, control: Any
) -> Target:
    """Read the model's metadata on `control` (an aio channel) and build the workload."""
    stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(control)
    meta = connection.metadata or None
    try:
        metadata = await stub.ModelMetadata(
            pb.ModelMetadataRequest(name=model, version=version),
            timeout=connection.timeout,
            metadata=meta,
        )
    except grpc.aio.AioRpcError as exc:
        raise SetupError(
            f"ModelMetadata of {model!r}: {exc.code().name}: {exc.details()}"
        ) from None
    try:
        server = await stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=10, metadata=meta)
        server_name = f"{server.name} {server.version}".strip()
    except grpc.aio.AioRpcError:
        server_name = "unknown"
    build = classify_workload if mode == "classify" else infer_workload
    workload = build(metadata, model, version, batch)
    stats: StatsReader | None = stats_reader(stub, meta, model, version)
    if stats is not None and await stats() is None:
        stats = None  # the server does not implement ModelStatistics
    header = {
        "tool": "cnnserve loadtest",
        "cnnserve_version": __version__,
        "url": connection.url,
        "server": server_name,
        "model": model,
        "model_versions": list(metadata.versions),
        "mode": mode,
        "batch_size": batch,
        "request_bytes": len(workload.request),
        "inputs": [
            {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
            for t in metadata.inputs
        ],
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    return Target(workload, channel_factory(connection), stats, header)
