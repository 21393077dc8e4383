"""`cnnserve loadtest`: throughput, latency and where the time goes, level by level.

    cnnserve loadtest --model resnet18 --concurrency 1,8,32 --plot out.png

It speaks the Open Inference Protocol (`inference.GRPCInferenceService`), so
it measures any server that does: cnnserve, Triton, MLServer. The input
tensors' names, datatypes and shapes come from ModelMetadata; `--mode
classify` sends generated JPEGs of the model's input size to cnnserve's
ImageClassifier instead (`cnnserve.client.loadtest_setup`). At each level,
windows of `--window-secs` repeat until the last three agree within
`--stability-pct` (throughput and p50), or `--max-trials` windows have run;
`--duration S` measures one window of S seconds instead. The figures, and the
JSON and CSV fields, are described in `cnnserve.client.loadtest_report`; the
load itself in `cnnserve.client.loadtest_engine`.

The exit status is 0 when every request succeeded, 1 when some failed or an
output could not be written (the figures are still printed, and the other
outputs written), 2 when nothing could be measured, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from cnnserve.client.cli_common import add_connection_arguments, fail
from cnnserve.client.connection import Connection, connect
from cnnserve.client.loadtest_engine import Level, Policy, Progress, run_levels
from cnnserve.client.loadtest_report import (
    LevelResult,
    plot,
    plot_refusal,
    table,
    write_csv,
    write_json,
)
from cnnserve.client.loadtest_setup import SetupError, channel_factory, prepare


async def loadtest(
    connection: Connection,
    args: argparse.Namespace,
    levels: Sequence[Level],
    policy: Policy,
    progress: Progress | None,
) -> tuple[dict[str, Any], list[LevelResult]]:
    control = channel_factory(connection)(-1)
    try:
        target = await prepare(
            connection, args.model, args.model_version, args.mode, args.batch_size, control
        )
        results = await run_levels(
            target.make_channel,
            target.workload,
            levels,
            policy,
            metadata=connection.metadata,
            timeout=connection.timeout,
            workers_per_channel=args.workers_per_channel,
            stats=target.stats,
            progress=progress,
        )
    finally:
        await control.close()
    return target.header | {"policy": asdict(policy)}, results


# -- the command ---------------------------------------------------------------------------


def _numbers(kind: type[int] | type[float]) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        try:
            values = [kind(v) for v in text.split(",")]
        except ValueError:
            values = []
        if not values or any(not (0 < v < math.inf) for v in values):
            noun = "whole numbers" if kind is int else "numbers"
            raise argparse.ArgumentTypeError(f"give positive {noun}, comma-separated: {text!r}")
        return values

    return parse


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="the model to load")
    parser.add_argument("--model-version", default="", metavar="V", help="default: the server's")
    load = parser.add_argument_group("load (closed loop by default: 1,4,16,64 in flight)")
    levels = load.add_mutually_exclusive_group()
    levels.add_argument(
        "--concurrency",
        type=_numbers(int),
        metavar="N,N,...",
        help="requests in flight, one level each",
    )
    levels.add_argument(
        "--request-rate",
        type=_numbers(float),
        metavar="R,R,...",
        help="open loop instead: requests per second, one level each",
    )
    load.add_argument("--poisson", action="store_true", help="Poisson arrivals at each rate")
    load.add_argument("--batch-size", type=int, default=1, metavar="B", help="images per request")
    load.add_argument(
        "--mode",
        choices=("infer", "classify"),
        default="infer",
        help="ModelInfer with tensors, or Classify with JPEGs (default infer)",
    )
    load.add_argument(
        "--workers-per-channel",
        type=int,
        default=16,
        metavar="N",
        help="workers sharing one connection (default 16)",
    )
    windows = parser.add_argument_group("measurement windows")
    windows.add_argument(
        "--duration",
        type=float,
        metavar="S",
        help="one window of S seconds per level, no stability check",
    )
    windows.add_argument("--window-secs", type=float, default=2.0, metavar="S", help="default 2")
    windows.add_argument(
        "--stability-pct",
        type=float,
        default=10.0,
        metavar="P",
        help="the last 3 windows agree within P%% (default 10)",
    )
    windows.add_argument(
        "--max-trials",
        type=int,
        default=10,
        metavar="K",
        help="windows per level at most (default 10, at least 3)",
    )
    windows.add_argument(
        "--warmup-secs",
        type=float,
        default=1.0,
        metavar="S",
        help="unmeasured, before each level (default 1)",
    )
    output = parser.add_argument_group("output (the table always prints)")
    output.add_argument("--csv", type=Path, metavar="FILE", help="one row per level")
    output.add_argument("--json", type=Path, metavar="FILE", help="settings and every figure")
    output.add_argument("--plot", type=Path, metavar="FILE.png", help="latency against throughput")
    add_connection_arguments(parser)


def _connection(args: argparse.Namespace) -> Connection:
    token = args.token_file.read_text().strip() if args.token_file else None
    return connect(
        args.url,
        tls=args.tls,
        root_certificates=args.ca,
        certificate_chain=args.cert,
        private_key=args.key,
        token=token,
        timeout=args.timeout,
        retries=0,
        backoff=0.1,
        max_message_bytes=256 * 1024 * 1024,
        keepalive=None,
    )


def _progress() -> Progress | None:
    if not sys.stderr.isatty():
        return None

    def show(line: str) -> None:
        print(f"\r\033[K{line}", end="", file=sys.stderr, flush=True)

    return show


def _refusal(args: argparse.Namespace) -> str | None:
    """Why these settings cannot run, before anything is measured; None when they can."""
    positive = {
        "--batch-size": args.batch_size,
        "--window-secs": args.window_secs,
        "--max-trials": args.max_trials,
        "--workers-per-channel": args.workers_per_channel,
        "--duration": 1 if args.duration is None else args.duration,
    }
    if args.timeout is not None:
        positive["--timeout"] = args.timeout
    for flag, value in positive.items():
        if not 0 < value < math.inf:
            return f"{flag} must be a positive number, not {value}"
    for flag, value in (
        ("--warmup-secs", args.warmup_secs),
        ("--stability-pct", args.stability_pct),
    ):
        if not 0 <= value < math.inf:
            return f"{flag} must be a number >= 0, not {value}"
    if args.poisson and not args.request_rate:
        return "--poisson needs --request-rate"
    return _output_refusal(args)


def _outputs(args: argparse.Namespace) -> list[tuple[str, Path]]:
    named = (("--csv", args.csv), ("--json", args.json), ("--plot", args.plot))
    return [(flag, path) for flag, path in named if path is not None]


def _output_refusal(args: argparse.Namespace) -> str | None:
    outputs = _outputs(args)
    for i, (flag, path) in enumerate(outputs):
        for other, same in outputs[:i]:
            if same.resolve() == path.resolve():
                return f"{other} and {flag} name the same file, {path}"
        folder = path.parent
        if path.is_dir() or not folder.is_dir() or not os.access(folder, os.W_OK):
            return f"{flag} {path}: cannot write there"
    if args.plot is not None:
        return plot_refusal(args.plot)
    return None


def run(args: argparse.Namespace) -> int:
    refusal = _refusal(args)
    if refusal is not None:
        fail("loadtest", refusal)
        return 2
    if args.request_rate:
        levels = [Level(rate=r, poisson=args.poisson) for r in args.request_rate]
    else:
        levels = [Level(concurrency=c) for c in args.concurrency or (1, 4, 16, 64)]
    policy = Policy(
        args.window_secs, args.stability_pct, args.max_trials, args.warmup_secs, args.duration
    )
    progress = _progress()
    try:
        connection = _connection(args)
        header, results = asyncio.run(loadtest(connection, args, levels, policy, progress))
    except (SetupError, ValueError, OSError) as exc:
        _clear(progress)
        fail("loadtest", str(exc))
        return 2
    except KeyboardInterrupt:
        _clear(progress)
        fail("loadtest", "interrupted; nothing written")
        return 130
    _clear(progress)
    try:
        return _report(args, header, results, len(levels))
    except KeyboardInterrupt:
        fail("loadtest", "interrupted while writing the outputs")
        return 130


def _clear(progress: Progress | None) -> None:
    if progress is not None:
        progress("")


def _report(
    args: argparse.Namespace, header: dict[str, Any], results: list[LevelResult], levels: int
) -> int:
    """Print the table and notes, write the outputs; the exit status."""
    print(
        f"{header['model']} on {header['server']} at {header['url']}: {header['mode']}, batch "
        f"{header['batch_size']}, {header['request_bytes']:,}-byte requests"
    )
    print(table(results))
    for line in notes(results, levels):
        print(line)
    written = _write(args, header, results)
    if not any(r.requests or r.error_count for r in results):
        fail("loadtest", "no request was answered in the measured time; measure for longer")
        return 2
    return 1 if any(r.error_count for r in results) or not written else 0


def _write(args: argparse.Namespace, header: dict[str, Any], results: list[LevelResult]) -> bool:
    """Each output asked for; one that cannot be written is said in a line, not the rest."""
    title = f"{header['model']} ({header['mode']}, batch {args.batch_size})"
    writers: dict[str, Callable[[Path], None]] = {
        "--csv": lambda path: write_csv(path, results),
        "--json": lambda path: write_json(path, header, results),
        "--plot": lambda path: plot(path, title, results),
    }
    written = True
    for flag, path in _outputs(args):
        try:
            writers[flag](path)
        except OSError as exc:
            written = not fail("loadtest", f"{flag} {path}: {exc.strerror or exc}")
    return written


def notes(results: Sequence[LevelResult], levels: int) -> list[str]:
    """What the table cannot say: each error code's first message, a rate the server did
    not keep up with, and levels skipped after one where every request failed."""
    lines, seen = [], set()
    for r in results:
        for code, details in r.error_details.items():
            if code not in seen:
                seen.add(code)
                lines.append(f"{code} (first at {r.label}): {details or '(no message)'}")
    for r in results:
        if r.kept_up is False:
            lines.append(
                f"at {r.label} the server answered {r.requests_per_s:,.1f} requests/s with "
                "success, fewer than were sent: requests queued without end (or failed), and "
                "the latency figures, of those answered within the windows, understate it"
            )
    if len(results) < levels:
        lines.append(
            f"every request failed at {results[-1].label}; the {levels - len(results)} "
            "level(s) after it were not measured"
        )
    return lines
