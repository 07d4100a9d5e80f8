"""Pure transform from incoming records to pool mutations (no Kafka, no RocksDB).

Topic adaccel.generated (GeneratedRecord): the generated tokens become "output" n-grams of the
record's pool, and of its task's pool when it names a task (pool_keys.task_pool_key; one batch,
one offset for both), remembered under each of the record's items so that removing any of them
takes the sequence back from both.

Topic adaccel.inventory (InventoryEvent), our choices:
- removed: the item's remembered sequences are taken back in every pool (the item is gone from
  the inventory, whatever pool the event names), both generated texts and its item text.
- added / changed: the item text (token_ids when the producer sent them, else `text` through the
  pool service's tokenizer) becomes "input" n-grams of the event's pool, remembered under the
  item and *replacing* the item text inserted before (so a replayed or repeated "added" never
  counts twice, and a change retracts the old wording). Generated texts about the item stay: they
  were accepted output. Input n-grams weigh `input_weight` (0.5) of output ones, so a catalog
  text proposes drafts for a new item before any generation about it, without outweighing what
  the model actually writes.
- added / changed with no usable text: a valid record with no effect (the offset still moves).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from adaccel.v1 import records_pb2
from common.drafting.pool_keys import GLOBAL_POOL, task_pool_key
from common.drafting.trie import ngram_prefix_counts
from common.requests import BLOCK_ID_PATTERN, POOL_KEY_PATTERN, TASK_PATTERN

MAX_ITEM_IDS = 256


class RejectedRecord(ValueError):
    """A record that cannot be applied; it goes to the dead-letter topic with this reason."""


@dataclass(slots=True, frozen=True)
class InsertSequences:
    pool_key: str
    sequences: tuple[tuple[int, ...], ...]
    kind: str = "output"  # "output" (generated) | "input" (prompt or item text)
    # Items the sequences came from: remembered, so that removing an item takes them back.
    item_ids: tuple[str, ...] = ()
    # First take back the item's earlier "input" sequences in this pool (inventory added/changed).
    replace_item_input: bool = False
    # Further pools the same sequences go into, in the same write (the record's task pool).
    also_into: tuple[str, ...] = ()

    @property
    def tokens(self) -> int:
        return sum(len(s) for s in self.sequences)


@dataclass(slots=True, frozen=True)
class RemoveItem:
    item_id: str
    pool_key: str | None = None  # None: every pool


@dataclass(slots=True, frozen=True)
class NoChange:
    """A valid record that changes no pool (its offset still moves)."""

    reason: str


Mutation = InsertSequences | RemoveItem | NoChange


def ngram_node_increments(sequences: Iterable[Sequence[int]], ngram_length: int) -> Counter:
    """Counts, for each trie node (a token path), how many inserted n-grams pass through it: the
    in-memory trie's own rule (`ngram_prefix_counts`), summed over sequences. The pool mirror
    adds exactly these on insert (mirror.py), so the written rows and the trie cannot diverge.

    >>> sorted(ngram_node_increments([[1, 2, 3]], 2).items())
    [((1,), 1), ((1, 2), 1), ((2,), 1), ((2, 3), 1), ((3,), 1)]
    """
    counts: Counter = Counter()
    for seq in sequences:
        counts.update(ngram_prefix_counts(seq, ngram_length))
    return counts


def check_token_ids(token_ids: Sequence[int], vocab_size: int, field: str) -> None:
    if any(t < 0 for t in token_ids) or (vocab_size and any(t >= vocab_size for t in token_ids)):
        bad = next(t for t in token_ids if t < 0 or (vocab_size and t >= vocab_size))
        limit = f"[0, {vocab_size})" if vocab_size else "non-negative"
        raise RejectedRecord(f"{field}: token id {bad} outside the vocabulary {limit}")


def check_pool_key(pool_key: str, field: str = "pool_key") -> str:
    """The pool a record names ("" = the global pool)."""
    if not POOL_KEY_PATTERN.match(pool_key):
        raise RejectedRecord(f"{field}: at most 128 characters of letters, digits and _.-/")
    return pool_key or GLOBAL_POOL


def check_item_id(item_id: str, field: str = "item_id") -> str:
    if not BLOCK_ID_PATTERN.match(item_id):
        raise RejectedRecord(f"{field}: 1-128 characters of letters, digits and _.:-/")
    return item_id


def generated_record_mutation(value: bytes | None, *, vocab_size: int, max_tokens: int) -> InsertSequences:
    if not value:
        raise RejectedRecord("value: empty")
    try:
        record = records_pb2.GeneratedRecord.FromString(value)
    except DecodeError as exc:
        raise RejectedRecord(f"value: not a GeneratedRecord protobuf: {exc}") from exc
    if len(record.token_ids) > max_tokens:
        raise RejectedRecord(f"token_ids: {len(record.token_ids)} tokens, limit is {max_tokens}")
    if not record.token_ids:
        raise RejectedRecord("token_ids: empty")
    check_token_ids(record.token_ids, vocab_size, "token_ids")
    pool_key = check_pool_key(record.pool_key)
    if len(record.item_ids) > MAX_ITEM_IDS:
        raise RejectedRecord(f"item_ids: {len(record.item_ids)} ids, limit is {MAX_ITEM_IDS}")
    items = tuple(dict.fromkeys(check_item_id(i, f"item_ids[{n}]") for n, i in enumerate(record.item_ids)))
    if not TASK_PATTERN.match(record.task):
        raise RejectedRecord("task: at most 64 characters of letters, digits and _.-")
    task_pool = task_pool_key(record.task)
    also_into = (task_pool,) if task_pool is not None and task_pool != pool_key else ()
    return InsertSequences(pool_key, (tuple(record.token_ids),), "output", items, also_into=also_into)


def inventory_event_mutation(value: bytes | None, *, vocab_size: int, max_tokens: int,
                             tokenize: Callable[[str], list[int]] | None) -> Mutation:
    """See the module docstring; `tokenize` is the pool's tokenizer (None: token_ids only)."""
    if not value:
        raise RejectedRecord("value: empty")
    try:
        event = records_pb2.InventoryEvent.FromString(value)
    except DecodeError as exc:
        raise RejectedRecord(f"value: not an InventoryEvent protobuf: {exc}") from exc
    item_id = check_item_id(event.item_id)
    pool_key = check_pool_key(event.pool_key)
    if event.action == records_pb2.INVENTORY_ACTION_REMOVED:
        return RemoveItem(item_id)
    if event.action not in (records_pb2.INVENTORY_ACTION_ADDED, records_pb2.INVENTORY_ACTION_CHANGED):
        raise RejectedRecord(f"action: must be ADDED, CHANGED or REMOVED, got {event.action}")
    if event.token_ids:
        tokens = list(event.token_ids)
    elif event.text and tokenize is not None:
        tokens = tokenize(event.text)
    else:
        return NoChange("item text not inserted: no token_ids, and no text or no tokenizer")
    if len(tokens) > max_tokens:
        raise RejectedRecord(f"token_ids: {len(tokens)} tokens, limit is {max_tokens}")
    check_token_ids(tokens, vocab_size, "token_ids")
    if not tokens:
        return NoChange("item text is empty")
    return InsertSequences(pool_key, (tuple(tokens),), "input", (item_id,), replace_item_input=True)
