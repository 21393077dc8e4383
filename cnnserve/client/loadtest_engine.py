"""The load engine behind `cnnserve loadtest`: asyncio workers that send pre-serialized requests.

The request is built and serialized once; every worker sends the same bytes
through a `unary_unary` call whose serializers are None, and the answer is
never parsed (its status code is all we keep). That leaves the client with
the least Python work gRPC allows per request, so that what is measured is
the server. Workers share one channel per `workers_per_channel` (each channel
its own TCP connection, through a local subchannel pool).

Two kinds of load (`Level`):
- closed loop: `concurrency` workers, each sending its next request as soon
  as the last one is answered, as perf_analyzer's `--concurrency-range` does;
- open loop: `rate` requests per second, evenly spaced or Poisson, whatever
  the answers do. Latency then counts from the time a request was due, not
  from when the client got round to sending it, so a client that falls
  behind cannot hide queueing (coordinated omission).

`Engine.cut()` closes the current measurement window and returns its raw
figures: each success's latency, errors by status code, the client's CPU
time. A request belongs to the window in which its answer arrives. Errors are
also counted over the whole level (`Engine.errors`): warm-up, windows not kept,
and requests still unanswered when the level ends (UNANSWERED), so that none
goes unreported.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from cnnserve.client.loadtest_report import (
    BACKLOG_CODE,
    UNANSWERED_CODE,
    LevelResult,
    StatsSnapshot,
    summarize,
)

INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
CLASSIFY_METHOD = "/cnnserve.v1.ImageClassifier/Classify"
# Open loop: beyond this many unanswered requests, requests due are not sent but
# counted under this client-side code, so an overloaded server cannot exhaust memory.
MAX_OUTSTANDING = 10_000
OPEN_LOOP_CHANNELS = 4


@dataclass(frozen=True)
class Workload:
    """What every request is: the method path, its serialized bytes, images per request."""

    method: str
    request: bytes
    inferences: int


@dataclass(frozen=True)
class Level:
    """One load level: `concurrency` workers (closed loop) or `rate` requests/s (open loop)."""

    concurrency: int = 0
    rate: float = 0.0
    poisson: bool = False

    def __post_init__(self) -> None:
        if (self.concurrency > 0) == (self.rate > 0):
            raise ValueError("a level has either a concurrency or a request rate")

    def describe(self) -> str:
        if self.concurrency:
            return f"concurrency {self.concurrency}"
        return f"{self.rate:g} req/s{' (Poisson)' if self.poisson else ''}"


@dataclass
class Window:
    """The raw figures of one measurement window."""

    seconds: float
    latencies_ns: list[int]
    errors: Counter[str]
    cpu_ns: int
    due: int = 0  # open loop: requests due to be sent in the window


@dataclass
class _Recorder:
    started_ns: int = field(default_factory=time.perf_counter_ns)
    cpu_ns: int = field(default_factory=time.process_time_ns)
    latencies_ns: list[int] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    due: int = 0


ChannelFactory = Callable[[int], grpc.aio.Channel]
StatsReader = Callable[[], Awaitable[StatsSnapshot | None]]
Progress = Callable[[str], None]


@dataclass(frozen=True)
class Policy:
    """How long each level is measured."""

    window_secs: float = 2.0
    stability_pct: float = 10.0
    max_trials: int = 10
    warmup_secs: float = 1.0
    duration: float | None = None  # one window of this length, no stability check


class Engine:
    """Sends one workload at one level at a time; `cut()` reads a window, `stop()` ends it."""

    def __init__(
        self,
        make_channel: ChannelFactory,
        workload: Workload,
        *,
        metadata: Sequence[tuple[str, str]] = (),
        timeout: float | None = None,
        workers_per_channel: int = 16,
        seed: int = 0,
    ) -> None:
        if workers_per_channel < 1:
            raise ValueError("workers_per_channel must be at least 1")
        self._make_channel = make_channel
        self._channels: list[grpc.aio.Channel] = []
        self._workload = workload
        self._metadata = tuple(metadata) or None
        self._timeout = timeout
        self._per_channel = workers_per_channel
        self._random = random.Random(seed)
        self._recorder = _Recorder()
        self.errors: Counter[str] = Counter()  # over the whole level, see the module's doc
        self.details: dict[str, str] = {}  # the first message of each code
        self._tasks: list[asyncio.Task[None]] = []
        self._outstanding: set[asyncio.Task[None]] = set()
        self._scheduler = False  # whether _tasks is the open loop's scheduler
        self._unanswered = ""
        self._running = False

    def _calls(self, count: int) -> list[Any]:
        while len(self._channels) < count:
            self._channels.append(self._make_channel(len(self._channels)))
        return [
            channel.unary_unary(
                self._workload.method, request_serializer=None, response_deserializer=None
            )
            for channel in self._channels[:count]
        ]

    def start(self, level: Level) -> None:
        """Begin sending at `level`; the first window starts now."""
        if self._running:
            raise RuntimeError("the engine is already running; stop() it first")
        self._running = True
        self._recorder = _Recorder()
        self.errors, self.details = Counter(), {}
        self._scheduler = not level.concurrency
        if level.concurrency:
            calls = self._calls(math.ceil(level.concurrency / self._per_channel))
            self._tasks = [
                asyncio.create_task(self._closed(calls[i % len(calls)]))
                for i in range(level.concurrency)
            ]
        else:
            calls = self._calls(OPEN_LOOP_CHANNELS)
            self._tasks = [asyncio.create_task(self._open(calls, level))]

    def cut(self) -> Window:
        """End the current window, start the next one, and return the one that ended."""
        old, self._recorder = self._recorder, _Recorder()
        return Window(
            seconds=(self._recorder.started_ns - old.started_ns) / 1e9,
            latencies_ns=old.latencies_ns,
            errors=old.errors,
            cpu_ns=self._recorder.cpu_ns - old.cpu_ns,
            due=old.due,
        )

    async def stop(self, grace: float = 30.0) -> None:
        """Send nothing more; give requests in flight `grace` seconds (at most a moment
        past the call timeout), then cancel them, counting them UNANSWERED."""
        self._running = False
        if self._timeout is not None:
            grace = min(grace, self._timeout + 1.0)
        self._unanswered = f"no answer when the level ended, {grace:g} s after its last request"
        if self._scheduler:  # the open loop's: it only waits for the next due time
            for task in self._tasks:
                task.cancel()
        pending = [*self._tasks, *self._outstanding]
        if pending:
            _, late = await asyncio.wait(pending, timeout=grace)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        self._tasks, self._outstanding = [], set()

    async def close(self) -> None:
        await self.stop()
        for channel in self._channels:
            await channel.close()
        self._channels = []

    async def _send(self, call: Any, started_ns: int) -> None:
        try:
            await call(self._workload.request, timeout=self._timeout, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            self._error(exc.code().name, exc.details() or "")
            return
        except asyncio.CancelledError:
            if not self._running:  # stop() gave up waiting for it
                self.errors[UNANSWERED_CODE] += 1
                self.details.setdefault(UNANSWERED_CODE, self._unanswered)
            raise
        self._recorder.latencies_ns.append(time.perf_counter_ns() - started_ns)

    def _error(self, code: str, details: str) -> None:
        self._recorder.errors[code] += 1
        self.errors[code] += 1
        self.details.setdefault(code, details)

    async def _closed(self, call: Any) -> None:
        while self._running:
            await self._send(call, time.perf_counter_ns())

    async def _open(self, calls: list[Any], level: Level) -> None:
        due = time.perf_counter_ns()
        sent = 0
        while self._running:
            wait = due - time.perf_counter_ns()
            if wait > 0:
                await asyncio.sleep(wait / 1e9)
                continue
            self._recorder.due += 1
            if len(self._outstanding) >= MAX_OUTSTANDING:
                self._error(BACKLOG_CODE, f"over {MAX_OUTSTANDING} requests were unanswered")
            else:
                task = asyncio.create_task(self._send(calls[sent % len(calls)], due))
                self._outstanding.add(task)
                task.add_done_callback(self._outstanding.discard)
            sent += 1
            gap = self._random.expovariate(level.rate) if level.poisson else 1 / level.rate
            due += int(gap * 1e9)
            if sent % 64 == 0:  # catching up: let answers in, and let stop() be seen
                await asyncio.sleep(0)


# -- measuring a level ------------------------------------------------------------------


def _spread_ok(values: Sequence[float | None], pct: float) -> bool:
    if all(v is None for v in values):
        return True
    if any(v is None for v in values):
        return False
    numbers = [float(v) for v in values if v is not None]
    mean = sum(numbers) / len(numbers)
    return mean == 0 or all(abs(v - mean) <= mean * pct / 100 for v in numbers)


def stable(windows: Sequence[Window], pct: float) -> bool:
    """Throughput and p50 of each window within `pct` percent of their mean (and some
    success in each: nothing but errors is not a steady state to report)."""
    if not all(w.latencies_ns for w in windows):
        return False
    rates = [len(w.latencies_ns) / w.seconds if w.seconds else 0.0 for w in windows]
    medians = [float(np.median(w.latencies_ns)) if w.latencies_ns else None for w in windows]
    return _spread_ok(rates, pct) and _spread_ok(medians, pct)


async def _snapshot(stats: StatsReader | None) -> StatsSnapshot | None:
    return None if stats is None else await stats()


async def measure(
    engine: Engine,
    level: Level,
    policy: Policy,
    *,
    inferences: int,
    stats: StatsReader | None = None,
    progress: Progress | None = None,
) -> LevelResult:
    """Warm up, then measure windows at `level` until stable (or out of trials)."""
    length = policy.duration or policy.window_secs
    trials = 1 if policy.duration else max(3, policy.max_trials)
    windows: list[Window] = []
    # ModelStatistics at each window's edge, read beside the load: a server slow to answer
    # it does not stretch the windows.
    snapshots: list[asyncio.Future[StatsSnapshot | None]] = []
    engine.start(level)
    try:
        await asyncio.sleep(policy.warmup_secs)
        engine.cut()
        snapshots.append(asyncio.ensure_future(_snapshot(stats)))
        is_stable: bool | None = None if policy.duration else False  # None: not checked
        for trial in range(1, trials + 1):
            await asyncio.sleep(length)
            windows.append(engine.cut())
            snapshots.append(asyncio.ensure_future(_snapshot(stats)))
            if progress is not None:
                w = windows[-1]
                rate = len(w.latencies_ns) * inferences / w.seconds
                progress(f"{level.describe()}: window {trial}/{trials}, {rate:,.1f} infer/s")
            checked = is_stable is False and len(windows) >= 3
            if checked and stable(windows[-3:], policy.stability_pct):
                is_stable = True
                break
    finally:
        task = asyncio.current_task()
        interrupted = task is not None and task.cancelling()
        if interrupted:
            for snapshot in snapshots:
                snapshot.cancel()
        await engine.stop(0 if interrupted else 30)  # interrupted: the figures are not kept
    kept = windows if policy.duration else windows[-3:]
    needed = (snapshots[-len(kept) - 1], snapshots[-1])
    for snapshot in snapshots:
        if snapshot not in needed:
            snapshot.cancel()
    await asyncio.gather(*snapshots, return_exceptions=True)
    first, last = (snapshot.result() for snapshot in needed)
    server = last.since(first) if first is not None and last is not None else None
    return summarize(
        level,
        kept,
        inferences,
        server,
        is_stable,
        windows_run=len(windows),
        errors=engine.errors,
        details=engine.details,
    )


async def run_levels(
    make_channel: ChannelFactory,
    workload: Workload,
    levels: Sequence[Level],
    policy: Policy,
    *,
    metadata: Sequence[tuple[str, str]] = (),
    timeout: float | None = None,
    workers_per_channel: int = 16,
    stats: StatsReader | None = None,
    progress: Progress | None = None,
) -> list[LevelResult]:
    """Measure each level in turn with one engine (its channels are reused between levels)."""
    engine = Engine(
        make_channel,
        workload,
        metadata=metadata,
        timeout=timeout,
        workers_per_channel=workers_per_channel,
    )
    results = []
    try:
        for level in levels:
            result = await measure(
                engine,
                level,
                policy,
                inferences=workload.inferences,
                stats=stats,
                progress=progress,
            )
            results.append(result)
            if result.error_count and not result.requests:
                break  # every request failed: the levels after would fare no better
    finally:
        await engine.close()
    return results
