"""(e) The peer: Seldon MLServer with adaptive batching, in a virtual environment of its own.

MLServer and plain `onnxruntime` (the same version as cnnserve's
onnxruntime-gpu) are installed from PyPI into `.bench/mlserver-venv` once;
a failed install is recorded, and the bench goes on without this peer.

Its settings mirror cnnserve's config for each model: adaptive batching up to
the same max_batch_size, with max_batch_time equal to max_queue_delay but at
least 0.5 ms (MLServer turns adaptive batching off at 0, while cnnserve's
batcher still joins the requests that queue while a batch runs), the same
onnxruntime thread settings (see `mlserver_runtime`). Everything else
is MLServer's default (one parallel inference worker process), except
`debug: false`, as in production.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.raw import read_config
from cnnserve.v1 import model_config_pb2 as mc

VERSION = "1.7.1"
RUNTIME_MODULE = "onnx_runtime"
_TYPES = {
    mc.TYPE_FP32: "FP32",
    mc.TYPE_FP16: "FP16",
    mc.TYPE_INT64: "INT64",
    mc.TYPE_UINT8: "UINT8",
}


def _ort_version() -> str:
    return metadata.version("onnxruntime-gpu")


def install(venv: Path, log: Path, timeout: float = 600) -> tuple[Path | None, str]:
    """The `mlserver` executable, installing it if needed; or None and the reason."""
    # uvloop 0.22 broke MLServer 1.7.1's inference workers (SeldonIO/MLServer#2286).
    spec = [f"mlserver=={VERSION}", f"onnxruntime=={_ort_version()}", "numpy", "uvloop<0.22"]
    marker = venv / ".installed"
    executable = venv / "bin" / "mlserver"
    if marker.exists() and marker.read_text() == " ".join(spec) and executable.exists():
        return executable, "already installed"
    shutil.rmtree(venv, ignore_errors=True)
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", *spec],
    ]
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        for step in steps:
            try:
                subprocess.run(
                    step, stdout=out, stderr=subprocess.STDOUT, check=True, timeout=timeout
                )
            except (OSError, subprocess.SubprocessError) as exc:
                tail = log.read_text(errors="replace").strip().splitlines()[-5:]
                return None, f"`{' '.join(step[-4:])}` failed ({exc}): {' / '.join(tail)}"
    marker.write_text(" ".join(spec))
    return executable, f"installed {' '.join(spec)}"


def _tensor(entry: Any, batched: bool) -> dict[str, Any]:
    shape = [-1, *entry.dims] if batched else list(entry.dims)
    return {"name": entry.name, "datatype": _TYPES[entry.data_type], "shape": shape}


MIN_BATCH_TIME = 0.0005  # seconds; see the module docstring


def model_settings(name: str, model_dir: Path) -> dict[str, Any]:
    """MLServer's model-settings.json for one model of a cnnserve repository."""
    config = read_config(model_dir)
    parameters = {k: v.string_value for k, v in config.parameters.items()}
    versions = sorted(int(p.name) for p in model_dir.iterdir() if p.name.isdigit())
    batched = config.max_batch_size > 0
    return {
        "name": name,
        "implementation": f"{RUNTIME_MODULE}.OnnxRuntime",
        "max_batch_size": config.max_batch_size,
        "max_batch_time": max(
            MIN_BATCH_TIME, config.dynamic_batching.max_queue_delay_microseconds / 1e6
        ),
        "inputs": [_tensor(i, batched) for i in config.input],
        "outputs": [_tensor(o, batched) for o in config.output],
        "parameters": {
            "uri": str((model_dir / str(versions[-1]) / "model.onnx").resolve()),
            "version": str(versions[-1]),
            "extra": {
                "intra_op_threads": int(parameters.get("intra_op_threads", 0)),
                "inter_op_threads": int(parameters.get("inter_op_threads", 0)),
            },
        },
    }


def write_repository(
    folder: Path, models: dict[str, Path], ports: dict[str, int]
) -> dict[str, Any]:
    """MLServer's folder: settings.json, the runtime module, one folder per model."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    settings = {
        "debug": False,
        "host": "127.0.0.1",
        "grpc_port": ports["grpc"],
        "http_port": ports["http"],
        "metrics_port": ports["metrics"],
        "grpc_max_message_length": 256 * 1024 * 1024,
    }
    (folder / "settings.json").write_text(json.dumps(settings, indent=2))
    shutil.copy(Path(__file__).with_name("mlserver_runtime.py"), folder / f"{RUNTIME_MODULE}.py")
    written = {}
    for name, model_dir in models.items():
        (folder / name).mkdir()
        entry = model_settings(name, model_dir)
        (folder / name / "model-settings.json").write_text(json.dumps(entry, indent=2))
        written[name] = {k: entry[k] for k in ("max_batch_size", "max_batch_time")}
    return {"settings": settings, "models": written}
