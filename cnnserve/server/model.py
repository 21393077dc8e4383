"""One loaded model version: its sessions, its batcher, its statistics.

Loading is blocking (sessions are created and warmed up) and runs off the
event loop; the version is READY only afterwards. The config is completed
from the ONNX graph where it is silent and checked against it where it speaks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cnnserve.server.batcher import Batcher, BatchingOptions, JobResult
from cnnserve.server.converters import RequestDecoder
from cnnserve.server.errors import ModelLoadError
from cnnserve.server.metrics import Metrics, VersionSeries, VersionState
from cnnserve.server.repository import ModelSource
from cnnserve.server.runner import CPU, Runner, RunnerOptions, Timings
from cnnserve.server.stats import VersionStats
from cnnserve.server.tensors import (
    TensorSpec,
    config_enum,
    from_config_enum,
    from_onnx_type,
    numpy_dtype,
)
from cnnserve.v1 import model_config_pb2 as mc

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH_SIZE = 32  # for a config-less model whose graph has a dynamic batch axis
# `inline_compute: auto` runs batches on the event loop when a full one takes less than
# this (the longest the loop may stall), found by timing one row, then a full batch.
INLINE_MAX_BATCH_NS = 2_000_000
_INLINE_MAX_ROW_NS = 200_000
_KINDS = {mc.ModelInstanceGroup.KIND_CPU: "cpu", mc.ModelInstanceGroup.KIND_GPU: "gpu"}


def _onnx_dims(shape: list[object]) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) and d >= 0 else -1 for d in shape)


def _complete(config: mc.ModelConfig, kind: str, graph: list[Any]) -> list[TensorSpec]:
    """Fill config inputs/outputs from the graph if absent, else check them; return specs."""
    declared = config.input if kind == "input" else config.output
    by_name = {arg.name: arg for arg in graph}
    if not declared:
        for arg in graph:
            entry = declared.add()
            entry.name = arg.name
            datatype = from_onnx_type(arg.type)
            if datatype is None:
                raise ModelLoadError(f"{kind} {arg.name!r} has unsupported type {arg.type}")
            entry.data_type = config_enum(datatype)
            dims = _onnx_dims(arg.shape)
            entry.dims.extend(dims[1:] if config.max_batch_size > 0 else dims)
    batch = (-1,) if config.max_batch_size > 0 else ()
    specs = []
    for entry in declared:
        if entry.name not in by_name:
            raise ModelLoadError(f"config {kind} {entry.name!r} is not in the ONNX model")
        arg = by_name[entry.name]
        datatype = from_config_enum(entry.data_type)
        if datatype is None or from_onnx_type(arg.type) != datatype:
            raise ModelLoadError(f"{kind} {entry.name!r}: config type does not match {arg.type}")
        shape = batch + tuple(entry.dims)
        # With `reshape`, clients use `dims` and the graph sees `reshape.shape` (Triton's rule).
        model_shape = batch + tuple(entry.reshape.shape) if entry.HasField("reshape") else shape
        graph_dims = _onnx_dims(arg.shape)
        if len(graph_dims) != len(model_shape) or any(
            g not in (-1, c) for g, c in zip(graph_dims, model_shape, strict=True)
        ):
            raise ModelLoadError(
                f"{kind} {entry.name!r}: config shape {list(model_shape)} does not match the "
                f"ONNX model's {list(graph_dims)}"
            )
        if entry.HasField("reshape") and _count(shape) != _count(model_shape):
            raise ModelLoadError(f"{kind} {entry.name!r}: reshape changes the element count")
        specs.append(TensorSpec(entry.name, datatype, shape, model_shape))
    if kind == "input" and len(declared) != len(graph):
        missing = sorted(set(by_name) - {e.name for e in declared})
        raise ModelLoadError(f"the config does not declare ONNX inputs {missing}")
    return specs


def _count(shape: tuple[int, ...]) -> int:
    return int(np.prod([d for d in shape if d > 0]))


def _batching(config: mc.ModelConfig, default_queue: int) -> BatchingOptions:
    db = config.dynamic_batching
    dynamic = config.HasField("dynamic_batching") and config.max_batch_size > 0
    policy = db.default_queue_policy
    if dynamic and any(not 0 < p <= config.max_batch_size for p in db.preferred_batch_size):
        raise ModelLoadError(  # as Triton refuses it: the config would say what is not done
            f"preferred_batch_size {list(db.preferred_batch_size)} must lie in "
            f"1..max_batch_size ({config.max_batch_size})"
        )
    return BatchingOptions(
        max_batch_size=config.max_batch_size,
        dynamic=dynamic,
        max_queue_delay_ns=db.max_queue_delay_microseconds * 1000,
        preferred_batch_sizes=tuple(sorted(db.preferred_batch_size)) if dynamic else (),
        max_queue_size=policy.max_queue_size or default_queue,
    )


class ModelVersion:
    """A ready-to-serve version; `infer` is the one entry for ModelInfer and Classify."""

    def __init__(self, source: ModelSource, version: int, *, default_queue: int) -> None:
        started = time.perf_counter()
        self.name = source.name
        self.version = version
        self.config = mc.ModelConfig()
        self.config.CopyFrom(source.config)
        self.labels = source.labels
        self.parameters = {k: v.string_value for k, v in self.config.parameters.items()}
        self._source_dir = source.path
        self.stats = VersionStats()
        self._in_use = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed: asyncio.Future[None] | None = None
        self.runners = self._create_runners(source, version)
        try:
            self._describe()
            self.batching = _batching(self.config, default_queue)
            policy = self.config.dynamic_batching.default_queue_policy
            # The queue policy's timeout applies to requests that carry none of their own.
            # With timeout_action DELAY a request past it is still run, as in Triton (which
            # also lowers its priority: this queue has one order, so it waits its turn).
            delay = policy.timeout_action == mc.ModelQueuePolicy.DELAY
            self.default_timeout_us = None if delay else policy.default_timeout_microseconds or None
            self._warm_up()
            if self._runs_inline():
                if "intra_op_threads" not in self.parameters:
                    # One thread: waking onnxruntime's pool costs more than it saves here.
                    self._close_runners()
                    self.runners = self._create_runners(source, version, intra_op_threads=1)
                    self._warm_up()
                for runner in self.runners:
                    runner.inline = True
        except BaseException:
            self._close_runners()
            raise
        self.provider = self.runners[0].provider
        self.inline = self.runners[0].inline
        self.load_seconds = time.perf_counter() - started
        self.batcher: Batcher | None = None
        self.series: VersionSeries | None = None

    def _create_runners(
        self, source: ModelSource, version: int, *, intra_op_threads: int | None = None
    ) -> list[Runner]:
        groups = list(self.config.instance_group) or [mc.ModelInstanceGroup(count=1)]
        runners: list[Runner] = []
        total = sum(max(1, g.count) for g in groups)
        try:
            for g in groups:
                device = _KINDS.get(g.kind, "auto")
                options = RunnerOptions.from_parameters(
                    self.parameters, device=device, gpu_id=(g.gpus or [0])[0], instances=total
                )
                if intra_op_threads is not None:
                    options = dataclasses.replace(options, intra_op_threads=intra_op_threads)
                for _ in range(max(1, g.count)):
                    label = f"{self.name}:{version}#{len(runners)}"
                    runners.append(Runner(source.versions[version], options, label=label))
        except BaseException:
            for r in runners:
                r.close()
            raise
        return runners

    def _describe(self) -> None:
        graph_inputs = list(self.runners[0].inputs)
        if not self.config.input and self.config.max_batch_size == 0:
            axes = [a.shape[0] if a.shape else 1 for a in graph_inputs]
            if axes and all(not isinstance(d, int) for d in axes):
                self.config.max_batch_size = DEFAULT_MAX_BATCH_SIZE
                self.config.dynamic_batching.SetInParent()
        self.inputs = _complete(self.config, "input", graph_inputs)
        self.outputs = _complete(self.config, "output", list(self.runners[0].outputs))
        self.output_names = [o.name for o in self.outputs]
        self._reshapes_inputs = any(i.shape != i.model_shape for i in self.inputs)
        self._reshapes_outputs = any(o.shape != o.model_shape for o in self.outputs)
        self.decoder = RequestDecoder(self.inputs, self.outputs, self.config.max_batch_size)

    def _warm_up(self) -> None:
        """Run each session before it serves, so no request pays for lazy initialisation.

        The config's `model_warmup` entries run as written (zero, random, or raw data from
        the model's `warmup/` folder, `count` times); without any, one batch of zeros.
        """
        plans = list(self.config.model_warmup) or [mc.ModelWarmup(name="zeros", batch_size=1)]
        for plan in plans:
            feeds = self._warmup_feeds(plan)
            if feeds is None:
                continue
            for runner in self.runners:
                for _ in range(max(1, plan.count)):
                    runner.run(feeds, self.output_names)

    def _runs_inline(self) -> bool:
        """The `inline_compute` parameter: true, false, or auto (time it, see the limits)."""
        mode = self.parameters.get("inline_compute", "auto").lower()
        if mode not in ("auto", "true", "false"):
            raise ModelLoadError("parameter inline_compute must be auto, true or false")
        if mode != "auto":
            return mode == "true"
        if len(self.runners) != 1 or self.runners[0].provider != CPU:
            return False
        rows = max(1, self.config.max_batch_size)
        one = self._fastest_run(1)
        if one is None or one > _INLINE_MAX_ROW_NS:
            return False
        full = one if rows == 1 else self._fastest_run(rows)
        return full is not None and full <= INLINE_MAX_BATCH_NS

    def _fastest_run(self, rows: int, tries: int = 3) -> int | None:
        """The shortest of `tries` runs of `rows` rows of zeros, in ns (None: no zeros to feed).

        The first runs of a new shape are slow (onnxruntime allocates), so two go untimed.
        """
        feeds = self._warmup_feeds(mc.ModelWarmup(name="timing", batch_size=rows))
        if feeds is None:
            return None
        for _ in range(2):
            self.runners[0].run(feeds, self.output_names)
        best = None
        for _ in range(tries):
            started = time.perf_counter_ns()
            self.runners[0].run(feeds, self.output_names)
            elapsed = time.perf_counter_ns() - started
            best = elapsed if best is None else min(best, elapsed)
        return best

    def _warmup_feeds(self, plan: mc.ModelWarmup) -> dict[str, np.ndarray] | None:
        rows = max(1, plan.batch_size)
        feeds = {}
        rng = np.random.default_rng(0)
        for spec in self.inputs:
            if spec.datatype == "BYTES":
                return None  # nothing sensible to invent for strings
            shape = [1 if d < 0 else d for d in spec.model_shape]
            if self.config.max_batch_size > 0:
                shape[0] = rows
            dtype = numpy_dtype(spec.datatype)
            given = plan.inputs.get(spec.name)
            if given is not None and given.WhichOneof("input_data_type") == "random_data":
                feeds[spec.name] = rng.random(shape).astype(dtype)
            elif given is not None and given.input_data_file:
                path = self._source_dir / "warmup" / Path(given.input_data_file).name
                try:
                    data = np.fromfile(path, dtype=dtype)
                    feeds[spec.name] = data[: int(np.prod(shape))].reshape(shape)
                except (OSError, ValueError) as exc:
                    raise ModelLoadError(f"warm-up {plan.name!r}: {path.name}: {exc}") from exc
            else:
                feeds[spec.name] = np.zeros(shape, dtype=dtype)
        return feeds

    def start(self, metrics: Metrics | None) -> None:
        """Start the batcher on the running event loop."""
        self.series = None if metrics is None else metrics.series(self.name, str(self.version))
        series = self.series

        def on_execution(rows: int, t: Timings) -> None:
            self.stats.record_execution(rows, t)
            if series is not None:
                series.batch_size.observe(rows)
                series.executions.inc()
                series.compute_duration.observe((t.input_ns + t.infer_ns + t.output_ns) / 1e9)

        self.batcher = Batcher(self.runners, self.output_names, self.batching, on_execution)
        self.batcher.start()

    async def infer(
        self,
        inputs: Mapping[str, np.ndarray],
        rows: int,
        deadline_ns: int | None,
        *,
        expire: bool = False,
    ) -> JobResult:
        assert self.batcher is not None, "start() first"
        if self._reshapes_inputs:
            feeds = {s.name: _reshape(inputs[s.name], s.model_shape, rows) for s in self.inputs}
        else:  # already in the graph's shape (decoding checked it), in the model's order
            feeds = {s.name: inputs[s.name] for s in self.inputs}
        result = await self.batcher.submit(feeds, rows, deadline_ns, expire=expire)
        if not self._reshapes_outputs:
            return result
        outputs = [
            _reshape(o, s.shape, rows) for o, s in zip(result.outputs, self.outputs, strict=True)
        ]
        return JobResult(outputs, result.queue_ns, result.timings)

    def acquire(self) -> None:
        """Mark one caller using this version; `close` waits until every caller released it."""
        self._in_use += 1
        self._idle.clear()

    def release(self) -> None:
        self._in_use -= 1
        if self._in_use == 0:
            self._idle.set()

    def state(self) -> VersionState:
        pending = self.batcher.pending if self.batcher is not None else 0
        return VersionState(
            self.name, str(self.version), True, pending, self.load_seconds, self.provider
        )

    async def close(self) -> None:
        """Drain: wait for callers, finish queued work, then free the sessions. Closing
        twice waits for the one drain."""
        if self._closed is None:
            self._closed = asyncio.ensure_future(self._drain())
        await asyncio.shield(self._closed)

    async def _drain(self) -> None:
        await self._idle.wait()
        if self.batcher is not None:
            await self.batcher.close()
        await asyncio.get_running_loop().run_in_executor(None, self._close_runners)

    def _close_runners(self) -> None:
        for runner in self.runners:
            runner.close()


def _reshape(array: np.ndarray, shape: tuple[int, ...], rows: int) -> np.ndarray:
    """`array` in `shape`, the batch axis (-1 first) taking `rows`; a view, never a copy."""
    if len(shape) == array.ndim and all(
        w in (-1, g) for w, g in zip(shape, array.shape, strict=True)
    ):
        return array
    target = tuple(rows if i == 0 and d < 0 else d for i, d in enumerate(shape))
    return array.reshape(target)
