# `helm test`: grpc.health.v1 Check of every adaccel pod; exit 1 unless each answers SERVING.
# Run as `python -c` in the chart's image (grpcio and grpcio-health-checking, nothing else needed).
# HEALTH_TARGETS: JSON list of {"component", "address", "service", "tls"}; HEALTH_TIMEOUT_S: the
# deadline of each call, which waits for the connection (DNS of a pod that just started).
# TLS targets: HEALTH_TLS_CA_FILE verifies the server (empty: system roots);
# HEALTH_TLS_CLIENT_CERT_FILE + _KEY_FILE answer ports with mutual TLS; HEALTH_TLS_SERVER_NAME is
# the name the certificates carry when not the dialled host.
import json
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def read(name):
    path = os.environ.get(name, "")
    if not path:
        return None
    with open(path, "rb") as f:
        return f.read()


def open_channel(target):
    if not target["tls"]:
        return grpc.insecure_channel(target["address"])
    credentials = grpc.ssl_channel_credentials(
        root_certificates=read("HEALTH_TLS_CA_FILE"),
        private_key=read("HEALTH_TLS_CLIENT_KEY_FILE"),
        certificate_chain=read("HEALTH_TLS_CLIENT_CERT_FILE"))
    server_name = os.environ.get("HEALTH_TLS_SERVER_NAME", "")
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    return grpc.secure_channel(target["address"], credentials, options=options)


def check(target, timeout_s):
    with open_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=target["service"]), timeout=timeout_s, wait_for_ready=True)
        except grpc.RpcError as exc:
            return f"{exc.code().name}: {exc.details()}"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def main():
    targets = json.loads(os.environ["HEALTH_TARGETS"])
    timeout_s = float(os.environ.get("HEALTH_TIMEOUT_S", "10"))
    failed = 0
    for target in targets:
        status = check(target, timeout_s)
        failed += status != "SERVING"
        transport = "tls" if target["tls"] else "plaintext"
        print(f"{target['component']:8} {target['address']} {target['service']} ({transport}): {status}", flush=True)
    print(f"{len(targets) - failed}/{len(targets)} SERVING")
    return 1 if failed or not targets else 0


sys.exit(main())
