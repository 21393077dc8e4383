"""`python -m bench`: run every step in order, then write bench/results.json and BENCHMARKS.md.

    python -m bench             # the full run (`make bench`), about 10 minutes on 2 cores
    python -m bench --quick     # short windows: checks that every step works, figures rough

Steps: export the models (first run only); per model, (a) raw onnxruntime, then
(b) cnnserve batched, (d) the echo floor and (c) cnnserve unbatched; (f) int8,
(e) MLServer, the GPU section. (b), (d) and (c) are up together and measured in
turn at each level, so that the machine's speed drifting during the run moves
all three alike (an idle server takes no cores). The levels a target reads, and
raw's best batch, are measured in `Plan.rounds` rounds; each keeps its median
round. A peer that cannot be installed or started is recorded, not fatal.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import drive, gpu, machine, raw, report, servers
from bench import mlserver as peer
from bench.repository import export_missing, find_int8, present, variant
from cnnserve.client.loadtest_engine import Policy

ROOT = machine.ROOT
BENCH = ROOT / ".bench"
MODELS = ("lenet5", "resnet18", "resnet50")


@dataclass(frozen=True)
class Plan:
    """Window lengths per model (bigger models answer slower), and the levels."""

    window_secs: dict[str, float] = field(
        default_factory=lambda: {"lenet5": 1.5, "resnet18": 2.5, "resnet50": 3.0}
    )
    warmup_secs: dict[str, float] = field(
        default_factory=lambda: {"lenet5": 1.0, "resnet18": 2.0, "resnet50": 2.5}
    )
    raw_secs: dict[str, float] = field(
        default_factory=lambda: {"lenet5": 0.5, "resnet18": 1.0, "resnet50": 1.5}
    )
    max_trials: int = 5
    stability_pct: float = 10.0
    concurrency: tuple[int, ...] = (1, 16, 64)
    unbatched: dict[str, tuple[int, ...]] = field(
        default_factory=lambda: {"lenet5": (16, 64), "resnet18": (16,), "resnet50": (16,)}
    )
    mlserver: tuple[int, ...] = (1, 16)
    int8: tuple[int, ...] = (1, 16)
    # The levels a target reads, measured again in later rounds (with raw's best batch);
    # each figure there is the median round.
    rounds: int = 3
    repeated: dict[str, tuple[int, ...]] = field(
        default_factory=lambda: {"lenet5": (1, 64), "resnet18": (16,), "resnet50": ()}
    )

    def policy(self, model: str) -> Policy:
        base = model.split("_")[0]
        return Policy(
            self.window_secs[base], self.stability_pct, self.max_trials, self.warmup_secs[base]
        )

    def quick(self) -> Plan:
        short = dict.fromkeys(MODELS, 0.5), dict.fromkeys(MODELS, 0.3), dict.fromkeys(MODELS, 0.1)
        return Plan(*short, max_trials=3, rounds=1)


class Run:
    """One bench run: its plan, its figures so far, and a log line per step."""

    def __init__(self, plan: Plan, models: tuple[str, ...], quiet_budget_s: float) -> None:
        self.plan = plan
        self.models = models
        self.started = time.monotonic()
        self.background = machine.Background().start()
        self.gate = machine.QuietGate(quiet_budget_s)
        self.results: dict[str, Any] = {
            "generated": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "machine": machine.describe(),
            "plan": asdict(plan),
            "models": {m: {} for m in models},
        }

    def say(self, text: str) -> None:
        minutes, seconds = divmod(int(time.monotonic() - self.started), 60)
        print(f"[{minutes:2d}:{seconds:02d}] {text}", flush=True)

    def record(self, key: str, model: str, figures: dict[str, Any]) -> None:
        """Keep a model's figures by level under `key` ("cnnserve", "echo", ...)."""
        self.results["models"].setdefault(model, {}).setdefault(key, {}).update(figures)

    def measure(
        self,
        key: str,
        url: str,
        model: str,
        load: Any,
        levels: tuple[int, ...],
        statistics: bool = True,
    ) -> dict[str, Any]:
        """Figures by level (a string key) of one server; each level is logged."""
        figures = drive.levels(
            url,
            model,
            load,
            levels,
            self.plan.policy(model),
            statistics=statistics,
            gate=self.gate,
        )
        for level, f in figures.items():
            errors = f", errors {f['errors']}" if f["error_count"] else ""
            self.say(
                f"  {key} {model} c{level}: {f['inferences_per_s']:,.1f} inferences/s, "
                f"p50 {f['latency_ms']['p50']} ms, p99 {f['latency_ms']['p99']} ms{errors}"
            )
        return figures


def median_round(rounds: list[dict[str, Any]], rate: str) -> dict[str, Any]:
    """The round with the median `rate` (of an even count, the lower middle one), with
    every round's rate beside it."""
    ordered = sorted(rounds, key=lambda r: r[rate])
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    if len(rounds) > 1:
        chosen["rounds"] = [r[rate] for r in rounds]
    return chosen


def step_raw(run: Run, repo: Path, name: str) -> dict[str, Any]:
    base = name.split("_")[0]
    run.gate.wait()
    background = machine.Background().start()
    figures = raw.measure(repo / name, run.plan.raw_secs[base])
    figures["other_processes_cores"] = background.cores()
    run.results["models"].setdefault(name, {})["raw"] = figures
    one, best = figures["batch1"], figures["best"]
    run.say(
        f"  raw {name}: batch 1 {one['inferences_per_s']:,.1f}/s, "
        f"best batch {best['batch']} {best['inferences_per_s']:,.1f}/s"
    )
    return figures


def step_served(run: Run, batched: Path, unbatched: Path) -> dict[str, Any]:
    """Per model, (a) and then (b), (d) and (c) in turn at each level; the levels a target
    reads again in later rounds. Returns each model's workload, for the peers."""
    loads = {}
    logs = BENCH / "logs"
    with (
        servers.cnnserve(batched, run.models, logs / "batched.log") as b,
        servers.cnnserve(unbatched, run.models, logs / "unbatched.log") as c,
    ):
        for name in run.models:
            loads[name] = drive.workload(b.url, name)
            answer = BENCH / "echo" / f"{name}.response"
            answer.parent.mkdir(parents=True, exist_ok=True)
            answer.write_bytes(drive.response(b.url, loads[name]))
            with servers.echo(answer, logs / "echo.log") as d:
                _rounds(run, name, loads[name], batched, {"cnnserve": b, "echo": d, "unbatched": c})
    return loads


def _rounds(run: Run, name: str, load: Any, batched: Path, up: dict[str, servers.Process]) -> None:
    plan = run.plan
    wanted = {
        "cnnserve": plan.concurrency,
        "echo": plan.concurrency,
        "unbatched": plan.unbatched[name],
    }
    raw_figures = step_raw(run, batched, name)
    best = [raw_figures["best"]]
    measured: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for round_ in range(plan.rounds):
        levels = sorted({*plan.concurrency, *plan.unbatched[name]})
        if round_:
            levels = [n for n in levels if n in plan.repeated.get(name, ())]
            if not levels:
                break
            run.say(f"  round {round_ + 1} of {plan.rounds}: {name} at c{levels}")
            run.gate.wait()
            best.append(raw.again(batched / name, best[0]["batch"], plan.raw_secs[name]))
        for level in levels:
            for key, server in up.items():
                if level in wanted[key]:
                    figures = run.measure(
                        key, server.url, name, load, (level,), statistics=key != "echo"
                    )
                    measured.setdefault((key, level), []).append(figures[str(level)])
    raw_figures["best"] = median_round(best, "inferences_per_s")
    for (key, level), rounds in measured.items():
        section = run.results["models"][name].setdefault(key, {})
        section[str(level)] = median_round(rounds, "requests_per_s")


def step_int8(run: Run, batched: Path, int8: list[str]) -> None:
    """(f) in a server of their own, so that a variant that fails to load stops nothing else."""
    try:
        with servers.cnnserve(batched, int8, BENCH / "logs" / "int8.log") as s:
            for name in int8:
                load = drive.workload(s.url, name)
                figures = run.measure("cnnserve", s.url, name, load, run.plan.int8)
                run.record("cnnserve", name, figures)
    except servers.StartError as exc:
        run.results["int8"] = dict.fromkeys(int8, f"did not load: {exc}")
        run.say(f"int8 variants did not load: {exc}")


def step_mlserver(run: Run, batched: Path, loads: dict[str, Any]) -> None:
    run.say("(e) MLServer: installing into .bench/mlserver-venv if needed")
    executable, note = peer.install(
        BENCH / "mlserver-venv", BENCH / "logs" / "mlserver-install.log"
    )
    section: dict[str, Any] = {"status": note}
    run.results["mlserver"] = section
    if executable is None:
        section["status"] = f"MLServer {peer.VERSION} could not be installed: {note}"
        run.say(section["status"])
        return
    ports = {k: servers.free_port() for k in ("grpc", "http", "metrics")}
    folder = BENCH / "mlserver"
    section["settings"] = peer.write_repository(folder, {m: batched / m for m in run.models}, ports)
    try:
        with servers.mlserver(
            executable, folder, ports["grpc"], run.models, BENCH / "logs" / "mlserver.log"
        ) as s:
            for name in run.models:
                levels, load = run.plan.mlserver, loads[name]
                figures = run.measure("mlserver", s.url, name, load, levels, statistics=False)
                run.record("mlserver", name, figures)
        section["status"] = f"MLServer {peer.VERSION} measured ({note})."
    except servers.StartError as exc:
        section["status"] = f"MLServer {peer.VERSION} did not start: {exc}"
        run.say(section["status"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short windows, rough figures")
    parser.add_argument("--no-mlserver", action="store_true", help="skip the MLServer peer")
    parser.add_argument(
        "--quiet-budget",
        type=float,
        default=120.0,
        metavar="S",
        help="seconds, over the run, to wait for other processes to leave the cores alone "
        "before a measurement (default 120; 0: never wait)",
    )
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results.json")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="measure nothing: write the report again from the JSON file",
    )
    args = parser.parse_args(argv)
    if args.report_only:
        results = json.loads(args.json.read_text())
        results["targets"] = report.all_targets(results)
        args.output.write_text(report.markdown(results))
        return 0
    run = Run(Plan().quick() if args.quick else Plan(), MODELS, args.quiet_budget)
    repo = BENCH / "repository"
    exported = export_missing(repo, MODELS, BENCH / "logs" / "export.log")
    run.say(f"repository {repo}: exported {exported or 'nothing (already there)'}")
    run.results["int8"] = find_int8(
        repo, [ROOT / "model_repository"], BENCH / "logs" / "export.log"
    )
    int8 = [n for n in run.results["int8"] if present(repo, n)]
    run.say(f"int8 variants: {run.results['int8']}")
    batched = variant(repo, BENCH / "batched", [*MODELS, *int8], device="cpu")
    unbatched = variant(repo, BENCH / "unbatched", MODELS, device="cpu", batching=False)
    run.say("(a) raw onnxruntime, (b) cnnserve, (d) echo floor, (c) cnnserve without batching")
    loads = step_served(run, batched, unbatched)
    for name in int8:
        step_raw(run, batched, name)
    if int8:
        run.say("(f) int8 variants")
        step_int8(run, batched, int8)
    if args.no_mlserver:
        run.results["mlserver"] = {"status": "skipped (--no-mlserver)"}
    else:
        step_mlserver(run, batched, loads)
    run.say("GPU section")
    run.results["gpu"] = gpu.run(
        repo, BENCH, run.plan.policy("resnet50"), run.plan.raw_secs["resnet50"]
    )
    run.say(run.results["gpu"]["status"])
    run.results["targets"] = report.all_targets(run.results)
    run.results["background"] = {
        "other_processes_cores": run.background.cores(),
        "waited_for_quiet_s": round(run.gate.waited_s, 1),
    }
    run.results["duration_s"] = round(time.monotonic() - run.started, 1)
    args.json.write_text(json.dumps(run.results, indent=2) + "\n")
    args.output.write_text(report.markdown(run.results))
    for t in run.results["targets"]:
        value = t["detail"] if t["value"] is None else t["value"]
        run.say(f"{report._met(t['met'])}: {t['target']}: {value} ({t['need']})")
    run.say(f"wrote {args.output} and {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
