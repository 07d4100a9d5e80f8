"""The router's OpenTelemetry instruments: its own queue, which no decoder metric can see.

The router is a synchronous gRPC server, one thread per Generate stream, capped by StreamSlots.
What an autoscaler or an alert needs from it is read at each collection: streams open against
the cap (how close the router is to refusing), streams refused since start (it did refuse), and
per decoder replica what the router has in flight there and what the replica last reported
admitted (where the queue sits, and whether one replica gets the misses).
"""

from __future__ import annotations

from collections.abc import Iterable

from opentelemetry.metrics import CallbackOptions, Meter, Observation


def observe_router(meter: Meter, streams, replicas) -> None:
    """Registers the gauges over `streams` (service.StreamSlots) and `replicas` (ReplicaSet)."""

    def open_streams(_options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(streams.in_use)]

    def stream_limit(_options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(streams.limit)]

    def refused(_options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(streams.refused)]

    def replica_queue(_options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(view.queue_depth, {"replica": view.address, "healthy": view.healthy})
                for view in replicas.views()]

    meter.create_observable_gauge("adaccel.router.streams_open", [open_streams], unit="{stream}",
                                  description="Generate streams the router holds open now")
    meter.create_observable_gauge("adaccel.router.stream_limit", [stream_limit], unit="{stream}",
                                  description="the cap on open streams (max_streams; past it RESOURCE_EXHAUSTED)")
    meter.create_observable_counter("adaccel.router.streams_refused", [refused], unit="{stream}",
                                    description="Generate streams refused at the cap since start")
    meter.create_observable_gauge("adaccel.router.replica_queue_depth", [replica_queue], unit="{request}",
                                  description="per decoder replica: requests in flight from this router or "
                                              "admitted as the replica last reported, whichever is larger")
