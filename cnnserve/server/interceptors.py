"""Server interceptors: what applies to every RPC of every service.

`CallCounter` counts each call by method and final status code, for our
services, health, reflection, and methods that do not exist (UNIMPLEMENTED;
after 32 distinct such names, the rest are counted as method "(other)").
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from prometheus_client import Counter

from cnnserve.server.metrics import Metrics

_UNKNOWN_METHODS = 32  # distinct unimplemented method names counted by name
Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]


def _final_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    code = context.code()
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.OK


class CallCounter(grpc.aio.ServerInterceptor):
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._counters: dict[tuple[str, grpc.StatusCode], Counter] = {}
        self._unknown: set[str] = set()

    def _count(self, method: str, code: grpc.StatusCode) -> None:
        counter = self._counters.get((method, code))
        if counter is None:
            counter = self._metrics.grpc_requests.labels(method, code.name)
            self._counters[(method, code)] = counter
        counter.inc()

    async def intercept_service(
        self, continuation: Continuation, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        method = details.method.rsplit("/", 1)[-1] or details.method
        if handler is None:
            # Clients choose these names: past a few, they share one series.
            if len(self._unknown) < _UNKNOWN_METHODS or method in self._unknown:
                self._unknown.add(method)
            else:
                method = "(other)"
            self._count(method, grpc.StatusCode.UNIMPLEMENTED)
            return None
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(method, handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._streaming(method, handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                self._streaming(method, handler.stream_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    def _unary(self, method: str, behaviour: Callable[..., Any]) -> Callable[..., Any]:
        async def counted(request: Any, context: grpc.aio.ServicerContext) -> Any:
            code = grpc.StatusCode.UNKNOWN
            try:
                result = behaviour(request, context)
                if inspect.isawaitable(result):
                    result = await result
                code = _final_code(context)
                return result
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except grpc.aio.AbortError:
                code = _final_code(context)
                raise
            finally:
                self._count(method, code)

        return counted

    def _streaming(self, method: str, behaviour: Callable[..., Any]) -> Callable[..., Any]:
        async def counted(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            code = grpc.StatusCode.UNKNOWN
            try:
                async for item in behaviour(request, context):
                    yield item
                code = _final_code(context)
            except (asyncio.CancelledError, GeneratorExit):
                code = grpc.StatusCode.CANCELLED
                raise
            except grpc.aio.AbortError:
                code = _final_code(context)
                raise
            finally:
                self._count(method, code)

        return counted
