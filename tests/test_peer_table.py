"""The coordinator's peer table: merging sightings, newer records, withdrawal, expiry, bounds."""

from __future__ import annotations

import pytest

from sovereign_discovery import Address, ArgumentTypeError, ArgumentValueError, Identity, PeerRecord
from sovereign_discovery.peer_table import PeerTable

NOW = 1_800_000_000.0


def record(identity: Identity, seq: int = 1, *, port: int = 4000, caps=(), ttl: int = 3600) -> PeerRecord:
    return PeerRecord.create(identity, addresses=[Address("192.0.2.1", port)], capabilities=caps,
                             seq=seq, expires_at=int(NOW) + ttl)


def test_sources_merge_and_a_newer_record_replaces_an_older_one():
    table = PeerTable()
    me = Identity.generate()
    peer, new, evicted = table.observe(record(me, 1), "dht", NOW)
    assert new and evicted is None and peer.sources == {"dht"} and not peer.local
    seen_at = Address("10.0.0.7", 4000)
    peer, new, _ = table.observe(record(me, 2, port=4001), "mdns", NOW + 5, address=seen_at)
    assert not new and peer.sources == {"dht", "mdns"} and peer.local
    assert peer.record.seq == 2 and peer.first_seen == NOW and peer.last_seen == NOW + 5
    assert peer.addresses == (seen_at, Address("192.0.2.1", 4001))  # where the layer saw it first
    peer, _, _ = table.observe(record(me, 1), "ble", NOW + 6, rssi=-40)
    assert peer.record.seq == 2 and peer.rssi == -40  # an older record only refreshes the sighting
    assert table.count_by_source()["ble"] == 1


def test_withdrawal_loses_the_peer_only_when_no_source_is_left():
    table = PeerTable()
    me = Identity.generate()
    table.observe(record(me), "dht", NOW)
    table.observe(record(me), "ble", NOW, rssi=-60)
    peer, lost = table.withdraw(me.node_id, "ble")
    assert not lost and peer.sources == {"dht"} and peer.rssi is None and not peer.local
    assert table.withdraw(me.node_id, "mdns") == (peer, False)  # a source that never vouched
    peer, lost = table.withdraw(me.node_id, "dht")
    assert lost and me.node_id not in table
    assert table.withdraw(me.node_id, "dht") == (None, False)


def test_local_peers_come_first_nearest_first_then_most_recent():
    table = PeerTable()
    far, near, remote_old, remote_new = (Identity.generate() for _ in range(4))
    table.observe(record(remote_old), "dht", NOW)
    table.observe(record(remote_new), "dht", NOW + 10)
    table.observe(record(far), "ble", NOW, rssi=-90)
    table.observe(record(near), "ble", NOW, rssi=-30)
    order = [p.node_id for p in table.peers()]
    assert order == [near.node_id, far.node_id, remote_new.node_id, remote_old.node_id]


def test_filters_by_capability_and_source_and_rejects_bad_filters():
    table = PeerTable()
    a, b = Identity.generate(), Identity.generate()
    table.observe(record(a, caps=["relay"]), "dht", NOW)
    table.observe(record(b), "mdns", NOW)
    assert [p.node_id for p in table.peers(capability="relay")] == [a.node_id]
    assert [p.node_id for p in table.peers(source="mdns")] == [b.node_id]
    assert table.peers(capability="relay", source="mdns") == []
    with pytest.raises(ArgumentValueError):
        table.peers(source="carrier-pigeon")
    with pytest.raises(ArgumentValueError):
        table.peers(capability="Not A Name")


def test_expired_records_leave_and_are_never_accepted():
    table = PeerTable()
    short, long = Identity.generate(), Identity.generate()
    table.observe(record(short, ttl=60), "dht", NOW)
    table.observe(record(long), "dht", NOW)
    assert [p.node_id for p in table.expire(NOW + 61)] == [short.node_id]
    assert short.node_id not in table and long.node_id in table
    with pytest.raises(ArgumentValueError):
        table.observe(record(short, ttl=60), "dht", NOW + 61)


def test_a_full_table_evicts_the_least_recently_seen_remote_peer_before_any_local_one():
    table = PeerTable(max_peers=3)
    local_old, remote_old, remote_new, newcomer = (Identity.generate() for _ in range(4))
    table.observe(record(local_old), "mdns", NOW)
    table.observe(record(remote_old), "dht", NOW + 1)
    table.observe(record(remote_new), "dht", NOW + 2)
    _, new, evicted = table.observe(record(newcomer), "dht", NOW + 3)
    assert new and evicted.node_id == remote_old.node_id and len(table) == 3
    assert local_old.node_id in table and table.evicted == 1


def test_mistakes_are_typed():
    table = PeerTable()
    with pytest.raises(ArgumentTypeError):
        table.observe(b"record", "dht", NOW)
    with pytest.raises(ArgumentValueError):
        table.observe(record(Identity.generate()), "smoke-signals", NOW)
    with pytest.raises(ArgumentValueError):
        PeerTable(0)


def test_as_dict_is_json_ready():
    table = PeerTable()
    me = Identity.generate()
    peer, _, _ = table.observe(record(me, caps=["relay"]), "ble", NOW, rssi=-50)
    d = peer.as_dict()
    assert d["node_id"] == str(me.node_id) and d["sources"] == ["ble"] and d["local"] is True
    assert d["capabilities"] == ["relay"] and d["rssi"] == -50 and d["addresses"] == ["192.0.2.1:4000"]
