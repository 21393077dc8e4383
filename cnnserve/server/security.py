"""Transport security and caller authentication.

- TLS credentials are re-read when the certificate, key or client CA files
  change: gRPC asks for them at each new handshake, so a rotated certificate
  takes effect without a restart.
- `TokenAuth` checks `authorization: Bearer <token>` on every call, in
  constant time, against tokens re-read when their file changes. Health and
  reflection may stay open; repository control needs an admin token when one
  is configured (PERMISSION_DENIED for a valid non-admin token).
"""

from __future__ import annotations

import hmac
import logging
import os
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

from cnnserve.server.counting import method_name

log = logging.getLogger(__name__)

OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/")
ADMIN_METHODS = (
    "/inference.GRPCInferenceService/RepositoryModelLoad",
    "/inference.GRPCInferenceService/RepositoryModelUnload",
)
_RECHECK_SECS = 1.0


class WatchedFile:
    """A small file's content, re-read when its modification time or size changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._content = b""
        self._checked = 0.0
        self.read()

    def read(self) -> bytes:
        st = os.stat(self.path)
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            self._content = self.path.read_bytes()
            self._stamp = stamp
        return self._content

    def changed(self) -> bool:
        """True once after the file changed; checks the disk at most once a second."""
        now = time.monotonic()
        if now - self._checked < _RECHECK_SECS:
            return False
        self._checked = now
        before = self._stamp
        try:
            self.read()
        except OSError as exc:
            log.warning("cannot re-read %s: %s; keeping the previous content", self.path, exc)
            return False
        return self._stamp != before

    def current(self) -> bytes:
        """The content, re-read at most once a second; a file gone or unreadable keeps
        the last content it had."""
        self.changed()
        return self._content


def _tokens(file: WatchedFile) -> list[bytes]:
    return [line.strip() for line in file.current().splitlines() if line.strip()]


class ReloadingTLS:
    """A TLS server context whose certificate and key are re-read when their files change.

    The listening socket keeps one context; its `sni_callback` (which Python calls at
    every handshake, with or without SNI) hands the handshake the context made from the
    files as they are now. A rotation caught half done (a certificate without its key)
    keeps the previous pair until both files agree.
    """

    def __init__(self, cert: Path, key: Path) -> None:
        self._cert, self._key = cert, key
        self._files = [WatchedFile(cert), WatchedFile(key)]
        self._current = self._load()
        self.context = self._load()
        self.context.sni_callback = self._pick

    def _load(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self._cert, self._key)
        return context

    def _pick(self, connection: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> None:
        changed = [f.changed() for f in self._files]  # every file, so each records its stamp
        if any(changed):
            try:
                self._current = self._load()
                log.info("TLS files changed; new metrics connections use the new certificate")
            except (ssl.SSLError, OSError) as exc:
                log.warning("cannot load the changed TLS files (%s); keeping the previous", exc)
        connection.context = self._current


def server_credentials(cert: Path, key: Path, client_ca: Path | None) -> grpc.ServerCredentials:
    """TLS (mutual when a client CA is given) that picks up rotated files at the next handshake."""
    files = [WatchedFile(cert), WatchedFile(key)] + ([WatchedFile(client_ca)] if client_ca else [])

    def configuration() -> Any:
        ca = files[2].read() if len(files) == 3 else None
        return grpc.ssl_server_certificate_configuration(
            [(files[1].read(), files[0].read())], root_certificates=ca
        )

    def fetch() -> Any:
        changed = [f.changed() for f in files]  # every file, so each records its new stamp
        if any(changed):
            log.info("TLS files changed; new connections use the new certificate")
            return configuration()
        return None

    return grpc.dynamic_ssl_server_credentials(
        configuration(), fetch, require_client_authentication=client_ca is not None
    )


Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]


def _refusal(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> Any:
    async def unary(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    async def streaming(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, message)
        yield  # pragma: no cover - makes this an async generator

    kind = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    behaviour = streaming if handler.response_streaming else unary
    return kind(behaviour, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)  # fmt: skip


class TokenAuth(grpc.aio.ServerInterceptor):
    def __init__(
        self,
        token_file: Path | None,
        admin_file: Path | None,
        *,
        open_health: bool,
        refused: Callable[[str, grpc.StatusCode], None] | None = None,
    ) -> None:
        self._users = WatchedFile(token_file) if token_file else None
        self._admins = WatchedFile(admin_file) if admin_file else None
        self._open_health = open_health
        self._refused = refused

    @staticmethod
    def _presented(details: grpc.HandlerCallDetails) -> bytes | None:
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                text = value.decode() if isinstance(value, bytes) else value
                scheme, _, token = text.partition(" ")
                return token.strip().encode() if scheme.lower() == "bearer" else None
        return None

    @staticmethod
    def _matches(token: bytes, allowed: list[bytes]) -> bool:
        # Compare with every allowed token so the time taken does not tell which matched.
        found = False
        for candidate in allowed:
            found |= hmac.compare_digest(token, candidate)
        return found

    def check(self, details: grpc.HandlerCallDetails) -> tuple[grpc.StatusCode, str] | None:
        """None when the call may proceed, else the status and message to refuse it with."""
        method = details.method
        if self._open_health and method.startswith(OPEN_SERVICES):
            return None
        token = self._presented(details)
        # A configured file that holds no token (emptied during a rotation) lets nobody in.
        admins = _tokens(self._admins) if self._admins else None
        users = _tokens(self._users) if self._users else None
        is_admin = token is not None and admins is not None and self._matches(token, admins)
        if (
            users is not None
            and not is_admin
            and (token is None or not self._matches(token, users))
        ):
            return grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token"
        if method in ADMIN_METHODS and admins is not None and not is_admin:
            if token is None:
                return grpc.StatusCode.UNAUTHENTICATED, "repository control needs a bearer token"
            return grpc.StatusCode.PERMISSION_DENIED, "repository control needs the admin token"
        return None

    async def intercept_service(
        self, continuation: Continuation, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        refusal = self.check(details)
        if handler is None or refusal is None:
            return handler
        if self._refused is not None:
            self._refused(method_name(details.method), refusal[0])
        return _refusal(handler, *refusal)
