"""The repository entry, in Triton's layout, written all-or-nothing.

    <repository>/<model>/config.pbtxt
    <repository>/<model>/labels.txt
    <repository>/<model>/<version>/model.onnx (+ model.onnx.data, golden.npz, export.json)

Everything is written into a hidden staging folder inside the repository (the
same filesystem, so renames are atomic) and renamed into place at the end; a
failure at any point removes the staging folder and leaves no partial version.
No torch here: the CLI runs these checks before importing it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from google.protobuf import text_format

from cnnserve.export.catalog import INPUT_NAME, OUTPUT_NAME, ModelSpec
from cnnserve.export.errors import ExportError
from cnnserve.preprocess import PreprocessParams
from cnnserve.v1 import model_config_pb2 as mc

STAGING_PREFIX = ".staging-"
LABELS_FILE = "labels.txt"
CONFIG_FILE = "config.pbtxt"


def check_repository(repository: Path) -> None:
    """Create the repository folder if needed and prove that it is writable."""
    try:
        repository.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=repository):
            pass
    except OSError as exc:
        raise ExportError(
            f"repository {repository} is not writable: {exc.strerror or exc}"
        ) from None


def versions(model_dir: Path) -> list[int]:
    """The numeric version folders of a model, as Triton counts them."""
    if not model_dir.is_dir():
        return []
    names = [p.name for p in model_dir.iterdir() if p.is_dir()]
    return sorted(int(n) for n in names if n.isascii() and n.isdigit())


def latest_model(model_dir: Path, what: str) -> Path:
    """The newest version folder with a model.onnx, for converting it; `what` names the option."""
    found = [v for v in versions(model_dir) if (model_dir / str(v) / "model.onnx").is_file()]
    if not found:
        raise ExportError(
            f"{what}: {model_dir} has no version with a model.onnx; export {model_dir.name} first"
        )
    return model_dir / str(found[-1])


def resolve_version(model_dir: Path, version: int | None, force: bool) -> int:
    """The version to write: the next free one by default; an existing one only with force."""
    existing = versions(model_dir)
    if version is None:
        return (existing[-1] + 1) if existing else 1
    if version < 1:
        raise ExportError(f"version must be a positive integer, not {version}")
    if version in existing and not force:
        raise ExportError(f"{model_dir / str(version)} already exists; pass --force to replace it")
    return version


@contextmanager
def staging(repository: Path, model: str) -> Iterator[Path]:
    """A fresh hidden folder in the repository, removed on exit whatever happens."""
    folder = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{model}-", dir=repository))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def commit(staged: Path, model_dir: Path, version: int) -> Path:
    """Move a staged entry (config, labels, version folder) into place; returns the version folder.

    The version folder lands last for an existing model, so a server that
    polls never sees a version without its config; a new model arrives in one
    rename.
    """
    target = model_dir / str(version)
    if not model_dir.exists():
        # mkdtemp made the staging folder private (0700); the model folder gets the mode
        # its version folder was made with (the umask's), so that a server running as
        # another user can read it.
        os.chmod(staged, (staged / str(version)).stat().st_mode & 0o777)
        os.rename(staged, model_dir)
        staged.mkdir()  # for staging() to remove
        return target
    for name in (CONFIG_FILE, LABELS_FILE):
        os.replace(staged / name, model_dir / name)
    if target.exists():  # --force: swap the old version out, then remove it
        old = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}old-", dir=model_dir.parent))
        os.rename(target, old / "version")
        os.rename(staged / str(version), target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staged / str(version), target)
    return target


def preferred_batch_sizes(max_batch_size: int) -> list[int]:
    """Powers of two from 16 up to the maximum, and the maximum itself.

    A preferred size ends the batch window at once. Measured on lenet5 (2 cores, batches
    inline) in paired rounds against sizes from 8: at c64, batches of 9.1 rows rather than
    6.3 and +6% requests/s on average (-4% to +16% by round); at c16, +1% (-3% to +6%).
    """
    sizes = [s for s in (16, 32, 64, 128, 256, 512, 1024) if s < max_batch_size]
    return [*sizes, max_batch_size]


def model_config(
    spec: ModelSpec, max_batch_size: int, preprocessing: PreprocessParams
) -> mc.ModelConfig:
    """Triton's ModelConfig for an ONNX classifier, with preprocessing in `parameters`."""
    config = mc.ModelConfig(
        name=spec.name,
        platform="onnxruntime_onnx",
        max_batch_size=max_batch_size,
        default_model_filename="model.onnx",
    )
    config.version_policy.latest.num_versions = 1
    config.input.add(
        name=INPUT_NAME,
        data_type=mc.TYPE_FP32,
        format=mc.ModelInput.FORMAT_NCHW,
        dims=list(spec.input_dims),
    )
    config.output.add(
        name=OUTPUT_NAME,
        data_type=mc.TYPE_FP32,
        dims=[spec.num_classes],
        label_filename=LABELS_FILE,
    )
    config.instance_group.add(count=1, kind=mc.ModelInstanceGroup.KIND_AUTO)
    batching = config.dynamic_batching
    # A bound, not a wait: the batcher holds a batch open only while requests keep arriving
    # (its adaptive window), so a lone client is not delayed. Measured on lenet5 (2 cores,
    # batches inline), against 0: concurrency 1 p50 unchanged (0.64-0.74 ms across runs);
    # concurrency 64 3,490 -> 5,160 requests/s, batches 1.0 -> 7.3 rows.
    batching.max_queue_delay_microseconds = 2000
    batching.preferred_batch_size.extend(preferred_batch_sizes(max_batch_size))
    batching.default_queue_policy.max_queue_size = 1024
    for key, value in preprocessing.to_config().items():
        config.parameters[key].string_value = value
    return config


def write_config(path: Path, config: mc.ModelConfig) -> None:
    path.write_text(text_format.MessageToString(config), encoding="utf-8")


def write_labels(path: Path, labels: list[str]) -> None:
    if any("\n" in label for label in labels):
        raise ValueError("a label contains a newline")
    path.write_text("".join(f"{label}\n" for label in labels), encoding="utf-8")


def file_digests(folder: Path) -> dict[str, dict[str, object]]:
    """sha256 and size of every file in a version folder, export.json aside."""
    digests: dict[str, dict[str, object]] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name != "export.json":
            sha = hashlib.sha256()
            with path.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    sha.update(chunk)
            digests[path.name] = {"sha256": sha.hexdigest(), "bytes": path.stat().st_size}
    return digests


def write_json(path: Path, record: dict[str, object]) -> None:
    path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
