"""The domain's exceptions; `servicer` maps each to one gRPC status code.

    CnnserveError
    ├── ModelNotFound      NOT_FOUND          unknown model or version
    ├── InvalidInput       INVALID_ARGUMENT   wrong name, shape, datatype, size or image
    ├── QueueFull          RESOURCE_EXHAUSTED the model's queue is at max_queue_size
    ├── DeadlineExceeded   DEADLINE_EXCEEDED  the request's timeout passed while queued
    ├── ModelNotReady      UNAVAILABLE        loading, failed to load, or draining
    ├── ServerDraining     UNAVAILABLE        the server is shutting down
    ├── Unauthenticated    UNAUTHENTICATED    missing or wrong token
    ├── PermissionDenied   PERMISSION_DENIED  the token does not allow this call
    ├── NotAllowed         FAILED_PRECONDITION not in this mode (e.g. load outside explicit mode)
    ├── Unsupported        UNIMPLEMENTED      a protocol feature cnnserve does not offer
    └── ModelLoadError     (not sent to clients; recorded as the model's reason)

Anything else is a bug: the servicer answers INTERNAL and logs the traceback.
"""


class CnnserveError(Exception):
    """Base of every error the domain raises on purpose."""


class ModelNotFound(CnnserveError):
    pass


class InvalidInput(CnnserveError):
    pass


class QueueFull(CnnserveError):
    pass


class DeadlineExceeded(CnnserveError):
    pass


class ModelNotReady(CnnserveError):
    pass


class ServerDraining(CnnserveError):
    pass


class Unauthenticated(CnnserveError):
    pass


class PermissionDenied(CnnserveError):
    pass


class NotAllowed(CnnserveError):
    pass


class Unsupported(CnnserveError):
    pass


class ModelLoadError(CnnserveError):
    """A model version could not be loaded; the message is the reason shown in the index."""
