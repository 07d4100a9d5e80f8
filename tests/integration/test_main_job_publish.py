"""The main job's pool warm-up from stored answers, against the embedded broker: each answer goes
to the generated-text topic as the GeneratedRecord a decoder would publish, keyed by pool key."""

from __future__ import annotations

from kafka import KafkaConsumer

from adaccel.v1 import records_pb2
from common.settings import KafkaSettings
from common.warm_answers import WarmAnswer
from services.main_job.job import publish_warm_answers


def test_stored_answers_are_published_as_generated_records(broker):
    answers = [WarmAnswer(f"warm-job-{i}", pool_key, "item_knowledge", (f"I{i}",), (), (4, 5, i), f"text {i}",
                          "tiny", max_new_tokens=24)
               for i, pool_key in enumerate(["home/kitchen", "fashion/shoes", "home/kitchen"])]
    assert publish_warm_answers(broker.bootstrap, answers) == len(answers)
    consumer = KafkaConsumer(KafkaSettings().kafka_generated_topic, bootstrap_servers=broker.bootstrap,
                             auto_offset_reset="earliest", allow_auto_create_topics=False,
                             consumer_timeout_ms=3000)
    seen = {}
    for message in consumer:
        record = records_pb2.GeneratedRecord.FromString(message.value)
        if record.request_id.startswith("warm-job-"):
            seen[record.request_id] = (message.key.decode(), record)
    consumer.close()
    assert seen == {a.request_id: (a.pool_key, a.record()) for a in answers}
