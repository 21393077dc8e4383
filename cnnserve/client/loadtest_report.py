"""What `cnnserve loadtest` reports: per-level figures, and the table, CSV, JSON and plot.

A level's figures come from the windows it kept (the last three when stable):
- throughput: successful requests and inferences (images) per second;
- latency percentiles of the successes, in milliseconds;
- at a request rate, whether the server kept up (`kept_up`): it answered with
  success all but 5% (or 5 requests) of those due in the windows. When it did
  not, requests queue without end (or fail), and the percentiles, of those
  answered within the windows, understate the latency;
- errors by gRPC status code (plus CLIENT_BACKLOG and UNANSWERED, see the
  engine), with the first message of each code: unlike the rest, those of the
  whole level, warm-up and windows not kept included;
- the server-side split, in microseconds per request: the differences of
  the cumulative ModelStatistics (Triton's semantics: `success` is the whole
  request inside the server, then `queue`, `compute_input`, `compute_infer`
  and `compute_output`) between the start and the end of the kept windows;
  absent when the server does not implement ModelStatistics;
- the client's own cost: CPU time per request and cores busy (every thread
  of this process, gRPC's included).
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from cnnserve.client.loadtest_engine import Level, Window

PERCENTILES = (50, 90, 95, 99)
KEPT_UP = 0.95
KEPT_UP_SLACK = 5  # requests; at low rates one answered in the next window is no backlog
BACKLOG_CODE = "CLIENT_BACKLOG"  # open loop: not sent, too many were unanswered (the engine)
UNANSWERED_CODE = "UNANSWERED"  # still waiting for its answer when the level ended


@dataclass(frozen=True)
class StatsSnapshot:
    """Cumulative ModelStatistics figures of one model, summed over its versions."""

    requests: int = 0
    inferences: int = 0
    executions: int = 0
    success_ns: int = 0
    queue_ns: int = 0
    input_ns: int = 0
    infer_ns: int = 0
    output_ns: int = 0

    @classmethod
    def from_response(cls, response: Any, model: str, version: str) -> StatsSnapshot:
        totals = Counter[str]()
        for m in response.model_stats:
            if m.name != model or (version and m.version != version):
                continue
            s = m.inference_stats
            totals.update(
                requests=s.success.count,
                inferences=m.inference_count,
                executions=m.execution_count,
                success_ns=s.success.ns,
                queue_ns=s.queue.ns,
                input_ns=s.compute_input.ns,
                infer_ns=s.compute_infer.ns,
                output_ns=s.compute_output.ns,
            )
        return cls(**totals)

    def since(self, earlier: StatsSnapshot) -> ServerSplit | None:
        requests = self.requests - earlier.requests
        if requests <= 0:
            return None

        def per_request(now: int, then: int) -> float:
            return round((now - then) / requests / 1e3, 1)

        executions = self.executions - earlier.executions
        return ServerSplit(
            requests=requests,
            request=per_request(self.success_ns, earlier.success_ns),
            queue=per_request(self.queue_ns, earlier.queue_ns),
            compute_input=per_request(self.input_ns, earlier.input_ns),
            compute_infer=per_request(self.infer_ns, earlier.infer_ns),
            compute_output=per_request(self.output_ns, earlier.output_ns),
            batch=round((self.inferences - earlier.inferences) / executions, 2)
            if executions > 0
            else 0.0,
        )


@dataclass(frozen=True)
class ServerSplit:
    """Microseconds per successful request inside the server, and the mean batch executed."""

    requests: int
    request: float
    queue: float
    compute_input: float
    compute_infer: float
    compute_output: float
    batch: float


@dataclass
class LevelResult:
    concurrency: int | None
    request_rate: float | None
    poisson: bool
    windows: int
    stable: bool | None  # None: one window of --duration, no stability check
    seconds: float
    requests: int
    inferences: int
    requests_per_s: float
    inferences_per_s: float
    latency_ms: dict[str, float | None]
    errors: dict[str, int]
    error_count: int
    error_details: dict[str, str]
    kept_up: bool | None  # at a request rate: see the module's doc; else None
    server_us: dict[str, float] | None
    client: dict[str, float]

    @property
    def label(self) -> str:
        return str(self.concurrency) if self.concurrency else f"{self.request_rate:g}/s"


def latency_ms(latencies_ns: Sequence[int]) -> dict[str, float | None]:
    if not latencies_ns:
        return dict.fromkeys([*(f"p{p}" for p in PERCENTILES), "mean", "max"])
    ms = np.asarray(latencies_ns, dtype=np.float64) / 1e6
    figures = np.percentile(ms, PERCENTILES, method="inverted_cdf")
    result: dict[str, float | None] = {
        f"p{p}": round(float(v), 3) for p, v in zip(PERCENTILES, figures, strict=True)
    }
    return result | {"mean": round(float(ms.mean()), 3), "max": round(float(ms.max()), 3)}


def summarize(
    level: Level,
    windows: Sequence[Window],
    inferences_per_request: int,
    server: ServerSplit | None,
    stable: bool | None,
    *,
    windows_run: int,
    errors: Counter[str],
    details: dict[str, str],
) -> LevelResult:
    """`windows` are the kept ones; `errors` and their `details`, the whole level's."""
    seconds = sum(w.seconds for w in windows)
    latencies = [ns for w in windows for ns in w.latencies_ns]
    in_windows: Counter[str] = Counter()
    for w in windows:
        in_windows.update(w.errors)
    requests = len(latencies)
    cpu_ns = sum(w.cpu_ns for w in windows)
    sent = requests + in_windows.total()
    due = sum(w.due for w in windows)
    behind = due - requests
    kept_up = behind <= max((1 - KEPT_UP) * due, KEPT_UP_SLACK) if level.rate else None
    return LevelResult(
        concurrency=level.concurrency or None,
        request_rate=level.rate or None,
        poisson=level.poisson,
        windows=windows_run,
        stable=stable,
        seconds=round(seconds, 3),
        requests=requests,
        inferences=requests * inferences_per_request,
        requests_per_s=round(requests / seconds, 2) if seconds else 0.0,
        inferences_per_s=round(requests * inferences_per_request / seconds, 2) if seconds else 0.0,
        latency_ms=latency_ms(latencies),
        errors=dict(sorted(errors.items())),
        error_count=errors.total(),
        error_details={code: details.get(code, "") for code in sorted(errors)},
        kept_up=kept_up,
        server_us=None if server is None else asdict(server),
        client={
            "cpu_us_per_request": round(cpu_ns / sent / 1e3, 1) if sent else 0.0,
            "cpu_cores": round(cpu_ns / 1e9 / seconds, 2) if seconds else 0.0,
        },
    )


# -- output --------------------------------------------------------------------------

_SERVER_COLUMNS = ("request", "queue", "compute_input", "compute_infer", "compute_output")


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _errors(result: LevelResult) -> str:
    return " ".join(f"{code}={n}" for code, n in result.errors.items()) or "0"


def table(results: Sequence[LevelResult]) -> str:
    """Columns as perf_analyzer prints them, plus the server's split and the client's cost."""
    rate_mode = bool(results) and results[0].concurrency is None
    headers = ["Request rate" if rate_mode else "Concurrency", "Infer/s", "Req/s"]
    headers += [f"p{p} ms" for p in PERCENTILES]
    headers += ["Server us", "Queue us", "Input us", "Infer us", "Output us", "Batch"]
    headers += ["Client us/req", "Errors", "Stable"]
    rows = []
    for r in results:
        row = [r.label, _num(r.inferences_per_s, 1), _num(r.requests_per_s, 1)]
        row += [_num(r.latency_ms[f"p{p}"]) for p in PERCENTILES]
        server = r.server_us or {}
        row += [_num(server.get(k), 0) for k in _SERVER_COLUMNS] + [_num(server.get("batch"))]
        row += [_num(r.client["cpu_us_per_request"], 0), _errors(r)]
        row += ["-" if r.stable is None else "yes" if r.stable else f"no ({r.windows} windows)"]
        rows.append(row)
    cells = [headers, *rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


CSV_FIELDS = [
    "concurrency",
    "request_rate",
    "poisson",
    "kept_up",
    "inferences_per_s",
    "requests_per_s",
    "p50_ms",
    "p90_ms",
    "p95_ms",
    "p99_ms",
    "mean_ms",
    "max_ms",
    "error_count",
    "errors",
    "server_request_us",
    "server_queue_us",
    "server_compute_input_us",
    "server_compute_infer_us",
    "server_compute_output_us",
    "server_batch",
    "client_cpu_us_per_request",
    "client_cpu_cores",
    "windows",
    "seconds",
    "stable",
]


def csv_row(r: LevelResult) -> dict[str, object]:
    row: dict[str, object] = {
        "concurrency": r.concurrency or "",
        "request_rate": r.request_rate or "",
        "poisson": r.poisson if r.request_rate else "",
        "kept_up": "" if r.kept_up is None else r.kept_up,
        "inferences_per_s": r.inferences_per_s,
        "requests_per_s": r.requests_per_s,
        "error_count": r.error_count,
        "errors": ";".join(f"{code}={n}" for code, n in r.errors.items()),
        "client_cpu_us_per_request": r.client["cpu_us_per_request"],
        "client_cpu_cores": r.client["cpu_cores"],
        "windows": r.windows,
        "seconds": r.seconds,
        "stable": r.stable,
    }
    for key, value in r.latency_ms.items():
        row[f"{key}_ms"] = "" if value is None else value
    for key in (*_SERVER_COLUMNS, "batch"):
        value = (r.server_us or {}).get(key)
        row[f"server_{key}_us" if key != "batch" else "server_batch"] = (
            "" if value is None else value
        )
    return row


def write_csv(path: Path, results: Sequence[LevelResult]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for r in results:
            writer.writerow(csv_row(r))


def write_json(path: Path, header: dict[str, Any], results: Sequence[LevelResult]) -> None:
    document = header | {"levels": [asdict(r) for r in results]}
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


PLOT_FORMATS = {"png", "svg", "pdf", "jpg", "jpeg"}


def plot_refusal(path: Path) -> str | None:
    """Why matplotlib cannot write a plot to `path` (checked before measuring), or None."""
    from matplotlib.figure import Figure

    # Others (eps, pgf, ...) need programs beyond matplotlib, found missing only when drawn.
    formats = PLOT_FORMATS & set(Figure().canvas.get_supported_filetypes())
    if path.suffix.lstrip(".").lower() not in formats:
        return f"--plot {path}: name a {', '.join(f'.{f}' for f in sorted(formats))} file"
    return None


def plot(path: Path, title: str, results: Sequence[LevelResult]) -> None:
    """Latency (p50 and p99) against throughput, one point per level, labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kept = [r for r in results if r.latency_ms["p50"] is not None]
    x = [r.inferences_per_s for r in kept]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, style in (("p50", "o-"), ("p99", "s--")):
        ax.plot(x, [r.latency_ms[key] or 0.0 for r in kept], style, label=key)
    for r in kept:
        ax.annotate(
            f"c={r.label}" if r.concurrency else r.label,  # in flight, or requests/s
            (r.inferences_per_s, r.latency_ms["p99"] or 0.0),
            fontsize=8,
            textcoords="offset points",
            xytext=(4, 4),
        )
    ax.set_xlabel("throughput (inferences/s)")
    ax.set_ylabel("latency (ms)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
