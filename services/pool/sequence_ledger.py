"""The item-sequence ledger: which inserted sequences to remember for removal by item, which to
take back, which to forget (pure: records in, decisions out).

A sequence inserted on behalf of items is remembered (a StoredSequence under the pool and a
sequence id, indexed by each of its items) so that removing any of its items takes it back
with TokenTrie.remove, halved once per decay pass since the insert. A sequence about several
items goes with the first of them removed. A remembered sequence is forgotten
- once decay has made it and its items' other sequences too small to leave anything behind
  (`spent_items`): for every item it is about, the shares length / 2^squeezes_since of all
  that item's remembered sequences in the pool sum to under 1/2. A sequence's share bounds
  what it still adds at any node, and decay only shrinks what forgotten sequences left: each
  forgetting adds under 1/2 and halves what earlier ones added (it runs once per decay pass),
  so at a node only one item's texts reach, what forgotten ones leave stays under 1 - a count
  of 0. Judging one sequence alone is not enough: two of 1 at a node squeezed to 1, and each
  alone was worth 1 >> 1 = 0;
- oldest first, when the pool remembers more than `max_tokens` tokens, down to half of that:
  the bound on the ledger's size. Its n-grams stay in the pool and decay like any others: the
  one case where removing its item leaves n-grams behind (the bound, 2M tokens per pool by
  default, is far above what a pool's capacity holds undecayed).

One `LedgerEdit` collects one write's decisions for one pool. The caller hands it the stored
records to consider (it never reads the store) and writes `remembered` and `forgotten` in the
same batch as the trie's rows; until that batch lands the store still lists the forgotten
records, so the edit skips them when they are handed in again.

>>> edit = LedgerEdit(next_sequence_id=7, squeezes=2, sequences=0, sequence_tokens=0)
>>> edit.remember([[4, 5]], "output", ("item-a",))
>>> edit.remembered
[(7, StoredSequence(kind='output', squeezes_at_insert=2, item_ids=('item-a',), tokens=(4, 5)))]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

from services.pool.layout import StoredSequence
from services.pool.mirror import Retraction

Record = tuple[int, StoredSequence]  # (sequence id, the remembered sequence)

SPENT_BELOW = 0.5  # an item's remembered shares sum to under this: its sequences may go


def share(seq: StoredSequence, squeezes_now: int) -> float:
    """What the sequence may still add at one node: length / 2^(decay passes since its insert).

    >>> share(StoredSequence("output", 1, ("it",), (4, 5, 6)), squeezes_now=3)
    0.75
    """
    return math.ldexp(len(seq.tokens), seq.squeezes_at_insert - squeezes_now)


def spent_items(records: Iterable[Record], squeezes_now: int) -> set[str]:
    """The items whose remembered sequences' shares sum to under SPENT_BELOW.

    >>> records = [(1, StoredSequence("output", 0, ("a",), (1,))), (2, StoredSequence("input", 0, ("a", "b"), (1,)))]
    >>> sorted(spent_items(records, squeezes_now=2))  # a: 1/4 + 1/4, b: 1/4
    ['b']
    """
    shares: dict[str, float] = {}
    for _, seq in records:
        for item in seq.item_ids:
            shares[item] = shares.get(item, 0.0) + share(seq, squeezes_now)
    return {item for item, total in shares.items() if total < SPENT_BELOW}


class LedgerEdit:
    def __init__(self, *, next_sequence_id: int, squeezes: int, sequences: int, sequence_tokens: int) -> None:
        self.next_sequence_id = next_sequence_id  # ids grow: a larger id is a younger sequence
        self.squeezes = squeezes  # the pool's decay passes before this write
        self.sequences = sequences  # tallies, kept up to date with every decision
        self.sequence_tokens = sequence_tokens
        self.remembered: list[Record] = []
        self.forgotten: dict[int, StoredSequence] = {}

    def take_back(self, records: Iterable[Record], kinds: Sequence[str]) -> list[Retraction]:
        """Forgets the records of `kinds` and returns what the mirror must retract for them
        (each record once, however many of the removed items it is about)."""
        retractions = []
        for sequence_id, seq in records:
            if seq.kind not in kinds or sequence_id in self.forgotten:
                continue
            retractions.append(Retraction(seq.tokens, seq.kind, self.squeezes - seq.squeezes_at_insert))
            self._forget(sequence_id, seq)
        return retractions

    def remember(self, sequences: Iterable[Sequence[int]], kind: str, item_ids: Sequence[str]) -> None:
        """Remembers the sequences just inserted about `item_ids` (none: nothing to remember),
        except empty ones, as inserted before this write's own decay passes (`forget_spent`
        counts those among the pool's)."""
        if not item_ids:
            return
        for tokens in sequences:
            if len(tokens):
                seq = StoredSequence(kind, self.squeezes, tuple(item_ids), tuple(int(t) for t in tokens))
                self.remembered.append((self.next_sequence_id, seq))
                self.next_sequence_id += 1
                self.sequences += 1
                self.sequence_tokens += len(seq.tokens)

    def forget_spent(self, read_records: Callable[[], Iterable[Record]], *, squeezes_now: int) -> None:
        """Forgets the records all of whose items are spent (`spent_items`, over the pool's
        records and this write's; `squeezes_now`: the pool's decay passes once this write's are
        done). `read_records` lists the stored records; it is read twice."""
        live = (r for r in read_records() if r[0] not in self.forgotten)
        spent = spent_items([*live, *self.remembered], squeezes_now)
        if not spent:
            return
        for sequence_id, seq in read_records():
            if sequence_id not in self.forgotten and spent.issuperset(seq.item_ids):
                self._forget(sequence_id, seq)

    def forget_oldest(self, records: Iterable[Record], *, max_tokens: int) -> None:
        """Past `max_tokens` remembered tokens, forgets the oldest `records` (in id order, as the
        store lists them) until half of that is left; `records` is not read otherwise."""
        if self.sequence_tokens <= max_tokens:
            return
        target = max_tokens // 2
        for sequence_id, seq in records:
            if self.sequence_tokens <= target:
                break
            if sequence_id not in self.forgotten:
                self._forget(sequence_id, seq)

    def _forget(self, sequence_id: int, seq: StoredSequence) -> None:
        self.forgotten[sequence_id] = seq
        self.sequences -= 1
        self.sequence_tokens -= len(seq.tokens)
