"""adaccel-client: the typed Python client of the adaccel Router, and its generated gRPC stubs.

    from adaccel_client import AdaccelClient, Block

    with AdaccelClient("router:50051", ca_file="ca.pem", token_file="token") as client:
        generation = client.generate([Block("item", "item-42", "Aurora headphones, wireless.")],
                                     pool_key="electronics/audio", max_new_tokens=48)
        for delta in generation:
            print(delta.text, end="", flush=True)
        print(generation.summary.stats.new_tokens)

The raw messages and service stub are in adaccel_client.v1 (common_pb2, router_pb2, router_pb2_grpc).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("adaccel-client")
except PackageNotFoundError:  # imported from a source checkout
    __version__ = "0+source"

from adaccel_client.client import DEFAULT_TIMEOUT_S, AdaccelClient, Generation  # noqa: E402
from adaccel_client.errors import AdaccelError, FieldViolation  # noqa: E402
from adaccel_client.retry import NO_RETRIES, RetryPolicy  # noqa: E402
from adaccel_client.types import (  # noqa: E402
    Advanced,
    Block,
    BlockKind,
    Delta,
    Relaxed,
    Replica,
    Result,
    RouterInfo,
    Sampling,
    Stats,
    Summary,
    build_request,
)

__all__ = [
    "DEFAULT_TIMEOUT_S", "NO_RETRIES", "AdaccelClient", "AdaccelError", "Advanced", "Block", "BlockKind",
    "Delta", "FieldViolation", "Generation", "Relaxed", "Replica", "Result", "RetryPolicy", "RouterInfo",
    "Sampling", "Stats", "Summary", "__version__", "build_request",
]
