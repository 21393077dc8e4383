"""ONNX export and its proof: torch.onnx (dynamo) with a dynamic batch axis, then
onnxruntime against PyTorch at several batch sizes, with golden tensors kept.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnx import defs as onnx_defs
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors
from torch import nn

from cnnserve.export.catalog import INPUT_NAME, OUTPUT_NAME
from cnnserve.export.errors import ExportError

DEFAULT_OPSET = 20
# Lower opsets go through onnxscript's version converter, which fails on many graphs.
MIN_OPSET = 18
# The newest opset onnxruntime 1.31 (pinned in pyproject) officially loads.
MAX_OPSET = 26
VERIFY_BATCHES = (1, 2, 7)
# Errors are measured against the scale of the PyTorch output rather than
# elementwise: random-weight models give logits anywhere from ~1e-2
# (GoogLeNet, near-constant) to ~1e7 (ResNet-152), and elementwise relative
# error explodes on logits near zero. float32 reordering across 150 layers
# stays below 1e-6 of the scale; 1e-4 leaves room for other CPUs.
RTOL = 1e-4
ATOL = 1e-6
# What onnxruntime raises for a model it cannot load (e.g. an opset newer than it knows).
LOAD_ERRORS = (ort_errors.Fail, ort_errors.InvalidGraph, ort_errors.NotImplemented)


@dataclass(frozen=True)
class BatchParity:
    batch: int
    max_abs_error: float  # max |onnxruntime - pytorch|
    max_rel_error: float  # max_abs_error / max |pytorch|
    max_abs_reference: float  # max |pytorch|, the scale


@dataclass(frozen=True)
class Parity:
    batches: list[BatchParity]
    rtol: float = RTOL
    atol: float = ATOL
    rule: str = "max|ort - torch| <= atol + rtol * max|torch|, per batch"
    provider: str = "CPUExecutionProvider"
    max_abs_error: float = field(init=False)
    max_rel_error: float = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "max_abs_error", max(b.max_abs_error for b in self.batches))
        object.__setattr__(self, "max_rel_error", max(b.max_rel_error for b in self.batches))

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def within(
    actual: np.ndarray, expected: np.ndarray, rtol: float = RTOL, atol: float = ATOL
) -> bool:
    """The parity rule, for tests and callers that hold golden tensors."""
    scale = float(np.abs(expected).max())
    return float(np.abs(actual - expected).max()) <= atol + rtol * scale


def check_opset(opset: int) -> None:
    """Opsets the dynamo exporter writes natively (18) up to the newest onnxruntime loads."""
    newest = min(MAX_OPSET, onnx_defs.onnx_opset_version())
    if not MIN_OPSET <= opset <= newest:
        raise ExportError(f"opset {opset} is out of range; choose {MIN_OPSET} to {newest}")


def export(model: nn.Module, path: Path, input_dims: tuple[int, ...], opset: int) -> None:
    """Write `path` (and `path.data` with the weights) with a dynamic batch axis."""
    # A batch of 2 as the example: torch.export specialises dimensions of size 1.
    example = torch.zeros(2, *input_dims)
    batch = torch.export.Dim("batch")
    program = torch.onnx.export(
        model,
        (example,),
        str(path),
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes=({0: batch},),
        opset_version=opset,
        dynamo=True,
        external_data=True,
        verbose=False,
    )
    # An opset the version converter cannot reach is logged, not raised, and
    # the model keeps the exporter's native opset.
    written = program.model.opset_imports.get("") if program is not None else None
    if written != opset:
        raise ExportError(
            f"opset {opset} is not supported by torch.onnx (it wrote opset {written})"
        )


def session(path: Path) -> ort.InferenceSession:
    """A CPU session: verification compares numerics, not speed, and must run anywhere."""
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only; warnings about unused initializers are noise
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@torch.no_grad()
def verify(
    model: nn.Module, path: Path, golden_input: np.ndarray, name: str
) -> tuple[Parity, np.ndarray]:
    """Compare onnxruntime with PyTorch on the first 1, 2 and 7 rows of `golden_input`.

    Returns the parity figures and PyTorch's output for the whole golden
    input; raises ExportError when a batch exceeds the tolerance.
    """
    try:
        runtime = session(path)
    except LOAD_ERRORS as exc:
        # e.g. an opset newer than this onnxruntime knows
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ExportError(f"{name}: onnxruntime cannot load the exported model: {first}") from None
    results = []
    reference = np.empty(0, dtype=np.float32)
    for size in VERIFY_BATCHES:
        x = golden_input[:size]
        reference = model(torch.from_numpy(x)).numpy()
        (actual,) = runtime.run([OUTPUT_NAME], {INPUT_NAME: x})
        if actual.shape != reference.shape:
            raise ExportError(
                f"{name}: onnxruntime gives shape {actual.shape}, PyTorch {reference.shape}"
            )
        if not np.isfinite(reference).all():
            raise ExportError(f"{name}: PyTorch gives NaN or infinite outputs at batch {size}")
        scale = float(np.abs(reference).max())
        error = float(np.abs(actual - reference).max())
        results.append(BatchParity(size, error, error / scale if scale else error, scale))
        if not within(actual, reference):
            raise ExportError(
                f"{name}: onnxruntime differs from PyTorch at batch {size}: max abs error "
                f"{error:.3g} exceeds {ATOL:g} + {RTOL:g} * {scale:.3g}"
            )
    return Parity(results), reference


def golden_input(input_dims: tuple[int, ...], seed: int) -> np.ndarray:
    """Seeded standard-normal inputs, the scale of normalised images."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((max(VERIFY_BATCHES), *input_dims), dtype=np.float32)
