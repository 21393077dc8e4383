"""The dynamic batcher on plain numpy arrays and a real onnxruntime runner, without gRPC."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cnnserve.server.batcher import Batcher, BatchingOptions
from cnnserve.server.errors import DeadlineExceeded, ModelLoadError, ModelNotReady, QueueFull
from cnnserve.server.model import ModelVersion
from cnnserve.server.repository import read_model
from cnnserve.server.runner import Runner, RunnerOptions, Timings
from tests.tiny import TINY_CONFIG, TINY_WEIGHTS, write_slow, write_tiny

PARAM = 'parameters {{ key: "{}" value {{ string_value: "{}" }} }}\n'


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runner]:
    model = write_tiny(tmp_path_factory.mktemp("tiny"), config=None) / "1" / "model.onnx"
    r = Runner(model, RunnerOptions(device="cpu"), label="tiny")
    yield r
    r.close()


@pytest.fixture(scope="module")
def slow_runner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runner]:
    model = write_slow(tmp_path_factory.mktemp("slow"), "slow", "") / "1" / "model.onnx"
    r = Runner(model, RunnerOptions(device="cpu"), label="slow")
    yield r
    r.close()


class Recorder:
    def __init__(self) -> None:
        self.batches: list[int] = []

    def __call__(self, rows: int, timings: Timings) -> None:
        self.batches.append(rows)


def rows(n: int, start: float = 0) -> dict[str, np.ndarray]:
    return {"x": (np.arange(n * 4, dtype=np.float32).reshape(n, 4) + start)}


async def run_all(batcher: Batcher, requests: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
    batcher.start()
    try:
        results = await asyncio.gather(*(batcher.submit(r, len(r["x"])) for r in requests))
    finally:
        await batcher.close()
    return [res.outputs[0] for res in results]


def test_requests_are_joined_and_each_gets_its_own_rows(runner: Runner) -> None:
    seen = Recorder()
    opts = BatchingOptions(max_batch_size=8, max_queue_delay_ns=50_000_000)
    requests = [rows(n, start=100 * i) for i, n in enumerate([1, 3, 2, 2])]
    outputs = asyncio.run(run_all(Batcher([runner], ["y"], opts, seen), requests))
    for req, out in zip(requests, outputs, strict=True):
        np.testing.assert_allclose(out, req["x"] @ TINY_WEIGHTS, rtol=1e-5)
    assert seen.batches == [8]


def test_a_request_larger_than_the_room_left_is_split(runner: Runner) -> None:
    seen = Recorder()
    opts = BatchingOptions(max_batch_size=4, max_queue_delay_ns=50_000_000)
    requests = [rows(3), rows(4, start=50)]
    outputs = asyncio.run(run_all(Batcher([runner], ["y"], opts, seen), requests))
    for req, out in zip(requests, outputs, strict=True):
        np.testing.assert_allclose(out, req["x"] @ TINY_WEIGHTS, rtol=1e-5)
    assert seen.batches == [4, 3]


def test_preferred_batch_size_dispatches_without_waiting(runner: Runner) -> None:
    seen = Recorder()
    opts = BatchingOptions(
        max_batch_size=8, max_queue_delay_ns=10_000_000_000, preferred_batch_sizes=(2,)
    )
    started = time.monotonic()
    asyncio.run(run_all(Batcher([runner], ["y"], opts, seen), [rows(1), rows(1)]))
    assert time.monotonic() - started < 5
    assert seen.batches == [2]


def test_a_lone_request_does_not_wait_for_the_queue_delay(runner: Runner) -> None:
    """max_queue_delay is a bound: with nothing else arriving the batch goes at once."""
    seen = Recorder()
    opts = BatchingOptions(max_batch_size=8, max_queue_delay_ns=10_000_000_000)

    async def one_at_a_time() -> float:
        batcher = Batcher([runner], ["y"], opts, seen)
        batcher.start()
        started = time.monotonic()
        for i in range(20):
            await batcher.submit(rows(1, start=i), 1)
        elapsed = time.monotonic() - started
        await batcher.close()
        return elapsed

    assert asyncio.run(one_at_a_time()) < 5  # 20 x 10 s if each waited for the delay
    assert seen.batches == [1] * 20


@pytest.mark.parametrize("delay_ns", [0, 2_000_000])
def test_a_steady_stream_is_batched_within_the_queue_delay(runner: Runner, delay_ns: int) -> None:
    """Requests arriving every few event-loop turns: with a delay allowed, the adaptive
    window grows and joins them; with none, each runs alone (an inline runner never
    keeps a request waiting behind another)."""
    seen = Recorder()
    opts = BatchingOptions(max_batch_size=64, max_queue_delay_ns=delay_ns)

    async def stream() -> list[np.ndarray]:
        batcher = Batcher([runner], ["y"], opts, seen)
        batcher.start()
        tasks = []
        for i in range(400):
            tasks.append(asyncio.create_task(batcher.submit(rows(1, start=i), 1)))
            for _ in range(3):
                await asyncio.sleep(0)
        results = await asyncio.gather(*tasks)
        await batcher.close()
        return [r.outputs[0] for r in results]

    runner.inline = True
    try:
        outputs = asyncio.run(stream())
    finally:
        runner.inline = False
    for i, out in enumerate(outputs):
        np.testing.assert_allclose(out, rows(1, start=i)["x"] @ TINY_WEIGHTS, rtol=1e-5, atol=1e-4)
    assert sum(seen.batches) == 400
    if delay_ns:
        assert len(seen.batches) < 400 / 3, seen.batches
    else:
        assert seen.batches == [1] * 400


def test_without_dynamic_batching_each_request_runs_alone(runner: Runner) -> None:
    seen = Recorder()
    opts = BatchingOptions(max_batch_size=8, dynamic=False)
    asyncio.run(run_all(Batcher([runner], ["y"], opts, seen), [rows(1), rows(3), rows(2)]))
    assert sorted(seen.batches) == [1, 2, 3]


def test_full_queue_rejects_immediately(slow_runner: Runner) -> None:
    async def scenario() -> list[Any]:
        batcher = Batcher([slow_runner], ["y"], BatchingOptions(max_batch_size=1, max_queue_size=2))
        batcher.start()
        tasks = [asyncio.create_task(batcher.submit(rows(1), 1)) for _ in range(6)]
        results = await asyncio.gather(*tasks, return_exceptions=True)
        await batcher.close()
        return results

    results = asyncio.run(scenario())
    assert any(isinstance(r, QueueFull) for r in results)
    assert all(isinstance(r, QueueFull) or not isinstance(r, Exception) for r in results)


def test_expired_and_cancelled_requests_are_never_computed(slow_runner: Runner) -> None:
    seen = Recorder()

    async def scenario() -> tuple[object, object]:
        batcher = Batcher([slow_runner], ["y"], BatchingOptions(max_batch_size=1), seen)
        batcher.start()
        first = asyncio.create_task(batcher.submit(rows(1), 1))
        await asyncio.sleep(0)  # the first one is now executing
        expired = asyncio.create_task(batcher.submit(rows(1), 1, time.monotonic_ns()))
        cancelled = asyncio.create_task(batcher.submit(rows(1), 1))
        await asyncio.sleep(0)
        cancelled.cancel()
        await first
        results = await asyncio.gather(expired, cancelled, return_exceptions=True)
        await batcher.close()
        return results[0], results[1]

    expired, cancelled = asyncio.run(scenario())
    assert isinstance(expired, DeadlineExceeded)
    assert isinstance(cancelled, asyncio.CancelledError)
    assert seen.batches == [1]


def test_close_finishes_queued_work_then_refuses_more(slow_runner: Runner) -> None:
    async def scenario() -> tuple[int, object]:
        batcher = Batcher([slow_runner], ["y"], BatchingOptions(max_batch_size=2))
        batcher.start()
        tasks = [asyncio.create_task(batcher.submit(rows(1), 1)) for _ in range(5)]
        await asyncio.sleep(0)
        await batcher.close()
        done = sum(1 for t in tasks if t.done() and t.exception() is None)
        try:
            await batcher.submit(rows(1), 1)
        except ModelNotReady as exc:
            return done, exc
        return done, None

    done, refused = asyncio.run(scenario())
    assert done == 5
    assert isinstance(refused, ModelNotReady)


def test_pending_counts_queued_and_executing_and_returns_to_zero(slow_runner: Runner) -> None:
    """Also for a request split across batches and cancelled between its parts: the gauge
    that autoscaling reads counts it once, and not after."""

    async def scenario() -> tuple[int, int, int]:
        batcher = Batcher([slow_runner], ["y"], BatchingOptions(max_batch_size=2))
        batcher.start()
        tasks = [asyncio.create_task(batcher.submit(rows(2), 2)) for _ in range(4)]
        await asyncio.sleep(0)
        busy = batcher.pending
        await asyncio.gather(*tasks)
        split = asyncio.create_task(batcher.submit(rows(3), 3))  # runs as 2 rows, then 1
        await asyncio.sleep(0.001)  # its first part is executing
        split_busy = batcher.pending
        split.cancel()
        await batcher.submit(rows(1), 1)
        await asyncio.gather(split, return_exceptions=True)
        idle = batcher.pending
        await batcher.close()
        return busy, split_busy, idle

    assert asyncio.run(scenario()) == (4, 1, 0)


def test_runner_options_split_cores_between_instances(tmp_path: Path) -> None:
    opts = RunnerOptions.from_parameters({}, device="cpu", gpu_id=0, instances=2)
    assert opts.intra_op_threads >= 1
    single = RunnerOptions.from_parameters(
        {"intra_op_threads": "3"}, device="cpu", gpu_id=0, instances=1
    )
    assert single.intra_op_threads == 3


def test_batches_of_microseconds_run_inline_unless_configured_otherwise(tmp_path: Path) -> None:
    write_tiny(tmp_path, "tiny")
    write_slow(tmp_path, "slow", "max_batch_size: 8\ndynamic_batching { }\n")
    write_tiny(tmp_path, "threaded", config=TINY_CONFIG + PARAM.format("inline_compute", "false"))
    write_tiny(tmp_path, "forced", config=TINY_CONFIG + PARAM.format("inline_compute", "true"))
    write_tiny(tmp_path, "wrong", config=TINY_CONFIG + PARAM.format("inline_compute", "maybe"))

    def load(name: str) -> ModelVersion:
        return ModelVersion(read_model(tmp_path, name), 1, default_queue=8)

    inline = {name: load(name) for name in ("tiny", "slow", "threaded", "forced")}
    assert {name: v.inline for name, v in inline.items()} == {
        "tiny": True, "slow": False, "threaded": False, "forced": True,
    }  # fmt: skip
    with pytest.raises(ModelLoadError, match="inline_compute must be"):
        load("wrong")

    async def serve_one(version: ModelVersion) -> np.ndarray:
        version.start(None)
        result = await version.infer(rows(2), 2, None)
        await version.close()
        return result.outputs[0]

    for name in ("tiny", "threaded"):
        out = asyncio.run(serve_one(inline[name]))
        np.testing.assert_allclose(out, rows(2)["x"] @ TINY_WEIGHTS, rtol=1e-5, atol=1e-4)
    for name in ("slow", "forced"):
        inline[name]._close_runners()


@pytest.mark.parametrize(
    ("files", "limited"),
    [
        ({"cpu.max": "max 100000\n"}, False),  # cgroup v2, no quota
        ({"cpu.max": "150000 100000\n"}, True),  # 1.5 CPUs: 2 threads' worth, if the host has more
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, False),  # v1
        ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, True),
        ({"cpu.max": "garbage"}, False),
        ({}, False),
    ],
)
def test_a_cpu_quota_sets_the_threads_onnxruntime_would_size_by_the_host(
    tmp_path: Path, files: dict[str, str], limited: bool
) -> None:
    import os

    from cnnserve.server.runner import usable_cores

    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    host = len(os.sched_getaffinity(0))
    cores, quota = usable_cores(tmp_path)
    if not limited:
        assert (cores, quota) == (host, False)
        return
    text = files.get("cpu.max") or files["cpu/cpu.cfs_quota_us"]
    allowed = 2 if text.startswith("150000") else 1
    assert cores == min(host, allowed)
    assert quota == (allowed < host)


def test_a_request_timeout_fails_at_its_time_not_after_the_running_batch(
    tmp_path: Path,
) -> None:
    """The `timeout` parameter is the server's to keep (gRPC keeps only its own
    deadlines): a request queued behind a long batch fails when its time is up, and,
    like one cancelled there, leaves the queue (and the pending count) at once."""
    model = write_slow(tmp_path, "slower", "", layers=48, width=2048) / "1" / "model.onnx"
    slower = Runner(model, RunnerOptions(device="cpu"), label="slower")

    async def scenario() -> tuple[float, float, object, list[int]]:
        batcher = Batcher([slower], ["y"], BatchingOptions(max_batch_size=512))
        batcher.start()
        long = asyncio.create_task(batcher.submit(rows(512), 512))
        await asyncio.sleep(0.01)  # the long batch is running
        began = time.monotonic()
        try:
            await batcher.submit(rows(1), 1, time.monotonic_ns() + 50_000_000, expire=True)
            error: object = None
        except DeadlineExceeded as exc:
            error = exc
        failed_s = time.monotonic() - began
        pending = [batcher.pending]  # the long batch alone
        cancelled = asyncio.create_task(batcher.submit(rows(1), 1))
        await asyncio.sleep(0)
        pending.append(batcher.pending)
        cancelled.cancel()
        await asyncio.gather(cancelled, return_exceptions=True)
        pending.append(batcher.pending)
        await long
        batch_s = time.monotonic() - began
        await batcher.close()
        return failed_s, batch_s, error, pending

    try:
        failed_s, batch_s, error, pending = asyncio.run(scenario())
    finally:
        slower.close()
    assert batch_s > 0.2, "the batch must outlast the timeout for this test to mean anything"
    assert failed_s < batch_s / 2, (failed_s, batch_s)
    assert "timed out while queued" in str(error)
    assert pending == [1, 2, 1]
