"""Shutdown's first step, shared by the servicers: refuse new work and end idle streams.

A stream that waits for its client's next request would otherwise hold the shutdown for
the whole grace period, and with it a rolling update. Once the server drains, a stream
stops reading: at once if it is waiting for a request, or as soon as the one it is reading
is in. The requests it has read are answered, and then it ends UNAVAILABLE, which clients
retry on another connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any, TypeVar

from cnnserve.server.errors import ServerDraining

T = TypeVar("T")


class Drain:
    def __init__(self) -> None:
        self.started = False
        self._waiting: set[asyncio.Task[Any]] = set()  # streams waiting for a request
        self._stopped: set[asyncio.Task[Any]] = set()  # of those, the ones `begin` cancelled

    def begin(self) -> None:
        self.started = True
        for task in self._waiting:
            self._stopped.add(task)
            task.cancel()
        self._waiting.clear()

    async def requests(self, stream: AsyncIterable[T]) -> AsyncIterator[T]:
        """The stream's requests until the client ends it, or ServerDraining once the
        server drains. Reading runs in the task that iterates this."""
        task = asyncio.current_task()
        assert task is not None
        messages = aiter(stream)
        while True:
            if self.started:
                raise ServerDraining("the server is shutting down")
            self._waiting.add(task)
            try:
                request = await anext(messages)
            except StopAsyncIteration:
                return
            except asyncio.CancelledError:
                # `begin` cancels only tasks suspended in this read, so its cancel lands
                # here; a request that had just come in is then dropped unanswered, like
                # every one the stream would still have sent.
                if task not in self._stopped:
                    raise
                self._stopped.discard(task)
                if task.uncancel() > 0:  # cancelled by gRPC too
                    raise
                raise ServerDraining("the server is shutting down") from None
            finally:
                self._waiting.discard(task)
            yield request
