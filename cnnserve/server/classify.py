"""`cnnserve.v1.ImageClassifier`: encoded images in, top-k labels out.

Each image is decoded and preprocessed in a bounded thread pool, as the
model's config `parameters` say (the same code the export stage trains and
verifies with). A call's images join the model's dynamic batcher as one
request of that many rows (one place in its queue, as in Triton), split across
batches where it does not fit one, so eight one-image calls and one
eight-image call end in the same batches.
Images over the byte or pixel limits are refused before they are decoded.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import numpy as np
from google.protobuf.message import DecodeError
from PIL import Image, UnidentifiedImageError

from cnnserve.preprocess import PreprocessParams, preprocess
from cnnserve.server.drain import Drain
from cnnserve.server.errors import (
    AnswerTooLarge,
    CnnserveError,
    InvalidInput,
    NotAllowed,
    ServerDraining,
)
from cnnserve.server.model import ModelVersion
from cnnserve.server.registry import Registry
from cnnserve.server.servicer import deadline_ns, too_large
from cnnserve.server.status import rpc
from cnnserve.v1 import classification_pb2 as pb
from cnnserve.v1 import classification_pb2_grpc

log = logging.getLogger(__name__)

DEFAULT_TOP_K = 5


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 40_000_000


def _decode(index: int, data: bytes, params: PreprocessParams, limits: ImageLimits) -> np.ndarray:
    """One image to the model's CHW float32 input; InvalidInput names the image and reason."""
    if not data:
        raise InvalidInput(f"image {index}: empty")
    if len(data) > limits.max_bytes:
        raise InvalidInput(f"image {index}: {len(data)} bytes, over the {limits.max_bytes} limit")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size  # read from the header, before any pixel is decoded
            if width * height > limits.max_pixels:
                raise InvalidInput(
                    f"image {index}: {width}x{height} pixels, over the {limits.max_pixels} limit"
                )
            # The shorter side is resized to `resize` before the crop: a thin strip of a few
            # pixels would become gigabytes there.
            resized = (
                params.resize * params.resize * max(width, height) // max(1, min(width, height))
            )
            if resized > limits.max_pixels:
                raise InvalidInput(
                    f"image {index}: {width}x{height} pixels is too thin: resized to "
                    f"{params.resize} on its shorter side it would be over the "
                    f"{limits.max_pixels}-pixel limit"
                )
            # MPO: a JPEG with more pictures after it (phone cameras write them); the
            # first is the photo.
            if image.format not in {"JPEG", "MPO", "PNG", "WEBP", "BMP"}:
                raise InvalidInput(f"image {index}: {image.format} is not JPEG, PNG, WebP or BMP")
            image.load()
            return preprocess(image, params)
    except UnidentifiedImageError:
        raise InvalidInput(f"image {index}: not a JPEG, PNG, WebP or BMP image") from None
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as exc:
        raise InvalidInput(f"image {index}: cannot decode ({exc})") from None


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max()
    e = np.exp(shifted)
    return e / e.sum()


class ClassifierServicer(classification_pb2_grpc.ImageClassifierServicer):
    def __init__(
        self,
        registry: Registry,
        drain: Drain,
        *,
        limits: ImageLimits,
        workers: int,
        request_log_rate: float = 0.0,
        max_message_bytes: int = 256 * 1024 * 1024,
    ) -> None:
        self.registry = registry
        self.limits = limits
        self.request_log_rate = request_log_rate
        self.max_message_bytes = max_message_bytes  # what gRPC lets the server send
        # Pillow's own decompression-bomb limit (a warning above about 179 million pixels,
        # an error above twice that) would overrule --max-image-pixels; `_decode` checks
        # the size from the header before any pixel is decoded instead.
        Image.MAX_IMAGE_PIXELS = None
        self.drain = drain
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="preprocess")

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    @staticmethod
    def _check(model: ModelVersion, top_k: int) -> tuple[PreprocessParams, int]:
        try:
            params = PreprocessParams.from_config(model.parameters)
        except ValueError as exc:
            raise NotAllowed(f"model {model.name!r} cannot classify images: {exc}") from None
        spec = model.inputs[0]
        want = (-1, params.channels, params.crop, params.crop)
        if len(model.inputs) != 1 or spec.datatype != "FP32" or not spec.matches(want):
            raise NotAllowed(f"model {model.name!r} does not take one {list(want)} FP32 image")
        classes = int(np.prod([d for d in model.outputs[0].shape[1:] if d > 0]))
        if top_k > classes:
            raise InvalidInput(f"top_k is {top_k}, but the model has {classes} classes")
        return params, top_k or min(DEFAULT_TOP_K, classes)

    async def _image(
        self, model: ModelVersion, index: int, data: bytes, params: PreprocessParams
    ) -> np.ndarray:
        started = time.perf_counter_ns()
        loop = asyncio.get_running_loop()
        array = await loop.run_in_executor(self._pool, _decode, index, data, params, self.limits)
        if model.series is not None:
            seconds = (time.perf_counter_ns() - started) / 1e9
            model.series.preprocess_duration.observe(seconds)
        return array

    async def classify(
        self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClassifyResponse:
        if not request.model_name:
            raise InvalidInput("model_name is empty")
        if not request.images:
            raise InvalidInput("no images to classify")
        with self.registry.request(
            request.model_name,
            request.model_version,
            request_id=request.id,
            log_rate=self.request_log_rate,
        ) as (model, seen):
            params, top_k = self._check(model, request.top_k)
            seen.deadline_ns = deadline_ns(context, None)  # a cancel after it is a timeout
            arrays = await asyncio.gather(
                *(self._image(model, i, data, params) for i, data in enumerate(request.images))
            )
            deadline = deadline_ns(context, model.default_timeout_us)  # the queue's from here
            batch = np.stack(arrays)
            del arrays
            result = await model.infer(
                {model.inputs[0].name: batch},
                len(batch),
                deadline,
                expire=bool(model.default_timeout_us),
            )
            response = pb.ClassifyResponse(
                model_name=model.name, model_version=str(model.version), id=request.id
            )
            labels = model.labels.get(model.output_names[0], [])
            for row in result.outputs[0]:
                probabilities = _softmax(row.reshape(-1))
                entry = response.results.add()
                for i in np.argsort(-probabilities, kind="stable")[:top_k]:
                    label = labels[i] if i < len(labels) else str(i)
                    entry.classes.add(index=int(i), label=label, score=float(probabilities[i]))
            size = response.ByteSize()
            if size > self.max_message_bytes:  # in a stream, gRPC would end it on this answer
                raise AnswerTooLarge(too_large(size, self.max_message_bytes))
            seen.succeeded(len(batch), [result])
            return response

    @rpc("Classify")
    async def Classify(
        self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClassifyResponse:
        return await self.classify(request, context)

    async def ClassifyStream(
        self, request_iterator: AsyncIterator[pb.ClassifyRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ClassifyStreamResponse]:
        """One answer per request, in order; an error answers that request only. A message
        that is not a ClassifyRequest ends the stream INVALID_ARGUMENT, and a shutdown ends
        it UNAVAILABLE (see `drain`), after the answer to the request it is running."""
        try:
            async for request in self.drain.requests(request_iterator):
                try:
                    answer = await self.classify(request, context)
                except CnnserveError as exc:
                    yield _stream_error(request, exc.code, str(exc))
                except Exception:  # a bug: this request fails, as a unary call would
                    log.exception("stream classification failed")
                    yield _stream_error(request, "INTERNAL", "internal error; see the server log")
                else:
                    yield pb.ClassifyStreamResponse(response=answer)
        except DecodeError as exc:
            why = f"a stream message is not a ClassifyRequest ({exc})"
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, why)
        except ServerDraining as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))


def _stream_error(
    request: pb.ClassifyRequest, code: str, message: str
) -> pb.ClassifyStreamResponse:
    failed = pb.ClassifyStreamResponse(error_code=code, error_message=message)
    failed.response.model_name = request.model_name
    failed.response.id = request.id
    return failed
