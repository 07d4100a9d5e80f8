"""SpareCapacityLayer against transformers' DynamicLayer: the same tensors after any sequence of
the operations the engine performs, in-place appends while the buffer has room, and tensors it
was given never written."""

from __future__ import annotations

import doctest

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from services.decoder.engine import spare_capacity
from services.decoder.engine.kv_cache import compact, keep_accepted
from services.decoder.engine.spare_capacity import SpareCapacityLayer, with_spare_capacity

HEADS, HEAD_DIM = 2, 4


def test_doctests() -> None:
    assert doctest.testmod(spare_capacity).failed == 0


def _states(rows: int, columns: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, HEADS, columns, HEAD_DIM, generator=generator),
            torch.randn(rows, HEADS, columns, HEAD_DIM, generator=generator))


def _cache(spare: int | None) -> DynamicCache:
    """Two DynamicLayers, converted to SpareCapacityLayers unless spare is None."""
    cache = DynamicCache()
    cache.layers.extend(DynamicLayer() for _ in range(2))
    return cache if spare is None else with_spare_capacity(cache, spare)


operation = st.one_of(
    st.tuples(st.just("update"), st.integers(1, 9)),
    st.tuples(st.just("crop"), st.integers(1, 5)),
    st.tuples(st.just("keep"), st.integers(1, 6), st.integers(0, 1000)),
    st.tuples(st.just("select"), st.integers(0, 1000)),
    st.tuples(st.just("compact"), st.integers(0, 1000)),
)


@settings(max_examples=80, deadline=None)
@given(rows=st.integers(1, 3), spare=st.integers(0, 6), operations=st.lists(operation, min_size=1, max_size=14))
def test_same_tensors_as_dynamic_layer(rows: int, spare: int, operations: list[tuple]) -> None:
    plain, spared = _cache(None), _cache(spare)
    valid = {id(plain): None, id(spared): None}
    for step, (kind, *args) in enumerate(operations):
        length = plain.get_seq_length()
        for cache in (plain, spared):
            if kind == "update":
                for index in range(2):
                    returned = cache.update(*_states(rows, args[0], seed=step * 10 + index), index)
                    assert returned[0] is cache.layers[index].keys
            elif kind == "crop" and length > args[0]:
                cache.crop(-args[0])
            elif kind == "keep" and length >= args[0] + 1:
                # the last args[0] columns were a tree: keep a random path of them, per row
                generator = torch.Generator().manual_seed(args[1])
                width = args[0]
                paths = []
                for _ in range(rows):
                    depth = int(torch.randint(1, width + 1, (1,), generator=generator))
                    rest = sorted(torch.randperm(width - 1, generator=generator)[: depth - 1].add(1).tolist())
                    paths.append([0, *rest])
                keep_accepted(cache, length - width, paths)
            elif kind == "select" and length and rows > 1:
                generator = torch.Generator().manual_seed(args[0])
                cache.batch_select_indices(torch.randperm(rows, generator=generator)[: rows - 1].sort().values)
            elif kind == "compact" and length:
                generator = torch.Generator().manual_seed(args[0])
                key_valid = torch.rand(cache.layers[0].keys.shape[0], length, generator=generator) > 0.3
                key_valid[:, -1] = True
                valid[id(cache)] = compact(cache, key_valid)
        if kind == "select" and length and rows > 1:
            rows -= 1
        assert plain.get_seq_length() == spared.get_seq_length()
        for ours, theirs in zip(spared.layers, plain.layers, strict=True):
            if theirs.get_seq_length():
                assert torch.equal(ours.keys, theirs.keys) and torch.equal(ours.values, theirs.values)
    if valid[id(plain)] is not None:
        assert torch.equal(valid[id(plain)], valid[id(spared)])


def test_appends_in_place_while_the_buffer_has_room() -> None:
    cache = _cache(spare=8)
    cache.update(*_states(2, 6, seed=0), 0)
    layer = cache.layers[0]
    start = layer.keys.data_ptr()
    for step in range(4):  # 2 columns per step, cropped by 1: net +1, within the 8 spare columns
        cache.update(*_states(2, 2, seed=step + 1), 0)
        cache.crop(-1)
        assert layer.keys.data_ptr() == start and layer.capacity == 6 + 8
    cache.update(*_states(2, 5, seed=9), 0)  # 10 + 5 > 14: one copy into a larger buffer
    assert layer.keys.data_ptr() != start and layer.capacity == 15 + 8


def test_a_chunked_prefill_copies_on_every_other_chunk() -> None:
    cache = _cache(spare=8)
    pointers = []
    for chunk in range(6):
        cache.update(*_states(1, 32, seed=chunk), 0)
        pointers.append(cache.layers[0].keys.data_ptr())
    # each growth reserves one more chunk (32 > 8 spare columns), which the next chunk fills in place
    assert [pointers[i] == pointers[i - 1] for i in range(1, 6)] == [True, False, True, False, True]


def test_never_writes_a_tensor_it_was_given() -> None:
    given_keys, given_values = _states(1, 5, seed=3)
    originals = given_keys.clone(), given_values.clone()
    plain = DynamicCache(ddp_cache_data=[(given_keys, given_values)])
    cache = with_spare_capacity(plain, spare_columns=4)
    assert isinstance(cache.layers[0], SpareCapacityLayer)
    cache.crop(-2)  # a view of the caller's tensors: the next update must not write into them
    cache.update(*_states(1, 2, seed=4), 0)
    assert torch.equal(given_keys, originals[0]) and torch.equal(given_values, originals[1])
    assert torch.equal(cache.layers[0].keys[:, :, :3], originals[0][:, :, :3])


def test_a_foreign_tensor_releases_the_buffer() -> None:
    cache = _cache(spare=16)
    cache.update(*_states(3, 4, seed=0), 0)
    layer = cache.layers[0]
    assert layer.capacity == 20
    cache.batch_select_indices(torch.tensor([0, 2]))  # a gathered copy: the old buffer goes at once
    assert layer.capacity == 0 and layer.keys.shape == (2, HEADS, 4, HEAD_DIM)
    cache.update(*_states(2, 1, seed=1), 0)
    assert layer.capacity == 5 + 16


def test_layers_added_later_have_spare_capacity() -> None:
    cache = with_spare_capacity(DynamicCache(), spare_columns=3)
    cache.update(*_states(1, 2, seed=0), 0)
    assert isinstance(cache.layers[0], SpareCapacityLayer) and cache.layers[0].capacity == 5
