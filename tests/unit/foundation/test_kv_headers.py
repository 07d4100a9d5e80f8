"""The kv-store header maps to the codec's record and back, field for field."""

from dataclasses import fields

from adaccel.v1 import kvstore_pb2
from common.blocks.kv_codec import BlockHeader, checksum
from common.rpc.kv_headers import header_from_proto, header_to_proto


def test_every_field_survives_the_round_trip_through_the_wire():
    data = bytes(range(48))
    header = BlockHeader(block_hash=b"h" * 32, model_id="m:bfloat16", dtype="bfloat16", shape=(2, 2, 1, 3, 2),
                         total_bytes=len(data), checksum=checksum(data), num_tokens=3)
    wire = kvstore_pb2.KvHeader.FromString(header_to_proto(header).SerializeToString())
    assert header_from_proto(wire) == header
    # The record and the message have the same fields: a new proto field must be mapped here.
    assert {f.name for f in fields(BlockHeader)} == set(kvstore_pb2.KvHeader.DESCRIPTOR.fields_by_name)
