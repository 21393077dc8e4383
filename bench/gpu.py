"""The GPU section: runs only where onnxruntime's CUDA provider really runs a model.

onnxruntime lists the CUDA provider whenever it was compiled in, so the check
creates a session on the GPU, reads back the provider in use, and runs it
once. Then resnet50 and `resnet50_fp16` (converted from it once, when the
repository lacks it) are measured raw on CUDA at each batch size, and served
by cnnserve from a copy of the repository pinned to GPU 0, with batch-1 and
batch-8 requests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from bench import drive, raw, servers
from bench.repository import convert, present, variant
from cnnserve.client.loadtest_engine import Policy

MODELS = ("resnet50", "resnet50_fp16")
CUDA = "CUDAExecutionProvider"


def cuda_works(model_dir: Path) -> tuple[bool, str]:
    import onnxruntime as ort

    if CUDA not in ort.get_available_providers():
        return False, "skipped: this onnxruntime has no CUDA provider"
    if not Path("/dev/nvidiactl").exists():
        return False, "skipped: no NVIDIA device on this machine"
    try:
        with raw.server_runner(model_dir) as runner:
            if runner.provider != CUDA:
                return False, f"skipped: onnxruntime fell back to {runner.provider}"
            spec = runner.inputs[0]
            x = np.zeros((1, *spec.shape[1:]), dtype=np.float32)
            runner.run({spec.name: x}, [o.name for o in runner.outputs])
    except Exception as exc:  # any failure means: no usable GPU here
        return False, f"skipped: a CUDA session or run failed ({exc})"
    return True, "ran"


def _gpu_name() -> str:
    try:
        import subprocess

        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        )
        return out.stdout.strip().splitlines()[0]
    except Exception:  # nvidia-smi is optional
        return "unknown GPU"


def run(repository: Path, bench: Path, policy: Policy, raw_seconds: float) -> dict[str, Any]:
    if not present(repository, "resnet50"):
        return {"status": "skipped: resnet50 is not in the bench repository"}
    ok, status = cuda_works(repository / "resnet50")
    if not ok:
        return {"status": status}
    fp16 = convert(repository, "resnet50", "fp16", bench / "logs" / "export.log")
    names = [m for m in MODELS if present(repository, m)]
    gpu_repo = variant(repository, bench / "gpu", names, device="gpu")
    models: dict[str, Any] = {name: {} for name in names}
    for name in names:
        models[name]["raw"] = raw.measure(gpu_repo / name, raw_seconds)
    with servers.cnnserve(gpu_repo, names, bench / "logs" / "gpu.log") as server:
        for name in names:
            load = drive.workload(server.url, name)
            models[name]["cnnserve"] = drive.levels(server.url, name, load, (16, 64), policy)
            load8 = drive.workload(server.url, name, batch=8)
            eight = drive.levels(server.url, name, load8, (16,), policy)
            models[name]["cnnserve"]["16 x batch 8"] = eight["16"]
    return {"status": f"ran on {_gpu_name()}", "fp16": fp16, "models": models}
