from __future__ import annotations

import pytest

from common.rpc.channels import open_channel
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
