"""Routing-table and record upkeep of the DHT engine (node.py, "Upkeep"): bucket refresh, refresh
after the join, republishing the own record at half its TTL, hourly re-replication of stored
records, eviction of contacts that keep failing, and the external address from PONG votes."""

from __future__ import annotations

import random
from collections import Counter

from sovereign_discovery.addresses import Address
from sovereign_discovery.events import ContactRemoved, ExternalAddressChanged, LookupFinished
from sovereign_discovery.identity import Identity
from sovereign_discovery.keys import bucket_index
from sovereign_discovery.node import DhtConfig, DhtEngine
from sovereign_discovery.records import PeerRecord
from sovereign_discovery.wire import FindNode, Nodes, Ping, Pong, capability_key

from .test_node import EPOCH, A, B, C, Client, Hand, make_engine, of_type, trio


class Silent:
    """A crashed host: takes datagrams and never answers."""

    def __init__(self) -> None:
        self.received = 0

    def receive_datagram(self, data: bytes, source: Address, now: float) -> None:
        self.received += 1

    def datagrams_to_send(self) -> list:
        return []


def run_timers(hand: Hand, engines, start: float, end: float, max_steps: int = 10_000) -> float:
    """Advance every engine's timer from ``start`` to ``end`` (deadline by deadline), moving
    datagrams at each step. Returns the time reached."""
    now = start
    for _ in range(max_steps):
        due = min(e.next_deadline() for e in engines)
        if due > end:
            break
        now = max(now, due)
        for engine in engines:
            if engine.next_deadline() <= now:
                engine.handle_timer(now)
        hand.pump(now)
    else:
        raise AssertionError("timers still due after max_steps")
    return now


def trio_with(config: DhtConfig):
    """Engines at A, B, C with ``config``; B and C bootstrapped from A."""
    hand = Hand()
    a = hand.add(make_engine(1, A, config=config), A)
    b = hand.add(make_engine(2, B, config=config), B)
    c = hand.add(make_engine(3, C, config=config), C)
    b.bootstrap([a.contact(A)], 0.0)
    hand.pump(0.0)
    c.bootstrap([a.contact(A)], 0.0)
    hand.pump(0.0)
    for engine in (a, b, c):
        engine.events()
    return hand, a, b, c


def test_idle_buckets_are_refreshed_with_a_lookup_inside_each():
    config = DhtConfig(refresh_interval_s=100.0)
    hand = Hand()
    a = hand.add(make_engine(1, A, config=config), A)
    b = hand.add(make_engine(2, B, config=config), B)
    c = hand.add(make_engine(3, C, config=config), C)
    b.bootstrap([a.contact(A)], 0.0)
    c.bootstrap([a.contact(A)], 0.0)
    hand.pump(0.0)
    a.events()
    assert a.refresh(50.0) == []  # nothing idle for 100 s yet
    queries = a.refresh(150.0)
    assert len(queries) == a.table.bucket_count >= 1
    hand.pump(150.0)
    finished = [e for e in of_type(a.events(), LookupFinished) if e.query in queries]
    assert len(finished) == len(queries)
    buckets = sorted(a.table.bucket_index(e.target) for e in finished)
    assert buckets == list(range(a.table.bucket_count))  # one random target inside each bucket
    assert a.refresh(151.0) == []  # every bucket just had a lookup
    assert len(a.refresh(151.0, force=True)) == a.table.bucket_count


def test_upkeep_refreshes_on_its_own_clock():
    config = DhtConfig(refresh_interval_s=30.0)
    hand, a, b, c = trio_with(config)
    run_timers(hand, [a], 0.0, 29.0)
    assert not of_type(a.events(), LookupFinished)
    run_timers(hand, [a], 29.0, 32.0)
    refreshed = of_type(a.events(), LookupFinished)
    assert len(refreshed) == a.table.bucket_count


def _join_network(config: DhtConfig, size: int = 29, prefill: int = 0):
    """``size`` engines at 192.0.2.x joined one by one through the first; returns the newcomer
    (the last) and the LookupFinished events of its join (the bootstrap's first). With
    ``prefill``, the newcomer's bucket 0 first gets that many of the others (as if it had heard
    from them)."""
    hand = Hand()
    addresses = [Address(f"192.0.2.{i}", 4000) for i in range(1, size + 1)]
    engines = [hand.add(make_engine(i, address, config=config), address)
               for i, address in zip(range(1, size + 1), addresses)]
    seed = engines[0].contact(addresses[0])
    for engine in engines[1:-1]:
        engine.bootstrap([seed], 0.0)
        hand.pump(0.0)
    newcomer = engines[-1]
    mine = int.from_bytes(newcomer.node_id, "big")
    far = [e.contact(address) for e, address in zip(engines[:-1], addresses)
           if (int.from_bytes(e.node_id, "big") ^ mine).bit_length() == 160]  # prefix length 0
    for contact in far[:prefill]:
        newcomer.table.insert(contact, 0.0)
    query = newcomer.bootstrap([seed], 0.0)
    hand.pump(0.0)
    finished = of_type(newcomer.events(), LookupFinished)
    assert finished[0].query == query and finished[0].closest
    return newcomer, finished


def _prefix(engine: DhtEngine, node_id: bytes) -> int:
    return bucket_index(engine.node_id, node_id)


def test_join_refreshes_every_prefix_farther_than_the_nearest_neighbour_with_a_large_budget():
    # Kademlia §2.3 as the paper has it: the budget covers every prefix length (none is full:
    # k = 20), the farthest first, each a lookup of the k closest.
    newcomer, finished = _join_network(DhtConfig(join_refresh_buckets=64, join_refresh_closest=20))
    prefixes = [_prefix(newcomer, e.target) for e in finished[1:]]
    assert sorted(prefixes) == list(range(len(prefixes)))
    assert len(prefixes) >= newcomer.table.bucket_count - 1 >= 1
    assert len(newcomer.table) == 28  # a small network: everyone is known


def _refreshes_as_seen_at_join_end(monkeypatch) -> list[tuple[Counter, int, list[int]]]:
    """Record, at each join's end, the newcomer's contacts per common-prefix length, its bucket
    count, and the prefix lengths the join refresh then looked up."""
    seen: list[tuple[Counter, int, list[int]]] = []
    original = DhtEngine._refresh_after_join

    def recording(engine: DhtEngine, now: float):
        held = Counter(_prefix(engine, c.node_id) for c in engine.table)
        buckets = engine.table.bucket_count
        started = original(engine, now)
        targets = [engine._queries[q].target for q in started if q in engine._queries]
        seen.append((held, buckets, [_prefix(engine, t) for t in targets]))
        return started

    monkeypatch.setattr(DhtEngine, "_refresh_after_join", recording)
    return seen


def test_join_refreshes_every_empty_prefix_and_the_farthest_others_within_its_budget(monkeypatch):
    # Every prefix length farther than the nearest neighbour that holds no contact is looked up
    # (an empty bucket is a dead end for lookups into it); of the others not full, at most
    # join_refresh_buckets, the farthest first. The default budget is one.
    assert DhtConfig().join_refresh_buckets == 1
    seen = _refreshes_as_seen_at_join_end(monkeypatch)
    unsplit_with_holes = 0
    for size in (29, 60, 120):
        for budget in (0, 1, 2):
            seen.clear()
            newcomer, finished = _join_network(DhtConfig(join_refresh_buckets=budget), size=size)
            held, buckets, refreshed = seen[-1]  # the newcomer's join: the last one
            deepest = max(held)
            empty = [p for p in range(deepest) if held[p] == 0]
            partial = [p for p in range(deepest) if 0 < held[p] < DhtConfig().bucket_size][:budget]
            assert sorted(refreshed) == sorted(empty + partial), (size, budget, held)
            assert len(finished) - 1 == len(refreshed)  # each refresh lookup ended
            unsplit_with_holes += buckets == 1 and bool(empty)
            # No dead end left: every prefix length below the nearest neighbour's that some node
            # of the network has is now held by a contact.
            others = {_prefix(newcomer, c.node_id) for c in newcomer.table}
            assert all(p in others for p in empty), (size, budget, empty, others)
    # The case that hid the empty prefixes before: exactly k contacts, one unsplit bucket.
    assert unsplit_with_holes >= 1


def test_join_refresh_lookups_end_at_join_refresh_closest_and_still_fill_every_empty_prefix():
    # The join's refresh lookups end once join_refresh_closest of the closest to their target
    # have answered (default 5), not k: fewer requests, and every prefix length that was empty
    # still gets contacts. The self-lookup before them still seeks k.
    assert DhtConfig().join_refresh_closest == 5
    sent = {}
    for closest in (5, 20):
        newcomer, finished = _join_network(DhtConfig(join_refresh_buckets=64,
                                                     join_refresh_closest=closest), size=120)
        bootstrap, refreshes = finished[0], finished[1:]
        assert len(bootstrap.closest) == 20
        assert refreshes and all(len(e.closest) <= closest for e in refreshes)
        assert max(len(e.closest) for e in refreshes) == closest
        held = {_prefix(newcomer, c.node_id) for c in newcomer.table}
        assert all(_prefix(newcomer, e.target) in held for e in refreshes)
        sent[closest] = sum(e.requests for e in refreshes)
    assert sent[5] < sent[20]
    # Capped at k: a larger value is a full lookup, never an error.
    newcomer, finished = _join_network(DhtConfig(bucket_size=4, join_refresh_closest=5), size=40)
    assert all(len(e.closest) <= 4 for e in finished)


def test_join_refresh_skips_prefixes_that_are_already_full(monkeypatch):
    # k = 2 and prefix length 0 full before the join: it is not looked up, the budget goes on.
    seen = _refreshes_as_seen_at_join_end(monkeypatch)
    newcomer, finished = _join_network(DhtConfig(bucket_size=2, join_refresh_buckets=2), prefill=2)
    held, _, refreshed = seen[-1]
    assert held[0] == 2 and 0 not in refreshed and refreshed
    # One contact at prefix length 0: not full, so it is refreshed first, within the budget.
    newcomer, finished = _join_network(DhtConfig(bucket_size=2, join_refresh_buckets=2), prefill=1)
    held, _, refreshed = seen[-1]
    assert held[0] == 1 and 0 in refreshed


def test_config_accepts_zero_only_where_it_means_none():
    assert DhtConfig(join_refresh_buckets=0, liveness_recent_s=0).liveness_recent_s == 0
    for bad in ({"join_refresh_buckets": -1}, {"liveness_recent_s": -1.0}, {"upkeep_interval_s": 0},
                {"join_refresh_closest": 0}):
        try:
            DhtConfig(**bad)
        except ValueError as exc:
            assert next(iter(bad)) in str(exc)
        else:
            raise AssertionError(f"{bad} accepted")


def test_owner_republishes_its_record_at_half_its_ttl():
    config = DhtConfig(record_ttl_s=100.0)
    hand, a, b, c = trio_with(config)
    b.announce_record(0.0)
    hand.pump(0.0)
    first = b.own_record
    assert a.store.get(b.node_id, EPOCH) == first
    run_timers(hand, [b], 0.0, 49.0)
    assert b.own_record == first
    run_timers(hand, [b], 49.0, 51.0)
    second = b.own_record
    assert second.seq > first.seq and second.expires_at > first.expires_at
    assert a.store.get(b.node_id, EPOCH + 51) == second
    assert c.store.get(b.node_id, EPOCH + 51) == second


def test_capabilities_are_republished_too():
    config = DhtConfig(record_ttl_s=100.0)
    hand, a, b, c = trio_with(config)
    b.announce_capability("relay", 0.0)
    hand.pump(0.0)
    key = capability_key("relay")
    [held] = a.store.providers(key, EPOCH, 20)
    run_timers(hand, [b], 0.0, 51.0)
    [again] = a.store.providers(key, EPOCH + 51, 20)
    assert again.seq > held.seq and again.capabilities == ("relay",)


def test_stored_records_are_re_replicated_to_the_closest():
    config = DhtConfig(replication_interval_s=60.0)
    hand, a, b, c = trio_with(config)
    owner = Client(70).identity
    record = PeerRecord.create(owner, addresses=[Address("192.0.2.70", 4000)], capabilities=[],
                               seq=5, expires_at=int(EPOCH) + 3600)
    a.store.put(owner.node_id, record, b"someone", EPOCH)  # as if a STORE had arrived
    assert b.store.get(owner.node_id, EPOCH) is None
    run_timers(hand, [a], 0.0, 59.0)
    assert b.store.get(owner.node_id, EPOCH + 59) is None
    run_timers(hand, [a], 59.0, 62.0)
    assert b.store.get(owner.node_id, EPOCH + 62) == record
    assert c.store.get(owner.node_id, EPOCH + 62) == record


def test_a_contact_that_keeps_failing_is_evicted():
    hand, a, b, c = trio()
    assert c.node_id in a.table
    hand.hosts[C] = silent = Silent()  # C crashes
    a.events()
    now = 10.0
    for attempt in range(2):
        a.find_node(c.node_id, now)
        hand.pump(now)
        now = run_timers(hand, [a], now, now + 12.0)
        if attempt == 0:
            assert c.node_id in a.table  # one failed request is not enough
    assert c.node_id not in a.table
    assert ContactRemoved(c.node_id) in a.events()
    assert a.stats()["contacts_evicted"] == 1
    assert b.node_id in a.table  # B answered throughout
    assert silent.received > 0


def _pong_voters(hand: Hand, engine, observed: list[Address], now: float, first: int = 0) -> list[Client]:
    """Clients at distinct /24s that answer the engine's PINGs (and FIND_NODEs) by hand, each
    reporting the address in ``observed``."""
    voters = []
    for i, seen in enumerate(observed, start=first):
        client = hand.add(Client(80 + i), Address(f"198.51.{100 + i}.7", 4000))
        voters.append(client)
        engine.bootstrap([client.contact(Address(f"198.51.{100 + i}.7", 4000))], now)
        hand.pump(now)
        for message in client.take():
            if isinstance(message, Ping):
                client.send(engine.contact(A), Pong(message.request_id, 0, seen), now)
            elif isinstance(message, FindNode):
                client.send(engine.contact(A), Nodes(message.request_id, 1, ()), now)
        hand.pump(now)
    return voters


def test_external_address_follows_a_majority_of_pong_votes():
    hand = Hand()
    a = hand.add(make_engine(1, A), A)
    a.announce_record(0.0)
    public = Address("203.0.113.9", 40000)
    _pong_voters(hand, a, [public, public], 0.0)
    assert not of_type(a.events(), ExternalAddressChanged)  # two voters are not enough
    _pong_voters(hand, a, [public], 0.0, first=2)
    events = a.events()
    assert ExternalAddressChanged(public) in events
    assert a.advertised_address == public
    assert a.own_record.addresses == (public,)  # re-signed with it


def test_one_network_cannot_outvote_the_others():
    hand = Hand()
    a = hand.add(make_engine(1, A), A)
    liar = Address("203.0.113.66", 1)
    # five clients from one /24 count as one voter
    for i in range(5):
        client = hand.add(Client(90 + i), Address(f"198.51.100.{10 + i}", 4000))
        a.bootstrap([client.contact(Address(f"198.51.100.{10 + i}", 4000))], 0.0)
        hand.pump(0.0)
        for message in client.take():
            if isinstance(message, Ping):
                client.send(a.contact(A), Pong(message.request_id, 0, liar), 0.0)
        hand.pump(0.0)
    assert a.stats()["address_voters"] == 1
    assert a.advertised_address == A
    assert not of_type(a.events(), ExternalAddressChanged)


def test_a_fixed_address_is_not_learned():
    hand = Hand()
    identity = Identity.from_seed(random.Random(1).randbytes(32))
    a = hand.add(DhtEngine(identity, random_bytes=random.Random(1).randbytes, rng=random.Random(2),
                           now=0.0, unix_offset=EPOCH, advertised_address=A, learn_address=False), A)
    _pong_voters(hand, a, [Address("203.0.113.9", 40000)] * 3, 0.0)
    assert a.advertised_address == A
    assert not of_type(a.events(), ExternalAddressChanged)
