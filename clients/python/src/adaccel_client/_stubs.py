"""The generated messages and service stub this package uses.

An installed package has its own, generated at build time into adaccel_client.v1. A source
checkout that was not built (the repository's tests, `python -m services.router.client`) has
none there and falls back to the repository's `adaccel.v1`, which `make protos` generates from
the same protos.
"""

from __future__ import annotations

from importlib.util import find_spec

if all(find_spec(f"adaccel_client.v1.{name}") for name in ("common_pb2", "router_pb2", "router_pb2_grpc")):
    from adaccel_client.v1 import common_pb2, router_pb2, router_pb2_grpc
else:
    try:
        from adaccel.v1 import common_pb2, router_pb2, router_pb2_grpc  # type: ignore[no-redef]
    except ModuleNotFoundError as missing:
        raise ImportError("adaccel_client: its generated stubs are missing; install the package "
                          "(pip install clients/python)") from missing

__all__ = ["common_pb2", "router_pb2", "router_pb2_grpc"]
