"""TLS, mutual TLS, bearer tokens and the admin token, against a real server."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.certs import Authority
from tests.servers import server_in_thread
from tests.tiny import write_tiny


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    write_tiny(tmp_path / "repo")
    return tmp_path / "repo"


def infer(client: tc.InferenceServerClient, **kwargs: object) -> np.ndarray:
    x = tc.InferInput("x", [1, 4], "FP32")
    x.set_data_from_numpy(np.ones((1, 4), np.float32))
    return client.infer("tiny", [x], **kwargs).as_numpy("y")


def status(call: object) -> str:
    with pytest.raises(InferenceServerException) as error:
        call()  # type: ignore[operator]
    return str(error.value.status())


def test_tls_serves_tritonclient_and_refuses_plaintext(repo: Path, tmp_path: Path) -> None:
    ca = Authority(tmp_path / "ca")
    server = ca.issue("server", server=True)
    with server_in_thread(repo, tls_cert=server.cert, tls_key=server.key) as srv:
        port = srv.server.grpc_port
        secure = tc.InferenceServerClient(
            f"localhost:{port}", ssl=True, root_certificates=str(ca.cert)
        )
        assert infer(secure).shape == (1, 3)
        plain = tc.InferenceServerClient(f"localhost:{port}")
        assert status(lambda: plain.is_server_live()) == "StatusCode.UNAVAILABLE"


def test_mutual_tls_needs_a_client_certificate(repo: Path, tmp_path: Path) -> None:
    ca = Authority(tmp_path / "ca")
    server, client = ca.issue("server", server=True), ca.issue("client", server=False)
    settings = {"tls_cert": server.cert, "tls_key": server.key, "tls_client_ca": ca.cert}
    with server_in_thread(repo, **settings) as srv:
        url = f"localhost:{srv.server.grpc_port}"
        with_cert = tc.InferenceServerClient(
            url, ssl=True, root_certificates=str(ca.cert),
            private_key=str(client.key), certificate_chain=str(client.cert),
        )  # fmt: skip
        assert infer(with_cert).shape == (1, 3)
        without = tc.InferenceServerClient(url, ssl=True, root_certificates=str(ca.cert))
        assert status(lambda: without.is_server_live()) == "StatusCode.UNAVAILABLE"


def test_rotated_certificate_is_used_without_restart(repo: Path, tmp_path: Path) -> None:
    old_ca, new_ca = Authority(tmp_path / "old", "old CA"), Authority(tmp_path / "new", "new CA")
    live = old_ca.issue("server", server=True)
    with server_in_thread(repo, tls_cert=live.cert, tls_key=live.key) as srv:
        url = f"localhost:{srv.server.grpc_port}"
        assert tc.InferenceServerClient(
            url, ssl=True, root_certificates=str(old_ca.cert)
        ).is_server_live()
        fresh = new_ca.issue("server", server=True)
        time.sleep(1.1)  # the files are checked at most once a second
        shutil.copy(fresh.cert, live.cert)
        shutil.copy(fresh.key, live.key)
        time.sleep(1.1)
        client = tc.InferenceServerClient(url, ssl=True, root_certificates=str(new_ca.cert))
        deadline = time.monotonic() + 10
        while True:
            try:
                assert client.is_server_live()
                break
            except InferenceServerException:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)


def test_bearer_token_is_required_and_health_stays_open(repo: Path, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("s3cret\n")
    with server_in_thread(repo, auth_token_file=tokens) as srv:
        client = tc.InferenceServerClient(srv.url)
        assert infer(client, headers={"authorization": "Bearer s3cret"}).shape == (1, 3)
        assert status(lambda: infer(client)) == "StatusCode.UNAUTHENTICATED"
        bad = {"authorization": "Bearer wrong"}
        assert status(lambda: infer(client, headers=bad)) == "StatusCode.UNAUTHENTICATED"
        assert status(lambda: client.get_model_repository_index()) == "StatusCode.UNAUTHENTICATED"
        with grpc.insecure_channel(srv.url) as channel:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        tokens.write_text("rotated\n")
        time.sleep(1.1)
        good = {"authorization": "Bearer rotated"}
        assert infer(client, headers=good).shape == (1, 3)
        old = {"authorization": "Bearer s3cret"}
        assert status(lambda: infer(client, headers=old)) == "StatusCode.UNAUTHENTICATED"
        calls = srv.server.metrics.registry.get_sample_value
        refused = {"method": "ModelInfer", "code": "UNAUTHENTICATED"}
        assert calls("cnnserve_grpc_requests_total", refused) == 3
        assert calls("cnnserve_grpc_requests_total", {"method": "ModelInfer", "code": "OK"}) == 2
        tokens.unlink()  # gone mid-rotation: the last tokens stay in force
        time.sleep(1.1)
        assert infer(client, headers=good).shape == (1, 3)
        assert status(lambda: infer(client, headers=old)) == "StatusCode.UNAUTHENTICATED"
        tokens.write_text("\n")  # emptied: nobody gets in, rather than everybody
        time.sleep(1.1)
        assert status(lambda: infer(client, headers=good)) == "StatusCode.UNAUTHENTICATED"
        assert status(lambda: infer(client)) == "StatusCode.UNAUTHENTICATED"


def test_closed_health_needs_the_token_too(repo: Path, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("s3cret\n")
    with server_in_thread(repo, auth_token_file=tokens, open_health="false") as srv:
        with grpc.insecure_channel(srv.url) as channel, pytest.raises(grpc.RpcError) as error:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_repository_control_needs_the_admin_token(repo: Path, tmp_path: Path) -> None:
    (tmp_path / "users").write_text("user-token\n")
    (tmp_path / "admins").write_text("admin-token\n")
    settings = {
        "model_control_mode": "explicit",
        "auth_token_file": tmp_path / "users",
        "admin_token_file": tmp_path / "admins",
    }
    with server_in_thread(repo, **settings) as srv:
        client = tc.InferenceServerClient(srv.url)
        user = {"authorization": "Bearer user-token"}
        admin = {"authorization": "Bearer admin-token"}
        assert (
            status(lambda: client.load_model("tiny", headers=user))
            == "StatusCode.PERMISSION_DENIED"
        )
        assert status(lambda: client.load_model("tiny")) == "StatusCode.UNAUTHENTICATED"
        client.load_model("tiny", headers=admin)
        assert infer(client, headers=user).shape == (1, 3)
        assert infer(client, headers=admin).shape == (1, 3)
        assert (
            status(lambda: client.unload_model("tiny", headers=user))
            == "StatusCode.PERMISSION_DENIED"
        )
        client.unload_model("tiny", headers=admin)


def test_metrics_can_use_the_grpc_certificate(repo: Path, tmp_path: Path) -> None:
    import ssl
    import urllib.error
    import urllib.request

    ca = Authority(tmp_path / "ca")
    server = ca.issue("server", server=True)
    settings = {"tls_cert": server.cert, "tls_key": server.key, "metrics_tls": "true"}
    with server_in_thread(repo, **settings) as srv:
        url = f"https://localhost:{srv.server.metrics_port}/metrics"
        context = ssl.create_default_context(cafile=str(ca.cert))
        with urllib.request.urlopen(url, context=context, timeout=10) as response:
            assert b"cnnserve_grpc_requests_total" in response.read()
        plain = f"http://localhost:{srv.server.metrics_port}/metrics"
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            urllib.request.urlopen(plain, timeout=10).close()
        # Rotated: the next scrape gets the new certificate, without SNI too (by address).
        fresh = Authority(tmp_path / "new", "new CA").issue("server", server=True)
        time.sleep(1.1)  # the files are checked at most once a second
        shutil.copy(fresh.cert, server.cert)
        shutil.copy(fresh.key, server.key)
        time.sleep(1.1)
        rotated = ssl.create_default_context(cafile=str(tmp_path / "new" / "new_CA.pem"))
        by_address = f"https://127.0.0.1:{srv.server.metrics_port}/metrics"
        with urllib.request.urlopen(by_address, context=rotated, timeout=10) as response:
            assert b"cnnserve_grpc_requests_total" in response.read()
        with pytest.raises(urllib.error.URLError):  # the old CA no longer vouches for it
            urllib.request.urlopen(url, context=context, timeout=10).close()
