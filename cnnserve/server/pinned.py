"""Page-locked (pinned) host memory for the inputs of a CUDA runner.

A batch bound from ordinary (pageable) memory crosses to the GPU in two copies:
the driver stages it into pinned memory, then DMA moves it. Assembled straight
into pinned memory it crosses in one: the batcher's concatenation writes the
rows there, and onnxruntime's copy to the device reads them by DMA. The memory
comes from the CUDA runtime that onnxruntime's CUDA provider loaded
(`cudaHostAlloc`); where none can be had, inputs stay in ordinary memory.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable, Sequence

import numpy as np

log = logging.getLogger(__name__)

# nbytes → (a uint8 array over the new memory, the function that frees it)
HostAllocator = Callable[[int], tuple[np.ndarray, Callable[[], None]]]

_CUDA_RUNTIMES = ("libcudart.so.13", "libcudart.so.12", "libcudart.so")


def cuda_host_allocator() -> HostAllocator | None:
    """`cudaHostAlloc` from the CUDA runtime in this process, or None where it fails."""
    runtime = None
    for name in _CUDA_RUNTIMES:
        try:
            runtime = ctypes.CDLL(name)
            break
        except OSError:
            continue
    if runtime is None:
        return None
    host_alloc, free_host = runtime.cudaHostAlloc, runtime.cudaFreeHost
    host_alloc.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_uint]
    host_alloc.restype = ctypes.c_int
    free_host.argtypes = [ctypes.c_void_p]
    free_host.restype = ctypes.c_int

    def allocate(nbytes: int) -> tuple[np.ndarray, Callable[[], None]]:
        pointer = ctypes.c_void_p()
        status = host_alloc(ctypes.byref(pointer), nbytes, 0)
        if status != 0 or not pointer.value:
            raise MemoryError(f"cudaHostAlloc of {nbytes} bytes failed (CUDA error {status})")
        address = pointer.value
        memory = np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(address))
        return memory, lambda: free_host(address)

    try:  # a runtime without a usable device fails here, not on the first batch
        _, free = allocate(4096)
        free()
    except MemoryError as exc:
        log.info("pinned host memory is not available: %s", exc)
        return None
    return allocate


class PinnedStaging:
    """One pinned buffer per input, grown to the largest batch seen, reused batch after
    batch. A runner runs one batch at a time, so a buffer is never shared."""

    def __init__(self, allocate: HostAllocator) -> None:
        self._allocate = allocate
        self._buffers: dict[str, tuple[np.ndarray, Callable[[], None]]] = {}

    def gather(self, name: str, parts: Sequence[np.ndarray]) -> np.ndarray:
        """The parts concatenated along the batch axis, in `name`'s pinned buffer."""
        first = parts[0]
        shape = (sum(len(p) for p in parts), *first.shape[1:])
        nbytes = int(np.prod(shape)) * first.dtype.itemsize
        out = self._buffer(name, nbytes)[:nbytes].view(first.dtype).reshape(shape)
        np.concatenate(parts, out=out)
        return out

    def _buffer(self, name: str, nbytes: int) -> np.ndarray:
        held = self._buffers.get(name)
        if held is not None and len(held[0]) >= nbytes:
            return held[0]
        if held is not None:
            held[1]()
            del self._buffers[name]
        size = 1 << max(12, (nbytes - 1).bit_length())  # a power of two: few regrowths
        self._buffers[name] = self._allocate(size)
        return self._buffers[name][0]

    def close(self) -> None:
        for _, free in self._buffers.values():
            free()
        self._buffers.clear()
