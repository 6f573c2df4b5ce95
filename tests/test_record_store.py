"""The DHT record store: acceptance rules (derived keys, capability keys), which record wins,
expiry, every hard cap, provider answers, replication bookkeeping, caller mistakes, and a
model-based stateful test. All records are real signed ones."""

from __future__ import annotations

import functools
import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from sovereign_discovery import Address, ArgumentTypeError, ArgumentValueError, Identity, PeerRecord
from sovereign_discovery.constants import MAX_RECORD_LIFETIME_S
from sovereign_discovery.record_store import RecordStore, StoreLimits, derived_keys
from sovereign_discovery.wire import StoreStatus, capability_key

T0 = 1_800_000_000  # Unix seconds
HOUR = 3600
STORED = StoreStatus.STORED
FULL = StoreStatus.STORE_FULL


@functools.cache
def ident(i: int) -> Identity:
    return Identity.from_seed(bytes([i + 1]) * 32)


def rec(i: int = 0, *, seq: int = 1, expires_at: int = T0 + HOUR, caps=(), port: int = 4000,
        n_addr: int = 1) -> PeerRecord:
    addrs = [Address(f"127.0.0.{k + 1}", port) for k in range(n_addr)]
    return PeerRecord.create(ident(i), addresses=addrs, capabilities=list(caps), seq=seq,
                             expires_at=expires_at)


def nid(i: int):
    return ident(i).node_id


# --- peer records: acceptance ------------------------------------------------------------------


def test_put_get_round_trip():
    store = RecordStore()
    record = rec(0)
    assert store.put(nid(0), record, "src", T0) is STORED
    assert store.get(nid(0), T0) is record
    assert store.get(nid(1), T0) is None
    assert len(store) == 1
    stats = store.stats
    assert (stats["records"], stats["bytes"], stats["stored"], stats["sources"]) == (
        1, len(record.encoded), 1, 1)


def test_key_not_derived_from_the_record_is_refused():
    store = RecordStore()
    assert store.put(nid(1), rec(0), "src", T0) is StoreStatus.KEY_NOT_DERIVED
    status = store.put(capability_key("store"), rec(0, caps=["store"]), "src", T0)
    assert status is StoreStatus.KEY_NOT_DERIVED
    assert store.get(nid(1), T0) is None and len(store) == 0
    assert store.stats["key_not_derived"] == 2


def test_derived_keys_vector_and_shape():
    node_id = bytes(range(20))
    keys = derived_keys(node_id, 2)
    assert len(keys) == 3 and keys[0] == node_id
    # keys[i] = SHA-256(b"sovereign-discovery/replica\x00" || node_id || i as u8)[:20]
    assert keys[2].hex() == "d5d78db7327710339d1250b25c531cf60f9e39c2"
    digest = hashlib.sha256(b"sovereign-discovery/replica\x00" + node_id + b"\x01").digest()
    assert keys[1] == digest[:20]
    assert derived_keys(node_id, 2) == keys and derived_keys(node_id, 1) == keys[:2]
    assert derived_keys(node_id) == (node_id,)
    assert len(set(derived_keys(node_id, 255))) == 256
    with pytest.raises(ArgumentValueError, match="replicas"):
        derived_keys(node_id, 256)
    with pytest.raises(ArgumentTypeError, match="replicas"):
        derived_keys(node_id, True)
    with pytest.raises(ArgumentValueError, match="node_id"):
        derived_keys(b"short", 1)


def test_replica_keys_accepted_only_up_to_the_setting():
    record = rec(0)
    keys = derived_keys(nid(0), 3)
    store = RecordStore(replicas=2)
    for key in keys[:3]:
        assert store.put(key, record, "src", T0) is STORED
        assert store.get(key, T0) is record
    assert store.put(keys[3], record, "src", T0) is StoreStatus.KEY_NOT_DERIVED
    assert store.put(derived_keys(nid(1), 1)[1], record, "src", T0) is StoreStatus.KEY_NOT_DERIVED
    assert store.stats["records"] == 3
    plain = RecordStore()  # replicas = 0: the node ID only
    assert plain.put(keys[1], record, "src", T0) is StoreStatus.KEY_NOT_DERIVED


# --- which record wins -------------------------------------------------------------------------


def test_newer_seq_replaces_older_and_equal_seq_is_stale_unless_identical():
    store = RecordStore()
    v5, v6 = rec(0, seq=5), rec(0, seq=6)
    assert store.put(nid(0), v5, "a", T0) is STORED
    assert store.put(nid(0), v6, "b", T0) is STORED
    assert store.get(nid(0), T0) is v6
    assert store.put(nid(0), v5, "a", T0) is StoreStatus.STALE  # older
    other_v6 = rec(0, seq=6, port=5000)  # same seq, other bytes: first seen wins (libp2p)
    assert other_v6.encoded != v6.encoded
    assert store.put(nid(0), other_v6, "a", T0) is StoreStatus.STALE
    assert store.put(nid(0), rec(0, seq=6), "c", T0 + 1) is STORED  # identical bytes: a refresh
    assert store.get(nid(0), T0 + 1) is v6
    stats = store.stats
    assert (stats["stored"], stats["replaced"], stats["refreshed"], stats["stale"]) == (1, 1, 1, 2)
    assert stats["records"] == 1 and stats["bytes"] == len(v6.encoded)


# --- time ----------------------------------------------------------------------------------------


def test_expired_and_future_records_are_invalid():
    store = RecordStore()
    expired = rec(0, expires_at=T0)
    future = rec(1, expires_at=T0 + MAX_RECORD_LIFETIME_S + 1, caps=["store"])
    assert store.put(nid(0), expired, "s", T0) is StoreStatus.INVALID_RECORD
    assert store.put(nid(1), future, "s", T0) is StoreStatus.INVALID_RECORD
    status = store.add_provider(capability_key("store"), future, "s", T0)
    assert status is StoreStatus.INVALID_RECORD
    at_limit = rec(1, expires_at=T0 + MAX_RECORD_LIFETIME_S)
    assert store.put(nid(1), at_limit, "s", T0) is STORED
    assert store.stats["invalid_record"] == 3 and store.stats["records"] == 1


def test_stored_record_disappears_when_it_expires():
    store = RecordStore()
    record = rec(0, expires_at=T0 + 100, caps=["store"])
    assert store.put(nid(0), record, "s", T0) is STORED
    assert store.add_provider(capability_key("store"), record, "s", T0) is STORED
    assert store.get(nid(0), T0 + 99) is record
    assert store.stats["bytes"] == 2 * len(record.encoded)
    assert store.expire(T0 + 99) == 0
    assert store.expire(T0 + 100) == 2
    stats = store.stats
    assert (stats["records"], stats["providers"], stats["provider_keys"], stats["bytes"],
            stats["sources"], stats["expired"]) == (0, 0, 0, 0, 0, 2)
    assert store.get(nid(0), T0 + 100) is None and len(store) == 0
    assert store.providers(capability_key("store"), T0 + 100, 10) == []


def test_get_drops_an_expired_record_without_expire():
    store = RecordStore()
    store.put(nid(0), rec(0, expires_at=T0 + 10), "s", T0)
    assert store.get(nid(0), T0 + 10) is None
    assert store.stats["records"] == 0 and store.stats["expired"] == 1


def test_max_ttl_bounds_retention_and_a_refresh_extends_it():
    store = RecordStore(StoreLimits(max_ttl_s=60))
    record = rec(0, expires_at=T0 + HOUR)
    assert store.put(nid(0), record, "s", T0) is STORED
    assert store.put(nid(0), rec(0, expires_at=T0 + HOUR), "s", T0 + 30) is STORED  # refresh
    assert store.get(nid(0), T0 + 89) is record
    assert store.get(nid(0), T0 + 90) is None
    # never past the record's own expiry, whatever the TTL
    assert store.put(nid(1), rec(1, expires_at=T0 + 20), "s", T0) is STORED
    assert store.get(nid(1), T0 + 20) is None


# --- caps ----------------------------------------------------------------------------------------


def test_max_records_refuses_new_keys_but_accepts_newer_seq():
    store = RecordStore(StoreLimits(max_records=3))
    held = {i: rec(i, expires_at=T0 + 100 * (i + 1)) for i in range(3)}
    for i, record in held.items():
        assert store.put(nid(i), record, f"s{i}", T0) is STORED
    assert store.put(nid(3), rec(3), "s3", T0) is FULL
    assert store.stats["full_records"] == 1 and store.stats["records"] == 3
    for i, record in held.items():
        assert store.get(nid(i), T0) is record
    newer = rec(1, seq=2)
    assert store.put(nid(1), newer, "s9", T0) is STORED  # a held key, even when full
    assert store.get(nid(1), T0) is newer
    assert store.put(nid(3), rec(3), "s3", T0 + 100) is STORED  # record 0 expired: room again


def test_max_total_bytes():
    small = rec(0)
    size = len(small.encoded)
    store = RecordStore(StoreLimits(max_total_bytes=2 * size + 10))
    assert store.put(nid(0), small, "a", T0) is STORED
    assert store.put(nid(1), rec(1), "b", T0) is STORED
    assert store.put(nid(2), rec(2), "c", T0) is FULL
    assert store.add_provider(capability_key("x"), rec(2, caps=["x"]), "c", T0) is FULL
    assert store.stats["full_bytes"] == 2
    assert store.get(nid(0), T0) is small and store.get(nid(1), T0) is not None
    same_size = rec(0, seq=2, port=4001)
    assert store.put(nid(0), same_size, "a", T0) is STORED  # newer seq of the same size
    # The one documented exception: a newer record that grew past the byte cap is refused and
    # the held one stays.
    grown = rec(0, seq=3, n_addr=3)
    assert store.put(nid(0), grown, "a", T0) is FULL
    assert store.get(nid(0), T0) is same_size
    assert store.stats["bytes"] <= 2 * size + 10


def test_per_source_limit():
    limits = StoreLimits(max_records_per_source=2, max_providers_per_source=1)
    store = RecordStore(limits)
    assert store.put(nid(0), rec(0), "mallory", T0) is STORED
    assert store.put(nid(1), rec(1), "mallory", T0) is STORED
    assert store.put(nid(2), rec(2), "mallory", T0) is FULL
    assert store.stats["full_source"] == 1
    assert store.put(nid(2), rec(2), "alice", T0) is STORED  # another source has its own quota
    assert store.put(nid(0), rec(0, seq=2), "mallory", T0) is STORED  # a held key: accepted
    assert store.get(nid(0), T0).seq == 2 and store.get(nid(1), T0) is not None
    for i in range(3, 6):  # the local node (source None) has no quota
        assert store.put(nid(i), rec(i), None, T0) is STORED
    # sources are opaque hashables (an IP group later)
    group = ("ip4", 0x7F0000)
    assert store.put(nid(6), rec(6), group, T0) is STORED
    key = capability_key("relay")
    assert store.add_provider(key, rec(0, caps=["relay"]), "mallory", T0) is STORED  # own quota
    assert store.add_provider(key, rec(1, caps=["relay"]), "mallory", T0) is FULL
    assert store.add_provider(key, rec(1, caps=["relay"]), "alice", T0) is STORED
    # charges are released when the entries expire
    assert store.stats["sources"] == 3
    store.expire(T0 + HOUR)
    assert store.stats["sources"] == 0
    assert store.put(nid(2), rec(2, expires_at=T0 + 2 * HOUR), "mallory", T0 + HOUR) is STORED


def test_an_entry_stays_charged_to_the_source_that_created_it():
    store = RecordStore(StoreLimits(max_records_per_source=1))
    assert store.put(nid(0), rec(0), "a", T0) is STORED
    assert store.put(nid(0), rec(0, seq=2), "b", T0) is STORED  # b replaces a's entry
    assert store.put(nid(1), rec(1), "a", T0) is FULL  # still charged to a
    assert store.put(nid(1), rec(1), "b", T0) is STORED  # b's quota was not used


def test_max_provider_keys():
    store = RecordStore(StoreLimits(max_provider_keys=2))
    record = rec(0, caps=["a", "b", "c"])
    assert store.add_provider(capability_key("a"), record, "s", T0) is STORED
    assert store.add_provider(capability_key("b"), record, "s", T0) is STORED
    assert store.add_provider(capability_key("c"), record, "s", T0) is FULL
    assert store.stats["full_provider_keys"] == 1 and store.stats["provider_keys"] == 2
    assert store.providers(capability_key("a"), T0, 5) == [record]
    assert store.providers(capability_key("c"), T0, 5) == []
    newer = rec(0, seq=2, caps=["a", "b", "c"])
    assert store.add_provider(capability_key("b"), newer, "s", T0) is STORED
    assert store.providers(capability_key("b"), T0, 5) == [newer]
    assert store.add_provider(capability_key("a"), rec(1, caps=["a"]), "s", T0) is STORED


def test_max_providers_per_key_refuses_new_providers():
    store = RecordStore(StoreLimits(max_providers_per_key=2))
    key = capability_key("relay")
    first = rec(0, caps=["relay"], expires_at=T0 + 100)
    second = rec(1, caps=["relay"], expires_at=T0 + 200)
    assert store.add_provider(key, first, "s", T0) is STORED
    assert store.add_provider(key, second, "s", T0) is STORED
    # A newcomer is refused even with a later expiry: no eviction of established providers.
    late = rec(2, caps=["relay"], expires_at=T0 + 5 * HOUR)
    assert store.add_provider(key, late, "s", T0) is FULL
    assert store.stats["full_providers_per_key"] == 1
    assert set(store.providers(key, T0, 10)) == {first, second}
    renewed = rec(0, seq=2, caps=["relay"], expires_at=T0 + 300)
    assert store.add_provider(key, renewed, "s", T0 + 1) is STORED  # a held provider re-announces
    assert store.providers(key, T0 + 1, 10) == [renewed, second]  # most recently announced first
    assert store.add_provider(key, late, "s", T0 + 200) is STORED  # `second` expired: room
    assert store.stats["providers"] == 2


def test_store_full_counts_never_exceeded_by_a_flood():
    limits = StoreLimits(max_records=5, max_records_per_source=100)
    store = RecordStore(limits)
    statuses = [store.put(nid(i), rec(i), f"s{i % 3}", T0) for i in range(12)]
    assert statuses == [STORED] * 5 + [FULL] * 7
    assert len(store) == 5 and store.stats["full_records"] == 7


# --- providers ---------------------------------------------------------------------------------


def test_provider_capability_must_match_the_key():
    store = RecordStore()
    relay_only = rec(0, caps=["relay"])
    not_derived = StoreStatus.KEY_NOT_DERIVED
    assert store.add_provider(capability_key("store"), relay_only, "s", T0) is not_derived
    assert store.add_provider(nid(0), relay_only, "s", T0) is not_derived
    assert store.add_provider(capability_key("relay"), rec(1), "s", T0) is not_derived  # none
    assert store.stats["key_not_derived"] == 3 and len(store) == 0
    assert store.add_provider(capability_key("relay"), relay_only, "s", T0) is STORED


def test_providers_answer_at_most_count_unexpired_most_recent_first():
    store = RecordStore()
    key = capability_key("chat/1")
    records = [rec(i, caps=["chat/1"], expires_at=T0 + 100 * (i + 1)) for i in range(5)]
    for i, record in enumerate(records):
        assert store.add_provider(key, record, f"s{i}", T0 + i) is STORED
    assert store.providers(key, T0 + 10, 3) == records[4:1:-1]
    assert store.providers(key, T0 + 10, 100) == records[::-1]
    assert store.providers(key, T0 + 10, 0) == []
    assert store.providers(key, T0 + 250, 100) == records[:1:-1]  # 0 and 1 expired
    assert store.stats["providers"] == 3
    same_seq_other_bytes = rec(4, caps=["chat/1"], expires_at=T0 + 500, port=1)
    assert store.add_provider(key, same_seq_other_bytes, "s", T0 + 250) is StoreStatus.STALE


# --- replication ---------------------------------------------------------------------------------


def test_replication_bookkeeping():
    store = RecordStore()
    a, b = rec(0, expires_at=T0 + 10 * HOUR), rec(1, expires_at=T0 + 10 * HOUR)
    store.put(nid(0), a, "s", T0)
    store.put(nid(1), b, "s", T0 + 10)
    assert store.due_for_replication(T0 + HOUR - 1, HOUR) == []
    assert store.due_for_replication(T0 + HOUR, HOUR) == [(nid(0), a)]
    assert store.due_for_replication(T0 + HOUR + 10, HOUR) == [(nid(0), a), (nid(1), b)]
    assert store.due_for_replication(T0 + HOUR + 10, HOUR, limit=1) == [(nid(0), a)]
    assert store.mark_replicated(nid(0), T0 + HOUR + 10) is True
    assert store.due_for_replication(T0 + HOUR + 10, HOUR) == [(nid(1), b)]
    assert store.due_for_replication(T0 + 2 * HOUR + 10, HOUR) == [(nid(1), b), (nid(0), a)]
    # a STORE of the same record resets the clock (Kademlia §2.5)
    assert store.put(nid(1), rec(1, expires_at=T0 + 10 * HOUR), "t", T0 + 2 * HOUR + 10) is STORED
    assert store.due_for_replication(T0 + 2 * HOUR + 10, HOUR) == [(nid(0), a)]
    assert store.mark_replicated(nid(5), T0) is False
    assert store.due_for_replication(T0 + 10 * HOUR, HOUR) == []  # expired ones are not listed


@settings(max_examples=150, deadline=None)
@pytest.mark.parametrize("kind", ["records", "providers"])
@given(steps=st.lists(st.tuples(st.sampled_from(["put", "mark", "due"]), st.integers(0, 5),
                                st.integers(0, 4 * HOUR), st.integers(1, 2 * HOUR)), max_size=40))
def test_what_is_due_is_every_entry_replicated_at_or_before_the_cutoff(kind, steps):
    """What upkeep asks for (due_for_replication, providers_due_for_replication) equals a scan of
    every entry, whatever the order of times: the store may skip its scan (a lower bound on the
    oldest replication time), never an entry that is due."""
    store = RecordStore()
    key = capability_key("relay")
    for op, i, at, interval in steps:
        now = T0 + at
        if op == "put" and kind == "records":
            store.put(nid(i), rec(i, expires_at=T0 + 10 * HOUR), "s", now)
        elif op == "put":
            store.add_provider(key, rec(i, caps=["relay"], expires_at=T0 + 10 * HOUR), "s", now)
        elif op == "mark" and kind == "records":
            store.mark_replicated(nid(i), now)
        elif op == "mark":
            store.mark_provider_replicated(key, nid(i), now)
        else:
            if kind == "records":
                got = store.due_for_replication(now, interval)
                held = [(e.replicated_at, k, e.record) for k, e in store._records.items()]
            else:
                got = store.providers_due_for_replication(now, interval)
                held = [(e.replicated_at, key, e.record) for e in store._providers.get(key, {}).values()]
            expected = sorted((item for item in held if item[0] <= now - interval),
                              key=lambda item: (item[0], item[1], item[2].node_id))
            assert got == [(k, r) for _, k, r in expected]


def test_provider_replication_bookkeeping():
    store = RecordStore()
    key = capability_key("relay")
    record = rec(0, caps=["relay"])
    store.add_provider(key, record, "s", T0)
    assert store.providers_due_for_replication(T0 + 59, 60) == []
    assert store.providers_due_for_replication(T0 + 60, 60) == [(key, record)]
    assert store.mark_provider_replicated(key, record.node_id, T0 + 60) is True
    assert store.providers_due_for_replication(T0 + 60, 60) == []
    assert store.mark_provider_replicated(key, nid(1), T0) is False
    assert store.mark_provider_replicated(capability_key("x"), record.node_id, T0) is False


# --- caller mistakes -----------------------------------------------------------------------------


def test_caller_mistakes_raise_typed_errors_naming_the_parameter():
    store = RecordStore()
    record = rec(0)
    with pytest.raises(ArgumentTypeError, match="record"):
        store.put(nid(0), record.encoded, "s", T0)
    with pytest.raises(ArgumentTypeError, match="record"):
        store.add_provider(nid(0), None, "s", T0)
    with pytest.raises(ArgumentValueError, match="key"):
        store.put(b"\x00" * 19, record, "s", T0)
    with pytest.raises(ArgumentTypeError, match="key"):
        store.get("abc", T0)
    with pytest.raises(ArgumentTypeError, match="source"):
        store.put(nid(0), record, ["not", "hashable"], T0)
    with pytest.raises(ArgumentTypeError, match="now"):
        store.put(nid(0), record, "s", "now")
    with pytest.raises(ArgumentTypeError, match="now"):
        store.get(nid(0), True)
    with pytest.raises(ArgumentValueError, match="now"):
        store.expire(float("nan"))
    with pytest.raises(ArgumentValueError, match="count"):
        store.providers(nid(0), T0, -1)
    with pytest.raises(ArgumentTypeError, match="count"):
        store.providers(nid(0), T0, 1.0)
    with pytest.raises(ArgumentValueError, match="interval_s"):
        store.due_for_replication(T0, -1)
    with pytest.raises(ArgumentTypeError, match="limit"):
        store.due_for_replication(T0, 1, limit="1")
    with pytest.raises(ArgumentTypeError, match="limits"):
        RecordStore({"max_records": 1})
    with pytest.raises(ArgumentValueError, match="replicas"):
        RecordStore(replicas=-1)
    with pytest.raises(ArgumentValueError, match="max_records"):
        StoreLimits(max_records=0)
    with pytest.raises(ArgumentTypeError, match="max_providers_per_key"):
        StoreLimits(max_providers_per_key=2.5)
    with pytest.raises(ArgumentValueError, match="max_ttl_s"):
        StoreLimits(max_ttl_s=float("inf"))
    with pytest.raises(ArgumentTypeError, match="max_total_bytes"):
        StoreLimits(max_total_bytes=True)
    assert len(store) == 0  # nothing was stored by the failed calls


def test_deadline_heap_stays_bounded_under_replacements():
    store = RecordStore()
    for seq in range(1, 500):  # each replacement leaves a stale deadline behind
        assert store.put(nid(0), rec(0, seq=seq, expires_at=T0 + HOUR + seq), "s", T0) is STORED
    assert len(store._deadlines) <= 2 * len(store) + 64
    assert store.get(nid(0), T0 + HOUR + 498) is not None
    assert store.get(nid(0), T0 + HOUR + 499) is None



def test_a_stale_deadline_never_removes_the_entry_that_replaced_it():
    store = RecordStore()
    assert store.put(nid(0), rec(0, seq=1, expires_at=T0 + HOUR), "s", T0) is STORED
    assert store.put(nid(0), rec(0, seq=2, expires_at=T0 + 100), "s", T0) is STORED  # sooner
    assert store.get(nid(0), T0 + 99).seq == 2
    assert store.get(nid(0), T0 + 100) is None  # its own time, not the replaced one's
    assert store.put(nid(0), rec(0, seq=3, expires_at=T0 + HOUR + 5), "s", T0 + 200) is STORED
    assert store.get(nid(0), T0 + HOUR + 1).seq == 3  # seq 1's deadline passed: stale, skipped
    assert store.get(nid(0), T0 + HOUR + 5) is None
    assert store.put(nid(1), rec(1, expires_at=T0 + HOUR), "s", T0) is STORED
    for _ in range(50):  # a refresh that changes nothing schedules nothing
        assert store.put(nid(1), rec(1, expires_at=T0 + HOUR), "s", T0) is STORED
    assert len(store._deadlines) <= 3

# --- model-based stateful test -------------------------------------------------------------------

_CAPS = ("a", "b", "c")
_SOURCES = (None, "s1", "s2")
_IDENTS = 4


@functools.cache
def _pooled(i: int, seq: int, expires_in: int, n_addr: int, caps: tuple[str, ...]) -> PeerRecord:
    return rec(i, seq=seq, expires_at=T0 + expires_in, n_addr=n_addr, caps=caps)


_records = st.builds(
    _pooled,
    st.integers(0, _IDENTS - 1),
    st.integers(1, 4),
    st.sampled_from([20, 60, 150, 400]),
    st.sampled_from([1, 2, 6]),  # 124, 131 or 159 bytes
    st.sets(st.sampled_from(_CAPS)).map(lambda s: tuple(sorted(s))),
)


class RecordStoreMachine(RuleBasedStateMachine):
    """Random put / add_provider / expire / clock steps against a plain model that re-implements
    the documented rules by full scans. Every step's status must match the model; every cap must
    hold; get() and providers() must equal the model's live entries (for get: the highest-seq
    record accepted for the key while it lives)."""

    LIMITS = StoreLimits(max_records=5, max_total_bytes=700, max_provider_keys=2,
                         max_providers_per_key=2, max_records_per_source=2,
                         max_providers_per_source=1, max_ttl_s=60)

    def __init__(self) -> None:
        super().__init__()
        self.store = RecordStore(self.LIMITS, replicas=1)
        self.now = T0
        self.records: dict[bytes, list] = {}  # key -> [record, source, keep_until]
        # capability key -> provider ID -> [record, source, keep_until], least recent first
        self.providers: dict[bytes, dict[bytes, list]] = {}
        self.keys = [k for i in range(_IDENTS) for k in derived_keys(nid(i), 2)]
        self.cap_keys = [capability_key(c) for c in _CAPS]

    # model helpers

    def _purge(self) -> None:
        for key in [k for k, e in self.records.items() if e[2] <= self.now]:
            del self.records[key]
        for ck, group in list(self.providers.items()):
            for pid in [p for p, e in group.items() if e[2] <= self.now]:
                del group[pid]
            if not group:
                del self.providers[ck]

    def _entries(self):
        yield from self.records.values()
        for group in self.providers.values():
            yield from group.values()

    def _bytes(self) -> int:
        return sum(len(e[0].encoded) for e in self._entries())

    def _keep(self, record) -> float:
        return min(record.expires_at, self.now + self.LIMITS.max_ttl_s)

    def _valid(self, record) -> bool:
        return self.now < record.expires_at <= self.now + MAX_RECORD_LIFETIME_S

    def _update(self, held: list, record) -> StoreStatus:
        old = held[0]
        if record.seq > old.seq:
            if self._bytes() - len(old.encoded) + len(record.encoded) > self.LIMITS.max_total_bytes:
                return FULL
            held[0], held[2] = record, self._keep(record)
            return STORED
        if record.encoded == old.encoded:
            held[2] = max(held[2], self._keep(record))
            return STORED
        return StoreStatus.STALE

    @staticmethod
    def _quota_full(entries, source, limit: int) -> bool:
        return source is not None and sum(e[1] == source for e in entries) >= limit

    def _fits(self, record) -> bool:
        return self._bytes() + len(record.encoded) <= self.LIMITS.max_total_bytes

    # rules

    @rule(record=_records, key_choice=st.integers(0, 5), source=st.sampled_from(_SOURCES))
    def put(self, record, key_choice, source):
        # mostly the record's own keys: 0..2 its node ID, 3 replica 1 (accepted), 4 replica 2
        # (not accepted with replicas=1), 5 the node ID of another identity
        if key_choice == 5:
            key = nid((self.keys.index(record.node_id) // 3 + 1) % _IDENTS)
        else:
            key = derived_keys(record.node_id, 2)[max(0, key_choice - 2)]
        self._purge()
        if not self._valid(record):
            expected = StoreStatus.INVALID_RECORD
        elif key not in derived_keys(record.node_id, 1):
            expected = StoreStatus.KEY_NOT_DERIVED
        elif key in self.records:
            expected = self._update(self.records[key], record)
        elif self._quota_full(self.records.values(), source, self.LIMITS.max_records_per_source):
            expected = FULL
        elif len(self.records) >= self.LIMITS.max_records or not self._fits(record):
            expected = FULL
        else:
            self.records[key] = [record, source, self._keep(record)]
            expected = STORED
        assert self.store.put(key, record, source, self.now) is expected

    @rule(record=_records, cap=st.sampled_from(_CAPS), own=st.booleans(),
          source=st.sampled_from(_SOURCES))
    def add_provider(self, record, cap, own, source):
        if own and record.capabilities:  # mostly a capability the record lists
            cap = record.capabilities[_CAPS.index(cap) % len(record.capabilities)]
        ck = capability_key(cap)
        self._purge()
        group = self.providers.get(ck, {})
        pid = record.node_id
        if not self._valid(record):
            expected = StoreStatus.INVALID_RECORD
        elif cap not in record.capabilities:
            expected = StoreStatus.KEY_NOT_DERIVED
        elif pid in group:
            expected = self._update(group[pid], record)
            if expected is STORED:
                group[pid] = group.pop(pid)  # most recently announced last
        elif self._quota_full((e for g in self.providers.values() for e in g.values()), source,
                              self.LIMITS.max_providers_per_source):
            expected = FULL
        elif ((not group and len(self.providers) >= self.LIMITS.max_provider_keys)
              or len(group) >= self.LIMITS.max_providers_per_key or not self._fits(record)):
            expected = FULL
        else:
            self.providers.setdefault(ck, {})[pid] = [record, source, self._keep(record)]
            expected = STORED
        assert self.store.add_provider(ck, record, source, self.now) is expected

    @rule(seconds=st.integers(0, 20))
    def advance(self, seconds):
        self.now += seconds

    @rule()
    def expire(self):
        self._purge()
        self.store.expire(self.now)
        assert self.store.stats["records"] == len(self.records)

    # invariants

    @invariant()
    def caps_hold(self):
        stats, limits = self.store.stats, self.LIMITS
        assert stats["records"] <= limits.max_records
        assert stats["bytes"] <= limits.max_total_bytes
        assert stats["provider_keys"] <= limits.max_provider_keys
        assert all(len(g) <= limits.max_providers_per_key for g in self.store._providers.values())
        assert all(n <= limits.max_records_per_source for n in self.store._record_charges.values())
        assert all(n <= limits.max_providers_per_source
                   for n in self.store._provider_charges.values())
        assert len(self.store._deadlines) <= 2 * len(self.store) + 64

    @invariant()
    def answers_match_the_model(self):
        self._purge()
        for key in self.keys:
            held = self.records.get(key)
            assert self.store.get(key, self.now) is (None if held is None else held[0])
        for ck in self.cap_keys:
            expected = [e[0] for e in reversed(self.providers.get(ck, {}).values())]
            assert self.store.providers(ck, self.now, 10) == expected
        stats = self.store.stats
        assert stats["bytes"] == self._bytes()
        assert stats["providers"] == sum(len(g) for g in self.providers.values())
        assert len(self.store) == len(self.records) + stats["providers"]


RecordStoreMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40,
                                                deadline=None)
test_record_store_matches_model = RecordStoreMachine.TestCase
