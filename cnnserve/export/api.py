"""`export_model`: one model from weights to a verified repository entry.

The order of work: check the repository and version (cheap, before any
training), get the weights, export to ONNX in a staging folder, verify it
against PyTorch, write golden tensors, labels, config and export.json, then
rename the entry into place.

A variant (`variant="int8"` or `"fp16"`) is written as its own model,
`<name>_int8` or `<name>_fp16`, with the fp32 model's config, labels and
preprocessing: the fp32 ONNX model is exported and verified as above in a
scratch folder (or copied there from the repository, `weights="repository"`),
converted, compared with the fp32 model on held-out inputs, timed beside it,
and only the variant lands in the repository.
"""

from __future__ import annotations

import importlib.metadata
import platform
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from torch import nn
from tqdm import tqdm

from cnnserve import __version__
from cnnserve.export import calibration, onnx, train, variants, write, zoo
from cnnserve.export import source as source_of
from cnnserve.export.catalog import (
    INPUT_NAME,
    OUTPUT_NAME,
    REPOSITORY,
    ModelSpec,
    check_options,
    check_variant_options,
    spec,
    variant_name,
)


@dataclass(frozen=True)
class ExportResult:
    name: str
    version: int
    path: Path  # the version folder
    weights: str  # e.g. "trained (digits)", "random", "pretrained (ResNet18_Weights.IMAGENET1K_V1)"
    max_abs_error: float
    max_rel_error: float
    accuracy: float | None  # held-out accuracy, for a model trained here
    size_bytes: int  # model.onnx and its external data
    seconds: float
    warning: str | None  # set when `auto` fell back to random weights
    variant: str | None = None  # "int8" or "fp16": `name` is then "<model>_<variant>"
    reference_accuracy: float | None = None  # the fp32 model's, beside a variant's `accuracy`
    agreement: float | None = None  # a variant's top-1 agreement with fp32
    speedup: float | None = None  # fp32 time / variant time at batch 8, on this CPU


def export_model(
    name: str,
    repository: Path | str,
    *,
    weights: str = "random",
    version: int | None = None,
    max_batch_size: int | None = None,
    opset: int = onnx.DEFAULT_OPSET,
    force: bool = False,
    seed: int = 0,
    mnist_dir: Path | str | None = None,
    dataset: str = "auto",
    epochs: int | None = None,
    variant: str | None = None,
    calibration_dir: Path | str | None = None,
    calibration_size: int | None = None,
) -> ExportResult:
    """Export `name` into `repository`; raises ExportError with a one-line message on bad input.

    `weights`: "random" (seeded), "pretrained" (torchvision's ImageNet weights;
    for lenet5, trained here), "auto" (pretrained when reachable, else random
    with a warning), the path of a state-dict checkpoint, or, for a variant,
    "repository": the latest fp32 version of `name` already in `repository`.

    `variant`: None for fp32; "int8" or "fp16" to write `<name>_int8` or
    `<name>_fp16` instead. int8 calibrates on `calibration_size` inputs: the
    JPEG/PNG images in `calibration_dir`, else lenet5's training images, else
    synthetic images.
    """
    started = time.perf_counter()
    model_spec = spec(name)
    calibration_path = Path(calibration_dir) if calibration_dir is not None else None
    check_variant_options(variant, calibration_path, calibration_size)
    check_options(weights, max_batch_size, epochs, variant)
    onnx.check_opset(opset)
    # A variant is its own model: same shapes, labels and preprocessing, its own name.
    entry = variant_name(name, variant)
    repository = Path(repository)
    write.check_repository(repository)
    model_dir = repository / entry
    version = write.resolve_version(model_dir, version, force)
    mnist = Path(mnist_dir) if mnist_dir is not None else None
    model, served = None, None
    if weights == REPOSITORY:
        served = source_of.served(repository, name)
        source = served.weights()
        # What the served model was made with; LeNet-5's seed and dataset give its held-out split.
        seed, dataset = served.setting("seed", seed), served.dataset(dataset)
        opset = served.setting("opset", opset)
        max_batch_size = max_batch_size or served.setting("max_batch_size", 0) or None
    else:
        model, source = source_of.load_weights(model_spec, weights, seed, mnist, dataset, epochs)
    max_batch_size = max_batch_size or model_spec.default_max_batch_size

    with ExitStack() as stack:
        staged = stack.enter_context(write.staging(repository, entry))
        bar = stack.enter_context(
            tqdm(total=3 if variant is None else 5, desc=entry, leave=False, disable=None)
        )
        folder = staged / str(version)
        folder.mkdir()
        # A variant's fp32 source is scratch: it must not land in the entry.
        fp32_folder = stack.enter_context(write.staging(repository, name)) if variant else folder
        tensors: dict[str, np.ndarray] = {}  # golden.npz
        if served is not None:
            bar.set_postfix_str(f"copy {name} version {served.version}")
            served.copy_model(fp32_folder)
            parity, errors = served.parity, (float("nan"), float("nan"))
            bar.update(2)
        else:
            assert model is not None
            verified, tensors = _export_fp32(
                model, model_spec, fp32_folder, source, opset, seed, bar
            )
            parity, errors = verified.to_json(), (verified.max_abs_error, verified.max_rel_error)
        outcome = None
        if variant is not None:
            bar.set_postfix_str("calibration and verification inputs")
            inputs = _variant_inputs(
                variant,
                model_spec,
                source,
                calibration_dir=calibration_path,
                size=calibration_size,
                seed=seed,
                mnist_dir=mnist,
                dataset=dataset,
            )
            bar.update()
            bar.set_postfix_str(f"convert to {variant}, compare and time against fp32")
            outcome = variants.make(
                variant, fp32_folder / "model.onnx", folder / "model.onnx", inputs, entry
            )
            tensors = outcome.golden()
            bar.update()
        bar.set_postfix_str("write repository entry")
        np.savez(folder / "golden.npz", **tensors)  # type: ignore[arg-type]
        _write_entry(staged, model_spec, max_batch_size, entry)
        size = sum(f.stat().st_size for f in folder.iterdir() if f.name.startswith("model.onnx"))
        record = _record(model_spec, version, opset, seed, max_batch_size, source, parity)
        record["model"] = entry
        if outcome is not None:
            record |= outcome.to_json(name, _fp32_source(name, served, fp32_folder, parity))
        record["files"] = write.file_digests(folder)
        write.write_json(folder / "export.json", record)
        # Another export may have taken the version while this one worked.
        write.resolve_version(model_dir, version, force)
        target = write.commit(staged, model_dir, version)
        bar.update()

    result = ExportResult(
        name=entry,
        version=version,
        path=target,
        weights=f"{source.kind} ({source.detail})" if source.kind != "random" else "random",
        max_abs_error=errors[0],
        max_rel_error=errors[1],
        accuracy=source.training.accuracy if source.training else None,
        size_bytes=size,
        seconds=round(time.perf_counter() - started, 1),
        warning=source.warning,
    )
    return result if outcome is None else _variant_result(result, outcome)


def _export_fp32(
    model: nn.Module,
    model_spec: ModelSpec,
    folder: Path,
    source: source_of.Weights,
    opset: int,
    seed: int,
    bar: tqdm,
) -> tuple[onnx.Parity, dict[str, np.ndarray]]:
    """Export to `folder/model.onnx` and verify against PyTorch; the parity and golden tensors."""
    bar.set_postfix_str("export to ONNX")
    onnx.export(model, folder / "model.onnx", model_spec.input_dims, opset)
    bar.update()
    bar.set_postfix_str("verify with onnxruntime")
    golden = source.test_x[: max(onnx.VERIFY_BATCHES)] if source.test_x is not None else None
    if golden is None:
        golden = onnx.golden_input(model_spec.input_dims, seed)
    parity, expected = onnx.verify(model, folder / "model.onnx", golden, model_spec.name)
    bar.update()
    tensors = {INPUT_NAME: golden, OUTPUT_NAME: expected}
    if source.test_y is not None:
        tensors["labels"] = source.test_y[: len(golden)]
    return parity, tensors


def _fp32_source(
    name: str, served: source_of.Served | None, folder: Path, parity: dict[str, object]
) -> dict[str, object]:
    """What a variant was converted from, for its export.json."""
    origin = (
        f"{name} version {served.version} in the repository"
        if served is not None
        else "exported and verified against PyTorch in this run"
    )
    return {"origin": origin, "files": write.file_digests(folder), "parity": parity}


def _variant_inputs(
    variant: str,
    model_spec: ModelSpec,
    source: source_of.Weights,
    *,
    calibration_dir: Path | None,
    size: int | None,
    seed: int,
    mnist_dir: Path | None,
    dataset: str,
) -> calibration.CalibrationSet:
    """What a variant calibrates on (int8 only) and is compared with fp32 on."""
    params = model_spec.preprocessing
    size = 0 if variant == "fp16" else size
    if calibration_dir is not None:
        return calibration.from_images(calibration_dir, params, size, seed)
    if model_spec.torchvision:
        return calibration.synthetic(params, size, seed)
    # LeNet-5: its training data, loaded here when this run did not train it.
    if source.train_x is not None and source.test_x is not None and source.test_y is not None:
        train_x, test_x, test_y, name = source.train_x, source.test_x, source.test_y, source.detail
    else:
        data = train.load_data(params, seed, mnist_dir, dataset)
        train_x, test_x, test_y, name = data.train_x, data.test_x, data.test_y, data.name
    return calibration.from_training(train_x, test_x, test_y, name, size, seed)


def _variant_result(result: ExportResult, outcome: variants.Outcome) -> ExportResult:
    accuracy = outcome.comparison.accuracy
    warnings = [w for w in (result.warning, *outcome.warnings()) if w]
    return replace(
        result,
        max_abs_error=outcome.comparison.parity.max_abs_error,
        max_rel_error=outcome.comparison.parity.max_rel_error,
        accuracy=accuracy[outcome.variant] if accuracy else None,
        warning="; ".join(warnings) or None,
        variant=outcome.variant,
        reference_accuracy=accuracy["fp32"] if accuracy else None,
        agreement=outcome.comparison.agreement,
        speedup=outcome.timing.speedup(8),
    )


def _write_entry(staged: Path, model_spec: ModelSpec, max_batch_size: int, entry: str) -> None:
    """labels.txt and config.pbtxt, named after the entry (a variant's own name)."""
    if model_spec.torchvision:
        labels = zoo.imagenet_labels(model_spec.name)
    else:
        labels = [str(digit) for digit in range(model_spec.num_classes)]
    write.write_labels(staged / write.LABELS_FILE, labels)
    config = write.model_config(model_spec, max_batch_size, model_spec.preprocessing)
    config.name = entry
    write.write_config(staged / write.CONFIG_FILE, config)


def _record(
    model_spec: ModelSpec,
    version: int,
    opset: int,
    seed: int,
    max_batch_size: int,
    source: source_of.Weights,
    parity: dict[str, object],
) -> dict[str, object]:
    def shape(dims: tuple[int, ...]) -> list[int]:
        return [-1, *dims]  # -1: the dynamic batch axis

    return {
        "model": model_spec.name,
        "version": version,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "versions": {
            package: importlib.metadata.version(package)
            for package in ("torch", "torchvision", "onnx", "onnxscript", "onnxruntime-gpu")
        }
        | {"cnnserve": __version__, "python": platform.python_version()},
        "opset": opset,
        "exporter": "torch.onnx.export(dynamo=True)",
        "seed": seed,
        "weights": {"source": source.kind, "detail": source.detail, "warning": source.warning},
        "training": asdict(source.training) if source.training else None,
        "accuracy": source.training.accuracy if source.training else None,
        "max_batch_size": max_batch_size,
        "inputs": [{"name": INPUT_NAME, "datatype": "FP32", "shape": shape(model_spec.input_dims)}],
        "outputs": [
            {"name": OUTPUT_NAME, "datatype": "FP32", "shape": shape((model_spec.num_classes,))}
        ],
        "preprocessing": model_spec.preprocessing.to_config(),
        "parity": parity,
        "golden": {"file": "golden.npz", "input": INPUT_NAME, "output": OUTPUT_NAME},
    }
