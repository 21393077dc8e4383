"""The image's HEALTHCHECK: exit 0 when cnnserve's gRPC health service answers SERVING.

Docker and Compose run it; Kubernetes does not (its native `grpc:` probes ask the
same service). It asks the overall service "", which is SERVING only once every
model is loaded and warmed up. It speaks plaintext on 127.0.0.1 and reads the port
from CNNSERVE_GRPC_PORT as the server does; with TLS on, override the HEALTHCHECK.
"""

from __future__ import annotations

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

TIMEOUT_SECS = 4.0  # under the HEALTHCHECK --timeout, so an answer always arrives


def main() -> int:
    port = os.environ.get("CNNSERVE_GRPC_PORT", "8001")
    service = os.environ.get("CNNSERVE_HEALTHCHECK_SERVICE", "")
    request = health_pb2.HealthCheckRequest(service=service)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(request, timeout=TIMEOUT_SECS)
        except grpc.RpcError as exc:
            print(f"health check failed: {exc.code().name}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"health of {service or 'the server'}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
