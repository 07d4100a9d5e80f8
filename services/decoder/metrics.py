"""The decoder's OpenTelemetry instruments, with units and stable names.

Per-request figures are recorded once, when the request finishes (from its GenerationStats);
load is observed (gauges read when an exporter collects). Attribute `mode` is the verification
the request's steps used (strict / relaxed / sampling), so every rate can be read by mode.

Two views of drafting:
- acceptance rate: accepted draft tokens / draft tokens proposed (how much of the trees survives);
  `accepted_draft_tokens` / `draft_tokens` give the same ratio summed over requests.
- pool hit rate: steps whose draft had at least one accepted token / decode steps of requests that
  drafted (how often the pool, with the prompt's own n-grams, knew the continuation at all).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from opentelemetry.metrics import CallbackOptions, Counter, Histogram, Meter, Observation

from adaccel.v1 import common_pb2
from common.generation_stats import accepted_drafts
from common.telemetry import LATENCY_BUCKETS_S, RATIO_BUCKETS, TOKEN_COUNT_BUCKETS


def verification_mode(params) -> str:
    """The verification a request's steps used: `sampling` at a temperature, else its mode
    (`strict` unless relaxed; unspecified means strict)."""
    if params.sampling.temperature > 0:
        return "sampling"
    return "relaxed" if params.mode == common_pb2.VERIFICATION_MODE_RELAXED else "strict"


@dataclass(slots=True)
class DecoderMetrics:
    meter: Meter
    requests: Counter
    new_tokens: Counter
    prompt_tokens: Counter
    cached_prompt_tokens: Counter
    draft_tokens: Counter
    accepted_draft_tokens: Counter
    ttft: Histogram
    time_per_output_token: Histogram
    accepted_per_step: Histogram
    acceptance_rate: Histogram
    pool_hit_rate: Histogram
    kv_block_hit_rate: Histogram

    @classmethod
    def create(cls, meter: Meter) -> DecoderMetrics:
        return cls(
            meter=meter,
            requests=meter.create_counter("adaccel.decoder.requests", unit="{request}",
                                          description="generation requests finished"),
            new_tokens=meter.create_counter("adaccel.decoder.new_tokens", unit="{token}",
                                            description="tokens generated"),
            prompt_tokens=meter.create_counter("adaccel.decoder.prompt_tokens", unit="{token}",
                                               description="prompt tokens of finished requests"),
            cached_prompt_tokens=meter.create_counter(
                "adaccel.decoder.cached_prompt_tokens", unit="{token}",
                description="prompt tokens whose KV came from a block cache (not prefilled)"),
            draft_tokens=meter.create_counter("adaccel.decoder.draft_tokens", unit="{token}",
                                              description="draft tokens proposed to verification"),
            accepted_draft_tokens=meter.create_counter(
                "adaccel.decoder.accepted_draft_tokens", unit="{token}",
                description="draft tokens accepted by verification"),
            ttft=meter.create_histogram("adaccel.decoder.ttft", unit="s",
                                        description="time from request arrival to first token",
                                        explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_S),
            time_per_output_token=meter.create_histogram(
                "adaccel.decoder.time_per_output_token", unit="s",
                description="decode time per generated token after the first",
                explicit_bucket_boundaries_advisory=LATENCY_BUCKETS_S),
            accepted_per_step=meter.create_histogram(
                "adaccel.decoder.tokens_per_step", unit="{token}",
                description="tokens emitted per verification step (accepted drafts + the bonus token)",
                explicit_bucket_boundaries_advisory=TOKEN_COUNT_BUCKETS),
            acceptance_rate=meter.create_histogram(
                "adaccel.decoder.acceptance_rate", unit="1",
                description="per request: accepted draft tokens / draft tokens proposed",
                explicit_bucket_boundaries_advisory=RATIO_BUCKETS),
            pool_hit_rate=meter.create_histogram(
                "adaccel.decoder.pool_hit_rate", unit="1",
                description="per request: steps with an accepted draft token / decode steps (drafting on)",
                explicit_bucket_boundaries_advisory=RATIO_BUCKETS),
            kv_block_hit_rate=meter.create_histogram(
                "adaccel.decoder.kv_block_hit_rate", unit="1",
                description="per request: prompt tokens with cached KV / prompt tokens",
                explicit_bucket_boundaries_advisory=RATIO_BUCKETS),
        )

    def observe_load(self, *, queue_depth: Callable[[], int], tokens_in_flight: Callable[[], int],
                     batch_size: Callable[[], int]) -> None:
        """Gauges read at each collection: requests admitted (running + waiting), their token
        budget, and the rows of the running batch."""

        def gauge(read: Callable[[], int]) -> Callable[[CallbackOptions], Iterable[Observation]]:
            return lambda _options: [Observation(read())]

        self.meter.create_observable_gauge("adaccel.decoder.queue_depth", [gauge(queue_depth)],
                                           unit="{request}", description="requests admitted: running and waiting")
        self.meter.create_observable_gauge("adaccel.decoder.tokens_in_flight", [gauge(tokens_in_flight)],
                                           unit="{token}",
                                           description="prompt + max_new_tokens of the requests admitted")
        self.meter.create_observable_gauge("adaccel.decoder.batch_size", [gauge(batch_size)],
                                           unit="{request}",
                                           description="requests decoding together in the running batch")

    def observe_block_cache(self, cache) -> None:
        """Counters of the block cache (services/decoder/block_cache.py), read at each collection:
        blocks by where their KV came from (prefix: exact KV kept by prefix caching), blocks
        published (computed standalone and stored) or dropped from a full publish queue, kv-store
        call errors, and the assembly mode in force, 1 on the mode the accuracy gate left (the
        configured one, or "full" when it said no)."""

        def blocks(_options: CallbackOptions) -> Iterable[Observation]:
            counters = cache.counters
            return [Observation(counters.prefix_hits, {"source": "prefix"}),
                    Observation(counters.local_hits, {"source": "local"}),
                    Observation(counters.store_hits, {"source": "kvstore"}),
                    Observation(counters.misses, {"source": "computed"}),
                    Observation(counters.rejected, {"source": "rejected"})]

        def publishing(_options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(cache.publisher.published, {"outcome": "published"}),
                    Observation(cache.publisher.dropped, {"outcome": "dropped"})]

        def store_errors(_options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(cache.store.errors if cache.store is not None else 0)]

        def mode(_options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(1, {"mode": cache.mode})]

        self.meter.create_observable_counter("adaccel.decoder.kv_blocks", [blocks], unit="{block}",
                                             description="prompt blocks looked up, by where their KV came from")
        self.meter.create_observable_counter("adaccel.decoder.kv_blocks_published", [publishing], unit="{block}",
                                             description="blocks computed standalone and stored, or dropped")
        self.meter.create_observable_counter("adaccel.decoder.kvstore_errors", [store_errors], unit="{call}",
                                             description="kv-store calls that failed")
        self.meter.create_observable_gauge("adaccel.decoder.block_reuse_mode", [mode], unit="1",
                                           description="1 on the assembly mode served (\"full\" when the "
                                                       "accuracy gate turned reuse off)")

    def record(self, stats, mode: str, *, drafting: bool = True) -> None:
        attrs = {"mode": mode}
        self.requests.add(1, attrs)
        self.new_tokens.add(stats.new_tokens, attrs)
        self.ttft.record(stats.ttft_s, attrs)
        if stats.new_tokens > 1:
            self.time_per_output_token.record((stats.total_s - stats.ttft_s) / (stats.new_tokens - 1), attrs)
        for accepted in stats.accepted_per_step:
            self.accepted_per_step.record(accepted, attrs)
        if stats.prompt_tokens > 0:
            self.prompt_tokens.add(stats.prompt_tokens, attrs)
            self.cached_prompt_tokens.add(stats.cached_prompt_tokens, attrs)
            self.kv_block_hit_rate.record(stats.cached_prompt_tokens / stats.prompt_tokens, attrs)
        drafted = sum(stats.drafted_per_step)
        accepted = accepted_drafts(stats)
        self.draft_tokens.add(drafted, attrs)
        self.accepted_draft_tokens.add(sum(accepted), attrs)
        if drafted > 0:
            self.acceptance_rate.record(sum(accepted) / drafted, attrs)
        if drafting and accepted:
            self.pool_hit_rate.record(sum(1 for a in accepted if a > 0) / len(accepted), attrs)
