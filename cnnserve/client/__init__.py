"""`cnnserve.client`: a Python client for cnnserve, and the CLI commands that use it.

    from cnnserve.client import Client

    with Client("localhost:8001") as client:
        for image in client.classify("resnet18", ["cat.jpg", "dog.png"]):
            print(image.top.label, image.top.score)

`Client` blocks; `AsyncClient` has the same methods as coroutines. Both speak
the Open Inference Protocol (`infer`, `metadata`, `config`, `statistics`,
`models`, `is_ready`) and cnnserve's image classification (`classify`). Errors
are `CnnserveClientError` subclasses; the tree is in `cnnserve.client.errors`.
"""

from cnnserve.client.aio import AsyncClient
from cnnserve.client.connection import KeepAlive
from cnnserve.client.errors import (
    CnnserveClientError,
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ProtocolError,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from cnnserve.client.results import ClassifiedImage, ClassScore, InferResult, ModelInfo
from cnnserve.client.sync import Client

__all__ = [
    "AsyncClient",
    "ClassScore",
    "ClassifiedImage",
    "Client",
    "CnnserveClientError",
    "DeadlineExceeded",
    "InferResult",
    "InvalidArgument",
    "KeepAlive",
    "ModelInfo",
    "NotFound",
    "PermissionDenied",
    "ProtocolError",
    "ResourceExhausted",
    "Unauthenticated",
    "Unavailable",
]
