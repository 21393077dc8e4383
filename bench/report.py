"""Issue 8's targets, checked against one run's figures, and BENCHMARKS.md written from them."""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from typing import Any

Figures = dict[str, Any]


def _get(figures: Figures, *path: str) -> Any:
    node: Any = figures
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


NOISY_CORES = 0.25  # other processes' load above which a figure is flagged


def _target(
    name: str, need: str, check: Callable[[float], bool], value: float | None, detail: str,
    *measured: Figures | None,
) -> dict[str, Any]:  # fmt: skip
    """One target; `measured` are the figures it reads, whose background load it reports."""
    loads = [m.get("other_processes_cores") or 0.0 for m in measured if isinstance(m, dict)]
    return {
        "target": name,
        "need": need,
        "value": None if value is None else round(value, 3),
        "detail": detail,
        "met": None if value is None else bool(check(value)),
        "other_load_cores": max(loads, default=0.0),
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _paired(a: Figures | None, b: Figures | None, rate: str, unit: str) -> tuple[float | None, str]:
    """a / b for a target, and how it was found.

    Where both were measured in the same rounds, the value is the median of the rounds'
    ratios, so that a round in which the machine ran fast or slow counts for both sides;
    each side's median round may come from a different round, so their quotient is not used.
    """
    x, y = _get(a or {}, rate), _get(b or {}, rate)
    ra, rb = _get(a or {}, "rounds"), _get(b or {}, "rounds")
    if not ra or not rb or len(ra) != len(rb) or not all(rb):
        return _ratio(x, y), f"{x} / {y} {unit}"
    ratios = [p / q for p, q in zip(ra, rb, strict=True)]
    rounds = ", ".join(f"{r:.3f}" for r in ratios)
    return statistics.median(ratios), (
        f"median of the rounds' ratios {rounds}; median figures {x} / {y} {unit}"
    )


def targets(models: Figures) -> list[dict[str, Any]]:
    """Issue 8, item 3: each target with its measured value and whether it is met."""
    r18, l5 = models.get("resnet18", {}), models.get("lenet5", {})
    value, detail = _paired(
        _get(r18, "cnnserve", "16"), _get(r18, "raw", "best"), "inferences_per_s", "inferences/s"
    )
    found = [
        _target(
            "resnet18 served at concurrency 16 against raw onnxruntime at the best batch",
            ">= 0.90",
            lambda v: v >= 0.90,
            value,
            f"{detail}, best batch {_get(r18, 'raw', 'best', 'batch')}",
            _get(r18, "cnnserve", "16"),
            _get(r18, "raw"),
        )
    ]
    value, detail = _paired(
        _get(l5, "cnnserve", "64"), _get(l5, "echo", "64"), "requests_per_s", "requests/s"
    )
    found.append(
        _target(
            "lenet5, batch-1 requests at concurrency 64, against the echo floor",
            ">= 0.70",
            lambda v: v >= 0.70,
            value,
            detail,
            _get(l5, "cnnserve", "64"),
            _get(l5, "echo", "64"),
        )
    )
    value, detail = _paired(
        _get(l5, "cnnserve", "64"), _get(l5, "unbatched", "64"), "requests_per_s", "requests/s"
    )
    found.append(
        _target(
            "lenet5 at concurrency 64, dynamic batching on against off",
            ">= 2.0",
            lambda v: v >= 2.0,
            value,
            detail,
            _get(l5, "cnnserve", "64"),
            _get(l5, "unbatched", "64"),
        )
    )
    p50, echo_p50 = (
        _get(l5, "cnnserve", "1", "latency_ms", "p50"),
        _get(l5, "echo", "1", "latency_ms", "p50"),
    )
    found.append(
        _target(
            "lenet5 p50 at concurrency 1, minus the echo floor's p50 (ms)",
            "<= 0.5 ms",
            lambda v: v <= 0.5,
            None if p50 is None or echo_p50 is None else p50 - echo_p50,
            f"{p50} ms - {echo_p50} ms",
            _get(l5, "cnnserve", "1"),
            _get(l5, "echo", "1"),
        )
    )
    for name in ("lenet5", "resnet18"):
        m = models.get(name, {})
        ours, peer = _get(m, "cnnserve", "16"), _get(m, "mlserver", "16")
        ips = [_get(x, "inferences_per_s") for x in (ours, peer)]
        p99 = [_get(x, "latency_ms", "p99") for x in (ours, peer)]
        found.append(
            _target(
                f"{name} at concurrency 16: throughput against MLServer",
                ">= 2.0",
                lambda v: v >= 2.0,
                _ratio(*ips),
                f"{ips[0]} / {ips[1]} inferences/s",
                ours,
                peer,
            )
        )
        found.append(
            _target(
                f"{name} at concurrency 16: p99 against MLServer",
                "<= 0.5",
                lambda v: v <= 0.5,
                _ratio(*p99),
                f"{p99[0]} / {p99[1]} ms",
                ours,
                peer,
            )
        )
    return found


GPU_MODELS = (("resnet50", "fp32"), ("resnet50_fp16", "fp16"))
GPU_SHARE = 0.85  # issue 8, item 5: served on a GPU, against raw onnxruntime CUDA


def gpu_targets(gpu: Figures | None) -> list[dict[str, Any]]:
    """Issue 8, item 5: resnet50 fp32 and fp16 served on the GPU (the best of the served
    levels) against raw onnxruntime CUDA at its best batch; "not measured" without a GPU."""
    gpu = gpu or {}
    found = []
    for name, precision in GPU_MODELS:
        m = _get(gpu, "models", name) or {}
        raw = _get(m, "raw", "best")
        levels = m.get("cnnserve") or {}
        level = max(levels, key=lambda k: levels[k]["inferences_per_s"], default=None)
        served = None if level is None else levels[level]
        ips = [_get(x or {}, "inferences_per_s") for x in (served, raw)]
        if None in ips:
            ran = "models" in gpu  # the section ran, without this model or its figures
            why = f"{name} was not measured" if ran else gpu.get("status", "not run")
            detail = f"not measured: {why}"
        else:
            detail = (
                f"{ips[0]} / {ips[1]} inferences/s; served at {level} (the best served level), "
                f"raw at batch {_get(raw, 'batch')}"
            )
        found.append(
            _target(
                f"resnet50 {precision} served on the GPU against raw onnxruntime CUDA at the "
                "best batch",
                f">= {GPU_SHARE}",
                lambda v: v >= GPU_SHARE,
                _ratio(*ips),
                detail,
                served,
                _get(m, "raw"),
            )
        )
    return found


def all_targets(results: Figures) -> list[dict[str, Any]]:
    return targets(results["models"]) + gpu_targets(results.get("gpu"))


# -- BENCHMARKS.md ------------------------------------------------------------------------

SERVERS = (
    ("echo", "(d) echo floor: bare grpc.aio"),
    ("cnnserve", "(b) cnnserve, dynamic batching"),
    ("unbatched", "(c) cnnserve, batching off"),
    ("mlserver", "(e) MLServer, adaptive batching"),
)


def _n(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _met(met: bool | None) -> str:
    return {True: "**met**", False: "**not met**", None: "not measured"}[met]


def _split(level: Figures) -> str:
    s = level.get("server_us")
    if not s:
        return "-"
    return (
        f"{s['queue']:,.0f} / {s['compute_input']:,.0f} / {s['compute_infer']:,.0f} / "
        f"{s['compute_output']:,.0f} (batch {s['batch']:.1f})"
    )


def model_table(name: str, m: Figures) -> list[str]:
    raw = m.get("raw", {})
    best, one = raw.get("best", {}), raw.get("batch1", {})
    lines = [
        f"### {name}",
        "",
        f"(a) raw onnxruntime ({raw.get('provider', '?')}, intra-op threads "
        f"{raw.get('intra_op_threads', '?')}, 0 = onnxruntime's default"
        f"{'; batches run inline, as the server runs them' if raw.get('inline') else ''}): batch 1 "
        f"{_n(one.get('inferences_per_s'))} inferences/s (p50 {_n(one.get('p50_ms'), 3)} ms); "
        f"best batch {best.get('batch', '-')}: {_n(best.get('inferences_per_s'))} inferences/s "
        f"(other load {_n(raw.get('other_processes_cores'), 2)} cores).",
        "",
        "| server | concurrency | inferences/s | x raw best | requests/s | x echo | p50 ms | "
        "p99 ms | server queue / input / infer / output us | client us/req | errors | stable | "
        "other load |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | --- | --- | ---: |",
    ]
    echo = m.get("echo", {})
    for key, label in SERVERS:
        for level, f in (m.get(key) or {}).items():
            floor = _get(echo, level, "requests_per_s")
            errors = ", ".join(f"{c} {n}" for c, n in f["errors"].items()) or "0"
            # The echo server runs no model: against raw onnxruntime it means nothing.
            vs_raw = (
                None
                if key == "echo"
                else _ratio(f["inferences_per_s"], best.get("inferences_per_s"))
            )
            lines.append(
                f"| {label} | {level} | {_n(f['inferences_per_s'])} | {_x(vs_raw)} | "
                f"{_n(f['requests_per_s'])} | {_x(_ratio(f['requests_per_s'], floor))} | "
                f"{_n(f['latency_ms']['p50'], 2)} | {_n(f['latency_ms']['p99'], 2)} | "
                f"{_split(f)} | {_n(f['client']['cpu_us_per_request'], 0)} | {errors} | "
                f"{'yes' if f['stable'] else 'no'} | {_n(f.get('other_processes_cores'), 2)} |"
            )
    return [*lines, ""]


def raw_table(models: Figures) -> list[str]:
    sizes = sorted({b["batch"] for m in models.values() for b in _get(m, "raw", "batches") or []})
    lines = [
        "| model | " + " | ".join(f"batch {b}" for b in sizes) + " |",
        "| --- |" + " ---: |" * len(sizes),
    ]
    for name, m in models.items():
        by = {b["batch"]: b["inferences_per_s"] for b in _get(m, "raw", "batches") or []}
        lines.append(f"| {name} | " + " | ".join(_n(by.get(b)) for b in sizes) + " |")
    return [*lines, ""]


def _machine(results: Figures) -> list[str]:
    m = results["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    busy = results.get("background", {})
    return [
        "| | |",
        "| --- | --- |",
        f"| CPU | {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB |",
        f"| software | {m['os']}, Python {m['python']}, {versions} |",
        f"| cnnserve | git {m['git']} |",
        f"| other processes | {busy.get('other_processes_cores', '?')} cores busy on average "
        "besides the bench's own processes (per level in the tables: `other load`); a figure "
        "measured while other processes took cores understates the server; the run waited "
        f"{busy.get('waited_for_quiet_s', 0)} s in all for quieter moments |",
        *_rounds(results.get("plan", {})),
        "",
    ]


def _rounds(plan: Figures) -> list[str]:
    repeated = {m: levels for m, levels in plan.get("repeated", {}).items() if levels}
    if plan.get("rounds", 1) < 2 or not repeated:
        return []
    which = ", ".join(f"{m} c{'/c'.join(str(n) for n in levels)}" for m, levels in repeated.items())
    return [
        f"| rounds | (b), (d) and (c) were up together and measured in turn at each level. "
        f"The levels the targets read ({which}) and (a) at the best batch were measured in "
        f"{plan['rounds']} such rounds; the tables show each server's median round, and a "
        "target is the median of the rounds' ratios (`rounds` in bench/results.json lists "
        "every round's rate) |"
    ]


def _targets(found: list[Figures]) -> list[str]:
    lines = ["| target | measured | needed | result |", "| --- | --- | --- | --- |"]
    for t in found:
        value = "-" if t["value"] is None else f"{t['value']:.3f}"
        detail = t["detail"]
        if t.get("other_load_cores", 0.0) > NOISY_CORES:
            detail += f"; measured while other processes used {t['other_load_cores']} cores"
        lines.append(f"| {t['target']} | {value} ({detail}) | {t['need']} | {_met(t['met'])} |")
    return [*lines, ""]


def _sections(results: Figures) -> list[str]:
    status, _, detail = results.get("mlserver", {}).get("status", "not run").partition("\n")
    lines = ["## (e) MLServer", "", status, ""]
    if detail:
        lines += ["```", detail, "```", ""]
    settings = results.get("mlserver", {}).get("settings")
    if settings:
        lines += [f"Settings: `{json.dumps(settings)}`", ""]
    lines += ["## (f) int8 variants", ""]
    models = results["models"]
    for name, where in results.get("int8", {}).items():
        lines.append(f"- `{name}`: {where}")
        fp32 = models.get(name.removesuffix("_int8"), {})
        int8 = models.get(name, {})
        for what, path in (
            ("raw, best batch", ("raw", "best")),
            ("served, c16", ("cnnserve", "16")),
        ):
            a, b = _get(int8, *path, "inferences_per_s"), _get(fp32, *path, "inferences_per_s")
            if a is not None:
                lines.append(f"  - {what}: {_n(a)} inferences/s, {_x(_ratio(a, b))} fp32's")
    gpu = results.get("gpu", {})
    lines += ["", "## GPU", "", gpu.get("status", "not run"), ""]
    if gpu.get("fp16"):
        lines += [f"`resnet50_fp16`: {gpu['fp16']}", ""]
    lines += [
        f"Target: served, at least {GPU_SHARE} of raw onnxruntime CUDA at its best batch, for "
        "resnet50 in fp32 and fp16 (in the targets above). Outside reference: Triton's "
        "published ResNet-50 figures, for example about 2,858 images/s on an A100 at batch 32 "
        "with TensorRT in fp16; another GPU and another runtime, so context, not a target.",
        "",
    ]
    for name, m in (results.get("gpu", {}).get("models") or {}).items():
        lines += model_table(f"{name} on the GPU", m)
    return lines


METHOD = """## How it was measured

- One process per server, on 127.0.0.1; the load generator (`cnnserve loadtest`'s engine:
  asyncio, pre-serialized requests sent as bytes, one channel per 16 workers, answers not
  parsed) runs in the bench process on the same cores. Its CPU per request is in the tables.
- Closed loop: at concurrency N, N requests are always outstanding. Each level is warmed up,
  then measured in windows until three agree within the stability threshold on throughput
  and p50, or the window budget runs out ("unstable"); the last three windows count.
- The same request bytes (seeded random FP32 tensors of the model's input shape, batch 1) go
  to every server. The echo server answers with the bytes cnnserve answered.
- Server split: ModelStatistics differences over the counted windows, in microseconds per
  request (queue / compute input / compute infer / compute output) and the mean batch size.
- Raw onnxruntime runs through the server's own `Runner`, with the options the server derives
  from each model's config, just before that model's served levels; the servers sit idle
  meanwhile.
- cnnserve batched (b), the echo floor (d) and cnnserve unbatched (c) are up at once and
  measured in turn at each level, so that the machine's speed drifting moves them alike.
- Models have random weights (speed does not depend on them). Absolute numbers depend on the
  machine; the ratios are what the targets are about.
"""


def markdown(results: Figures) -> str:
    minutes, seconds = divmod(int(results["duration_s"]), 60)
    lines = [
        "# Benchmarks",
        "",
        f"Written by `make bench` (`python -m bench`) on {results['generated']}, in "
        f"{minutes} min {seconds} s. Every figure below comes from that one run on one machine; "
        "reproduce with `make bench` (the raw figures are in `bench/results.json`).",
        "",
        *_machine(results),
        "## Targets (issue 8)",
        "",
        *_targets(results["targets"]),
        "## Throughput and latency",
        "",
        "x raw best: inferences/s against (a) at its best batch; x echo: requests/s against (d) "
        "at the same concurrency.",
        "",
    ]
    for name, m in results["models"].items():
        lines += model_table(name, m)
    lines += [
        "### (a) raw onnxruntime, inferences/s by batch size",
        "",
        *raw_table(results["models"]),
    ]
    lines += _sections(results)
    lines.append(METHOD)
    return "\n".join(lines)
