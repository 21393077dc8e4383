"""`cnnserve loadtest` against a real server: the table, JSON, CSV, error codes and the split.

Windows are a fraction of a second here; the figures are checked for shape
and sense, never for speed.
"""

from __future__ import annotations

import csv
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cnnserve.cli import main
from cnnserve.client.loadtest_report import CSV_FIELDS
from tests.servers import Running, server_in_thread
from tests.tiny import write_slow, write_tiny, write_tiny_image

SHORT = ["--duration", "0.4", "--warmup-secs", "0.2"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    repository = tmp_path_factory.mktemp("loadtest_repository")
    write_tiny(repository)  # x [N, 4] -> y [N, 3], max_batch_size 8, 2 ms queue delay
    write_tiny_image(repository)  # [N, 1, 8, 8] grayscale, with preprocessing for Classify
    with server_in_thread(repository) as running:
        yield running


def loadtest(server: Running, *args: str) -> int:
    return main(["loadtest", "--url", server.url, *args])


def read_json(path: Path) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(path.read_text())
    return document


def test_levels_print_a_table_and_write_json_and_csv(
    server: Running, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_json, out_csv = tmp_path / "out.json", tmp_path / "out.csv"
    code = loadtest(
        server,
        "--model",
        "tiny",
        "--concurrency",
        "1,4",
        *SHORT,
        "--json",
        str(out_json),
        "--csv",
        str(out_csv),
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "tiny on cnnserve" in printed
    for column in ("Concurrency", "Infer/s", "Req/s", "p50 ms", "p99 ms", "Queue us", "Errors"):
        assert column in printed
    document = read_json(out_json)
    assert document["model"] == "tiny"
    assert document["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    levels = document["levels"]
    assert [level["concurrency"] for level in levels] == [1, 4]
    for level in levels:
        assert level["requests"] > 0
        assert level["inferences_per_s"] == level["requests_per_s"] > 0
        latency = level["latency_ms"]
        assert 0 < latency["p50"] <= latency["p90"] <= latency["p95"] <= latency["p99"]
        assert level["errors"] == {}
        assert level["error_count"] == 0
        assert level["client"]["cpu_us_per_request"] > 0
        assert level["stable"] is None  # one --duration window: nothing was checked
    with out_csv.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == CSV_FIELDS
    assert [row["concurrency"] for row in rows] == ["1", "4"]
    assert float(rows[1]["inferences_per_s"]) == levels[1]["inferences_per_s"]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--duration", "0"], "--duration must be a positive number, not 0.0"),
        (["--stability-pct", "-5"], "--stability-pct must be a number >= 0"),
        (["--warmup-secs", "nan"], "--warmup-secs must be a number >= 0, not nan"),
        (["--workers-per-channel", "0"], "--workers-per-channel must be a positive number"),
        (["--timeout", "0"], "--timeout must be a positive number"),
        (["--csv", "{tmp}/a", "--json", "{tmp}/a"], "--csv and --json name the same file"),
        (["--csv", "{tmp}/no/such/folder/out.csv"], "out.csv: cannot write there"),
        (["--json", "{tmp}"], "cannot write there"),
        (["--plot", "{tmp}/out.txt"], "out.txt: name a "),
        (["--plot", "{tmp}/out.pgf"], "out.pgf: name a "),  # needs LaTeX to draw
    ],
)
def test_settings_that_cannot_run_are_refused_before_measuring(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], words: str
) -> None:
    # No server listens on port 1: a refusal comes before any connection.
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
    code = main(["loadtest", "--url", "127.0.0.1:1", "--model", "tiny", *SHORT[2:], *argv])
    assert code == 2
    error = capsys.readouterr().err
    assert error.startswith("cnnserve loadtest: error: ")
    assert words in error
    assert list(tmp_path.iterdir()) == []


def test_server_side_split_comes_from_model_statistics(server: Running, tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    code = loadtest(
        server,
        "--model",
        "tiny",
        "--concurrency",
        "4",
        "--batch-size",
        "2",
        *SHORT,
        "--json",
        str(out),
    )
    assert code == 0
    [level] = read_json(out)["levels"]
    split = level["server_us"]
    assert split["requests"] > 0
    assert split["queue"] > 0  # the tiny model's config waits up to 2 ms for a batch
    assert split["compute_infer"] > 0
    assert split["request"] >= split["queue"] + split["compute_infer"]
    assert split["batch"] >= 2  # each request carries two rows
    assert level["inferences"] == 2 * level["requests"]


def test_failed_requests_are_counted_by_status_code(
    server: Running, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out.json"
    # The tiny model takes at most 8 rows per request.
    code = loadtest(
        server,
        "--model",
        "tiny",
        "--concurrency",
        "2",
        "--batch-size",
        "16",
        *SHORT,
        "--json",
        str(out),
    )
    assert code == 1
    [level] = read_json(out)["levels"]
    assert level["requests"] == 0
    assert level["errors"]["INVALID_ARGUMENT"] == level["error_count"] > 0
    assert level["latency_ms"]["p50"] is None
    printed = capsys.readouterr().out
    assert f"INVALID_ARGUMENT={level['error_count']}" in printed
    # The server's own words, once, below the table.
    assert "INVALID_ARGUMENT (first at 2): batch size 16 is outside 1..8" in printed


def test_windows_repeat_until_three_agree_or_trials_run_out(
    server: Running, tmp_path: Path
) -> None:
    windows = ["--window-secs", "0.25", "--warmup-secs", "0.1", "--max-trials", "4"]
    loose, strict = tmp_path / "loose.json", tmp_path / "strict.json"
    common = ["--model", "tiny", "--concurrency", "2", *windows]
    assert loadtest(server, *common, "--stability-pct", "1000", "--json", str(loose)) == 0
    assert loadtest(server, *common, "--stability-pct", "0", "--json", str(strict)) == 0
    [agreed] = read_json(loose)["levels"]
    assert (agreed["windows"], agreed["stable"]) == (3, True)
    [never] = read_json(strict)["levels"]  # no two windows count exactly alike
    assert never["stable"] is False
    assert never["windows"] == 4  # all it ran; the figures are the last three's


def test_request_rate_sends_on_schedule(server: Running, tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    code = loadtest(
        server,
        "--model",
        "tiny",
        "--request-rate",
        "200",
        "--poisson",
        "--duration",
        "1",
        "--warmup-secs",
        "0.2",
        "--json",
        str(out),
    )
    assert code == 0
    [level] = read_json(out)["levels"]
    assert level["concurrency"] is None
    assert (level["request_rate"], level["poisson"]) == (200, True)
    assert 100 <= level["requests_per_s"] <= 300
    assert level["kept_up"] is True  # Poisson's uneven arrivals are no backlog


def test_errors_before_the_kept_windows_are_reported_too(
    server: Running, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The model is away during the warm-up: the figures are the windows', but the
    failures are said, and the exit status is 1."""
    out = tmp_path / "out.json"
    registry = server.server.registry

    def away_then_back() -> None:
        time.sleep(0.1)
        server.call(registry.unload("tiny"))
        time.sleep(0.2)
        server.call(registry.load("tiny"))

    thread = threading.Thread(target=away_then_back)
    thread.start()
    try:
        code = loadtest(
            server, "--model", "tiny", "--concurrency", "2", "--duration", "0.5",
            "--warmup-secs", "1", "--json", str(out),
        )  # fmt: skip
    finally:
        thread.join(30)
    assert code == 1
    [level] = read_json(out)["levels"]
    assert level["requests"] > 0
    assert level["error_count"] > 0
    assert set(level["errors"]) <= {"NOT_FOUND", "UNAVAILABLE"}
    assert "(first at 2): " in capsys.readouterr().out


def test_a_rate_the_server_cannot_keep_up_with_is_said(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Requests queue without end there, and the latency of those answered in the window
    understates it: the table alone would not say so."""
    config = "max_batch_size: 1\ndynamic_batching { default_queue_policy { max_queue_size: 9999 } }"
    write_slow(tmp_path / "repo", "slow", config, layers=48, width=2048)  # ~10 ms a request
    out = tmp_path / "out.json"
    with server_in_thread(tmp_path / "repo") as slow:
        code = loadtest(
            slow, "--model", "slow", "--request-rate", "500", "--duration", "0.5",
            "--warmup-secs", "0.1", "--json", str(out),
        )  # fmt: skip
    assert code in (0, 1)  # under load gRPC may refuse some; those are counted
    [level] = read_json(out)["levels"]
    assert level["kept_up"] is False
    assert level["requests_per_s"] < 475
    assert "at 500/s the server answered" in capsys.readouterr().out


def test_classify_mode_sends_generated_images(
    server: Running, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, plot = tmp_path / "out.json", tmp_path / "plot.png"
    code = loadtest(
        server,
        "--model",
        "pixels",
        "--mode",
        "classify",
        "--concurrency",
        "2",
        "--batch-size",
        "3",
        *SHORT,
        "--json",
        str(out),
        "--plot",
        str(plot),
    )
    assert code == 0
    document = read_json(out)
    assert document["mode"] == "classify"
    [level] = document["levels"]
    assert level["requests"] > 0
    assert level["inferences"] == 3 * level["requests"]
    assert level["server_us"]["compute_infer"] > 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "pixels on cnnserve" in capsys.readouterr().out


def test_unknown_model_fails_with_one_line(
    server: Running, capsys: pytest.CaptureFixture[str]
) -> None:
    assert loadtest(server, "--model", "nope", *SHORT) == 2
    error = capsys.readouterr().err
    assert error.startswith("cnnserve loadtest: error:")
    assert "NOT_FOUND" in error


def test_bench_checks_targets_without_figures() -> None:
    """A smoke test of `make bench`'s report: with nothing measured, nothing is claimed."""
    from bench.report import targets

    found = targets({})
    assert len(found) == 8
    assert all(t["met"] is None for t in found)


def test_bench_targets_take_the_median_of_the_rounds_ratios() -> None:
    from bench.report import targets

    # Each side's median round is a different round: their quotient, 100 / 105, is 0.952.
    served = {"inferences_per_s": 100.0, "rounds": [100.0, 85.0, 120.0]}
    raw = {"batch": 16, "inferences_per_s": 105.0, "rounds": [120.0, 90.0, 105.0]}
    found = targets({"resnet18": {"cnnserve": {"16": served}, "raw": {"best": raw}}})
    assert found[0]["value"] == round(85 / 90, 3)
    assert found[0]["met"] is True
    assert found[0]["detail"].startswith("median of the rounds' ratios 0.833, 0.944, 1.143;")
    unpaired = {"resnet18": {"cnnserve": {"16": served}, "raw": {"best": {**raw, "rounds": [1]}}}}
    assert targets(unpaired)[0]["value"] == round(100 / 105, 3)
    assert "rounds" not in targets(unpaired)[0]["detail"]


def test_bench_gpu_targets_say_not_measured_without_a_gpu() -> None:
    from bench.report import all_targets, gpu_targets

    skipped = {"status": "skipped: no NVIDIA device on this machine"}
    found = gpu_targets(skipped)
    assert [t["need"] for t in found] == [">= 0.85", ">= 0.85"]
    assert all(t["met"] is None for t in found)
    assert all(t["detail"] == f"not measured: {skipped['status']}" for t in found)
    assert len(all_targets({"models": {}, "gpu": skipped})) == 10


def test_bench_gpu_targets_read_the_best_served_level_against_raw_cuda() -> None:
    from bench.report import gpu_targets

    def level(rate: float) -> dict[str, float]:
        return {"inferences_per_s": rate}

    fp32 = {
        "raw": {"best": {"batch": 32, "inferences_per_s": 2000.0}},
        "cnnserve": {"16": level(1500.0), "64": level(1800.0), "16 x batch 8": level(1600.0)},
    }
    fp16 = {
        "raw": {"best": {"batch": 64, "inferences_per_s": 4000.0}},
        "cnnserve": {"16": level(3000.0), "64": level(3300.0)},
    }
    gpu = {"status": "ran on a GPU", "models": {"resnet50": fp32, "resnet50_fp16": fp16}}
    first, second = gpu_targets(gpu)
    assert (first["value"], first["met"]) == (0.9, True)
    assert "served at 64" in first["detail"]
    assert "raw at batch 32" in first["detail"]
    assert (second["value"], second["met"]) == (0.825, False)
    only_fp32 = gpu_targets({"status": "ran on a GPU", "models": {"resnet50": fp32}})
    assert only_fp32[1]["detail"] == "not measured: resnet50_fp16 was not measured"


def test_bench_converts_a_variant_from_the_repository_once(
    lenet5_repository: Path, tmp_path: Path
) -> None:
    """The GPU section's fp16 model is converted by `cnnserve export` from the fp32 one."""
    import shutil

    from bench.repository import convert, present

    repository = tmp_path / "repository"
    shutil.copytree(lenet5_repository, repository)
    log = tmp_path / "export.log"
    assert convert(repository, "lenet5", "fp16", log) == "converted by the bench from lenet5"
    assert present(repository, "lenet5_fp16")
    assert convert(repository, "lenet5", "fp16", log) == f"in {repository}"
    missing = convert(repository, "resnet18", "fp16", log)
    assert missing.startswith("absent: the conversion failed:")
