"""(d) The Python gRPC floor: a bare grpc.aio server that answers ModelInfer with fixed bytes.

    python -m bench.echo --response FILE [--port N]

It takes each request as bytes (no deserializer) and answers with the bytes
in FILE (no serializer): a ModelInferResponse that cnnserve itself gave for
the same request, so the same bytes cross the wire both ways. No protobuf
decoding, no validation, no batching, no onnxruntime: what is left is
grpc.aio's own per-call cost in Python on this machine, with the message
size and channel options cnnserve uses.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from pathlib import Path

import grpc

MAX_MESSAGE = 256 * 1024 * 1024


async def serve(response: bytes, port: int) -> None:
    async def model_infer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return response

    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
            ("grpc.max_concurrent_streams", 1024),
            ("grpc.so_reuseport", 0),
        ]
    )
    handler = grpc.method_handlers_generic_handler(
        "inference.GRPCInferenceService",
        {"ModelInfer": grpc.unary_unary_rpc_method_handler(model_infer)},
    )
    server.add_generic_rpc_handlers((handler,))
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"echo listening on {bound}", flush=True)
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.echo", description=__doc__)
    parser.add_argument("--response", type=Path, required=True, help="the bytes to answer")
    parser.add_argument("--port", type=int, default=0, help="default: any free port")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.response.read_bytes(), args.port))


if __name__ == "__main__":
    main()
