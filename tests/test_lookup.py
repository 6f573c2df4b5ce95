"""The iterative lookup state machine, driven by a scripted in-test network with a manual clock.

The network: N nodes with real Contacts (random keys, IDs derived), each with a RoutingTable filled
from all the others; a request to a node is answered from its table (``closest(target, k)``) after
a seeded latency, or never if the node is "down". The oracle is a full scan over all nodes.
"""

from __future__ import annotations

import heapq
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sovereign_discovery.addresses import Address
from sovereign_discovery.errors import ArgumentTypeError, ArgumentValueError
from sovereign_discovery.lookup import Lookup, LookupParams, PeerState
from sovereign_discovery.routing import Contact, RoutingTable

from .helpers import brute_closest

N = 300
K = 20
ALPHA = 3


def make_contacts(n: int, seed: int, port0: int = 10000) -> list[Contact]:
    rng = random.Random(seed)
    return [Contact(rng.randbytes(32), Address("127.0.0.1", port0 + i)) for i in range(n)]


class Network:
    """Every node's routing table, and the replies they give."""

    def __init__(self, contacts: list[Contact], k: int = K) -> None:
        self.contacts = contacts
        self.by_id = {c.node_id: c for c in contacts}
        self.k = k
        self.tables: dict[bytes, RoutingTable] = {}
        for c in contacts:
            table = RoutingTable(c.node_id, bucket_size=k)
            for other in contacts:
                if other is not c:
                    table.insert(other, 0.0)
            self.tables[c.node_id] = table

    def answer(self, node_id: bytes, target: bytes) -> list[Contact]:
        return self.tables[node_id].closest(target, self.k)

    def oracle(self, target: bytes, exclude: bytes, count: int, down=frozenset()) -> list[Contact]:
        alive = [c for c in self.contacts if c.node_id != exclude and c.node_id not in down]
        return brute_closest(alive, target, count)


@pytest.fixture(scope="module")
def net() -> Network:
    return Network(make_contacts(N, seed=1))


def run(
    lookup: Lookup,
    net: Network,
    *,
    now: float = 0.0,
    down=frozenset(),
    rng: random.Random | None = None,
    latency=(0.01, 0.2),
    max_events: int = 100_000,
    on_poll=None,
) -> float:
    """Drive ``lookup`` to its end: poll, deliver answers after a seeded latency in time order,
    advance the clock to the lookup's next deadline when idle. Asserts α on every poll."""
    rng = rng or random.Random(0)
    alpha = lookup.params.parallelism
    queue: list[tuple[float, int, bytes]] = []
    seq = 0
    for _ in range(max_events):
        sent = lookup.poll(now)
        assert lookup.in_flight <= alpha
        states = [s for _, s in lookup.candidates()]
        assert states.count(PeerState.IN_FLIGHT) == lookup.in_flight
        assert len(sent) <= alpha
        if on_poll is not None:
            on_poll(lookup, sent)
        for contact in sent:
            assert lookup.state_of(contact.node_id) is PeerState.IN_FLIGHT
            if contact.node_id not in down:
                seq += 1
                heapq.heappush(queue, (now + rng.uniform(*latency), seq, contact.node_id))
        if lookup.finished:
            return now
        wake = lookup.next_deadline()
        assert wake is not None
        if queue and queue[0][0] <= wake:
            now, _, node_id = heapq.heappop(queue)
            lookup.on_success(node_id, net.answer(node_id, lookup.target), now)
        else:
            now = wake
    raise AssertionError("lookup did not end")


def start(net: Network, origin: Contact, target: bytes, *, now: float = 0.0, **kw) -> Lookup:
    params = kw.pop("params", LookupParams(bucket_size=K, parallelism=ALPHA))
    seeds = net.tables[origin.node_id].closest(target, params.bucket_size)
    kw.setdefault("request_timeout_s", 0.5)
    return Lookup(origin.node_id, target, seeds, params=params, now=now, **kw)


def check_invariants(lookup: Lookup) -> None:
    s = lookup.stats
    assert s.requests_sent == s.successes + s.failures + s.in_flight
    assert s.candidates == len(lookup) <= lookup.params.max_candidates


# --- correctness on a well-filled network --------------------------------------------------------


def test_lookups_are_exact_and_cheap(net):
    rng = random.Random(7)
    worst_rounds = worst_requests = total_requests = 0
    for _ in range(60):
        origin = rng.choice(net.contacts)
        target = rng.randbytes(20)
        lookup = start(net, origin, target)
        run(lookup, net, rng=rng)
        assert lookup.finished and not lookup.timed_out
        assert lookup.closest() == net.oracle(target, origin.node_id, K)
        assert lookup.rounds_to_target is None  # a random target is nobody's ID
        check_invariants(lookup)
        worst_rounds = max(worst_rounds, lookup.rounds)
        worst_requests = max(worst_requests, lookup.requests_sent)
        total_requests += lookup.requests_sent
    # A few hops (log(300) / log(k)-ish); measured: ≤ 3 rounds, ≤ 27 requests, ~23 on average.
    # Generous bounds, except the mean: asking every candidate (no k-closest termination) would
    # average ~40 here.
    assert 1 <= worst_rounds <= 8
    assert K <= worst_requests <= 4 * K
    assert total_requests / 60 <= 1.5 * K


@settings(max_examples=40, deadline=None)
@given(origin=st.integers(0, N - 1), target=st.binary(min_size=20, max_size=20),
       alpha=st.integers(1, 6), seed=st.integers(0, 2**32))
def test_lookups_are_exact_for_any_alpha(net, origin, target, alpha, seed):
    params = LookupParams(bucket_size=K, parallelism=alpha)
    lookup = start(net, net.contacts[origin], target, params=params)
    run(lookup, net, rng=random.Random(seed))
    assert lookup.finished and not lookup.timed_out
    assert lookup.closest() == net.oracle(target, net.contacts[origin].node_id, K)
    check_invariants(lookup)


def test_lookup_for_a_node_contacts_it_and_returns_it_first(net):
    rng = random.Random(3)
    for _ in range(30):
        origin, wanted = rng.sample(net.contacts, 2)
        lookup = start(net, origin, wanted.node_id)
        run(lookup, net, rng=rng)
        assert lookup.rounds_to_target is not None
        assert 1 <= lookup.rounds_to_target <= lookup.rounds
        assert lookup.closest()[0] == wanted
        assert lookup.state_of(wanted.node_id) is PeerState.SUCCEEDED


def test_lookup_for_own_id_never_contacts_itself(net):
    origin = net.contacts[5]
    seen = []
    lookup = start(net, origin, origin.node_id)
    run(lookup, net, on_poll=lambda lk, sent: seen.extend(sent))
    assert origin not in seen and origin.node_id not in [c.node_id for c in lookup.closest()]
    assert lookup.closest() == net.oracle(origin.node_id, origin.node_id, K)
    assert lookup.rounds_to_target is None


def test_parallelism_is_used_and_never_exceeded(net):
    peak = []
    lookup = start(net, net.contacts[0], bytes(20), params=LookupParams(parallelism=4))
    run(lookup, net, on_poll=lambda lk, sent: peak.append(lk.in_flight))
    assert max(peak) == 4  # the bound is reached (so the α assertions in run() can fail)


# --- failures and timeouts ----------------------------------------------------------------------


def test_unresponsive_nodes_time_out_and_are_excluded(net):
    rng = random.Random(11)
    down = frozenset(c.node_id for c in rng.sample(net.contacts, N // 5))
    for _ in range(20):
        origin = rng.choice([c for c in net.contacts if c.node_id not in down])
        target = rng.randbytes(20)
        lookup = start(net, origin, target, request_timeout_s=0.5)
        run(lookup, net, down=down, rng=rng)
        assert lookup.finished and not lookup.timed_out
        result = lookup.closest()
        assert not {c.node_id for c in result} & down
        # Answers hold the k closest *known* nodes, down ones included, so a live node that only
        # makes the live top-k because of down nodes may never be reported; every live node of
        # the overall top-k must be found, first, in order.
        must = [c for c in net.oracle(target, origin.node_id, K) if c.node_id not in down]
        assert result == brute_closest(result, target, K)
        assert set(must) <= set(result) and result[: len(must)] == must
        s = lookup.stats
        assert s.failures == s.timeouts > 0 and s.late_successes == 0
        check_invariants(lookup)


def test_everyone_failing_ends_with_an_empty_result(net):
    down = frozenset(net.by_id)
    lookup = start(net, net.contacts[0], bytes(20), request_timeout_s=0.5)
    end = run(lookup, net, down=down)
    assert lookup.finished and not lookup.timed_out and lookup.closest() == []
    assert lookup.stats.failures == lookup.stats.requests_sent == K  # only the seeds were asked
    assert end < lookup.deadline


def test_on_failure_is_final_and_frees_a_slot(net):
    a, b, c, d = net.contacts[:4]
    lookup = Lookup(bytes(20), bytes(20), [a, b, c, d], params=LookupParams(parallelism=3), now=0,
                    request_timeout_s=5)
    first = lookup.poll(0)
    assert len(first) == 3 and lookup.in_flight == 3
    lookup.on_failure(first[0].node_id, 1)
    assert lookup.state_of(first[0].node_id) is PeerState.FAILED
    assert len(lookup.poll(1)) == 1  # the fourth seed takes the freed slot
    lookup.on_success(first[0].node_id, [], 1.5)  # too late: the engine gave up on it
    assert lookup.state_of(first[0].node_id) is PeerState.FAILED
    assert lookup.stats.unsolicited == 1 and lookup.stats.late_successes == 0
    lookup.on_failure(first[0].node_id, 2)  # repeated: no effect
    lookup.on_failure(net.contacts[10].node_id, 2)  # unknown: no effect
    assert lookup.stats.failures == 1
    check_invariants(lookup)


def test_late_success_after_timeout_is_accepted_and_counted(net):
    seeds = net.contacts[:2]
    extra = net.contacts[2:5]
    lookup = Lookup(bytes(20), bytes(20), seeds, params=LookupParams(parallelism=1), now=0,
                    request_timeout_s=1.0)
    (first,) = lookup.poll(0)
    assert lookup.next_deadline() == 1.0
    (second,) = lookup.poll(1.0)  # first timed out: its slot goes to the other seed
    assert lookup.state_of(first.node_id) is PeerState.FAILED
    assert lookup.stats.timeouts == 1 and lookup.stats.failures == 1
    lookup.on_success(first.node_id, extra, 1.2)  # the late answer
    assert lookup.state_of(first.node_id) is PeerState.SUCCEEDED
    s = lookup.stats
    assert (s.late_successes, s.successes, s.failures, s.timeouts) == (1, 1, 0, 1)
    assert all(lookup.state_of(c.node_id) is PeerState.WAITING_TO_SEND for c in extra)
    assert all(lookup.round_of(c.node_id) == 2 for c in extra)
    check_invariants(lookup)
    # on_failure after a timeout makes it final: no late answer then
    lookup2 = Lookup(bytes(20), bytes(20), seeds, params=LookupParams(parallelism=1), now=0,
                     request_timeout_s=1.0)
    (only,) = lookup2.poll(0)
    lookup2.poll(1.0)
    assert not lookup2.finished
    lookup2.on_failure(only.node_id, 1.1)
    lookup2.on_success(only.node_id, extra, 1.2)
    assert lookup2.stats.unsolicited == 1 and lookup2.state_of(only.node_id) is PeerState.FAILED


def test_per_peer_timeouts_from_a_callable(net):
    seeds = net.contacts[:3]
    timeouts = {seeds[0].node_id: 0.3, seeds[1].node_id: 2.0, seeds[2].node_id: 0.7}
    asked = []

    def timeout_for(contact):
        asked.append(contact)
        return timeouts[contact.node_id]

    lookup = Lookup(bytes(20), bytes(20), seeds, now=10.0, request_timeout_s=timeout_for,
                    params=LookupParams(deadline_s=30))
    assert sorted(lookup.poll(10.0), key=seeds.index) == seeds
    assert sorted(asked, key=seeds.index) == seeds
    assert lookup.next_deadline() == pytest.approx(10.3)
    lookup.poll(10.3)
    assert lookup.next_deadline() == pytest.approx(10.7)
    lookup.poll(10.7)
    assert lookup.next_deadline() == pytest.approx(12.0)
    lookup.poll(12.0)
    assert lookup.finished and not lookup.timed_out and lookup.next_deadline() is None
    assert lookup.stats.timeouts == 3
    # the overall deadline bounds next_deadline
    lookup = Lookup(bytes(20), bytes(20), seeds, now=0, request_timeout_s=100,
                    params=LookupParams(deadline_s=4))
    lookup.poll(0)
    assert lookup.next_deadline() == 4.0


def test_overall_deadline_returns_the_partial_best(net):
    target = bytes(20)
    seeds = net.tables[net.contacts[0].node_id].closest(target, K)
    lookup = Lookup(net.contacts[0].node_id, target, seeds, now=0, request_timeout_s=5,
                    params=LookupParams(deadline_s=2))
    answered = []
    for contact in lookup.poll(0)[:2]:  # two answer, the third hangs; nobody else answers
        lookup.on_success(contact.node_id, net.answer(contact.node_id, target), 0.1)
        answered.append(contact)
    lookup.poll(0.1)
    assert not lookup.finished
    assert lookup.next_deadline() == 2.0
    assert lookup.poll(2.0) == []
    assert lookup.finished and lookup.timed_out
    assert lookup.closest() == brute_closest(answered, target, K)
    assert lookup.next_deadline() is None
    hanging = lookup.poll(0)  # nothing more once over
    assert hanging == [] and lookup.in_flight == len(lookup.in_flight_peers()) >= 1
    lookup.on_success(seeds[5].node_id, [], 2.5)  # after the end: ignored
    assert lookup.closest() == brute_closest(answered, target, K)


def test_deadline_also_applies_on_answers():
    contacts = make_contacts(3, seed=9)
    lookup = Lookup(bytes(20), bytes(20), contacts[:1], now=0, request_timeout_s=5,
                    params=LookupParams(deadline_s=1))
    (a,) = lookup.poll(0)
    lookup.on_success(a.node_id, contacts[1:], 1.5)
    assert lookup.timed_out and lookup.closest() == []


def test_finish_stops_the_lookup(net):
    target = bytes(20)
    lookup = start(net, net.contacts[0], target)
    sent = lookup.poll(0)
    lookup.on_success(sent[0].node_id, net.answer(sent[0].node_id, target), 0.1)
    lookup.finish()
    assert lookup.finished and not lookup.timed_out
    assert lookup.poll(0.2) == [] and lookup.next_deadline() is None
    assert lookup.in_flight_peers() == sent[1:]  # left for the engine to cancel
    lookup.on_success(sent[1].node_id, net.answer(sent[1].node_id, target), 0.3)
    assert lookup.closest() == [sent[0]]


# --- network input -------------------------------------------------------------------------------


def test_unsolicited_and_duplicate_answers_are_ignored_and_counted(net):
    seeds = net.contacts[:5]
    lookup = Lookup(bytes(20), bytes(20), seeds, params=LookupParams(parallelism=1), now=0)
    (asked,) = lookup.poll(0)
    stranger = net.contacts[50]
    lookup.on_success(stranger.node_id, net.contacts[60:80], 0.1)  # never heard of
    not_yet = next(c for c in seeds if c != asked)
    lookup.on_success(not_yet.node_id, net.contacts[60:80], 0.1)  # known, never asked
    assert lookup.stats.unsolicited == 2
    assert lookup.state_of(not_yet.node_id) is PeerState.WAITING_TO_SEND
    assert lookup.state_of(net.contacts[60].node_id) is None and len(lookup) == 5
    lookup.on_success(asked.node_id, [], 0.2)
    lookup.on_success(asked.node_id, net.contacts[60:80], 0.3)  # duplicate datagram
    assert lookup.stats.duplicates == 1 and len(lookup) == 5
    check_invariants(lookup)


def test_duplicates_local_id_and_address_updates():
    contacts = make_contacts(6, seed=4)
    local = contacts[0]
    elsewhere = {c.node_id: Contact(c.public_key, Address("127.0.0.1", 20000 + i))
                 for i, c in enumerate(contacts)}
    lookup = Lookup(local.node_id, bytes(20), [local, contacts[1], contacts[2], contacts[1]],
                    params=LookupParams(parallelism=1), now=0)
    assert len(lookup) == 2 and lookup.state_of(local.node_id) is None
    assert lookup.stats.candidates_seen == 2
    (asked,) = lookup.poll(0)
    other = contacts[2] if asked == contacts[1] else contacts[1]
    lookup.on_success(asked.node_id, [local, elsewhere[asked.node_id], elsewhere[other.node_id],
                                      contacts[3], contacts[3]], 0.1)
    assert len(lookup) == 3 and lookup.stats.candidates_seen == 3
    assert lookup.state_of(local.node_id) is None
    ports = {c.node_id: c.address.port for c, _ in lookup.candidates()}
    assert lookup.state_of(asked.node_id) is PeerState.SUCCEEDED
    assert ports[asked.node_id] == asked.address.port  # contacted: keeps state and address
    assert lookup.state_of(other.node_id) is PeerState.WAITING_TO_SEND
    assert ports[other.node_id] == elsewhere[other.node_id].address.port  # latest report wins
    assert lookup.round_of(other.node_id) == 1  # a seed stays round 1


def test_rounds_follow_the_answers():
    c = make_contacts(8, seed=5)
    target = bytes(20)
    lookup = Lookup(bytes(20), target, [c[0], c[1]],
                    params=LookupParams(bucket_size=8, parallelism=8),
                    now=0)
    assert lookup.round_of(c[0].node_id) == lookup.round_of(c[1].node_id) == 1
    assert lookup.rounds == 0
    lookup.poll(0)
    assert lookup.rounds == 1
    lookup.on_success(c[0].node_id, [c[2], c[3]], 0.1)
    assert lookup.round_of(c[2].node_id) == 2
    lookup.poll(0.1)
    lookup.on_success(c[2].node_id, [c[4]], 0.2)  # c4: round 3
    assert lookup.round_of(c[4].node_id) == 3
    lookup.on_success(c[1].node_id, [c[4]], 0.2)  # learned again from a round-1 peer: round 2
    assert lookup.round_of(c[4].node_id) == 2
    lookup.poll(0.2)
    lookup.on_success(c[4].node_id, [c[5]], 0.3)
    lookup.poll(0.3)
    assert lookup.round_of(c[5].node_id) == 3
    lookup.on_success(c[3].node_id, [], 0.4)
    lookup.on_success(c[5].node_id, [], 0.4)
    lookup.poll(0.4)
    assert lookup.finished and not lookup.timed_out
    assert lookup.rounds == 3 and lookup.stats.rounds_to_target is None
    assert lookup.closest() == brute_closest([c[0], c[1], c[2], c[3], c[4], c[5]], target, 8)


def test_candidates_are_capped_under_a_flood():
    flood = make_contacts(2000, seed=6, port0=30000)
    target = bytes(20)
    params = LookupParams(bucket_size=5, parallelism=2, max_candidates=12)
    lookup = Lookup(bytes(20), target, flood[:30], params=params, now=0, request_timeout_s=1)
    rng = random.Random(2)
    now = 0.0
    contacted = set()
    offered = list(flood[:30])
    for _ in range(400):
        sent = lookup.poll(now)
        contacted.update(c.node_id for c in sent)
        assert len(lookup) <= 12
        if lookup.finished:
            break
        for contact in sent:
            answer = rng.sample(flood, 300)  # 300 contacts each, mostly new
            offered.extend(answer)
            lookup.on_success(contact.node_id, answer, now)
            assert len(lookup) <= 12
            # a contacted peer is never dropped
            assert all(lookup.state_of(n) is not None for n in contacted)
        now += 0.01
    assert lookup.finished and not lookup.timed_out
    assert lookup.stats.candidates_dropped > 0
    assert lookup.requests_sent <= 12
    # dropping the farthest never loses the best of what was offered
    assert lookup.closest() == brute_closest(set(offered), target, 5)
    check_invariants(lookup)


def test_termination_rule_k_closest_not_failed_have_succeeded():
    target = bytes(20)
    c = brute_closest(make_contacts(6, seed=12), target, 6)  # nearest first
    params = LookupParams(bucket_size=2, parallelism=3)
    lookup = Lookup(bytes([0xFF] * 20), target, c, params=params, now=0)
    assert lookup.poll(0) == c[:3]  # the closest first
    lookup.on_success(c[1].node_id, [], 0.1)
    lookup.on_success(c[2].node_id, [], 0.1)
    assert not lookup.finished  # c0, the closest, is still in flight
    lookup.on_failure(c[0].node_id, 0.2)
    # the 2 closest not failed (c1, c2) have answered: done, though c3..c5 were never asked
    assert lookup.finished and not lookup.timed_out
    assert lookup.closest() == [c[1], c[2]]
    assert lookup.state_of(c[3].node_id) is PeerState.WAITING_TO_SEND
    # a farther peer still in flight does not hold the end back
    lookup = Lookup(bytes([0xFF] * 20), target, c, params=params, now=0)
    lookup.poll(0)
    lookup.on_success(c[0].node_id, [], 0.1)
    lookup.on_success(c[1].node_id, [], 0.1)
    assert lookup.finished and lookup.in_flight_peers() == [c[2]]
    assert lookup.requests_sent == 3


def test_no_seeds_finishes_at_once():
    lookup = Lookup(bytes(20), bytes(20), [], now=0)
    assert lookup.poll(0) == [] and lookup.finished and not lookup.timed_out
    assert lookup.closest() == []


def test_closest_count():
    c = make_contacts(4, seed=8)
    lookup = Lookup(bytes(20), bytes(20), c, now=0, params=LookupParams(parallelism=4))
    for contact in lookup.poll(0):
        lookup.on_success(contact.node_id, [], 0.1)
    assert lookup.closest(2) == brute_closest(c, bytes(20), 2)
    assert lookup.closest() == brute_closest(c, bytes(20), 4)
    with pytest.raises(ArgumentValueError, match="count"):
        lookup.closest(0)


# --- caller mistakes -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, name",
    [
        ({"parallelism": 0}, ArgumentValueError, "parallelism"),
        ({"parallelism": True}, ArgumentTypeError, "parallelism"),
        ({"parallelism": 2.0}, ArgumentTypeError, "parallelism"),
        ({"bucket_size": 0}, ArgumentValueError, "bucket_size"),
        ({"bucket_size": 256}, ArgumentValueError, "bucket_size"),
        ({"bucket_size": "20"}, ArgumentTypeError, "bucket_size"),
        ({"max_candidates": 5}, ArgumentValueError, "max_candidates"),
        ({"deadline_s": 0}, ArgumentValueError, "deadline_s"),
        ({"deadline_s": math.inf}, ArgumentValueError, "deadline_s"),
        ({"deadline_s": "10"}, ArgumentTypeError, "deadline_s"),
        ({"disjoint_paths": 2}, ArgumentValueError, "disjoint_paths"),
    ],
)
def test_bad_params(kwargs, error, name):
    with pytest.raises(error, match=name):
        LookupParams(**kwargs)


def test_params_defaults():
    p = LookupParams()
    assert (p.bucket_size, p.parallelism, p.max_candidates, p.deadline_s) == (20, 3, 160, 10.0)
    assert LookupParams(bucket_size=4).max_candidates == 32


def test_bad_arguments():
    c = make_contacts(2, seed=10)
    ok = dict(params=LookupParams(), now=0)
    with pytest.raises(ArgumentTypeError, match="local_id"):
        Lookup("x" * 20, bytes(20), c, **ok)
    with pytest.raises(ArgumentValueError, match="target"):
        Lookup(bytes(20), bytes(19), c, **ok)
    with pytest.raises(ArgumentTypeError, match="seeds"):
        Lookup(bytes(20), bytes(20), [c[0], "peer"], **ok)
    with pytest.raises(ArgumentTypeError, match="seeds"):
        Lookup(bytes(20), bytes(20), 5, **ok)
    with pytest.raises(ArgumentTypeError, match="params"):
        Lookup(bytes(20), bytes(20), c, params={"parallelism": 3}, now=0)
    with pytest.raises(ArgumentTypeError, match="now"):
        Lookup(bytes(20), bytes(20), c, params=LookupParams(), now="0")
    with pytest.raises(ArgumentValueError, match="request_timeout_s"):
        Lookup(bytes(20), bytes(20), c, now=0, request_timeout_s=-1)
    with pytest.raises(ArgumentTypeError, match="request_timeout_s"):
        Lookup(bytes(20), bytes(20), c, now=0, request_timeout_s="1")
    bad_callable = Lookup(bytes(20), bytes(20), c, now=0, request_timeout_s=lambda contact: 0)
    with pytest.raises(ArgumentValueError, match="request_timeout_s"):
        bad_callable.poll(0)
    second_bad = Lookup(bytes(20), bytes(20), c, now=0,
                        request_timeout_s=lambda contact: 1.0 if contact == c[0] else math.nan)
    with pytest.raises(ArgumentValueError, match="request_timeout_s"):
        second_bad.poll(0)
    assert second_bad.requests_sent == 0 and second_bad.in_flight == 0  # nothing half-sent

    lookup = Lookup(bytes(20), bytes(20), c, now=0)
    (a, _) = lookup.poll(0)
    with pytest.raises(ArgumentTypeError, match="closer"):
        lookup.on_success(a.node_id, [a, a.node_id], 0.1)
    with pytest.raises(ArgumentTypeError, match="closer"):
        lookup.on_success(a.node_id, None, 0.1)
    with pytest.raises(ArgumentTypeError, match="peer_id"):
        lookup.on_success(str(a.node_id), [], 0.1)
    with pytest.raises(ArgumentValueError, match="peer_id"):
        lookup.on_failure(bytes(3), 0.1)
    with pytest.raises(ArgumentTypeError, match="now"):
        lookup.poll(None)
    # nothing changed by the refused calls
    assert lookup.state_of(a.node_id) is PeerState.IN_FLIGHT
    assert lookup.stats.unsolicited == 0 and len(lookup) == 2
