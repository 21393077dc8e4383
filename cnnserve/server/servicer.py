"""`inference.GRPCInferenceService`: the Open Inference Protocol over gRPC.

Transport only: decode and validate (converters), find the version (registry),
run it (the version's batcher), encode the answer. Field semantics follow the
protocol and Triton's extensions (classification, model_configuration,
model_repository, statistics).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import grpc
from google.protobuf.message import DecodeError

from cnnserve import __version__
from cnnserve.server import converters
from cnnserve.server.drain import Drain
from cnnserve.server.errors import (
    CnnserveError,
    InvalidInput,
    NotAllowed,
    ServerDraining,
    Unsupported,
)
from cnnserve.server.registry import Registry
from cnnserve.server.status import code_for, rpc
from cnnserve.v1 import grpc_service_pb2_grpc
from cnnserve.v1 import inference_pb2 as pb

log = logging.getLogger(__name__)

EXTENSIONS = ["classification", "model_configuration", "model_repository", "statistics"]


def deadline_ns(context: grpc.aio.ServicerContext, timeout_us: int | None) -> int | None:
    """The earlier of the call's gRPC deadline and the request's `timeout` parameter."""
    now = time.monotonic_ns()
    limits = []
    remaining = context.time_remaining()
    if remaining is not None:
        limits.append(now + int(remaining * 1e9))
    if timeout_us:
        limits.append(now + timeout_us * 1000)
    return min(limits) if limits else None


STREAM_WINDOW = 256  # a stream's requests read and not yet answered, at most


def too_large(size: int, limit: int) -> str:
    return f"the answer is {size} bytes, over the server's --max-message-bytes {limit}"


class InferenceServicer(grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self,
        registry: Registry,
        drain: Drain,
        *,
        control_mode: str,
        request_log_rate: float = 0.0,
        max_message_bytes: int = 256 * 1024 * 1024,
    ) -> None:
        self.registry = registry
        self.control_mode = control_mode
        self.request_log_rate = request_log_rate
        self.max_message_bytes = max_message_bytes  # what gRPC lets the server send
        self.drain = drain
        self.started = False

    # -- health and metadata ----------------------------------------------------------

    @rpc("ServerLive")
    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @rpc("ServerReady")
    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.started and not self.drain.started)

    @rpc("ModelReady")
    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self.registry.ready(request.name, request.version))

    @rpc("ServerMetadata")
    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name="cnnserve", version=__version__, extensions=EXTENSIONS
        )

    @rpc("ModelMetadata")
    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        model = self.registry.get(request.name, request.version)
        response = pb.ModelMetadataResponse(
            name=model.name, versions=[str(model.version)], platform=model.config.platform
        )
        for specs, target in ((model.inputs, response.inputs), (model.outputs, response.outputs)):
            for spec in specs:
                target.add(name=spec.name, datatype=spec.datatype, shape=spec.shape)
        return response

    @rpc("ModelConfig")
    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelConfigResponse:
        model = self.registry.get(request.name, request.version)
        response = pb.ModelConfigResponse()
        response.config.CopyFrom(model.config)
        response.config.parameters["execution_provider"].string_value = model.provider
        response.config.parameters["inline_compute"].string_value = str(model.inline).lower()
        return response

    @rpc("ModelStatistics")
    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        names = [request.name] if request.name else self.registry.names()
        response = pb.ModelStatisticsResponse()
        for name in names:
            if request.version:
                versions = [self.registry.get(name, request.version)]
            else:
                versions = self.registry.versions(name)
            for model in versions:
                converters.encode_statistics(
                    response.model_stats.add(), model.name, str(model.version), model.stats
                )
        return response

    # -- repository -------------------------------------------------------------------

    @rpc("RepositoryIndex")
    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        response = pb.RepositoryIndexResponse()
        for e in self.registry.index(ready_only=request.ready):
            response.models.add(name=e.name, version=e.version, state=e.state, reason=e.reason)
        return response

    def _check_control(
        self, request: pb.RepositoryModelLoadRequest | pb.RepositoryModelUnloadRequest
    ) -> None:
        if self.control_mode != "explicit":
            raise NotAllowed(
                f"model control mode is {self.control_mode!r}; load and unload need 'explicit'"
            )
        if request.repository_name:
            raise Unsupported("cnnserve serves one repository; leave repository_name empty")
        # Nothing here has dependents to unload with it, so that flag needs no action.
        unsupported = sorted(set(request.parameters) - {"unload_dependents"})
        if unsupported:
            raise Unsupported(f"repository parameters are not supported: {unsupported}")

    @rpc("RepositoryModelLoad")
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelLoadResponse:
        self._check_control(request)
        await self.registry.load(request.model_name)
        return pb.RepositoryModelLoadResponse()

    @rpc("RepositoryModelUnload")
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryModelUnloadResponse:
        self._check_control(request)
        await self.registry.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    # -- inference --------------------------------------------------------------------

    async def infer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        """One inference, shared by ModelInfer and each message of ModelStreamInfer."""
        if not request.model_name:
            raise InvalidInput("model_name is empty")
        with self.registry.request(
            request.model_name,
            request.model_version,
            request_id=request.id,
            log_rate=self.request_log_rate,
        ) as (model, seen):
            decoded = model.decoder.decode(request)
            seen.deadline_ns = deadline_ns(context, None)  # a cancel after it is a timeout
            timeout_us = decoded.timeout_us or model.default_timeout_us  # the queue's own
            result = await model.infer(
                decoded.inputs,
                decoded.rows,
                deadline_ns(context, timeout_us),
                expire=bool(timeout_us),
            )
            response = pb.ModelInferResponse(
                model_name=model.name, model_version=str(model.version), id=request.id
            )
            arrays = dict(zip(model.output_names, result.outputs, strict=True))
            converters.encode_response(
                response, decoded, arrays, model.labels, model.config.max_batch_size > 0
            )
            seen.succeeded(decoded.rows, [result])
            return response

    @rpc("ModelInfer")
    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        return await self.infer(request, context)

    async def ModelStreamInfer(
        self,
        request_iterator: AsyncIterator[pb.ModelInferRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Requests run concurrently; each answer (or error) is sent as it completes.

        At most STREAM_WINDOW requests are read and not yet answered: a client that does
        not read its answers stops the server reading its requests (gRPC's flow control
        then holds the client back), rather than filling the server's memory. A message
        that is not a ModelInferRequest ends the stream INVALID_ARGUMENT, and a shutdown
        ends it UNAVAILABLE (see `drain`), once the answers to the ones before are sent.
        """
        answers: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        running: set[asyncio.Task[None]] = set()
        window = asyncio.Semaphore(STREAM_WINDOW)
        ended: list[tuple[grpc.StatusCode, str]] = []

        async def one(request: pb.ModelInferRequest) -> None:
            await answers.put(await self._stream_answer(request, context))

        async def read() -> None:
            try:
                async for request in self.drain.requests(request_iterator):
                    await window.acquire()
                    task = asyncio.create_task(one(request))
                    running.add(task)
                    task.add_done_callback(running.discard)
            except DecodeError as exc:
                why = f"a stream message is not a ModelInferRequest ({exc})"
                ended.append((grpc.StatusCode.INVALID_ARGUMENT, why))
            except ServerDraining as exc:
                ended.append((grpc.StatusCode.UNAVAILABLE, str(exc)))
            while running:
                await asyncio.gather(*list(running))
            await answers.put(None)

        reader = asyncio.create_task(read())
        try:
            while (answer := await answers.get()) is not None:
                yield answer
                window.release()
        finally:
            reader.cancel()
            for task in list(running):
                task.cancel()
        if ended:
            await context.abort(*ended[0])

    async def _stream_answer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelStreamInferResponse:
        """One stream message's answer; an error is reported in it, not by ending the stream."""
        try:
            response = await self.infer(request, context)
        except CnnserveError as exc:
            return _stream_error(request, f"[{code_for(exc).name}] {exc}")
        except Exception:
            log.exception("stream inference failed")
            return _stream_error(request, "[INTERNAL] internal error; see the server log")
        answer = pb.ModelStreamInferResponse(infer_response=response)
        _mark_final(answer)
        size = answer.ByteSize()
        if size > self.max_message_bytes:  # gRPC would end the whole stream on it
            return _stream_error(
                request, f"[RESOURCE_EXHAUSTED] {too_large(size, self.max_message_bytes)}"
            )
        return answer

    # -- not offered ------------------------------------------------------------------

    async def _unimplemented(self, context: grpc.aio.ServicerContext, what: str) -> None:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"cnnserve does not implement {what}")


def _mark_final(answer: pb.ModelStreamInferResponse) -> None:
    """Triton's flag for the last answer to a request; with one answer per request (no
    decoupled models here), every answer is the last. Stream clients wait for it."""
    answer.infer_response.parameters["triton_final_response"].bool_param = True


def _stream_error(request: pb.ModelInferRequest, message: str) -> pb.ModelStreamInferResponse:
    answer = pb.ModelStreamInferResponse(error_message=message)
    answer.infer_response.model_name = request.model_name
    answer.infer_response.model_version = request.model_version
    answer.infer_response.id = request.id
    _mark_final(answer)
    return answer


def _add_unimplemented(name: str) -> None:
    async def handler(
        self: InferenceServicer, request: object, context: grpc.aio.ServicerContext
    ) -> None:
        await self._unimplemented(context, name)

    handler.__name__ = name
    setattr(InferenceServicer, name, handler)


for _name in (
    "SystemSharedMemoryStatus", "SystemSharedMemoryRegister", "SystemSharedMemoryUnregister",
    "CudaSharedMemoryStatus", "CudaSharedMemoryRegister", "CudaSharedMemoryUnregister",
    "TraceSetting", "LogSettings",
):  # fmt: skip
    _add_unimplemented(_name)
