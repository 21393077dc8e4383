"""Reload, corrupt files and shutdown under load: no request is lost."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc

from cnnserve.v1 import grpc_service_pb2_grpc as rpc
from cnnserve.v1 import inference_pb2 as pb
from tests.servers import serve_command, server_in_thread, server_process
from tests.tiny import TINY_CONFIG, TINY_WEIGHTS, write_slow, write_tiny


class Load:
    """Steady traffic from a few threads; records every outcome and model version seen."""

    def __init__(self, url: str, model: str = "tiny", threads: int = 4) -> None:
        self.url = url
        self.model = model
        self.outcomes: Counter[str] = Counter()
        self.versions: Counter[str] = Counter()
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)

    def _run(self) -> None:
        client = tc.InferenceServerClient(self.url)
        x = np.ones((2, 4), np.float32)
        inp = tc.InferInput("x", [2, 4], "FP32")
        inp.set_data_from_numpy(x)
        while not self._stop.is_set():
            try:
                result = client.infer(self.model, [inp], client_timeout=30)
                version = result.get_response().model_version
                scale = 1.0 if int(version) % 2 else 2.0  # odd versions: W, even: 2W
                np.testing.assert_allclose(
                    result.as_numpy("y"), scale * x @ TINY_WEIGHTS, rtol=1e-5
                )
                outcome = "ok"
            except Exception as exc:
                version, outcome = "", "error"
                with self._lock:
                    self.errors.append(str(exc))
            with self._lock:
                self.outcomes[outcome] += 1
                self.versions[version] += 1
        client.close()


def wait_for(predicate: object, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise TimeoutError("condition not met in time")


@pytest.fixture
def poll_repo(tmp_path: Path) -> Path:
    write_tiny(tmp_path)
    return tmp_path


def test_new_version_takes_traffic_with_zero_failed_requests(poll_repo: Path) -> None:
    with server_in_thread(poll_repo, model_control_mode="poll", repository_poll_secs=0.2) as srv:
        with Load(srv.url) as load:
            wait_for(lambda: load.outcomes["ok"] > 20)
            write_tiny(poll_repo, version=2, config=None, weights=2 * TINY_WEIGHTS)
            wait_for(lambda: load.versions["2"] > 20)
        index = tc.InferenceServerClient(srv.url).get_model_repository_index(as_json=True)
    assert load.errors == []
    assert load.versions["1"] > 0
    assert load.versions["2"] > 0
    assert [(m["name"], m["version"], m["state"]) for m in index["models"]] == [
        ("tiny", "2", "READY")
    ]


def test_corrupt_files_leave_everything_else_serving(poll_repo: Path) -> None:
    with server_in_thread(poll_repo, model_control_mode="poll", repository_poll_secs=0.2) as srv:
        client = tc.InferenceServerClient(srv.url)

        def index() -> dict[str, dict[str, str]]:
            models = client.get_model_repository_index(as_json=True)["models"]
            return {f"{m['name']}/{m.get('version', '')}": m for m in models}

        with Load(srv.url) as load:
            (poll_repo / "junk" / "1").mkdir(parents=True)
            (poll_repo / "junk" / "1" / "model.onnx").write_bytes(b"\x08\x07garbage")
            (poll_repo / "tiny" / "3").mkdir()
            (poll_repo / "tiny" / "3" / "model.onnx").write_bytes(b"truncated")
            wait_for(lambda: "tiny/3" in index() and "junk/1" in index())
            wait_for(lambda: load.outcomes["ok"] > 20)
        entries = index()
        assert entries["junk/1"]["state"] == "UNAVAILABLE"
        assert "cannot load" in entries["junk/1"]["reason"]
        assert entries["tiny/3"]["state"] == "UNAVAILABLE"
        assert entries["tiny/1"]["state"] == "READY"
        assert entries["tiny/1"]["reason"].startswith("still serving; the last load failed")
        assert load.errors == []
        shutil.rmtree(poll_repo / "junk")
        wait_for(lambda: not any(k.startswith("junk/") for k in index()))
        client.close()


def test_wrong_shape_for_config_is_unavailable_with_a_reason(tmp_path: Path) -> None:
    bad_config = TINY_CONFIG.replace("dims: [4]", "dims: [5]")
    write_tiny(tmp_path, "misfit", config=bad_config)
    write_tiny(tmp_path)
    with server_in_thread(tmp_path) as srv:
        client = tc.InferenceServerClient(srv.url)
        models = {m["name"]: m for m in client.get_model_repository_index(as_json=True)["models"]}
        assert models["misfit"]["state"] == "UNAVAILABLE"
        assert "does not match the ONNX model" in models["misfit"]["reason"]
        assert client.is_model_ready("tiny")
        client.close()


def ones_request(model: str, rows: int = 1) -> pb.ModelInferRequest:
    """A ModelInfer request of `rows` rows of ones for a model that takes x [N, 4]."""
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="x", datatype="FP32", shape=[rows, 4])
    request.raw_input_contents.append(np.ones(4 * rows, np.float32).tobytes())
    return request


SLOW_CONFIG = """
max_batch_size: 4
input { name: "x" data_type: TYPE_FP32 dims: [4] }
output { name: "y" data_type: TYPE_FP32 dims: [3] }
dynamic_batching { max_queue_delay_microseconds: 1000 }
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_stop_signal_during_load_finishes_in_flight_requests_and_exits_0(
    tmp_path: Path, sig: signal.Signals
) -> None:
    write_slow(tmp_path / "repo", "slow", SLOW_CONFIG)
    with (
        server_process(
            tmp_path / "repo", tmp_path / "server.log", "--grace-period-secs", "30"
        ) as child,
        grpc.insecure_channel(child.url) as channel,
    ):
        stub = rpc.GRPCInferenceServiceStub(channel)
        request = ones_request("slow")
        stub.ModelInfer(request, timeout=30)  # warm connection
        in_flight = [stub.ModelInfer.future(request, timeout=60) for _ in range(40)]
        time.sleep(0.05)
        child.process.send_signal(sig)
        codes: Counter[str] = Counter()
        for call in in_flight:
            try:
                call.result()
                codes["OK"] += 1
            except grpc.RpcError as exc:
                codes[exc.code().name] += 1
        assert child.process.wait(60) == 0, child.log()
    assert codes == Counter({"OK": 40}), child.log()
    assert "draining" in child.log()


def test_calls_after_sigterm_are_refused_as_unavailable(tmp_path: Path) -> None:
    write_slow(tmp_path / "repo", "slow", SLOW_CONFIG, layers=48)
    with server_process(tmp_path / "repo", tmp_path / "server.log") as child:
        with grpc.insecure_channel(child.url) as channel:
            stub = rpc.GRPCInferenceServiceStub(channel)
            request = ones_request("slow", rows=4)
            busy = [stub.ModelInfer.future(request, timeout=60) for _ in range(30)]
            time.sleep(0.1)
            child.process.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            with pytest.raises(grpc.RpcError) as refused:
                stub.ModelInfer(request, timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert all(call.result() is not None for call in busy)
        assert child.process.wait(60) == 0


def test_requests_during_startup_are_unavailable_not_unknown(tmp_path: Path) -> None:
    from cnnserve.server.errors import ModelNotFound, ModelNotReady
    from cnnserve.server.metrics import Metrics
    from cnnserve.server.registry import Registry

    write_tiny(tmp_path)
    registry = Registry(tmp_path, default_queue=8, metrics=Metrics())
    registry.starting = True
    with pytest.raises(ModelNotReady, match="starting"):
        registry.get("tiny")
    registry.starting = False
    with pytest.raises(ModelNotFound):
        registry.get("tiny")


def test_after_sigkill_a_restarted_server_is_ready_and_client_retries_succeed(
    tmp_path: Path,
) -> None:
    from cnnserve.client import Client

    write_tiny(tmp_path / "repo")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fixed = ("--grpc-port", str(port))
    with server_process(tmp_path / "repo", tmp_path / "first.log", *fixed) as first:
        client = Client(f"127.0.0.1:{port}", retries=10, backoff=0.2, timeout=60)
        x = np.ones((1, 4), np.float32)
        assert client.infer("tiny", {"x": x}).as_numpy("y").shape == (1, 3)
        first.process.kill()
        assert first.process.wait(10) == -signal.SIGKILL
    second: list[subprocess.Popen[bytes]] = []
    command = serve_command(tmp_path / "repo", *fixed)
    restart = threading.Timer(0.5, lambda: second.append(subprocess.Popen(command)))
    restart.start()
    try:
        # Issued while nothing listens: the client's retries on UNAVAILABLE carry it over.
        y = client.infer("tiny", {"x": x}).as_numpy("y")
        np.testing.assert_allclose(y, x @ TINY_WEIGHTS, rtol=1e-5, atol=1e-6)
        assert client.is_ready()
        assert client.is_ready("tiny")
    finally:
        client.close()
        restart.join()
        for process in second:
            process.send_signal(signal.SIGTERM)
            assert process.wait(30) == 0


def test_files_deleted_or_replaced_while_serving_lose_no_request(poll_repo: Path) -> None:
    with server_in_thread(poll_repo, model_control_mode="poll", repository_poll_secs=0.1) as srv:
        registry = srv.server.registry
        model_file = poll_repo / "tiny" / "1" / "model.onnx"
        with Load(srv.url) as load:
            wait_for(lambda: load.outcomes["ok"] > 20)
            before = registry.get("tiny")
            replacement = model_file.with_suffix(".new")
            shutil.copy(model_file, replacement)
            replacement.replace(model_file)  # replaced in place: a new file, same content
            wait_for(lambda: registry.get("tiny") is not before)
            (poll_repo / "tiny" / "config.pbtxt").unlink()  # completed from the graph now
            wait_for(lambda: registry.get("tiny").config.max_batch_size == 32)
            serving = registry.get("tiny")
            model_file.unlink()  # no version left on disk: the loaded one keeps serving
            wait_for(lambda: "no version folder" in registry.index()[0].reason)
            count = load.outcomes["ok"]
            wait_for(lambda: load.outcomes["ok"] > count + 20)
            assert registry.get("tiny") is serving
    assert load.errors == []


def _serve(repository: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`cnnserve serve` expected to give up at start: its exit status and output."""
    return subprocess.run(
        serve_command(repository, *args), capture_output=True, text=True, timeout=60
    )


def _answers(url: str) -> bool:
    with tc.InferenceServerClient(url) as client:
        inp = tc.InferInput("x", [1, 4], "FP32")
        inp.set_data_from_numpy(np.ones((1, 4), np.float32))
        y = client.infer("tiny", [inp], client_timeout=30).as_numpy("y")
        return bool(np.allclose(y, np.ones((1, 4)) @ TINY_WEIGHTS, rtol=1e-5))


def test_a_second_server_on_a_taken_port_exits_1_and_the_first_keeps_every_connection(
    tmp_path: Path,
) -> None:
    write_tiny(tmp_path / "repo")
    with server_process(tmp_path / "repo", tmp_path / "first.log") as first:
        second = _serve(tmp_path / "repo", "--grpc-port", str(first.port))
        assert second.returncode == 1, second.stderr
        assert f"cannot listen for gRPC on 127.0.0.1:{first.port}" in second.stderr
        assert "Traceback" not in second.stderr
        assert all(_answers(first.url) for _ in range(3))
        first.process.send_signal(signal.SIGTERM)
        assert first.process.wait(30) == 0


def test_a_taken_metrics_port_exits_1_with_one_line(tmp_path: Path) -> None:
    write_tiny(tmp_path / "repo")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _serve(tmp_path / "repo", "--grpc-port", "0", "--metrics-port", str(port))
    assert result.returncode == 1, result.stderr
    assert f"cannot serve metrics on 127.0.0.1:{port}: Address already in use" in result.stderr
    assert "Traceback" not in result.stderr


def test_servers_with_reuse_grpc_port_share_it_and_one_stopping_leaves_the_other(
    tmp_path: Path,
) -> None:
    write_tiny(tmp_path / "repo")
    reuse = ("--reuse-grpc-port", "true")
    with server_process(tmp_path / "repo", tmp_path / "first.log", *reuse) as first:
        shared = ("--grpc-port", str(first.port))
        with server_process(tmp_path / "repo", tmp_path / "second.log", *reuse, *shared) as second:
            assert second.port == first.port
            assert _answers(first.url)
            first.process.send_signal(signal.SIGTERM)
            assert first.process.wait(30) == 0
            assert all(_answers(second.url) for _ in range(3))  # new connections: the second
            assert second.process.poll() is None


def test_a_load_model_not_in_the_repository_stops_the_start(tmp_path: Path) -> None:
    """A typo in --load-model would leave a server whose health says SERVING while it
    serves nothing, so the start fails, naming the model and what the repository has."""
    from cnnserve.server.app import StartupError

    write_tiny(tmp_path)
    with (
        pytest.raises(StartupError, match=r"--load-model tiyn: not in the repository .*tiny"),
        server_in_thread(tmp_path, load_model=("tiny", "tiyn")),
    ):
        pass


def test_a_version_folder_that_is_not_a_number_is_ignored(tmp_path: Path) -> None:
    """As Triton does; "²" passes str.isdigit but is not a version."""
    write_tiny(tmp_path)
    odd = tmp_path / "tiny" / "²"
    odd.mkdir()
    shutil.copy(tmp_path / "tiny" / "1" / "model.onnx", odd / "model.onnx")
    with server_in_thread(tmp_path) as srv:
        client = tc.InferenceServerClient(srv.url)
        assert client.is_model_ready("tiny", "1")
        index = client.get_model_repository_index().models
        assert [(m.name, m.version, m.state) for m in index] == [("tiny", "1", "READY")]


def test_load_unload_load_in_a_row_ends_loaded_and_the_server_stops(tmp_path: Path) -> None:
    """Calls that queue behind a load run in order; the last one decides, and no version is
    left behind (the second load used to fill an entry the unload had dropped, and the
    stop then waited forever on a version retired twice)."""
    import asyncio

    write_tiny(tmp_path)
    with server_in_thread(tmp_path, model_control_mode="explicit") as srv:
        registry = srv.server.registry

        async def in_a_row() -> None:
            load = asyncio.create_task(registry.load("tiny"))
            await asyncio.sleep(0)  # the load holds the model's lock, loading in a thread
            await asyncio.gather(load, registry.unload("tiny"), registry.load("tiny"))

        asyncio.run_coroutine_threadsafe(in_a_row(), srv.loop).result(60)
        client = tc.InferenceServerClient(srv.url)
        assert client.is_model_ready("tiny")
        x = tc.InferInput("x", [1, 4], "FP32")
        x.set_data_from_numpy(np.ones((1, 4), np.float32))
        assert client.infer("tiny", [x]).as_numpy("y").shape == (1, 3)
        stopped = asyncio.run_coroutine_threadsafe(srv.server.stop(grace=1), srv.loop)
        stopped.result(30)  # before the fix: never


def test_versions_that_loaded_carry_no_blame_for_one_that_failed(tmp_path: Path) -> None:
    """With every version served, a broken new one fails alone; the others loaded fine and
    their index entries say nothing of it."""
    from cnnserve.server.errors import ModelLoadError

    config = TINY_CONFIG + "version_policy { all {} }\n"
    write_tiny(tmp_path, config=config)
    write_tiny(tmp_path, version=2, config=config)
    with server_in_thread(tmp_path, model_control_mode="explicit", load_model=("tiny",)) as srv:
        (tmp_path / "tiny" / "3").mkdir()
        (tmp_path / "tiny" / "3" / "model.onnx").write_bytes(b"truncated")
        srv.call(srv.server.registry.load("tiny"))  # 1 and 2 load again beside the broken 3
        entries = {(e.version, e.state): e.reason for e in srv.server.registry.index()}
        assert entries[("1", "READY")] == entries[("2", "READY")] == ""
        assert "cannot load" in entries[("3", "UNAVAILABLE")]
        (tmp_path / "tiny" / "config.pbtxt").write_text("max_batch_size: [")
        with pytest.raises(ModelLoadError):
            srv.call(srv.server.registry.load("tiny"))  # a broken config: all of them stay
        reasons = [e.reason for e in srv.server.registry.index() if e.state == "READY"]
        assert len(reasons) == 2
        assert all(r.startswith("still serving; the last load failed") for r in reasons)


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ("dynamic_batching { preferred_batch_size: [4, 16] }", "must lie in 1..max_batch_size (8)"),
        ("sequence_batching { }", "cannot serve a model with sequence_batching"),
    ],
)
def test_a_config_that_would_be_served_otherwise_than_it_says_fails_to_load(
    tmp_path: Path, extra: str, words: str
) -> None:
    """As Triton refuses them: served anyway, the model would not do what its config says."""
    config = TINY_CONFIG.replace(
        "dynamic_batching { max_queue_delay_microseconds: 2000 "
        "default_queue_policy { max_queue_size: 64 } }\n",
        "",
    )
    write_tiny(tmp_path, config=config + extra + "\n")
    with server_in_thread(tmp_path) as srv:
        [entry] = srv.server.registry.index()
        assert entry.state == "UNAVAILABLE"
        assert words in entry.reason


def test_the_index_gives_the_reason_of_the_latest_failed_load(tmp_path: Path) -> None:
    """A version's own reason from an earlier load gave way to the model's new one."""
    from cnnserve.server.errors import ModelLoadError

    base = TINY_CONFIG.replace(
        "dynamic_batching { max_queue_delay_microseconds: 2000 "
        "default_queue_policy { max_queue_size: 64 } }\n",
        "",
    )
    model = write_tiny(tmp_path, config=base + "dynamic_batching { preferred_batch_size: 16 }\n")
    with server_in_thread(tmp_path, model_control_mode="explicit") as srv:
        for extra, words in (
            ("dynamic_batching { preferred_batch_size: 16 }", "preferred_batch_size"),
            ("sequence_batching { }", "sequence_batching"),
        ):
            (model / "config.pbtxt").write_text(base + extra + "\n")
            with pytest.raises(ModelLoadError):
                srv.call(srv.server.registry.load("tiny"))
            [entry] = srv.server.registry.index()
            assert entry.state == "UNAVAILABLE"
            assert words in entry.reason, entry


def test_unsupported_config_fields_are_all_named_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_tiny(tmp_path, config=TINY_CONFIG + "optimization { }\nresponse_cache { enable: true }\n")
    with server_in_thread(tmp_path, model_control_mode="poll", repository_poll_secs=0.05):
        time.sleep(0.5)  # several scans, each reading the config again
    warnings = [r.getMessage() for r in caplog.records if "ignoring fields" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].endswith("(optimization, response_cache)")


def test_calls_on_the_wire_at_sigterm_are_answered_not_cancelled(tmp_path: Path) -> None:
    """gRPC's stop cancels calls it has received but not handed to a handler yet; the
    server keeps them coming a moment so that each is answered (UNAVAILABLE is retried)."""
    write_tiny(tmp_path / "repo")
    with (
        server_process(tmp_path / "repo", tmp_path / "server.log") as child,
        grpc.insecure_channel(child.url) as channel,
    ):
        stub = rpc.GRPCInferenceServiceStub(channel)
        request = ones_request("tiny")
        stub.ModelInfer(request, timeout=30)  # warm connection
        calls = []
        stop_at = time.monotonic() + 0.3
        while time.monotonic() < stop_at + 0.5:
            calls += [stub.ModelInfer.future(request, timeout=30) for _ in range(64)]
            if stop_at and time.monotonic() >= stop_at:
                child.process.send_signal(signal.SIGTERM)
                stop_at = 0.0
            time.sleep(0.01)
        codes = Counter(
            call.exception().code().name if call.exception() else "OK" for call in calls
        )
        assert child.process.wait(60) == 0, child.log()
    assert codes["OK"] > 0, codes
    assert set(codes) <= {"OK", "UNAVAILABLE"}, codes


def test_open_streams_end_unavailable_at_sigterm_instead_of_holding_the_grace_period(
    tmp_path: Path,
) -> None:
    """Streams that wait for their clients' next request, one of each kind: the shutdown
    answers what they have read and then ends them (UNAVAILABLE, which clients retry)
    rather than waiting out the 30 s grace for them."""
    import io
    import re
    import urllib.request

    from PIL import Image

    from cnnserve.v1 import classification_pb2 as cpb
    from cnnserve.v1 import classification_pb2_grpc as cgrpc
    from tests.tiny import write_tiny_image

    write_slow(tmp_path / "repo", "slow", SLOW_CONFIG, layers=96, width=2048)
    write_tiny_image(tmp_path / "repo")
    png = io.BytesIO()
    Image.new("L", (8, 8), 128).save(png, format="PNG")
    hold = threading.Event()

    def then_idle(*requests: object) -> object:
        yield from requests
        hold.wait(60)  # the client sends nothing more and does not close its side

    with (
        server_process(
            tmp_path / "repo", tmp_path / "server.log", "--grace-period-secs", "30",
            "--metrics-port", "0",
        ) as child,
        grpc.insecure_channel(child.url) as channel,
    ):  # fmt: skip
        stub = rpc.GRPCInferenceServiceStub(channel)
        metrics = re.search(r"metrics (http://\S+)", child.log())
        assert metrics
        infer = stub.ModelStreamInfer(then_idle(*[ones_request("slow")] * 40), timeout=60)
        classify = cgrpc.ImageClassifierStub(channel).ClassifyStream(
            then_idle(cpb.ClassifyRequest(model_name="pixels", images=[png.getvalue()])),
            timeout=60,
        )
        assert not next(infer).error_message
        assert not next(classify).error_code

        def read_so_far() -> tuple[int, int]:
            """(requests the server has read, of which not answered yet)"""
            with urllib.request.urlopen(metrics.group(1), timeout=10) as page:
                text = page.read().decode()
            pending = re.search(r'pending_requests\{model="slow".*\} (\S+)', text)
            assert pending
            stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name="slow"), timeout=10)
            done = stats.model_stats[0].inference_count
            return done + int(float(pending.group(1))), int(float(pending.group(1)))

        samples = [read_so_far()]

        def all_read() -> bool:
            samples.append(read_so_far())
            return samples[-1][0] == 40

        wait_for(all_read)
        assert samples[-1][1] > 0  # some are in flight at the signal
        started = time.monotonic()
        child.process.send_signal(signal.SIGTERM)
        answers: list[pb.ModelStreamInferResponse] = []
        for stream in (infer, classify):
            with pytest.raises(grpc.RpcError) as ended:
                answers.extend(stream)
            assert ended.value.code() == grpc.StatusCode.UNAVAILABLE, ended.value
            assert "shutting down" in (ended.value.details() or "")
        assert child.process.wait(60) == 0, child.log()
        hold.set()
    assert time.monotonic() - started < 10, child.log()
    assert len(answers) == 39
    assert not any(answer.error_message for answer in answers)
