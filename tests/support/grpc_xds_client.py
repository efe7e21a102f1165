"""A proxyless gRPC client for tests/envoy_interop.rs.

Dials `xds:///<host>` (the bootstrap comes from GRPC_XDS_BOOTSTRAP), calls
grpc.health.v1.Health/Check once, waiting for the channel to become ready
within the deadline, and prints the status name (e.g. `SERVING`) on stdout.
Exits non-zero, with the gRPC error on stderr, when the call fails.

Usage: grpc_xds_client.py <host> [deadline-seconds]
"""

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main() -> int:
    host = sys.argv[1]
    deadline = float(sys.argv[2]) if len(sys.argv) > 2 else 20.0
    with grpc.insecure_channel(f"xds:///{host}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(
                health_pb2.HealthCheckRequest(service=""),
                timeout=deadline,
                wait_for_ready=True,
            )
        except grpc.RpcError as error:
            print(f"Health/Check failed: {error.code()}: {error.details()}", file=sys.stderr)
            return 1
    print(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
    return 0


if __name__ == "__main__":
    sys.exit(main())
