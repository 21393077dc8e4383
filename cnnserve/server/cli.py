"""`cnnserve serve`: the flags of `config.Settings`, then `app.serve`."""

from __future__ import annotations

import argparse
import asyncio
import sys

from cnnserve.server import config


def configure(parser: argparse.ArgumentParser) -> None:
    config.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    try:
        settings = config.from_args(args)
    except ValueError as exc:
        print(f"cnnserve serve: {exc}", file=sys.stderr)
        return 2
    from cnnserve.server import app, logs

    logs.configure(settings.log_level, settings.log_format)
    return asyncio.run(app.serve(settings))
