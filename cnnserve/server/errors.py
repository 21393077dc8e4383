"""The domain's exceptions, each with the gRPC status code name it is answered with.

    CnnserveError                              INTERNAL (only if raised bare)
    ├── ModelNotFound      NOT_FOUND           unknown model or version
    ├── InvalidInput       INVALID_ARGUMENT    wrong name, shape, datatype, size or image
    ├── QueueFull          RESOURCE_EXHAUSTED  the model's queue is at max_queue_size
    ├── AnswerTooLarge     RESOURCE_EXHAUSTED  an answer over --max-message-bytes
    ├── DeadlineExceeded   DEADLINE_EXCEEDED   the request's timeout passed while queued
    ├── ModelNotReady      UNAVAILABLE         loading, failed to load, or draining
    ├── ServerDraining     UNAVAILABLE         the server is shutting down
    ├── ModelLoadError     UNAVAILABLE         a version could not be loaded (the reason)
    ├── Unauthenticated    UNAUTHENTICATED     missing or wrong token
    ├── PermissionDenied   PERMISSION_DENIED   the token does not allow this call
    ├── NotAllowed         FAILED_PRECONDITION not in this mode, or not for this model
    └── Unsupported        UNIMPLEMENTED       a protocol feature cnnserve does not offer

`status.rpc` turns them into gRPC statuses; anything else is a bug, answered
INTERNAL with the traceback in the log. The code name, lower-cased, is also
the `outcome` label of the request metrics.
"""


class CnnserveError(Exception):
    """Base of every error the domain raises on purpose."""

    code = "INTERNAL"


class ModelNotFound(CnnserveError):
    code = "NOT_FOUND"


class InvalidInput(CnnserveError):
    code = "INVALID_ARGUMENT"


class QueueFull(CnnserveError):
    code = "RESOURCE_EXHAUSTED"


class AnswerTooLarge(CnnserveError):
    code = "RESOURCE_EXHAUSTED"


class DeadlineExceeded(CnnserveError):
    code = "DEADLINE_EXCEEDED"


class ModelNotReady(CnnserveError):
    code = "UNAVAILABLE"


class ServerDraining(CnnserveError):
    code = "UNAVAILABLE"


class ModelLoadError(CnnserveError):
    code = "UNAVAILABLE"


class Unauthenticated(CnnserveError):
    code = "UNAUTHENTICATED"


class PermissionDenied(CnnserveError):
    code = "PERMISSION_DENIED"


class NotAllowed(CnnserveError):
    code = "FAILED_PRECONDITION"


class Unsupported(CnnserveError):
    code = "UNIMPLEMENTED"
