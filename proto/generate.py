"""Generate cnnserve/v1 from proto/cnnserve/v1/*.proto with grpcio-tools (`make proto`).

Messages get `_pb2.py` and `.pyi` stubs; the two services get `_pb2_grpc.py`.
`inference.GRPCInferenceService` gets no `_pb2.py`: its stubs need only the
messages, and the server describes it to reflection from `descriptors.binpb`
in a private descriptor pool, so the process never registers `inference.*`
symbols and can share protobuf's default pool with tritonclient.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent
REPO_ROOT = PROTO_ROOT.parent
PACKAGE = Path("cnnserve/v1")
MESSAGES = ["model_config.proto", "inference.proto", "classification.proto"]
SERVICES = ["grpc_service.proto", "classification.proto"]
DESCRIPTOR_SET = "descriptors.binpb"


def _protoc(*args: str) -> None:
    if protoc.main(["protoc", f"-I{PROTO_ROOT}", *args]) != 0:
        raise SystemExit(f"protoc failed: {' '.join(args)}")


def generate(out: Path) -> None:
    """Write the generated files for every proto under `out`/cnnserve/v1."""
    (out / PACKAGE).mkdir(parents=True, exist_ok=True)
    files = lambda names: [str(PACKAGE / n) for n in names]  # noqa: E731
    _protoc(f"--python_out={out}", f"--pyi_out={out}", *files(MESSAGES))
    _protoc(f"--grpc_python_out={out}", *files(SERVICES))
    _protoc(
        "--include_imports",
        f"--descriptor_set_out={out / PACKAGE / DESCRIPTOR_SET}",
        *files(sorted(set(MESSAGES + SERVICES))),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT, help="folder that holds cnnserve/v1")
    generate(parser.parse_args(argv).out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
