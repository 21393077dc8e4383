"""(a) The physical limit: onnxruntime called in-process, batch by batch.

The session is the server's own `Runner`, built from the model's config
exactly as the server builds it (provider, intra/inter-op threads, spinning
off, graph optimisation), and `Runner.run` is the call the server's worker
thread makes. Nothing else runs meanwhile: no server is up during this step.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from google.protobuf import text_format

from cnnserve.server.runner import Runner, RunnerOptions
from cnnserve.v1 import model_config_pb2 as mc


@dataclass
class BatchFigure:
    batch: int
    runs: int
    inferences_per_s: float
    p50_ms: float


def read_config(model_dir: Path) -> mc.ModelConfig:
    return text_format.Parse((model_dir / "config.pbtxt").read_text(), mc.ModelConfig())


def runner_for(model_dir: Path, device: str = "cpu") -> tuple[Runner, RunnerOptions]:
    """A Runner with the options the server derives from this config."""
    config = read_config(model_dir)
    parameters = {k: v.string_value for k, v in config.parameters.items()}
    instances = sum(max(1, g.count) for g in config.instance_group) or 1
    options = RunnerOptions.from_parameters(
        parameters, device=device, gpu_id=0, instances=instances
    )
    versions = sorted(int(p.name) for p in model_dir.iterdir() if p.name.isdigit())
    return Runner(model_dir / str(versions[-1]) / "model.onnx", options, label="raw"), options


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


def measure(model_dir: Path, seconds: float, device: str = "cpu") -> dict[str, Any]:
    """Inferences/s and p50 at each batch size up to max_batch_size; the best batch.

    The best batch of the sweep is measured again, three times as long: the
    largest of several noisy figures overstates, and every ratio divides by it.
    """
    config = read_config(model_dir)
    runner, options = runner_for(model_dir, device)
    try:
        spec = runner.inputs[0]
        dims = list(spec.shape[1:])
        outputs = [o.name for o in runner.outputs]
        rng = np.random.default_rng(0)
        feeds = {
            b: {spec.name: rng.random((b, *dims), dtype=np.float32)}
            for b in batch_sizes(config.max_batch_size)
        }
        figures = [_figure(runner, f, outputs, b, seconds) for b, f in feeds.items()]
        chosen = max(figures, key=lambda f: f.inferences_per_s).batch
        best = _figure(runner, feeds[chosen], outputs, chosen, 3 * seconds)
    finally:
        runner.close()
    return {
        "provider": runner.provider,
        "intra_op_threads": options.intra_op_threads,
        "inter_op_threads": options.inter_op_threads,
        "batches": [asdict(f) for f in figures],
        "batch1": asdict(figures[0]),
        "best": asdict(best),
    }
