from __future__ import annotations

import pytest

from adaccel.v1 import pool_pb2
from common.rpc.channels import open_channel
from common.telemetry import null_telemetry
from services.pool.server import create_pool_server
from services.pool.settings import PoolSettings
from services.stack import Stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_llama_path):
    """All four services and the broker as real processes on loopback."""
    with Stack(data_dir=tmp_path_factory.mktemp("stack"), model_path=tiny_llama_path, decoders=2) as s:
        yield s


@pytest.fixture
def channel_to():
    opened = []

    def open_(address: str):
        channel = open_channel(address)
        opened.append(channel)
        return channel

    yield open_
    for channel in opened:
        channel.close()


@pytest.fixture
def pool(tmp_path):
    """A pool service in this process, with short n-grams (4) so small tries stay readable."""
    handle = create_pool_server(PoolSettings(data_dir=tmp_path, ngram_length=4), null_telemetry())
    yield handle
    handle.stop(0)


def insert(stub, pool_key, tokens) -> int:
    """Inserts one token sequence into a pool; returns the pool's new version."""
    request = pool_pb2.InsertRequest(pool_key=pool_key, sequences=[pool_pb2.TokenSequence(token_ids=tokens)])
    return stub.Insert(request, timeout=5).version
