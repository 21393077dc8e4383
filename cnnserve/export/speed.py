"""fp32 against a variant, timed side by side in one process with the same session options.

The two sessions take turns, one run each per round, so that a neighbour
loading the machine slows both alike. The median over rounds is the typical
time; the best is what the model costs when nothing else runs, and the steadier
figure on a shared machine.
These are figures for export.json, not a pass/fail: `make bench` measures serving.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from cnnserve.export.catalog import INPUT_NAME, OUTPUT_NAME

BATCHES = (1, 8)
MIN_ROUNDS = 5
MAX_ROUNDS = 200
# Per batch size; a round always completes, so VGG-16 at batch 8 takes longer.
BUDGET_S = 2.0
SESSION = (
    "CPUExecutionProvider, intra_op_num_threads=0 (onnxruntime's choice), ORT_ENABLE_ALL, "
    "no spinning: the server's defaults for one instance"
)


@dataclass(frozen=True)
class SideBySide:
    variant: str  # "int8" or "fp16"
    fp32_ms: dict[int, list[float]]  # batch size -> milliseconds per batch, one per round
    variant_ms: dict[int, list[float]]

    def speedup(self, batch: int) -> float:
        """fp32's median time over the variant's."""
        return float(np.median(self.fp32_ms[batch]) / np.median(self.variant_ms[batch]))

    def to_json(self) -> dict[str, object]:
        def figures(batch: int) -> dict[str, object]:
            times = {"fp32": self.fp32_ms[batch], self.variant: self.variant_ms[batch]}
            return {
                **{f"{k}_ms": round(float(np.median(v)), 3) for k, v in times.items()},
                **{f"{k}_best_ms": round(min(v), 3) for k, v in times.items()},
                "speedup": round(self.speedup(batch), 2),
                "speedup_best": round(min(self.fp32_ms[batch]) / min(self.variant_ms[batch]), 2),
                "rounds": len(self.fp32_ms[batch]),
            }

        return {
            "unit": "milliseconds per batch: median and best of interleaved rounds",
            "session": SESSION,
            "cpu_count": os.cpu_count(),
            "batches": {str(b): figures(b) for b in self.fp32_ms},
        }


def server_session(path: Path) -> ort.InferenceSession:
    """See SESSION."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def side_by_side(fp32: Path, variant_path: Path, variant: str, x: np.ndarray) -> SideBySide:
    """Milliseconds per batch for both models at batches of 1 and 8 (rows of `x`, tiled)."""
    sessions = (server_session(fp32), server_session(variant_path))
    result = SideBySide(variant, {}, {})
    for size in BATCHES:
        batch = np.ascontiguousarray(np.resize(x, (size, *x.shape[1:])))
        times: tuple[list[float], list[float]] = ([], [])
        for session in sessions:  # warm-up: allocations, kernel selection
            session.run([OUTPUT_NAME], {INPUT_NAME: batch})
        started = time.perf_counter()
        rounds = 0
        while rounds < MIN_ROUNDS or (
            rounds < MAX_ROUNDS and time.perf_counter() - started < BUDGET_S
        ):
            for session, spent in zip(sessions, times, strict=True):
                t0 = time.perf_counter_ns()
                session.run([OUTPUT_NAME], {INPUT_NAME: batch})
                spent.append((time.perf_counter_ns() - t0) / 1e6)
            rounds += 1
        result.fp32_ms[size], result.variant_ms[size] = times
    return result
