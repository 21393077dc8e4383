"""Where an export's fp32 model comes from.

Either weights, turned into ONNX by this run (torchvision's, a checkpoint,
seeded random, or LeNet-5 trained here), or, for an int8 or fp16 variant with
`--weights repository`, the fp32 ONNX model already in the repository: the
variant is then converted from exactly the model being served, without torch
or training.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from cnnserve.export import train, write, zoo
from cnnserve.export.catalog import REPOSITORY, ModelSpec
from cnnserve.export.errors import ExportError


@dataclass(frozen=True)
class Weights:
    """Where the exported weights came from, for export.json and the summary."""

    kind: str  # "trained", "pretrained", "random", "checkpoint" or "repository"
    detail: str
    warning: str | None = None
    training: train.TrainResult | None = None
    test_x: np.ndarray | None = None  # held-out images when trained: the golden input
    test_y: np.ndarray | None = None
    train_x: np.ndarray | None = None  # when trained: what an int8 variant calibrates on


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
        return model, Weights(
            "trained", data.name, None, result, data.test_x, data.test_y, data.train_x
        )
    if weights == "pretrained":
        try:
            model, enum = zoo.pretrained(name)
        except zoo.WeightsUnreachable as exc:
            raise zoo.WeightsUnreachable(
                f"{exc}; use --weights random, --weights auto, or --weights PATH to a checkpoint"
            ) from None
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


@dataclass(frozen=True)
class Served:
    """The fp32 entry a variant is converted from with `--weights repository`."""

    folder: Path  # <repository>/<model>/<version>
    version: int
    record: dict[str, Any]  # its export.json; {} when it has none

    @property
    def parity(self) -> dict[str, object]:
        """Its export's parity with PyTorch, as recorded."""
        return dict(self.record.get("parity") or {})

    def setting(self, key: str, default: int) -> int:
        """An integer setting it was exported with (opset, seed, max_batch_size)."""
        value = self.record.get(key)
        return value if isinstance(value, int) else default

    def dataset(self, default: str) -> str:
        """The dataset LeNet-5 was trained on, so that its held-out split can be reproduced."""
        training = self.record.get("training")
        return str(training["dataset"]) if isinstance(training, dict) else default

    def weights(self) -> Weights:
        of = self.record.get("weights")
        described = f": {of.get('source')} ({of.get('detail')})" if isinstance(of, dict) else ""
        training = None
        with contextlib.suppress(KeyError, TypeError):  # not trained here, or an older record
            training = train.TrainResult(**self.record["training"])
        return Weights(
            REPOSITORY,
            f"{self.folder.parent.name} version {self.version}{described}",
            training=training,
        )

    def copy_model(self, target: Path) -> None:
        """model.onnx and its external data, so that a concurrent --force cannot swap them."""
        for path in self.folder.iterdir():
            if path.is_file() and path.name.startswith("model.onnx"):
                shutil.copy2(path, target / path.name)


def served(repository: Path, name: str) -> Served:
    """The latest version of `name` in the repository; ExportError when there is none."""
    folder = write.latest_model(repository / name, f"--weights {REPOSITORY}")
    record: dict[str, Any] = {}
    if (folder / "export.json").is_file():
        try:
            record = json.loads((folder / "export.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ExportError(f"{folder / 'export.json'} cannot be read: {exc}") from None
    return Served(folder, int(folder.name), record if isinstance(record, dict) else {})
