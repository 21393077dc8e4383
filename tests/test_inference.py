"""The Open Inference Protocol through tritonclient, against a real server on loopback."""

from __future__ import annotations

import concurrent.futures
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException

from tests.servers import Running, server_in_thread
from tests.tiny import TINY_CONFIG, TINY_WEIGHTS, write_tiny


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("repo")
    write_tiny(repo)
    write_tiny(repo, "unbatched", config=None)  # no config: completed from the graph
    broken = repo / "broken" / "1"
    broken.mkdir(parents=True)
    (broken / "model.onnx").write_bytes(b"this is not an onnx file")
    return repo


@pytest.fixture(scope="module")
def server(repository: Path) -> Iterator[Running]:
    with server_in_thread(repository) as running:
        yield running


@pytest.fixture
def client(server: Running) -> Iterator[tc.InferenceServerClient]:
    c = tc.InferenceServerClient(server.url)
    yield c
    c.close()


def infer_input(x: np.ndarray, name: str = "x") -> tc.InferInput:
    i = tc.InferInput(name, list(x.shape), "FP32")
    i.set_data_from_numpy(x)
    return i


def test_server_is_live_and_ready(client: tc.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("tiny")
    assert not client.is_model_ready("broken")
    assert not client.is_model_ready("no-such-model")
    assert not client.is_model_ready("tiny", "9")
    with pytest.raises(InferenceServerException, match="positive integer"):
        client.is_model_ready("tiny", "v1")  # malformed, as ModelInfer says too


def test_server_metadata_lists_supported_extensions(client: tc.InferenceServerClient) -> None:
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "cnnserve"
    assert set(meta["extensions"]) == {
        "classification", "model_configuration", "model_repository", "statistics"
    }  # fmt: skip


def test_model_metadata_has_batch_axis(client: tc.InferenceServerClient) -> None:
    meta = client.get_model_metadata("tiny", as_json=True)
    assert meta["versions"] == ["1"]
    assert meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": ["-1", "4"]}]
    assert meta["outputs"] == [{"name": "y", "datatype": "FP32", "shape": ["-1", "3"]}]


def test_model_config_shows_batching_and_provider(
    client: tc.InferenceServerClient, server: Running
) -> None:
    import onnxruntime as ort

    config = client.get_model_config("tiny", as_json=True)["config"]
    assert config["max_batch_size"] == 8
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == "2000"
    provider = config["parameters"]["execution_provider"]["string_value"]
    # The provider the session really uses: CUDA only where it works, else the CPU fallback.
    assert provider == server.server.registry.get("tiny").runners[0].provider
    assert provider in ort.get_available_providers()
    if not Path("/dev/nvidiactl").exists():
        assert provider == "CPUExecutionProvider"


def test_config_is_completed_from_the_graph(client: tc.InferenceServerClient) -> None:
    config = client.get_model_config("unbatched", as_json=True)["config"]
    assert config["max_batch_size"] == 32
    assert config["input"][0]["name"] == "x"
    assert config["input"][0]["dims"] == ["4"]
    x = np.ones((2, 4), np.float32)
    result = client.infer("unbatched", [infer_input(x)])
    np.testing.assert_allclose(result.as_numpy("y"), x @ TINY_WEIGHTS, rtol=1e-5, atol=1e-6)


def test_infer_matches_onnxruntime_in_process(client: tc.InferenceServerClient) -> None:
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    result = client.infer("tiny", [infer_input(x)], request_id="req-7")
    np.testing.assert_allclose(result.as_numpy("y"), x @ TINY_WEIGHTS, rtol=1e-5, atol=1e-6)
    assert result.get_response().id == "req-7"
    assert result.get_response().model_version == "1"


def test_classification_extension_returns_score_index_label(
    client: tc.InferenceServerClient,
) -> None:
    x = np.array([[1, 0, 0, 0], [0, 0, 0, 1]], np.float32)
    out = tc.InferRequestedOutput("y", class_count=2)
    result = client.infer("tiny", [infer_input(x)], outputs=[out]).as_numpy("y")
    assert result.shape == (2, 2)
    scores = x @ TINY_WEIGHTS
    labels = ["alpha", "beta", "gamma"]
    for row, entries in zip(scores, result, strict=True):
        best = np.argsort(-row)[:2]
        for i, entry in zip(best, entries, strict=True):
            score, index, label = entry.decode().split(":")
            assert (int(index), label) == (i, labels[i])
            assert float(score) == pytest.approx(row[i], abs=1e-5)


def test_stream_infer_answers_each_request_and_reports_errors_in_band(
    client: tc.InferenceServerClient,
) -> None:
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    x = np.ones((1, 4), np.float32)
    client.async_stream_infer("tiny", [infer_input(x)], request_id="good-1")
    client.async_stream_infer("tiny", [infer_input(np.ones((1, 5), np.float32))], request_id="bad")
    client.async_stream_infer("tiny", [infer_input(2 * x)], request_id="good-2")
    got = [answers.get(timeout=10) for _ in range(3)]
    client.stop_stream()
    ok = {r.get_response().id: r.as_numpy("y") for r, e in got if e is None}
    errors = [e for _, e in got if e is not None]
    assert set(ok) == {"good-1", "good-2"}
    np.testing.assert_allclose(ok["good-2"], 2 * x @ TINY_WEIGHTS, rtol=1e-5, atol=1e-6)
    # As Triton marks them: each answer is the last one its request gets.
    for result, error in got:
        if error is None:
            assert result.get_response().parameters["triton_final_response"].bool_param
    assert len(errors) == 1
    assert "INVALID_ARGUMENT" in str(errors[0])


def test_concurrent_requests_get_their_own_rows_in_fewer_executions(
    client: tc.InferenceServerClient, server: Running
) -> None:
    before = client.get_inference_statistics("tiny", as_json=True)["model_stats"][0]
    rng = np.random.default_rng(1)
    batches = [rng.standard_normal((1 + i % 4, 4)).astype(np.float32) for i in range(64)]

    clients = [tc.InferenceServerClient(server.url) for _ in batches]
    for c in clients:  # connected before the requests go, so that they arrive together
        assert c.is_server_live()
    start = threading.Barrier(len(batches))

    def one(c: tc.InferenceServerClient, x: np.ndarray) -> np.ndarray:
        start.wait(timeout=30)
        return c.infer("tiny", [infer_input(x)]).as_numpy("y")

    try:
        with concurrent.futures.ThreadPoolExecutor(len(batches)) as pool:
            results = list(pool.map(one, clients, batches))
    finally:
        for c in clients:
            c.close()
    for x, y in zip(batches, results, strict=True):
        np.testing.assert_allclose(y, x @ TINY_WEIGHTS, rtol=1e-5, atol=1e-6)
    after = client.get_inference_statistics("tiny", as_json=True)["model_stats"][0]
    requests = int(after["inference_stats"]["success"]["count"]) - int(
        before["inference_stats"]["success"].get("count", 0)
    )
    executions = int(after["execution_count"]) - int(before.get("execution_count", 0))
    rows = int(after["inference_count"]) - int(before.get("inference_count", 0))
    assert requests == 64
    assert rows == sum(len(b) for b in batches)
    assert executions < requests


def test_statistics_report_real_durations(client: tc.InferenceServerClient) -> None:
    client.infer("tiny", [infer_input(np.ones((3, 4), np.float32))])
    stats = client.get_inference_statistics("tiny", as_json=True)["model_stats"][0]
    inference = stats["inference_stats"]
    for key in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
        assert int(inference[key]["count"]) >= 1, key
    assert int(inference["success"]["ns"]) > int(inference["compute_infer"]["ns"]) > 0
    sizes = {int(b["batch_size"]) for b in stats["batch_stats"]}
    assert sizes
    assert max(sizes) <= 8


def test_repository_index_names_the_broken_model_and_its_reason(
    client: tc.InferenceServerClient,
) -> None:
    index = {m["name"]: m for m in client.get_model_repository_index(as_json=True)["models"]}
    assert index["tiny"]["state"] == "READY"
    assert index["broken"]["state"] == "UNAVAILABLE"
    assert "onnxruntime cannot load model.onnx" in index["broken"]["reason"]


def test_repository_control_needs_explicit_mode(client: tc.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as error:
        client.load_model("tiny")
    assert error.value.status() == "StatusCode.FAILED_PRECONDITION"


def test_shared_memory_and_trace_are_unimplemented(client: tc.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as error:
        client.get_system_shared_memory_status()
    assert error.value.status() == "StatusCode.UNIMPLEMENTED"
    with pytest.raises(InferenceServerException) as error:
        client.get_trace_settings()
    assert error.value.status() == "StatusCode.UNIMPLEMENTED"


def test_explicit_mode_loads_and_unloads(tmp_path: Path) -> None:
    write_tiny(tmp_path)
    with server_in_thread(tmp_path, model_control_mode="explicit") as running:
        c = tc.InferenceServerClient(running.url)
        assert not c.is_model_ready("tiny")
        c.load_model("tiny")
        assert c.is_model_ready("tiny")
        assert c.infer("tiny", [infer_input(np.ones((1, 4), np.float32))]).as_numpy("y").shape == (
            1,
            3,
        )
        c.unload_model("tiny")
        assert not c.is_model_ready("tiny")
        for bad in ("../tiny", "/etc", "a/b", "nul\x00"):
            with pytest.raises(InferenceServerException) as error:
                c.load_model(bad)
            assert error.value.status() == "StatusCode.INVALID_ARGUMENT", bad
        c.close()


def test_health_and_reflection_list_both_services(server: Running) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    with grpc.insecure_channel(server.url) as channel:
        check = health_pb2_grpc.HealthStub(channel).Check
        serving = health_pb2.HealthCheckResponse.SERVING
        assert check(health_pb2.HealthCheckRequest(service="")).status == serving
        assert check(health_pb2.HealthCheckRequest(service="tiny")).status == serving
        for service in ("", "tiny"):  # Watch answers the current status first
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service=service), timeout=10
            )
            assert next(watch).status == serving
            watch.cancel()
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
        assert "inference.GRPCInferenceService" in services
        assert "grpc.health.v1.Health" in services
        described = ProtoReflectionDescriptorDatabase(channel).FindFileContainingSymbol(
            "inference.GRPCInferenceService"
        )
        assert described.name == "cnnserve/v1/grpc_service.proto"


TRITON_STYLE_CONFIG = """
name: "fixed_onnx"
platform: "onnxruntime_onnx"
max_batch_size : 0
input [
  {
    name: "x"
    data_type: TYPE_FP32
    format: FORMAT_NONE
    dims: [ 4 ]
    reshape { shape: [ 1, 4 ] }
  }
]
output [
  {
    name: "y"
    data_type: TYPE_FP32
    dims: [ 3 ]
    reshape { shape: [ 1, 3 ] }
    label_filename: "labels.txt"
  }
]
instance_group [ { count: 2, kind: KIND_CPU } ]
optimization { execution_accelerators { gpu_execution_accelerator : [ { name : "tensorrt" } ] } }
model_warmup [
  {
    name: "random"
    batch_size: 1
    count: 2
    inputs { key: "x" value { data_type: TYPE_FP32 dims: [ 4 ] random_data: true } }
  }
]
"""


def test_a_triton_onnx_repository_loads_as_is(tmp_path: Path) -> None:
    import onnx

    from tests.tiny import tiny_model

    model = tiny_model()
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = 1  # a fixed [1, n] graph, no batch axis
    (tmp_path / "fixed_onnx" / "1").mkdir(parents=True)
    onnx.save(model, tmp_path / "fixed_onnx" / "1" / "model.onnx")
    (tmp_path / "fixed_onnx" / "config.pbtxt").write_text(TRITON_STYLE_CONFIG)
    (tmp_path / "fixed_onnx" / "labels.txt").write_text("alpha\nbeta\ngamma\n")
    with server_in_thread(tmp_path) as running:
        c = tc.InferenceServerClient(running.url)
        meta = c.get_model_metadata("fixed_onnx", as_json=True)
        assert meta["inputs"][0]["shape"] == ["4"]
        x = np.array([1, 2, 3, 4], np.float32)
        result = c.infer("fixed_onnx", [infer_input(x)])
        np.testing.assert_allclose(result.as_numpy("y"), x @ TINY_WEIGHTS, rtol=1e-5, atol=1e-6)
        top = c.infer(
            "fixed_onnx", [infer_input(x)], outputs=[tc.InferRequestedOutput("y", class_count=1)]
        )
        assert top.as_numpy("y")[0].decode().endswith(":gamma")
        assert len(running.server.registry.get("fixed_onnx").runners) == 2
        c.close()


def test_warmup_reads_data_files_and_a_missing_one_is_the_reason(tmp_path: Path) -> None:
    warm = TINY_CONFIG + (
        'model_warmup { name: "file" batch_size: 2 '
        'inputs { key: "x" value { data_type: TYPE_FP32 dims: [4] input_data_file: "x.bin" } } }'
    )
    good = write_tiny(tmp_path, "warm", config=warm)
    (good / "warmup").mkdir()
    np.ones(8, np.float32).tofile(good / "warmup" / "x.bin")
    write_tiny(tmp_path, "cold", config=warm)  # no warmup/x.bin
    with server_in_thread(tmp_path) as running:
        c = tc.InferenceServerClient(running.url)
        index = {m["name"]: m for m in c.get_model_repository_index(as_json=True)["models"]}
        assert index["warm"]["state"] == "READY"
        assert index["cold"]["state"] == "UNAVAILABLE"
        assert "x.bin" in index["cold"]["reason"]
        c.close()


def test_a_version_that_failed_to_load_reads_not_ready_in_the_metrics(server: Running) -> None:
    """The readiness alerts look for cnnserve_model_ready == 0: a failed version must have
    that series, not none."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        text = response.read().decode()
    ready = {
        (s.labels["model"], s.labels["version"]): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "cnnserve_model_ready"
    }
    assert ready[("tiny", "1")] == 1
    assert ready[("broken", "1")] == 0
