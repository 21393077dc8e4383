"""Wiring and lifecycle: one `Server(settings)` with start, stop and a `serve` entry point.

Start order: the gRPC port opens first (health NOT_SERVING), models load and
warm up, then health turns SERVING. Stop order on SIGTERM/SIGINT: health goes
NOT_SERVING and new calls get UNAVAILABLE, in-flight calls get the grace
period to finish, then the models drain and close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import threading
from pathlib import Path
from wsgiref.simple_server import WSGIRequestHandler, make_server

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc
from prometheus_client import make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

import cnnserve.v1
from cnnserve.server.classify import ClassifierServicer, ImageLimits
from cnnserve.server.config import Settings
from cnnserve.server.counting import CallCounter
from cnnserve.server.drain import Drain
from cnnserve.server.metrics import Metrics
from cnnserve.server.registry import Registry
from cnnserve.server.repository import list_models
from cnnserve.server.security import ReloadingTLS, TokenAuth, server_credentials
from cnnserve.server.servicer import InferenceServicer
from cnnserve.v1 import classification_pb2_grpc, grpc_service_pb2_grpc

log = logging.getLogger(__name__)

INFERENCE_SERVICE = "inference.GRPCInferenceService"
CLASSIFIER_SERVICE = "cnnserve.v1.ImageClassifier"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _reflection_pool() -> descriptor_pool.DescriptorPool:
    """Our services' descriptors in a pool of their own (see proto/generate.py for why)."""
    pool = descriptor_pool.DescriptorPool()
    files = descriptor_pb2.FileDescriptorSet()
    files.ParseFromString((Path(cnnserve.v1.__file__).parent / "descriptors.binpb").read_bytes())
    for module in (health_pb2, reflection_pb2):
        files.file.add().ParseFromString(module.DESCRIPTOR.serialized_pb)
    for f in files.file:
        pool.Add(f)
    return pool


DRAIN_LEAD_S = 0.5  # on shutdown, calls already received reach a handler before gRPC stops
CLOSE_MARGIN_S = 15.0  # after the grace period, for running batches to end and sessions to close


class _Quiet(WSGIRequestHandler):
    """A scrape is not worth a log line."""

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the base's name)
        pass


class StartupError(Exception):
    """A port the server cannot listen on: reported in one line, and the process exits 1."""


class Server:
    """The cnnserve process: gRPC services, model registry, metrics endpoint."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.health = health.aio.HealthServicer()
        self.registry = Registry(
            settings.repository,
            default_queue=settings.max_queue_size,
            metrics=self.metrics,
            on_change=self._model_changed,
        )
        self.metrics.watch(self.registry.states)
        self.drain = Drain()
        self.inference = InferenceServicer(
            self.registry,
            self.drain,
            control_mode=settings.model_control_mode,
            request_log_rate=settings.request_log_rate,
            max_message_bytes=settings.max_message_bytes,
        )
        self.classifier = ClassifierServicer(
            self.registry,
            self.drain,
            limits=ImageLimits(settings.max_image_bytes, settings.max_image_pixels),
            workers=settings.preprocess_threads,
            request_log_rate=settings.request_log_rate,
            max_message_bytes=settings.max_message_bytes,
        )
        self.grpc_port = 0
        self.metrics_port = 0
        self._grpc: grpc.aio.Server | None = None
        self._http: object = None
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[None]] = set()

    def _model_changed(self, name: str, ready: bool) -> None:
        task = asyncio.create_task(self.health.set(name, SERVING if ready else NOT_SERVING))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _grpc_options(self) -> list[tuple[str, int]]:
        size = self.settings.max_message_bytes
        return [
            ("grpc.max_receive_message_length", size),
            ("grpc.max_send_message_length", size),
            ("grpc.keepalive_time_ms", 60_000),
            ("grpc.keepalive_timeout_ms", 20_000),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.max_connection_idle_ms", 15 * 60_000),
            # Connections are closed (gracefully) every few minutes so that clients
            # balancing over a headless Service re-resolve it and find new pods.
            ("grpc.max_connection_age_ms", 5 * 60_000),
            ("grpc.max_connection_age_grace_ms", int(self.settings.grace_period_secs * 1000)),
            ("grpc.max_concurrent_streams", 1024),
            # Off by default, so that a second server on a taken port fails to start
            # rather than silently taking a share of the connections.
            ("grpc.so_reuseport", int(self.settings.reuse_grpc_port == "true")),
        ]

    def _bind(self, server: grpc.aio.Server) -> int:
        s = self.settings
        address = f"{s.host}:{s.grpc_port}"
        try:
            if s.tls_cert is None or s.tls_key is None:
                return server.add_insecure_port(address)
            credentials = server_credentials(s.tls_cert, s.tls_key, s.tls_client_ca)
            return server.add_secure_port(address, credentials)
        except RuntimeError as exc:  # grpc says only that binding failed
            raise StartupError(
                f"cannot listen for gRPC on {address}: the port is taken or the address is "
                "not this machine's (servers share a port only if each has "
                "--reuse-grpc-port true)"
            ) from exc

    async def start(self) -> None:
        """Open the ports, load the models, then report SERVING."""
        s = self.settings
        counter = CallCounter(self.metrics)
        interceptors: list[grpc.aio.ServerInterceptor] = []
        if s.auth_token_file or s.admin_token_file:
            open_health = s.open_health == "true"
            auth = TokenAuth(
                s.auth_token_file,
                s.admin_token_file,
                open_health=open_health,
                refused=counter.count,
            )
            interceptors.append(auth)
        server = grpc.aio.server(interceptors=interceptors, options=self._grpc_options())
        self._grpc = server
        services = counter.registrar(server)
        grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(self.inference, services)
        classification_pb2_grpc.add_ImageClassifierServicer_to_server(self.classifier, services)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, services)
        names = [
            INFERENCE_SERVICE,
            CLASSIFIER_SERVICE,
            health.SERVICE_NAME,
            reflection.SERVICE_NAME,
        ]
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
            reflection.aio.ReflectionServicer(names, pool=_reflection_pool()), services
        )
        server.add_generic_rpc_handlers((counter.unknown(),))
        self.grpc_port = self._bind(server)
        await self.health.set("", NOT_SERVING)
        self.registry.starting = True
        await server.start()
        if s.metrics_port >= 0:
            self._serve_metrics()
        await self._load_initial()
        self.registry.starting = False
        self.inference.started = True
        await self.health.set("", SERVING)
        if self.settings.model_control_mode == "poll":
            self._tasks.append(asyncio.create_task(self._poll_forever(), name="poll"))

    def _serve_metrics(self) -> None:
        """Prometheus text on its own port, over HTTPS with the gRPC certificate if asked
        (re-read when its files change, as for gRPC)."""
        s = self.settings
        tls = None
        if s.metrics_tls == "true" and s.tls_cert is not None and s.tls_key is not None:
            tls = ReloadingTLS(s.tls_cert, s.tls_key)
        try:
            family = socket.getaddrinfo(s.host, s.metrics_port, type=socket.SOCK_STREAM)[0][0]

            class Server(ThreadingWSGIServer):
                address_family = family

            httpd = make_server(
                s.host, s.metrics_port, make_wsgi_app(self.metrics.registry), Server, _Quiet
            )
        except OSError as exc:
            raise StartupError(
                f"cannot serve metrics on {s.host}:{s.metrics_port}: {exc.strerror or exc}"
            ) from exc
        if tls is not None:
            httpd.socket = tls.context.wrap_socket(httpd.socket, server_side=True)
        threading.Thread(target=httpd.serve_forever, name="metrics", daemon=True).start()
        self._http = httpd
        self.metrics_port = httpd.server_port

    async def _load_initial(self) -> None:
        s = self.settings
        if s.load_model:
            names = list(s.load_model)
            present = await asyncio.to_thread(list_models, s.repository)
            missing = [n for n in names if n not in present]
            if missing:  # a typo would leave a server that passes health checks, serving nothing
                raise StartupError(
                    f"--load-model {', '.join(missing)}: not in the repository {s.repository} "
                    f"(it has {', '.join(present) or 'no models'})"
                )
        elif s.model_control_mode == "explicit":
            names = []
        else:
            names = await asyncio.to_thread(list_models, s.repository)
        await self.registry.load_many(names)

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.repository_poll_secs)
            try:
                await self.registry.poll()
            except Exception:
                log.exception("repository scan failed; trying again next interval")

    async def stop(self, grace: float | None = None) -> None:
        """Drain: refuse new calls, let in-flight ones finish, then close the models."""
        grace = self.settings.grace_period_secs if grace is None else grace
        self.drain.begin()
        await self.health.enter_graceful_shutdown()
        for task in self._tasks:
            task.cancel()
        if self._grpc is not None:
            # gRPC's stop cancels calls it has received but not yet handed to a handler.
            # Kept open a moment longer, it hands them over, and the handlers answer them
            # UNAVAILABLE (which clients retry) while in-flight ones go on.
            lead = min(DRAIN_LEAD_S, grace)
            await asyncio.sleep(lead)
            await self._grpc.stop(grace - lead)
        # The calls are over by now; what is left is queued work and running batches.
        try:
            await asyncio.wait_for(self.registry.close(), timeout=grace + CLOSE_MARGIN_S)
        except TimeoutError:
            log.error(
                "the models did not close within %.0fs; stopping anyway", grace + CLOSE_MARGIN_S
            )
        self.classifier.close()
        if self._http is not None:
            self._http.shutdown()  # type: ignore[attr-defined]
            self._http.server_close()  # type: ignore[attr-defined]


async def serve(settings: Settings) -> int:
    """Run until SIGTERM or SIGINT, then drain and return 0."""
    server = Server(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await server.start()
    except StartupError as exc:
        log.error("%s", exc)
        await server.stop(grace=0)
        return 1
    for e in server.registry.index():
        log.info("model %s version %s: %s %s", e.name, e.version or "-", e.state, e.reason)
    for state in (s for s in server.registry.states() if s.ready):
        log.info("serving %s version %s on %s", state.model, state.version, state.provider)
    scheme = "https" if settings.metrics_tls == "true" else "http"
    metrics = f"{scheme}://{settings.host}:{server.metrics_port}/metrics"
    log.info(
        "listening: gRPC %s:%d, metrics %s",
        settings.host,
        server.grpc_port,
        metrics if server._http else "off",
    )
    await stop.wait()
    log.info("shutting down: draining for up to %.0fs", settings.grace_period_secs)
    with contextlib.suppress(asyncio.CancelledError):
        await server.stop()
    log.info("stopped")
    return 0
