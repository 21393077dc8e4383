"""`Client`: the blocking client, one gRPC channel shared by every call.

A channel is safe to use from many threads, so one `Client` can serve a
thread pool (see the README's folder example). Each method is one RPC of
`inference.GRPCInferenceService` or `cnnserve.v1.ImageClassifier`, wrapped by
`_call`, which adds the token, the deadline and the retries on UNAVAILABLE.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Self

import grpc

from cnnserve.client import protocol
from cnnserve.client.connection import BaseClient, remaining
from cnnserve.client.errors import InvalidArgument, NotFound, Unavailable, from_rpc_error
from cnnserve.client.protocol import ImageLike, Inputs, Version
from cnnserve.client.results import ClassifiedImage, InferResult, ModelInfo
from cnnserve.v1 import classification_pb2_grpc, grpc_service_pb2_grpc
from cnnserve.v1 import inference_pb2 as pb


class Client(BaseClient):
    __doc__ = "A blocking cnnserve client; a context manager.\n" + (BaseClient.__doc__ or "")

    def _open(self) -> None:
        c = self._connection
        if c.credentials is None:
            self._channel = grpc.insecure_channel(c.url, options=c.options)
        else:
            self._channel = grpc.secure_channel(c.url, c.credentials, options=c.options)
        self._inference = grpc_service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        self._classifier = classification_pb2_grpc.ImageClassifierStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _call(self, method: Callable[..., Any], request: Any, timeout: float | None) -> Any:
        deadline = self._connection.deadline(timeout)
        attempt = 0
        while True:
            try:
                return method(
                    request, timeout=remaining(deadline), metadata=self._connection.metadata
                )
            except grpc.RpcError as exc:
                code, details = exc.code(), exc.details()
            delay = self._connection.retry.delay(attempt, code, remaining(deadline))
            if delay is None:
                raise from_rpc_error(code, details)
            time.sleep(delay)
            attempt += 1

    # -- health and metadata ----------------------------------------------------------

    def is_live(self, *, timeout: float | None = None) -> bool:
        return bool(self._call(self._inference.ServerLive, pb.ServerLiveRequest(), timeout).live)

    def is_ready(
        self, model: str | None = None, version: Version = "", *, timeout: float | None = None
    ) -> bool:
        """The server's readiness, or one model's (False for a model it does not know)."""
        version = str(version)
        if model is None:
            request: Any = pb.ServerReadyRequest()
            return bool(self._call(self._inference.ServerReady, request, timeout).ready)
        request = pb.ModelReadyRequest(name=model, version=version)
        return bool(self._call(self._inference.ModelReady, request, timeout).ready)

    def metadata(
        self,
        model: str,
        version: Version = "",
        *,
        as_json: bool = False,
        timeout: float | None = None,
    ) -> Any:
        """ModelMetadataResponse: versions, inputs and outputs (names, datatypes, shapes)."""
        version = str(version)
        request = pb.ModelMetadataRequest(name=model, version=version)
        response = self._call(self._inference.ModelMetadata, request, timeout)
        self._remember_names(model, version, response)
        return protocol.to_json(response) if as_json else response

    def config(
        self,
        model: str,
        version: Version = "",
        *,
        as_json: bool = False,
        timeout: float | None = None,
    ) -> Any:
        """The ModelConfig in use, with `parameters["execution_provider"]` filled in."""
        version = str(version)
        request = pb.ModelConfigRequest(name=model, version=version)
        config = self._call(self._inference.ModelConfig, request, timeout).config
        return protocol.to_json(config) if as_json else config

    def statistics(
        self,
        model: str = "",
        version: Version = "",
        *,
        as_json: bool = False,
        timeout: float | None = None,
    ) -> Any:
        """Triton's cumulative counts and durations (all models by default)."""
        version = str(version)
        request = pb.ModelStatisticsRequest(name=model, version=version)
        response = self._call(self._inference.ModelStatistics, request, timeout)
        return protocol.to_json(response) if as_json else response

    def models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        """Every model in the repository, with its state, reason and execution provider."""
        deadline = self._connection.deadline(timeout)  # the whole call's, retries included
        request = pb.RepositoryIndexRequest()
        index = self._call(self._inference.RepositoryIndex, request, remaining(deadline))
        providers = {}
        for m in index.models:
            if m.state == "READY":
                config = pb.ModelConfigRequest(name=m.name, version=m.version)
                try:
                    response = self._call(self._inference.ModelConfig, config, remaining(deadline))
                except (NotFound, Unavailable):
                    continue  # unloaded since the index was read
                providers[(m.name, m.version)] = protocol.provider_of(response)
        return protocol.model_infos(index, providers)

    # -- inference --------------------------------------------------------------------

    def _io_names(
        self, model: str, version: str, timeout: float | None
    ) -> tuple[list[str], list[str]]:
        names = self._names.get((model, version))
        if names is None:
            request = pb.ModelMetadataRequest(name=model, version=version)
            response = self._call(self._inference.ModelMetadata, request, timeout)
            names = self._remember_names(model, version, response)
        return names

    def infer(
        self,
        model: str,
        inputs: Inputs,
        *,
        version: Version = "",
        outputs: Sequence[str] | None = None,
        class_count: int = 0,
        request_id: str = "",
        timeout: float | None = None,
    ) -> InferResult:
        """Run a model on numpy arrays: a dict by input name, or a list in the model's order.

        `outputs` limits the answer to those outputs; `class_count` > 0 asks for
        Triton's classification instead of the scores: BYTES "score:index:label".
        """
        deadline = self._connection.deadline(timeout)  # metadata look-ups included
        version = str(version)
        names = None
        if not isinstance(inputs, Mapping):
            names = self._io_names(model, version, remaining(deadline))[0]
        if class_count and outputs is None:
            outputs = self._io_names(model, version, remaining(deadline))[1]
        request = protocol.infer_request(
            model,
            protocol.named_inputs(inputs, names),
            version=version,
            outputs=outputs,
            class_count=class_count,
            request_id=request_id,
        )
        response = self._call(self._inference.ModelInfer, request, remaining(deadline))
        return protocol.infer_result(response)

    def classify(
        self,
        model: str,
        images: ImageLike | Iterable[ImageLike],
        *,
        top_k: int = 0,
        version: Version = "",
        timeout: float | None = None,
    ) -> list[ClassifiedImage]:
        """The top-k classes of each image (paths, encoded bytes or PIL images), in order.

        `top_k` 0 is the server's default: 5, or the class count when the model has fewer.

        Images beyond one message's size go in further calls; `timeout` is per call.
        A refused image raises InvalidArgument, whose `image_index` names it.
        """
        version = str(version)
        encoded = [protocol.encode_image(i) for i in protocol.one_or_many(images)]
        results: list[ClassifiedImage] = []
        for start, end in protocol.chunks(encoded, self._connection.classify_budget):
            request = protocol.classify_request(model, encoded[start:end], top_k, version)
            try:
                response = self._call(self._classifier.Classify, request, timeout)
            except InvalidArgument as exc:
                raise protocol.shift_image_error(exc, start) from None
            results += protocol.classified(response)
        return results
