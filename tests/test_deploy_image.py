"""The Dockerfile, its build context and the image's HEALTHCHECK, checked without Docker."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from dockerfile_parse import DockerfileParser
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tests.deploy_kustomize import render_in_python

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
RUNTIMES = ("runtime-gpu", "runtime-cpu")


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def values(self, instruction: str) -> list[str]:
        return [v for i, v in self.instructions if i == instruction]


def stages() -> dict[str, Stage]:
    """Stages by name, base images with the global ARG defaults filled in."""
    parser = DockerfileParser(path=str(DOCKERFILE))
    args: dict[str, str] = {}
    found: dict[str, Stage] = {}
    current: Stage | None = None
    for item in parser.structure:
        instruction, value = item["instruction"], item["value"]
        if instruction == "ARG" and current is None:
            name, _, default = value.partition("=")
            args[name] = default
        elif instruction == "FROM":
            image, _, name = re.split(r"\s+", value, maxsplit=2)
            base = re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], image)
            current = found[name] = Stage(name, base)
        elif current is not None and instruction != "COMMENT":
            current.instructions.append((instruction, value))
    # dockerfile-parse resolves the same base images on its own.
    assert [s.base for s in found.values()] == parser.parent_images
    return found


def test_dockerfile_has_the_export_models_and_runtime_stages() -> None:
    s = stages()
    assert list(s) == ["wheel", "export", "models", *RUNTIMES, "runtime"]
    # CUDA 13 with cuDNN (9 in every CUDA 13 image), runtime flavour: no compilers.
    gpu = re.fullmatch(
        r"nvidia/cuda:13\.\d+\.\d+-cudnn-runtime-ubuntu(\d+)\.04", s["runtime-gpu"].base
    )
    assert gpu, s["runtime-gpu"].base
    # Ubuntu 24.04 is the first whose python3 (3.12) meets requires-python >= 3.11.
    assert int(gpu[1]) >= 24
    assert re.fullmatch(r"python:3\.1[1-9]-slim-\w+", s["runtime-cpu"].base)
    assert s["runtime"].base == "runtime-gpu"
    assert s["models"].values("COPY") == [
        "--from=export /opt/cnnserve/model_repository /opt/cnnserve/model_repository"
    ]


def _pip_installs(stage: Stage) -> Iterator[str]:
    for run in stage.values("RUN"):
        for command in run.split("&&"):
            if "pip install" in command:
                yield command


def test_runtime_images_install_the_server_without_torch() -> None:
    s = stages()
    for name in RUNTIMES:
        (install,) = _pip_installs(s[name])
        assert install.split()[-1] == "/wheels/cnnserve-*.whl", install
        # And the build fails if torch or plain onnxruntime got in anyway.
        assert any("! pip show --quiet torch onnxruntime" in run for run in s[name].values("RUN"))
    (export_install,) = _pip_installs(s["export"])
    assert "[export]" in export_install


def test_runtime_images_serve_and_check_health_over_grpc() -> None:
    s = stages()
    for name in RUNTIMES:
        stage = s[name]
        assert json.loads(stage.values("ENTRYPOINT")[-1]) == ["cnnserve", "serve"]
        assert set(stage.values("EXPOSE")[-1].split()) == {"8001", "8002"}
        (healthcheck,) = stage.values("HEALTHCHECK")
        command = json.loads(healthcheck.split("CMD", 1)[1])
        assert command == ["python", "/opt/cnnserve/healthcheck.py"]
        assert "deploy/healthcheck.py /opt/cnnserve/healthcheck.py" in stage.values("COPY")
        env = " ".join(stage.values("ENV"))
        assert "CNNSERVE_REPOSITORY=/models" in env


def test_images_run_as_the_pods_non_root_user() -> None:
    objs = render_in_python(ROOT / "deploy" / "k8s" / "overlays" / "gpu")
    deployment = next(o for o in objs if o["kind"] == "Deployment")
    pod_user = deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
    for name, stage in stages().items():
        if name in ("wheel", "runtime"):  # a build step, and an alias
            continue
        # Numeric, so that the kubelet can check runAsNonRoot against the image.
        user, _, group = stage.values("USER")[-1].partition(":")
        assert user.isdigit(), name
        assert int(user) == pod_user, name
        assert int(group) > 0, name


# --- .dockerignore -------------------------------------------------------------------


def _pattern(text: str) -> re.Pattern[str]:
    out = ""
    for token in re.split(r"(\*\*/|\*\*|\*|\?)", text.strip("/")):
        out += {"**/": "(.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(token, re.escape(token))
    return re.compile(out)


def in_build_context(path: str) -> bool:
    """Docker's rule: the last pattern matching the path, or a parent of it, decides."""
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    included = True
    for pattern in patterns:
        exception = pattern.startswith("!")
        regex = _pattern(pattern.lstrip("!"))
        if any(regex.fullmatch(p) for p in prefixes):
            included = exception
    return included


def test_build_context_holds_what_the_images_copy_and_nothing_big() -> None:
    for stage in stages().values():
        for copy in stage.values("COPY"):
            if copy.startswith("--from="):
                continue
            for source in copy.split()[:-1]:
                assert (ROOT / source).exists(), source
                assert in_build_context(source), f"{source} is copied but ignored"
    assert in_build_context("cnnserve/server/app.py")
    for path in (
        ".venv/bin/python",
        "model_repository/lenet5/1/model.onnx",
        ".git/HEAD",
        "tests/test_deploy.py",
        "cnnserve.egg-info/PKG-INFO",
        "cnnserve/server/__pycache__/app.cpython-311.pyc",
        "deploy/k8s/base/deployment.yaml",
    ):
        assert not in_build_context(path), path


# --- the HEALTHCHECK script against a real gRPC health service ----------------------


@pytest.fixture
def health_server() -> Iterator[tuple[health.HealthServicer, int]]:
    servicer = health.HealthServicer()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, port
    server.stop(None)


def run_healthcheck(port: int) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CNNSERVE_GRPC_PORT": str(port)}
    script = ROOT / "deploy" / "healthcheck.py"
    return subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=30
    )


def test_healthcheck_passes_only_while_the_server_is_serving(
    health_server: tuple[health.HealthServicer, int],
) -> None:
    servicer, port = health_server
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    loading = run_healthcheck(port)
    assert loading.returncode == 1
    assert "NOT_SERVING" in loading.stdout
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert run_healthcheck(port).returncode == 0


def test_healthcheck_fails_when_nothing_listens() -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    server.stop(None).wait()
    refused = run_healthcheck(port)
    assert refused.returncode == 1
    assert "UNAVAILABLE" in refused.stderr
