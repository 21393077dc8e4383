"""Property tests over the wire: no input, however malformed, gets INTERNAL or UNKNOWN.

Every answer is OK or a deliberate status, the server stays healthy and its
memory stays bounded. `CNNSERVE_FUZZ_EXAMPLES` raises the case count (default
1,600 ModelInfer + 400 Classify cases).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from cnnserve.v1 import classification_pb2 as cpb
from cnnserve.v1 import classification_pb2_grpc as crpc
from cnnserve.v1 import grpc_service_pb2_grpc as rpc
from cnnserve.v1 import inference_pb2 as pb
from tests.servers import Running, server_in_thread
from tests.tiny import write_echo_bytes, write_tiny, write_tiny_image

EXAMPLES = int(os.environ.get("CNNSERVE_FUZZ_EXAMPLES", "2000"))
DELIBERATE = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
}
FUZZ = settings(
    max_examples=EXAMPLES * 4 // 5,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    repo = tmp_path_factory.mktemp("repo")
    write_tiny(repo)
    write_echo_bytes(repo)
    write_tiny_image(repo)
    with server_in_thread(repo, max_message_bytes=4 * 1024 * 1024) as running:
        yield running


@pytest.fixture(scope="module")
def channel(server: Running) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.url) as ch:
        yield ch


names = st.sampled_from(["tiny", "echo", "pixels", "", "nope", "../tiny", "/etc/passwd", "a\x00b"])
versions = st.sampled_from(["", "1", "2", "0", "-1", "x", "99999999999999999999"])
datatypes = st.sampled_from(["FP32", "BYTES", "INT64", "FP16", "BOOL", "UINT8", "", "FP8"])
dims = st.one_of(
    st.integers(-3, 6), st.sampled_from([2**31, 2**40, 2**62, -(2**62), 2**63 - 1, -(2**63)])
)
INT64 = st.integers(-(2**63), 2**63 - 1)
parameter = st.one_of(
    st.builds(pb.InferParameter, bool_param=st.booleans()),
    st.builds(pb.InferParameter, int64_param=INT64),
    st.builds(pb.InferParameter, string_param=st.text(max_size=8)),
    st.builds(pb.InferParameter, double_param=st.floats(allow_nan=True)),
    st.builds(pb.InferParameter, uint64_param=st.integers(0, 2**64 - 1)),
)
param_maps = st.dictionaries(
    st.sampled_from(["timeout", "priority", "classification", "binary_data", "x"]),
    parameter,
    max_size=3,
)


def length_prefixed(items: list[bytes]) -> bytes:
    return b"".join(len(i).to_bytes(4, "little") + i for i in items)


raw_blob = st.one_of(
    st.binary(max_size=96),
    st.just(np.ones((1, 4), np.float32).tobytes()),
    st.lists(st.binary(max_size=6), max_size=4).map(length_prefixed),
    st.binary(max_size=8).map(lambda b: b"\xff\xff\xff\x7f" + b),  # a length past the end
)


@st.composite
def infer_requests(draw: Any) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(
        model_name=draw(names), model_version=draw(versions), id=draw(st.text(max_size=4))
    )
    for key, value in draw(param_maps).items():
        request.parameters[key].CopyFrom(value)
    for _ in range(draw(st.integers(0, 3))):
        tensor = request.inputs.add(
            name=draw(st.sampled_from(["x", "s", "input", "", "y"])),
            datatype=draw(datatypes),
            shape=draw(st.lists(dims, max_size=5)),
        )
        if draw(st.booleans()):
            tensor.contents.fp32_contents.extend(draw(st.lists(st.floats(width=32), max_size=8)))
        if draw(st.booleans()):
            tensor.contents.int_contents.extend(
                draw(st.lists(st.integers(-(2**31), 2**31 - 1), max_size=8))
            )
        if draw(st.booleans()):
            tensor.contents.bytes_contents.extend(draw(st.lists(st.binary(max_size=4), max_size=4)))
        for key, value in draw(param_maps).items():
            tensor.parameters[key].CopyFrom(value)
    if draw(st.booleans()):
        request.raw_input_contents.extend(draw(st.lists(raw_blob, max_size=3)))
    for _ in range(draw(st.integers(0, 2))):
        out = request.outputs.add(name=draw(st.sampled_from(["y", "t", "logits", "nope"])))
        for key, value in draw(param_maps).items():
            out.parameters[key].CopyFrom(value)
    return request


def png(width: int, height: int, mode: str) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height)).save(buffer, "PNG")
    return buffer.getvalue()


images = st.one_of(
    st.binary(max_size=64),
    st.builds(
        png, st.integers(1, 40), st.integers(1, 40), st.sampled_from(["L", "RGB", "RGBA", "P", "1"])
    ),
    st.builds(png, st.integers(1, 40), st.integers(1, 40), st.just("L")).map(
        lambda b: b[: len(b) // 2]
    ),
)


def check(call: Any, request: Any) -> None:
    code, details = grpc.StatusCode.OK, ""
    try:
        call(request, timeout=10)
    except grpc.RpcError as exc:
        code, details = exc.code(), exc.details()
    assert code in DELIBERATE, (code, details, request)


def test_model_infer_never_fails_by_accident(server: Running, channel: grpc.Channel) -> None:
    stub = rpc.GRPCInferenceServiceStub(channel)
    before = rss_bytes()

    @FUZZ
    @given(infer_requests())
    def fuzz(request: pb.ModelInferRequest) -> None:
        check(stub.ModelInfer, request)

    fuzz()
    assert stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
    assert rss_bytes() - before < 300 * 1024 * 1024


def test_classify_never_fails_by_accident(server: Running, channel: grpc.Channel) -> None:
    stub = crpc.ImageClassifierStub(channel)

    @settings(FUZZ, max_examples=EXAMPLES // 5)
    @given(
        model=names,
        version=versions,
        batch=st.lists(images, max_size=4),
        top_k=st.integers(0, 2**32 - 1),
    )
    def fuzz(model: str, version: str, batch: list[bytes], top_k: int) -> None:
        request = cpb.ClassifyRequest(
            model_name=model, model_version=version, images=batch, top_k=top_k
        )
        check(stub.Classify, request)

    fuzz()
    good = cpb.ClassifyRequest(model_name="pixels", images=[png(8, 8, "L")], top_k=2)
    answer = stub.Classify(good, timeout=10)
    assert [len(r.classes) for r in answer.results] == [2]


def test_bytes_tensors_round_trip(channel: grpc.Channel) -> None:
    stub = rpc.GRPCInferenceServiceStub(channel)
    request = pb.ModelInferRequest(model_name="echo")
    request.inputs.add(name="s", datatype="BYTES", shape=[2, 2])
    request.raw_input_contents.append(length_prefixed([b"a", b"", b"ccc", b"dd"]))
    answer = stub.ModelInfer(request, timeout=10)
    assert answer.outputs[0].datatype == "BYTES"
    assert list(answer.outputs[0].shape) == [2, 2]
    assert answer.raw_output_contents[0] == length_prefixed([b"a", b"", b"ccc", b"dd"])


def test_oversized_message_is_refused(channel: grpc.Channel) -> None:
    stub = rpc.GRPCInferenceServiceStub(channel)
    request = pb.ModelInferRequest(model_name="tiny")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(b"\0" * (5 * 1024 * 1024))
    with pytest.raises(grpc.RpcError) as error:
        stub.ModelInfer(request, timeout=10)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
