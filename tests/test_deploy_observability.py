"""The dashboard, the Prometheus rules and the adapter rules name only metrics that exist.

deploy/metric_names.txt is the list the server exports (tests/test_metrics.py checks it
against a live scrape); every PromQL expression here is read with the small extractor in
tests/deploy_promql.py and must name listed metrics (or series recorded by our rules),
labels those metrics carry, and real PromQL functions.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy_promql import AGGREGATIONS, FUNCTIONS, load_metric_names, names, series_names

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
METRICS = load_metric_names(DEPLOY / "metric_names.txt")
SERIES = series_names(METRICS)
# Labels Prometheus adds at scrape time (the Prometheus Operator's set) and `up`.
TARGET_LABELS = frozenset(
    {"namespace", "pod", "instance", "job", "service", "container", "endpoint"}
)
STANDARD_SERIES = frozenset({"up"})
RULES = yaml.safe_load((DEPLOY / "prometheus" / "rules.yaml").read_text())
RECORDED = {r["record"] for g in RULES["spec"]["groups"] for r in g["rules"] if "record" in r}


def check_expression(expr: str, where: str) -> None:
    found = names(expr)
    known_series = set(SERIES) | RECORDED | STANDARD_SERIES
    assert found.metrics, f"{where}: no metric in {expr!r}"
    assert found.metrics <= known_series, f"{where}: unknown {found.metrics - known_series}"
    labels = TARGET_LABELS.union(*(m.labels for m in SERIES.values()))
    assert found.labels <= labels, f"{where}: unknown labels {found.labels - labels}"
    functions = FUNCTIONS | AGGREGATIONS
    assert found.functions <= functions, f"{where}: unknown {found.functions - functions}"
    for metric in found.metrics & set(SERIES):
        for name in re.findall(rf"\b{metric}\{{([^}}]*)\}}", expr):
            used = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", name))
            allowed = SERIES[metric].labels | TARGET_LABELS
            assert used <= allowed, f"{where}: {metric} has no label {used - allowed}"


# --- the list itself -------------------------------------------------------------------


def test_metric_names_follow_prometheus_conventions() -> None:
    assert "cnnserve_inference_pending_requests" in METRICS
    for m in METRICS.values():
        assert m.name.startswith("cnnserve_"), m.name
        assert m.type in ("counter", "gauge", "histogram"), m.name
        assert m.name.endswith("_total") == (m.type == "counter"), m.name
        if "duration" in m.name:
            assert m.name.endswith("_seconds"), m.name


def test_extractor_tells_metrics_from_labels_and_functions() -> None:
    found = names(
        'sum by (code) (rate(a_total{namespace="$namespace", code!="OK"}[$__rate_interval]))'
        " / ignoring (code) group_left () sum(rate(a_total[5m])) > bool 0.5"
        " and on (pod) histogram_quantile(0.9, b_bucket{le=~'.*'}) offset 1m"
    )
    assert found.metrics == {"a_total", "b_bucket"}
    assert found.labels == {"code", "namespace", "pod", "le"}
    assert found.functions == {"sum", "rate", "histogram_quantile"}
    adapter = names("sum(<<.Series>>{<<.LabelMatchers>>}) by (<<.GroupBy>>)")
    assert adapter.metrics == set()
    assert names("level:metric:rate5m > (14.4 * 0.01)").metrics == {"level:metric:rate5m"}


# --- Grafana ------------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((DEPLOY / "grafana" / "cnnserve.json").read_text())
    return data


def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in items:
        yield panel
        yield from panels(panel.get("panels", []))


def test_dashboard_uses_a_datasource_variable() -> None:
    board = dashboard()
    assert isinstance(board["schemaVersion"], int)
    assert board["schemaVersion"] >= 36
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in panels(board["panels"])]
    assert len(ids) == len(set(ids))
    expected = {"type": "prometheus", "uid": "${datasource}"}
    for panel in panels(board["panels"]):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == expected, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == expected, panel["title"]
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["datasource"] == expected, variable["name"]


def test_dashboard_queries_name_exported_metrics() -> None:
    board = dashboard()
    for panel in panels(board["panels"]):
        for target in panel.get("targets", []):
            check_expression(target["expr"], f"panel {panel['title']!r}")
    for variable in board["templating"]["list"]:
        if variable["type"] != "query":
            continue
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", variable["definition"])
        assert match, variable["definition"]
        check_expression(match[1], f"variable {variable['name']}")
        assert match[2] in TARGET_LABELS | {"model", "version"}


QUANTILE = (
    r"histogram_quantile\({}, sum by \(le\) "
    r"\(rate\(cnnserve_inference_request_duration_seconds_bucket"
)


def test_dashboard_shows_what_an_operator_needs() -> None:
    exprs = " ".join(t["expr"] for p in panels(dashboard()["panels"]) for t in p.get("targets", []))
    wanted = [
        r"rate\(cnnserve_inference_requests_total",  # request rate
        r"sum by \(code\) \(rate\(cnnserve_grpc_requests_total",  # errors by code
        QUANTILE.format("0\\.5"),
        QUANTILE.format("0\\.99"),
        r"cnnserve_inference_queue_duration_seconds_bucket",
        r"cnnserve_inference_compute_duration_seconds_bucket",
        r"cnnserve_inference_batch_size_bucket",
        r"cnnserve_inference_pending_requests",
        r"cnnserve_model_ready",
    ]
    for pattern in wanted:
        assert re.search(pattern, exprs), pattern


# --- Prometheus rules and the adapter --------------------------------------------------


def rules() -> Iterator[dict[str, Any]]:
    for group in RULES["spec"]["groups"]:
        yield from group["rules"]


def test_rules_name_exported_metrics() -> None:
    for rule in rules():
        check_expression(rule["expr"], rule.get("record") or rule["alert"])


def test_recording_rules_follow_the_naming_convention() -> None:
    for name in RECORDED:
        level, metric, operations = name.split(":")
        assert level, name
        assert operations, name
        assert metric.startswith("cnnserve_"), name


@pytest.mark.parametrize(
    "alert",
    [
        "CnnserveHighErrorRatio",
        "CnnserveLatencySLOBurnFast",
        "CnnserveLatencySLOBurnSlow",
        "CnnserveModelUnavailable",
        "CnnserveModelNotReady",
    ],
)
def test_alerts_have_a_severity_and_a_summary(alert: str) -> None:
    rule = next(r for r in rules() if r.get("alert") == alert)
    assert rule["labels"]["severity"] in ("warning", "critical")
    assert rule["annotations"]["summary"]
    assert rule["annotations"]["description"]


def test_latency_slo_reads_a_bucket_the_server_has() -> None:
    if not (ROOT / "cnnserve" / "server" / "metrics.py").is_file():
        pytest.skip("cnnserve.server.metrics is not written yet")
    from cnnserve.server.metrics import DURATION_BUCKETS

    boundaries = {float(le) for rule in rules() for le in re.findall(r'le="([^"]+)"', rule["expr"])}
    assert boundaries
    assert boundaries <= set(DURATION_BUCKETS)


def test_adapter_publishes_the_hpa_metric_from_exported_series() -> None:
    values = yaml.safe_load((DEPLOY / "k8s" / "prometheus-adapter-rules.yaml").read_text())
    published = set()
    for rule in values["rules"]["custom"]:
        check_expression(rule["seriesQuery"], rule["name"]["as"])
        series = names(rule["seriesQuery"]).metrics
        assert len(series) == 1
        assert re.fullmatch(rule["name"]["matches"], series.pop())
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
        assert "<<.Series>>" in rule["metricsQuery"]
        assert "<<.GroupBy>>" in rule["metricsQuery"]
        published.add(rule["name"]["as"])
    hpa = yaml.safe_load((DEPLOY / "k8s" / "base" / "hpa.yaml").read_text())
    wanted = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
    assert wanted
    assert wanted <= published


def test_label_values_matched_are_values_the_server_writes() -> None:
    """PromQL matches label values case-sensitively: an `outcome` the server never writes
    (it writes "success" or a status code name in lower case) leaves an alert silent."""
    import grpc

    written = {
        "outcome": {"success"} | {c.name.lower() for c in grpc.StatusCode},
        "code": {c.name for c in grpc.StatusCode},
    }
    text = (DEPLOY / "prometheus" / "rules.yaml").read_text()
    text += (DEPLOY / "grafana" / "cnnserve.json").read_text().replace('\\"', '"')
    matched = re.findall(r"\b(outcome|code)\s*(?:=~|!~|!=|=)\s*\"([^\"]*)\"", text)
    assert {label for label, _ in matched} == {"outcome", "code"}, matched
    for label, pattern in matched:
        for value in pattern.split("|"):
            assert value in written[label], f"{label}={value!r} is never written"
