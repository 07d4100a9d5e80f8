"""Structured logging: one JSON object per line on stderr, with the service name and, for a line
logged inside a span, the span's `trace_id` (32 hex), `span_id` (16 hex) and `trace_sampled`, so a
log line leads to its trace and back. Lines outside any span carry none of the three.

The ids come from opentelemetry-instrumentation-logging: its record factory puts the current span's
context on every log record (`otelTraceID`, `otelSpanID`, `otelTraceSampled`, "0" outside a span);
`JsonLineFormatter` writes them under our names, or leaves them out.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from opentelemetry.instrumentation.logging import LoggingInstrumentor
from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

# Record attributes of the logging instrumentation -> JSON keys (otelServiceName is left out: the
# line has `service` already).
TRACE_FIELDS = {"otelTraceID": "trace_id", "otelSpanID": "span_id", "otelTraceSampled": "trace_sampled"}
_OTEL_ATTRS = (*TRACE_FIELDS, "otelServiceName")


def inject_trace_context() -> None:
    """Puts the current span's ids on every log record from now on (process-wide, once). Only the
    record factory: the instrumentation's own OpenTelemetry log handler stays off."""
    instrumentor = LoggingInstrumentor()
    if not instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.instrument(inject_trace_context=True, enable_log_auto_instrumentation=False)


class JsonLineFormatter(JsonFormatter):
    """JsonFormatter plus the record's trace context (`TRACE_FIELDS`) when it was logged in a span."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("reserved_attrs", (*RESERVED_ATTRS, *_OTEL_ATTRS))
        super().__init__(*args, **kwargs)

    def add_fields(self, log_data: dict[str, Any], record: logging.LogRecord,
                   message_dict: dict[str, Any]) -> None:
        super().add_fields(log_data, record, message_dict)
        trace_id = getattr(record, "otelTraceID", "0")
        if trace_id and trace_id != "0":
            for attr, key in TRACE_FIELDS.items():
                log_data[key] = getattr(record, attr, None)


def json_formatter(service: str) -> JsonLineFormatter:
    return JsonLineFormatter(
        "%(asctime)s %(levelname)s %(name)s %(message)s",
        rename_fields={"levelname": "level", "asctime": "time"},
        static_fields={"service": service},
    )


def configure_logging(service: str, level: str = "INFO", json_lines: bool = True) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if json_lines:
        inject_trace_context()
        handler.setFormatter(json_formatter(service))
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Third-party chatter at INFO drowns the service's own lines.
    for noisy in ("kafka", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
