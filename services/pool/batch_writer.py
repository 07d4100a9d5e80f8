"""One mutation's RocksDB WriteBatch, built from what the mirror and the ledger decided.

Everything a mutation changes lands in one batch - trie rows, remembered sequences, pool
metadata, item-removal marks and the Kafka consumer offset - so a crash keeps all of it or none
(the exactly-once statement in updater.py rests on this).

No per-node reads while building: the mirror reports every node it changed (MirrorChange) and
the store already equals the mirror for every other node. Two writes read a whole range
instead, once each:
- a decay rewrites the pool's rows from the stored ones (one prefix scan) merged with the
  mutation's pre-decay counts, by the rule of `decay.squeezed_rows`; the survivors must number
  what the mirror kept, an independent check of both;
- dropping a pool lists its remembered sequences, whose item-index keys name their items.
"""

from __future__ import annotations

from services.pool import decay
from services.pool.mirror import MirrorChange
from services.pool.pool_meta import PoolMeta
from services.pool.pool_store import PoolStore
from services.pool.sequence_ledger import LedgerEdit

Offset = tuple[str, int, int]  # topic, partition, next offset


class BatchWriter:
    def __init__(self, store: PoolStore) -> None:
        self._store = store
        self._batch = store.batch()

    def put_nodes(self, pool_key: str, change: MirrorChange) -> None:
        """The nodes the mutation changed; after a decay, every row of the pool."""
        batch = self._batch
        if not change.squeezes:
            batch.put_nodes(pool_key, ((path, *counts) for path, counts in change.counts.items()))
            return
        batch.delete_nodes(pool_key)  # the puts below, later in the batch, win over this delete
        merged = decay.merged_rows(self._store.rows(pool_key), change.counts)
        survivors = batch.put_nodes(pool_key, decay.squeezed_rows(merged, change.squeezes))
        if survivors != change.nodes:
            raise RuntimeError(f"pool {pool_key!r}: decay kept {survivors} rows, "
                               f"the mirror {change.nodes} nodes")

    def put_ledger(self, pool_key: str, edit: LedgerEdit) -> None:
        for sequence_id, seq in edit.remembered:
            self._batch.put_sequence(pool_key, sequence_id, seq)
        for sequence_id, seq in edit.forgotten.items():
            self._batch.delete_sequence(pool_key, sequence_id, seq.item_ids)

    def put_meta(self, meta: PoolMeta) -> None:
        self._batch.put_meta(meta)

    def drop_pool(self, pool_key: str) -> None:
        """Rows, remembered sequences (with their item index) and metadata of the pool."""
        self._batch.delete_nodes(pool_key)
        for sequence_id, seq in self._store.sequences(pool_key):
            self._batch.delete_sequence(pool_key, sequence_id, seq.item_ids)
        self._batch.delete_meta(pool_key)

    def mark_removed(self, item_id: str, removed_at: float) -> None:
        """The item left the inventory (unix seconds): later texts about it are not inserted."""
        self._batch.put_removed(item_id, removed_at)

    def unmark_removed(self, item_id: str) -> None:
        """The inventory added the item back."""
        self._batch.delete_removed(item_id)

    def put_offset(self, offset: Offset | None) -> None:
        if offset is not None:
            self._batch.put_offset(*offset)

    def write(self) -> None:
        self._store.write(self._batch)
