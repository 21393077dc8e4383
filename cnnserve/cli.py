"""The `cnnserve` command: one sub-command per job.

Each sub-command lives beside the code it drives and exposes
`configure(parser)` and `run(args) -> int`. Modules are imported only for the
command that runs, so `cnnserve serve` never imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Sequence

from cnnserve import __version__

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "export": ("cnnserve.export.cli", "export CNNs to a verified ONNX model repository"),
    "serve": ("cnnserve.server.cli", "serve a model repository over gRPC"),
    "classify": ("cnnserve.client.cli_classify", "classify image files with a running server"),
    "models": ("cnnserve.client.cli_models", "list the models a running server serves"),
    "loadtest": ("cnnserve.client.loadtest", "measure throughput and latency of a server"),
    "soak": ("cnnserve.client.soak", "a bounded run of load, reloads, bad inputs and restarts"),
}


def _available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def build_parser(
    argv: Sequence[str],
) -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and each command's; only the chosen command's module is
    imported."""
    parser = argparse.ArgumentParser(prog="cnnserve", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"cnnserve {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    commands = {}
    for name, (module, help_text) in COMMANDS.items():
        if not _available(module):
            continue
        command = commands[name] = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            importlib.import_module(module).configure(command)
    return parser, commands


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser, commands = build_parser(args_list)
    args, unknown = parser.parse_known_args(args_list)
    if unknown:  # said by the command's parser, with its usage rather than the top level's
        commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    module = importlib.import_module(COMMANDS[args.command][0])
    return int(module.run(args))
