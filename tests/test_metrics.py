"""Prometheus metrics on a live server: exact counts, histograms, state gauges, no stale series."""

from __future__ import annotations

import json
import logging
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from cnnserve.server.metrics import DURATION_BUCKETS, LoopHistogram
from tests.servers import Running, server_in_thread
from tests.tiny import write_tiny

ROOT = Path(__file__).resolve().parent.parent
TINY = {"model": "tiny", "version": "1"}


def scrape(server: Running) -> dict[str, list[Sample]]:
    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        text = response.read().decode()
    families: dict[str, list[Sample]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            families.setdefault(sample.name, []).append(sample)
    return families


def value(families: dict[str, list[Sample]], name: str, **labels: str) -> float:
    matches = [s.value for s in families.get(name, []) if labels.items() <= s.labels.items()]
    assert len(matches) == 1, (name, labels, families.get(name))
    return matches[0]


def infer(client: tc.InferenceServerClient, rows: int, width: int = 4) -> None:
    x = tc.InferInput("x", [rows, width], "FP32")
    x.set_data_from_numpy(np.ones((rows, width), np.float32))
    client.infer("tiny", [x])


@pytest.fixture(scope="module")
def traffic(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """A server after a known mix: 5 successes (9 rows), 3 bad shapes, 1 unknown model."""
    repo = tmp_path_factory.mktemp("repo")
    write_tiny(repo)
    with server_in_thread(repo, model_control_mode="explicit", load_model=("tiny",)) as server:
        client = tc.InferenceServerClient(server.url)
        for rows in (1, 2, 3, 1, 2):
            infer(client, rows)
        for _ in range(3):
            with pytest.raises(Exception, match="shape"):
                infer(client, 1, width=5)
        with pytest.raises(Exception, match="unknown model"):
            client.infer("nope", [tc.InferInput("x", [1, 4], "FP32")])
        client.close()
        yield server


def test_loop_histogram_exposes_what_prometheus_clients_histogram_does() -> None:
    """Same buckets (bounds inclusive), count, sum and label handling; only `_created` is
    left out."""
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    loop = LoopHistogram("h_seconds", "doc", ["model"], buckets=DURATION_BUCKETS, registry=ours)
    reference = Histogram("h_seconds", "doc", ["model"], buckets=DURATION_BUCKETS, registry=theirs)
    values = [0.0, 1e-9, *DURATION_BUCKETS, 2.6e-4, 0.0123, 29.9, 31.0, 1e6]
    for model, scale in (("a", 1.0), ("b", 0.5), ("gone", 1.0)):
        for v in values:
            loop.labels(model).observe(v * scale)
            reference.labels(model).observe(v * scale)
    loop.remove("gone")
    reference.remove("gone")

    def lines(registry: CollectorRegistry) -> list[str]:
        text = generate_latest(registry).decode()
        return [line for line in text.splitlines() if "_created" not in line]

    assert lines(ours) == lines(theirs)
    assert 'h_seconds_bucket{le="5e-05",model="a"} 3.0' in lines(ours)  # 0, 1e-9 and 5e-05


def test_request_counters_equal_what_was_sent(traffic: Running) -> None:
    m = scrape(traffic)
    assert value(m, "cnnserve_inference_requests_total", **TINY, outcome="success") == 5
    assert value(m, "cnnserve_inference_requests_total", **TINY, outcome="invalid_argument") == 3
    assert value(m, "cnnserve_grpc_requests_total", method="ModelInfer", code="OK") == 5
    assert (
        value(m, "cnnserve_grpc_requests_total", method="ModelInfer", code="INVALID_ARGUMENT") == 3
    )
    assert value(m, "cnnserve_grpc_requests_total", method="ModelInfer", code="NOT_FOUND") == 1


def test_histogram_counts_match_requests_and_batches(traffic: Running) -> None:
    m = scrape(traffic)
    assert value(m, "cnnserve_inference_request_duration_seconds_count", **TINY) == 8
    assert value(m, "cnnserve_inference_queue_duration_seconds_count", **TINY) == 5
    executions = value(m, "cnnserve_inference_executions_total", **TINY)
    assert value(m, "cnnserve_inference_batch_size_count", **TINY) == executions
    assert value(m, "cnnserve_inference_compute_duration_seconds_count", **TINY) == executions
    assert value(m, "cnnserve_inference_batch_size_sum", **TINY) == 9  # rows inferred
    buckets = {s.labels["le"] for s in m["cnnserve_inference_request_duration_seconds_bucket"]}
    assert {"5e-05", "0.5", "30.0", "+Inf"} <= buckets


def test_metrics_agree_with_model_statistics(traffic: Running) -> None:
    m = scrape(traffic)
    client = tc.InferenceServerClient(traffic.url)
    stats = client.get_inference_statistics("tiny", as_json=True)["model_stats"][0]
    client.close()
    assert int(stats["inference_count"]) == value(m, "cnnserve_inference_batch_size_sum", **TINY)
    assert int(stats["execution_count"]) == value(m, "cnnserve_inference_executions_total", **TINY)
    success = int(stats["inference_stats"]["success"]["count"])
    assert success == value(m, "cnnserve_inference_requests_total", **TINY, outcome="success")
    assert int(stats["inference_stats"]["fail"]["count"]) == 3


def test_state_gauges_are_exact(traffic: Running) -> None:
    m = scrape(traffic)
    assert value(m, "cnnserve_inference_pending_requests", **TINY) == 0
    assert value(m, "cnnserve_model_ready", **TINY) == 1
    assert value(m, "cnnserve_model_load_duration_seconds", **TINY) > 0
    in_use = traffic.server.registry.get("tiny").provider
    assert value(m, "cnnserve_model_execution_provider_info", **TINY, provider=in_use) == 1


def test_every_listed_family_is_exported(traffic: Running) -> None:
    with urllib.request.urlopen(traffic.metrics_url, timeout=10) as response:
        exported = {
            (f.name, f.type) for f in text_string_to_metric_families(response.read().decode())
        }
    listed = [
        line.split()[:2]
        for line in (ROOT / "deploy" / "metric_names.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert listed
    for name, kind in listed:
        family = name.removesuffix("_total") if kind == "counter" else name
        assert (family, kind) in exported, f"{name} ({kind}) is listed but not exported"


def test_health_reflection_and_unknown_methods_are_counted(traffic: Running) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(traffic.url) as channel:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        unknown = channel.unary_unary("/inference.GRPCInferenceService/Nonexistent")
        with pytest.raises(grpc.RpcError) as error:
            unknown(b"", timeout=5)
        assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED
        for i in range(40):  # names a client makes up do not each get a series
            with pytest.raises(grpc.RpcError):
                channel.unary_unary(f"/made.Up/Method{i}")(b"", timeout=5)
    m = scrape(traffic)
    assert value(m, "cnnserve_grpc_requests_total", method="Check", code="OK") >= 1
    assert value(m, "cnnserve_grpc_requests_total", method="Nonexistent", code="UNIMPLEMENTED") == 1
    methods = {s.labels["method"] for s in m["cnnserve_grpc_requests_total"]}
    assert 0 < len({name for name in methods if name.startswith("Method")}) < 32
    assert value(m, "cnnserve_grpc_requests_total", method="(other)", code="UNIMPLEMENTED") >= 9


def test_a_stream_idle_at_its_deadline_is_counted_as_the_client_saw_it(traffic: Running) -> None:
    """The handler waiting for the next request sees the stream end at the deadline, as if
    the client had closed it; the client has DEADLINE_EXCEEDED, and so must the count."""
    from cnnserve.v1 import classification_pb2 as cpb
    from cnnserve.v1 import classification_pb2_grpc as crpc

    def one_then_idle() -> Iterator[cpb.ClassifyRequest]:
        yield cpb.ClassifyRequest(model_name="tiny", images=[b"x"])  # answered in the stream
        time.sleep(2)

    labels = {"method": "ClassifyStream", "code": "DEADLINE_EXCEEDED"}
    before = scrape(traffic).get("cnnserve_grpc_requests_total", [])
    with grpc.insecure_channel(traffic.url) as channel:
        stream = crpc.ImageClassifierStub(channel).ClassifyStream(one_then_idle(), timeout=0.5)
        assert next(stream).error_code == "FAILED_PRECONDITION"
        with pytest.raises(grpc.RpcError) as ended:
            next(stream)
        assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert not [s for s in before if labels.items() <= s.labels.items()]
    time.sleep(0.2)  # the server notes the end a moment after the client
    assert value(scrape(traffic), "cnnserve_grpc_requests_total", **labels) == 1


def test_unloaded_model_leaves_no_series(traffic: Running) -> None:
    client = tc.InferenceServerClient(traffic.url)
    client.unload_model("tiny")
    traffic.call(traffic.server.registry.close())  # wait until the drain has finished
    m = scrape(traffic)
    client.load_model("tiny")  # leave the module's server as it was
    client.close()
    for name, samples in m.items():
        if name.startswith("cnnserve_") and not name.startswith("cnnserve_grpc"):
            assert not [s for s in samples if s.labels.get("model") == "tiny"], name


def test_process_series_are_exported_and_gpu_series_only_with_a_gpu(traffic: Running) -> None:
    from cnnserve.server.metrics import _GpuCollector

    m = scrape(traffic)
    assert value(m, "process_resident_memory_bytes") > 0
    gpu_series = [name for name in m if name.startswith("cnnserve_gpu_")]
    if _GpuCollector()._nvml is None:
        assert gpu_series == []
    else:
        assert "cnnserve_gpu_memory_used_bytes" in gpu_series


def test_request_log_records_each_outcome(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_tiny(tmp_path)
    caplog.set_level(logging.INFO, logger="cnnserve.requests")
    with server_in_thread(tmp_path, metrics_port=-1, request_log_rate=1.0) as server:
        client = tc.InferenceServerClient(server.url)
        x = tc.InferInput("x", [2, 4], "FP32")
        x.set_data_from_numpy(np.ones((2, 4), np.float32))
        client.infer("tiny", [x], request_id="ok-1")
        with pytest.raises(Exception, match="shape"):
            infer(client, 1, width=5)
        client.close()
        assert server.server.registry.get("tiny")._in_use == 0  # both leases were released
    records = [r for r in caplog.records if r.name == "cnnserve.requests"]
    assert [r.__dict__["outcome"] for r in records] == ["success", "invalid_argument"]
    ok, bad = (r.__dict__ for r in records)
    assert (ok["request_id"], ok["model"], ok["version"]) == ("ok-1", "tiny", "1")
    assert ok["duration_ms"] >= ok["queue_ms"] >= 0
    assert ok["compute_ms"] > 0
    assert len(bad["request_id"]) == 32  # none was sent: a generated one
    assert "queue_ms" not in bad
    assert bad["duration_ms"] >= 0


def test_both_log_formats_carry_the_request_fields() -> None:
    from cnnserve.server.logs import JsonFormatter, TextFormatter

    record = logging.LogRecord(
        "cnnserve.requests", logging.INFO, "", 0, "request %s", ("ok",), None
    )
    fields = {"request_id": "r-1", "model": "tiny", "version": "1", "duration_ms": 1.5}
    record.__dict__.update(fields)
    line = TextFormatter().format(record)
    assert line.endswith(" cnnserve.requests: request ok request_id=r-1 model=tiny version=1 "
                         "duration_ms=1.5")  # fmt: skip
    assert fields.items() <= json.loads(JsonFormatter().format(record)).items()


def test_a_reload_of_the_same_version_keeps_counting_in_its_series(tmp_path: Path) -> None:
    """The reloaded copy of version 1 takes over the series while the copy it replaces
    drains; that drain used to delete them for good. ModelStatistics, which started again
    from 0, goes on counting with them."""
    write_tiny(tmp_path)
    with server_in_thread(tmp_path, model_control_mode="explicit", load_model=("tiny",)) as srv:
        client = tc.InferenceServerClient(srv.url)
        for rows in (1, 2, 3):
            infer(client, rows)
        client.load_model("tiny")  # the same version 1, loaded again
        give_up = time.monotonic() + 10
        while srv.server.registry._retiring and time.monotonic() < give_up:
            time.sleep(0.02)  # until the replaced copy has drained
        assert not srv.server.registry._retiring
        for rows in (1, 1, 2, 2):
            infer(client, rows)
        stats = client.get_inference_statistics("tiny").model_stats[0]
        client.close()
        m = scrape(srv)
        assert value(m, "cnnserve_inference_requests_total", **TINY, outcome="success") == 7
        assert value(m, "cnnserve_inference_request_duration_seconds_count", **TINY) == 7
        assert value(m, "cnnserve_inference_batch_size_sum", **TINY) == 12
        assert stats.inference_stats.success.count == 7
        assert stats.inference_count == 12
