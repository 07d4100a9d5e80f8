import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adaccel.v1 import common_pb2
from common.blocks.hashing import BlockKind
from common.blocks.routing_keys import RequestBlocks, request_blocks, routing_key
from common.rpc.block_kinds import kinds_and_texts
from services.router.scheduling import (
    AffinityWeights,
    Footprint,
    ReplicaView,
    affinity_score,
    choose_replica,
    held_share,
    uncached_tokens,
    work_ahead,
)


def view(address, healthy=True, queue=0, tokens=0):
    return ReplicaView(address, healthy, queue, tokens)


def test_picks_least_loaded_healthy_replica():
    replicas = [view("a", queue=3), view("b", queue=1), view("c", healthy=False)]
    assert choose_replica(replicas).address == "b"


def test_tokens_in_flight_break_equal_queues():
    replicas = [view("a", queue=1, tokens=8000), view("b", queue=1, tokens=100)]
    assert choose_replica(replicas).address == "b"


def test_excluded_and_unhealthy_leave_none():
    assert choose_replica([view("a"), view("b", healthy=False)], frozenset({"a"})) is None
    assert choose_replica([]) is None


def test_ties_are_deterministic_and_rotate_with_the_turn():
    assert choose_replica([view("b"), view("a")]).address == "a"
    idle = [view("c"), view("b"), view("a"), view("d", queue=1)]
    picks = [choose_replica(idle, turn=t).address for t in range(6)]
    assert picks == ["a", "b", "c", "a", "b", "c"]  # the busier d is never among the tied


def test_affinity_ties_rotate_too_and_a_held_history_is_no_tie():
    """A request nobody holds, every replica idle: each turn takes the next replica, so new users
    spread over the replicas' memories instead of filling the first address's."""
    request = request_blocks(blocks((USER, "u" * 300), (ITEM, "i" * 100)))
    user_key, _ = request.weights
    nobody = [held("a"), held("b"), held("c")]
    assert [choose_replica(nobody, policy="affinity", footprint=Footprint(request), turn=t).address
            for t in range(3)] == ["a", "b", "c"]
    one_holds = [held("a"), held("b", {user_key}), held("c")]
    assert {choose_replica(one_holds, policy="affinity", footprint=Footprint(request), turn=t).address
            for t in range(3)} == {"b"}


# ---------------------------------------------------------------- affinity scoring

USER, ITEM = common_pb2.BLOCK_KIND_USER_HISTORY, common_pb2.BLOCK_KIND_ITEM


def blocks(*specs):
    """(kind, text) pairs as the router hands them over: mapped from real protobuf blocks."""
    return kinds_and_texts(common_pb2.PromptBlock(id=f"b{i}", kind=kind, text=text)
                           for i, (kind, text) in enumerate(specs))


def held(address, keys=(), pools=(), queue=0, tokens=0, pending=0):
    return ReplicaView(address, True, queue, tokens, frozenset(keys), frozenset(pools), pending)


def test_routing_keys_follow_kind_and_text_not_id():
    a = common_pb2.PromptBlock(id="item-1", kind=ITEM, text="Aurora headphones.\n")
    b = common_pb2.PromptBlock(id="item-2", kind=ITEM, text="Aurora headphones.\n")
    assert request_blocks(kinds_and_texts([a])).weights == request_blocks(kinds_and_texts([b])).weights
    item, user = BlockKind.ITEM, BlockKind.USER_HISTORY
    assert routing_key(item, "x") != routing_key(user, "x") != routing_key(item, "y")
    free = common_pb2.PromptBlock(id="q", kind=common_pb2.BLOCK_KIND_TEXT, text="Why?\n")
    assert request_blocks(kinds_and_texts([free])).weights == {}
    assert 0 <= routing_key(item, "x") < 2**64


def test_affinity_picks_the_replica_holding_most_of_the_prompt():
    request = request_blocks(blocks((USER, "u" * 300), (ITEM, "i" * 100)))
    user_key, item_key = request.weights
    replicas = [held("a", {item_key}), held("b", {user_key}), held("c")]
    assert held_share(replicas[0], request) == pytest.approx(0.25)
    assert held_share(replicas[1], request) == pytest.approx(0.75)
    chosen = choose_replica(replicas, policy="affinity", footprint=Footprint(request))
    assert chosen.address == "b"


def test_locality_and_load_are_weighed_in_prefill_tokens():
    # 4,000 characters: ~1,000 prompt tokens at 4 characters a token.
    request = request_blocks(blocks((USER, "u" * 3600), (ITEM, "i" * 400)))
    user_key, item_key = request.weights
    weights = AffinityWeights()
    idle = held("b")
    assert uncached_tokens(idle, Footprint(request), weights) == pytest.approx(1000)
    assert uncached_tokens(held("a", {user_key}), Footprint(request), weights) == pytest.approx(100)
    # Holding the item (100 tokens) is worth less than 3 running requests (3 x 40 tokens) ...
    assert choose_replica([held("a", {item_key}, queue=3), idle], policy="affinity",
                          footprint=Footprint(request)).address == "b"
    # ... and more than 2.
    assert choose_replica([held("a", {item_key}, queue=2), idle], policy="affinity",
                          footprint=Footprint(request)).address == "a"
    # Holding the user history saves 900 tokens: worth a 800-token prefill queued ahead, not a 1,000 one.
    assert choose_replica([held("a", {user_key}, pending=800), idle], policy="affinity",
                          footprint=Footprint(request)).address == "a"
    assert choose_replica([held("a", {user_key}, pending=1000), idle], policy="affinity",
                          footprint=Footprint(request)).address == "b"
    # A larger block weight favours locality: a held token counts twice what it costs.
    favour = AffinityWeights(block_weight=2.0)
    assert uncached_tokens(held("a", {user_key}), Footprint(request), favour) == 0
    assert choose_replica([held("a", {user_key}, pending=1000), idle], policy="affinity",
                          footprint=Footprint(request), weights=favour).address == "a"


def test_pool_affinity_matches_parent_pools():
    footprint = Footprint(RequestBlocks({}), "electronics/audio")
    replicas = [held("a"), held("b", pools={"electronics"})]
    weights = AffinityWeights()
    assert affinity_score(replicas[1], footprint, weights) - affinity_score(replicas[0], footprint, weights) == \
        pytest.approx(weights.pool_weight * weights.request_tokens)
    assert choose_replica(replicas, policy="affinity", footprint=footprint).address == "b"
    assert choose_replica([held("a"), held("b", pools={"electronics/video"})], policy="affinity",
                          footprint=footprint).address == "a"


views = st.lists(
    st.builds(lambda i, q, t, p: ReplicaView(f"r{i}", True, q, t, prefill_tokens_pending=p), st.integers(0, 9),
              st.integers(0, 8), st.integers(0, 20_000), st.integers(0, 5_000)),
    min_size=1, max_size=5, unique_by=lambda v: v.address)


@settings(max_examples=40, deadline=None)
@given(views, st.text(min_size=1, max_size=20))
def test_affinity_without_cache_knowledge_goes_where_least_work_is_queued(replicas, text):
    footprint = Footprint(request_blocks(blocks((ITEM, text))), "some/pool")
    weights = AffinityWeights()
    chosen = choose_replica(replicas, policy="affinity", footprint=footprint)
    queued = {r.address: r.prefill_tokens_pending + weights.request_tokens * r.queue_depth for r in replicas}
    assert queued[chosen.address] == min(queued.values())
    assert work_ahead(chosen, footprint, weights) == pytest.approx(queued[chosen.address] + len(text) / 4)


def test_round_robin_cycles_over_healthy_replicas_in_address_order():
    replicas = [view("c"), view("a", queue=5), view("b", healthy=False)]
    picks = [choose_replica(replicas, policy="round_robin", turn=t).address for t in range(4)]
    assert picks == ["a", "c", "a", "c"]
    assert choose_replica(replicas, frozenset({"a"}), policy="round_robin", turn=0).address == "c"


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="unknown scheduling policy"):
        choose_replica([view("a")], policy="random")


def test_bench_locality_counts_blocks_a_replica_served_before():
    from adaccel.v1 import common_pb2
    from bench.routing import locality

    def request(i: int, user: str, items: list[str]) -> common_pb2.GenerateRequest:
        blocks = [common_pb2.PromptBlock(id=user, kind=common_pb2.BLOCK_KIND_USER_HISTORY)]
        blocks += [common_pb2.PromptBlock(id=x, kind=common_pb2.BLOCK_KIND_ITEM) for x in items]
        return common_pb2.GenerateRequest(request_id=str(i), blocks=blocks)

    requests = [request(0, "u1", ["a", "b"]), request(1, "u1", ["a", "c"]), request(2, "u1", ["a"]),
                request(3, "u2", ["a"])]
    # Request 3 failed (not served): it counts nowhere.
    figures = locality(requests, {"0": "d0", "1": "d0", "2": "d1"})
    assert figures == {"user_history": 1 / 3, "item": 1 / 5}
    assert locality(requests, {}) == {"user_history": 0.0, "item": 0.0}


def test_bench_routing_doctests():
    """poisson_arrivals and prefix_hit_ceiling (the hit rate an exact-prefix cache could reach)."""
    import doctest

    import bench.routing

    result = doctest.testmod(bench.routing)
    assert result.attempted >= 4 and result.failed == 0


def test_scheduling_doctests():
    import doctest

    import services.router.scheduling as scheduling

    assert doctest.testmod(scheduling).failed == 0
