"""Decoder-side copies of retrieval pools: an LRU of snapshots keyed by (pool key, version).

Requests never wait on the pool service: `note(pool_key)` (called once per request) records
the key and wakes the refresher; decoding drafts from whatever the registry holds at that
moment (the most specific pool held, else the global pool, plus the request's own overlay).
A background thread asks the pool service for the versions of the recently requested keys
(one GetVersions call every `refresh_s`, or at once for a key never seen) and fetches a
snapshot only when the version it holds moved. With the pool service down, or `pool_addr`
empty, nothing changes for requests: they draft from the snapshots already held, or from the
request-local overlay alone.

Draft geometry: on first contact (and again after an outage: the pool may have been redeployed)
the refresher reads the pool's advertised geometry (Pool.Info) and logs a warning for each way
this decoder's drafts lose against it (common/drafting/geometry.py `pool_mismatches`: another
key length, or a default tree deeper than the pool's n-grams reach). Drafting goes on either
way: a trie answers any key shorter than its n-grams, so drafts get shallower, never wrong.

Bounds: at most `max_pools` snapshots (the global pool not counted), least recently requested
dropped first; at most 4 x max_pools requested keys remembered.

Tracing: a fetch serves every request that wanted the pool since the last one and none of them
waits for it, so it is not a child of any request. Each fetch is the root of its own trace
("adaccel.decoder.pool_fetch", the GetSnapshot client span under it) with span links to the
requests that asked for the pool (the latest few per key). Version polls are not traced.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Iterator

import grpc
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, SpanContext, Tracer

from adaccel.v1 import pool_pb2, pool_pb2_grpc
from common.drafting.geometry import DEFAULT_GEOMETRY, DraftGeometry, pool_mismatches
from common.drafting.pools import GLOBAL_POOL, PoolRegistry
from common.drafting.trie import TokenTrie, TrieSettings
from common.rpc.streams import join_header_stream

log = logging.getLogger(__name__)

LINKS_PER_KEY = 8  # requests remembered per wanted key for the next fetch's span links


class LockedPoolRegistry(PoolRegistry):
    """A PoolRegistry that a refresher thread may change while request threads resolve from it."""

    def __init__(self, trie_settings: TrieSettings | None = None, *, global_key: str = GLOBAL_POOL) -> None:
        self._lock = threading.RLock()
        super().__init__(trie_settings, global_key=global_key)

    def __contains__(self, pool_key: str) -> bool:
        with self._lock:
            return super().__contains__(pool_key)

    def __iter__(self) -> Iterator[str]:
        with self._lock:
            return iter(list(self._pools))

    def __len__(self) -> int:
        with self._lock:
            return super().__len__()

    @property
    def global_pool(self) -> TokenTrie:
        with self._lock:
            return super().global_pool

    def get_or_create(self, pool_key: str) -> TokenTrie:
        with self._lock:
            return super().get_or_create(pool_key)

    def put(self, pool_key: str, trie: TokenTrie) -> None:
        with self._lock:
            super().put(pool_key, trie)

    def load_snapshot(self, pool_key: str, snapshot: bytes) -> TokenTrie:
        trie = TokenTrie.from_bytes(snapshot)  # parse outside the lock
        self.put(pool_key, trie)
        return trie

    def drop(self, pool_key: str) -> None:
        with self._lock:
            super().drop(pool_key)

    def reset_global(self) -> None:
        with self._lock:
            self._pools[self.global_key] = TokenTrie(self.trie_settings)

    def resolve(self, pool_key: str | None) -> TokenTrie:
        with self._lock:
            return super().resolve(pool_key)

    def get(self, pool_key: str | None) -> TokenTrie | None:
        with self._lock:
            return super().get(pool_key)


class PoolSnapshots:
    def __init__(self, stub: pool_pb2_grpc.PoolStub, *, refresh_s: float = 2.0, max_pools: int = 16,
                 timeout_s: float = 5.0, registry: LockedPoolRegistry | None = None,
                 tracer: Tracer | None = None, geometry: DraftGeometry = DEFAULT_GEOMETRY):
        self.stub = stub
        self.tracer = tracer or trace.NoOpTracer()
        self.refresh_s = refresh_s
        self.max_pools = max_pools
        self.timeout_s = timeout_s
        self.registry = registry or LockedPoolRegistry()
        self.polls = 0
        self.fetches = 0
        self.failures = 0
        self.available: bool | None = None  # None: not asked yet
        self.geometry = geometry  # this decoder's draft sizes (DecoderSettings.draft_geometry)
        self.pool_geometry: DraftGeometry | None = None  # as the pool advertised it; None: not read
        self.geometry_problems: list[str] = []  # pool_mismatches(geometry, pool_geometry)
        self._lock = threading.Lock()
        self._wanted: OrderedDict[str, None] = OrderedDict()  # requested keys, most recent last
        self._resolved: dict[str, str] = {}  # requested key -> pool serving it, as of the last poll
        self._held: OrderedDict[str, int] = OrderedDict()  # pool key -> version held, most recent last
        self._askers: dict[str, deque[SpanContext]] = {}  # requested key -> spans of requests since its fetch
        self._refresh_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pool-snapshots", daemon=True)

    # ------------------------------------------------------------------ request side (no I/O)
    def note(self, pool_key: str | None) -> None:
        """A request for `pool_key` starts: keep its pool fresh from now on."""
        key = pool_key or GLOBAL_POOL
        asker = trace.get_current_span().get_span_context()
        with self._lock:
            new = key not in self._wanted
            self._wanted[key] = None
            self._wanted.move_to_end(key)
            if asker.is_valid and asker.trace_flags.sampled:
                self._askers.setdefault(key, deque(maxlen=LINKS_PER_KEY)).append(asker)
            while len(self._wanted) > 4 * self.max_pools:
                dropped, _ = self._wanted.popitem(last=False)
                self._askers.pop(dropped, None)
            resolved = self._resolved.get(key)
            if resolved in self._held:
                self._held.move_to_end(resolved)
        if new:
            self._wake.set()

    def held(self) -> dict[str, int]:
        """Pool key -> version of every snapshot held."""
        with self._lock:
            return dict(self._held)

    def held_keys(self) -> list[str]:
        with self._lock:
            return list(self._held)

    # ------------------------------------------------------------------ refresher
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.refresh()
            self._wake.wait(self.refresh_s)
            self._wake.clear()
            self._stop.wait(0.05)  # a burst of new keys costs one poll, not one each

    def refresh(self) -> int:
        """One poll: versions of the wanted keys, then snapshots whose version moved. Returns
        the snapshots fetched; never raises for an unreachable pool service."""
        with self._refresh_lock:
            try:
                return self._refresh()
            except grpc.RpcError as exc:
                self.failures += 1
                if self.available is not False:
                    log.warning("pool service unreachable; drafting from the snapshots held",
                                extra={"code": exc.code().name if hasattr(exc, "code") else "",
                                       "held": self.held_keys()})
                self.available = False
                return 0

    def _refresh(self) -> int:
        with self._lock:
            keys = list(reversed(self._wanted))  # most recently requested first
        if GLOBAL_POOL not in keys:
            keys.append(GLOBAL_POOL)
        reply = self.stub.GetVersions(pool_pb2.VersionsRequest(pool_keys=keys), timeout=self.timeout_s)
        self.polls += 1
        if self.available is not True:  # first contact, or back after an outage
            self._check_geometry()
        if self.available is False:
            log.info("pool service reachable again")
        self.available = True
        targets: dict[str, int] = {}  # pool -> version, in order of request recency
        for entry in reply.pools:
            targets.setdefault(entry.resolved_key, entry.version)
        with self._lock:
            self._resolved = {e.pool_key: e.resolved_key for e in reply.pools}
            # Keep only what some wanted key still resolves to (the LRU below bounds the rest).
            for key in [k for k in self._held if k not in targets]:
                self._forget(key)
        fetched = 0
        budget = [k for k in targets if k != GLOBAL_POOL][:self.max_pools]
        for key in [GLOBAL_POOL, *reversed(budget)]:  # least recent first: the most recent end up newest
            version = targets.get(key, 0)
            with self._lock:
                held = self._held.get(key)
            if version == 0 or held == version:
                if held is not None and version == 0:
                    with self._lock:
                        self._forget(key)
                continue
            fetched += self._fetch(key, held or 0)
        return fetched

    def _check_geometry(self) -> None:
        """Reads the pool's draft geometry and warns about what this decoder's drafts lose
        against it. An RpcError other than UNIMPLEMENTED (a pool without Info) propagates:
        the poll fails and the next one asks again."""
        try:
            advertised = self.stub.Info(pool_pb2.PoolServiceInfoRequest(), timeout=self.timeout_s).geometry
        except grpc.RpcError as exc:
            if not hasattr(exc, "code") or exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise
            log.info("pool service advertises no draft geometry; not checked")
            return
        try:
            pool = DraftGeometry(
                key_length=advertised.key_length, ngram_length=advertised.ngram_length,
                decoding_length=advertised.decoding_length, branch_length=advertised.branch_length)
        except ValueError as exc:
            log.warning("pool service advertises an invalid draft geometry; not checked",
                        extra={"error": str(exc)})
            return
        self.pool_geometry = pool
        self.geometry_problems = pool_mismatches(self.geometry, pool)
        for problem in self.geometry_problems:
            log.warning("draft geometry differs from the pool service's: drafts are shallower",
                        extra={"problem": problem, "pool_key_length": pool.key_length,
                               "pool_ngram_length": pool.ngram_length})

    def _fetch(self, pool_key: str, have_version: int) -> int:
        with self._lock:  # the requests served by this pool since its last fetch
            keys = [k for k in self._askers if k == pool_key or self._resolved.get(k) == pool_key]
            links = [Link(context) for k in keys for context in self._askers.pop(k)]
        # Context(): a root span even if a caller's span is current (tests refresh inline).
        with self.tracer.start_as_current_span("adaccel.decoder.pool_fetch", context=Context(), links=links,
                                               attributes={"adaccel.pool_key": pool_key,
                                                           "adaccel.have_version": have_version}):
            return self._fetch_snapshot(pool_key, have_version)

    def _fetch_snapshot(self, pool_key: str, have_version: int) -> int:
        chunks = self.stub.GetSnapshot(pool_pb2.SnapshotRequest(pool_key=pool_key, have_version=have_version),
                                       timeout=self.timeout_s * 4)
        header, data = join_header_stream(chunks)
        if header is None or header.total_bytes == 0:
            return 0
        if len(data) != header.total_bytes:
            log.warning("truncated pool snapshot ignored", extra={"pool_key": pool_key, "got": len(data),
                                                                 "expected": header.total_bytes})
            return 0
        trie = TokenTrie.from_bytes(data)
        with self._lock:
            self.registry.put(pool_key, trie)
            self._held[pool_key] = header.version
            self._held.move_to_end(pool_key)
            while sum(k != GLOBAL_POOL for k in self._held) > self.max_pools:
                oldest = next(k for k in self._held if k != GLOBAL_POOL)
                self._forget(oldest)
        self.fetches += 1
        log.info("pool snapshot loaded", extra={"pool_key": pool_key, "version": header.version,
                                                "nodes": header.nodes, "bytes": header.total_bytes})
        return 1

    def _forget(self, pool_key: str) -> None:
        """Drops a held snapshot (caller holds self._lock)."""
        self._held.pop(pool_key, None)
        if pool_key == GLOBAL_POOL:
            self.registry.reset_global()
        else:
            self.registry.drop(pool_key)


def wait_for_version(snapshots: PoolSnapshots, pool_key: str, version: int, timeout_s: float) -> bool:
    """Test and benchmark helper: refresh until `pool_key` is held at `version` or newer."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        snapshots.refresh()
        if snapshots.held().get(pool_key, 0) >= version:
            return True
        time.sleep(0.02)
    return False
