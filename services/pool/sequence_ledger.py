"""The item-sequence ledger: which inserted sequences to remember for removal by item, which to
take back, which to forget (pure: records in, decisions out).

A sequence inserted on behalf of items is remembered (a StoredSequence under the pool and a
sequence id, indexed by each of its items) so that removing any of its items takes it back
with TokenTrie.remove, halved once per decay pass since the insert. A sequence about several
items goes with the first of them removed. A remembered sequence is forgotten
- once decay has shifted its contribution to 0 (`decay.still_contributes`): taking it back
  would change nothing;
- oldest first, when the pool remembers more than `max_tokens` tokens, down to half of that:
  the bound on the ledger's size. Its n-grams stay in the pool and decay like any others.

One `LedgerEdit` collects one write's decisions for one pool. The caller hands it the stored
records to consider (it never reads the store) and writes `remembered` and `forgotten` in the
same batch as the trie's rows; until that batch lands the store still lists the forgotten
records, so the edit skips them when they are handed in again.

>>> edit = LedgerEdit(next_sequence_id=7, squeezes=2, sequences=0, sequence_tokens=0)
>>> edit.remember([[4, 5]], "output", ("item-a",), squeezes_since_insert=0)
>>> edit.remembered
[(7, StoredSequence(kind='output', squeezes_at_insert=2, item_ids=('item-a',), tokens=(4, 5)))]
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from services.pool import decay
from services.pool.layout import StoredSequence
from services.pool.mirror import Retraction

Record = tuple[int, StoredSequence]  # (sequence id, the remembered sequence)


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

    def remember(self, sequences: Iterable[Sequence[int]], kind: str, item_ids: Sequence[str], *,
                 squeezes_since_insert: int) -> None:
        """Remembers the sequences just inserted about `item_ids` (none: nothing to remember),
        except empty ones and those the write's own decay already took to 0."""
        if not item_ids:
            return
        for tokens in sequences:
            if len(tokens) and decay.still_contributes(len(tokens), squeezes_since_insert):
                seq = StoredSequence(kind, self.squeezes, tuple(item_ids), tuple(int(t) for t in tokens))
                self.remembered.append((self.next_sequence_id, seq))
                self.next_sequence_id += 1
                self.sequences += 1
                self.sequence_tokens += len(seq.tokens)

    def forget_spent(self, records: Iterable[Record], *, squeezes_now: int) -> None:
        """Forgets the records whose contribution decay has taken to 0 (`squeezes_now`: the
        pool's decay passes once this write's are done)."""
        for sequence_id, seq in records:
            if sequence_id not in self.forgotten and not decay.still_contributes(
                    len(seq.tokens), squeezes_now - seq.squeezes_at_insert):
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
