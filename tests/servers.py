"""Real cnnserve servers for tests: in a thread of this process, or as a child process.

Both bind 127.0.0.1 with ports chosen by the operating system and hand back
the bound ports.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cnnserve.server.app import Server
from cnnserve.server.config import Settings


@dataclass
class Running:
    server: Server
    loop: asyncio.AbstractEventLoop

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.server.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.server.metrics_port}/metrics"

    def call(self, coro: Any, timeout: float = 120) -> Any:
        """Run a coroutine on the server's loop (e.g. a registry method) and wait for it."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


def test_settings(repository: Path, **overrides: Any) -> Settings:
    base = Settings(repository=repository, host="127.0.0.1", grpc_port=0, metrics_port=0)
    return replace(base, **overrides)


@contextmanager
def server_in_thread(repository: Path, **overrides: Any) -> Iterator[Running]:
    """A started server on its own event loop in a daemon thread; stopped on exit."""
    settings = test_settings(repository, **overrides)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = asyncio.run_coroutine_threadsafe(_make(settings), loop).result(120)
    try:
        asyncio.run_coroutine_threadsafe(server.start(), loop).result(300)
        yield Running(server, loop)
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(grace=5), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


async def _make(settings: Settings) -> Server:
    return Server(settings)


@dataclass
class Child:
    process: subprocess.Popen[str]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text()


def serve_command(repository: Path, *args: str) -> list[str]:
    """`cnnserve serve` on 127.0.0.1 with metrics off; later flags win over earlier ones."""
    return [sys.executable, "-m", "cnnserve", "serve", "--repository", str(repository),
            "--host", "127.0.0.1", "--metrics-port", "-1", *args]  # fmt: skip


@contextmanager
def server_process(repository: Path, log_path: Path, *args: str) -> Iterator[Child]:
    """`cnnserve serve` as a child process; yields once it logs its gRPC port."""
    cmd = serve_command(repository, "--grpc-port", "0", *args)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log_path.open("w") as log_file:
        process = subprocess.Popen(
            cmd, stdout=log_file, stderr=subprocess.STDOUT, text=True, env=env
        )
    try:
        port = wait_for_port(process, log_path)
        yield Child(process, port, log_path)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def wait_for_port(process: subprocess.Popen[Any], log_path: Path, timeout: float = 120) -> int:
    """The gRPC port a `cnnserve serve` child logs once its models are loaded and warm."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        match = re.search(r"listening: gRPC [\d.]+:(\d+)", log_path.read_text())
        if match:
            return int(match.group(1))
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log_path.read_text()}")
        time.sleep(0.1)
    raise TimeoutError(f"server did not start:\n{log_path.read_text()}")
