from services.router.scheduling import ReplicaView, choose_replica


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


def test_ties_are_deterministic():
    assert choose_replica([view("b"), view("a")]).address == "a"
