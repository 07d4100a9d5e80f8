"""PoolManager on a real RocksDB directory: the stored pool always equals a plain TokenTrie fed
the same operations, survives reopening exactly, and stays within its bounds."""

import random

import pytest

from common.drafting.trie import TokenTrie, ngram_prefix_counts
from services.pool.ngram_records import InsertSequences, NoChange, RemoveItem
from services.pool.pool_manager import PoolLimits, PoolManager
from services.pool.pool_store import PoolStore

LIMITS = PoolLimits(ngram_length=4, capacity=120, max_pools=3, squeeze_to=0.75)


@pytest.fixture
def open_manager(tmp_path):
    stores = []

    def open_(limits: PoolLimits = LIMITS, **options) -> PoolManager:
        for store in stores:
            store.close()
        stores.clear()
        stores.append(PoolStore(tmp_path / "pool"))
        return PoolManager(stores[0], limits, **options)

    yield open_
    for store in stores:
        store.close()


def assert_store_mirrors(manager: PoolManager, pool_key: str) -> None:
    """Every stored row equals the in-memory trie, and the trie has no other node."""
    rows = list(manager.store.rows(pool_key))
    assert len(rows) == manager.meta(pool_key).nodes
    for path, output, input_ in rows:
        assert (manager.count(pool_key, path), manager.count(pool_key, path, "input")) == (output, input_), path


def assert_equals_reference(manager: PoolManager, pool_key: str, reference: TokenTrie, paths) -> None:
    assert manager.meta(pool_key).nodes == len(reference)
    for path in paths:
        for kind in ("output", "input"):
            assert manager.count(pool_key, path, kind) == reference.count(path, kind), (path, kind)


def random_ops(seed: int, n: int):
    rng = random.Random(seed)
    epoch = [0] * 6  # a removed item stays gone: later texts go to a new item id
    for i in range(n):
        r = rng.randrange(6)
        if i % 9 == 8:
            yield "remove", f"it-{r}.{epoch[r]}", None, None
            epoch[r] += 1
        else:
            seq = [rng.randrange(12) for _ in range(rng.randint(1, 15))]
            yield "insert", f"it-{r}.{epoch[r]}", seq, rng.choice(["output", "output", "input"])


@pytest.mark.parametrize("seed", range(3))
def test_pool_equals_a_token_trie_fed_the_same_inserts_removals_and_decay(open_manager, seed):
    manager = open_manager()
    reference = TokenTrie(LIMITS.trie_settings())
    paths = set()
    for op, item, seq, kind in random_ops(seed, 120):
        if op == "insert":
            manager.insert("a/b", [seq], kind, item_ids=(item,))
            reference.insert(seq, kind, source=item)
            paths.update(ngram_prefix_counts(seq, LIMITS.ngram_length))
        else:
            manager.remove_item(item)
            reference.remove_source(item)
        assert manager.meta("a/b").nodes <= LIMITS.capacity  # never over its bound
    info = manager.meta("a/b")
    assert info.squeezes == reference.squeeze_count > 0
    assert_equals_reference(manager, "a/b", reference, paths)
    assert_store_mirrors(manager, "a/b")

    reopened = open_manager()  # what a restart after kill -9 rebuilds
    assert reopened.meta("a/b") == info
    assert_equals_reference(reopened, "a/b", reference, paths)
    assert reopened.snapshot("a/b").nodes == info.nodes


def test_removing_an_item_takes_back_every_sequence_about_it_in_every_pool(open_manager):
    manager = open_manager(PoolLimits(ngram_length=3, capacity=10_000))
    manager.insert("p", [[1, 2, 3]], item_ids=("a", "b"))
    manager.insert("q", [[1, 2, 9]], item_ids=("a",))
    manager.insert("p", [[1, 2, 4]], item_ids=("c",))
    infos = manager.remove_item("a")
    assert sorted(i.pool_key for i in infos) == ["p", "q"]
    assert manager.count("p", (1, 2)) == 1 and manager.count("p", (1, 2, 3)) == 0
    assert manager.count("p", (1, 2, 4)) == 1 and manager.count("q", (1, 2, 9)) == 0
    assert manager.meta("p").nodes == 9  # emptied nodes stay (count 0) until the next decay
    assert manager.remove_item("b") == []  # the sequence went with "a"
    assert manager.store.item_sequences("a") == manager.store.item_sequences("b") == []
    assert_store_mirrors(manager, "p")


def test_a_record_and_its_task_pool_are_written_together_and_taken_back_together(open_manager, monkeypatch):
    manager = open_manager(PoolLimits(ngram_length=3, capacity=10_000, max_pools=2))
    changed = manager.apply(InsertSequences("p", ((1, 2, 3),), item_ids=("a",), also_into=("task/rec",)),
                            ("gen", 0, 1))
    assert [m.pool_key for m in changed] == ["p", "task/rec"] and manager.store.next_offset("gen", 0) == 1
    manager.apply(InsertSequences("q", ((1, 2, 9),), also_into=("task/rec",)), ("gen", 0, 2))
    # One write with one offset: both pools or neither (max_pools 2 made room for q by evicting p).
    assert "p" not in manager and manager.count("task/rec", (1, 2)) == 2
    assert manager.count("q", (1, 2, 9)) == 1 and manager.store.next_offset("gen", 0) == 2

    def broken(batch):
        raise OSError("disk full")

    monkeypatch.setattr(manager.store, "write", broken)
    with pytest.raises(OSError):
        manager.apply(InsertSequences("q", ((5, 6),), also_into=("task/rec",)), ("gen", 0, 3))
    monkeypatch.undo()
    assert manager.count("q", (5, 6)) == 0 and manager.count("task/rec", (5, 6)) == 0
    assert manager.store.next_offset("gen", 0) == 2
    manager.remove_item("a")  # the item's sequence leaves the task pool as well
    assert manager.count("task/rec", (1, 2, 3)) == 0 and manager.count("task/rec", (1, 2, 9)) == 1
    reopened = open_manager(PoolLimits(ngram_length=3, capacity=10_000, max_pools=2))
    assert reopened.count("task/rec", (1, 2)) == 1 and reopened.count("q", (1, 2, 9)) == 1
    assert_store_mirrors(reopened, "task/rec")


def test_item_text_is_replaced_on_change_and_generated_text_stays(open_manager):
    manager = open_manager(PoolLimits(ngram_length=3, capacity=10_000))
    manager.apply(InsertSequences("p", ((1, 2, 3),), "input", ("it",), replace_item_input=True))
    manager.apply(InsertSequences("p", ((1, 2, 3),), "input", ("it",), replace_item_input=True))  # replayed
    assert manager.count("p", (1, 2, 3), "input") == 1
    manager.apply(InsertSequences("p", ((7, 8),), "output", ("it",)))
    manager.apply(InsertSequences("p", ((1, 2, 5),), "input", ("it",), replace_item_input=True))  # changed
    assert manager.count("p", (1, 2, 3), "input") == 0 and manager.count("p", (1, 2, 5), "input") == 1
    assert manager.count("p", (7, 8)) == 1
    manager.apply(RemoveItem("it"))
    assert manager.count("p", (1, 2, 5), "input") == manager.count("p", (7, 8)) == 0
    assert_store_mirrors(manager, "p")


def test_offsets_are_stored_with_the_effect_and_alone_for_records_without_one(open_manager):
    manager = open_manager()
    manager.apply(InsertSequences("p", ((1, 2),)), ("gen", 0, 5))
    assert manager.store.next_offset("gen", 0) == 5 and manager.meta("p").version == 1
    manager.apply(NoChange("no text"), ("inv", 0, 3))
    assert manager.store.next_offset("inv", 0) == 3 and manager.meta("p").version == 1


def test_pools_beyond_max_pools_evict_the_least_recently_updated_one_entirely(open_manager):
    manager = open_manager()
    for key in ("a", "b", "c", "a"):
        manager.insert(key, [[1, 2, 3]], item_ids=(f"it-{key}",))
    manager.insert("d", [[4, 5]])
    assert sorted(i.pool_key for i in manager.metas()) == ["a", "c", "d", "global"]  # b was the stalest
    assert manager.pools_evicted == 1
    store = manager.store
    assert list(store.rows("b")) == [] and store.pool_info("b") is None
    assert list(store.sequences("b")) == [] and store.item_sequences("it-b") == []
    reopened = open_manager()
    assert sorted(i.pool_key for i in reopened.metas()) == ["a", "c", "d", "global"]


def test_remembered_sequences_are_bounded_and_spent_ones_forgotten(open_manager):
    manager = open_manager(PoolLimits(ngram_length=3, capacity=10_000, max_sequence_tokens=1024))
    for i in range(30):
        manager.insert("p", [[i % 7] * 50], item_ids=(f"it-{i}",))
    info = manager.meta("p")
    assert info.sequence_tokens <= 1024 and info.sequences == info.sequence_tokens // 50
    assert len(list(manager.store.sequences("p"))) == info.sequences
    small = open_manager(PoolLimits(ngram_length=2, capacity=16, squeeze_to=0.5))
    small.insert("q", [[1]], item_ids=("one",))
    for i in range(40):  # decay passes shift a 1-token sequence's contribution to 0
        small.insert("q", [[i, i + 1, i + 2]])
    assert small.meta("q").squeezes >= 1 and small.store.item_sequences("one") == []
    for i in range(30):  # item texts replaced while decay runs: the bookkeeping stays exact
        small.insert("q", [[i % 5, 1, 2, i % 3]], "input", item_ids=(f"it-{i % 4}",), replace_item_input=True)
        info = small.meta("q")
        stored = [seq for _, seq in small.store.sequences("q")]
        assert info.sequences == len(stored) and info.sequence_tokens == sum(len(q.tokens) for q in stored)
    assert_store_mirrors(small, "q")


def test_a_failed_write_leaves_the_mirror_as_the_store_has_it(open_manager, monkeypatch):
    manager = open_manager()
    manager.insert("p", [[1, 2, 3]])

    def broken(batch):
        raise OSError("disk full")

    monkeypatch.setattr(manager.store, "write", broken)
    with pytest.raises(OSError):
        manager.insert("p", [[1, 2, 9]])
    with pytest.raises(OSError):
        manager.insert("new", [[5]])
    assert manager.count("p", (1, 2)) == 1 and manager.count("p", (2, 9)) == 0
    assert manager.meta("p").version == 1 and "new" not in manager


def test_texts_about_a_removed_item_are_ignored_until_the_inventory_adds_it_back(open_manager):
    manager = open_manager(PoolLimits(ngram_length=3, capacity=10_000))
    manager.apply(RemoveItem("gone"), ("inv", 0, 1))  # the removal may overtake the item's generations
    assert manager.apply(InsertSequences("p", ((1, 2, 3),), "output", ("gone", "other")), ("gen", 0, 1)) == []
    assert "p" not in manager and manager.store.next_offset("gen", 0) == 1
    manager.apply(InsertSequences("p", ((4, 5),), "input", ("gone",), replace_item_input=True))  # added back
    manager.apply(InsertSequences("p", ((1, 2, 3),), "output", ("gone",)))
    assert manager.count("p", (1, 2, 3)) == 1 and manager.count("p", (4, 5), "input") == 1


class _NodeReads:
    """The store's node column family, counting point reads and scans."""

    def __init__(self, nodes):
        self._nodes, self.gets, self.scans = nodes, 0, 0

    def get(self, key):
        self.gets += 1
        return self._nodes.get(key)

    def iter(self):
        self.scans += 1
        return self._nodes.iter()


def test_building_a_batch_reads_no_node_and_a_decay_scans_the_pool_once(open_manager):
    manager = open_manager(PoolLimits(ngram_length=3, capacity=40, squeeze_to=0.5))
    manager.insert("p", [[1, 2, 3]], item_ids=("a",))
    reads = _NodeReads(manager.store._cf["nodes"])
    manager.store._cf["nodes"] = reads
    manager.insert("p", [[1, 2, 4]], item_ids=("b",))
    manager.apply(InsertSequences("p", ((2, 3, 4),), "input", ("a",), replace_item_input=True))
    manager.remove_item("b")
    assert (reads.gets, reads.scans) == (0, 0)  # the mirror knows which nodes the writes touch
    manager.insert("p", [list(range(10, 40))])  # past capacity: decays
    assert manager.meta("p").squeezes >= 1 and (reads.gets, reads.scans) == (0, 1)
    assert_store_mirrors(manager, "p")


def test_metadata_times_come_from_the_managers_clock(open_manager):
    now = [100.0]
    manager = open_manager(PoolLimits(ngram_length=3, capacity=10_000), clock=lambda: now[0])
    manager.insert("p", [[1, 2]], item_ids=("it",))
    now[0] = 250.0
    manager.remove_item("it")
    assert manager.meta("p").updated_at == 250.0 and manager.meta("p").version == 2
    assert manager.store.pool_info("p") == manager.meta("p")


@pytest.mark.parametrize("seed", range(4))
def test_a_removed_items_ngrams_are_gone_after_decay_whatever_its_texts_shared(open_manager, seed):
    # An item's catalog text and its generated texts repeat its name: after a squeeze their
    # shared nodes read 1, which taking each text back rounded down (1 >> 1 = 0) left drafted.
    rng = random.Random(seed)
    manager = open_manager(PoolLimits(ngram_length=4, capacity=200, max_pools=3, squeeze_to=0.75))
    name = [1000 + i for i in range(8)]
    kind = rng.choice(["output", "input"])
    for _ in range(rng.randint(2, 4)):
        manager.insert("p", [name[: rng.randint(4, 8)]], kind=kind, item_ids=("gone",))
        for _ in range(rng.randint(0, 3)):
            manager.insert("p", [[rng.randrange(50) for _ in range(8)]], item_ids=("stays",))
    while manager.meta("p").squeezes < 1:
        manager.insert("p", [[rng.randrange(50) for _ in range(8)]])
    assert manager.count("p", tuple(name[:4]), kind) > 0
    manager.remove_item("gone")
    assert [(n, kind) for n in range(1, 5) for s in range(len(name) - n + 1) for kind in ("output", "input")
            if manager.count("p", tuple(name[s:s + n]), kind)] == []
    assert_store_mirrors(manager, "p")
