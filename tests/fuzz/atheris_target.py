"""Coverage-guided fuzzing (atheris / libFuzzer) of the pool and kv-store gRPC boundaries.

    python -m tests.fuzz.atheris_target DATA_DIR -runs=3000 -seed=1

Starts both servers in this process with their modules instrumented, then lets libFuzzer mutate
raw request bytes: the first byte picks the method, the rest is the request as sent on the wire.
A status that means a server bug (INTERNAL, UNKNOWN) or a call past its deadline raises, which
libFuzzer reports as a crash (non-zero exit, the input saved under -artifact_prefix). At the end
every 500 inputs it checks that both services still answer; libFuzzer's last line says how many
inputs ran (`Done N runs`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["services", "common"]):
    from common.rpc.channels import health_status, open_channel
    from common.telemetry import null_telemetry
    from services.kvstore.server import SERVICE_NAME as KV_SERVICE
    from services.kvstore.server import create_kvstore_server
    from services.kvstore.settings import KvStoreSettings
    from services.pool.server import SERVICE_NAME as POOL_SERVICE
    from services.pool.server import create_pool_server
    from services.pool.settings import PoolSettings

from tests.fuzz.wire import raw_method  # noqa: E402 - after the instrumented imports

METHODS = [
    ("pool", "/adaccel.v1.Pool/RetrieveDrafts", "unary"),
    ("pool", "/adaccel.v1.Pool/GetSnapshot", "server_stream"),
    ("pool", "/adaccel.v1.Pool/Insert", "unary"),
    ("pool", "/adaccel.v1.Pool/DeleteItem", "unary"),
    ("pool", "/adaccel.v1.Pool/GetVersions", "unary"),
    ("kv", "/adaccel.v1.KvStore/Get", "server_stream"),
    ("kv", "/adaccel.v1.KvStore/Contains", "unary"),
    ("kv", "/adaccel.v1.KvStore/Put", "client_stream"),
]


def main() -> None:
    data_dir = Path(sys.argv[1])
    pool = create_pool_server(PoolSettings(data_dir=data_dir, vocab_size=300, ngram_length=4, pool_capacity=10**8,
                                           max_pools=10**6, max_tokens_per_insert=2048), null_telemetry())
    kv = create_kvstore_server(KvStoreSettings(data_dir=data_dir, max_block_bytes=1 << 16, memory_budget_bytes=4096),
                               null_telemetry())
    channels = {"pool": open_channel(pool.address), "kv": open_channel(kv.address)}
    calls = [raw_method(channels[svc], method, shape, timeout_s=10) for svc, method, shape in METHODS]
    inputs = 0

    def one_input(data: bytes) -> None:
        nonlocal inputs
        if not data:
            return
        inputs += 1
        call = calls[data[0] % len(calls)]
        body = data[1:]
        # Put takes a stream: split the bytes into chunks at 0xFE bytes, so the fuzzer controls both.
        request = body.split(b"\xfe") if METHODS[data[0] % len(calls)][2] == "client_stream" else body
        outcome = call(request)
        if outcome.crashed or outcome.hung:
            raise RuntimeError(f"{METHODS[data[0] % len(calls)][1]}: {outcome.code.name}: {outcome.details}")
        if inputs % 500 == 0:  # libFuzzer ends the process itself, so liveness is checked on the way
            for name, service in (("pool", POOL_SERVICE), ("kv", KV_SERVICE)):
                status = health_status(channels[name], service)
                if status != "SERVING":
                    raise RuntimeError(f"{name} is {status} after {inputs} inputs")

    atheris.Setup([sys.argv[0], *sys.argv[2:]], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
