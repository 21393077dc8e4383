"""Tiny hand-made ONNX models for edge cases the real CNNs cannot reach quickly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

TINY_WEIGHTS = (np.arange(12, dtype=np.float32).reshape(4, 3) - 5) / 10
TINY_CONFIG = """
max_batch_size: 8
input { name: "x" data_type: TYPE_FP32 dims: [4] }
output { name: "y" data_type: TYPE_FP32 dims: [3] label_filename: "labels.txt" }
dynamic_batching { max_queue_delay_microseconds: 2000 default_queue_policy { max_queue_size: 64 } }
"""


def tiny_model(weights: np.ndarray = TINY_WEIGHTS) -> onnx.ModelProto:
    """y = x @ W with a dynamic batch axis: [N, 4] → [N, 3]."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(weights, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model


def write_tiny(
    repository: Path,
    name: str = "tiny",
    version: int = 1,
    config: str | None = TINY_CONFIG,
    weights: np.ndarray = TINY_WEIGHTS,
) -> Path:
    model_dir = repository / name
    (model_dir / str(version)).mkdir(parents=True, exist_ok=True)
    onnx.save(tiny_model(weights), model_dir / str(version) / "model.onnx")
    if config is not None:
        (model_dir / "config.pbtxt").write_text(config)
    (model_dir / "labels.txt").write_text("alpha\nbeta\ngamma\n")
    return model_dir


def write_slow(
    repository: Path, name: str, config: str, layers: int = 24, width: int = 1024
) -> Path:
    """Like tiny (x [N,4] → y [N,3]) but `layers` dense layers deep: milliseconds per row.

    The hidden layers share one weight matrix, so the file stays small.
    """
    rng = np.random.default_rng(0)

    def weight(name: str, rows: int, cols: int) -> onnx.TensorProto:
        w = (rng.standard_normal((rows, cols)) / np.sqrt(rows)).astype(np.float32)
        return numpy_helper.from_array(w, name)

    inits = [weight("W_in", 4, width), weight("W", width, width), weight("W_out", width, 3)]
    nodes = [helper.make_node("MatMul", ["x", "W_in"], ["h0"])]
    for i in range(layers):
        nodes.append(helper.make_node("MatMul", [f"h{i}", "W"], [f"h{i + 1}"]))
    nodes.append(helper.make_node("MatMul", [f"h{layers}", "W_out"], ["y"]))
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    model_dir = repository / name
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    onnx.save(model, model_dir / "1" / "model.onnx")
    (model_dir / "config.pbtxt").write_text(config)
    return model_dir


def write_echo_bytes(repository: Path, name: str = "echo") -> Path:
    """A BYTES model: s [N, 2] strings → t [N, 2], the same strings (Identity)."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["s"], ["t"])],
        name,
        [helper.make_tensor_value_info("s", TensorProto.STRING, ["N", 2])],
        [helper.make_tensor_value_info("t", TensorProto.STRING, ["N", 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    model_dir = repository / name
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    onnx.save(model, model_dir / "1" / "model.onnx")
    (model_dir / "config.pbtxt").write_text(
        'max_batch_size: 4\ninput { name: "s" data_type: TYPE_STRING dims: [2] }\n'
        'output { name: "t" data_type: TYPE_STRING dims: [2] }\ndynamic_batching { }\n'
    )
    return model_dir


def write_tiny_image(repository: Path, name: str = "pixels") -> Path:
    """An image classifier in miniature: [N, 1, 8, 8] grayscale → 3 scores, with preprocessing."""
    rng = np.random.default_rng(3)
    weights = rng.standard_normal((64, 3)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["input"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "W"], ["logits"]),
        ],
        name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(weights, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    model_dir = repository / name
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    onnx.save(model, model_dir / "1" / "model.onnx")
    params = {"color": "L", "resize": "8", "crop": "8", "mean": "0.5", "std": "0.25"}
    lines = "".join(
        f'parameters {{ key: "{k}" value {{ string_value: "{v}" }} }}\n' for k, v in params.items()
    )
    (model_dir / "config.pbtxt").write_text(
        "max_batch_size: 16\ndynamic_batching { max_queue_delay_microseconds: 1000 }\n"
        'output { name: "logits" data_type: TYPE_FP32 dims: [3] label_filename: "labels.txt" }\n'
        + lines
    )
    (model_dir / "labels.txt").write_text("zero\none\ntwo\n")
    return model_dir
