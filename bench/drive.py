"""Driving a server with `cnnserve loadtest`'s engine, from the bench's synchronous steps."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import grpc

from bench.machine import Background, QuietGate
from cnnserve.client.connection import Connection, connect
from cnnserve.client.loadtest_engine import Level, Policy, StatsReader, Workload, run_levels
from cnnserve.client.loadtest_setup import channel_factory, prepare, stats_reader
from cnnserve.v1 import grpc_service_pb2_grpc

MAX_MESSAGE = 256 * 1024 * 1024


def connection(url: str, timeout: float = 120.0) -> Connection:
    return connect(
        url,
        tls=False,
        root_certificates=None,
        certificate_chain=None,
        private_key=None,
        token=None,
        timeout=timeout,
        retries=0,
        backoff=0.1,
        max_message_bytes=MAX_MESSAGE,
        keepalive=None,
    )


def workload(url: str, model: str, batch: int = 1) -> Workload:
    """The request bytes for `model`, built from the server's ModelMetadata."""

    async def build() -> Workload:
        c = connection(url)
        control = channel_factory(c)(-1)
        try:
            return (await prepare(c, model, "", "infer", batch, control)).workload
        finally:
            await control.close()

    return asyncio.run(build())


def response(url: str, load: Workload) -> bytes:
    """The server's answer to the workload's request, as bytes (for the echo server)."""
    with grpc.insecure_channel(
        url, options=[("grpc.max_receive_message_length", MAX_MESSAGE)]
    ) as channel:
        call = channel.unary_unary(load.method, request_serializer=None, response_deserializer=None)
        answer: bytes = call(load.request, timeout=120)
        return answer


def levels(
    url: str,
    model: str,
    load: Workload,
    concurrency: Sequence[int],
    policy: Policy,
    *,
    statistics: bool = True,
    gate: QuietGate | None = None,
) -> dict[str, dict[str, Any]]:
    """Figures by concurrency (a string key, for JSON), with the server split if asked,
    and how many cores other processes kept busy meanwhile."""

    async def one(level: int) -> dict[str, Any]:
        c = connection(url)
        control = channel_factory(c)(-1)
        stats: StatsReader | None = None
        if statistics:
            stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(control)
            stats = stats_reader(stub, None, model, "")
        background = Background().start()
        try:
            [result] = await run_levels(
                channel_factory(c),
                load,
                [Level(concurrency=level)],
                policy,
                timeout=c.timeout,
                stats=stats,
            )
        finally:
            await control.close()
        return asdict(result) | {"other_processes_cores": background.cores()}

    figures = {}
    for n in concurrency:
        if gate is not None:
            gate.wait()
        figures[str(n)] = asyncio.run(one(n))
    return figures
