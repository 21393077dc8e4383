"""The servers under test, each in its own process: cnnserve, the echo floor, MLServer.

Each is started on 127.0.0.1, waited for until its models answer ModelReady
(or, for the echo server, until the port accepts), and stopped with SIGTERM
(SIGKILL after a grace period). Logs go to `.bench/logs/`.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc

from cnnserve.v1 import grpc_service_pb2_grpc
from cnnserve.v1 import inference_pb2 as pb


class StartError(Exception):
    """A server did not come up; the message ends with the tail of its log."""


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    url: str
    log: Path

    def stop(self, grace: float = 20.0) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(log: Path, lines: int = 12) -> str:
    """The end of a log, preceded by its last error line when that is further up."""
    try:
        text = log.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    errors = [line for line in text if re.search(r"Error|Exception", line)]
    tail = text[-lines:]
    if errors and errors[-1] not in tail:
        tail = [errors[-1], "...", *tail]
    return "\n".join(tail)


def _spawn(
    name: str,
    cmd: Sequence[str],
    log: Path,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        return subprocess.Popen(
            list(cmd),
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            cwd=cwd,
            start_new_session=True,
        )


def _wait_models(process: Process, models: Sequence[str], timeout: float) -> None:
    end = time.monotonic() + timeout
    with grpc.insecure_channel(process.url) as channel:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        waiting = list(models)
        while waiting:
            if process.popen.poll() is not None:
                raise StartError(f"{process.name} exited:\n{_tail(process.log)}")
            if time.monotonic() > end:
                process.stop()
                raise StartError(f"{process.name}: {waiting} not ready:\n{_tail(process.log)}")
            try:
                if stub.ModelReady(pb.ModelReadyRequest(name=waiting[0]), timeout=2).ready:
                    waiting.pop(0)
                    continue
            except grpc.RpcError:
                pass
            time.sleep(0.25)


def _port_from_log(
    process: subprocess.Popen[bytes], log: Path, pattern: str, timeout: float
) -> int:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        match = re.search(pattern, log.read_text(errors="replace"))
        if match:
            return int(match.group(1))
        if process.poll() is not None:
            break
        time.sleep(0.1)
    process.kill()
    raise StartError(f"no port in the log:\n{_tail(log)}")


@contextmanager
def cnnserve(
    repository: Path, models: Sequence[str], log: Path, timeout: float = 300
) -> Iterator[Process]:
    cmd = [
        sys.executable,
        "-m",
        "cnnserve",
        "serve",
        "--repository",
        str(repository),
        "--host",
        "127.0.0.1",
        "--grpc-port",
        "0",
        "--metrics-port",
        "-1",
    ]
    popen = _spawn("cnnserve", cmd, log)
    port = _port_from_log(popen, log, r"listening: gRPC [\d.]+:(\d+)", timeout)
    process = Process("cnnserve", popen, f"127.0.0.1:{port}", log)
    try:
        _wait_models(process, models, timeout)
        yield process
    finally:
        process.stop()


@contextmanager
def echo(response: Path, log: Path) -> Iterator[Process]:
    cmd = [sys.executable, "-m", "bench.echo", "--response", str(response)]
    popen = _spawn("echo", cmd, log, cwd=Path(__file__).resolve().parent.parent)
    port = _port_from_log(popen, log, r"echo listening on (\d+)", 60)
    process = Process("echo", popen, f"127.0.0.1:{port}", log)
    try:
        yield process
    finally:
        process.stop()


@contextmanager
def mlserver(
    executable: Path,
    folder: Path,
    grpc_port: int,
    models: Sequence[str],
    log: Path,
    timeout: float = 300,
) -> Iterator[Process]:
    # The runtime module lives in `folder`; workers must import it too.
    executable, folder = executable.absolute(), folder.absolute()
    popen = _spawn(
        "mlserver",
        [str(executable), "start", str(folder)],
        log,
        env={"PYTHONPATH": str(folder)},
        cwd=folder,
    )
    process = Process("mlserver", popen, f"127.0.0.1:{grpc_port}", log)
    try:
        _wait_models(process, models, timeout)
        yield process
    finally:
        process.stop()
