"""The int8 and fp16 variants of an exported fp32 model, and their proof against it.

- int8: static quantization with onnxruntime's tools, in the QDQ format, with
  per-channel symmetric int8 weights and asymmetric uint8 activations whose
  ranges come from MinMax calibration. On x86 with VNNI, uint8 x int8 runs
  onnxruntime's fastest integer kernels: int8 activations measured 2.7x slower
  on resnet18 here, and dynamic quantization 5x slower than fp32.
- fp16: initializers and activations in half precision, for GPUs; the input
  and output stay FP32 (a Cast at each end), so configs and clients do not change.

Both are checked against the fp32 ONNX model at batches of 1, 2 and 7 with a
tolerance suited to their precision; top-1 agreement, the accuracy before
and after (when labels are known) and the speed of both, side by side, are
recorded as figures.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx as onnx_lib
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.transformers.float16 import convert_float_to_float16

from cnnserve.export import onnx, speed
from cnnserve.export.calibration import CalibrationSet
from cnnserve.export.catalog import INPUT_NAME, OUTPUT_NAME, VARIANTS
from cnnserve.export.errors import ExportError

# Scale-relative, as for fp32 (see onnx.RTOL). With random weights and synthetic
# calibration, int8 measured 0.4% (googlenet) to 3.1% (vgg16) of the logit scale
# across the zoo; 10% still catches a broken graph or a calibration that does not
# cover the inputs. fp16 measured at most 0.06%.
RTOL = {"int8": 0.1, "fp16": 1e-2}
ATOL = {"int8": 1e-3, "fp16": 1e-4}
METHOD = {
    "int8": "onnxruntime.quantization.quantize_static: QDQ format, per-channel symmetric int8 "
    "weights, asymmetric uint8 activations, MinMax calibration",
    "fp16": "onnxruntime.transformers.float16.convert_float_to_float16(keep_io_types=True): "
    "fp16 initializers and activations, FP32 input and output through Cast nodes",
}
# Where the comparison ran, for fp16: what the figures do and do not prove.
NOTE = {
    "int8": None,
    "fp16": "compared on CPUExecutionProvider, which runs operators that lack fp16 CPU kernels "
    "in fp32 (onnxruntime inserts Casts): the figures prove the graph and the rounded weights, "
    "not fp16 arithmetic; on a GPU, activations beyond +-65504 overflow",
}
CALIBRATION_BATCH = 16
# Figures below these add a warning to the summary (not a failure: export.json has them).
MAX_ACCURACY_DROP = 0.005
MIN_AGREEMENT = 0.99


class _Batches(CalibrationDataReader):
    """Feeds the calibration inputs to onnxruntime's calibrator in fixed-size batches."""

    def __init__(self, x: np.ndarray) -> None:
        self._batches = iter(np.array_split(x, max(1, -(-len(x) // CALIBRATION_BATCH))))

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: batch}


class _DropAdvice(logging.Filter):
    """onnxruntime's quantizer logs advice to pre-process the model (shape inference and
    BatchNorm folding); the exporter already folds BatchNorm into Conv, and pre-processing
    measured no faster here, so the advice is noise for our users."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-process" not in record.getMessage()


@contextmanager
def _quiet_quantizer() -> Iterator[None]:
    root = logging.getLogger()
    advice = _DropAdvice()
    root.addFilter(advice)
    try:
        yield
    finally:
        root.removeFilter(advice)


def quantize_int8(source: Path, target: Path, calibration: np.ndarray) -> None:
    """Write the static QDQ int8 model of `source` (which may keep external data) to `target`."""
    with _quiet_quantizer():
        quantize_static(
            str(source),
            str(target),
            _Batches(calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            use_external_data_format=False,  # int8 weights: a quarter of fp32, one file
        )


def convert_fp16(source: Path, target: Path) -> None:
    """Write the half-precision model of `source`, its input and output kept FP32."""
    model = onnx_lib.load(str(source))  # external data included
    half = convert_float_to_float16(model, keep_io_types=True)
    onnx_lib.save(half, str(target))


def build(variant: str, source: Path, target: Path, calibration: np.ndarray) -> None:
    if variant == "int8":
        quantize_int8(source, target, calibration)
    elif variant == "fp16":
        convert_fp16(source, target)
    else:
        raise ExportError(f"unknown variant {variant!r}; choose {', '.join(VARIANTS)}")


@dataclass(frozen=True)
class Comparison:
    parity: onnx.Parity  # against the fp32 ONNX model, at batches 1, 2 and 7
    golden_output: np.ndarray  # the variant's outputs for the first 7 verification inputs
    reference_output: np.ndarray  # fp32's outputs for the same inputs
    agreement: float  # top-1 agreement with fp32 over all verification inputs
    images: int
    accuracy: dict[str, float] | None  # fp32 and variant accuracy, when labels are known


def compare(
    variant: str,
    fp32: Path,
    candidate: Path,
    x: np.ndarray,
    labels: np.ndarray | None,
    name: str,
) -> Comparison:
    """Run both models on `x`; raises ExportError when a parity batch exceeds the tolerance."""
    reference_session, candidate_session = onnx.session(fp32), _load(candidate, name)
    rtol, atol = RTOL[variant], ATOL[variant]
    batches = []
    for size in onnx.VERIFY_BATCHES:
        (expected,) = reference_session.run([OUTPUT_NAME], {INPUT_NAME: x[:size]})
        (actual,) = candidate_session.run([OUTPUT_NAME], {INPUT_NAME: x[:size]})
        if not np.isfinite(actual).all():
            raise ExportError(
                f"{name}: NaN or infinite outputs at batch {size}"
                + (" (beyond fp16's range of +-65504?)" if variant == "fp16" else "")
            )
        scale = float(np.abs(expected).max())
        error = float(np.abs(actual - expected).max())
        batches.append(onnx.BatchParity(size, error, error / scale if scale else error, scale))
        if not onnx.within(actual, expected, rtol, atol):
            hint = "; calibrate on more, or more typical, inputs" if variant == "int8" else ""
            raise ExportError(
                f"{name}: differs from the fp32 model at batch {size}: max abs error "
                f"{error:.3g} exceeds {atol:g} + {rtol:g} * {scale:.3g}{hint}"
            )
    parity = onnx.Parity(
        batches, rtol, atol, f"max|{variant} - fp32| <= atol + rtol * max|fp32|, per batch"
    )
    reference = _logits(reference_session, x)
    outputs = _logits(candidate_session, x)
    accuracy = None
    if labels is not None:
        accuracy = {
            "fp32": float((reference.argmax(1) == labels).mean()),
            variant: float((outputs.argmax(1) == labels).mean()),
        }
    last = max(onnx.VERIFY_BATCHES)
    return Comparison(
        parity=parity,
        golden_output=outputs[:last],
        reference_output=reference[:last],
        agreement=float((reference.argmax(1) == outputs.argmax(1)).mean()),
        images=len(x),
        accuracy=accuracy,
    )


def _load(path: Path, name: str) -> ort.InferenceSession:
    try:
        return onnx.session(path)
    except onnx.LOAD_ERRORS as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ExportError(f"{name}: onnxruntime cannot load the converted model: {first}") from None


def _logits(session: ort.InferenceSession, x: np.ndarray, batch: int = 64) -> np.ndarray:
    outputs = [
        session.run([OUTPUT_NAME], {INPUT_NAME: x[i : i + batch]})[0]
        for i in range(0, len(x), batch)
    ]
    return np.concatenate(outputs)


@dataclass(frozen=True)
class Outcome:
    """A variant written, compared with fp32 and timed beside it."""

    variant: str
    inputs: CalibrationSet
    comparison: Comparison
    timing: speed.SideBySide
    convert_seconds: float

    def golden(self) -> dict[str, np.ndarray]:
        """golden.npz: the variant's own outputs, and fp32's for the same inputs."""
        count = len(self.comparison.golden_output)
        tensors = {
            INPUT_NAME: self.inputs.verify[:count],
            OUTPUT_NAME: self.comparison.golden_output,
            "reference": self.comparison.reference_output,
        }
        if self.inputs.verify_labels is not None:
            tensors["labels"] = self.inputs.verify_labels[:count]
        return tensors

    def warnings(self) -> list[str]:
        found = []
        accuracy = self.comparison.accuracy
        if accuracy is not None and accuracy["fp32"] - accuracy[self.variant] > MAX_ACCURACY_DROP:
            found.append(
                f"held-out accuracy fell from {accuracy['fp32']:.2%} to "
                f"{accuracy[self.variant]:.2%}"
            )
        if self.comparison.agreement < MIN_AGREEMENT:
            found.append(
                f"top-1 agrees with fp32 on only {self.comparison.agreement:.1%} of "
                f"{self.comparison.images} inputs"
            )
        return found

    def to_json(self, of: str, source: dict[str, object]) -> dict[str, object]:
        """The fields of export.json that a variant adds or replaces; `source` describes
        the fp32 model it was converted from."""
        accuracy = self.comparison.accuracy
        before_after = None
        if accuracy is not None:
            change = (accuracy[self.variant] - accuracy["fp32"]) * 100
            before_after = {**accuracy, "change_points": round(change, 2)}
        return {
            "variant": {
                "kind": self.variant,
                "of": of,
                "method": METHOD[self.variant],
                "note": NOTE[self.variant],
                "source": source,
                "calibration": self.inputs.to_json() if self.variant == "int8" else None,
                "verification": self.inputs.verification_json(),
                "agreement": {"top1": self.comparison.agreement, "inputs": self.comparison.images},
                "accuracy": before_after,
                "speed": self.timing.to_json(),
                "convert_seconds": self.convert_seconds,
            },
            # The entry's own figures: against fp32, and its held-out accuracy.
            "parity": self.comparison.parity.to_json(),
            "accuracy": accuracy[self.variant] if accuracy is not None else None,
        }


def make(variant: str, fp32: Path, target: Path, inputs: CalibrationSet, name: str) -> Outcome:
    """Convert `fp32` to `target`, compare the two on `inputs.verify`, time both."""
    started = time.perf_counter()
    build(variant, fp32, target, inputs.calibrate)
    convert_seconds = round(time.perf_counter() - started, 2)
    comparison = compare(variant, fp32, target, inputs.verify, inputs.verify_labels, name)
    timing = speed.side_by_side(fp32, target, variant, inputs.verify)
    return Outcome(variant, inputs, comparison, timing, convert_seconds)
