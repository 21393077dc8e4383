"""(a) The physical limit: onnxruntime called in-process, batch by batch.

The session is the server's own `Runner`, made by the server's own model
loading (provider, intra/inter-op threads, spinning off, graph optimisation,
and for a model whose batches run inline, its single thread), and `Runner.run`
is the call the server makes. Nothing else runs meanwhile: the servers that
are up sit idle.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf import text_format

from cnnserve.server.model import ModelVersion
from cnnserve.server.repository import read_model
from cnnserve.server.runner import Runner
from cnnserve.v1 import model_config_pb2 as mc

BEST_LONGER = 3  # how much longer the best batch is measured than each sweep step


@dataclass
class BatchFigure:
    batch: int
    runs: int
    inferences_per_s: float
    p50_ms: float


def read_config(model_dir: Path) -> mc.ModelConfig:
    return text_format.Parse((model_dir / "config.pbtxt").read_text(), mc.ModelConfig())


@contextmanager
def server_runner(model_dir: Path) -> Iterator[Runner]:
    """The first Runner of the latest version, loaded as the server loads it."""
    versions = sorted(int(p.name) for p in model_dir.iterdir() if p.name.isdigit())
    source = read_model(model_dir.parent, model_dir.name)
    version = ModelVersion(source, versions[-1], default_queue=1)
    try:
        yield version.runners[0]
    finally:
        asyncio.run(version.close())


def batch_sizes(max_batch_size: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b < max_batch_size]
    return [*sizes, max_batch_size]


def _time_batch(
    runner: Runner, feeds: dict[str, np.ndarray], outputs: list[str], seconds: float
) -> tuple[int, list[int]]:
    for _ in range(2):  # warm-up: first runs at a new shape allocate
        runner.run(feeds, outputs)
    times: list[int] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 3:
        t0 = time.perf_counter_ns()
        runner.run(feeds, outputs)
        times.append(time.perf_counter_ns() - t0)
    return len(times), times


def _figure(runner: Runner, feeds: dict[str, np.ndarray], outputs: list[str], batch: int,
            seconds: float) -> BatchFigure:  # fmt: skip
    runs, times = _time_batch(runner, feeds, outputs, seconds)
    rate = batch * runs / (sum(times) / 1e9)
    return BatchFigure(batch, runs, round(rate, 2), round(float(np.median(times)) / 1e6, 3))


def _inputs(runner: Runner, sizes: list[int]) -> tuple[dict[int, dict[str, np.ndarray]], list[str]]:
    """Seeded random feeds for each batch size, and the output names."""
    spec = runner.inputs[0]
    rng = np.random.default_rng(0)
    feeds = {b: {spec.name: rng.random((b, *spec.shape[1:]), dtype=np.float32)} for b in sizes}
    return feeds, [o.name for o in runner.outputs]


def again(model_dir: Path, batch: int, seconds: float) -> dict[str, Any]:
    """One batch size measured again, as `measure` measures its best batch."""
    with server_runner(model_dir) as runner:
        feeds, outputs = _inputs(runner, [batch])
        return asdict(_figure(runner, feeds[batch], outputs, batch, BEST_LONGER * seconds))


def measure(model_dir: Path, seconds: float) -> dict[str, Any]:
    """Inferences/s and p50 at each batch size up to max_batch_size; the best batch.

    The best batch of the sweep is measured again, BEST_LONGER times as long: the
    largest of several noisy figures overstates, and every ratio divides by it.
    """
    config = read_config(model_dir)
    with server_runner(model_dir) as runner:
        feeds, outputs = _inputs(runner, batch_sizes(config.max_batch_size))
        figures = [_figure(runner, f, outputs, b, seconds) for b, f in feeds.items()]
        chosen = max(figures, key=lambda f: f.inferences_per_s).batch
        best = _figure(runner, feeds[chosen], outputs, chosen, BEST_LONGER * seconds)
    return {
        "provider": runner.provider,
        "inline": runner.inline,
        "intra_op_threads": runner.options.intra_op_threads,
        "inter_op_threads": runner.options.inter_op_threads,
        "batches": [asdict(f) for f in figures],
        "batch1": asdict(figures[0]),
        "best": asdict(best),
    }
