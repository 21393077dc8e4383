"""The export stage: verified ONNX, Triton configs, training, and one-line errors on bad input.

The seed families are exported once per session (see conftest.py). Bad inputs
go through the real `cnnserve export` command in a child process.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from datetime import date
from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from cnnserve.export import ExportError, export_model
from cnnserve.export import onnx as export_onnx
from cnnserve.export.catalog import LENET
from cnnserve.export.train import digit_image, load_digits, read_idx, train
from cnnserve.export.zoo import LeNet5, architecture
from cnnserve.preprocess import PreprocessParams, preprocess
from cnnserve.v1 import model_config_pb2 as mc

SEED_MODELS = ("lenet5", "alexnet", "googlenet", "vgg16", "resnet18")
MNIST_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def cnnserve_export(
    *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cnnserve", "export", *args],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, **(env or {})},
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("cnnserve export: error: ")
    for word in words:
        assert word in lines[0]


def entries(repository: Path) -> list[str]:
    """Everything in a repository, staging folders included, as relative paths."""
    return sorted(str(p.relative_to(repository)) for p in repository.rglob("*"))


def read_config(model_dir: Path) -> mc.ModelConfig:
    return text_format.Parse((model_dir / "config.pbtxt").read_text(), mc.ModelConfig())


def run_onnx(version_dir: Path, x: np.ndarray) -> np.ndarray:
    (logits,) = export_onnx.session(version_dir / "model.onnx").run(["logits"], {"input": x})
    return np.asarray(logits)


@pytest.mark.parametrize("name", SEED_MODELS)
def test_seed_model_matches_its_golden_outputs_at_batch_1_and_5(
    seed_repository: Path, name: str
) -> None:
    version_dir = seed_repository / name / "1"
    golden = np.load(version_dir / "golden.npz")
    tolerance = json.loads((version_dir / "export.json").read_text())["parity"]
    for batch in (1, 5):
        actual = run_onnx(version_dir, golden["input"][:batch])
        expected = golden["logits"][:batch]
        assert actual.shape == expected.shape
        assert export_onnx.within(actual, expected, tolerance["rtol"], tolerance["atol"])


@pytest.mark.parametrize("name", SEED_MODELS)
def test_config_pbtxt_parses_as_a_triton_model_config(seed_repository: Path, name: str) -> None:
    config = read_config(seed_repository / name)
    lenet = name == "lenet5"
    assert config.name == name
    assert config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == (128 if lenet else 32)
    assert [(i.name, list(i.dims)) for i in config.input] == [
        ("input", [1, 32, 32] if lenet else [3, 224, 224])
    ]
    (output,) = config.output
    assert (output.name, list(output.dims)) == ("logits", [10 if lenet else 1000])
    labels = (seed_repository / name / output.label_filename).read_text().splitlines()
    if lenet:
        assert labels == [str(d) for d in range(10)]
    else:
        assert labels[:2] == ["tench", "goldfish"]
    assert len(labels) == output.dims[0]
    assert config.dynamic_batching.HasField("default_queue_policy")
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000
    assert config.dynamic_batching.preferred_batch_size[-1] == config.max_batch_size
    assert config.dynamic_batching.default_queue_policy.max_queue_size == 1024
    params = PreprocessParams.from_config({k: v.string_value for k, v in config.parameters.items()})
    assert (params.color, params.resize, params.crop) == (
        ("L", 32, 32) if lenet else ("RGB", 256, 224)
    )


@pytest.mark.parametrize("name", SEED_MODELS)
def test_export_json_records_versions_parity_and_file_digests(
    seed_repository: Path, name: str
) -> None:
    version_dir = seed_repository / name / "1"
    record = json.loads((version_dir / "export.json").read_text())
    assert record["opset"] == 20
    assert {"torch", "onnx", "onnxruntime-gpu"} <= record["versions"].keys()
    assert [b["batch"] for b in record["parity"]["batches"]] == [1, 2, 7]
    assert record["weights"]["source"] == ("trained" if name == "lenet5" else "random")
    assert {"model.onnx", "model.onnx.data", "golden.npz"} <= record["files"].keys()
    for file_name, digest in record["files"].items():
        data = (version_dir / file_name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == digest["sha256"]


def test_lenet5_trained_on_digits_reaches_97_percent(lenet5_repository: Path) -> None:
    record = json.loads((lenet5_repository / "lenet5" / "1" / "export.json").read_text())
    assert record["training"]["dataset"] == "digits"
    assert record["training"]["test_size"] == 359
    assert record["accuracy"] >= 0.97


def test_digit_png_preprocesses_to_the_training_tensor_and_classifies_alike(
    lenet5_repository: Path,
) -> None:
    from sklearn.datasets import load_digits as sklearn_digits

    from cnnserve.export.train import digits_split

    config = read_config(lenet5_repository / "lenet5")
    params = {k: v.string_value for k, v in config.parameters.items()}
    data = load_digits(LENET, seed=0)
    _, test = digits_split(seed=0)
    pngs = []
    for row in sklearn_digits().data[test]:
        buffer = io.BytesIO()
        digit_image(row).save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    served = np.stack([preprocess(png, params) for png in pngs])
    np.testing.assert_array_equal(served, data.test_x)
    # The served path reproduces the accuracy measured at training time.
    logits = run_onnx(lenet5_repository / "lenet5" / "1", served)
    record = json.loads((lenet5_repository / "lenet5" / "1" / "export.json").read_text())
    assert abs(float((logits.argmax(1) == data.test_y).mean()) - record["accuracy"]) <= 1 / 359


def test_training_is_deterministic_for_a_seed() -> None:
    data = load_digits(LENET, seed=3)
    weights = []
    for _ in range(2):
        model = architecture("lenet5", seed=3)
        train(model, data, seed=3, epochs=1)
        weights.append(model.state_dict())
    for key, value in weights[0].items():
        assert torch.equal(value, weights[1][key]), key


def test_checkpoint_round_trips_through_weights_path(tmp_path: Path) -> None:
    torch.manual_seed(7)
    model = LeNet5().eval()
    torch.save(model.state_dict(), tmp_path / "lenet5.pt")
    result = cnnserve_export(
        "lenet5", "--weights", str(tmp_path / "lenet5.pt"), "--repository", str(tmp_path / "r")
    )
    assert result.returncode == 0, result.stderr
    version_dir = tmp_path / "r" / "lenet5" / "1"
    x = np.load(version_dir / "golden.npz")["input"]
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    assert export_onnx.within(run_onnx(version_dir, x), expected)
    record = json.loads((version_dir / "export.json").read_text())
    assert record["weights"]["source"] == "checkpoint"


def test_versions_default_to_the_next_free_and_force_replaces(tmp_path: Path) -> None:
    first = export_model("lenet5", tmp_path, seed=1)
    second = export_model("lenet5", tmp_path, seed=2)
    assert (first.version, second.version) == (1, 2)
    before = (tmp_path / "lenet5" / "1" / "model.onnx.data").read_bytes()
    with pytest.raises(ExportError, match="already exists"):
        export_model("lenet5", tmp_path, seed=3, version=1)
    export_model("lenet5", tmp_path, seed=3, version=1, force=True)
    assert (tmp_path / "lenet5" / "1" / "model.onnx.data").read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lenet5"]  # no staging left


def test_unknown_model_name_is_a_one_line_error(tmp_path: Path) -> None:
    result = cnnserve_export("resnet19", "--repository", str(tmp_path))
    assert_one_line_error(result, "resnet19", "resnet18")
    assert entries(tmp_path) == []


def test_weights_that_are_neither_a_keyword_nor_a_file_are_a_one_line_error(
    tmp_path: Path,
) -> None:
    result = cnnserve_export("lenet5", "--weights", "pretrainde", "--repository", str(tmp_path))
    assert_one_line_error(result, "pretrainde", "pretrained, random, auto")
    assert entries(tmp_path) == []


def test_failure_after_staging_began_leaves_nothing_behind(tmp_path: Path) -> None:
    # NaN weights export fine and fail verification, after model.onnx was
    # written to the staging folder.
    state = LeNet5().state_dict()
    state["classifier.3.bias"][0] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    export_model("lenet5", tmp_path / "r")
    before = entries(tmp_path / "r")
    result = cnnserve_export(
        "lenet5", "--weights", str(tmp_path / "nan.pt"), "--repository", str(tmp_path / "r")
    )
    assert_one_line_error(result, "NaN")
    assert entries(tmp_path / "r") == before


def test_unwritable_repository_is_a_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    result = cnnserve_export("lenet5", "--repository", str(tmp_path / "file" / "repository"))
    assert_one_line_error(result, "not writable")
    if os.geteuid() != 0:  # root writes through permission bits
        (tmp_path / "ro").mkdir(mode=0o555)
        assert_one_line_error(cnnserve_export("lenet5", "--repository", str(tmp_path / "ro")))
        assert entries(tmp_path / "ro") == []


def test_existing_version_without_force_is_a_one_line_error(tmp_path: Path) -> None:
    export_model("lenet5", tmp_path)
    before = entries(tmp_path)
    result = cnnserve_export("lenet5", "--version", "1", "--repository", str(tmp_path))
    assert_one_line_error(result, "already exists", "--force")
    assert entries(tmp_path) == before


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"\x00garbage, not a zip or a pickle", "not a readable PyTorch state dict"),
        ({"fc.weight": torch.zeros(3)}, "does not match lenet5"),
        (LeNet5(num_classes=7).state_dict(), "shape mismatch"),
        ([1, 2, 3], "not a state dict"),
        ({"when": date(2020, 1, 1)}, "holds Python objects that only running code from it"),
    ],
    ids=["corrupt", "other-model", "wrong-shape", "a-list", "python-objects"],
)
def test_bad_checkpoint_is_a_one_line_error(tmp_path: Path, content: object, words: str) -> None:
    checkpoint = tmp_path / "checkpoint.pt"
    if isinstance(content, bytes):
        checkpoint.write_bytes(content)
    else:
        torch.save(content, checkpoint)
    repository = tmp_path / "r"
    result = cnnserve_export(
        "lenet5", "--weights", str(checkpoint), "--repository", str(repository)
    )
    assert_one_line_error(result, str(checkpoint), words)
    assert entries(repository) == []


# A proxy on a closed port makes any download fail at once, online or not, and
# an empty TORCH_HOME hides weights cached by earlier runs.
def offline(tmp_path: Path) -> dict[str, str]:
    proxy = "http://127.0.0.1:9"
    return {"https_proxy": proxy, "http_proxy": proxy, "TORCH_HOME": str(tmp_path / "torch")}


def test_pretrained_offline_is_a_one_line_error_naming_the_alternatives(tmp_path: Path) -> None:
    result = cnnserve_export(
        "resnet18", "--weights", "pretrained", "--repository", str(tmp_path / "r"),
        env=offline(tmp_path),
    )  # fmt: skip
    assert_one_line_error(result, "unreachable", "--weights random", "--weights auto")
    assert entries(tmp_path / "r") == []


def test_auto_offline_exports_random_weights_with_a_recorded_warning(tmp_path: Path) -> None:
    result = cnnserve_export(
        "resnet18", "--weights", "auto", "--repository", str(tmp_path / "r"),
        env=offline(tmp_path),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "WARNING: resnet18:" in result.stderr
    record = json.loads((tmp_path / "r" / "resnet18" / "1" / "export.json").read_text())
    assert record["weights"]["source"] == "random"
    assert "RANDOM" in record["weights"]["warning"]
    assert "use --weights" not in record["weights"]["warning"]  # auto was the user's choice


def test_export_command_module_does_not_import_torch() -> None:
    code = "import sys, cnnserve.export.cli, cnnserve.preprocess; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_read_idx_rejects_a_file_that_is_not_idx(tmp_path: Path) -> None:
    (tmp_path / "x-idx1-ubyte").write_bytes(b"PK\x03\x04 not idx")
    with pytest.raises(ExportError, match="not an IDX file"):
        read_idx(tmp_path / "x-idx1-ubyte")


@pytest.mark.skipif(not MNIST_DIR.is_dir(), reason=f"no MNIST at {MNIST_DIR}")
def test_mnist_idx_files_parse_with_the_standard_counts() -> None:
    images = read_idx(MNIST_DIR / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(MNIST_DIR / "t10k-labels-idx1-ubyte.gz")
    assert images.shape == (10000, 28, 28)
    assert np.bincount(labels)[:2].tolist() == [980, 1135]
    assert read_idx(MNIST_DIR / "train-labels-idx1-ubyte.gz").shape == (60000,)


# About 20 s on 2 cores: cheap enough for every run.
@pytest.mark.skipif(not MNIST_DIR.is_dir(), reason=f"no MNIST at {MNIST_DIR}")
def test_lenet5_trained_on_mnist_reaches_98_5_percent(tmp_path: Path) -> None:
    result = export_model("lenet5", tmp_path, weights="pretrained", mnist_dir=MNIST_DIR)
    assert result.accuracy is not None
    assert result.accuracy >= 0.985


def test_a_new_model_folder_is_readable_as_its_version_folder_is(lenet5_repository: Path) -> None:
    """Staged in a private temporary folder, it must not stay private once in place: a
    server running as another user reads it."""
    model, version = lenet5_repository / "lenet5", lenet5_repository / "lenet5" / "1"
    assert model.stat().st_mode & 0o777 == version.stat().st_mode & 0o777
