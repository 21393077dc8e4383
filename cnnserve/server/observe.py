"""One request's measurement on one model version: statistics, metrics and the request log.

Both ModelInfer and Classify wrap their work in `Observe(...)`; the outcome is
"success" or the status code name of the error that ended the request.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from cnnserve.server.batcher import JobResult
from cnnserve.server.errors import CnnserveError
from cnnserve.server.metrics import DEADLINE_SLACK_S, VersionSeries
from cnnserve.server.runner import Timings
from cnnserve.server.stats import VersionStats

log = logging.getLogger("cnnserve.requests")


@dataclass
class Observation:
    rows: int = 0
    results: Sequence[JobResult] = field(default_factory=list)
    deadline_ns: int | None = None  # set once known: a cancel after it is a timeout

    def succeeded(self, rows: int, results: Sequence[JobResult]) -> None:
        self.rows = rows
        self.results = results


def _outcome(exc: BaseException) -> str:
    if isinstance(exc, CnnserveError):
        return exc.code.lower()
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled"
    return "internal"


class Measured(Protocol):
    """What a request is measured on: a model version (`model.ModelVersion`)."""

    name: str
    version: int
    stats: VersionStats
    series: VersionSeries | None

    def acquire(self) -> None: ...

    def release(self) -> None: ...


M = TypeVar("M", bound=Measured)
_SLACK_NS = int(DEADLINE_SLACK_S * 1e9)


class Observe(Generic[M]):
    """One request's scope on a version: `with Observe(version, ...) as (version, seen):`.

    It holds a lease on the version for the block, times the block, and records it as a
    success (after `seen.succeeded`) or as the error it raised. A plain class, since it
    runs on every request, where a generator-based context manager costs more.
    """

    __slots__ = ("_version", "_request_id", "_log_rate", "_started", "_seen")

    def __init__(self, version: M, *, request_id: str, log_rate: float = 0.0) -> None:
        self._version = version
        self._request_id = request_id
        self._log_rate = log_rate
        self._started = 0
        self._seen = Observation()

    def __enter__(self) -> tuple[M, Observation]:
        self._version.acquire()
        self._started = time.perf_counter_ns()
        return self._version, self._seen

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, _: object
    ) -> None:
        try:
            self._record(error)
        finally:
            self._version.release()

    def _record(self, error: BaseException | None) -> None:
        elapsed = time.perf_counter_ns() - self._started
        seen, version = self._seen, self._version
        if error is not None:
            outcome = _outcome(error)
            deadline = seen.deadline_ns
            late = deadline is not None and time.monotonic_ns() >= deadline - _SLACK_NS
            if outcome == "cancelled" and late:
                outcome = "deadline_exceeded"  # gRPC cancels the call when its deadline passes
        else:  # a block that ends without `succeeded` is a bug, not a success
            outcome = "success" if seen.results else "internal"
        if len(seen.results) == 1:
            queue_ns, timings = seen.results[0].queue_ns, seen.results[0].timings
        else:
            queue_ns = max((r.queue_ns for r in seen.results), default=0)
            timings = max(
                (r.timings for r in seen.results),
                key=lambda t: t.input_ns + t.infer_ns + t.output_ns,
                default=Timings(0, 0, 0),
            )
        if outcome == "success":
            version.stats.record_success(seen.rows, elapsed, queue_ns, timings)
        else:
            version.stats.record_failure(elapsed)
        series = version.series
        if series is not None:
            series.requests(outcome).inc()
            series.request_duration.observe(elapsed / 1e9)
            if outcome == "success":
                series.queue_duration.observe(queue_ns / 1e9)
        if self._log_rate and random.random() < self._log_rate:
            self._log(outcome, elapsed, queue_ns, timings)

    def _log(self, outcome: str, elapsed: int, queue_ns: int, timings: Timings) -> None:
        fields: dict[str, object] = {
            "request_id": self._request_id or uuid.uuid4().hex,
            "model": self._version.name,
            "version": str(self._version.version),
            "outcome": outcome,
            "duration_ms": round(elapsed / 1e6, 3),
        }
        if outcome == "success":
            fields["queue_ms"] = round(queue_ns / 1e6, 3)
            total = timings.input_ns + timings.infer_ns + timings.output_ns
            fields["compute_ms"] = round(total / 1e6, 3)
        log.info("request %s", outcome, extra=fields)
