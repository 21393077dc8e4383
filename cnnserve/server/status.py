"""Domain errors → gRPC status codes, applied once, around every handler.

`rpc` wraps a unary handler: it refuses calls while the server drains, maps
each CnnserveError to its status with the error's message, and turns anything
else into INTERNAL with a generic message (the traceback goes to the log).
Calls are counted by method and code in `counting`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import grpc

from cnnserve.server import errors
from cnnserve.server.drain import Drain

log = logging.getLogger(__name__)


def code_for(exc: errors.CnnserveError) -> grpc.StatusCode:
    return grpc.StatusCode[exc.code]


class Guarded(Protocol):
    """What `rpc` needs from the servicer it decorates."""

    drain: Drain


S = TypeVar("S", bound=Guarded)
Handler = Callable[[S, Any, grpc.aio.ServicerContext], Awaitable[Any]]


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, details: str) -> None:
    """End the call with this status. A call already over (its deadline passed, or its
    client left) has nobody to tell: gRPC would fail to send, so it ends as cancelled."""
    if not context.done():
        try:
            await context.abort(code, details)
        except grpc.aio.AbortError:
            raise
        except Exception:
            if not context.done():
                raise
    raise asyncio.CancelledError


def rpc(method: str) -> Callable[[Handler[S]], Handler[S]]:
    def wrap(handler: Handler[S]) -> Handler[S]:
        @functools.wraps(handler)
        async def guarded(self: S, request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                if self.drain.started:
                    raise errors.ServerDraining("the server is shutting down")
                return await handler(self, request, context)
            except errors.CnnserveError as exc:
                await _abort(context, code_for(exc), str(exc))
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception:
                log.exception("%s failed", method)
                await _abort(
                    context,
                    grpc.StatusCode.INTERNAL,
                    f"internal error in {method}; see the server log",
                )

        return guarded

    return wrap
