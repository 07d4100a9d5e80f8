"""The draft geometry across services: the pool service advertises it (Pool.Info), and the
decoder's snapshot refresher reads it on first contact and warns about what its drafts lose."""

from __future__ import annotations

import logging

import grpc
import pytest

from adaccel.v1 import pool_pb2, pool_pb2_grpc
from common.drafting.geometry import DEFAULT_GEOMETRY, DraftGeometry
from common.telemetry import null_telemetry
from services.decoder.pool_snapshots import PoolSnapshots
from services.pool.server import create_pool_server
from services.pool.settings import PoolSettings
from tests.integration.conftest import insert


def test_the_pool_advertises_its_draft_geometry(pool, channel_to):
    stub = pool_pb2_grpc.PoolStub(channel_to(pool.address))
    geometry = stub.Info(pool_pb2.PoolServiceInfoRequest(), timeout=5).geometry
    # The n-gram length it was started with; key and tree size are RetrieveDrafts' defaults.
    assert (geometry.key_length, geometry.ngram_length) == (DEFAULT_GEOMETRY.key_length, 4)
    assert (geometry.decoding_length, geometry.branch_length) == (
        DEFAULT_GEOMETRY.decoding_length, DEFAULT_GEOMETRY.branch_length)


def test_a_default_pool_advertises_the_default_geometry(tmp_path, channel_to):
    handle = create_pool_server(PoolSettings(data_dir=tmp_path), null_telemetry())
    try:
        stub = pool_pb2_grpc.PoolStub(channel_to(handle.address))
        snapshots = PoolSnapshots(stub)
        snapshots.refresh()
        assert snapshots.pool_geometry == DEFAULT_GEOMETRY and snapshots.geometry_problems == []
    finally:
        handle.stop(0)


@pytest.mark.parametrize(("decoder", "problems"), [
    (DraftGeometry(branch_length=2), []),  # the pool's 4-token n-grams reach depth 2 after a 2-token key
    (DraftGeometry(branch_length=8), ["branch_length 8 is deeper"]),
    (DraftGeometry(key_length=3, branch_length=1), ["key_length 3 differs"]),
])
def test_snapshots_read_the_pool_geometry_and_warn_about_what_drafts_lose(pool, channel_to, caplog, decoder,
                                                                         problems):
    stub = pool_pb2_grpc.PoolStub(channel_to(pool.address))
    snapshots = PoolSnapshots(stub, geometry=decoder)
    with caplog.at_level(logging.WARNING, logger="services.decoder.pool_snapshots"):
        snapshots.refresh()
    assert snapshots.pool_geometry == DraftGeometry(ngram_length=4)
    assert [p[:len(start)] for p, start in zip(snapshots.geometry_problems, problems)] == problems
    assert len(snapshots.geometry_problems) == len(problems)
    warned = [r for r in caplog.records if r.message.startswith("draft geometry differs")]
    assert [r.problem for r in warned] == snapshots.geometry_problems
    snapshots.refresh()  # read once per contact, not on every poll
    assert len([r for r in caplog.records if r.message.startswith("draft geometry differs")]) == len(problems)


class _Unimplemented(grpc.RpcError):
    def code(self):
        return grpc.StatusCode.UNIMPLEMENTED


class _PoolWithoutInfo:
    """A pool service from before Info: everything else answers."""

    def __init__(self, stub):
        self._stub = stub

    def __getattr__(self, name):
        return getattr(self._stub, name)

    def Info(self, request, timeout=None):
        raise _Unimplemented()


def test_a_pool_without_info_is_served_unchecked(pool, channel_to):
    stub = pool_pb2_grpc.PoolStub(channel_to(pool.address))
    insert(stub, "p", [1, 2, 3])
    snapshots = PoolSnapshots(_PoolWithoutInfo(stub))
    snapshots.note("p")
    assert snapshots.refresh() == 1 and snapshots.available is True
    assert snapshots.pool_geometry is None and snapshots.geometry_problems == []
