"""`export_model`: one model from weights to a verified repository entry.

The order of work: check the repository and version (cheap, before any
training), get the weights, export to ONNX in a staging folder, verify it
against PyTorch, write golden tensors, labels, config and export.json, then
rename the entry into place.
"""

from __future__ import annotations

import importlib.metadata
import platform
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from torch import nn
from tqdm import tqdm

from cnnserve import __version__
from cnnserve.export import onnx, train, write, zoo
from cnnserve.export.catalog import INPUT_NAME, OUTPUT_NAME, ModelSpec, check_options, spec


@dataclass(frozen=True)
class Weights:
    """Where the exported weights came from, for export.json and the summary."""

    kind: str  # "trained", "pretrained", "random" or "checkpoint"
    detail: str
    warning: str | None = None
    training: train.TrainResult | None = None
    test_x: np.ndarray | None = None  # held-out images when trained: the golden input
    test_y: np.ndarray | None = None


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
) -> ExportResult:
    """Export `name` into `repository`; raises ExportError with a one-line message on bad input.

    `weights`: "random" (seeded), "pretrained" (torchvision's ImageNet weights;
    for lenet5, trained here), "auto" (pretrained when reachable, else random
    with a warning), or the path of a state-dict checkpoint.
    """
    started = time.perf_counter()
    model_spec = spec(name)
    repository = Path(repository)
    write.check_repository(repository)
    model_dir = repository / name
    version = write.resolve_version(model_dir, version, force)
    if max_batch_size is None:
        max_batch_size = model_spec.default_max_batch_size
    check_options(weights, max_batch_size, epochs)
    onnx.check_opset(opset)
    mnist = Path(mnist_dir) if mnist_dir is not None else None
    model, source = load_weights(model_spec, weights, seed, mnist, dataset, epochs)

    with (
        write.staging(repository, name) as staged,
        tqdm(total=3, desc=name, leave=False, disable=None) as bar,
    ):
        folder = staged / str(version)
        folder.mkdir()
        bar.set_postfix_str("export to ONNX")
        onnx.export(model, folder / "model.onnx", model_spec.input_dims, opset)
        bar.update()
        bar.set_postfix_str("verify with onnxruntime")
        golden = source.test_x[: max(onnx.VERIFY_BATCHES)] if source.test_x is not None else None
        if golden is None:
            golden = onnx.golden_input(model_spec.input_dims, seed)
        parity, expected = onnx.verify(model, folder / "model.onnx", golden, name)
        bar.update()
        bar.set_postfix_str("write repository entry")
        _write_entry(staged, folder, model_spec, max_batch_size, golden, expected, source)
        size = sum(f.stat().st_size for f in folder.iterdir() if f.name.startswith("model.onnx"))
        record = _record(model_spec, version, opset, seed, max_batch_size, source, parity)
        record["files"] = write.file_digests(folder)
        write.write_json(folder / "export.json", record)
        # Another export may have taken the version while this one worked.
        write.resolve_version(model_dir, version, force)
        target = write.commit(staged, model_dir, version)
        bar.update()

    return ExportResult(
        name=name,
        version=version,
        path=target,
        weights=f"{source.kind} ({source.detail})" if source.kind != "random" else "random",
        max_abs_error=parity.max_abs_error,
        max_rel_error=parity.max_rel_error,
        accuracy=source.training.accuracy if source.training else None,
        size_bytes=size,
        seconds=round(time.perf_counter() - started, 1),
        warning=source.warning,
    )


def load_weights(
    model_spec: ModelSpec,
    weights: str,
    seed: int,
    mnist_dir: Path | None,
    dataset: str,
    epochs: int | None,
) -> tuple[nn.Module, Weights]:
    name = model_spec.name
    if weights == "random":
        return zoo.architecture(name, seed), Weights("random", f"seed {seed}")
    if weights in ("pretrained", "auto") and not model_spec.torchvision:
        # LeNet-5 has no published weights: "pretrained" means trained here.
        data = train.load_data(model_spec.preprocessing, seed, mnist_dir, dataset)
        model = zoo.architecture(name, seed)
        result = train.train(model, data, seed, epochs)
        return model, Weights("trained", data.name, None, result, data.test_x, data.test_y)
    if weights == "pretrained":
        model, enum = zoo.pretrained(name)
        return model, Weights("pretrained", enum)
    if weights == "auto":
        try:
            model, enum = zoo.pretrained(name)
        except zoo.WeightsUnreachable as exc:
            warning = f"{exc}; exported RANDOM weights instead: predictions are meaningless"
            return zoo.architecture(name, seed), Weights("random", f"seed {seed}", warning)
        return model, Weights("pretrained", enum)
    path = Path(weights).expanduser()
    model = zoo.architecture(name, seed)
    zoo.load_checkpoint(model, name, path)
    return model, Weights("checkpoint", str(path.resolve()))


def _write_entry(
    staged: Path,
    folder: Path,
    model_spec: ModelSpec,
    max_batch_size: int,
    golden: np.ndarray,
    expected: np.ndarray,
    source: Weights,
) -> None:
    tensors = {INPUT_NAME: golden, OUTPUT_NAME: expected}
    if source.test_y is not None:
        tensors["labels"] = source.test_y[: len(golden)]
    np.savez(folder / "golden.npz", **tensors)  # type: ignore[arg-type]
    if model_spec.torchvision:
        labels = zoo.imagenet_labels(model_spec.name)
    else:
        labels = [str(digit) for digit in range(model_spec.num_classes)]
    write.write_labels(staged / write.LABELS_FILE, labels)
    config = write.model_config(model_spec, max_batch_size, model_spec.preprocessing)
    write.write_config(staged / write.CONFIG_FILE, config)


def _record(
    model_spec: ModelSpec,
    version: int,
    opset: int,
    seed: int,
    max_batch_size: int,
    source: Weights,
    parity: onnx.Parity,
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
        "parity": parity.to_json(),
        "golden": {"file": "golden.npz", "input": INPUT_NAME, "output": OUTPUT_NAME},
    }
