"""RequestIntake: a request tokenized once, configured, its pool chosen and its KV need counted."""

from __future__ import annotations

import pytest

from adaccel.v1 import common_pb2
from common.drafting.pools import PoolRegistry
from common.modeling.tiny import byte_tokenizer
from common.rpc.errors import InvalidArgument
from services.decoder.engine import GenerationConfig
from services.decoder.intake import RequestIntake, default_seed, generation_config


class FixedTree:
    """A stand-in for the engine's tree size: 16 draft tokens unless the request names its own."""

    def tree_tokens(self, config: GenerationConfig) -> int:
        return 0 if not config.drafting else (config.decoding_length or 16)


class Tracker:
    def __init__(self) -> None:
        self.noted: list[str | None] = []

    def note(self, pool_key):
        self.noted.append(pool_key)

    def held_keys(self):
        return ["shop"]


def request(**params) -> common_pb2.GenerateRequest:
    return common_pb2.GenerateRequest(
        pool_key="shop/shoes",
        blocks=[common_pb2.PromptBlock(id="i", kind=common_pb2.BLOCK_KIND_INSTRUCTION, text="Write.\n"),
                common_pb2.PromptBlock(id="I1", kind=common_pb2.BLOCK_KIND_ITEM, text="Item I1.\n")],
        params=common_pb2.GenerationParams(max_new_tokens=20, **params))


@pytest.fixture
def intake():
    pools = PoolRegistry()
    pools.get_or_create("shop")
    return RequestIntake(byte_tokenizer(), pools, FixedTree(), max_prompt_tokens=64, pool_tracker=Tracker())


def test_prepared_once_with_its_pool_config_and_kv_need(intake):
    prepared = intake.prepare(request(), "r1")
    tokenizer = intake.block_tokenizer.tokenizer
    assert tokenizer.decode(prepared.prompt_ids) == "Write.\nItem I1.\n"  # raw: no chat frame here
    assert prepared.prompt.spans == [(0, 7), (7, 16)]
    assert prepared.pool is intake.pools.resolve("shop")  # "shop/shoes" falls back to its parent
    assert intake.pool_tracker.noted == ["shop/shoes"]
    assert prepared.config.max_new_tokens == 20 and prepared.config.mode == "strict"
    assert prepared.kv_tokens == 16 + 20 + 16 + 1
    assert intake.held_pool_keys() == ["shop"]


def test_the_pool_drafted_from_is_named_fallbacks_included(intake):
    assert intake.prepare(request(), "r").pool_key == "shop"  # "shop/shoes" is not held: its parent
    unknown = request()
    unknown.pool_key = "garden/tools"
    assert intake.prepare(unknown, "r").pool_key == "global"  # an unknown key is no error: global
    exact = request()
    exact.pool_key = "shop"
    assert intake.prepare(exact, "r").pool_key == "shop"
    off = request(advanced=common_pb2.AdvancedParams(disable_drafting=True))
    assert intake.prepare(off, "r").pool_key == ""  # drafted from no pool


def test_the_reservation_follows_the_request_s_own_tree(intake):
    own_tree = request(advanced=common_pb2.AdvancedParams(decoding_length=100))
    assert intake.prepare(own_tree, "r").kv_tokens == 16 + 20 + 100 + 1
    no_drafts = request(advanced=common_pb2.AdvancedParams(disable_drafting=True))
    assert intake.prepare(no_drafts, "r").kv_tokens == 16 + 20 + 0 + 1


def test_without_a_block_cache_nothing_is_looked_up(intake):
    prepared = intake.prepare(request(), "r")
    assert intake.with_blocks(prepared, request()) is prepared and prepared.blocks is None


def test_a_prompt_over_the_limit_names_the_field(intake):
    long = request()
    long.blocks[1].text = "x" * 100
    with pytest.raises(InvalidArgument, match="blocks"):
        intake.prepare(long, "r")


def test_the_seed_is_stable_per_request_id(intake):
    params = {"sampling": common_pb2.SamplingParams(temperature=0.7)}
    assert intake.prepare(request(**params), "abc").config.seed == intake.prepare(request(**params), "abc").config.seed
    assert intake.prepare(request(**params), "abc").config.seed != intake.prepare(request(**params), "abd").config.seed


def config_of(**params) -> GenerationConfig:
    return generation_config(common_pb2.GenerationParams(max_new_tokens=8, **params), request_id="req-1",
                             eos_token_id=None)


def test_optional_fields_left_unset_take_the_defaults():
    config = config_of()
    assert (config.relaxed_top_k, config.relaxed_min_prob, config.seed) == (2, 0.1, default_seed("req-1"))
    assert config.seed != 0


def test_optional_fields_set_to_zero_are_honoured():
    config = config_of(relaxed=common_pb2.RelaxedParams(min_prob=0.0),
                       sampling=common_pb2.SamplingParams(seed=0))
    assert config.relaxed_min_prob == 0.0  # any top-k token is accepted
    assert config.seed == 0  # a seed, not "derive one"
    assert config.relaxed_top_k == 2  # still unset


def test_optional_fields_set_reach_the_engine_as_given():
    config = config_of(relaxed=common_pb2.RelaxedParams(top_k=5, min_prob=0.25),
                       sampling=common_pb2.SamplingParams(seed=42))
    assert (config.relaxed_top_k, config.relaxed_min_prob, config.seed) == (5, 0.25, 42)


def test_a_zero_min_prob_reaches_the_prepared_request(intake):
    prepared = intake.prepare(request(mode=common_pb2.VERIFICATION_MODE_RELAXED,
                                      relaxed=common_pb2.RelaxedParams(min_prob=0.0)), "r")
    assert prepared.config.mode == "relaxed" and prepared.config.relaxed_min_prob == 0.0
    assert intake.prepare(request(), "r").config.relaxed_min_prob == 0.1


def test_presence_survives_the_wire():
    sent = common_pb2.GenerationParams(relaxed=common_pb2.RelaxedParams(min_prob=0.0))
    received = common_pb2.GenerationParams.FromString(sent.SerializeToString())
    assert received.relaxed.HasField("min_prob") and not received.relaxed.HasField("top_k")
    assert not received.sampling.HasField("seed")


def test_a_request_naming_its_task_drafts_from_its_task_pool_too(intake):
    from common.drafting.pools import TieredPool

    task = request()
    task.task = "item_knowledge"
    untiered = intake.prepare(task, "r")
    assert untiered.pool is intake.pools.resolve("shop") and untiered.task_pool_key == ""  # task pool not held yet
    assert intake.pool_tracker.noted == ["shop/shoes", "task/item_knowledge"]  # ... but fetched from now on
    task_pool = intake.pools.get_or_create("task/item_knowledge")
    prepared = intake.prepare(task, "r")
    assert isinstance(prepared.pool, TieredPool)
    assert prepared.pool.key_pool is intake.pools.resolve("shop") and prepared.pool.task_pool is task_pool
    assert prepared.pool_key == "shop" and prepared.task_pool_key == "task/item_knowledge"  # what the stats name
    other = request()
    other.task = "generative_rec"  # another task's pool is never a fallback
    assert intake.prepare(other, "r").pool is intake.pools.resolve("shop")
    assert intake.prepare(other, "r").task_pool_key == ""
    intake.task_pool_weight = 0.0  # ADACCEL_TASK_POOL_WEIGHT=0: the pool key's alone
    alone = intake.prepare(task, "r")
    assert alone.pool is intake.pools.resolve("shop") and alone.task_pool_key == ""
