"""How both clients reach the server: channel options, credentials, token and retries.

- Messages up to `max_message_bytes` both ways (256 MiB, the server's default:
  a batch of 224x224 float images is large).
- Keepalive pings only while calls are in flight, every 5 minutes by default:
  gRPC servers count faster pings on a quiet connection as abuse (their
  `min_recv_ping_interval_without_data` defaults to 5 minutes) and close it.
- A bearer token travels as `authorization: Bearer <token>` metadata on every
  call, with or without TLS, as the server's TokenAuth expects.
- Retries only on UNAVAILABLE (unreachable, draining, model not ready), with
  exponential backoff and jitter, within the call's deadline. Other codes
  mean the request itself is wrong, and repeating it would not help. The
  channel's own reconnect backoff starts at the same delay, so a retry after
  the server comes up does not meet a channel still waiting to reconnect.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import grpc

from cnnserve import __version__

DEFAULT_URL = "localhost:8001"
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
# Classify calls stay this far under the message limit: room for the fields around the images.
_MESSAGE_MARGIN = 1024 * 1024

Pem: TypeAlias = "bytes | str | os.PathLike[str]"


@dataclass(frozen=True)
class KeepAlive:
    """gRPC keepalive: ping after `time_s` without activity, fail after `timeout_s` unanswered."""

    time_s: float = 300.0
    timeout_s: float = 20.0
    permit_without_calls: bool = False


@dataclass(frozen=True)
class Retry:
    retries: int = 3
    backoff: float = 0.1  # seconds before the first retry; doubled for each next one
    max_backoff: float = 5.0

    def delay(self, attempt: int, code: grpc.StatusCode, remaining: float | None) -> float | None:
        """Seconds to wait before retrying attempt `attempt` (0-based), or None to give up."""
        if code != grpc.StatusCode.UNAVAILABLE or attempt >= self.retries:
            return None
        # Jitter keeps many clients that failed together from retrying together.
        delay = min(self.max_backoff, self.backoff * 2**attempt) * random.uniform(0.5, 1.0)
        if remaining is not None and delay >= remaining:
            return None
        return delay


def _pem(value: Pem | None) -> bytes | None:
    """PEM bytes as given, or read from a path (str or Path)."""
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


@dataclass(frozen=True)
class Connection:
    """Everything a client needs to open its channel and make calls."""

    url: str
    credentials: grpc.ChannelCredentials | None
    options: tuple[tuple[str, Any], ...]
    metadata: tuple[tuple[str, str], ...]
    timeout: float | None
    retry: Retry
    classify_budget: int  # bytes of images per Classify call

    def deadline(self, timeout: float | None) -> float | None:
        """The monotonic time a call (all its attempts) must end by, or None."""
        timeout = self.timeout if timeout is None else timeout
        return None if timeout is None else time.monotonic() + timeout


def remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def connect(
    url: str,
    *,
    tls: bool,
    root_certificates: Pem | None,
    certificate_chain: Pem | None,
    private_key: Pem | None,
    token: str | None,
    timeout: float | None,
    retries: int,
    backoff: float,
    max_message_bytes: int,
    keepalive: KeepAlive | None,
) -> Connection:
    if (certificate_chain is None) != (private_key is None):
        raise ValueError("certificate_chain and private_key go together (mutual TLS)")
    if retries < 0 or backoff < 0:
        raise ValueError("retries and backoff must not be negative")
    if token is not None and (not token.strip() or token != token.strip() or "\n" in token):
        raise ValueError("a token is one line, without surrounding spaces")
    credentials = None
    if tls or root_certificates is not None or certificate_chain is not None:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_pem(root_certificates),
            private_key=_pem(private_key),
            certificate_chain=_pem(certificate_chain),
        )
    retry = Retry(retries=retries, backoff=backoff)
    reconnect_ms = max(1, int(backoff * 1000))
    options: list[tuple[str, Any]] = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # Not grpc.min_reconnect_backoff_ms: gRPC also takes it as the time a connection
        # attempt may last, and a TLS handshake over a long link needs more than 100 ms.
        ("grpc.initial_reconnect_backoff_ms", reconnect_ms),
        ("grpc.max_reconnect_backoff_ms", max(reconnect_ms, int(retry.max_backoff * 1000))),
        ("grpc.primary_user_agent", f"cnnserve-client/{__version__}"),
    ]
    if keepalive is not None:
        options += [
            ("grpc.keepalive_time_ms", int(keepalive.time_s * 1000)),
            ("grpc.keepalive_timeout_ms", int(keepalive.timeout_s * 1000)),
            ("grpc.keepalive_permit_without_calls", int(keepalive.permit_without_calls)),
        ]
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    return Connection(
        url=url,
        credentials=credentials,
        options=tuple(options),
        metadata=metadata,
        timeout=timeout,
        retry=retry,
        classify_budget=max_message_bytes - min(_MESSAGE_MARGIN, max_message_bytes // 2),
    )


DEFAULT_KEEPALIVE = KeepAlive()


class BaseClient:
    """The constructor and bookkeeping `Client` and `AsyncClient` share.

    Args:
        url: "host:port" of the server's gRPC port.
        tls: use TLS with the system's root certificates (or `root_certificates`).
        root_certificates, certificate_chain, private_key: PEM bytes, or a path to a
            PEM file; the chain and key are the client certificate for mutual TLS.
        token: sent as `authorization: Bearer <token>` on every call.
        timeout: the default deadline of a call, retries included, in seconds.
        retries: how many times a call that failed with UNAVAILABLE is repeated.
        backoff: seconds before the first retry, doubled for each next one (with jitter).
        max_message_bytes: the largest message sent or received.
        keepalive: keepalive pings; None leaves gRPC's defaults.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        tls: bool = False,
        root_certificates: Pem | None = None,
        certificate_chain: Pem | None = None,
        private_key: Pem | None = None,
        token: str | None = None,
        timeout: float | None = None,
        retries: int = 3,
        backoff: float = 0.1,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        keepalive: KeepAlive | None = DEFAULT_KEEPALIVE,
    ) -> None:
        self.url = url
        self._connection = connect(
            url,
            tls=tls,
            root_certificates=root_certificates,
            certificate_chain=certificate_chain,
            private_key=private_key,
            token=token,
            timeout=timeout,
            retries=retries,
            backoff=backoff,
            max_message_bytes=max_message_bytes,
            keepalive=keepalive,
        )
        # (model, version) -> (input names, output names), for positional inputs.
        self._names: dict[tuple[str, str], tuple[list[str], list[str]]] = {}
        self._open()

    def _open(self) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    def _remember_names(
        self, model: str, version: str, metadata: Any
    ) -> tuple[list[str], list[str]]:
        names = ([t.name for t in metadata.inputs], [t.name for t in metadata.outputs])
        self._names[(model, version)] = names
        return names
