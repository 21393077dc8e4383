"""int8 and fp16 variants: their own models, close to fp32, recorded, and served.

The variants are converted from a copy of the session's trained lenet5
(`--weights repository`), so no test here trains a model.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import tritonclient.grpc as tc
from google.protobuf import text_format

from cnnserve.export import ExportError, export_model
from cnnserve.export import onnx as export_onnx
from cnnserve.export.catalog import LENET
from cnnserve.export.train import digit_image, load_digits
from cnnserve.v1 import model_config_pb2 as mc
from tests.servers import server_in_thread


@pytest.fixture(scope="module")
def repository(lenet5_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's lenet5 (fp32), with lenet5_int8 and lenet5_fp16 converted from it."""
    repository = tmp_path_factory.mktemp("variants")
    shutil.copytree(lenet5_repository / "lenet5", repository / "lenet5")
    for variant in ("int8", "fp16"):
        export_model("lenet5", repository, weights="repository", variant=variant)
    return repository


@pytest.fixture(scope="module")
def held_out() -> tuple[np.ndarray, np.ndarray]:
    """The digits lenet5 never saw in training (seed 0, as the session's export)."""
    data = load_digits(LENET, seed=0)
    return data.test_x, data.test_y


def logits(repository: Path, model: str, x: np.ndarray) -> np.ndarray:
    session = export_onnx.session(repository / model / "1" / "model.onnx")
    return np.asarray(session.run(["logits"], {"input": x})[0])


def record(repository: Path, model: str) -> Any:
    return json.loads((repository / model / "1" / "export.json").read_text())


def read_config(model_dir: Path) -> mc.ModelConfig:
    return text_format.Parse((model_dir / "config.pbtxt").read_text(), mc.ModelConfig())


def test_int8_loses_at_most_half_a_point_and_agrees_on_99_percent(
    repository: Path, held_out: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = held_out
    fp32, int8 = logits(repository, "lenet5", x), logits(repository, "lenet5_int8", x)
    before, after = (fp32.argmax(1) == y).mean(), (int8.argmax(1) == y).mean()
    assert before - after <= 0.005
    assert (fp32.argmax(1) == int8.argmax(1)).mean() >= 0.99
    # export.json holds the same figures, measured on the same split.
    accuracy = record(repository, "lenet5_int8")["variant"]["accuracy"]
    assert accuracy["fp32"] == pytest.approx(before)
    assert accuracy["int8"] == pytest.approx(after)
    assert accuracy["change_points"] == pytest.approx((after - before) * 100, abs=0.01)


def test_int8_is_static_qdq_with_int8_weights_and_a_quarter_of_the_size(
    repository: Path,
) -> None:
    model = onnx.load(str(repository / "lenet5_int8" / "1" / "model.onnx"))
    ops = {node.op_type for node in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    assert "DynamicQuantizeLinear" not in ops  # static: ranges come from calibration
    weights = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert sum(int(np.prod(t.dims)) for t in weights) > 60_000  # all of LeNet-5's ~62k weights
    fp32_bytes = sum(f.stat().st_size for f in (repository / "lenet5" / "1").glob("model.onnx*"))
    assert (repository / "lenet5_int8" / "1" / "model.onnx").stat().st_size < fp32_bytes / 2


def test_variants_keep_the_fp32_config_labels_and_float_io_under_their_own_name(
    repository: Path,
) -> None:
    fp32 = read_config(repository / "lenet5")
    for name in ("lenet5_int8", "lenet5_fp16"):
        config = read_config(repository / name)
        assert config.name == name
        config.name = "lenet5"
        assert config == fp32
        labels = (repository / name / "labels.txt").read_text()
        assert labels == (repository / "lenet5" / "labels.txt").read_text()
        graph = onnx.load(str(repository / name / "1" / "model.onnx")).graph
        for tensor in (*graph.input, *graph.output):
            assert tensor.type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_export_json_records_method_calibration_parity_and_speed(repository: Path) -> None:
    entry = record(repository, "lenet5_int8")
    variant = entry["variant"]
    assert (entry["model"], variant["kind"], variant["of"]) == ("lenet5_int8", "int8", "lenet5")
    assert "QDQ" in variant["method"]
    assert "per-channel" in variant["method"]
    assert variant["calibration"]["source"] == "training data"
    assert variant["calibration"]["size"] == 512
    assert variant["verification"] == {
        "detail": "digits held-out split, with labels",
        "size": 359,
        "held_out": True,
    }
    assert variant["agreement"]["top1"] >= 0.99
    assert [b["batch"] for b in entry["parity"]["batches"]] == [1, 2, 7]
    assert entry["parity"]["rtol"] == 0.1
    for batch in ("1", "8"):
        figures = variant["speed"]["batches"][batch]
        assert figures["fp32_ms"] > 0
        assert figures["int8_ms"] > 0
    # The source is the served fp32 model, byte for byte.
    fp32_files = record(repository, "lenet5")["files"]
    for name, digest in variant["source"]["files"].items():
        assert fp32_files[name] == digest


def test_golden_tensors_reproduce_and_stay_near_fp32(repository: Path) -> None:
    for name in ("lenet5_int8", "lenet5_fp16"):
        golden = np.load(repository / name / "1" / "golden.npz")
        tolerance = record(repository, name)["parity"]
        actual = logits(repository, name, golden["input"])
        assert export_onnx.within(actual, golden["logits"], rtol=1e-4, atol=1e-5)
        assert export_onnx.within(actual, golden["reference"], tolerance["rtol"], tolerance["atol"])


def test_fp16_runs_on_the_cpu_and_matches_fp32_loosely(
    repository: Path, held_out: tuple[np.ndarray, np.ndarray]
) -> None:
    x, _ = held_out
    fp32, fp16 = logits(repository, "lenet5", x), logits(repository, "lenet5_fp16", x)
    assert fp16.dtype == np.float32
    assert np.abs(fp16 - fp32).max() <= 1e-2 * np.abs(fp32).max()
    assert (fp16.argmax(1) == fp32.argmax(1)).mean() >= 0.99
    model = onnx.load(str(repository / "lenet5_fp16" / "1" / "model.onnx"))
    assert all(t.data_type != onnx.TensorProto.FLOAT or not t.dims for t in model.graph.initializer)


def test_server_serves_lenet5_int8_with_correct_answers(
    repository: Path, held_out: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = held_out[0][:64], held_out[1][:64]
    with server_in_thread(repository) as running:
        client = tc.InferenceServerClient(running.url)
        try:
            answers = {}
            for model in ("lenet5", "lenet5_int8"):
                assert client.is_model_ready(model)
                tensor = tc.InferInput("input", list(x.shape), "FP32")
                tensor.set_data_from_numpy(x)
                result = client.infer(model, [tensor])
                answers[model] = result.as_numpy("logits").argmax(1)
        finally:
            client.close()
    assert (answers["lenet5_int8"] == y).mean() >= 0.95
    assert (answers["lenet5_int8"] == answers["lenet5"]).mean() >= 0.98


def test_int8_from_weights_writes_only_the_variant(tmp_path: Path) -> None:
    result = export_model("lenet5", tmp_path, weights="random", variant="int8")
    assert (result.name, result.variant, result.version) == ("lenet5_int8", "int8", 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lenet5_int8"]  # no fp32, no staging
    entry = record(tmp_path, "lenet5_int8")
    assert entry["variant"]["source"]["origin"].startswith("exported and verified")
    assert entry["variant"]["source"]["parity"]["rtol"] == export_onnx.RTOL


def test_calibration_dir_holds_out_images_to_verify_on(repository: Path, tmp_path: Path) -> None:
    from sklearn.datasets import load_digits as sklearn_digits

    images = tmp_path / "digits"
    images.mkdir()
    for i, row in enumerate(sklearn_digits().data[:60]):
        digit_image(row).save(images / f"{i:02}.png")
    local = tmp_path / "repository"
    shutil.copytree(repository / "lenet5", local / "lenet5")
    export_model("lenet5", local, weights="repository", variant="int8", calibration_dir=images)
    variant = record(local, "lenet5_int8")["variant"]
    assert variant["calibration"]["source"] == "images"
    assert variant["calibration"]["size"] == 48  # 60 less a fifth held out
    assert variant["verification"]["size"] == 12
    assert variant["verification"]["held_out"] is True


def test_an_unreadable_calibration_image_fails_and_leaves_nothing(
    repository: Path, tmp_path: Path
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for i in range(7):
        (images / f"{i}.png").write_bytes(b"not a png")
    local = tmp_path / "repository"
    shutil.copytree(repository / "lenet5", local / "lenet5")
    with pytest.raises(ExportError, match="cannot be read"):
        export_model("lenet5", local, weights="repository", variant="int8", calibration_dir=images)
    assert sorted(p.name for p in local.iterdir()) == ["lenet5"]


def cnnserve_export(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cnnserve", "export", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ),
    )


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--weights", "repository"], "needs --quantize int8 or --fp16"),
        (["--weights", "repository", "--quantize", "int8"], "export lenet5 first"),
        (["--calibration-dir", "."], "only apply to --quantize int8"),
        (["--quantize", "int8", "--calibration-dir", "nowhere"], "is not a directory"),
        (["--quantize", "int8", "--calibration-size", "0"], "at least 1"),
    ],
)
def test_bad_variant_options_are_one_line_errors(
    tmp_path: Path, args: list[str], words: str
) -> None:
    result = cnnserve_export("lenet5", "--repository", str(tmp_path), *args)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("cnnserve export: error: ")
    assert words in lines[0]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_resnet18_int8_from_random_weights_calibrates_on_synthetic_images(
    tmp_path: Path,
) -> None:
    result = export_model(
        "resnet18", tmp_path, weights="random", variant="int8", calibration_size=32
    )
    assert result.name == "resnet18_int8"
    assert result.size_bytes < 47e6 / 3  # fp32 is 47 MB
    variant = record(tmp_path, "resnet18_int8")["variant"]
    assert variant["calibration"]["source"] == "synthetic"
    assert "roughly" in variant["calibration"]["detail"]
    assert variant["verification"]["held_out"] is True
    assert variant["accuracy"] is None  # no labels for ImageNet here
    assert set(variant["speed"]["batches"]) == {"1", "8"}
    assert read_config(tmp_path / "resnet18_int8").name == "resnet18_int8"
    labels = (tmp_path / "resnet18_int8" / "labels.txt").read_text().splitlines()
    assert labels[:2] == ["tench", "goldfish"]
