"""Overload and reload storms: shed fast, recover, lose nothing, leak nothing."""

from __future__ import annotations

import statistics
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np

from cnnserve.v1 import grpc_service_pb2_grpc as rpc
from cnnserve.v1 import inference_pb2 as pb
from tests.servers import server_in_thread, server_process
from tests.test_lifecycle import Load, wait_for
from tests.tiny import TINY_WEIGHTS, write_slow, write_tiny

OVERLOAD_CONFIG = """
max_batch_size: 4
input { name: "x" data_type: TYPE_FP32 dims: [4] }
output { name: "y" data_type: TYPE_FP32 dims: [3] }
dynamic_batching { max_queue_delay_microseconds: 500 default_queue_policy { max_queue_size: 8 } }
"""


def one_row(model: str) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(np.ones(4, np.float32).tobytes())
    return request


def test_flood_is_shed_at_once_and_throughput_recovers(tmp_path: Path) -> None:
    """About ten times the sustainable rate for 1.5 s, against a server in its own process."""
    write_slow(tmp_path / "repo", "slow", OVERLOAD_CONFIG, layers=192, width=2048)
    with (
        server_process(tmp_path / "repo", tmp_path / "server.log") as child,
        grpc.insecure_channel(child.url) as channel,
    ):
        stub = rpc.GRPCInferenceServiceStub(channel)
        request = one_row("slow")

        def rows_per_second() -> float:
            """Eight full batches of four concurrent one-row requests."""
            started = time.monotonic()
            for _ in range(8):
                batch = [stub.ModelInfer.future(request, timeout=30) for _ in range(4)]
                for call in batch:
                    call.result()
            return 32 / (time.monotonic() - started)

        stub.ModelInfer(request, timeout=30)
        sustainable = rows_per_second()
        finished: list[tuple[grpc.StatusCode, float]] = []
        lock = threading.Lock()

        def done(sent: float, call: grpc.Future) -> None:
            with lock:
                finished.append((call.code(), time.monotonic() - sent))

        rate = 10 * sustainable
        count = int(rate * 1.5)
        begin = time.monotonic()
        for i in range(count):
            time.sleep(max(0.0, begin + i / rate - time.monotonic()))
            sent = time.monotonic()
            stub.ModelInfer.future(request, timeout=20).add_done_callback(
                lambda c, sent=sent: done(sent, c)
            )
        wait_for(lambda: len(finished) == count, timeout=60)
        codes = Counter(code for code, _ in finished)
        assert set(codes) <= {
            grpc.StatusCode.OK,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            grpc.StatusCode.DEADLINE_EXCEEDED,
        }, codes
        assert codes[grpc.StatusCode.RESOURCE_EXHAUSTED] > count // 2
        assert codes[grpc.StatusCode.OK] >= 8
        shed = [t for code, t in finished if code == grpc.StatusCode.RESOURCE_EXHAUSTED]
        served = [t for code, t in finished if code == grpc.StatusCode.OK]
        # Server-side, a refusal takes no queue time: failures average well under a millisecond
        # (client-side figures on two shared cores mostly measure CPU contention).
        stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name="slow"), timeout=10)
        fail = stats.model_stats[0].inference_stats.fail
        assert fail.count == codes[grpc.StatusCode.RESOURCE_EXHAUSTED]
        assert fail.ns / fail.count < 5_000_000
        assert statistics.median(shed) < statistics.median(served)
        time.sleep(1)
        assert rows_per_second() > sustainable / 3


def runner_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name.startswith("runner-"))


def test_reload_storm_loses_no_request_and_leaks_no_session(tmp_path: Path) -> None:
    write_tiny(tmp_path)
    baseline = runner_threads()
    with server_in_thread(tmp_path, model_control_mode="poll", repository_poll_secs=0.1) as srv:
        with Load(srv.url) as load:
            for version in range(2, 8):
                scale = 1.0 if version % 2 else 2.0
                config = None
                write_tiny(tmp_path, version=version, config=config, weights=scale * TINY_WEIGHTS)
                wait_for(lambda v=version: load.versions[str(v)] > 0, timeout=30)
            wait_for(lambda: load.outcomes["ok"] > 100)
        loaded = srv.server.registry.versions("tiny")
        assert [m.version for m in loaded] == [7]
        wait_for(lambda: runner_threads() - baseline <= 1, timeout=30)
    assert load.errors == []


def test_idle_connections_and_slow_streams_do_not_starve_others(tmp_path: Path) -> None:
    write_tiny(tmp_path)
    with server_in_thread(tmp_path) as srv:
        idle = [grpc.insecure_channel(srv.url) for _ in range(100)]
        for channel in idle:
            rpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest(), timeout=10)
        slow_channel = grpc.insecure_channel(srv.url)
        release = threading.Event()

        def trickle() -> Iterator[pb.ModelInferRequest]:
            yield one_row("tiny")
            release.wait(30)  # a client that opens a stream and then goes quiet

        slow = rpc.GRPCInferenceServiceStub(slow_channel).ModelStreamInfer(trickle(), timeout=60)
        first = next(slow)
        assert not first.error_message
        try:
            with grpc.insecure_channel(srv.url) as channel:
                stub = rpc.GRPCInferenceServiceStub(channel)
                answers = [stub.ModelInfer(one_row("tiny"), timeout=5) for _ in range(50)]
            assert all(len(a.raw_output_contents[0]) == 12 for a in answers)
        finally:
            release.set()
            list(slow)
            slow_channel.close()
            for channel in idle:
                channel.close()
