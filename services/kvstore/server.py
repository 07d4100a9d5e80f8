from __future__ import annotations

from adaccel.v1 import kvstore_pb2, kvstore_pb2_grpc
from common.rpc.server import ServerHandle, create_server
from common.telemetry import Telemetry
from services.kvstore.block_store import BlockStore
from services.kvstore.service import KvStoreService
from services.kvstore.settings import KvStoreSettings

SERVICE_NAME = kvstore_pb2.DESCRIPTOR.services_by_name["KvStore"].full_name


def create_kvstore_server(settings: KvStoreSettings, telemetry: Telemetry) -> ServerHandle:
    # Builds the disk index (one scan of the DB) before the server exists, so before any call.
    store = BlockStore(settings.data_dir / "kvstore" / f"shard-{settings.shard}",
                       settings.memory_budget_bytes, settings.max_block_bytes,
                       disk_budget_bytes=settings.disk_budget_bytes,
                       model_idle_eviction_s=settings.model_idle_eviction_s)
    servicer = KvStoreService(store, chunk_bytes=settings.chunk_bytes, shard=settings.shard)
    handle = create_server(settings, telemetry, [(kvstore_pb2_grpc.add_KvStoreServicer_to_server, servicer)],
                           [SERVICE_NAME])
    handle.on_stop.append(store.close)
    handle.set_serving(True)
    return handle
