"""RoutingTable behaviour, case by case, against both kernels (the ``kernel`` fixture)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sovereign_discovery import (
    Address,
    ArgumentTypeError,
    ArgumentValueError,
    Cached,
    Contact,
    DiversityLimits,
    Full,
    Identity,
    Inserted,
    NodeId,
    Pending,
    Rejected,
    Removed,
    RoutingTable,
    Updated,
)

from .helpers import Peer, brute_closest, id_near, model_bucket

LOCAL = NodeId(bytes(20))


def in_bucket(index: int, n: int, *, host: str = "127.0.0.1") -> list[Peer]:
    """``n`` peers sharing exactly ``index`` leading bits with LOCAL (all zero bits)."""
    top = 1 << (159 - index)
    return [Peer(NodeId.from_int(top | (i + 1)), Address(host, 1000 + i)) for i in range(n)]


def table(kernel, **kw) -> RoutingTable:
    kw.setdefault("bucket_size", 4)
    kw.setdefault("replacement_cache_size", 3)
    return RoutingTable(LOCAL, kernel=kernel, **kw)


def test_contact_derives_its_node_id_from_the_key():
    me = Identity.from_seed(b"\x07" * 32)
    contact = Contact(me.public_key, Address("127.0.0.1", 5000))
    assert contact.node_id == me.node_id
    with pytest.raises(ArgumentValueError, match="public_key"):
        Contact(b"short", Address("127.0.0.1", 5000))
    with pytest.raises(ArgumentTypeError, match="address"):
        Contact(me.public_key, ("127.0.0.1", 5000))  # type: ignore[arg-type]


def test_insert_update_and_lookup(kernel):
    t = table(kernel)
    a, b = in_bucket(0, 2)
    assert t.insert(a, 1) == Inserted(a)
    assert t.insert(b, 2) == Inserted(b)
    assert t.bucket(0) == [a, b]
    moved = Peer(a.node_id, Address("127.0.0.2", 7))
    assert t.insert(moved, 3) == Updated(moved)
    assert t.bucket(0) == [b, moved]  # most recently seen at the tail, with the new address
    assert t.get(a.node_id) is moved and a.node_id in t and len(t) == 2
    assert t.get(NodeId(b"\x99" * 20)) is None


def test_own_id_is_rejected(kernel):
    t = table(kernel)
    assert t.insert(Peer(LOCAL), 0) == Rejected(Peer(LOCAL), "own-id")
    assert len(t) == 0 and LOCAL not in t
    assert t.touch(LOCAL, 1) is False and t.remove(LOCAL, 1) is None


def test_full_bucket_asks_for_a_liveness_check_of_its_oldest_entry(kernel):
    t = table(kernel)
    t.insert(Peer(NodeId.from_int(1)), 0)  # a deep contact, so bucket 0 is not the last bucket
    members = in_bucket(0, 7)
    for peer in members[:4]:
        assert isinstance(t.insert(peer, 1), Inserted)
    oldest = members[0]
    assert t.insert(members[4], 2) == Pending(members[4], oldest)
    assert t.checking(0) == oldest
    assert t.insert(members[5], 3) == Full(members[5], oldest)  # one check at a time
    assert t.bucket(0) == members[:4]  # nobody was evicted
    assert t.replacements(0) == [members[4], members[5]]


def test_oldest_alive_keeps_its_place_and_the_candidate_waits(kernel):
    t = table(kernel)
    t.insert(Peer(NodeId.from_int(1)), 0)
    members = in_bucket(0, 5)
    for peer in members:
        t.insert(peer, 1)
    assert t.touch(members[0].node_id, 2)  # the liveness check succeeded
    assert t.checking(0) is None
    assert t.bucket(0) == members[1:4] + [members[0]]  # long-lived contact kept (paper §2.2)
    assert t.replacements(0) == [members[4]]
    assert t.insert(members[4], 3) == Pending(members[4], members[1])  # next check: new oldest


def test_failed_check_evicts_and_promotes_the_newest_replacement(kernel):
    t = table(kernel)
    t.insert(Peer(NodeId.from_int(1)), 0)
    members = in_bucket(0, 6)
    for peer in members:
        t.insert(peer, 1)
    assert t.remove(members[0].node_id, 2) == Removed(members[0], members[5])
    assert t.bucket(0) == members[1:4] + [members[5]]
    assert t.replacements(0) == [members[4]]
    assert t.checking(0) is None
    assert t.remove(members[4].node_id, 3) == Removed(members[4], None)  # a waiting candidate
    assert t.remove(members[4].node_id, 3) is None


def test_no_check_while_the_oldest_entry_was_heard_from_recently(kernel):
    """BEP 5: the oldest entry of a full bucket is pinged only once it has not been heard from
    for liveness_recent_s; until then a newcomer just waits in the replacement cache."""
    t = table(kernel, liveness_recent_s=100.0)
    assert t.liveness_recent_s == 100.0
    t.insert(Peer(NodeId.from_int(1)), 0)
    members = in_bucket(0, 6)
    for i, peer in enumerate(members[:4]):
        t.insert(peer, 10 + i)  # heard from at 10, 11, 12, 13
    assert [t.last_seen(p.node_id) for p in members[:4]] == [10.0, 11.0, 12.0, 13.0]
    assert t.insert(members[4], 109) == Cached(members[4])  # the oldest: 99 s ago
    assert t.checking(0) is None and t.replacements(0) == [members[4]]
    assert t.insert(members[0], 50) == Updated(members[0])  # heard from again: to the tail
    assert t.bucket(0) == members[1:4] + [members[0]]
    assert [t.last_seen(p.node_id) for p in t.bucket(0)] == [11.0, 12.0, 13.0, 50.0]
    assert t.insert(members[5], 111) == Pending(members[5], members[1])  # 100 s: due
    assert t.insert(members[4], 112) == Full(members[4], members[1])
    assert t.insert_counts == {"pending": 1, "cached": 1, "full": 1}
    removed = t.remove(members[1].node_id, 113)
    assert removed == Removed(members[1], members[4])  # the most recently seen replacement
    assert t.last_seen(members[4].node_id) == float("-inf")  # not heard from since it waited
    assert t.last_seen(members[1].node_id) is None
    assert [t.last_seen(p.node_id) for p in t.bucket(0)] == [12.0, 13.0, 50.0, float("-inf")]
    assert t.touch(members[4].node_id, 114) and t.last_seen(members[4].node_id) == 114.0


def test_last_seen_times_follow_their_contacts_through_a_split(kernel):
    t = table(kernel)
    deep = [Peer(NodeId.from_int(i)) for i in range(1, 40)]  # prefixes 154..159: splits
    for i, p in enumerate(deep):
        t.insert(p, float(i))
    assert t.bucket_count > 1
    for p in deep:
        if p.node_id in t:
            assert t.last_seen(p.node_id) == float(deep.index(p))
    assert t.liveness_recent_s == 0.0  # the default: a full bucket always asks for a check


def test_replacement_cache_is_bounded_and_keeps_the_most_recent(kernel):
    t = table(kernel, replacement_cache_size=2)
    t.insert(Peer(NodeId.from_int(1)), 0)
    members = in_bucket(0, 8)
    for peer in members:
        t.insert(peer, 1)
    assert t.replacements(0) == members[6:8]
    t.insert(members[6], 2)  # seen again: moves to the most recent end
    assert t.replacements(0) == [members[7], members[6]]


def test_no_replacement_cache(kernel):
    t = table(kernel, replacement_cache_size=0)
    t.insert(Peer(NodeId.from_int(1)), 0)
    members = in_bucket(0, 5)
    for peer in members:
        t.insert(peer, 1)
    assert t.replacements(0) == []
    assert t.remove(members[0].node_id, 2) == Removed(members[0], None)


def test_last_bucket_unfolds_instead_of_refusing(kernel):
    t = table(kernel)
    deep = [Peer(NodeId.from_int(i)) for i in range(1, 40)]  # prefixes 154..159
    results = [t.insert(p, 0) for p in deep]
    assert t.bucket_count > 1
    by_prefix: dict[int, int] = {}
    for p in deep:
        prefix = kernel.bucket_index(LOCAL, p.node_id)
        by_prefix[prefix] = by_prefix.get(prefix, 0) + 1
    expected_inserted = sum(min(n, 4) for n in by_prefix.values())
    assert sum(isinstance(r, Inserted) for r in results) == expected_inserted == len(t)


def test_diversity_limits_per_bucket_and_per_table(kernel):
    limits = DiversityLimits(max_per_bucket=2, max_per_table=3)
    t = table(kernel, bucket_size=8, diversity=limits)
    same_net = in_bucket(0, 3, host="198.51.100.1") + in_bucket(1, 3, host="198.51.100.2")
    results = [t.insert(p, 0) for p in same_net]
    assert [type(r).__name__ for r in results] == ["Inserted", "Inserted", "Rejected",
                                                   "Inserted", "Rejected", "Rejected"]
    assert results[2].reason == "diversity-bucket" and results[4].reason == "diversity-table"
    other_net = in_bucket(1, 1, host="203.0.113.9")[0]
    assert isinstance(t.insert(Peer(NodeId.from_int((1 << 158) | 99), other_net.address), 0), Inserted)
    t.remove(same_net[0].node_id, 1)  # frees one place in the /24's table quota
    assert isinstance(t.insert(same_net[4], 2), Inserted)


def test_diversity_can_be_switched_on_later(kernel):
    t = table(kernel, bucket_size=8)
    for p in in_bucket(0, 3, host="198.51.100.1"):
        assert isinstance(t.insert(p, 0), Inserted)  # off by default
    t.diversity = DiversityLimits(max_per_bucket=None, max_per_table=3)
    assert t.insert(in_bucket(1, 1, host="198.51.100.7")[0], 1).reason == "diversity-table"
    t.diversity = None
    assert isinstance(t.insert(in_bucket(1, 1, host="198.51.100.7")[0], 1), Inserted)


def test_refresh_bookkeeping(kernel):
    t = table(kernel, now=0)
    t.insert(in_bucket(0, 1)[0], 100)
    assert t.buckets_due_for_refresh(now=150, interval_s=60) == []
    assert t.buckets_due_for_refresh(now=160, interval_s=60) == [0]
    t.mark_bucket_active(0, 200)
    assert t.last_activity(0) == 200
    rng = random.Random(3)
    for prefix in (0, 1, 17, 100, 158, 159):
        target = t.random_id_with_prefix(prefix, rng)
        assert kernel.bucket_index(LOCAL, target) == prefix
    for bad in (-1, 160, True):
        with pytest.raises(ArgumentValueError):
            t.random_id_with_prefix(bad, rng)
    assert kernel.bucket_index(LOCAL, t.random_id_in_bucket(0, rng)) == 0  # the only bucket
    with pytest.raises(ArgumentValueError):
        t.random_id_in_bucket(1, rng)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32), deltas=st.lists(st.integers(1, 2**24), max_size=60, unique=True),
       target_delta=st.integers(0, 2**30))
def test_closest_is_exact_near_the_local_id(kernel, seed, deltas, target_delta):
    rng = random.Random(seed)
    local = bytes(rng.getrandbits(8) for _ in range(20))
    t = RoutingTable(local, bucket_size=5, kernel=kernel)
    for d in deltas:
        t.insert(Peer(id_near(local, d)), 0)
    for _ in range(30):
        t.insert(Peer(bytes(rng.getrandbits(8) for _ in range(20))), 0)
    everything = list(t)
    for target in (local, id_near(local, target_delta)):
        for count in (1, 5, 20, 500):
            assert t.closest(target, count) == brute_closest(everything, target, count)


@pytest.mark.parametrize("call, error, name", [
    (lambda t: t.closest(b"x" * 19, 3), ArgumentValueError, "target"),
    (lambda t: t.closest("x" * 20, 3), ArgumentTypeError, "target"),
    (lambda t: t.closest(b"x" * 20, -1), ArgumentValueError, "count"),
    (lambda t: t.closest(b"x" * 20, 2.0), ArgumentTypeError, "count"),
    (lambda t: t.insert(object(), 0), ArgumentTypeError, "contact"),
    (lambda t: t.insert(Peer(b"x" * 20), "now"), ArgumentTypeError, "now"),
    (lambda t: t.touch(b"x" * 21, 0), ArgumentValueError, "node_id"),
    (lambda t: t.bucket(5), ArgumentValueError, "index"),
])
def test_caller_mistakes_get_the_same_typed_error_from_both_kernels(kernel, call, error, name):
    with pytest.raises(error, match=name):
        call(table(kernel))


@pytest.mark.parametrize("kw, name", [
    (dict(bucket_size=0), "bucket_size"), (dict(bucket_size=256), "bucket_size"),
    (dict(replacement_cache_size=-1), "replacement_cache_size"),
    (dict(diversity="yes"), "diversity"),
    (dict(liveness_recent_s=-1.0), "liveness_recent_s"), (dict(liveness_recent_s="1"), "liveness_recent_s"),
])
def test_constructor_checks(kw, name):
    with pytest.raises((ArgumentValueError, ArgumentTypeError), match=name):
        RoutingTable(LOCAL, **kw)
    with pytest.raises(ArgumentValueError, match="local_id"):
        RoutingTable(b"short")


def test_address_parsing():
    assert str(Address.parse("127.0.0.1:4000")) == "127.0.0.1:4000"
    assert str(Address.parse("[::1]:4000")) == "[::1]:4000"
    assert Address("::ffff:192.0.2.1", 1) == Address("192.0.2.1", 1)
    for bad in ("127.0.0.1", "::1:4000", "[::1]4000", "host:1", "0.0.0.0:1", "224.0.0.1:1", "1.2.3.4:0",
                "1.2.3.4:70000", "1.2.3.4:²", "1.2.3.4:٣"):
        with pytest.raises(ArgumentValueError):
            Address.parse(bad)


def _state(t: RoutingTable) -> tuple:
    """Everything a table's later behaviour depends on, read through its public methods."""
    buckets = [t.bucket(i) for i in range(t.bucket_count)]
    return (t.bucket_sizes(), [[c.node_id for c in b] for b in buckets],
            [t.last_activity(i) for i in range(t.bucket_count)],
            [t.replacements(i) for i in range(t.bucket_count)],
            [t.checking(i) for i in range(t.bucket_count)],
            sorted((c.node_id, t.last_seen(c.node_id)) for c in t), len(t))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32), k=st.integers(1, 5), bits=st.integers(1, 3),
       prefixes=st.lists(st.integers(0, 159), max_size=80))
def test_load_builds_the_table_inserts_would_build(kernel, seed, k, bits, prefixes):
    """One pass (a simulator's global view) equals inserting one by one in the same order, for
    any contacts with at most k per bucket of the unfolded table (per prefix length with b = 1):
    the same buckets, order, times and answers."""
    rng = random.Random(seed)
    local = NodeId(bytes(rng.getrandbits(8) for _ in range(20)))
    contacts, seen, per_bucket = [], set(), {}
    for prefix in prefixes:  # an ID sharing exactly `prefix` leading bits with local
        value = local.to_int() ^ (1 << (159 - prefix)) ^ (rng.getrandbits(159 - prefix) if prefix < 159 else 0)
        node_id = NodeId.from_int(value)
        bucket = model_bucket(local, node_id, bits)
        if node_id in seen or per_bucket.get(bucket, 0) == k:
            continue
        seen.add(node_id)
        per_bucket[bucket] = per_bucket.get(bucket, 0) + 1
        contacts.append(Peer(node_id))
    inserted = RoutingTable(local, bucket_size=k, kernel=kernel, now=1.0, bucket_bits=bits)
    for contact in contacts:
        assert isinstance(inserted.insert(contact, 7.0), Inserted)
    loaded = RoutingTable(local, bucket_size=k, kernel=kernel, now=1.0, bucket_bits=bits)
    assert loaded.load(contacts, 7.0) == len(contacts)
    assert _state(loaded) == _state(inserted)
    target = bytes(rng.getrandbits(8) for _ in range(20))
    assert loaded.closest(target, 500) == inserted.closest(target, 500)
    newcomer = Peer(NodeId(bytes(rng.getrandbits(8) for _ in range(20))))
    if newcomer.node_id != local and newcomer.node_id not in seen:  # and they go on alike
        assert type(loaded.insert(newcomer, 9.0)) is type(inserted.insert(newcomer, 9.0))
        assert _state(loaded) == _state(inserted)


@pytest.mark.parametrize("bits", [1, 2, 3])
def test_a_refresh_target_lands_in_the_bucket_it_refreshes(kernel, bits):
    rng = random.Random(bits)
    t = RoutingTable(LOCAL, bucket_size=2, kernel=kernel, bucket_bits=bits)
    for _ in range(300):
        t.insert(Peer(id_near(LOCAL, rng.getrandbits(rng.choice((8, 40, 159))))), 1.0)
    assert t.bucket_count > 10
    for index in range(t.bucket_count):
        for _ in range(3):
            assert t.bucket_index(t.random_id_in_bucket(index, rng)) == index
    with pytest.raises(ArgumentValueError):
        t.random_id_in_bucket(t.bucket_count, rng)


@pytest.mark.parametrize("bits", [2, 3])
def test_more_bits_per_step_split_each_prefix_by_the_bits_after_it(kernel, bits):
    """b = 2: a prefix length that starts a 2-bit digit has two buckets (by the next bit), the
    other one; b = 3: four, two, one. Each holds k of its own, so the table holds more."""
    t = RoutingTable(LOCAL, bucket_size=2, kernel=kernel, bucket_bits=bits)
    rng = random.Random(5)
    for _ in range(400):
        t.insert(Peer(NodeId(rng.randbytes(20))), 1.0)  # mostly shallow prefixes
    assert t.bucket_bits == bits
    by_prefix: dict[int, set] = {}
    for index in range(t.bucket_count - 1):
        for contact in t.bucket(index):
            prefix, sub = model_bucket(LOCAL, contact.node_id, bits)
            by_prefix.setdefault(prefix, set()).add((sub, index))
    for prefix in range(4):
        subs = {sub for sub, _ in by_prefix[prefix]}
        assert len(subs) == 1 << (bits - 1 - prefix % bits)  # every sub-bucket met at 400 contacts
        assert len({index for _, index in by_prefix[prefix]}) == len(subs)
    one_bit = RoutingTable(LOCAL, bucket_size=2, kernel=kernel)
    for contact in t:
        one_bit.insert(contact, 1.0)
    assert len(t) > len(one_bit)
    for bad in (0, 5, True, 1.0):
        with pytest.raises(ArgumentValueError, match="bucket_bits"):
            RoutingTable(LOCAL, bucket_bits=bad)


def test_load_refuses_what_inserts_would_not_do_alike(kernel):
    t = table(kernel)
    with pytest.raises(ArgumentValueError, match="at most bucket_size"):
        t.load(in_bucket(3, 5), 0)  # 5 share prefix 3; k = 4
    with pytest.raises(ArgumentValueError, match="twice"):
        t.load(in_bucket(3, 2) * 2, 0)
    with pytest.raises(ArgumentValueError, match="local ID"):
        t.load([Peer(LOCAL)], 0)
    with pytest.raises(ArgumentTypeError, match="contact"):
        t.load([object()], 0)
    assert len(t) == 0 and t.load(in_bucket(3, 4), 0) == 4
    with pytest.raises(ArgumentValueError, match="empty table"):
        t.load(in_bucket(5, 1), 0)
    diverse = table(kernel, diversity=DiversityLimits(max_per_bucket=2))
    with pytest.raises(ArgumentValueError, match="diversity"):
        diverse.load(in_bucket(3, 1), 0)
