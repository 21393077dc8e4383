"""Project-level promises: generated code is fresh, the server never imports torch, settings."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from cnnserve.server import config

ROOT = Path(__file__).resolve().parent.parent


def test_generated_protobuf_code_is_up_to_date(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "proto" / "generate.py"), "--out", str(tmp_path)], check=True
    )
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert fresh, "nothing was generated"
    for rel in fresh:
        committed = ROOT / rel
        assert committed.is_file(), f"{rel} is generated but not committed: run make proto"
        assert committed.read_bytes() == (tmp_path / rel).read_bytes(), (
            f"{rel} is stale: run make proto"
        )


def test_cnnserve_and_tritonclient_share_a_process() -> None:
    code = (
        "import tritonclient.grpc, cnnserve.v1.grpc_service_pb2_grpc, cnnserve.v1.inference_pb2;"
        "import cnnserve.server.app"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_server_does_not_import_torch() -> None:
    code = "import sys, cnnserve.server.app, cnnserve.server.cli; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def parse(*argv: str, env: dict[str, str] | None = None) -> config.Settings:
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    return config.from_args(parser.parse_args(["--repository", str(ROOT), *argv]), env or {})


def test_settings_come_from_flags_then_environment_then_defaults() -> None:
    assert parse().grpc_port == 8001
    env = {
        "CNNSERVE_GRPC_PORT": "9001",
        "CNNSERVE_LOAD_MODEL": "a, b",
        "CNNSERVE_LOG_FORMAT": "json",
    }
    from_env = parse(env=env)
    assert from_env.grpc_port == 9001
    assert from_env.load_model == ("a", "b")
    assert from_env.log_format == "json"
    assert parse("--grpc-port", "7001", env=env).grpc_port == 7001
    assert parse("--load-model", "x", "--load-model", "y").load_model == ("x", "y")
    assert parse("--repository", "/tmp").repository == Path("/tmp")
    assert parse("--log-level", "debug").log_level == "debug"  # any case


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"CNNSERVE_GRPC_PORT": "eighty"}, "CNNSERVE_GRPC_PORT"),
        ({"CNNSERVE_MODEL_CONTROL_MODE": "sometimes"}, "--model-control-mode must be one of"),
        ({"CNNSERVE_TLS_CERT": "/c.pem"}, "--tls-key"),
        ({"CNNSERVE_TLS_CERT": "/c.pem", "CNNSERVE_TLS_KEY": "/k.pem"}, "no such file"),
        ({"CNNSERVE_REQUEST_LOG_RATE": "2"}, "between 0 and 1"),
        ({"CNNSERVE_GRPC_PORT": "70000"}, "--grpc-port must be between 0 and 65535, not 70000"),
        ({"CNNSERVE_METRICS_PORT": "-2"}, "--metrics-port must be between -1 and 65535"),
        ({"CNNSERVE_LOG_LEVEL": "loud"}, "--log-level must be one of DEBUG, INFO"),
        ({"CNNSERVE_PREPROCESS_THREADS": "0"}, "--preprocess-threads must be at least 1"),
        ({"CNNSERVE_REPOSITORY_POLL_SECS": "0"}, "--repository-poll-secs must be at least"),
        ({"CNNSERVE_MAX_MESSAGE_BYTES": "0"}, "--max-message-bytes must be between 4096"),
        ({"CNNSERVE_GRACE_PERIOD_SECS": "-1"}, "--grace-period-secs must be at least 0"),
        ({"CNNSERVE_MAX_IMAGE_PIXELS": "0"}, "--max-image-pixels must be at least 1"),
    ],
)
def test_bad_settings_are_refused_with_a_reason(env: dict[str, str], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        parse(env=env)


def test_a_token_file_without_a_token_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "tokens"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match=f"--auth-token-file {empty}: holds no token"):
        parse("--auth-token-file", str(empty))


def test_a_certificate_that_is_not_one_is_refused_before_the_port_opens(tmp_path: Path) -> None:
    garbage = tmp_path / "cert.pem"
    garbage.write_text("not a certificate\n")
    cert = ["--tls-cert", str(garbage), "--tls-key", str(garbage)]
    with pytest.raises(ValueError, match="are not a PEM certificate chain and its private key"):
        parse(*cert)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tls-cert", "x"], "--tls-cert and --tls-key go together"),
        (["--repository", "/nonexistent"], "model repository /nonexistent is not a folder"),
    ],
)
def test_serve_refuses_bad_settings_with_one_line(args: list[str], message: str) -> None:
    command = [sys.executable, "-m", "cnnserve", "serve", *args]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == f"cnnserve serve: {message}"


def test_readme_documents_every_serve_option_and_metric() -> None:
    import dataclasses

    readme = (ROOT / "README.md").read_text()
    for f in dataclasses.fields(config.Settings):
        assert f"`--{f.name.replace('_', '-')}" in readme, f.name
    for line in (ROOT / "deploy" / "metric_names.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            assert f"`{line.split()[0]}" in readme, line


def test_an_unknown_flag_is_named_by_its_command() -> None:
    command = [sys.executable, "-m", "cnnserve", "export", "lenet5", "--bogus"]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.startswith("usage: cnnserve export ")
    assert result.stderr.strip().endswith("cnnserve export: error: unrecognized arguments: --bogus")
