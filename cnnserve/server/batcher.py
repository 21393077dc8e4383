"""The dynamic batcher: a bounded queue of requests → batches → runners.

One asyncio task per model version takes an idle runner, gathers queued rows
until the batch is full, a preferred size is reached, or its adaptive window
closes, then hands the batch to the runner (its thread, or inline) and goes on
gathering for the next idle runner. The window never passes `max_queue_delay`
and stays open only while requests keep arriving (see `_join`), so a lone
client is not delayed. A request larger than the room left is split across
batches; its rows come back as views of the batch outputs. Cancelled requests
and requests past their deadline are dropped before compute.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from cnnserve.server.errors import DeadlineExceeded, ModelNotReady, QueueFull
from cnnserve.server.runner import Runner, Timings


@dataclass(frozen=True)
class BatchingOptions:
    max_batch_size: int  # 0: the model has no batch dimension
    dynamic: bool = True  # False: each request runs alone, as Triton without dynamic_batching
    max_queue_delay_ns: int = 0
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_size: int = 1024


@dataclass(frozen=True)
class JobResult:
    outputs: list[np.ndarray]  # in the batcher's output order, `rows` rows each
    queue_ns: int
    timings: Timings


@dataclass(eq=False)
class _Job:
    inputs: dict[str, np.ndarray]
    rows: int
    deadline_ns: int | None
    future: asyncio.Future[JobResult]
    enqueued_ns: int
    key: tuple[object, ...]
    taken: int = 0
    done: int = 0
    queue_ns: int = -1
    parts: list[tuple[int, list[np.ndarray]]] = field(default_factory=list)


_Slice = tuple[_Job, int, int]  # job, first row, end row
OnExecution = Callable[[int, Timings], None]

# The adaptive batch window: its shortest, and how often it is tried while closed.
_PROBE_NS = 100_000
_PROBE_EVERY = 8


class Batcher:
    """Queue → batches → runners for one model version."""

    def __init__(
        self,
        runners: Sequence[Runner],
        output_names: Sequence[str],
        options: BatchingOptions,
        on_execution: OnExecution | None = None,
    ) -> None:
        self._runners = list(runners)
        self._output_names = list(output_names)
        self._opts = options
        self._on_execution = on_execution
        self._queue: deque[_Job] = deque()
        self._queued_rows = 0
        self._executing = 0
        self._wakeup = asyncio.Event()
        self._idle: asyncio.Queue[Runner] = asyncio.Queue()
        for runner in self._runners:
            self._idle.put_nowait(runner)
        self._window_ns = 0
        self._probe = 0
        self._closing = False
        self._task: asyncio.Task[None] | None = None

    @property
    def pending(self) -> int:
        """Requests queued or executing; one split across batches counts once."""
        partly_taken = bool(self._queue) and self._queue[0].taken > 0  # only the head can be
        return len(self._queue) + self._executing - partly_taken

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="batcher")

    async def submit(
        self,
        inputs: dict[str, np.ndarray],
        rows: int,
        deadline_ns: int | None = None,
        *,
        expire: bool = False,
    ) -> JobResult:
        """Queue one request and wait for its rows; cancelling the caller drops it.

        A request still queued at its deadline fails when the batcher next looks at the
        queue, which may be after a running batch; with `expire`, it fails at the
        deadline itself. gRPC ends calls at their own deadlines (cancelling the caller);
        `expire` is for the request's `timeout` parameter, which only the server keeps.
        Either way its place in the queue is free at once.
        """
        if self._closing:
            raise ModelNotReady("the model version is being unloaded")
        if len(self._queue) >= self._opts.max_queue_size:
            raise QueueFull(f"queue is full ({self._opts.max_queue_size} requests)")
        now = time.monotonic_ns()
        if deadline_ns is not None and now >= deadline_ns:
            raise DeadlineExceeded("the deadline passed before the request was queued")
        key = tuple([(name, a.shape[1:], a.dtype) for name, a in inputs.items()])
        job = _Job(inputs, rows, deadline_ns, asyncio.get_running_loop().create_future(), now, key)
        self._queue.append(job)
        self._queued_rows += rows
        self._wakeup.set()
        timer = None
        if expire and deadline_ns is not None:
            delay = (deadline_ns - now) / 1e9
            timer = asyncio.get_running_loop().call_later(delay, self._expire, job)
        try:
            return await job.future
        except asyncio.CancelledError:
            self._forget(job)
            raise
        finally:
            if timer is not None:
                timer.cancel()

    async def close(self) -> None:
        """Stop taking requests, finish every queued and executing one, then return."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
        for _ in self._runners:
            await self._idle.get()

    async def _loop(self) -> None:
        while True:
            runner = await self._idle.get()
            batch = await self._gather()
            if not batch:
                self._idle.put_nowait(runner)
                return
            self._launch(runner, batch)

    def _limit(self) -> int:
        """Rows to dispatch now, or 0 to let more requests join first."""
        most = max(1, self._opts.max_batch_size)
        if self._closing or self._queued_rows >= most or not self._opts.dynamic:
            return most
        fitting = [p for p in self._opts.preferred_batch_sizes if p <= self._queued_rows]
        if fitting:
            return max(fitting)
        waited = time.monotonic_ns() - self._queue[0].enqueued_ns
        return most if waited >= self._opts.max_queue_delay_ns else 0

    async def _gather(self) -> list[_Slice]:
        while True:
            self._drop_dead()
            if not self._queue:
                if self._closing:
                    return []
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            limit = self._limit() or await self._join()
            batch = self._take(limit)
            if batch:
                return batch

    async def _join(self) -> int:
        """Let more requests join the batch for the adaptive window, then return its size.

        The window (at most `max_queue_delay`) follows how long arrivals keep coming:
        it doubles while rows still arrive in its second half, shrinks to twice the
        last arrival's time when they stop earlier, and halves to nothing when a wait
        brings none. At nothing, every few batches wait a short probe instead, so a
        rising load is noticed. A lone client never waits longer than the probe.
        """
        most = max(1, self._opts.max_batch_size)
        window = self._window_ns
        if not window:
            self._probe = (self._probe + 1) % _PROBE_EVERY
            if self._probe:
                return most
            window = min(_PROBE_NS, self._opts.max_queue_delay_ns)
        clock = time.monotonic_ns
        start = clock()
        end = min(start + window, self._queue[0].enqueued_ns + self._opts.max_queue_delay_ns)
        last_arrival = arrivals = 0
        limit = 0
        rows = self._queued_rows
        while (now := clock()) < end and not self._closing:
            if arrivals and now - start - last_arrival > 2 * last_arrival // arrivals:
                break  # the arrivals have paused: twice their mean gap has passed
            await asyncio.sleep(0)
            if self._queued_rows == rows:
                continue  # nothing arrived; a cancelled or expired request waits for _take
            self._drop_dead()
            if not self._queue:
                return 0
            if self._queued_rows > rows:
                last_arrival = clock() - start
                arrivals += 1
            rows = self._queued_rows
            limit = self._limit()
            if limit:
                break
        self._resize(window, last_arrival, full=bool(limit))
        return limit or most

    def _resize(self, window: int, last_arrival: int, *, full: bool) -> None:
        """The next window, from how the last one went (see `_join`)."""
        if not last_arrival:
            self._window_ns = window // 2 if window // 2 >= _PROBE_NS else 0
        elif full or last_arrival * 2 > window:
            self._window_ns = min(window * 2, self._opts.max_queue_delay_ns)
        else:
            self._window_ns = max(last_arrival * 2, _PROBE_NS)

    def _drop_dead(self) -> None:
        """Forget cancelled requests and fail expired ones, from the head of the queue."""
        now = time.monotonic_ns()
        while self._queue:
            job = self._queue[0]
            if job.deadline_ns is not None and now >= job.deadline_ns and not job.future.done():
                job.future.set_exception(DeadlineExceeded("timed out while queued"))
            if not job.future.done():
                return
            self._queue.popleft()
            self._left_queue(job)

    def _expire(self, job: _Job) -> None:
        if job.taken < job.rows and not job.future.done():  # rows still queued: not run
            job.future.set_exception(DeadlineExceeded("timed out while queued"))
            self._forget(job)

    def _forget(self, job: _Job) -> None:
        """Take a request that will not run out of the queue now, rather than when the
        batcher next looks (after a running batch): its place and its count in `pending`
        are free at once."""
        if job.taken == job.rows:
            return  # all its rows are in batches already
        try:
            self._queue.remove(job)
        except ValueError:
            return  # dropped already
        self._left_queue(job)

    def _left_queue(self, job: _Job) -> None:
        """Account for a request taken out of the queue unrun (or only partly run)."""
        self._queued_rows -= job.rows - job.taken
        if job.taken:  # its first part was launched, its last never will be
            self._executing -= 1

    def _take(self, limit: int) -> list[_Slice]:
        batch: list[_Slice] = []
        rows = 0
        now = time.monotonic_ns()
        while self._queue and rows < limit:
            self._drop_dead()
            if not self._queue or (batch and self._queue[0].key != batch[0][0].key):
                break
            job = self._queue[0]
            count = min(job.rows - job.taken, limit - rows)
            if job.queue_ns < 0:
                job.queue_ns = now - job.enqueued_ns
            batch.append((job, job.taken, job.taken + count))
            job.taken += count
            rows += count
            self._queued_rows -= count
            if job.taken < job.rows:
                break
            self._queue.popleft()
            if not self._opts.dynamic:
                break
        return batch

    def _launch(self, runner: Runner, batch: list[_Slice]) -> None:
        self._executing += sum(1 for job, lo, _ in batch if lo == 0)
        future = runner.submit(lambda: self._execute(runner, batch))
        future.add_done_callback(lambda f: self._finish(runner, batch, f))

    def _execute(self, runner: Runner, batch: list[_Slice]) -> tuple[list[np.ndarray], Timings]:
        """In the runner's thread: one concatenation (on the CPU none for a lone request), one
        run."""
        t0 = time.perf_counter_ns()
        names = batch[0][0].inputs
        feeds = {
            name: runner.gather(name, [j.inputs[name][a:b] for j, a, b in batch]) for name in names
        }
        concat_ns = time.perf_counter_ns() - t0
        outputs, t = runner.run(feeds, self._output_names)
        return outputs, Timings(t.input_ns + concat_ns, t.infer_ns, t.output_ns)

    def _finish(
        self,
        runner: Runner,
        batch: list[_Slice],
        future: asyncio.Future[tuple[list[np.ndarray], Timings]],
    ) -> None:
        self._idle.put_nowait(runner)
        self._executing -= sum(1 for job, _, hi in batch if hi == job.rows)
        error = future.exception()
        if error is not None:
            for job, _, _ in batch:
                if not job.future.done():
                    job.future.set_exception(error)
            return
        outputs, timings = future.result()
        rows = sum(hi - lo for _, lo, hi in batch)
        if self._on_execution is not None:
            self._on_execution(rows, timings)
        if self._opts.max_batch_size == 0:  # no batch dimension to split along
            job = batch[0][0]
            if not job.future.done():
                job.future.set_result(JobResult(outputs, job.queue_ns, timings))
            return
        offset = 0
        for job, lo, hi in batch:
            n = hi - lo
            job.parts.append((lo, [o[offset : offset + n] for o in outputs]))
            offset += n
            job.done += n
            if job.done == job.rows and not job.future.done():
                job.future.set_result(JobResult(_assemble(job), job.queue_ns, timings))


def _assemble(job: _Job) -> list[np.ndarray]:
    if len(job.parts) == 1:
        return job.parts[0][1]
    parts = [p for _, p in sorted(job.parts, key=lambda part: part[0])]
    return [np.concatenate(columns) for columns in zip(*parts, strict=True)]
