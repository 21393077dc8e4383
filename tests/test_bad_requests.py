"""Malformed requests each get their deliberate status code, and the server stays healthy."""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeAlias

import grpc
import numpy as np
import pytest

from cnnserve.v1 import grpc_service_pb2_grpc as rpc
from cnnserve.v1 import inference_pb2 as pb
from tests.servers import Running, server_in_thread
from tests.tiny import TINY_WEIGHTS, write_slow, write_tiny

Code: TypeAlias = grpc.StatusCode
ROW = np.ones(4, np.float32).tobytes()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    repo = tmp_path_factory.mktemp("repo")
    write_tiny(repo)
    with server_in_thread(repo) as running:
        yield running


@pytest.fixture(scope="module")
def stub(server: Running) -> Iterator[rpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(server.url) as channel:
        yield rpc.GRPCInferenceServiceStub(channel)


def request(
    shape: tuple[int, ...] = (1, 4),
    raw: list[bytes] | None = None,
    datatype: str = "FP32",
    name: str = "x",
    model: str = "tiny",
    **fields: object,
) -> pb.ModelInferRequest:
    r = pb.ModelInferRequest(model_name=model, **fields)  # type: ignore[arg-type]
    r.inputs.add(name=name, datatype=datatype, shape=shape)
    r.raw_input_contents.extend([ROW * shape[0]] if raw is None else raw)
    return r


def typed_and_raw() -> pb.ModelInferRequest:
    r = request()
    r.inputs[0].contents.fp32_contents.extend([1, 2, 3, 4])
    return r


def typed_wrong_count() -> pb.ModelInferRequest:
    r = request(raw=[])
    r.inputs[0].contents.fp32_contents.extend([1, 2, 3])
    return r


def typed_wrong_field() -> pb.ModelInferRequest:
    r = request(raw=[])
    r.inputs[0].contents.int_contents.extend([1, 2, 3, 4])
    return r


def with_param(key: str, **value: object) -> pb.ModelInferRequest:
    r = request()
    r.parameters[key].CopyFrom(pb.InferParameter(**value))  # type: ignore[arg-type]
    return r


def unknown_output() -> pb.ModelInferRequest:
    r = request()
    r.outputs.add(name="nope")
    return r


def zero_classification() -> pb.ModelInferRequest:
    r = request()
    r.outputs.add(name="y").parameters["classification"].int64_param = 0
    return r


def two_inputs_same_name() -> pb.ModelInferRequest:
    r = request()
    r.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    r.raw_input_contents.append(ROW)
    return r


def output_twice() -> pb.ModelInferRequest:
    r = request()
    r.outputs.add(name="y")
    r.outputs.add(name="y").parameters["classification"].int64_param = 2
    return r


def in_shared_memory(where: str) -> pb.ModelInferRequest:
    """A tensor placed in a shared-memory region, which cnnserve never registers."""
    r = request(raw=[]) if where == "input" else request()
    tensor = r.inputs[0] if where == "input" else r.outputs.add(name="y")
    tensor.parameters["shared_memory_region"].string_param = "region0"
    tensor.parameters["shared_memory_byte_size"].int64_param = 16
    return r


CASES: list[tuple[str, Callable[[], pb.ModelInferRequest], Code, str]] = [
    ("unknown model", lambda: request(model="nope"), Code.NOT_FOUND, "unknown model"),
    ("empty model name", lambda: request(model=""), Code.INVALID_ARGUMENT, "model_name"),
    ("unknown version", lambda: request(model_version="9"), Code.NOT_FOUND, "version 9"),
    ("bad version", lambda: request(model_version="v1"), Code.INVALID_ARGUMENT, "version"),
    ("superscript version", lambda: request(model_version="²"), Code.INVALID_ARGUMENT, "version"),
    ("unknown input", lambda: request(name="z"), Code.INVALID_ARGUMENT, "unknown input"),
    ("missing input", lambda: pb.ModelInferRequest(model_name="tiny"), Code.INVALID_ARGUMENT,
     "missing inputs"),
    ("wrong datatype", lambda: request(datatype="INT32"), Code.INVALID_ARGUMENT, "datatype"),
    ("unknown datatype", lambda: request(datatype="FP8"), Code.INVALID_ARGUMENT, "datatype"),
    ("wrong rank", lambda: request(shape=(4,), raw=[ROW]), Code.INVALID_ARGUMENT, "shape"),
    ("wrong width", lambda: request(shape=(1, 5), raw=[ROW]), Code.INVALID_ARGUMENT, "shape"),
    ("negative dim", lambda: request(shape=(-1, 4)), Code.INVALID_ARGUMENT, "negative"),
    ("zero rows", lambda: request(shape=(0, 4), raw=[b""]), Code.INVALID_ARGUMENT, "batch size"),
    ("over max batch", lambda: request(shape=(9, 4)), Code.INVALID_ARGUMENT, "batch size 9"),
    ("huge declared shape", lambda: request(shape=(1 << 40, 4), raw=[ROW]),
     Code.INVALID_ARGUMENT, "too large"),
    ("short raw", lambda: request(raw=[ROW[:-1]]), Code.INVALID_ARGUMENT, "15 bytes"),
    ("long raw", lambda: request(raw=[ROW + b"x"]), Code.INVALID_ARGUMENT, "17 bytes"),
    ("raw count", lambda: request(raw=[ROW, ROW]), Code.INVALID_ARGUMENT, "raw_input_contents"),
    ("typed and raw", typed_and_raw, Code.INVALID_ARGUMENT, "not both"),
    ("typed count", typed_wrong_count, Code.INVALID_ARGUMENT, "3 values"),
    ("typed field", typed_wrong_field, Code.INVALID_ARGUMENT,
     "input 'x' is FP32: its values go in fp32_contents, not int_contents"),
    ("duplicate input", two_inputs_same_name, Code.INVALID_ARGUMENT, "twice"),
    ("unknown output", unknown_output, Code.INVALID_ARGUMENT, "unknown output"),
    ("output twice", output_twice, Code.INVALID_ARGUMENT, "output 'y' is requested twice"),
    ("input in shared memory", lambda: in_shared_memory("input"), Code.INVALID_ARGUMENT,
     "shared memory region 'region0' is not registered"),
    ("output in shared memory", lambda: in_shared_memory("output"), Code.INVALID_ARGUMENT,
     "shared memory region 'region0' is not registered"),
    ("classification 0", zero_classification, Code.INVALID_ARGUMENT, "classification"),
    ("timeout as string", lambda: with_param("timeout", string_param="1s"),
     Code.INVALID_ARGUMENT, "timeout"),
    ("negative timeout", lambda: with_param("timeout", int64_param=-5),
     Code.INVALID_ARGUMENT, "negative"),
    ("priority as bool", lambda: with_param("priority", bool_param=True),
     Code.INVALID_ARGUMENT, "priority"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "make", "code", "words"), CASES, ids=[c[0] for c in CASES])
def test_bad_request_gets_its_status(
    stub: rpc.GRPCInferenceServiceStub,
    case: str,
    make: Callable[[], pb.ModelInferRequest],
    code: Code,
    words: str,
) -> None:
    with pytest.raises(grpc.RpcError) as error:
        stub.ModelInfer(make(), timeout=10)
    assert error.value.code() == code, error.value.details()
    assert words in error.value.details()


def test_expired_timeout_parameter_is_deadline_exceeded(stub: rpc.GRPCInferenceServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as error:
        stub.ModelInfer(with_param("timeout", int64_param=1), timeout=10)
    assert error.value.code() == Code.DEADLINE_EXCEEDED


def test_bytes_input_with_truncated_length_is_refused() -> None:
    from cnnserve.server.converters import _split_bytes
    from cnnserve.server.errors import InvalidInput

    good = struct.pack("<I", 3) + b"abc" + struct.pack("<I", 0)
    assert _split_bytes(good, 2, "s") == [b"abc", b""]
    for bad in (good[:-1], good + b"x", struct.pack("<I", 99) + b"abc"):
        with pytest.raises(InvalidInput):
            _split_bytes(bad, 2, "s")


def test_server_still_answers_correctly_after_bad_requests(
    stub: rpc.GRPCInferenceServiceStub,
) -> None:
    for _, make, _, _ in CASES:
        with pytest.raises(grpc.RpcError):
            stub.ModelInfer(make(), timeout=10)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    answer = stub.ModelInfer(request(shape=(2, 4), raw=[x.tobytes()]), timeout=10)
    y = np.frombuffer(answer.raw_output_contents[0], np.float32).reshape(2, 3)
    np.testing.assert_allclose(y, x @ TINY_WEIGHTS, rtol=1e-5, atol=1e-6)
    assert stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready


def test_typed_contents_are_accepted(stub: rpc.GRPCInferenceServiceStub) -> None:
    r = request(raw=[])
    r.inputs[0].contents.fp32_contents.extend([1, 2, 3, 4])
    answer = stub.ModelInfer(r, timeout=10)
    y = np.frombuffer(answer.raw_output_contents[0], np.float32)
    np.testing.assert_allclose(y, np.array([1, 2, 3, 4], np.float32) @ TINY_WEIGHTS, rtol=1e-5)


def test_queue_full_is_resource_exhausted_at_once(tmp_path: Path) -> None:
    config = """
max_batch_size: 1
input { name: "x" data_type: TYPE_FP32 dims: [4] }
output { name: "y" data_type: TYPE_FP32 dims: [3] }
dynamic_batching { max_queue_delay_microseconds: 200000 default_queue_policy { max_queue_size: 2 } }
"""
    write_slow(tmp_path, "tiny", config)
    with server_in_thread(tmp_path) as running, grpc.insecure_channel(running.url) as channel:
        stub = rpc.GRPCInferenceServiceStub(channel)
        pending = [stub.ModelInfer.future(request(), timeout=30) for _ in range(12)]
        codes, details = [], set()
        for call in pending:
            try:
                call.result()
                codes.append(Code.OK)
            except grpc.RpcError as exc:
                codes.append(exc.code())
                details.add(exc.details())
        assert details == {"queue is full (2 requests)"}
        assert Code.RESOURCE_EXHAUSTED in codes
        assert Code.OK in codes
        assert set(codes) <= {Code.OK, Code.RESOURCE_EXHAUSTED}


@pytest.mark.parametrize("action", ["REJECT", "DELAY"])
def test_queue_policy_timeout_applies_to_requests_without_their_own(
    tmp_path: Path, action: str
) -> None:
    """REJECT (the default) fails a request still queued at the timeout; DELAY runs it."""
    config = f"""
max_batch_size: 1
input {{ name: "x" data_type: TYPE_FP32 dims: [4] }}
output {{ name: "y" data_type: TYPE_FP32 dims: [3] }}
dynamic_batching {{
  default_queue_policy {{ default_timeout_microseconds: 1000 timeout_action: {action} }}
}}
"""
    write_slow(tmp_path, "tiny", config, layers=32, width=1024)
    with server_in_thread(tmp_path) as running, grpc.insecure_channel(running.url) as channel:
        stub = rpc.GRPCInferenceServiceStub(channel)
        calls = [stub.ModelInfer.future(request(), timeout=60) for _ in range(6)]
        codes = [call.exception().code() if call.exception() else Code.OK for call in calls]
    if action == "DELAY":
        assert codes == [Code.OK] * 6
        return
    assert Code.OK in codes
    assert Code.DEADLINE_EXCEEDED in codes
    assert set(codes) <= {Code.OK, Code.DEADLINE_EXCEEDED}


def test_an_answer_over_the_message_limit_fails_alone_in_a_stream(tmp_path: Path) -> None:
    """gRPC ends a whole stream on a message over its send limit, so such an answer is an
    error message for its own request, and the stream goes on."""
    import io

    from PIL import Image

    from cnnserve.v1 import classification_pb2 as cpb
    from cnnserve.v1 import classification_pb2_grpc as crpc
    from tests.tiny import write_tiny_image

    model = write_tiny_image(tmp_path)
    (model / "labels.txt").write_text("".join(f"{c * 200}\n" for c in "abc"))  # long answers
    buffer = io.BytesIO()
    Image.new("L", (8, 8)).save(buffer, "PNG")
    image = buffer.getvalue()
    rows = np.zeros((16, 1, 8, 8), np.float32)

    def infer(count: int, tag: str) -> pb.ModelInferRequest:
        r = pb.ModelInferRequest(model_name="pixels", id=tag)
        r.inputs.add(name="input", datatype="FP32", shape=[count, 1, 8, 8])
        r.raw_input_contents.append(rows[:count].tobytes())
        r.outputs.add(name="logits").parameters["classification"].int64_param = 3
        return r

    with (
        server_in_thread(tmp_path, max_message_bytes=8192) as running,
        grpc.insecure_channel(running.url) as channel,
    ):
        # 16 rows of 3 classes with 200-byte labels: about 10 KB answered for 4 KB asked.
        answers = list(rpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(
            iter([infer(16, "big"), infer(1, "small")]), timeout=30
        ))  # fmt: skip
        assert answers[0].error_message.startswith("[RESOURCE_EXHAUSTED] the answer is ")
        assert "over the server's --max-message-bytes 8192" in answers[0].error_message
        assert answers[0].infer_response.id == "big"
        assert not answers[1].error_message
        assert answers[1].infer_response.id == "small"

        def classify(count: int, tag: str) -> cpb.ClassifyRequest:
            return cpb.ClassifyRequest(model_name="pixels", images=[image] * count, top_k=3, id=tag)

        classifier = crpc.ImageClassifierStub(channel)
        replies = list(classifier.ClassifyStream(iter([classify(16, "big"), classify(1, "small")])))
        assert replies[0].error_code == "RESOURCE_EXHAUSTED"
        assert replies[0].response.id == "big"
        assert not replies[1].error_code
        assert len(replies[1].response.results) == 1
        with pytest.raises(grpc.RpcError) as error:
            classifier.Classify(classify(16, "unary"), timeout=30)
        assert error.value.code() == Code.RESOURCE_EXHAUSTED
        assert "--max-message-bytes 8192" in (error.value.details() or "")


def test_the_image_pixel_limit_is_the_servers_own(tmp_path: Path) -> None:
    """Raised above Pillow's built-in limit (about 179 million pixels), --max-image-pixels
    still decides: images are judged by the size in their header."""
    import zlib

    from cnnserve.v1 import classification_pb2 as cpb
    from cnnserve.v1 import classification_pb2_grpc as crpc
    from tests.tiny import write_tiny_image

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc

    def declared_png(width: int, height: int) -> bytes:
        """A PNG that declares its size but carries one row (the rest decode as zeros)."""
        header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
        data = zlib.compress(bytes(width + 1))  # one row of the many declared
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data)

    write_tiny_image(tmp_path)
    with (
        server_in_thread(tmp_path, max_image_pixels=300_000_000) as running,
        grpc.insecure_channel(running.url) as channel,
    ):
        classify = crpc.ImageClassifierStub(channel).Classify

        def request(width: int, height: int) -> cpb.ClassifyRequest:
            return cpb.ClassifyRequest(model_name="pixels", images=[declared_png(width, height)])

        allowed = classify(request(20000, 10000), timeout=60)  # 200 million pixels
        assert len(allowed.results) == 1
        with pytest.raises(grpc.RpcError) as error:
            classify(request(20000, 20000), timeout=30)
        assert error.value.code() == Code.INVALID_ARGUMENT
        assert error.value.details() == "image 0: 20000x20000 pixels, over the 300000000 limit"


def test_a_call_past_its_grpc_deadline_is_counted_as_deadline_exceeded(tmp_path: Path) -> None:
    """gRPC cancels the handler at the deadline, or the queue drops the request then: either
    way the metrics say DEADLINE_EXCEEDED, never CANCELLED or UNKNOWN."""
    config = """
max_batch_size: 1
input { name: "x" data_type: TYPE_FP32 dims: [4] }
output { name: "y" data_type: TYPE_FP32 dims: [3] }
dynamic_batching { }
"""
    write_slow(tmp_path, "tiny", config, layers=48, width=2048)  # tens of ms a request
    with server_in_thread(tmp_path) as running, grpc.insecure_channel(running.url) as channel:
        stub = rpc.GRPCInferenceServiceStub(channel)
        registry = running.server.metrics.registry

        def by(name: str, label: str) -> dict[str, float]:
            return {
                sample.labels[label]: sample.value
                for metric in registry.collect()
                for sample in metric.samples
                if sample.name == name and sample.labels.get(label) and sample.value
                and sample.labels.get("method", "ModelInfer") == "ModelInfer"
            }  # fmt: skip

        stub.ModelInfer(request(), timeout=30)  # warm
        ahead = [stub.ModelInfer.future(request(), timeout=30) for _ in range(12)]
        while not by("cnnserve_inference_requests_total", "outcome").get("success", 0) > 1:
            time.sleep(0.005)  # the queue is busy: the next call waits behind 10 others
        with pytest.raises(grpc.RpcError) as late:
            stub.ModelInfer(request(), timeout=0.05)
        assert late.value.code() == Code.DEADLINE_EXCEEDED
        for call in ahead:
            call.result()
        time.sleep(0.2)  # the server notes a cancel just after the client
        outcomes = by("cnnserve_inference_requests_total", "outcome")
        assert outcomes == {"success": 13, "deadline_exceeded": 1}
        assert by("cnnserve_grpc_requests_total", "code") == {"OK": 13, "DEADLINE_EXCEEDED": 1}


def test_a_classify_call_past_its_deadline_while_decoding_is_deadline_exceeded(
    tmp_path: Path,
) -> None:
    import io

    from PIL import Image

    from cnnserve.v1 import classification_pb2 as cpb
    from cnnserve.v1 import classification_pb2_grpc as crpc
    from tests.tiny import write_tiny_image

    write_tiny_image(tmp_path)
    buffer = io.BytesIO()
    Image.new("RGB", (6000, 6000), (90, 120, 30)).save(buffer, "PNG")  # slow to decode
    request = cpb.ClassifyRequest(model_name="pixels", images=[buffer.getvalue()])
    with server_in_thread(tmp_path) as running, grpc.insecure_channel(running.url) as channel:
        with pytest.raises(grpc.RpcError) as error:
            crpc.ImageClassifierStub(channel).Classify(request, timeout=0.05)
        assert error.value.code() == Code.DEADLINE_EXCEEDED
        registry = running.server.metrics.registry
        late = {"model": "pixels", "version": "1", "outcome": "deadline_exceeded"}
        give_up = time.monotonic() + 10
        while time.monotonic() < give_up:  # the server notes the cancel after the client
            if registry.get_sample_value("cnnserve_inference_requests_total", late):
                break
            time.sleep(0.05)
        assert registry.get_sample_value("cnnserve_inference_requests_total", late) == 1


def test_a_thin_image_that_resizing_would_blow_up_is_refused(tmp_path: Path) -> None:
    """Its shorter side is resized up before the crop: 1x8000 pixels would become 8x64000
    for this model, 256x2048000 (gigabytes) for an ImageNet one."""
    import io

    from PIL import Image

    from cnnserve.v1 import classification_pb2 as cpb
    from cnnserve.v1 import classification_pb2_grpc as crpc
    from tests.tiny import write_tiny_image

    write_tiny_image(tmp_path)  # resize 8, crop 8
    buffer = io.BytesIO()
    Image.new("L", (1, 8000)).save(buffer, "PNG")
    request = cpb.ClassifyRequest(model_name="pixels", images=[buffer.getvalue()])
    with (
        server_in_thread(tmp_path, max_image_pixels=100_000) as running,
        grpc.insecure_channel(running.url) as channel,
    ):
        with pytest.raises(grpc.RpcError) as error:
            crpc.ImageClassifierStub(channel).Classify(request, timeout=30)
        assert error.value.code() == Code.INVALID_ARGUMENT
        assert (error.value.details() or "").startswith("image 0: 1x8000 pixels is too thin")


def test_a_stream_message_that_does_not_parse_ends_the_stream_invalid_argument(
    tmp_path: Path,
) -> None:
    """The answers to the messages before it still come; the stream then ends with a status
    (it used to hang, dropping the messages after)."""
    from cnnserve.v1 import classification_pb2 as cpb

    write_tiny(tmp_path)
    good = request().SerializeToString()
    with server_in_thread(tmp_path) as running, grpc.insecure_channel(running.url) as channel:
        infer = channel.stream_stream(
            "/inference.GRPCInferenceService/ModelStreamInfer",
            request_serializer=None,  # bytes as they are
            response_deserializer=pb.ModelStreamInferResponse.FromString,
        )
        answers: list[pb.ModelStreamInferResponse] = []
        call = infer(iter([good] * 3 + [b"\xff\xff\xff\xff"] + [good] * 2), timeout=10)
        with pytest.raises(grpc.RpcError) as error:
            answers.extend(call)
        assert error.value.code() == Code.INVALID_ARGUMENT
        assert "not a ModelInferRequest" in (error.value.details() or "")
        assert len(answers) == 3
        assert not any(a.error_message for a in answers)
        classify = channel.stream_stream(
            "/cnnserve.v1.ImageClassifier/ClassifyStream",
            request_serializer=None,
            response_deserializer=cpb.ClassifyStreamResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as error:
            list(classify(iter([b"\xff\xff\xff\xff"]), timeout=10))
        assert error.value.code() == Code.INVALID_ARGUMENT


def test_a_stream_whose_answers_are_not_read_stops_being_read(tmp_path: Path) -> None:
    """Answers of 80 KB that the client never reads: the server reads a window of requests
    and then waits, instead of computing all of them into its memory."""
    import onnx
    from onnx import TensorProto, helper

    from cnnserve.server.servicer import STREAM_WINDOW

    graph = helper.make_graph(
        [helper.make_node("Tile", ["x", "reps"], ["y"])],
        "wide",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 20000])],
        [helper.make_tensor("reps", TensorProto.INT64, [2], [1, 5000])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    (tmp_path / "wide" / "1").mkdir(parents=True)
    onnx.save(model, tmp_path / "wide" / "1" / "model.onnx")
    sent = 3 * STREAM_WINDOW
    with server_in_thread(tmp_path) as running, grpc.insecure_channel(running.url) as channel:
        stream = rpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(
            iter([request(model="wide")] * sent), timeout=60
        )
        time.sleep(3)  # the client reads nothing meanwhile
        computed = running.server.registry.get("wide").stats.inference_count
        assert computed < 2 * STREAM_WINDOW, computed
        assert sum(1 for _ in stream) == sent  # and, read, every answer comes


def test_phone_photos_classify_whatever_their_exif_or_extra_pictures(tmp_path: Path) -> None:
    """A JPEG whose EXIF says to turn it but holds a malformed tag beside that (the turn
    used to rewrite the EXIF and fail INTERNAL, ending a ClassifyStream), and a JPEG with
    more pictures after it (MPO, as phone cameras write), classify as their upright twin."""
    import io

    from PIL import Image

    from cnnserve.v1 import classification_pb2 as cpb
    from cnnserve.v1 import classification_pb2_grpc as crpc
    from tests.tiny import write_tiny_image

    upright = Image.new("L", (8, 8), 250)
    upright.paste(0, (0, 0, 8, 3))  # a dark band at the top

    def encoded(image: Image.Image, fmt: str, **options: object) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, fmt, quality=100, **options)
        return buffer.getvalue()

    # TIFF IFD0 with two entries: ImageWidth (0x0100) stored as ASCII text, which it
    # never is, and Orientation (0x0112) 6: turn 90 degrees clockwise to view.
    ifd = struct.pack("<H", 2) + struct.pack("<HHII", 0x0100, 2, 6, 38)
    ifd += struct.pack("<HHIHH", 0x0112, 3, 1, 6, 0) + struct.pack("<I", 0)
    exif = b"Exif\x00\x00" + b"II*\x00" + struct.pack("<I", 8) + ifd + b"Canon\x00"
    stored = encoded(upright.transpose(Image.Transpose.ROTATE_90), "JPEG")
    turned = stored[:2] + b"\xff\xe1" + struct.pack(">H", len(exif) + 2) + exif + stored[2:]
    mpo = encoded(upright, "MPO", save_all=True, append_images=[Image.new("L", (8, 8))])
    assert Image.open(io.BytesIO(mpo)).format == "MPO"

    def ask(image: bytes) -> cpb.ClassifyRequest:
        return cpb.ClassifyRequest(model_name="pixels", images=[image], top_k=3)

    write_tiny_image(tmp_path)
    with server_in_thread(tmp_path) as running, grpc.insecure_channel(running.url) as channel:
        stub = crpc.ImageClassifierStub(channel)
        want = stub.Classify(ask(encoded(upright, "JPEG")), timeout=30).results[0]
        for image in (turned, mpo):
            got = stub.Classify(ask(image), timeout=30).results[0]
            assert [c.index for c in got.classes] == [c.index for c in want.classes]
            for a, b in zip(got.classes, want.classes, strict=True):
                assert a.score == pytest.approx(b.score, abs=0.02)
        answers = list(stub.ClassifyStream(iter([ask(turned)] * 3), timeout=30))
        assert [a.error_code for a in answers] == ["", "", ""]
