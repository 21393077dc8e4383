"""`cnnserve.client` and the `classify`/`models` commands, against a real server on loopback.

The served lenet5 is the session's trained export; the digits are its held-out
split, rendered as export/train.py renders them. The README section's Python
blocks are run as they are written.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from google.protobuf import text_format
from PIL import Image, ImageDraw

from cnnserve.client import (
    AsyncClient,
    Client,
    CnnserveClientError,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    Unauthenticated,
    Unavailable,
)
from cnnserve.preprocess import preprocess
from cnnserve.v1 import model_config_pb2 as mc
from tests.certs import Authority
from tests.servers import Running, server_in_thread
from tests.tiny import TINY_CONFIG, TINY_WEIGHTS, write_echo_bytes, write_slow, write_tiny

MAX_IMAGE_BYTES = 1_000_000
Digits = tuple[list[Path], np.ndarray]
README = Path(__file__).parents[1] / "README.md"
README_SECTION = "## Classify images and the Python client"


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory, lenet5_repository: Path) -> Path:
    repo = tmp_path_factory.mktemp("client_repo")
    shutil.copytree(lenet5_repository / "lenet5", repo / "lenet5")
    # On the CPU, as the in-process references below, so that they agree to rounding on any
    # machine; a GPU (TF32 matrix products) would need looser tolerances.
    config_path = repo / "lenet5" / "config.pbtxt"
    config = text_format.Parse(config_path.read_text(), mc.ModelConfig())
    for group in config.instance_group:
        group.kind = mc.ModelInstanceGroup.KIND_CPU
    config_path.write_text(text_format.MessageToString(config))
    write_tiny(repo, config=TINY_CONFIG + "instance_group { kind: KIND_CPU }\n")
    write_echo_bytes(repo)
    write_slow(repo, "slow", "", layers=192)  # ~10 ms a row: a deadline it cannot meet
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "1" / "model.onnx").write_bytes(b"not an onnx file")
    return repo


@pytest.fixture(scope="module")
def server(repository: Path) -> Iterator[Running]:
    with server_in_thread(repository, max_image_bytes=MAX_IMAGE_BYTES) as running:
        yield running


@pytest.fixture
def client(server: Running) -> Iterator[Client]:
    with Client(server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Digits:
    """The held-out digits (seed 0, as the lenet5 fixture trained) as PNG files, and labels."""
    from sklearn.datasets import load_digits

    from cnnserve.export.train import digit_image, digits_split

    data = load_digits()
    _, test = digits_split(0)
    folder = tmp_path_factory.mktemp("digits")
    paths = []
    for n, i in enumerate(test):
        paths.append(folder / f"{n:03d}.png")
        digit_image(data.data[i]).save(paths[-1])
    return paths, data.target[test]


def session(repository: Path, model: str) -> ort.InferenceSession:
    path = repository / model / "1" / "model.onnx"
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def png_bomb(side: int) -> bytes:
    """A 1-bit side x side PNG, all black: kilobytes on the wire, side² pixels decoded."""
    row = bytes(1 + (side + 7) // 8)  # filter byte 0, then the packed bits
    deflate = zlib.compressobj(9)
    data = b"".join(deflate.compress(row) for _ in range(side)) + deflate.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc

    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # bit depth 1, grayscale
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
    )


def test_infer_matches_in_process_onnxruntime(client: Client, repository: Path) -> None:
    batch = np.random.default_rng(0).standard_normal((3, 1, 32, 32), dtype=np.float32)
    [expected] = session(repository, "lenet5").run(None, {"input": batch})
    result = client.infer("lenet5", {"input": batch}, request_id="r1")
    assert (result.model, result.version, result.id) == ("lenet5", "1", "r1")
    np.testing.assert_allclose(result.as_numpy("logits"), expected, rtol=1e-5, atol=1e-5)
    # Positional inputs follow the model's metadata; the tiny model is x @ W exactly.
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.testing.assert_array_equal(client.infer("tiny", [x]).as_numpy("y"), x @ TINY_WEIGHTS)


def test_infer_decodes_bytes_and_classification_outputs(client: Client) -> None:
    strings = np.array([["a", "é"], ["", "long " * 50]], dtype=object)
    echoed = client.infer("echo", {"s": strings}).as_numpy("t")
    assert echoed.shape == (2, 2)
    assert [v.decode() for v in echoed.flat] == list(strings.flat)
    x = np.array([[0, 0, 0, 1]], dtype=np.float32)  # picks W's last row: 0.4, 0.5, 0.6
    top = client.infer("tiny", {"x": x}, class_count=2).as_numpy("y")
    assert top.tolist() == [[b"0.600000:2:gamma", b"0.500000:1:beta"]]
    assert not echoed.flags.writeable  # read-only, as numeric outputs are
    assert not top.flags.writeable
    with pytest.raises(InvalidArgument, match="datatype 'INT64'"):
        client.infer("tiny", {"x": x.astype(np.int64)})


def test_metadata_config_and_statistics_read_as_in_tritonclient(client: Client) -> None:
    meta = client.metadata("lenet5", as_json=True)
    assert meta["inputs"] == [
        {"name": "input", "datatype": "FP32", "shape": ["-1", "1", "32", "32"]}
    ]
    assert client.metadata("lenet5").outputs[0].name == "logits"
    config = client.config("lenet5", as_json=True)
    assert config["parameters"]["color"] == {"string_value": "L"}
    assert config["parameters"]["execution_provider"]["string_value"].endswith("ExecutionProvider")
    x = np.ones((1, 4), np.float32)
    client.infer("tiny", x, outputs=["y"])
    stats = client.statistics("tiny", as_json=True)["model_stats"][0]
    assert stats["name"] == "tiny"
    assert int(stats["inference_count"]) >= 1
    assert not client.is_ready("broken")
    with pytest.raises(InvalidArgument, match="unknown output 'z'"):
        client.infer("tiny", x, outputs=["z"])


def test_async_client_mirrors_the_blocking_one(server: Running, digits: Digits) -> None:
    paths, labels = digits

    async def run() -> None:
        async with AsyncClient(server.url, timeout=60) as client:
            assert await client.is_ready()
            assert await client.is_ready("lenet5")
            names = {m.name for m in await client.models()}
            assert names == {"broken", "echo", "lenet5", "slow", "tiny"}
            results = await client.classify("lenet5", paths[:4])
            assert [int(r.top.label) for r in results] == labels[:4].tolist()
            x = np.ones((1, 4), np.float32)
            assert (await client.infer("tiny", x)).as_numpy("y").shape == (1, 3)
            with pytest.raises(NotFound):
                await client.metadata("no-such-model")

    asyncio.run(run())


def test_held_out_digits_match_the_recorded_accuracy(
    client: Client, digits: Digits, repository: Path
) -> None:
    paths, labels = digits
    results = client.classify("lenet5", paths)
    predicted = np.array([r.top.index for r in results])
    record = json.loads((repository / "lenet5" / "1" / "export.json").read_text())
    assert record["training"]["dataset"] == "digits"
    assert record["training"]["test_size"] == len(paths)
    assert int((predicted == labels).sum()) == round(record["accuracy"] * len(paths))


def test_jpeg_top5_equals_local_preprocessing_and_onnxruntime(
    client: Client, repository: Path
) -> None:
    image = Image.new("RGB", (45, 38), (30, 60, 90))
    ImageDraw.Draw(image).line([(10, 8), (34, 8), (18, 32)], fill=(250, 240, 200), width=4)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    jpeg = buffer.getvalue()
    config = client.config("lenet5")
    params = {k: v.string_value for k, v in config.parameters.items()}
    [logits] = session(repository, "lenet5").run(None, {"input": preprocess(jpeg, params)[None]})
    shifted = logits[0].astype(np.float64) - logits[0].max()
    probabilities = np.exp(shifted) / np.exp(shifted).sum()
    expected = np.argsort(-probabilities, kind="stable")[:5]
    [served] = client.classify("lenet5", jpeg, top_k=5)
    assert [c.index for c in served.classes] == expected.tolist()
    assert [c.label for c in served.classes] == [str(i) for i in expected]
    np.testing.assert_allclose([c.score for c in served.classes], probabilities[expected], 1e-5)


def test_concurrent_classify_calls_share_batches(client: Client, digits: Digits) -> None:
    paths = digits[0][:48]
    before = client.statistics("lenet5").model_stats[0]

    async def run() -> None:
        async with AsyncClient(client.url, timeout=60) as aclient:
            await asyncio.gather(*(aclient.classify("lenet5", p) for p in paths))

    asyncio.run(run())
    after = client.statistics("lenet5").model_stats[0]
    assert after.inference_count - before.inference_count == len(paths)
    assert after.execution_count - before.execution_count < len(paths)


def test_many_images_go_in_several_calls(server: Running, client: Client, digits: Digits) -> None:
    def classify_calls() -> float:
        labels = {"method": "Classify", "code": "OK"}
        registry = server.server.metrics.registry
        return registry.get_sample_value("cnnserve_grpc_requests_total", labels) or 0.0

    images = [p.read_bytes() for p in digits[0]]
    in_one_call = client.classify("lenet5", images)
    before = classify_calls()
    with Client(server.url, max_message_bytes=4096) as small:  # room for about 15 digits
        in_many_calls = small.classify("lenet5", images)
        assert classify_calls() - before >= len(images) // 30
        images[300] = b"not an image"
        with pytest.raises(InvalidArgument, match="^INVALID_ARGUMENT: image 300: ") as refused:
            small.classify("lenet5", images)
    assert refused.value.image_index == 300
    # Equal up to float rounding: batches of other sizes may sum in another order.
    assert [r.top.index for r in in_many_calls] == [r.top.index for r in in_one_call]
    np.testing.assert_allclose(
        [r.top.score for r in in_many_calls], [r.top.score for r in in_one_call], rtol=1e-5
    )


def test_a_call_with_more_images_than_the_queue_holds_is_one_request(
    client: Client, digits: Digits
) -> None:
    images = [p.read_bytes() for p in digits[0]]
    many = (images * (1100 // len(images) + 1))[:1100]  # the queue holds 1024 requests
    before = client.statistics("lenet5").model_stats[0]
    answers = client.classify("lenet5", many)
    after = client.statistics("lenet5").model_stats[0]
    assert len(answers) == len(many)
    tops = [a.top.index for a in answers]
    assert tops == [tops[i % len(images)] for i in range(len(many))]
    assert after.inference_count - before.inference_count == len(many)
    assert after.inference_stats.success.count - before.inference_stats.success.count == 1


def test_top_k_zero_is_five_and_may_reach_the_class_count(client: Client, digits: Digits) -> None:
    [default] = client.classify("lenet5", digits[0][0], top_k=0)
    assert len(default.classes) == 5
    [every] = client.classify("lenet5", digits[0][0], top_k=10, version="1")
    scores = [c.score for c in every.classes]
    assert sorted(c.index for c in every.classes) == list(range(10))
    assert scores == sorted(scores, reverse=True)
    assert sum(scores) == pytest.approx(1, abs=1e-5)


def noise_png(side: int) -> bytes:
    pixels = np.random.default_rng(1).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def samples(digits: Digits) -> dict[str, bytes]:
    samples = {
        "good": digits[0][0].read_bytes(),
        "oversized": noise_png(600),
        "bomb 20000": png_bomb(20000),
        "bomb 7000": png_bomb(7000),
    }
    assert len(samples["oversized"]) > MAX_IMAGE_BYTES > len(samples["bomb 20000"])
    assert Image.open(io.BytesIO(samples["bomb 7000"])).size == (7000, 7000)
    return samples


@pytest.mark.parametrize(
    ("model", "images", "top_k", "error", "message"),
    [
        ("lenet5", ["good", b"not an image"], 0, InvalidArgument, "image 1: not a JPEG"),
        ("lenet5", [], 0, InvalidArgument, "no images"),
        ("lenet5", ["good"], 11, InvalidArgument, "top_k is 11, but the model has 10 classes"),
        ("no-such-model", ["good"], 0, NotFound, "unknown model"),
        ("lenet5", ["good", "oversized"], 0, InvalidArgument, f"image 1: .* {MAX_IMAGE_BYTES}"),
        ("lenet5", ["bomb 20000"], 0, InvalidArgument, "image 0: 20000x20000 pixels, over"),
        ("lenet5", ["bomb 7000"], 0, InvalidArgument, "image 0: 7000x7000 pixels, over"),
    ],
    ids=["bad", "empty", "top-k", "unknown-model", "oversized", "bomb", "bomb-limit"],
)
def test_refused_requests_get_their_status_and_the_server_stays_healthy(
    client: Client,
    samples: dict[str, bytes],
    model: str,
    images: list[str | bytes],
    top_k: int,
    error: type[CnnserveClientError],
    message: str,
) -> None:
    sent = [samples[i] if isinstance(i, str) else i for i in images]
    with pytest.raises(error, match=message):
        client.classify(model, sent, top_k=top_k)
    assert client.is_ready()
    assert client.is_ready("lenet5")
    assert len(client.classify("lenet5", samples["good"])[0].classes) == 5


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cnnserve", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_cli_prints_a_table_with_the_right_digits(server: Running, digits: Digits) -> None:
    paths, labels = digits
    done = cli(
        "classify", "--model", "lenet5", *map(str, paths[:6]), env={"CNNSERVE_URL": server.url}
    )
    assert done.returncode == 0, done.stderr
    header, *rows = done.stdout.splitlines()
    assert header.split() == ["FILE", "RANK", "LABEL", "SCORE"]
    assert len(rows) == 6 * 5
    top = [row.split() for row in rows[::5]]  # the file is named on its first (rank 1) row
    assert [t[:2] for t in top] == [[str(p), "1"] for p in paths[:6]]
    assert [int(t[2]) for t in top] == labels[:6].tolist()


def test_cli_json_and_a_failed_image(server: Running, digits: Digits, tmp_path: Path) -> None:
    bad, missing = tmp_path / "bad.png", tmp_path / "missing.png"
    bad.write_bytes(digits[0][0].read_bytes()[:60])  # a PNG cut short
    files = [str(digits[0][0]), str(bad), str(digits[0][1]), str(missing)]
    done = cli("classify", "--url", server.url, "--model", "lenet5", "--json", *files)
    assert done.returncode == 1
    answer = json.loads(done.stdout)
    assert [a["file"] for a in answer] == files
    assert [len(a["classes"]) for a in answer] == [5, 0, 5, 0]
    assert answer[0]["model"] == "lenet5"
    assert answer[0]["version"] == "1"
    assert set(answer[0]["classes"][0]) == {"index", "label", "score"}
    assert "cannot decode" in answer[1]["error"]
    assert "No such file" in answer[3]["error"]
    assert f"{bad}: cannot decode" in done.stderr
    assert "Traceback" not in done.stderr


def test_cli_errors_are_one_line(server: Running, digits: Digits) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"
    for args in (
        ["models", "--url", closed],
        ["classify", "--url", server.url, "--model", "nope", str(digits[0][0])],
    ):
        done = cli(*args)
        assert done.returncode == 1
        assert done.stderr.count("\n") == 1, done.stderr
        assert "error: " in done.stderr
    assert "NOT_FOUND: unknown model 'nope'" in done.stderr


def test_cli_models_lists_versions_states_and_providers(server: Running) -> None:
    done = cli("models", "--url", server.url)
    assert done.returncode == 0, done.stderr
    assert re.search(r"^lenet5\s+1\s+READY\s+\w+ExecutionProvider$", done.stdout, re.M)
    assert re.search(r"^broken\s+1\s+UNAVAILABLE\s+-\s+\S+", done.stdout, re.M)
    listed = json.loads(cli("models", "--url", server.url, "--json").stdout)
    assert {m["name"] for m in listed} == {"broken", "echo", "lenet5", "slow", "tiny"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_retries_reach_a_server_that_starts_late(tmp_path: Path) -> None:
    write_tiny(tmp_path / "repo")
    port = free_port()
    started, stop = threading.Event(), threading.Event()

    def serve_later() -> None:
        time.sleep(0.5)
        with server_in_thread(tmp_path / "repo", grpc_port=port):
            started.set()
            stop.wait(60)

    thread = threading.Thread(target=serve_later)
    thread.start()
    try:
        with Client(f"127.0.0.1:{port}", retries=0) as impatient, pytest.raises(Unavailable):
            impatient.is_live()
        with Client(f"127.0.0.1:{port}", retries=10, backoff=0.1, timeout=30) as client:
            assert not started.is_set()
            assert client.is_live()  # failed at first, then succeeded on a retry
            assert started.wait(30)
            assert client.infer("tiny", np.ones((1, 4), np.float32)).as_numpy("y").shape == (1, 3)
    finally:
        stop.set()
        thread.join(60)


def test_only_unavailable_is_retried_and_never_past_the_deadline(client: Client) -> None:
    x = np.ones((1, 4), np.float32)
    with Client(client.url, retries=3, backoff=5.0) as slow:
        began = time.monotonic()
        with pytest.raises(NotFound):
            slow.infer("no-such-model", x)
        with pytest.raises(NotFound, match="no ready version 9"):
            slow.infer("tiny", x, version="9")
        with pytest.raises(DeadlineExceeded):
            slow.infer("slow", x, timeout=0.001)
        assert time.monotonic() - began < 2
    with Client(f"127.0.0.1:{free_port()}", retries=10, backoff=1.0, timeout=0.5) as nowhere:
        began = time.monotonic()
        with pytest.raises(Unavailable):
            nowhere.is_live()
        assert time.monotonic() - began < 1.5


def test_mutual_tls_and_token(tmp_path: Path) -> None:
    write_tiny(tmp_path / "repo")
    ca = Authority(tmp_path / "ca")
    server, mine = ca.issue("server", server=True), ca.issue("client", server=False)
    token_file = tmp_path / "token"
    token_file.write_text("s3cret\n")
    settings = {"tls_cert": server.cert, "tls_key": server.key, "tls_client_ca": ca.cert}
    with server_in_thread(tmp_path / "repo", auth_token_file=token_file, **settings) as running:
        url = f"localhost:{running.server.grpc_port}"

        def connect(token: str) -> Client:
            key = mine.key.read_bytes()  # PEM as bytes; the others as paths
            return Client(
                url, root_certificates=ca.cert, certificate_chain=mine.cert, private_key=key,
                token=token,
            )  # fmt: skip

        with connect("s3cret") as client:
            assert client.is_ready("tiny")
        with connect("wrong") as client, pytest.raises(Unauthenticated):
            client.infer("tiny", np.ones((1, 4), np.float32))
        flags = f"--ca {ca.cert} --cert {mine.cert} --key {mine.key} --token-file {token_file}"
        done = cli("models", "--url", url, *flags.split())
        assert done.returncode == 0, done.stderr
        assert "tiny" in done.stdout


def test_readme_examples_run(server: Running, digits: Digits, tmp_path: Path) -> None:
    section = README.read_text().split(README_SECTION, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 3
    folder_example = next(b for b in blocks if "ThreadPoolExecutor" in b)
    assert len(folder_example.splitlines()) <= 50
    paths, labels = digits
    for path in paths[:8]:
        shutil.copy(path, tmp_path / path.name)
    shutil.copy(paths[0], tmp_path / "digit.png")
    for n, block in enumerate(blocks):
        script = tmp_path / f"example{n}.py"
        script.write_text(block)
        done = subprocess.run(
            [sys.executable, str(script), str(tmp_path), "lenet5"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "CNNSERVE_URL": server.url},
        )
        assert done.returncode == 0, f"example {n}:\n{done.stdout}\n{done.stderr}"
        if block is folder_example:
            assert "9 of 9 images classified" in done.stdout
            assert f"000.png: {labels[0]} (" in done.stdout
    (tmp_path / "example_folder.py").write_text(folder_example)
    (tmp_path / "gone.png").symlink_to(tmp_path / "nowhere.png")  # unreadable: that one fails
    done = subprocess.run(
        [sys.executable, str(tmp_path / "example_folder.py"), str(tmp_path), "lenet5"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "CNNSERVE_URL": server.url},
    )
    assert done.returncode == 1, done.stderr
    assert "gone.png: failed: [Errno 2] No such file or directory" in done.stdout
    assert "9 of 10 images classified" in done.stdout


def test_versions_may_be_given_as_numbers(client: Client, digits: Digits) -> None:
    assert client.is_ready("lenet5", 1)
    assert client.metadata("lenet5", 1).versions == ["1"]
    [answer] = client.classify("lenet5", digits[0][0], version=1)
    assert answer.top.index == client.classify("lenet5", digits[0][0], version="1")[0].top.index
    image = np.zeros((1, 1, 32, 32), np.float32)
    assert client.infer("lenet5", [image], version=1).as_numpy("logits").shape == (1, 10)


def test_images_in_any_form_the_readme_names_classify_alike(client: Client, digits: Digits) -> None:
    png = digits[0][0].read_bytes()
    expected = client.classify("lenet5", png)[0].top.index
    for form in (bytearray(png), memoryview(png)):  # one image, not a list of ints
        [answer] = client.classify("lenet5", form)
        assert answer.top.index == expected
    grey = np.asarray(Image.open(io.BytesIO(png)).convert("L"))
    wide = Image.fromarray(grey.astype(np.int32))  # mode "I", which PNG cannot hold
    assert wide.mode == "I"
    assert client.classify("lenet5", wide)[0].top.index == expected


def test_classify_splits_by_the_bytes_each_image_takes_on_the_wire(server: Running) -> None:
    """Each image costs a few bytes of framing besides its own: 40,000 one-byte images
    are 120 KB, not 40 KB, and a 100 KB message limit must split them."""
    with (
        Client(server.url, max_message_bytes=100_000) as small,
        pytest.raises(InvalidArgument, match="^INVALID_ARGUMENT: image 0: "),
    ):
        small.classify("lenet5", [b"x"] * 40_000)  # refused by the server, not by gRPC


def test_a_token_is_one_line(server: Running, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="a token is one line"):
        Client(server.url, token="tokA\ntokB")
    tokens = tmp_path / "tokens"
    tokens.write_text("tokA\ntokB\n")
    done = cli("models", "--url", server.url, "--token-file", str(tokens))
    assert done.returncode != 0
    assert (
        done.stderr.strip()
        == f"cnnserve models: error: --token-file {tokens} holds 2 tokens; give one"
    )
