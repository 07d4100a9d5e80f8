"""Continuous batching: one scheduler thread owns the model; requests join between steps.

Each Generate call is admitted first (KvAdmission: a KV-memory budget and a bound on admitted
requests; over either -> RESOURCE_EXHAUSTED with a retry hint, never an unbounded queue), then
hands its PreparedRequest (services/decoder/intake.py) to the Batcher and reads its step
results from its Ticket's queue. The scheduler thread is the only one that runs the model: it
assembles reused block KV (BlockCache.assemble) and prefills the waiting requests (up to
max_batch_size rows), keeps each prefilled prompt's exact block KV for prefix caching
(BlockCache.remember), appends them to the running batch (engine.BatchSession), drops rows
whose caller went away, runs one shared verification forward, routes each row's StepResult to
its ticket, and computes queued blocks for publishing (BlockPublisher.compute): one per turn of
the loop while no row runs (a request that arrives waits for at most one block), and while rows
run one every `publish_every_steps` steps, so a decoder that is never idle still publishes (0:
only while idle). bench/publish_schedule.py on SmolLM2-135M (2 CPU threads, 5 missed blocks):
running requests decoded at 0.84x and 1.02x of idle-only publishing in two runs with a block
after every step, 1.07x with one per 16 steps; the arrivals' TTFT and the time to publish
everything moved within noise. The default, one block per 16 steps, bounds what publishing can
take from decoding while still making progress on a decoder that is never idle.

Chunked prefill (prefill_chunk_tokens per turn, default 256): a prompt is prefilled a chunk per
turn of the loop, between the running batch's steps, oldest first for a quarter of the budget and
then shortest remaining first. Whole-prompt prefill was the load bench's "12-second stall": a
2,500-token generative-recommendation prompt takes ~11 s to prefill on one CPU thread with
SmolLM2-135M, and while it ran no running row stepped and every arrival waited behind it.

KV need of a request = (prompt + max_new_tokens + its own draft tree + root) tokens x
kv_bytes_per_token (PreparedRequest.kv_tokens); the budget counts each request's own tokens. Rows of a batch share one padded cache, so the
real footprint can be larger by the holes; the engine compacts once holes pass its threshold
(EngineSettings.compact_hole_fraction), which bounds the padding to that share of the cache.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from common.rpc.errors import InvalidArgument, Reason, ResourceExhausted, ServiceError
from services.decoder.block_cache import BlockCache, PreparedPrompt
from services.decoder.engine import BatchSession, DecodingEngine, PendingPrefill, StepResult
from services.decoder.intake import PreparedRequest

log = logging.getLogger(__name__)


def kv_values_per_token(config) -> int:
    """KV values one token takes in the cache: layers x (K and V) x kv heads x head dim."""
    config = config.get_text_config(decoder=True)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers * 2 * kv_heads * head_dim


def kv_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of KV one token takes in the model's cache (its dtype)."""
    return kv_values_per_token(model.config) * model.dtype.itemsize


class KvAdmission:
    """Admitted requests (running + waiting) and the KV bytes they will need, both bounded."""

    def __init__(self, *, budget_bytes: int, bytes_per_token: int, max_requests: int):
        self.budget_bytes = budget_bytes
        self.bytes_per_token = bytes_per_token
        self.max_requests = max_requests
        self._lock = threading.Lock()
        self.active = 0
        self.tokens_in_flight = 0
        self.reserved_bytes = 0

    def need_bytes(self, tokens: int) -> int:
        return tokens * self.bytes_per_token

    def enter(self, tokens: int, retry_after_ms: int) -> None:
        need = self.need_bytes(tokens)
        if need > self.budget_bytes:
            raise ResourceExhausted(
                f"request needs {need} bytes of KV ({tokens} tokens), more than this decoder's whole budget "
                f"of {self.budget_bytes} bytes; shorten the prompt or max_new_tokens",
                reason=Reason.KV_REQUEST_TOO_LARGE, limit=self.budget_bytes)
        with self._lock:
            if self.active >= self.max_requests:
                raise ResourceExhausted(
                    f"decoder busy: {self.active} requests admitted, limit {self.max_requests}; "
                    f"retry after ~{retry_after_ms} ms", retry_after_ms=retry_after_ms,
                    reason=Reason.DECODER_BUSY, limit=self.max_requests)
            if self.reserved_bytes + need > self.budget_bytes:
                raise ResourceExhausted(
                    f"decoder KV budget full: {self.reserved_bytes} of {self.budget_bytes} bytes reserved, this "
                    f"request needs {need}; retry after ~{retry_after_ms} ms", retry_after_ms=retry_after_ms,
                    reason=Reason.KV_BUDGET, limit=self.budget_bytes)
            self.active += 1
            self.tokens_in_flight += tokens
            self.reserved_bytes += need

    def leave(self, tokens: int) -> None:
        with self._lock:
            self.active -= 1
            self.tokens_in_flight -= tokens
            self.reserved_bytes -= self.need_bytes(tokens)


_END = object()


@dataclass(frozen=True, slots=True)
class PrefillStats:
    """How the prompt's KV was made: cached_tokens came from reused blocks (recomputed_tokens of
    them recomputed by the correction), the rest were computed; queue_s waited for the model
    thread after submit, prefill_s assembled and prefilled (seconds)."""

    cached_tokens: int = 0
    recomputed_tokens: int = 0
    queue_s: float = 0.0
    prefill_s: float = 0.0


@dataclass(eq=False)
class Ticket:
    """One admitted request as its Generate call sees it: iterate for its StepResults.

    The caller sets `request` once (submit); the scheduler thread sets `prefill` before it
    queues the first result, and `handle` while the row runs."""

    tokens: int  # admitted KV tokens (released once, on close)
    request: PreparedRequest | None = None
    prefill: PrefillStats = PrefillStats()
    results: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    handle: object = None  # the engine's row, once joined
    closed: bool = False
    submitted_at: float = 0.0  # perf_counter() at submit: the queue wait starts

    def __iter__(self) -> Iterator[StepResult]:
        while True:
            item = self.results.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def cancel(self) -> None:
        """The caller went away (or its deadline passed): stop decoding it and wake its reader."""
        self.cancelled.set()
        self.results.put(_END)


class Batcher:
    def __init__(self, engine: DecodingEngine, admission: KvAdmission, *, max_batch_size: int,
                 block_cache: BlockCache | None = None, publish_every_steps: int = 16,
                 prefill_chunk_tokens: int = 256):
        self.engine = engine
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.admission = admission
        self.max_batch_size = max_batch_size
        self.block_cache = block_cache
        self.publish_every_steps = publish_every_steps
        self._steps_since_publish = 0
        self.session = BatchSession(engine)
        self._waiting: deque[Ticket] = deque()
        self._running: dict[int, Ticket] = {}  # id(engine row) -> ticket
        self._prefilling: list[tuple[Ticket, PendingPrefill, float]] = []  # (ticket, its prefill, begun at), oldest first
        self._wake = threading.Condition()
        self._stopped = False
        self._step_s = 0.05  # moving average of a step's seconds (retry hints)
        self._thread = threading.Thread(target=self._loop, name="batcher", daemon=True)

    # ------------------------------------------------------------------ caller side
    def admit(self, kv_tokens: int) -> Ticket:
        """Reserves a request's KV tokens (PreparedRequest.kv_tokens) or raises RESOURCE_EXHAUSTED."""
        self.admission.enter(kv_tokens, self.retry_after_ms())
        return Ticket(kv_tokens)

    def submit(self, ticket: Ticket, request: PreparedRequest) -> None:
        ticket.request = request
        ticket.submitted_at = time.perf_counter()
        with self._wake:
            if self._stopped:
                raise ServiceError("decoder is shutting down")
            self._waiting.append(ticket)
            self._wake.notify()

    def close(self, ticket: Ticket) -> None:
        """Releases the ticket's admission (idempotent); cancels it if it is still decoding."""
        if ticket.closed:
            return
        ticket.closed = True
        ticket.cancel()
        self.admission.leave(ticket.tokens)

    def retry_after_ms(self) -> int:
        """When capacity is likely free again: the running row closest to done, at one token per step
        (an upper bound: drafts finish rows sooner)."""
        rooms = [t.handle.room for t in list(self._running.values()) if t.handle is not None]
        steps = min(rooms) if rooms else 1
        return max(50, int(1000 * self._step_s * steps))

    @property
    def rows(self) -> int:
        return self.session.rows

    @property
    def prefill_tokens_pending(self) -> int:
        """Prompt tokens admitted and not prefilled yet: every waiting prompt (its reused blocks are
        not known before assembly) and the rest of those in prefill. What a new request waits
        behind before its first token; the router weighs it (services/router/scheduling.py)."""
        with self._wake:
            waiting = sum(len(t.request.prompt_ids) for t in self._waiting)
        return waiting + sum(p.remaining for _, p, _ in list(self._prefilling))

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Batcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify()
        self._thread.join(timeout=10)
        for ticket in [*self._waiting, *(t for t, _, _ in self._prefilling), *self._running.values()]:
            ticket.results.put(ServiceError("decoder stopped while generating"))

    # ------------------------------------------------------------------ scheduler thread
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not (self._stopped or self._waiting or self.session.rows or self._prefilling
                           or self._blocks_queued()):
                    self._wake.wait()
                if self._stopped:
                    return
                joining = []
                while self._waiting and self.session.rows + len(self._prefilling) + len(joining) < self.max_batch_size:
                    joining.append(self._waiting.popleft())
            for ticket in joining:
                self._begin(ticket)
            self._advance_prefills()
            self._drop_cancelled()
            if self.session.rows:
                self._step()
                self._steps_since_publish += 1
                if self.publish_every_steps and self._steps_since_publish >= self.publish_every_steps:
                    self._publish_blocks(1)
            else:
                self._publish_blocks(1)

    def _blocks_queued(self) -> int:
        return self.block_cache.publisher.queued if self.block_cache is not None else 0

    def _publish_blocks(self, count: int) -> None:
        if self.block_cache is not None and count > 0:
            self._steps_since_publish = 0
            self.block_cache.publisher.compute(count)

    def _start(self, request: PreparedRequest) -> PreparedPrompt:
        """The request's reused block KV assembled into its starting cache (model forwards)."""
        if self.block_cache is None:
            return PreparedPrompt.uncached(request.prompt_ids)
        return self.block_cache.assemble(request.blocks, request.prompt_ids)

    def _begin(self, ticket: Ticket) -> None:
        """Starts a request's prefill: reused block KV assembled, nothing of the rest computed yet."""
        if ticket.cancelled.is_set():
            return
        request = ticket.request
        begun = time.perf_counter()
        try:
            start = self._start(request)
            pending = self.session.begin(request.prompt_ids, request.config, request.pool,
                                         past_key_values=start.past_key_values)
        except ValueError as exc:  # prompt ids outside the vocabulary, a cache of the wrong shape
            ticket.results.put(InvalidArgument(f"blocks: {exc}"))
            return
        except Exception as exc:  # noqa: BLE001 - reported to that caller; the batch goes on
            log.exception("prefill failed")
            ticket.results.put(exc)
            return
        ticket.prefill = PrefillStats(start.cached_tokens, start.recomputed_tokens, queue_s=begun - ticket.submitted_at)
        self._prefilling.append((ticket, pending, begun))

    def _prefill_order(self) -> list[tuple[Ticket, PendingPrefill, float]]:
        """Who gets this turn's prefill tokens first: the oldest prefill (so a long prompt always
        progresses), then the shortest remaining (a short prompt behind a long one joins within
        a turn instead of waiting for all of it)."""
        oldest, *others = self._prefilling
        return [oldest, *sorted(others, key=lambda entry: entry[1].remaining)]

    def _advance_prefills(self) -> None:
        """Spends at most prefill_chunk_tokens of prefill this turn (chunked prefill: the running
        rows' next step waits for one chunk, not for a whole long prompt; 0 = no bound), then
        appends every finished prefill's row. The oldest prefill gets up to a quarter of the
        budget when others wait (it progresses, at worst 4x slower), the rest goes shortest first,
        then back to the oldest."""
        if not self._prefilling:
            return
        budget = self.prefill_chunk_tokens or sum(p.remaining for _, p, _ in self._prefilling)
        order = self._prefill_order()
        shares = [max(1, budget // 4) if len(order) > 1 else budget] + [budget] * (len(order) - 1)
        left = budget
        for (ticket, pending, _), share in [*zip(order, shares), (order[0], budget)]:
            if left <= 0:
                break
            if ticket.cancelled.is_set() or pending.remaining == 0:
                continue
            try:
                left -= self.session.advance(pending, min(share, left))
            except Exception as exc:  # noqa: BLE001 - reported to that caller; the batch goes on
                log.exception("prefill failed")
                ticket.results.put(exc)
                ticket.cancelled.set()
        finished = [entry for entry in self._prefilling if entry[1].remaining == 0 or entry[0].cancelled.is_set()]
        self._prefilling = [entry for entry in self._prefilling if entry not in finished]
        for ticket, pending, begun in finished:
            if ticket.cancelled.is_set():
                continue
            self._remember_prefix(ticket.request, pending)
            try:
                handle = self.session.finish(pending)
            except Exception as exc:  # noqa: BLE001
                log.exception("prefill failed")
                ticket.results.put(exc)
                continue
            ticket.prefill = PrefillStats(ticket.prefill.cached_tokens, ticket.prefill.recomputed_tokens,
                                          queue_s=ticket.prefill.queue_s, prefill_s=time.perf_counter() - begun)
            for _, first in self.session.take_first():  # the prefill's own token: streamed now
                ticket.results.put(first)
            if handle.done:  # nothing (more) to generate
                ticket.results.put(_END)
                continue
            ticket.handle = handle
            self._running[id(handle)] = ticket

    def _remember_prefix(self, request: PreparedRequest, pending: PendingPrefill) -> None:
        """Prefix caching: the prefilled blocks' exact KV kept before the row joins the batch."""
        if self.block_cache is None or pending.request.done:
            return
        try:
            self.block_cache.remember(request.blocks, pending.cache, pending.computed)
        except Exception:  # noqa: BLE001 - a cache that cannot keep a prefix costs later prefills, not this request
            log.exception("keeping a prefilled prefix failed")

    def _drop_cancelled(self) -> None:
        for key, ticket in list(self._running.items()):
            if ticket.cancelled.is_set():
                self.session.remove(ticket.handle)
                del self._running[key]

    def _step(self) -> None:
        started = time.perf_counter()
        try:
            results = self.session.step()
        except Exception as exc:  # noqa: BLE001 - a broken batch fails its rows, not the decoder
            log.exception("batch step failed", extra={"rows": self.session.rows})
            for ticket in self._running.values():
                ticket.results.put(exc)
            self._running.clear()
            self.session = BatchSession(self.engine)
            return
        self._step_s = 0.8 * self._step_s + 0.2 * (time.perf_counter() - started)
        for handle, result in results:
            ticket = self._running.get(id(handle))
            if ticket is None:
                continue
            ticket.results.put(result)
            if handle.done:
                ticket.results.put(_END)
                del self._running[id(handle)]
