"""Key layout: byte order is pre-order of the trie, pools and items never share prefixes."""

import random

import pytest

from services.pool import layout
from services.pool.layout import StoredSequence


def test_node_keys_sort_like_token_paths_in_pre_order():
    rng = random.Random(0)
    paths = {tuple(rng.choice([0, 1, 255, 256, 65536, 2**31 - 1]) for _ in range(rng.randint(1, 4)))
             for _ in range(300)}
    by_bytes = sorted(paths, key=lambda p: layout.node_key("a/b", p))
    assert by_bytes == sorted(paths)
    for i, path in enumerate(by_bytes):  # every extension of a path follows it directly in the order
        subtree = [p for p in by_bytes if p[:len(path)] == path]
        assert by_bytes[i:i + len(subtree)] == subtree


@pytest.mark.parametrize("a, b", [("a", "a/b"), ("a", "ab"), ("a.b", "a")])
def test_one_pools_prefix_never_covers_another_pool(a, b):
    assert not layout.node_key(b, (1,)).startswith(layout.pool_prefix(a))
    assert not layout.sequence_key(b, 1).startswith(layout.pool_prefix(a))
    assert layout.prefix_end(layout.pool_prefix(a)) > layout.node_key(a, (2**31 - 1,) * 9)


def test_item_keys_group_an_items_sequences_across_pools():
    keys = sorted([layout.item_key("it-1", "p", 3), layout.item_key("it-10", "p", 1),
                   layout.item_key("it-1", "a/b", 9)])
    mine = [layout.parse_item_key(k) for k in keys if k.startswith(layout.item_prefix("it-1"))]
    assert mine == [("it-1", "a/b", 9), ("it-1", "p", 3)]


def test_values_round_trip():
    assert layout.decode_counts(layout.encode_counts(7, 2**40)) == (7, 2**40)
    assert layout.decode_counts((5).to_bytes(8, "big")) == (5, 0)  # first layout: output only
    seq = StoredSequence("input", 2, ("x", "é"), (0, 1, 2**31 - 1))
    assert layout.decode_sequence(layout.encode_sequence(seq)) == seq
    assert layout.decode_path(layout.encode_path((3, 1))) == (3, 1)
