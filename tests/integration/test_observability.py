"""One request through the real services (in-process, loopback, real broker and RocksDB) yields one
connected trace router -> decoder -> kv-store lookup, Kafka publish -> pool updater -> RocksDB write,
the metric set with its units, and a Prometheus endpoint serving it."""

from __future__ import annotations

import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator

import grpc
import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from adaccel.v1 import common_pb2, decoder_pb2, decoder_pb2_grpc, router_pb2_grpc
from common.broker import free_port
from common.rpc.channels import health_status
from common.telemetry import Telemetry, setup_telemetry
from services.decoder.server import SERVICE_NAME as DECODER_SERVICE
from services.decoder.server import create_decoder_server
from services.decoder.settings import DecoderSettings
from services.kvstore.server import SERVICE_NAME as KV_SERVICE
from services.kvstore.server import create_kvstore_server
from services.kvstore.settings import KvStoreSettings
from services.pool.server import SERVICE_NAME as POOL_SERVICE
from services.pool.server import create_pool_server
from services.pool.settings import PoolSettings
from services.router.server import SERVICE_NAME as ROUTER_SERVICE
from services.router.server import create_router_server
from services.router.settings import RouterSettings

POOL_KEY = "shop/audio"


def wait_until(condition: Callable[[], object], timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while not (result := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return result


class Services:
    """Pool, decoder and router in this process, each with its own providers, all spans into one
    in-memory exporter, one in-memory metric reader per service."""

    def __init__(self):
        self.spans = InMemorySpanExporter()
        self.readers = {name: InMemoryMetricReader() for name in ("pool", "kvstore", "decoder", "router")}
        self.telemetry: dict[str, Telemetry] = {}
        self.handles = []
        self.topic = f"gen-{uuid.uuid4().hex[:8]}"  # the broker is shared by the session: a topic per test

    def start(self, tmp_path, bootstrap: str, model_path) -> None:
        common = dict(data_dir=tmp_path, telemetry_exporter="none")
        kafka = dict(kafka_bootstrap=bootstrap, kafka_generated_topic=self.topic,
                     kafka_dead_letter_topic=f"{self.topic}-dlq")
        self.pool = self._start("pool", create_pool_server, PoolSettings(
            **common, **kafka, ngram_length=4), POOL_SERVICE)
        self.kvstore = self._start("kvstore", create_kvstore_server, KvStoreSettings(**common), KV_SERVICE)
        self.decoder = self._start("decoder", create_decoder_server, DecoderSettings(
            **common, **kafka, model_path=model_path, pool_addr=self.pool.address, pool_refresh_s=0.1,
            decoding_length=8, branch_length=3, metrics_port=free_port(), kvstore_addrs=[self.kvstore.address],
            reuse_gate_prompts=0), DECODER_SERVICE)
        self.router = self._start("router", create_router_server, RouterSettings(
            **common, decoder_addrs=[self.decoder.address], heartbeat_s=0.2), ROUTER_SERVICE)

    def _start(self, name, create, settings, service_name):
        telemetry = setup_telemetry(name, settings, install_global=False,
                                    span_processors=[SimpleSpanProcessor(self.spans)],
                                    metric_readers=[self.readers[name]])
        self.telemetry[name] = telemetry
        handle = create(settings, telemetry)
        self.handles.append((handle, service_name))
        return handle

    def wait_serving(self, channel_to) -> None:
        for handle, name in self.handles:
            channel = channel_to(handle.address)
            wait_until(lambda: health_status(channel, name) == "SERVING", 30, f"{name} SERVING")

    def stop(self) -> None:
        for handle, _ in reversed(self.handles):
            handle.stop(0)
        for telemetry in self.telemetry.values():
            telemetry.shutdown()


@pytest.fixture
def services(tmp_path, broker, tiny_llama_path, one_torch_thread, channel_to) -> Iterator[Services]:
    running = Services()
    try:
        running.start(tmp_path, broker.bootstrap, tiny_llama_path)
        running.wait_serving(channel_to)
        yield running
    finally:
        running.stop()


def generate(stub, *, block_reuse: bool = True) -> common_pb2.GenerationSummary:
    request = common_pb2.GenerateRequest(
        pool_key=POOL_KEY, publish=True,
        blocks=[common_pb2.PromptBlock(id="i", kind=common_pb2.BLOCK_KIND_INSTRUCTION,
                                       text="Write the selling points of this item.\n"),
                common_pb2.PromptBlock(id="item-42", kind=common_pb2.BLOCK_KIND_ITEM,
                                       text="Aurora headphones, wireless, 30 h battery.\n"),
                common_pb2.PromptBlock(id="q", kind=common_pb2.BLOCK_KIND_TEXT, text="Selling points:\n")],
        params=common_pb2.GenerationParams(
            max_new_tokens=24, advanced=common_pb2.AdvancedParams(disable_block_reuse=not block_reuse)))
    return list(stub.Generate(request, timeout=60))[-1].summary


def one(spans: list[ReadableSpan], name: str, kind: SpanKind) -> ReadableSpan:
    found = [s for s in spans if s.name == name and s.kind == kind]
    assert len(found) == 1, f"{name} ({kind.name}): {len(found)} spans in {[s.name for s in spans]}"
    return found[0]


def metric_units(reader: InMemoryMetricReader) -> dict[str, tuple[str, list]]:
    """name -> (unit, data points) of everything the reader collected."""
    found = {}
    for resource_metrics in reader.get_metrics_data().resource_metrics:
        for scope in resource_metrics.scope_metrics:
            for metric in scope.metrics:
                found[metric.name] = (metric.unit, list(metric.data.data_points))
    return found


def test_a_request_is_one_trace_across_services_and_kafka(services, channel_to):
    router = router_pb2_grpc.RouterStub(channel_to(services.router.address))
    cold = generate(router)
    assert cold.stats.new_tokens > 0

    # The generation comes back through Kafka into the pool, and the decoder fetches the pool.
    def consumed():
        return [s for s in services.spans.get_finished_spans() if s.name == f"process {services.topic}"]

    wait_until(consumed, 30, "the pool updater to consume the generated record")
    decoder_stub = decoder_pb2_grpc.DecoderStub(channel_to(services.decoder.address))
    wait_until(lambda: POOL_KEY in decoder_stub.Report(decoder_pb2.DecoderReportRequest(), timeout=5).pool_keys,
               15, "the decoder to fetch the pool")
    spans = list(services.spans.get_finished_spans())

    edge = one(spans, "/adaccel.v1.Router/Generate", SpanKind.SERVER)
    trace_id = edge.context.trace_id
    in_trace = [s for s in spans if s.context.trace_id == trace_id]
    to_decoder = one(in_trace, "/adaccel.v1.Decoder/Generate", SpanKind.CLIENT)
    decoder = one(in_trace, "/adaccel.v1.Decoder/Generate", SpanKind.SERVER)
    publish = one(in_trace, f"send {services.topic}", SpanKind.PRODUCER)
    process = one(in_trace, f"process {services.topic}", SpanKind.CONSUMER)
    write = one(in_trace, "adaccel.pool.apply", SpanKind.INTERNAL)
    chain = [edge, to_decoder, decoder, publish, process, write]
    assert edge.parent is None  # the caller sent no context: the router starts the trace
    for parent, child in zip(chain, chain[1:]):
        assert child.parent.span_id == parent.context.span_id, f"{child.name} is not under {parent.name}"
    assert [s.resource.attributes["service.name"] for s in chain] == [
        "adaccel-router", "adaccel-router", "adaccel-decoder", "adaccel-decoder", "adaccel-pool", "adaccel-pool"]
    assert process.attributes["messaging.destination.name"] == services.topic
    assert process.attributes["adaccel.outcome"] == "applied"
    # The decoder's kv-store lookup for the prompt blocks, on the request's path.
    lookup = [s for s in in_trace if s.name == "/adaccel.v1.KvStore/Contains" and s.kind == SpanKind.CLIENT]
    assert lookup and lookup[0].parent.span_id == decoder.context.span_id
    served = one(in_trace, "/adaccel.v1.KvStore/Contains", SpanKind.SERVER)
    assert served.parent.span_id == lookup[0].context.span_id
    assert served.resource.attributes["service.name"] == "adaccel-kvstore"
    known = {s.context.span_id for s in in_trace}
    assert all(s.parent is None or s.parent.span_id in known for s in in_trace), "a span's parent is missing"

    # The pool fetch is its own trace, linked to the request that asked for the pool.
    fetches = [s for s in spans if s.name == "adaccel.decoder.pool_fetch"
               and s.attributes["adaccel.pool_key"] == POOL_KEY]
    assert fetches and fetches[0].context.trace_id != trace_id
    assert decoder.context.span_id in {link.context.span_id for link in fetches[0].links}
    fetch_rpc = [s for s in spans if s.name == "/adaccel.v1.Pool/GetSnapshot" and s.kind == SpanKind.CLIENT
                 and s.parent is not None and s.parent.span_id == fetches[0].context.span_id]
    assert fetch_rpc, "GetSnapshot is not a child of the fetch"
    # Polls on a timer are not traced (they would bury the requests).
    polled = {"/adaccel.v1.Decoder/Report", "/adaccel.v1.Pool/GetVersions", "/grpc.health.v1.Health/Check"}
    assert not [s.name for s in spans if s.name in polled]


def test_the_metric_set_has_units_and_a_prometheus_endpoint(services, channel_to):
    router = router_pb2_grpc.RouterStub(channel_to(services.router.address))
    decoder_stub = decoder_pb2_grpc.DecoderStub(channel_to(services.decoder.address))
    # Full prefill both times (reused block KV is approximate): the same text, so the warm request
    # drafts its own earlier output, now in the pool snapshot.
    cold = generate(router, block_reuse=False)
    wait_until(lambda: POOL_KEY in decoder_stub.Report(decoder_pb2.DecoderReportRequest(), timeout=5).pool_keys,
               30, "the generation to reach the pool and the decoder")
    warm = generate(router, block_reuse=False)
    with pytest.raises(grpc.RpcError):  # no blocks: refused, and counted with its status
        list(router.Generate(common_pb2.GenerateRequest(), timeout=10))
    assert list(warm.token_ids) == list(cold.token_ids) and warm.stats.steps < cold.stats.steps

    decoder = metric_units(services.readers["decoder"])
    expected = {
        "adaccel.decoder.ttft": "s", "adaccel.decoder.time_per_output_token": "s",
        "adaccel.decoder.tokens_per_step": "{token}", "adaccel.decoder.acceptance_rate": "1",
        "adaccel.decoder.pool_hit_rate": "1", "adaccel.decoder.kv_block_hit_rate": "1",
        "adaccel.decoder.queue_depth": "{request}", "adaccel.decoder.batch_size": "{request}",
        "adaccel.decoder.requests": "{request}",
        "adaccel.decoder.draft_tokens": "{token}", "adaccel.decoder.accepted_draft_tokens": "{token}",
        "rpc.server.call.duration": "s", "adaccel.decoder.kv_blocks": "{block}",
        "adaccel.decoder.kv_blocks_published": "{block}", "adaccel.decoder.block_reuse_mode": "1",
    }
    assert {name: decoder[name][0] for name in expected if name in decoder} == expected
    [served] = decoder["adaccel.decoder.block_reuse_mode"][1]
    assert served.value == 1 and served.attributes["mode"] in ("full", "reuse", "cacheblend", "epic")
    assert {p.attributes["source"] for p in decoder["adaccel.decoder.kv_blocks"][1]} == {
        "prefix", "local", "kvstore", "computed", "rejected"}
    [requests] = decoder["adaccel.decoder.requests"][1]
    assert requests.value == 2 and requests.attributes["mode"] == "strict"
    hits = {p.attributes["mode"]: p for p in decoder["adaccel.decoder.pool_hit_rate"][1]}
    assert hits["strict"].count == 2 and hits["strict"].max > 0
    [accepted] = decoder["adaccel.decoder.accepted_draft_tokens"][1]
    assert accepted.value >= cold.stats.steps - warm.stats.steps  # each saved step is an accepted draft
    rpcs = {(p.attributes["rpc.method"], p.attributes["rpc.response.status_code"])
            for p in decoder["rpc.server.call.duration"][1]}
    assert ("adaccel.v1.Decoder/Generate", "OK") in rpcs

    pool = metric_units(services.readers["pool"])
    # At least the cold request's record (the warm one's may still be on its way).
    assert pool["adaccel.pool.ingest_lag"][0] == "s" and pool["adaccel.pool.ingest_lag"][1][0].count >= 1
    assert pool["adaccel.pool.records"][0] == "{record}"
    assert {p.attributes["outcome"] for p in pool["adaccel.pool.records"][1]} == {"applied"}
    router = metric_units(services.readers["router"])
    router_expected = {"adaccel.router.streams_open": "{stream}", "adaccel.router.stream_limit": "{stream}",
                       "adaccel.router.streams_refused": "{stream}",
                       "adaccel.router.replica_queue_depth": "{request}"}
    assert {name: router[name][0] for name in router_expected if name in router} == router_expected
    assert router["adaccel.router.streams_open"][1][0].value == 0  # both streams are over
    assert router["adaccel.router.stream_limit"][1][0].value > 0
    assert [p.attributes["replica"] for p in router["adaccel.router.replica_queue_depth"][1]] == [
        services.decoder.address]
    router_rpcs = router["rpc.server.call.duration"]
    assert router_rpcs[0] == "s"
    assert {(p.attributes["rpc.method"], p.attributes["rpc.response.status_code"], p.count)
            for p in router_rpcs[1] if p.attributes["rpc.method"] == "adaccel.v1.Router/Generate"} == {
        ("adaccel.v1.Router/Generate", "OK", 2), ("adaccel.v1.Router/Generate", "INVALID_ARGUMENT", 1)}

    # The same instruments, scraped in Prometheus' text format over HTTP.
    port = services.telemetry["decoder"].metrics_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        assert reply.status == 200
        text = reply.read().decode()
    for series in ("adaccel_decoder_ttft_seconds_bucket", "adaccel_decoder_acceptance_rate_count",
                   "adaccel_decoder_requests_total", "adaccel_decoder_queue_depth",
                   "rpc_server_call_duration_seconds_bucket"):
        assert series in text, f"{series} not in the scrape"
