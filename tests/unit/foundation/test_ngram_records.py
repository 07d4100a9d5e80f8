import pytest

from adaccel.v1 import records_pb2
from services.pool.ngram_records import (
    InsertSequences,
    RejectedRecord,
    generated_record_mutation,
    ngram_node_increments,
)


def test_node_increments_count_every_prefix_of_every_ngram():
    counts = ngram_node_increments([[5, 6, 5, 6]], 3)
    assert counts[(5,)] == 2 and counts[(5, 6)] == 2 and counts[(5, 6, 5)] == 1
    assert counts[(6, 5, 6)] == 1 and counts[(6,)] == 2
    assert (5, 6, 5, 6) not in counts  # longer than the n-gram length


def test_generated_record_becomes_a_pool_mutation():
    record = records_pb2.GeneratedRecord(pool_key="p/q", token_ids=[1, 2, 3], item_ids=["it-1", "it-1", "it-2"])
    mutation = generated_record_mutation(record.SerializeToString(), vocab_size=10, max_tokens=100)
    assert mutation == InsertSequences("p/q", ((1, 2, 3),), "output", ("it-1", "it-2"))


def test_a_record_naming_its_task_also_feeds_the_task_pool():
    record = records_pb2.GeneratedRecord(pool_key="p/q", task="generative_rec", token_ids=[1, 2])
    mutation = generated_record_mutation(record.SerializeToString(), vocab_size=10, max_tokens=100)
    assert mutation == InsertSequences("p/q", ((1, 2),), "output", (), also_into=("task/generative_rec",))


def test_generated_record_without_pool_key_goes_to_the_global_pool():
    record = records_pb2.GeneratedRecord(token_ids=[1])
    assert generated_record_mutation(record.SerializeToString(), vocab_size=10, max_tokens=10).pool_key == "global"


@pytest.mark.parametrize("value, reason", [
    (b"", "value: empty"),
    (b"\xff\xff\xff garbage", "value: not a GeneratedRecord"),
    (records_pb2.GeneratedRecord(token_ids=[1, 99]).SerializeToString(), "token_ids: token id 99"),
    (records_pb2.GeneratedRecord(token_ids=[-3]).SerializeToString(), "token_ids: token id -3"),
    (records_pb2.GeneratedRecord(token_ids=list(range(8)) * 20).SerializeToString(), "token_ids: 160 tokens"),
    (records_pb2.GeneratedRecord(pool_key="a b", token_ids=[1]).SerializeToString(), "pool_key:"),
    (records_pb2.GeneratedRecord(token_ids=[1], item_ids=[""]).SerializeToString(), "item_ids[0]:"),
    (records_pb2.GeneratedRecord(request_id="r").SerializeToString(), "token_ids: empty"),
    (records_pb2.GeneratedRecord(token_ids=[1], task="rec/sub").SerializeToString(), "task:"),
    (records_pb2.GeneratedRecord(token_ids=[1], task="x" * 65).SerializeToString(), "task:"),
])
def test_bad_records_are_rejected_with_a_reason(value, reason):
    with pytest.raises(RejectedRecord) as err:
        generated_record_mutation(value, vocab_size=50, max_tokens=100)
    assert str(err.value).startswith(reason)
