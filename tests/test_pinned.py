"""Pinned staging of CUDA inputs: the buffer logic on ordinary memory, the CUDA runtime where
a GPU is present, and the CPU runner's gather (no staging, no copy for a lone request)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from cnnserve.server.pinned import PinnedStaging, cuda_host_allocator
from cnnserve.server.runner import Runner, RunnerOptions
from tests.tiny import write_tiny

HAS_GPU = Path("/dev/nvidiactl").exists()


class CountingAllocator:
    """Ordinary memory standing in for cudaHostAlloc, counting what is held."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.held = 0

    def __call__(self, nbytes: int) -> tuple[np.ndarray, Callable[[], None]]:
        self.sizes.append(nbytes)
        self.held += 1

        def free() -> None:
            self.held -= 1

        return np.empty(nbytes, np.uint8), free


def test_staging_concatenates_into_one_reused_buffer_per_input() -> None:
    allocate = CountingAllocator()
    staging = PinnedStaging(allocate)
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    b = np.arange(8, dtype=np.float32).reshape(2, 4) + 100
    batch = staging.gather("x", [a, b[:1]])
    np.testing.assert_array_equal(batch, np.concatenate([a, b[:1]]))
    assert batch.dtype == np.float32
    assert batch.shape == (4, 4)
    again = staging.gather("x", [b])  # smaller: the same memory, no allocation
    np.testing.assert_array_equal(again, b)
    assert np.shares_memory(batch, again)
    assert allocate.sizes == [4096]
    big = np.ones((2000, 4), np.float32)  # 32,000 bytes: a larger buffer replaces the first
    np.testing.assert_array_equal(staging.gather("x", [big, a]), np.concatenate([big, a]))
    assert allocate.sizes == [4096, 32768]
    assert allocate.held == 1
    staging.gather("other", [a])
    assert allocate.held == 2
    staging.close()
    assert allocate.held == 0


@pytest.mark.skipif(HAS_GPU, reason="checks the fallback where no GPU is present")
def test_without_a_gpu_there_is_no_pinned_memory_and_no_error() -> None:
    assert cuda_host_allocator() is None


@pytest.mark.skipif(not HAS_GPU, reason="needs an NVIDIA GPU and the CUDA runtime")
def test_cuda_runtime_gives_pinned_buffers() -> None:
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    allocate = cuda_host_allocator()
    assert allocate is not None
    staging = PinnedStaging(allocate)
    rows = np.random.default_rng(0).random((8, 3, 224, 224), dtype=np.float32)
    np.testing.assert_array_equal(staging.gather("input", [rows[:5], rows[5:]]), rows)
    staging.close()


def test_cpu_runner_gathers_without_staging(tmp_path: Path) -> None:
    model = write_tiny(tmp_path, config=None) / "1" / "model.onnx"
    runner = Runner(model, RunnerOptions(device="cpu"), label="tiny")
    try:
        x = np.ones((3, 4), np.float32)
        assert runner.gather("x", [x]) is x
        joined = runner.gather("x", [x, x[:1]])
        assert joined.shape == (4, 4)
        assert not np.shares_memory(joined, x)
    finally:
        runner.close()
