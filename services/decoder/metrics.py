"""The decoder's OpenTelemetry instruments, with units and stable names."""

from __future__ import annotations

from dataclasses import dataclass

from opentelemetry.metrics import Counter, Histogram, Meter


@dataclass(slots=True)
class DecoderMetrics:
    requests: Counter
    new_tokens: Counter
    ttft: Histogram
    time_per_output_token: Histogram
    accepted_per_step: Histogram

    @classmethod
    def create(cls, meter: Meter) -> DecoderMetrics:
        return cls(
            requests=meter.create_counter("adaccel.decoder.requests", unit="{request}",
                                          description="generation requests finished"),
            new_tokens=meter.create_counter("adaccel.decoder.new_tokens", unit="{token}",
                                            description="tokens generated"),
            ttft=meter.create_histogram("adaccel.decoder.ttft", unit="s",
                                        description="time from request arrival to first token"),
            time_per_output_token=meter.create_histogram("adaccel.decoder.time_per_output_token", unit="s",
                                                         description="decode time per generated token"),
            accepted_per_step=meter.create_histogram("adaccel.decoder.tokens_per_step", unit="{token}",
                                                     description="tokens accepted per verification step"),
        )

    def record(self, stats, mode: str) -> None:
        attrs = {"mode": mode}
        self.requests.add(1, attrs)
        self.new_tokens.add(stats.new_tokens, attrs)
        self.ttft.record(stats.ttft_s, attrs)
        if stats.new_tokens > 1:
            self.time_per_output_token.record((stats.total_s - stats.ttft_s) / (stats.new_tokens - 1), attrs)
        for accepted in stats.accepted_per_step:
            self.accepted_per_step.record(accepted, attrs)
