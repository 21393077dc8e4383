"""`cnnserve soak`: a bounded run that mixes load, reloads, bad inputs and restarts.

It serves a copy of one model from the repository in a child `cnnserve serve`
(poll mode), sends good and malformed requests from several threads, writes a
new version every `--reload-every` seconds (deleting old version folders while
they may still serve), and stops the server every `--restart-every` seconds,
alternately with SIGTERM (which must exit 0) and SIGKILL, restarting it on the
same port. Good requests retry on UNAVAILABLE, as a client should while a
server restarts, and every client backs off after an UNAVAILABLE.

A call that reaches the server in the instant gRPC shuts down is cancelled by
gRPC before cnnserve sees it (a deployment avoids this with a preStop delay,
so that no traffic arrives by then). Such a call never ran: the soak counts a
CANCELLED answer during a SIGTERM shutdown apart, and retries it if it was a
good request; a CANCELLED at any other time is unexpected. At the end it
prints the totals; any unexpected error makes the exit code 1.
"""

from __future__ import annotations

import argparse
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np

from cnnserve.v1 import grpc_service_pb2_grpc as rpc
from cnnserve.v1 import inference_pb2 as pb

DATATYPES = {"FP32": np.float32, "FP16": np.float16, "INT64": np.int64, "UINT8": np.uint8}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--minutes", type=float, default=10.0, help="how long to run")
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--model", default="lenet5", help="the model to serve and load")
    parser.add_argument("--concurrency", type=int, default=8, help="client threads")
    parser.add_argument("--reload-every", type=float, default=15.0, help="seconds")
    parser.add_argument("--restart-every", type=float, default=45.0, help="seconds")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Soak:
    def __init__(self, args: argparse.Namespace, repository: Path) -> None:
        self.args = args
        self.repository = repository
        self.port = _free_port()
        self.url = f"127.0.0.1:{self.port}"
        self.totals: Counter[str] = Counter()
        self.unexpected: Counter[str] = Counter()
        self.max_rss = 0
        self.restarts = 0
        self.reloads = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._stopping = threading.Event()  # set while a SIGTERM shutdown is under way
        self._process: subprocess.Popen[bytes] | None = None
        self._log = repository.parent / "server.log"

    # -- the server --------------------------------------------------------------

    def start_server(self) -> None:
        cmd = [sys.executable, "-m", "cnnserve", "serve", "--repository", str(self.repository),
               "--host", "127.0.0.1", "--grpc-port", str(self.port), "--metrics-port", "-1",
               "--model-control-mode", "poll", "--repository-poll-secs", "1",
               "--grace-period-secs", "20"]  # fmt: skip
        with self._log.open("ab") as log:
            self._process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        with grpc.insecure_channel(self.url) as channel:
            stub = rpc.GRPCInferenceServiceStub(channel)
            end = time.monotonic() + 120
            while time.monotonic() < end:
                try:
                    if stub.ServerReady(pb.ServerReadyRequest(), timeout=2).ready:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        raise RuntimeError(f"the server did not become ready; see {self._log}")

    def stop_server(self, sig: signal.Signals) -> None:
        assert self._process is not None
        if sig == signal.SIGTERM:
            self._stopping.set()
        self._process.send_signal(sig)
        code = self._process.wait(60)
        time.sleep(0.1)  # answers already on their way back still belong to this shutdown
        self._stopping.clear()
        if sig == signal.SIGTERM and code != 0:
            self._unexpected(f"exit code {code} after SIGTERM")

    # -- traffic ---------------------------------------------------------------------

    def _count(self, key: str) -> None:
        with self._lock:
            self.totals[key] += 1

    def _unexpected(self, what: str) -> None:
        with self._lock:
            self.totals["unexpected"] += 1
            self.unexpected[what] += 1

    def _requests(
        self, stub: rpc.GRPCInferenceServiceStub
    ) -> tuple[pb.ModelInferRequest, list[tuple[pb.ModelInferRequest, grpc.StatusCode]]]:
        meta = stub.ModelMetadata(pb.ModelMetadataRequest(name=self.args.model), timeout=10)
        spec = meta.inputs[0]
        shape = [1 if d < 0 else d for d in spec.shape]
        dtype = DATATYPES.get(spec.datatype, np.float32)
        good = pb.ModelInferRequest(model_name=self.args.model)
        good.inputs.add(name=spec.name, datatype=spec.datatype, shape=shape)
        good.raw_input_contents.append(np.zeros(shape, dtype).tobytes())
        short = pb.ModelInferRequest()
        short.CopyFrom(good)
        short.raw_input_contents[0] = good.raw_input_contents[0][:-1]
        unknown = pb.ModelInferRequest()
        unknown.CopyFrom(good)
        unknown.model_name = "no-such-model"
        renamed = pb.ModelInferRequest()
        renamed.CopyFrom(good)
        renamed.inputs[0].name = "not-an-input"
        bad = [
            (short, grpc.StatusCode.INVALID_ARGUMENT),
            (unknown, grpc.StatusCode.NOT_FOUND),
            (renamed, grpc.StatusCode.INVALID_ARGUMENT),
        ]
        return good, bad

    def _good(self, stub: rpc.GRPCInferenceServiceStub, request: pb.ModelInferRequest) -> None:
        end = time.monotonic() + 60
        delay = 0.05
        while True:
            try:
                stub.ModelInfer(request, timeout=30)
                self._count("ok")
                return
            except grpc.RpcError as exc:
                if self._cancelled_at_shutdown(exc):
                    pass
                elif exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > end:
                    self._unexpected(f"good request: {exc.code().name} {exc.details()}")
                    return
                self._count("retried")
                time.sleep(delay)
                delay = min(1.0, delay * 2)

    def _cancelled_at_shutdown(self, exc: grpc.RpcError) -> bool:
        if exc.code() == grpc.StatusCode.CANCELLED and self._stopping.is_set():
            self._count("cancelled_at_shutdown")
            return True
        return False

    def _bad(self, stub: rpc.GRPCInferenceServiceStub, request: pb.ModelInferRequest,
             expected: grpc.StatusCode) -> None:  # fmt: skip
        try:
            stub.ModelInfer(request, timeout=30)
            self._unexpected("a malformed request succeeded")
        except grpc.RpcError as exc:
            if exc.code() == expected:
                self._count("expected_error")
            elif exc.code() == grpc.StatusCode.UNAVAILABLE:
                self._count("unavailable_while_restarting")
                time.sleep(0.2)
            elif not self._cancelled_at_shutdown(exc):
                self._unexpected(f"bad request: {exc.code().name} {exc.details()}")

    def client(self, seed: int) -> None:
        rng = random.Random(seed)
        with grpc.insecure_channel(self.url) as channel:
            stub = rpc.GRPCInferenceServiceStub(channel)
            good, bad = self._requests(stub)
            while not self._stop.is_set():
                self._count("sent")
                if rng.random() < 0.8:
                    self._good(stub, good)
                else:
                    self._bad(stub, *rng.choice(bad))

    # -- chaos -----------------------------------------------------------------------

    def reload(self) -> None:
        model_dir = self.repository / self.args.model
        names = [p.name for p in model_dir.iterdir()]
        versions = sorted(int(n) for n in names if n.isascii() and n.isdigit())
        shutil.copytree(model_dir / str(versions[-1]), model_dir / str(versions[-1] + 1))
        for old in versions[:-2]:  # delete old folders, possibly while they still serve
            shutil.rmtree(model_dir / str(old), ignore_errors=True)
        self.reloads += 1

    def run(self) -> int:
        self.start_server()
        end = time.monotonic() + self.args.minutes * 60
        workers = [threading.Thread(target=self.client, args=(i,), daemon=True)
                   for i in range(self.args.concurrency)]  # fmt: skip
        for w in workers:
            w.start()
        next_reload = time.monotonic() + self.args.reload_every
        next_restart = time.monotonic() + self.args.restart_every
        while time.monotonic() < end:
            time.sleep(0.5)
            assert self._process is not None
            self.max_rss = max(self.max_rss, _rss(self._process.pid))
            if time.monotonic() >= next_reload:
                self.reload()
                next_reload += self.args.reload_every
            if time.monotonic() >= next_restart:
                self.stop_server(signal.SIGTERM if self.restarts % 2 == 0 else signal.SIGKILL)
                self.restarts += 1
                self.start_server()
                next_restart += self.args.restart_every
        self._stop.set()
        for w in workers:
            w.join(120)
        self.stop_server(signal.SIGTERM)
        return self.report()

    def report(self, out: Callable[[str], None] = print) -> int:
        t = self.totals
        a = self.args
        out(f"soak: {a.minutes:g} min, model {a.model}, {a.concurrency} clients, "
            f"{self.reloads} reloads, {self.restarts} restarts")  # fmt: skip
        out(f"requests sent            {t['sent']}")
        out(f"ok                       {t['ok']} (after {t['retried']} retries on UNAVAILABLE)")
        out(f"expected errors          {t['expected_error']}")
        out(f"unavailable (restarting) {t['unavailable_while_restarting']}")
        cancelled = t["cancelled_at_shutdown"]
        out(f"cancelled at shutdown    {cancelled} (never run; good ones retried)")
        out(f"unexpected errors        {t['unexpected']}")
        for what, n in self.unexpected.most_common(10):
            out(f"  {n} x {what}")
        out(f"max server RSS           {self.max_rss / 2**20:.0f} MiB")
        return 1 if t["unexpected"] else 0


def run(args: argparse.Namespace) -> int:
    source = args.repository / args.model
    if not source.is_dir():
        print(f"cnnserve soak: no model {args.model!r} in {args.repository}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="cnnserve-soak-") as tmp:
        repository = Path(tmp) / "repository"
        shutil.copytree(source, repository / args.model)
        soak = Soak(args, repository)
        try:
            return soak.run()
        except KeyboardInterrupt:
            soak._stop.set()
            return soak.report()
        finally:
            if soak._process is not None and soak._process.poll() is None:
                soak._process.kill()
