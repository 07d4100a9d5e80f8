"""Streams of one header message followed by raw data chunks (kv-store blocks, pool snapshots)."""

from __future__ import annotations

from collections.abc import Iterable


def join_header_stream(chunks: Iterable) -> tuple[object | None, bytes]:
    """(the stream's header or None, its data chunks joined). Each chunk is a message with a
    `header`/`data` oneof; the header may come anywhere, the data keeps its order."""
    header, parts = None, []
    for chunk in chunks:
        if chunk.HasField("header"):
            header = chunk.header
        else:
            parts.append(chunk.data)
    return header, b"".join(parts)
