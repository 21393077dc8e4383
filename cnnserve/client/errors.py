"""The client's exceptions: one per gRPC status the server answers with.

    CnnserveClientError        any failed call; `.code` is the status name, `.details` the
    │                          server's message (str(error) is "CODE: details")
    ├── Unavailable            UNAVAILABLE: unreachable, draining, or the model not ready,
    │                          still so after the retries
    ├── NotFound               NOT_FOUND: unknown model or version
    ├── InvalidArgument        INVALID_ARGUMENT: wrong input or image; `.image_index`
    │                          names the refused image of a classify call, when known
    ├── DeadlineExceeded       DEADLINE_EXCEEDED: the timeout passed
    ├── ResourceExhausted      RESOURCE_EXHAUSTED: the model's queue is full
    ├── Unauthenticated        UNAUTHENTICATED: missing or wrong token
    ├── PermissionDenied       PERMISSION_DENIED: the token does not allow this call
    └── ProtocolError          a response this client cannot read (code "PROTOCOL")

Every other status (FAILED_PRECONDITION, UNIMPLEMENTED, INTERNAL...) is raised
as the base class with its code. Mistakes found before anything is sent (an
unsupported numpy dtype, an unknown input name) are ValueError or TypeError, and
an image file that cannot be read is OSError, as in any Python library.
"""

from __future__ import annotations

import re

import grpc

# The server's classify errors start "image N: reason" (cnnserve.server.classify).
_IMAGE_INDEX = re.compile(r"^image (\d+): ")


class CnnserveClientError(Exception):
    def __init__(self, code: str, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details


class Unavailable(CnnserveClientError):
    pass


class NotFound(CnnserveClientError):
    pass


class InvalidArgument(CnnserveClientError):
    @property
    def image_index(self) -> int | None:
        """The index of the refused image in a classify call, or None."""
        match = _IMAGE_INDEX.match(self.details)
        return int(match.group(1)) if match else None


class DeadlineExceeded(CnnserveClientError):
    pass


class ResourceExhausted(CnnserveClientError):
    pass


class Unauthenticated(CnnserveClientError):
    pass


class PermissionDenied(CnnserveClientError):
    pass


class ProtocolError(CnnserveClientError):
    def __init__(self, details: str) -> None:
        super().__init__("PROTOCOL", details)


_BY_CODE: dict[grpc.StatusCode, type[CnnserveClientError]] = {
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
}


def from_rpc_error(code: grpc.StatusCode, details: str | None) -> CnnserveClientError:
    """The exception for a failed call, from its status code and details."""
    return _BY_CODE.get(code, CnnserveClientError)(code.name, details or "")
