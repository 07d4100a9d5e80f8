"""KvStore gRPC servicer: chunked tensor streams in and out of the block store."""

from __future__ import annotations

import grpc

from adaccel.v1 import kvstore_pb2, kvstore_pb2_grpc
from common.rpc.errors import InvalidArgument, ResourceExhausted
from services.kvstore.block_store import MAX_MODEL_ID_BYTES, BlockStore

MAX_CONTAINS_HASHES = 4096
MAX_HASH_BYTES = 64


def _check_names(model_id: str, block_hashes) -> None:
    if len(model_id.encode()) > MAX_MODEL_ID_BYTES:
        raise InvalidArgument(f"model_id: at most {MAX_MODEL_ID_BYTES} bytes")
    if any(len(h) > MAX_HASH_BYTES for h in block_hashes):
        raise InvalidArgument(f"block_hash: at most {MAX_HASH_BYTES} bytes")


class KvStoreService(kvstore_pb2_grpc.KvStoreServicer):
    def __init__(self, store: BlockStore, *, chunk_bytes: int, shard: int):
        self.store = store
        self.chunk_bytes = chunk_bytes
        self.shard = shard

    def Put(self, request_iterator, context: grpc.ServicerContext):
        header = None
        parts: list[bytes] = []
        received = 0
        for chunk in request_iterator:
            if chunk.HasField("header"):
                if header is not None:
                    raise InvalidArgument("header: sent twice")
                header = chunk.header
                if header.total_bytes > self.store.max_block_bytes:
                    limit = self.store.max_block_bytes
                    raise ResourceExhausted(
                        f"header.total_bytes: {header.total_bytes} bytes, limit is {limit}",
                        field="header.total_bytes", limit=limit)
                # Early, before the data arrives; the store checks the exact stored size
                # (with the key and header).
                if self.store.disk_budget_bytes and header.total_bytes > self.store.disk_budget_bytes:
                    raise ResourceExhausted(f"header.total_bytes: {header.total_bytes} bytes, "
                                            f"limit is disk_budget_bytes={self.store.disk_budget_bytes}",
                                            field="header.total_bytes", limit=self.store.disk_budget_bytes)
            elif chunk.HasField("data"):
                if header is None:
                    raise InvalidArgument("data: sent before the header")
                received += len(chunk.data)
                if received > header.total_bytes:
                    raise InvalidArgument(f"data: more than header.total_bytes={header.total_bytes} bytes")
                parts.append(chunk.data)
        if header is None:
            raise InvalidArgument("header: missing; a Put stream starts with a header")
        return kvstore_pb2.PutReply(stored=self.store.put(header, b"".join(parts)))

    def Get(self, request: kvstore_pb2.GetRequest, context: grpc.ServicerContext):
        if not request.block_hash or not request.model_id:
            raise InvalidArgument("block_hash and model_id: required")
        _check_names(request.model_id, [request.block_hash])
        block = self.store.get(request.model_id, request.block_hash)
        yield kvstore_pb2.KvChunk(header=block.header)
        data = block.data
        for start in range(0, len(data), self.chunk_bytes):
            yield kvstore_pb2.KvChunk(data=data[start:start + self.chunk_bytes])

    def Contains(self, request, context):
        if len(request.block_hashes) > MAX_CONTAINS_HASHES:
            raise ResourceExhausted(
                f"block_hashes: {len(request.block_hashes)} hashes, limit is {MAX_CONTAINS_HASHES}",
                field="block_hashes", limit=MAX_CONTAINS_HASHES)
        _check_names(request.model_id, request.block_hashes)
        return kvstore_pb2.ContainsReply(present=self.store.contains(request.model_id, list(request.block_hashes)))

    def Stats(self, request, context):
        return kvstore_pb2.KvStats(**self.store.stats(), shard=self.shard)
