"""Cumulative per-version statistics, as ModelStatistics reports them.

Updated on the event loop only (the batcher's completion callbacks run there),
so plain integers suffice.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

from cnnserve.server.runner import Timings


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns


@dataclass
class BatchStats:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass
class VersionStats:
    """Triton's InferStatistics: request outcomes, where time went, per batch size."""

    last_inference_ms: int = 0
    inference_count: int = 0
    execution_count: int = 0
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    batches: dict[int, BatchStats] = field(default_factory=lambda: defaultdict(BatchStats))

    def record_execution(self, batch_size: int, t: Timings) -> None:
        self.execution_count += 1
        b = self.batches[batch_size]
        b.compute_input.add(t.input_ns)
        b.compute_infer.add(t.infer_ns)
        b.compute_output.add(t.output_ns)

    def record_success(self, rows: int, total_ns: int, queue_ns: int, t: Timings) -> None:
        self.last_inference_ms = time.time_ns() // 1_000_000  # a timestamp, not a duration
        self.inference_count += rows
        self.success.add(total_ns)
        self.queue.add(queue_ns)
        self.compute_input.add(t.input_ns)
        self.compute_infer.add(t.infer_ns)
        self.compute_output.add(t.output_ns)

    def record_failure(self, total_ns: int) -> None:
        self.last_inference_ms = time.time_ns() // 1_000_000
        self.fail.add(total_ns)
