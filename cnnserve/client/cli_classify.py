"""`cnnserve classify`: the top-k labels of image files, from a running server.

Files go to the server in batches of up to CHUNK_FILES images per Classify
call. A file that cannot be read, or an image the server refuses, is reported
on its own line: the server names the refused image ("image N: reason"), so
that image is set aside and the rest of its batch is sent again. The exit code
is 1 when any image failed, and when the server cannot be reached or refuses
the whole request (an unknown model, a top-k above the class count).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnnserve.client import cli_common
from cnnserve.client.errors import CnnserveClientError, InvalidArgument
from cnnserve.client.results import ClassifiedImage
from cnnserve.client.sync import Client

CHUNK_FILES = 64  # bounds what is sent again when one image of a batch is refused


@dataclass
class Outcome:
    file: str
    result: ClassifiedImage | None = None
    error: str = ""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files")
    parser.add_argument("--model", required=True, help="the model to classify with")
    parser.add_argument(
        "--version",
        dest="model_version",
        default="",
        metavar="VERSION",
        help="the model version (default: the latest ready one)",
    )
    parser.add_argument(
        "--top-k",
        type=int,
        default=0,
        help="classes per image (default 5, or the class count when the model has fewer)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    cli_common.add_connection_arguments(parser)


def _classify_batch(
    client: Client, args: argparse.Namespace, batch: list[tuple[Outcome, bytes]]
) -> None:
    """Fill in each outcome of a batch; a refused image is set aside and the rest sent again."""
    pending = list(batch)
    while pending:
        images = [data for _, data in pending]
        try:
            results = client.classify(
                args.model, images, top_k=args.top_k, version=args.model_version
            )
        except InvalidArgument as exc:
            index = exc.image_index
            if index is None or index >= len(pending):
                raise  # about the whole request (top-k, model), not one image
            outcome, _ = pending.pop(index)
            outcome.error = exc.details.split(": ", 1)[1]
            continue
        for (outcome, _), result in zip(pending, results, strict=True):
            outcome.result = result
        return


def classify_files(client: Client, args: argparse.Namespace) -> list[Outcome]:
    outcomes = [Outcome(str(path)) for path in args.images]
    for start in range(0, len(outcomes), CHUNK_FILES):
        batch = []
        for outcome in outcomes[start : start + CHUNK_FILES]:
            try:
                batch.append((outcome, Path(outcome.file).read_bytes()))
            except OSError as exc:
                outcome.error = f"cannot read it: {exc.strerror or exc}"
        if batch:
            _classify_batch(client, args, batch)
    return outcomes


def _as_json(outcome: Outcome, model: str) -> dict[str, Any]:
    result = outcome.result
    entry: dict[str, Any] = {
        "file": outcome.file,
        "model": result.model if result else model,
        "version": result.version if result else "",
        "classes": [
            {"index": c.index, "label": c.label, "score": c.score}
            for c in (result.classes if result else [])
        ],
    }
    if outcome.error:
        entry["error"] = outcome.error
    return entry


def _table(outcomes: list[Outcome]) -> str:
    """One row per class; the file is named on its first row only, which groups the rows."""
    rows = [
        (o.file if rank == 1 else "", rank, c.label, f"{c.score:.4f}")
        for o in outcomes
        if o.result is not None
        for rank, c in enumerate(o.result.classes, 1)
    ]
    return cli_common.table(("FILE", "RANK", "LABEL", "SCORE"), rows, right={1, 3})


def run(args: argparse.Namespace) -> int:
    if args.top_k < 0:
        return cli_common.fail("classify", "--top-k must not be negative")
    try:
        with cli_common.connect(args) as client:
            outcomes = classify_files(client, args)
    except (CnnserveClientError, OSError, ValueError) as exc:
        return cli_common.fail("classify", cli_common.describe(exc, args.url))
    for outcome in outcomes:
        if outcome.error:
            print(f"cnnserve classify: {outcome.file}: {outcome.error}", file=sys.stderr)
    if args.json:
        print(json.dumps([_as_json(o, args.model) for o in outcomes], indent=2))
    elif any(o.result is not None for o in outcomes):
        print(_table(outcomes))
    return 1 if any(o.error for o in outcomes) else 0
