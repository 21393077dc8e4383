"""One request's measurement on one model version: statistics, metrics and the request log.

Both ModelInfer and Classify wrap their work in `observe(...)`; the outcome is
"success" or the status code name of the error that ended the request.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from cnnserve.server.batcher import JobResult
from cnnserve.server.errors import CnnserveError
from cnnserve.server.metrics import VersionSeries
from cnnserve.server.runner import Timings
from cnnserve.server.stats import VersionStats

log = logging.getLogger("cnnserve.requests")


@dataclass
class Observation:
    rows: int = 0
    results: Sequence[JobResult] = field(default_factory=list)

    def succeeded(self, rows: int, results: Sequence[JobResult]) -> None:
        self.rows = rows
        self.results = results


def _outcome(exc: BaseException) -> str:
    if isinstance(exc, CnnserveError):
        return exc.code.lower()
    if isinstance(exc, asyncio.CancelledError):
        return "cancelled"
    return "internal"


@contextmanager
def observe(
    stats: VersionStats,
    series: VersionSeries | None,
    labels: tuple[str, str],
    *,
    request_id: str,
    log_rate: float = 0.0,
) -> Iterator[Observation]:
    """Time the block; record it as a success (after `succeeded`) or as the error it raised."""
    started = time.perf_counter_ns()
    seen = Observation()
    error: BaseException | None = None
    try:
        yield seen
    except BaseException as exc:
        error = exc
        raise
    finally:
        if error is not None:
            outcome = _outcome(error)
        else:  # a block that ends without `succeeded` is a bug, not a success
            outcome = "success" if seen.results else "internal"
        elapsed = time.perf_counter_ns() - started
        queue_ns = max((r.queue_ns for r in seen.results), default=0)
        timings = max(
            (r.timings for r in seen.results),
            key=lambda t: t.input_ns + t.infer_ns + t.output_ns,
            default=Timings(0, 0, 0),
        )
        if outcome == "success":
            stats.record_success(seen.rows, elapsed, queue_ns, timings)
        else:
            stats.record_failure(elapsed)
        if series is not None:
            series.requests(outcome).inc()
            series.request_duration.observe(elapsed / 1e9)
            if outcome == "success":
                series.queue_duration.observe(queue_ns / 1e9)
        if log_rate and random.random() < log_rate:
            fields: dict[str, object] = {
                "request_id": request_id or uuid.uuid4().hex,
                "model": labels[0],
                "version": labels[1],
                "outcome": outcome,
                "duration_ms": round(elapsed / 1e6, 3),
            }
            if outcome == "success":
                fields["queue_ms"] = round(queue_ns / 1e6, 3)
                total = timings.input_ns + timings.infer_ns + timings.output_ns
                fields["compute_ms"] = round(total / 1e6, 3)
            log.info("request %s", outcome, extra=fields)
