"""The one map between the protobuf block kind and the core's BlockKind."""

from adaccel.v1 import common_pb2
from common.blocks.hashing import BlockKind
from common.rpc.block_kinds import KIND_OF_PROTO, PROTO_OF_KIND, kinds_and_texts


def test_every_set_proto_kind_maps_to_one_core_kind_and_back():
    set_kinds = {v for v in common_pb2.BlockKind.values() if v != common_pb2.BLOCK_KIND_UNSPECIFIED}
    assert set(KIND_OF_PROTO) == set_kinds
    assert set(PROTO_OF_KIND) == set(BlockKind)
    assert all(KIND_OF_PROTO[PROTO_OF_KIND[kind]] is kind for kind in BlockKind)


def test_prompt_blocks_become_kind_and_text_in_order():
    blocks = [common_pb2.PromptBlock(id="u", kind=common_pb2.BLOCK_KIND_USER_HISTORY, text="clicks"),
              common_pb2.PromptBlock(id="q", kind=common_pb2.BLOCK_KIND_TEXT, text="why?")]
    assert kinds_and_texts(blocks) == [(BlockKind.USER_HISTORY, "clicks"), (BlockKind.FREE_TEXT, "why?")]
