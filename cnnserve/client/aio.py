"""`AsyncClient`: the same calls as `Client`, as coroutines on a `grpc.aio` channel.

Open it inside the event loop that uses it (`async with AsyncClient(...)`).
Reading image files and encoding PIL images happen in a worker thread, so the
event loop never waits on the disk or on PNG compression.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Self

import grpc

from cnnserve.client import protocol
from cnnserve.client.connection import BaseClient, remaining
from cnnserve.client.errors import InvalidArgument, NotFound, Unavailable, from_rpc_error
from cnnserve.client.protocol import ImageLike, Inputs, Version
from cnnserve.client.results import ClassifiedImage, InferResult, ModelInfo
from cnnserve.v1 import classification_pb2_grpc, grpc_service_pb2_grpc
from cnnserve.v1 import inference_pb2 as pb


class AsyncClient(BaseClient):
    __doc__ = "An asyncio cnnserve client; an async context manager.\n" + (BaseClient.__doc__ or "")

    def _open(self) -> None:
        c = self._connection
        if c.credentials is None:
            self._channel = grpc.aio.insecure_channel(c.url, options=c.options)
        else:
            self._channel = grpc.aio.secure_channel(c.url, c.credentials, options=c.options)
        self._inference = grpc_service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        self._classifier = classification_pb2_grpc.ImageClassifierStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _call(self, method: Callable[..., Any], request: Any, timeout: float | None) -> Any:
        deadline = self._connection.deadline(timeout)
        attempt = 0
        while True:
            try:
                return await method(
                    request, timeout=remaining(deadline), metadata=self._connection.metadata
                )
            except grpc.aio.AioRpcError as exc:
                code, details = exc.code(), exc.details()
            delay = self._connection.retry.delay(attempt, code, remaining(deadline))
            if delay is None:
                raise from_rpc_error(code, details)
            await asyncio.sleep(delay)
            attempt += 1

    # -- health and metadata ----------------------------------------------------------

    async def is_live(self, *, timeout: float | None = None) -> bool:
        response = await self._call(self._inference.ServerLive, pb.ServerLiveRequest(), timeout)
        return bool(response.live)

    async def is_ready(
        self, model: str | None = None, version: Version = "", *, timeout: float | None = None
    ) -> bool:
        """The server's readiness, or one model's (False for a model it does not know)."""
        version = str(version)
        if model is None:
            request: Any = pb.ServerReadyRequest()
            return bool((await self._call(self._inference.ServerReady, request, timeout)).ready)
        request = pb.ModelReadyRequest(name=model, version=version)
        return bool((await self._call(self._inference.ModelReady, request, timeout)).ready)

    async def metadata(
        self,
        model: str,
        version: Version = "",
        *,
        as_json: bool = False,
        timeout: float | None = None,
    ) -> Any:
        """ModelMetadataResponse: versions, inputs and outputs (names, datatypes, shapes)."""
        version = str(version)
        request = pb.ModelMetadataRequest(name=model, version=version)
        response = await self._call(self._inference.ModelMetadata, request, timeout)
        self._remember_names(model, version, response)
        return protocol.to_json(response) if as_json else response

    async def config(
        self,
        model: str,
        version: Version = "",
        *,
        as_json: bool = False,
        timeout: float | None = None,
    ) -> Any:
        """The ModelConfig in use, with `parameters["execution_provider"]` filled in."""
        version = str(version)
        request = pb.ModelConfigRequest(name=model, version=version)
        config = (await self._call(self._inference.ModelConfig, request, timeout)).config
        return protocol.to_json(config) if as_json else config

    async def statistics(
        self,
        model: str = "",
        version: Version = "",
        *,
        as_json: bool = False,
        timeout: float | None = None,
    ) -> Any:
        """Triton's cumulative counts and durations (all models by default)."""
        version = str(version)
        request = pb.ModelStatisticsRequest(name=model, version=version)
        response = await self._call(self._inference.ModelStatistics, request, timeout)
        return protocol.to_json(response) if as_json else response

    async def models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        """Every model in the repository, with its state, reason and execution provider."""
        deadline = self._connection.deadline(timeout)  # the whole call's, retries included
        request = pb.RepositoryIndexRequest()
        index = await self._call(self._inference.RepositoryIndex, request, remaining(deadline))
        ready = [(m.name, m.version) for m in index.models if m.state == "READY"]

        async def provider(name: str, version: str) -> str:
            request = pb.ModelConfigRequest(name=name, version=version)
            try:
                response = await self._call(
                    self._inference.ModelConfig, request, remaining(deadline)
                )
            except (NotFound, Unavailable):
                return ""  # unloaded since the index was read
            return protocol.provider_of(response)

        found = await asyncio.gather(*(provider(*key) for key in ready))
        return protocol.model_infos(index, dict(zip(ready, found, strict=True)))

    # -- inference --------------------------------------------------------------------

    async def _io_names(
        self, model: str, version: str, timeout: float | None
    ) -> tuple[list[str], list[str]]:
        names = self._names.get((model, version))
        if names is None:
            request = pb.ModelMetadataRequest(name=model, version=version)
            response = await self._call(self._inference.ModelMetadata, request, timeout)
            names = self._remember_names(model, version, response)
        return names

    async def infer(
        self,
        model: str,
        inputs: Inputs,
        *,
        version: Version = "",
        outputs: Sequence[str] | None = None,
        class_count: int = 0,
        request_id: str = "",
        timeout: float | None = None,
    ) -> InferResult:
        """As `Client.infer`."""
        deadline = self._connection.deadline(timeout)  # metadata look-ups included
        version = str(version)
        names = None
        if not isinstance(inputs, Mapping):
            names = (await self._io_names(model, version, remaining(deadline)))[0]
        if class_count and outputs is None:
            outputs = (await self._io_names(model, version, remaining(deadline)))[1]
        request = protocol.infer_request(
            model,
            protocol.named_inputs(inputs, names),
            version=version,
            outputs=outputs,
            class_count=class_count,
            request_id=request_id,
        )
        response = await self._call(self._inference.ModelInfer, request, remaining(deadline))
        return protocol.infer_result(response)

    async def classify(
        self,
        model: str,
        images: ImageLike | Iterable[ImageLike],
        *,
        top_k: int = 0,
        version: Version = "",
        timeout: float | None = None,
    ) -> list[ClassifiedImage]:
        """As `Client.classify`; calls beyond the first message's worth run concurrently."""
        version = str(version)
        items = protocol.one_or_many(images)
        if all(isinstance(i, bytes) for i in items):
            encoded = [protocol.encode_image(i) for i in items]  # nothing to read or encode
        else:
            encoded = await asyncio.to_thread(lambda: [protocol.encode_image(i) for i in items])

        async def chunk(start: int, end: int) -> list[ClassifiedImage]:
            request = protocol.classify_request(model, encoded[start:end], top_k, version)
            try:
                response = await self._call(self._classifier.Classify, request, timeout)
            except InvalidArgument as exc:
                raise protocol.shift_image_error(exc, start) from None
            return protocol.classified(response)

        ranges = protocol.chunks(encoded, self._connection.classify_budget)
        parts = await asyncio.gather(*(chunk(start, end) for start, end in ranges))
        return [result for part in parts for result in part]
