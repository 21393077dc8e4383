"""Prometheus metrics, one registry per server (two servers in one process stay apart).

Histograms and counters are observed as requests pass; the gauges that
describe state (pending requests, readiness, load time, provider) are read
from the registry of models at scrape time, so they are exact and a model
that is unloaded leaves no stale series. The per-version histograms are
observed on the event loop thread only, so they are `LoopHistogram`s: an
observation is a list increment, where prometheus_client's Histogram takes a
lock for each bucket and the sum.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
)
from prometheus_client.core import (
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

# 50 µs .. 30 s, roughly ×2.5 apart.
DURATION_BUCKETS = (
    5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
VERSION_LABELS = ("model", "version")
# A client's deadline reaches the server as a cancel a little before the server's own copy
# of that deadline runs out (it started counting later): a cancel this close to the
# deadline is counted as the deadline's.
DEADLINE_SLACK_S = 0.05


@dataclass(frozen=True)
class VersionState:
    """What the scrape-time collector reads about one loaded (or failed) version."""

    model: str
    version: str
    ready: bool
    pending: int
    load_seconds: float
    provider: str


class HistogramSeries:
    """One label set's buckets and sum; observed from one thread (the event loop)."""

    __slots__ = ("_bounds", "_counts", "_sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self._counts = [0] * (len(bounds) + 1)  # the last is +Inf
        self._sum = 0.0

    def observe(self, value: float) -> None:
        # Prometheus buckets are upper bounds, inclusive: the first bound >= value.
        self._counts[bisect.bisect_left(self._bounds, value)] += 1
        self._sum += value

    def snapshot(self) -> tuple[list[int], float]:
        return list(self._counts), self._sum


class LoopHistogram(Collector):
    """A labelled histogram family for observations made on the event loop thread.

    It exposes what prometheus_client's Histogram does (`_bucket` by `le`, `_count`,
    `_sum`) except `_created`, and offers the same `labels` and `remove`. The scrape
    thread reads a copy of each series' counts, so its buckets never decrease from one
    `le` to the next; the sum is read just after them.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        *,
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._labelnames = tuple(labelnames)
        self._bounds = tuple(float(b) for b in buckets)
        self._les = [floatToGoString(b) for b in self._bounds] + ["+Inf"]
        self._series: dict[tuple[str, ...], HistogramSeries] = {}
        registry.register(self)

    def labels(self, *values: str) -> HistogramSeries:
        found = self._series.get(values)
        if found is None:
            found = self._series[values] = HistogramSeries(self._bounds)
        return found

    def remove(self, *values: str) -> None:
        del self._series[values]

    def describe(self) -> Iterator[Metric]:
        yield HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self._name, self._documentation, labels=self._labelnames)
        for values, series in list(self._series.items()):
            counts, total = series.snapshot()
            cumulative = itertools.accumulate(counts)
            family.add_metric(list(values), list(zip(self._les, cumulative, strict=True)), total)
        yield family


class _StateCollector(Collector):
    def __init__(self, states: Callable[[], Iterable[VersionState]]) -> None:
        self._states = states

    def collect(self) -> Iterator[Metric]:
        pending = GaugeMetricFamily(
            "cnnserve_inference_pending_requests",
            "Requests queued or executing.",
            labels=VERSION_LABELS,
        )
        ready = GaugeMetricFamily(
            "cnnserve_model_ready", "1 when the version serves requests.", labels=VERSION_LABELS
        )
        load = GaugeMetricFamily(
            "cnnserve_model_load_duration_seconds",
            "Time to create the sessions and warm them up.",
            labels=VERSION_LABELS,
        )
        provider = InfoMetricFamily(
            "cnnserve_model_execution_provider",
            "The onnxruntime execution provider in use.",
            labels=VERSION_LABELS,
        )
        for s in self._states():
            pending.add_metric([s.model, s.version], s.pending)
            ready.add_metric([s.model, s.version], 1.0 if s.ready else 0.0)
            load.add_metric([s.model, s.version], s.load_seconds)
            if s.provider:
                provider.add_metric([s.model, s.version], {"provider": s.provider})
        yield from (pending, ready, load, provider)


class _GpuCollector(Collector):
    """GPU utilisation and memory through NVML; no series at all where there is no GPU."""

    def __init__(self) -> None:
        self._nvml: Any = None
        try:
            import pynvml

            pynvml.nvmlInit()
            if pynvml.nvmlDeviceGetCount() > 0:
                self._nvml = pynvml
        except Exception:  # no library, no driver or no device: nothing to report
            self._nvml = None

    def collect(self) -> Iterator[Metric]:
        if self._nvml is None:
            return
        nvml = self._nvml
        utilization = GaugeMetricFamily(
            "cnnserve_gpu_utilization_ratio",
            "Fraction of the last sample period the GPU was busy.",
            labels=["gpu"],
        )
        used = GaugeMetricFamily(
            "cnnserve_gpu_memory_used_bytes", "GPU memory used.", labels=["gpu"]
        )
        total = GaugeMetricFamily(
            "cnnserve_gpu_memory_total_bytes", "GPU memory in all.", labels=["gpu"]
        )
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            rates = nvml.nvmlDeviceGetUtilizationRates(handle)
            utilization.add_metric([str(index)], rates.gpu / 100.0)
            used.add_metric([str(index)], float(memory.used))
            total.add_metric([str(index)], float(memory.total))
        yield from (utilization, used, total)


class VersionSeries:
    """One version's series, labelled once: the request path only observes."""

    def __init__(self, metrics: Metrics, model: str, version: str) -> None:
        labels = (model, version)
        self.request_duration = metrics.request_duration.labels(*labels)
        self.queue_duration = metrics.queue_duration.labels(*labels)
        self.compute_duration = metrics.compute_duration.labels(*labels)
        self.preprocess_duration = metrics.preprocess_duration.labels(*labels)
        self.batch_size = metrics.batch_size.labels(*labels)
        self.executions = metrics.executions.labels(*labels)
        self._requests = metrics.requests
        self._labels = labels
        self._outcomes: dict[str, Counter] = {}

    def requests(self, outcome: str) -> Counter:
        counter = self._outcomes.get(outcome)
        if counter is None:
            counter = self._outcomes[outcome] = self._requests.labels(*self._labels, outcome)
        return counter


class Metrics:
    """The metric families of one server; see the README's Metrics section."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # The standard process_*, python_* and python_gc_* series, in our own registry.
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR, _GpuCollector()):
            r.register(collector)
        self.requests = Counter(
            "cnnserve_inference_requests",
            "Inference requests by outcome (success, or the gRPC status code name).",
            [*VERSION_LABELS, "outcome"],
            registry=r,
        )
        self.request_duration = LoopHistogram(
            "cnnserve_inference_request_duration_seconds",
            "Time from arrival to answer, for each inference request.",
            VERSION_LABELS,
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.queue_duration = LoopHistogram(
            "cnnserve_inference_queue_duration_seconds",
            "Time a request waited in the batcher's queue.",
            VERSION_LABELS,
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.compute_duration = LoopHistogram(
            "cnnserve_inference_compute_duration_seconds",
            "Time of one batch execution: inputs, inference, outputs.",
            VERSION_LABELS,
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.preprocess_duration = LoopHistogram(
            "cnnserve_inference_preprocess_duration_seconds",
            "Time to decode and preprocess one image for Classify.",
            VERSION_LABELS,
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.batch_size = LoopHistogram(
            "cnnserve_inference_batch_size",
            "Rows in each executed batch.",
            VERSION_LABELS,
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.executions = Counter(
            "cnnserve_inference_executions",
            "Model executions (one per batch).",
            VERSION_LABELS,
            registry=r,
        )
        self.grpc_requests = Counter(
            "cnnserve_grpc_requests",
            "gRPC calls by method and status code.",
            ["method", "code"],
            registry=r,
        )
        self._series: dict[tuple[str, str], VersionSeries] = {}
        self._holders: dict[tuple[str, str], int] = {}  # loaded copies using each version's series
        self._labelled = (
            self.request_duration,
            self.queue_duration,
            self.compute_duration,
            self.preprocess_duration,
            self.batch_size,
            self.executions,
        )

    def watch(self, states: Callable[[], Iterable[VersionState]]) -> None:
        """Publish the registry's state gauges, read at each scrape."""
        self.registry.register(_StateCollector(states))

    def series(self, model: str, version: str) -> VersionSeries:
        """The version's series, made on first use and kept until every loaded copy of
        that version is forgotten: a reload of the same version number goes on counting
        in them while the copy it replaces drains."""
        key = (model, version)
        found = self._series.get(key)
        if found is None:
            found = self._series[key] = VersionSeries(self, model, version)
        self._holders[key] = self._holders.get(key, 0) + 1
        return found

    def forget(self, model: str, version: str) -> None:
        """An unloaded copy of the version is gone; with the last, its series go, so that
        none go stale."""
        key = (model, version)
        self._holders[key] = self._holders.get(key, 1) - 1
        if self._holders[key] > 0:
            return
        del self._holders[key]
        self._series.pop(key, None)
        for family in self._labelled:
            with contextlib.suppress(KeyError):
                family.remove(model, version)
        for outcome in _outcomes(self.requests, model, version):
            self.requests.remove(model, version, outcome)


def _outcomes(counter: Counter, model: str, version: str) -> list[str]:
    return [
        labels[2]
        for labels in list(counter._metrics)  # prometheus_client exposes no public listing
        if labels[0] == model and labels[1] == version
    ]
