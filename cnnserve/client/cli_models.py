"""`cnnserve models`: the models a running server knows, with versions, states and providers."""

from __future__ import annotations

import argparse
import dataclasses
import json

from cnnserve.client import cli_common
from cnnserve.client.errors import CnnserveClientError


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    cli_common.add_connection_arguments(parser)


def run(args: argparse.Namespace) -> int:
    try:
        with cli_common.connect(args) as client:
            models = client.models()
    except (CnnserveClientError, OSError, ValueError) as exc:
        return cli_common.fail("models", cli_common.describe(exc, args.url))
    if args.json:
        print(json.dumps([dataclasses.asdict(m) for m in models], indent=2))
        return 0
    rows = [
        # A load failure's reason may span lines; the table keeps one line per version.
        (m.name, m.version or "-", m.state, m.provider or "-", " ".join(m.reason.split()))
        for m in models
    ]
    print(cli_common.table(("MODEL", "VERSION", "STATE", "PROVIDER", "REASON"), rows, set()))
    return 0
