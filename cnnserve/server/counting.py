"""Counting every gRPC call by method and final status code.

Services register through `CallCounter.registrar(server)`, which wraps each
method's handler once, at registration, so a call pays for one wrapper and no
per-call interceptor. Calls to methods no service has reach `unknown`, a
generic handler added after all the others, and are counted as UNIMPLEMENTED
(after 32 distinct such names, as method "(other)": clients choose them).
Calls the token check refuses are counted through `count`.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any

import grpc
from prometheus_client import Counter

from cnnserve.server.metrics import DEADLINE_SLACK_S, Metrics

_UNKNOWN_METHODS = 32  # distinct unimplemented method names counted by name


def method_name(full: str) -> str:
    """ "/package.Service/Method" → "Method"."""
    return full.rsplit("/", 1)[-1] or full


def _final_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    code = context.code()
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.OK


class CallCounter:
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._counters: dict[tuple[str, grpc.StatusCode], Counter] = {}
        self._unknown: set[str] = set()

    def count(self, method: str, code: grpc.StatusCode) -> None:
        counter = self._counters.get((method, code))
        if counter is None:
            counter = self._metrics.grpc_requests.labels(method, code.name)
            self._counters[(method, code)] = counter
        counter.inc()

    def registrar(self, server: grpc.aio.Server) -> Registrar:
        """What to hand the generated `add_*_to_server` functions instead of the server."""
        return Registrar(server, self)

    def unknown(self) -> grpc.GenericRpcHandler:
        """The last generic handler: counts a call no service answered; gRPC then says
        UNIMPLEMENTED."""
        return _Unknown(self)

    def count_unknown(self, method: str) -> None:
        if len(self._unknown) < _UNKNOWN_METHODS or method in self._unknown:
            self._unknown.add(method)
        else:
            method = "(other)"
        self.count(method, grpc.StatusCode.UNIMPLEMENTED)

    def wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """The same handler, counting each call's outcome."""
        kinds: tuple[tuple[str, Callable[..., grpc.RpcMethodHandler], Callable[..., Any]], ...] = (
            ("unary_unary", grpc.unary_unary_rpc_method_handler, self._unary),
            ("stream_unary", grpc.stream_unary_rpc_method_handler, self._unary),
            ("unary_stream", grpc.unary_stream_rpc_method_handler, self._streaming),
            ("stream_stream", grpc.stream_stream_rpc_method_handler, self._streaming),
        )
        for kind, make, counting in kinds:
            behaviour = getattr(handler, kind)
            if behaviour is not None:
                return make(
                    counting(method, behaviour),
                    request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer,
                )
        return handler

    def _unary(self, method: str, behaviour: Callable[..., Any]) -> Callable[..., Any]:
        async def counted(request: Any, context: grpc.aio.ServicerContext) -> Any:
            with _Outcome(self, method, context):
                result = behaviour(request, context)
                if inspect.isawaitable(result):
                    result = await result
                return result

        return counted

    def _streaming(self, method: str, behaviour: Callable[..., Any]) -> Callable[..., Any]:
        if not inspect.isasyncgenfunction(behaviour):
            # A streaming handler may also be a coroutine that answers through
            # `context.write` (grpc's own health Watch does): counted as a unary one.
            return self._unary(method, behaviour)

        async def counted(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            with _Outcome(self, method, context):
                async for item in behaviour(request, context):
                    yield item

        return counted


class _Outcome:
    """Counts the call its block serves, with the code it ended with."""

    def __init__(
        self, counter: CallCounter, method: str, context: grpc.aio.ServicerContext
    ) -> None:
        self._counter, self._method, self._context = counter, method, context

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        remaining = self._context.time_remaining()
        if kind is None and remaining is not None and remaining <= 0:
            # Ended past its deadline, so the client has DEADLINE_EXCEEDED: a stream handler
            # waiting for its next request sees the stream end then, as if closed.
            code = grpc.StatusCode.DEADLINE_EXCEEDED
        elif kind is None or issubclass(kind, grpc.aio.AbortError):
            code = _final_code(self._context)
        elif issubclass(kind, (asyncio.CancelledError, GeneratorExit)):
            # gRPC cancels the handler both when the client cancels and at the deadline.
            late = remaining is not None and remaining <= DEADLINE_SLACK_S
            code = grpc.StatusCode.DEADLINE_EXCEEDED if late else grpc.StatusCode.CANCELLED
        else:
            code = grpc.StatusCode.UNKNOWN
        self._counter.count(self._method, code)


class Registrar:
    """Stands in for the server while services register; wraps their handlers once."""

    def __init__(self, server: grpc.aio.Server, counter: CallCounter) -> None:
        self._server = server
        self._counter = counter

    def add_registered_method_handlers(
        self, service: str, handlers: Mapping[str, grpc.RpcMethodHandler]
    ) -> None:
        wrapped = {name: self._counter.wrap(name, h) for name, h in handlers.items()}
        self._server.add_registered_method_handlers(service, wrapped)

    def add_generic_rpc_handlers(self, handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(
            tuple(_Counted(handler, self._counter) for handler in handlers)
        )


class _Counted(grpc.GenericRpcHandler):
    """A service's generic handler, its answers wrapped once per method."""

    def __init__(self, inner: grpc.GenericRpcHandler, counter: CallCounter) -> None:
        self._inner = inner
        self._counter = counter
        self._wrapped: dict[str, grpc.RpcMethodHandler | None] = {}

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = details.method
        if method in self._wrapped:
            return self._wrapped[method]
        handler = self._inner.service(details)
        if handler is None:
            return None  # not this service's: not remembered, the names are the client's
        wrapped = self._wrapped[method] = self._counter.wrap(method_name(method), handler)
        return wrapped


class _Unknown(grpc.GenericRpcHandler):
    def __init__(self, counter: CallCounter) -> None:
        self._counter = counter

    def service(self, details: grpc.HandlerCallDetails) -> None:
        self._counter.count_unknown(method_name(details.method))
