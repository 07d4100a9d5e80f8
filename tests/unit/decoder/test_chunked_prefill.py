"""Chunked prefill: a long prompt is prefilled a chunk per scheduler turn, between the running
batch's steps, so it neither stalls the running rows nor makes a later short prompt wait for all
of it; outputs stay greedy's."""

from __future__ import annotations

import threading
import time

import pytest

from common.modeling.loading import load_model
from common.prompt_tokens import TokenizedPrompt
from services.decoder.batcher import Batcher, KvAdmission
from services.decoder.engine import BatchSession, DecodingEngine, GenerationConfig
from services.decoder.intake import PreparedRequest


@pytest.fixture(scope="module")
def loaded(tiny_llama_path):
    return load_model(tiny_llama_path)


def prompt(seed: int, length: int) -> list[int]:
    return [(seed * 31 + i * 7) % 200 + 3 for i in range(length)]


@pytest.mark.parametrize("drafting", [False, True])
def test_a_prompt_prefilled_in_chunks_decodes_what_one_prefill_does(loaded, drafting):
    engine = DecodingEngine(loaded.model)
    config = GenerationConfig(max_new_tokens=12, drafting=drafting)
    ids = prompt(1, 150)
    whole = BatchSession(engine)
    whole.add(ids, config)
    expected = [t for step in whole.run() for _, r in step for t in r.token_ids]
    chunked = BatchSession(engine)
    pending = chunked.begin(ids, config)
    sizes = []
    while pending.remaining:
        sizes.append(chunked.advance(pending, 23))
    chunked.finish(pending)
    got = [t for step in chunked.run() for _, r in step for t in r.token_ids]
    assert sizes == [23] * 6 + [12] and got == expected


def test_finish_before_the_prompt_is_cached_is_refused(loaded):
    session = BatchSession(DecodingEngine(loaded.model))
    pending = session.begin(prompt(2, 40), GenerationConfig(max_new_tokens=4))
    session.advance(pending, 10)
    with pytest.raises(ValueError, match="30 prompt tokens left"):
        session.finish(pending)


class Timeline:
    """Reads a ticket on its own thread and stamps each step result."""

    def __init__(self, ticket):
        self.stamps: list[float] = []
        self.tokens: list[int] = []
        self.thread = threading.Thread(target=self._read, args=(ticket,))
        self.thread.start()

    def _read(self, ticket):
        for step in ticket:
            self.stamps.append(time.perf_counter())
            self.tokens.extend(step.token_ids)


def submit(batcher: Batcher, ids: list[int], config: GenerationConfig) -> tuple[object, Timeline]:
    ticket = batcher.admit(len(ids) + config.max_new_tokens + 1)
    batcher.submit(ticket, PreparedRequest(request_id=str(id(ticket)), prompt=TokenizedPrompt(ids, [(0, len(ids))]),
                                           config=config, pool=None, blocks=None, kv_tokens=ticket.tokens))
    return ticket, Timeline(ticket)


def test_a_long_prompt_neither_stalls_running_rows_nor_delays_a_later_short_one(loaded):
    engine = DecodingEngine(loaded.model)
    batcher = Batcher(engine, KvAdmission(budget_bytes=1 << 40, bytes_per_token=1, max_requests=8),
                      max_batch_size=4, prefill_chunk_tokens=16).start()
    try:
        running_config = GenerationConfig(max_new_tokens=200, drafting=False)
        config = GenerationConfig(max_new_tokens=4, drafting=False)
        running_ticket, running = submit(batcher, prompt(3, 20), running_config)
        while not running.stamps:
            time.sleep(0.001)
        long_ids, short_ids = prompt(4, 400), prompt(5, 10)
        long_ticket, long_row = submit(batcher, long_ids, config)
        short_ticket, short_row = submit(batcher, short_ids, config)
        for timeline in (long_row, short_row, running):
            timeline.thread.join(timeout=120)
    finally:
        batcher.stop()
    long_first = long_row.stamps[0]
    # ~25 chunks of 16 tokens: the running row stepped between them, and the short prompt that
    # arrived after the long one got its first token before it.
    assert sum(s < long_first for s in running.stamps) >= 10
    assert short_row.stamps[0] < long_first
    greedy = engine.generate_batch([prompt(3, 20), long_ids, short_ids], [running_config, config, config])
    assert [running.tokens, long_row.tokens, short_row.tokens] == greedy
    for ticket in (running_ticket, long_ticket, short_ticket):
        batcher.close(ticket)


def test_prefill_tokens_pending_counts_waiting_prompts_and_the_rest_of_those_in_prefill(loaded):
    """What the replica reports to the router as queued prefill work (DecoderReport)."""
    engine = DecodingEngine(loaded.model)
    batcher = Batcher(engine, KvAdmission(budget_bytes=1 << 40, bytes_per_token=1, max_requests=8),
                      max_batch_size=4, prefill_chunk_tokens=16)
    config = GenerationConfig(max_new_tokens=4, drafting=False)
    assert batcher.prefill_tokens_pending == 0
    long_ticket, long_row = submit(batcher, prompt(6, 400), config)  # not started: both wait
    short_ticket, short_row = submit(batcher, prompt(7, 10), config)
    assert batcher.prefill_tokens_pending == 410
    samples = []
    batcher.start()
    try:
        while not (long_row.stamps and short_row.stamps):
            samples.append(batcher.prefill_tokens_pending)
            time.sleep(0.0005)
        samples.append(batcher.prefill_tokens_pending)
        for timeline in (long_row, short_row):
            timeline.thread.join(timeout=120)
    finally:
        batcher.stop()
    # Work only drains (nothing new arrives), a chunk at a time, to nothing once both prefilled.
    assert samples == sorted(samples, reverse=True) and samples[0] <= 410 and samples[-1] == 0, samples
    for ticket in (long_ticket, short_ticket):
        batcher.close(ticket)
