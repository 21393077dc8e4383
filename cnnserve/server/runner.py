"""One onnxruntime session on one device, with the one thread that runs it.

Providers are chosen in the order TensorRT (opt-in), CUDA, CPU. What
onnxruntime lists as available is what was compiled in, not what works, so the
provider in use is read back from the session after it is created. With CUDA,
a batch is assembled in pinned host memory and copied to the device once, and
outputs stay on the device until one copy back (IO binding).

A runner whose batches take microseconds (LeNet-5 on a CPU) runs them `inline`,
on the event loop's own thread: handing such a batch to a worker thread and back
costs more than computing it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import onnxruntime as ort

from cnnserve.server.errors import ModelLoadError
from cnnserve.server.pinned import PinnedStaging, cuda_host_allocator

log = logging.getLogger(__name__)
T = TypeVar("T")

# onnxruntime's default logger reports a missing CUDA library as an error at session
# creation; our own warning says which provider runs instead.
ort.set_default_logger_severity(4)

CPU, CUDA, TENSORRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
_GRAPH_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


@dataclass(frozen=True)
class RunnerOptions:
    """Session settings, from the model config's instance_group and parameters."""

    device: str = "auto"  # auto | cpu | gpu
    gpu_id: int = 0
    tensorrt: bool = False
    intra_op_threads: int = 0  # 0: onnxruntime decides
    inter_op_threads: int = 0
    graph_optimization: str = "all"
    allow_spinning: bool = False

    @classmethod
    def from_parameters(
        cls, params: Mapping[str, str], *, device: str, gpu_id: int, instances: int
    ) -> RunnerOptions:
        def number(key: str, default: int) -> int:
            try:
                return int(params.get(key, default))
            except ValueError as exc:
                raise ModelLoadError(f"parameter {key} must be an integer") from exc

        # Several runners share the cores: split them rather than oversubscribe. Under a
        # CPU quota (a container's limit) onnxruntime would still size its pool by the
        # host's cores, so the quota sets the count.
        cores, limited = usable_cores()
        default_intra = 0 if instances <= 1 and not limited else max(1, cores // instances)
        level = params.get("graph_optimization_level", "all")
        if level not in _GRAPH_LEVELS:
            raise ModelLoadError(f"graph_optimization_level must be one of {sorted(_GRAPH_LEVELS)}")
        return cls(
            device=device,
            gpu_id=gpu_id,
            tensorrt=params.get("tensorrt", "false").lower() == "true",
            intra_op_threads=number("intra_op_threads", default_intra),
            inter_op_threads=number("inter_op_threads", 0),
            graph_optimization=level,
            allow_spinning=params.get("allow_spinning", "false").lower() == "true",
        )


def usable_cores(cgroup: Path = Path("/sys/fs/cgroup")) -> tuple[int, bool]:
    """The cores this process may use, and whether a CPU quota (cgroup v2 `cpu.max`, or
    v1 `cpu.cfs_quota_us`) limits them below what the scheduler would give it."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    quota = period = None
    try:
        if (cgroup / "cpu.max").is_file():
            text = (cgroup / "cpu.max").read_text().split()
            if text and text[0] != "max":
                quota, period = int(text[0]), int(text[1])
        elif (cgroup / "cpu" / "cpu.cfs_quota_us").is_file():
            quota = int((cgroup / "cpu" / "cpu.cfs_quota_us").read_text())
            period = int((cgroup / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError, IndexError):
        return cores, False
    if quota is None or period is None or quota <= 0 or period <= 0:
        return cores, False
    allowed = max(1, math.ceil(quota / period))
    return min(cores, allowed), allowed < cores


@functools.cache
def _load_cuda_libraries() -> None:
    """Load CUDA and cuDNN from the nvidia-* wheels, where the process would not find them."""
    if hasattr(ort, "preload_dlls"):
        try:
            ort.preload_dlls()
        except Exception as exc:  # missing libraries: the CPU fallback says so later
            log.debug("preloading CUDA libraries failed: %s", exc)


def _providers(options: RunnerOptions) -> list[str | tuple[str, dict[str, object]]]:
    compiled_in = set(ort.get_available_providers())
    chosen: list[str | tuple[str, dict[str, object]]] = []
    if options.device != "cpu" and CUDA in compiled_in and Path("/dev/nvidiactl").exists():
        _load_cuda_libraries()
    if options.device != "cpu":
        if options.tensorrt and TENSORRT in compiled_in:
            chosen.append((TENSORRT, {"device_id": options.gpu_id}))
        if CUDA in compiled_in:
            chosen.append((CUDA, {"device_id": options.gpu_id}))
    chosen.append(CPU)
    return chosen


@dataclass(frozen=True)
class Timings:
    """Nanoseconds spent preparing inputs, executing, and extracting outputs."""

    input_ns: int
    infer_ns: int
    output_ns: int


class Runner:
    """An onnxruntime session and its worker thread; `run` executes one batch."""

    def __init__(self, model_path: Path, options: RunnerOptions, *, label: str) -> None:
        self.label = label
        so = ort.SessionOptions()
        so.intra_op_num_threads = options.intra_op_threads
        so.inter_op_num_threads = options.inter_op_threads
        so.graph_optimization_level = _GRAPH_LEVELS[options.graph_optimization]
        so.log_severity_level = 3  # our own log says which provider runs
        # Spinning worker threads would take the cores from the event loop between batches.
        spin = "1" if options.allow_spinning else "0"
        so.add_session_config_entry("session.intra_op.allow_spinning", spin)
        so.add_session_config_entry("session.inter_op.allow_spinning", spin)
        wanted = _providers(options)
        try:
            self._session = ort.InferenceSession(str(model_path), so, providers=wanted)
        except Exception as exc:  # onnxruntime raises its own exception types for bad models
            if len(wanted) == 1:
                raise ModelLoadError(f"onnxruntime cannot load {model_path.name}: {exc}") from exc
            log.warning("%s: accelerated providers failed (%s); using the CPU", label, exc)
            try:
                self._session = ort.InferenceSession(str(model_path), so, providers=[CPU])
            except Exception as cpu_exc:
                raise ModelLoadError(
                    f"onnxruntime cannot load {model_path.name}: {cpu_exc}"
                ) from cpu_exc
        self.provider = self._session.get_providers()[0]
        first_wanted = wanted[0] if isinstance(wanted[0], str) else wanted[0][0]
        if self.provider != first_wanted:
            log.warning(
                "%s: %s is not usable here; running on %s", label, first_wanted, self.provider
            )
        self.options = options
        self._device_id = options.gpu_id
        self._staging: PinnedStaging | None = None
        if self.provider in (CUDA, TENSORRT):
            allocator = cuda_host_allocator()
            if allocator is not None:
                self._staging = PinnedStaging(allocator)
            else:
                log.warning("%s: no pinned host memory; inputs go from ordinary memory", label)
        self.inline = False
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"runner-{label}")

    @property
    def inputs(self) -> Sequence[ort.NodeArg]:
        return self._session.get_inputs()

    @property
    def outputs(self) -> Sequence[ort.NodeArg]:
        return self._session.get_outputs()

    def gather(self, name: str, parts: Sequence[np.ndarray]) -> np.ndarray:
        """Rows from several requests as one batch input (pinned memory on CUDA);
        a lone part on the CPU is used as it is."""
        if self._staging is not None and parts[0].dtype != np.object_:
            return self._staging.gather(name, parts)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def run(
        self, feeds: Mapping[str, np.ndarray], output_names: Sequence[str]
    ) -> tuple[list[np.ndarray], Timings]:
        """Execute one batch in the calling thread (the runner's own, via `submit`)."""
        t0 = time.perf_counter_ns()
        if self.provider in (CUDA, TENSORRT):
            binding = self._session.io_binding()
            for name, array in feeds.items():
                binding.bind_cpu_input(name, np.ascontiguousarray(array))
            for name in output_names:
                binding.bind_output(name, "cuda", self._device_id)
            t1 = time.perf_counter_ns()
            self._session.run_with_iobinding(binding)
            t2 = time.perf_counter_ns()
            results = list(binding.copy_outputs_to_cpu())
        else:
            t1 = time.perf_counter_ns()
            results = self._session.run(list(output_names), dict(feeds))
            t2 = time.perf_counter_ns()
        t3 = time.perf_counter_ns()
        return results, Timings(t1 - t0, t2 - t1, t3 - t2)

    def submit(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        """Run `fn` on this runner's thread, or at once when the runner is `inline`."""
        loop = asyncio.get_running_loop()
        if not self.inline:
            return loop.run_in_executor(self._executor, fn)
        future: asyncio.Future[T] = loop.create_future()
        try:
            future.set_result(fn())
        except Exception as exc:  # delivered to the batch's requests, as from the thread
            future.set_exception(exc)
        return future

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        del self._session
        if self._staging is not None:
            self._staging.close()
