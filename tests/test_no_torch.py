"""The server imports and serves in an environment without torch, like the runtime image.

The runtime image installs cnnserve without the export extra. Rather than reinstall
everything, the fixture builds a real virtual environment whose site-packages holds
exactly what that install would: cnnserve and the closure of its runtime requirements
(markers evaluated, no extras), linked from this environment. torch, torchvision and
every other dev or export package are simply absent, so `import torch` fails there as
it would in the image.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.servers import wait_for_port

ROOT = Path(__file__).resolve().parent.parent
EXCLUDED = {"torch", "torchvision", "onnx", "onnxscript", "scikit-learn"}


def runtime_distributions() -> dict[str, md.Distribution]:
    """cnnserve and everything it needs at run time, by canonical name."""
    found: dict[str, md.Distribution] = {}
    todo = ["cnnserve"]
    while todo:
        name = canonicalize_name(todo.pop())
        if name in found:
            continue
        found[name] = dist = md.distribution(name)
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return found


@pytest.fixture(scope="module")
def python_without_torch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    venv = tmp_path_factory.mktemp("no-torch") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    dists = runtime_distributions()
    assert not EXCLUDED & set(dists), "the runtime requirements pull in export packages"
    # cnnserve itself from this checkout (installed editable here, or not at all).
    (site / "cnnserve").symlink_to(ROOT / "cnnserve")
    for name, dist in dists.items():
        if name == "cnnserve":
            continue
        assert dist.files is not None, f"{dist.metadata['Name']} has no RECORD"
        source = Path(str(dist.locate_file("")))
        for top in {f.parts[0] for f in dist.files if f.parts[0] not in ("..", "__pycache__")}:
            if not (site / top).exists():
                (site / top).symlink_to(source / top)
    return python


def test_the_environment_really_lacks_torch(python_without_torch: Path) -> None:
    code = "import importlib.util as u; assert u.find_spec('torch') is None, 'torch found'"
    subprocess.run(
        [str(python_without_torch), "-c", code], check=True, cwd=python_without_torch.parent
    )


def test_server_imports_without_torch(python_without_torch: Path) -> None:
    code = (
        "import sys, cnnserve.server.app, cnnserve.server.cli, cnnserve.cli;"
        "assert 'torch' not in sys.modules"
    )
    subprocess.run(
        [str(python_without_torch), "-c", code],
        check=True,
        timeout=120,
        cwd=python_without_torch.parent,
    )


def test_server_serves_without_torch(python_without_torch: Path, tmp_path: Path) -> None:
    tiny = pytest.importorskip("tests.tiny", reason="writing the test model needs onnx")
    tc = pytest.importorskip("tritonclient.grpc")
    repository = tmp_path / "repository"
    tiny.write_tiny(repository)
    log_path = tmp_path / "serve.log"
    cmd = [str(python_without_torch), "-m", "cnnserve", "serve", "--repository", str(repository),
           "--host", "127.0.0.1", "--grpc-port", "0", "--metrics-port", "-1",
           "--grace-period-secs", "5"]  # fmt: skip
    with log_path.open("w") as log:
        process = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            cwd=tmp_path,
        )
    try:
        port = wait_for_port(process, log_path)
        client = tc.InferenceServerClient(f"127.0.0.1:{port}")
        assert client.is_model_ready("tiny")
        x = np.ones((2, 4), dtype=np.float32)
        inputs = [tc.InferInput("x", list(x.shape), "FP32")]
        inputs[0].set_data_from_numpy(x)
        y = client.infer("tiny", inputs).as_numpy("y")
        np.testing.assert_allclose(y, x @ tiny.TINY_WEIGHTS, rtol=1e-6)
        client.close()
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0, log_path.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
