"""What `cnnserve classify` and `cnnserve models` share: connection flags, errors, tables.

Failures print one line on stderr, `cnnserve COMMAND: error: ...`, never a
traceback: a user who mistyped the URL needs the URL, not the stack.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from cnnserve.client.connection import DEFAULT_URL
from cnnserve.client.errors import CnnserveClientError, Unavailable
from cnnserve.client.sync import Client

DEFAULT_TIMEOUT = 60.0


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("connection")
    group.add_argument(
        "--url",
        default=os.environ.get("CNNSERVE_URL", DEFAULT_URL),
        help=f"the server's gRPC host:port [CNNSERVE_URL, else {DEFAULT_URL}]",
    )
    group.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help=f"seconds each call may take, retries included (default {DEFAULT_TIMEOUT:g})",
    )
    group.add_argument("--tls", action="store_true", help="connect with TLS")
    group.add_argument("--ca", type=Path, help="CA certificate (PEM) to trust; implies --tls")
    group.add_argument("--cert", type=Path, help="client certificate (PEM) for mutual TLS")
    group.add_argument("--key", type=Path, help="client private key (PEM) for mutual TLS")
    group.add_argument("--token-file", type=Path, help="file holding the bearer token to send")


def connect(args: argparse.Namespace) -> Client:
    """A client from the connection flags; OSError or ValueError say what is wrong."""
    token = None
    if args.token_file is not None:
        lines = args.token_file.read_text().split()
        if not lines:
            raise ValueError(f"--token-file {args.token_file} is empty")
        if len(lines) > 1:
            raise ValueError(f"--token-file {args.token_file} holds {len(lines)} tokens; give one")
        token = lines[0]
    if (args.cert is None) != (args.key is None):
        raise ValueError("--cert and --key go together")
    return Client(
        args.url,
        tls=args.tls,
        root_certificates=args.ca.read_bytes() if args.ca else None,
        certificate_chain=args.cert.read_bytes() if args.cert else None,
        private_key=args.key.read_bytes() if args.key else None,
        token=token,
        timeout=args.timeout,
    )


def fail(command: str, message: str) -> int:
    print(f"cnnserve {command}: error: {message}", file=sys.stderr)
    return 1


def describe(error: Exception, url: str) -> str:
    """One line for an error the user can act on."""
    if isinstance(error, Unavailable):
        return f"{url} is unavailable: {error.details}"
    if isinstance(error, CnnserveClientError):
        return str(error)
    if isinstance(error, OSError):
        return f"{error.filename}: {error.strerror}" if error.filename else str(error)
    return str(error)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], right: set[int]) -> str:
    """Plain columns; the columns numbered in `right` are right-aligned (numbers)."""
    cells = [[str(c) for c in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        parts = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)
