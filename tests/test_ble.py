"""The Bluetooth LE layer on the in-memory radio (``FakeRadio``): the advertisement codec and its
31-byte budget, resolution from the peer table vs a GATT read, the rotating token, every kind of
bad input (dropped and counted, never raised), the bounds, losing peers, and every way BLE can be
unavailable. The real BlueZ stacks are exercised in test_ble_bluezoo.py."""

from __future__ import annotations

import asyncio
import json
import sys
import time

import pytest

from sovereign_discovery import Address, Identity, LocalConfig, PeerRecord
from sovereign_discovery.ble import MAX_GATT_RECORD_BYTES, BleLayer, create_layer
from sovereign_discovery.ble_backends import BleSighting, BlueZStack, FakeRadio, describe_ble_error
from sovereign_discovery.ble_payload import (
    FLAG_GATT,
    FLAG_MDNS,
    FLAG_ROTATING,
    LEGACY_ADVERTISING_BYTES,
    PAYLOAD_BYTES,
    SERVICE_UUID,
    BlePayload,
    BlePayloadError,
    advertising_data,
    capability_bits,
    false_positive_rate,
    may_have_capability,
    peer_hash,
    rotating_token,
    rotation_window,
)
from sovereign_discovery.coordinator import LayerStateChanged, PeerDiscovered, PeerDiscoveryCoordinator
from sovereign_discovery.errors import ArgumentValueError
from sovereign_discovery.layers import LayerContext, LayerUnavailable, ResolvedPeer
from sovereign_discovery.peer_table import PeerInfo
from sovereign_discovery.testing import RecordingLayerContext

from .helpers import run_bounded
from .test_coordinator import eventually

LOCAL = LocalConfig(mdns=False, scan_interval_s=1.0)
ROTATING = LocalConfig(mdns=False, scan_interval_s=1.0, rotating_token=True, token_rotation_s=60.0)


def run(coro, timeout: float = 20.0):
    return run_bounded(coro, timeout)


def make_record(identity: Identity | None = None, *, seq: int = 1, addresses=(), capabilities=("relay",),
                ttl_s: int = 600) -> PeerRecord:
    return PeerRecord.create(identity or Identity.generate(), addresses=list(addresses),
                             capabilities=capabilities, seq=seq, expires_at=int(time.time()) + ttl_s)


class RecordingContext(RecordingLayerContext):
    """The shared recording context; a BLE sighting never carries an IP address, so ``seen``
    keeps ``(record, rssi, check_reachable)``, and ``known_peers`` calls are counted."""

    def __init__(self, own: PeerRecord | None = None, known: tuple[PeerRecord, ...] = (), **kwargs) -> None:
        super().__init__(own=own, known=known, **kwargs)
        self.known_peers_calls = 0

    def peer_seen(self, record, *, address=None, rssi=None, check_reachable=True) -> None:
        assert address is None
        self.seen.append((record, rssi, check_reachable))

    def known_peers(self) -> list[PeerInfo]:
        self.known_peers_calls += 1
        return super().known_peers()

    def seen_ids(self) -> list[bytes]:
        return [bytes(r.node_id) for r, _, _ in self.seen]


async def scanning_peer(radio: FakeRadio, context: LayerContext, address: str = "BB:02", **kwargs) -> BleLayer:
    layer = BleLayer(kwargs.pop("config", LOCAL), stack=radio.stack(address), **kwargs)
    await layer.start(context)
    return layer


async def advertising_peer(radio: FakeRadio, address: str, record: PeerRecord, config: LocalConfig = LOCAL,
                           **kwargs) -> BleLayer:
    return await scanning_peer(radio, RecordingContext(own=record), address, config=config, **kwargs)


# --- the payload codec ----------------------------------------------------------------------------


def test_the_advertisement_fits_the_31_byte_legacy_budget_exactly():
    record = make_record(seq=0x1234, capabilities=("relay", "store", "chat/1"))
    payload = BlePayload.for_record(record, gatt=True, mdns=True).encode()
    assert len(payload) == PAYLOAD_BYTES == 20
    data = advertising_data(payload)
    assert len(data) == LEGACY_ADVERTISING_BYTES == 31
    # Flags, then the complete 16-bit UUID list, then 16-bit service data (length, type, data)
    assert data[:3] == bytes.fromhex("020106")
    assert data[3:7] == bytes.fromhex("0303f5ff")
    assert data[7:11] == bytes.fromhex("1716f5ff") and data[11:] == payload
    structures, offset = [], 0
    while offset < len(data):  # the AD structures tile the buffer with nothing left over
        length = data[offset]
        structures.append(data[offset + 1])
        offset += 1 + length
    assert offset == 31 and structures == [0x01, 0x03, 0x16]
    with pytest.raises(ArgumentValueError):
        advertising_data(payload + b"\x00")  # one byte more no longer fits
    assert SERVICE_UUID == "0000fff5-0000-1000-8000-00805f9b34fb"


def test_payload_round_trips_and_carries_the_hash_and_seq_hint():
    identity = Identity.generate()
    record = make_record(identity, seq=0x1FF, capabilities=("relay",))
    payload = BlePayload.for_record(record, gatt=True, mdns=True)
    decoded = BlePayload.decode(payload.encode())
    assert decoded == payload and decoded.flags == FLAG_GATT | FLAG_MDNS and decoded.gatt
    assert decoded.peer_id == bytes(identity.node_id[:16]) == peer_hash(identity.public_key)
    assert decoded.seq_hint == 0xFF
    assert may_have_capability(decoded.capabilities, "relay")
    assert decoded.matches(identity.public_key) == 0
    assert decoded.matches(Identity.generate().public_key) is None


def test_capability_bits_are_a_bloom_filter_without_false_negatives():
    names = ["relay", "store", "chat/1", "quic", "tcp"]
    bits = capability_bits(names)
    assert all(may_have_capability(bits, n) for n in names)
    assert 0 < bin(capability_bits(["relay"])).count("1") <= 2
    others = [f"cap{n}" for n in range(400)]
    false_positives = sum(may_have_capability(capability_bits(["relay"]), n) for n in others)
    assert false_positives / len(others) < 3 * false_positive_rate(1) + 0.02  # ≈1.4 % expected
    assert false_positive_rate(5) > false_positive_rate(1)


def test_malformed_service_data_raises_only_payload_errors():
    good = BlePayload.for_record(make_record(), gatt=True).encode()
    cases = {b"": "payload_short", good[:-1]: "payload_short", good + bytes(12): "payload_long",
             bytes([0x21]) + good[1:]: "payload_version", bytes([0x01]) + good[1:]: "payload_version"}
    for data, reason in cases.items():
        with pytest.raises(BlePayloadError) as info:
            BlePayload.decode(data)
        assert info.value.reason == reason
    with pytest.raises(BlePayloadError):
        BlePayload.decode("not bytes")
    assert BlePayload.decode(bytes([0x18]) + good[1:]).flags == 0  # the reserved bit is ignored
    assert BlePayload.decode(good + b"\x00\x01").peer_id == BlePayload.decode(good).peer_id  # extension


def test_rotating_token_is_resolvable_with_the_key_and_unlinkable_without_it():
    identity = Identity.generate()
    record = make_record(identity, seq=42, capabilities=("relay", "store"))
    window = rotation_window(1_700_000_000, 900.0)
    first = BlePayload.for_record(record, gatt=True, rotating_window=window)
    second = BlePayload.for_record(record, gatt=True, rotating_window=window + 1)
    assert first.rotating and first.flags & FLAG_ROTATING
    assert first.peer_id == rotating_token(identity.public_key, window)
    assert first.peer_id != second.peer_id and first.peer_id != peer_hash(identity.public_key)
    # the fields a stranger could link windows by are masked too
    assert (first.encode()[1:3], first.encode()[19]) != (second.encode()[1:3], second.encode()[19])
    assert first.matches(identity.public_key, [window - 1, window, window + 1]) == window
    assert first.matches(Identity.generate().public_key, [window]) is None
    clear = first.unmasked(identity.public_key, window)
    assert clear.seq_hint == 42 and clear.capabilities == capability_bits(["relay", "store"])


# --- resolving sightings -------------------------------------------------------------------------------


def test_an_unknown_ble_only_peer_is_read_over_gatt_verified_and_reported():
    async def main() -> None:
        radio = FakeRadio()
        record = make_record()
        a = await advertising_peer(radio, "AA:01", record)
        radio.rssi["AA:01"] = -48
        b_context = RecordingContext(own=make_record())
        b = await scanning_peer(radio, b_context)
        await eventually(lambda: b_context.seen, "B's report of A")
        assert b_context.seen[0] == (record, -48, False)  # no IP path: reported without a PING
        assert radio.fetches.count(("BB:02", "AA:01")) == 1
        stats = b.stats()
        assert stats["gatt_records"] == 1 and stats["dropped"] == {} and stats["peers_seen"] == 1
        assert a.stats()["advertising"] and a.stats()["serving_record"]
        json.dumps(stats)
        await a.close()
        await b.close()
        await b.close()  # idempotent

    run(main())


def test_a_peer_whose_record_has_ip_addresses_is_left_to_the_coordinators_ping():
    async def main() -> None:
        radio = FakeRadio()
        record = make_record(addresses=[Address("192.0.2.7", 4000)])
        await advertising_peer(radio, "AA:01", record)
        context = RecordingContext()
        b = await scanning_peer(radio, context)
        await eventually(lambda: context.seen, "the report")
        assert context.seen[0][0] == record and context.seen[0][2] is True
        await b.close()

    run(main())


def test_a_peer_the_table_knows_is_resolved_without_a_radio_connection():
    async def main() -> None:
        radio = FakeRadio()
        record = make_record(seq=7)
        await advertising_peer(radio, "AA:01", record)
        context = RecordingContext(known=(record,))
        b = await scanning_peer(radio, context)
        await eventually(lambda: context.seen, "the report")
        assert context.seen_ids() == [bytes(record.node_id)] and radio.fetches == []
        assert b.stats()["resolved_from_table"] == 1
        for _ in range(50):  # repeated advertisements: reports are throttled, the index is cached
            radio.broadcast()
        assert len(context.seen) == 1 and context.known_peers_calls == 1
        await b.close()

    run(main())


@pytest.mark.parametrize("source", ["table", "dht"])
def test_a_stale_record_is_reported_then_replaced_by_the_one_read_over_gatt(source):
    async def main() -> None:
        radio = FakeRadio()
        identity = Identity.generate()
        old, new = make_record(identity, seq=1), make_record(identity, seq=2)
        await advertising_peer(radio, "AA:01", new)
        context = RecordingContext(known=(old,)) if source == "table" else RecordingContext(dht=(old,))
        b = await scanning_peer(radio, context)
        await eventually(lambda: [r.seq for r, _, _ in context.seen] == [1, 2], "the old, then the new record")
        assert radio.fetches == [("BB:02", "AA:01")] and b.stats()[f"resolved_from_{source}"] == 1
        assert context.gone == []  # a newer record of the same peer is no loss
        await b.close()

    run(main())


def test_the_advertiser_readvertises_when_its_record_changes():
    async def main() -> None:
        radio = FakeRadio()
        identity = Identity.generate()
        a_context = RecordingContext(own=make_record(identity, seq=1))
        a = await scanning_peer(radio, a_context, "AA:01")
        b_context = RecordingContext()
        b = await scanning_peer(radio, b_context)
        await eventually(lambda: b_context.seen, "the first record")
        a_context.change_own_record(make_record(identity, seq=2))
        await eventually(lambda: BlePayload.decode(radio.advertisements["AA:01"]).seq_hint == 2, "new payload")
        assert radio.records["AA:01"] == a_context.own.encode()
        b._devices["AA:01"].next_fetch_at = 0  # let B read again at once
        radio.broadcast()
        await eventually(lambda: b_context.seen[-1][0].seq == 2, "B's report of the newer record")
        await a.close()
        await b.close()

    run(main())


def test_rotating_tokens_resolve_from_the_table_and_over_gatt():
    async def main() -> None:
        radio = FakeRadio()
        config = ROTATING
        record = make_record(seq=9)
        await advertising_peer(radio, "AA:01", record, config)
        payload = BlePayload.decode(radio.advertisements["AA:01"])
        assert payload.rotating and payload.peer_id != peer_hash(record.public_key)
        knows = RecordingContext(known=(record,))
        stranger = RecordingContext()
        b = await scanning_peer(radio, knows, config=config)
        c = await scanning_peer(radio, stranger, "CC:03", config=config)
        await eventually(lambda: knows.seen and stranger.seen, "both reports")
        assert knows.seen[0][0] == record and stranger.seen[0][0] == record
        assert radio.fetches == [("CC:03", "AA:01")]  # only the stranger had to connect
        assert b.stats()["resolved_from_table"] == 1 and c.stats()["gatt_records"] == 1
        await b.close()
        await c.close()

    run(main())


def test_nearer_devices_are_read_first():
    async def main() -> None:
        radio = FakeRadio()
        far, near = make_record(), make_record()
        context = RecordingContext()
        b = await scanning_peer(radio, context, fetch_burst=1, fetches_per_s=50.0)
        b._fetch_bucket.tokens = 0.0  # the next read waits for the bucket: both sightings queue meanwhile
        for address, record, rssi in (("AA:FA", far, -90), ("AA:0E", near, -35)):
            radio.rssi[address] = rssi
            await radio.stack(address).advertiser("hci0").start(
                BlePayload.for_record(record, gatt=True).encode())
            await radio.stack(address).record_server("hci0").start(record.encode())
        await eventually(lambda: len(context.seen) == 2, "both reports")
        assert radio.fetches == [("BB:02", "AA:0E"), ("BB:02", "AA:FA")]
        assert [rssi for _, rssi, _ in context.seen] == [-35, -90]
        await b.close()

    run(main())


# --- resolving through the node: other layers' records, the DHT ------------------------------------


@pytest.mark.parametrize("source", ["mdns", "dht"])
def test_a_peer_another_layer_or_the_dht_knows_is_resolved_without_a_radio_connection(source):
    async def main() -> None:
        radio = FakeRadio()
        record = make_record(seq=3)
        await advertising_peer(radio, "AA:01", record)
        context = RecordingContext(**{"local" if source == "mdns" else "dht": (record,)})
        b = await scanning_peer(radio, context)
        await eventually(lambda: context.seen, "the report")
        assert context.seen[0][0] == record and radio.fetches == []
        stats = b.stats()
        assert stats[f"resolved_from_{source}"] == 1 and stats.get("gatt_reads", 0) == 0
        assert context.resolves == [(bytes(record.node_id[:16]), False, True)]  # the hash: a prefix
        for _ in range(20):  # the device's record is held now: the node is not asked again
            radio.broadcast()
        assert len(context.resolves) == 1
        await b.close()

    run(main())


def test_a_rotating_token_resolves_through_the_node_only_by_a_key_it_knows():
    async def main() -> None:
        radio = FakeRadio()
        config = ROTATING
        known, unknown = make_record(), make_record()
        await advertising_peer(radio, "AA:01", known, config)
        await advertising_peer(radio, "AA:02", unknown, config)
        context = RecordingContext(dht=(known,))
        b = await scanning_peer(radio, context, config=config)
        await eventually(lambda: len(context.seen) == 2, "both reports")
        # (the two advertisers read each other too) B read only the key its node did not know
        assert [f for f in radio.fetches if f[0] == "BB:02"] == [("BB:02", "AA:02")]
        assert all(by_key for _, by_key, _ in context.resolves)  # a token is matched against keys
        assert b.stats()["resolved_from_dht"] == 1 and b.stats()["resolve_not_found"] == 1
        await b.close()

    run(main())


@pytest.mark.parametrize("failure, counter", [("slow", "resolve_timeout"), ("error", "resolve_failed"),
                                              ("wrong key", "id_mismatch"), ("not found", "resolve_not_found")])
def test_a_failed_resolution_falls_through_to_gatt(failure, counter):
    async def main() -> None:
        radio = FakeRadio()
        record = make_record()
        await advertising_peer(radio, "AA:01", record)
        context = RecordingContext()
        if failure == "slow":
            context.dht, context.dht_delay_s = {bytes(record.node_id): record}, 30.0
        elif failure == "error":
            context.dht_error = RuntimeError("a bug in the node")
        elif failure == "wrong key":
            other = make_record()
            original = context.resolve_peer

            async def resolve_peer(peer_id, **kwargs):  # a buggy node: a record of another key
                await original(peer_id, **kwargs)
                return ResolvedPeer(other, "dht")

            context.resolve_peer = resolve_peer
        b = await scanning_peer(radio, context, resolve_timeout_s=0.2)
        started = time.monotonic()
        await eventually(lambda: context.seen, "the report after the GATT read")
        assert time.monotonic() - started < 3.0  # a slow node costs the resolution timeout, no more
        assert context.seen[0][0] == record and radio.fetches == [("BB:02", "AA:01")]
        stats = b.stats()
        assert (stats["dropped"] if counter == "id_mismatch" else stats)[counter] == 1
        assert stats["gatt_records"] == 1 and stats["resolving"] == 0
        await b.close()

    run(main())


def test_resolutions_are_bounded_in_flight_rate_limited_and_not_repeated():
    async def main() -> None:
        radio = FakeRadio()
        context = RecordingContext(dht_delay_s=0.3)
        b = await scanning_peer(radio, context, lookup_burst=2, lookups_per_s=0.01, gatt_timeout_s=0.05)
        for n in range(50):
            payload = BlePayload(FLAG_GATT, 0, n.to_bytes(16, "big"), 0).encode()
            radio.emit(BleSighting(f"F1:{n:04x}", -70, payload))
            assert len(b._tasks) <= 2  # resolutions in flight
        stats = b.stats()
        assert stats["resolve_busy"] == 48  # beyond two in flight: straight to GATT
        await eventually(lambda: b.stats()["resolving"] == 0, "the two resolutions")
        assert [lookup for _, _, lookup in context.resolves] == [True, True]
        for n in range(2, 6):  # the lookup bucket is empty now: the node answers from memory only
            payload = BlePayload(FLAG_GATT, 0, (1000 + n).to_bytes(16, "big"), 0).encode()
            radio.emit(BleSighting(f"F2:{n:04x}", -70, payload))
            await eventually(lambda: b.stats()["resolving"] == 0, "the resolution")
        assert [lookup for _, _, lookup in context.resolves[2:]] == [False] * 4
        assert b.stats()["resolve_local_only"] == 4
        asked = len(context.resolves)
        radio.emit(BleSighting("F3:0000", -70, BlePayload(FLAG_GATT, 0, (1002).to_bytes(16, "big"), 0).encode()))
        await asyncio.sleep(0.05)
        assert len(context.resolves) == asked  # the same (peer ID, seq hint) again: not asked again
        await b.close()

    run(main())


# --- bad input ----------------------------------------------------------------------------------


def test_a_record_that_does_not_match_the_advertised_hash_is_dropped():
    async def main() -> None:
        radio = FakeRadio()
        victim, impostor = make_record(), make_record()
        await advertising_peer(radio, "AA:01", victim)
        radio.gatt_answer["AA:01"] = impostor.encode()  # a valid record, of another key
        context = RecordingContext()
        b = await scanning_peer(radio, context)
        await eventually(lambda: b.stats()["dropped"], "the drop")
        assert b.stats()["dropped"] == {"id_mismatch": 1} and context.seen == []
        await b.close()

    run(main())


@pytest.mark.parametrize("answer, reason", [
    ("tampered", "bad_signature"),
    ("garbage", "record_malformed"),
    ("expired", "record_expired"),
    ("oversized", "gatt_oversized"),
    ("slow", "gatt_timeout"),
    ("silent", "gatt_failed"),
])
def test_bad_gatt_answers_are_dropped_and_counted(answer, reason):
    async def main() -> None:
        radio = FakeRadio()
        identity = Identity.generate()
        record = make_record(identity)
        await advertising_peer(radio, "AA:01", record)
        if answer == "tampered":
            data = bytearray(record.encode())
            data[40] ^= 1  # inside the signed body
            radio.gatt_answer["AA:01"] = bytes(data)
        elif answer == "garbage":
            radio.gatt_answer["AA:01"] = b"\x01" + bytes(30)
        elif answer == "expired":
            radio.gatt_answer["AA:01"] = PeerRecord.create(identity, addresses=[], seq=1,
                                                           expires_at=int(time.time()) - 5).encode()
        elif answer == "oversized":
            radio.gatt_answer["AA:01"] = bytes(MAX_GATT_RECORD_BYTES + 1)
        elif answer == "slow":
            radio.gatt_delay_s["AA:01"] = 5.0
        else:
            radio.records.pop("AA:01")
        context = RecordingContext()
        b = await scanning_peer(radio, context, gatt_timeout_s=0.2)
        started = time.monotonic()
        await eventually(lambda: b.stats()["dropped"], "the drop")
        assert time.monotonic() - started < 2.0  # a slow device costs the timeout, no more
        assert b.stats()["dropped"] == {reason: 1} and context.seen == []
        radio.broadcast()  # the same device again: not read again before REFETCH_AFTER_S
        await asyncio.sleep(0.05)
        assert radio.fetches == [("BB:02", "AA:01")]
        await b.close()

    run(main())


def test_malformed_advertisements_are_dropped_counted_and_never_raise():
    async def main() -> None:
        radio = FakeRadio()
        context = RecordingContext()
        b = await scanning_peer(radio, context)
        good = BlePayload.for_record(make_record(), gatt=False).encode()
        for data in (None, b"", b"\x10" * 5, good + bytes(20), b"\x20" + good[1:], good):
            radio.emit(BleSighting("EE:01", 999, data))
        radio.emit("not a sighting")  # a backend bug
        radio.emit(BleSighting(None, -50, good))
        # the well-formed one is unknown: the node is asked (nothing), then it is unresolvable
        await eventually(lambda: "unresolvable" in b.stats()["dropped"], "the unresolvable drop")
        dropped = b.stats()["dropped"]
        assert b.stats()["resolve_not_found"] == 1
        assert dropped == {"no_service_data": 1, "payload_short": 2, "payload_long": 1, "payload_version": 1,
                           "unresolvable": 1, "bad_sighting": 2}
        assert context.seen == [] and radio.fetches == []  # no GATT flag: nothing to read
        await b.close()

    run(main())


def test_a_flood_of_devices_is_bounded_in_memory_and_in_gatt_reads():
    async def main() -> None:
        radio = FakeRadio()
        context = RecordingContext()
        b = BleLayer(LOCAL, stack=radio.stack("BB:02"), max_tracked_devices=64, fetch_burst=3,
                     fetches_per_s=5.0, gatt_timeout_s=0.05)
        await b.start(context)
        started = time.monotonic()
        for n in range(2000):
            payload = BlePayload(FLAG_GATT, 0, n.to_bytes(16, "big"), 0).encode()
            radio.emit(BleSighting(f"F0:{n:04x}", -70, payload))
            assert len(b._devices) <= 64 and len(b._pending) <= 32
        await asyncio.sleep(0.5)
        elapsed = time.monotonic() - started
        assert len(radio.fetches) <= 3 + 5.0 * elapsed + 1  # the token bucket holds
        stats = b.stats()
        assert stats["tracked_devices"] <= 64 and stats["sightings"] == 2000
        assert stats["dropped"]["gatt_failed"] == len(radio.fetches)  # nobody serves a record
        assert stats["devices_evicted"] + stats["dropped"].get("too_many_devices", 0) >= 2000 - 64
        assert context.seen == []
        await b.close()

    run(main())


# --- losing peers ----------------------------------------------------------------------------------


def test_a_peer_not_seen_for_the_lost_interval_is_reported_gone():
    async def main() -> None:
        radio = FakeRadio()
        record = make_record()
        a = await advertising_peer(radio, "AA:01", record)
        context = RecordingContext()
        b = await scanning_peer(radio, context, lost_after_s=3.0)
        await eventually(lambda: context.seen, "the report")
        now = time.monotonic()
        assert b.sweep(now + 1.0) == 0 and context.gone == []
        await a.close()  # stops advertising
        assert b.sweep(now + 3.5) == 1
        assert context.gone == [bytes(record.node_id)] and b.stats()["tracked_devices"] == 0
        await b.close()

    run(main())


def test_the_sweep_runs_by_itself():
    async def main() -> None:
        radio = FakeRadio()
        a = await advertising_peer(radio, "AA:01", make_record())
        context = RecordingContext()
        b = await scanning_peer(radio, context, lost_after_s=0.3)
        await eventually(lambda: context.seen, "the report")
        await a.close()
        await eventually(lambda: context.gone, "the loss", timeout=3.0)
        await b.close()

    run(main())


# --- when BlueZ goes away after start ---------------------------------------------------------------


def test_after_bluetoothd_restarts_everything_is_registered_again_and_the_state_reported():
    async def main() -> None:
        baseline = len(asyncio.all_tasks())
        radio = FakeRadio()
        record = make_record()
        a_context = RecordingContext(own=record)
        a = await scanning_peer(radio, a_context, "AA:01")
        b_context = RecordingContext()
        b = await scanning_peer(radio, b_context, lost_after_s=0.3)
        await eventually(lambda: b_context.seen, "B's report of A")
        radio.stop_bluez("AA:01")
        await eventually(lambda: a_context.states, "A's state change")
        reason = "BlueZ stopped (org.bluez left the system D-Bus; start bluetoothd)"
        assert a_context.states == [("unavailable", reason)] and a.stats()["bluez"] == f"unavailable: {reason}"
        assert "AA:01" not in radio.advertisements and "AA:01" not in radio.scanners
        await eventually(lambda: b_context.gone == [bytes(record.node_id)], "B loses A", timeout=5)
        radio.stacks["AA:01"].adapter = "hci1"  # no adapter configured: the first one is another now
        radio.start_bluez("AA:01")
        await eventually(lambda: a_context.states[-1:] == [("running", None)], "A running again")
        assert a.stats()["adapter"] == "hci1" and a._watched_adapter == "hci1"  # watched anew
        assert len(radio.stacks["AA:01"].watchers) == 1  # and the old watcher stopped
        assert radio.advertisements["AA:01"] and radio.records["AA:01"] == record.encode()
        assert "AA:01" in radio.scanners  # scanning again too
        await eventually(lambda: len(b_context.seen) == 2, "B sees A again (read over GATT again)")
        stats = a.stats()
        assert stats["restarts"] == 1 and stats["bluez_lost"] == 1 and stats["bluez_back"] == 1
        assert stats["bluez"] == "available" and stats.get("internal_errors", 0) == 0
        await a.close()
        await b.close()
        assert len(asyncio.all_tasks()) == baseline  # nothing left running

    run(main())


def test_while_bluez_stays_away_restarts_back_off_and_succeed_when_it_returns(monkeypatch):
    import sovereign_discovery.ble as ble

    monkeypatch.setattr(ble, "RECOVER_FIRST_S", 0.05)
    monkeypatch.setattr(ble, "RECOVER_MAX_S", 0.4)

    async def main() -> None:
        radio = FakeRadio()
        context = RecordingContext(own=make_record())
        layer = await scanning_peer(radio, context, "AA:01")
        radio.stop_bluez("AA:01")
        await asyncio.sleep(1.5)
        attempts = layer.stats()["restart_attempts"]
        # 0.05, 0.1, 0.2, then every 0.4 s (±20 %): about 6 in 1.5 s, never a busy loop
        assert 3 <= attempts <= 9 and layer.stats()["restart_failed"] == attempts
        assert context.states == [("unavailable", "BlueZ stopped (org.bluez left the system D-Bus;"
                                                  " start bluetoothd)")]  # reported once
        radio.stacks["AA:01"].unavailable = None  # BlueZ is back, but no signal says so
        await eventually(lambda: context.states[-1] == ("running", None), "running after a retry", timeout=3)
        assert "AA:01" in radio.advertisements
        await layer.close()

    run(main())


def test_an_advertisement_bluez_releases_is_registered_again():
    async def main() -> None:
        radio = FakeRadio()
        context = RecordingContext(own=make_record())
        layer = await scanning_peer(radio, context, "AA:01")
        payload = radio.advertisements["AA:01"]
        radio.release_advertisement("AA:01")
        assert "AA:01" not in radio.advertisements
        await eventually(lambda: radio.advertisements.get("AA:01") == payload, "the advertisement again")
        stats = layer.stats()
        assert stats["advertisement_released"] == 1 and stats["readvertised"] == 1
        assert context.states == []  # BlueZ itself is fine: no state change
        await layer.close()

    run(main())


# --- unavailable ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fail_on", ["scanner", "advertiser", "server"])
def test_a_backend_that_fails_to_start_makes_the_layer_unavailable(fail_on):
    async def main() -> None:
        radio = FakeRadio()
        layer = BleLayer(LOCAL, stack=radio.stack("AA:01", fail_on=fail_on))
        context = RecordingContext(own=make_record())
        with pytest.raises(LayerUnavailable) as info:
            await layer.start(context)
        assert info.value.layer == "ble" and info.value.reason.startswith("no D-Bus system bus")
        assert radio.scanners == {} and radio.advertisements == {} and radio.records == {}
        assert context.callbacks == []

    run(main())


def test_an_unavailable_stack_says_why():
    async def main() -> None:
        layer = BleLayer(LOCAL, stack=FakeRadio().stack("AA:01", unavailable="no Bluetooth adapter"))
        with pytest.raises(LayerUnavailable, match="ble unavailable: no Bluetooth adapter"):
            await layer.start(RecordingContext())

    run(main())


def test_a_missing_library_is_named_with_the_extra_to_install(monkeypatch):
    for module in ("bleak", "bless", "dbus_fast"):
        with monkeypatch.context() as patch:
            patch.setitem(sys.modules, module, None)  # import fails as if not installed
            with pytest.raises(LayerUnavailable) as info:
                run(BlueZStack("hci0").probe())
            assert info.value.reason == f"{module} is not installed (pip install 'sovereign-discovery[ble]')"


def test_no_system_bus_socket_is_reported(monkeypatch, tmp_path):
    pytest.importorskip("dbus_fast")
    pytest.importorskip("bleak")
    pytest.importorskip("bless")
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={tmp_path}/missing_socket")
    layer = create_layer(LocalConfig(ble_adapter="hci0"))
    with pytest.raises(LayerUnavailable) as info:
        run(layer.start(RecordingContext()))
    assert info.value.reason.startswith(f"no D-Bus system bus at unix:path={tmp_path}/missing_socket")


def test_library_errors_map_to_reasons_a_user_can_act_on():
    class BleakDBusError(Exception):
        pass

    class BleakBluetoothNotAvailableError(Exception):
        def __init__(self, text, reason):
            super().__init__(text)
            self.reason = reason

    class Reason:
        def __init__(self, name):
            self.name = name

    cases = [
        (FileNotFoundError(2, "No such file or directory"), "no D-Bus system bus"),
        (BleakDBusError("[org.freedesktop.DBus.Error.ServiceUnknown] The name org.bluez was not provided by"
                        " any .service files"), "BlueZ is not running"),
        (Exception("The name org.bluez was not provided by any .service files"), "BlueZ is not running"),
        (BleakBluetoothNotAvailableError("No Bluetooth adapters found.", Reason("NO_BLUETOOTH")),
         "no Bluetooth adapter"),
        (BleakBluetoothNotAvailableError("No powered Bluetooth adapters found.", Reason("POWERED_OFF")),
         "Bluetooth adapter hci1 is powered off"),
        (Exception("No adapter named hci1 found"), "no Bluetooth adapter named hci1"),
        (ModuleNotFoundError("No module named 'bleak'", name="bleak"), "bleak is not installed"),
        (asyncio.TimeoutError(), "BlueZ did not answer in time"),
        (RuntimeError("odd"), "RuntimeError: odd"),
    ]
    for exc, reason in cases:
        assert describe_ble_error(exc, "hci1").startswith(reason), (exc, describe_ble_error(exc, "hci1"))


# --- with the coordinator ---------------------------------------------------------------------------


def test_two_coordinators_meet_over_ble_and_the_ping_confirms_the_peer():
    async def main() -> None:
        from sovereign_discovery import BootstrapConfig, Config

        radio = FakeRadio()
        config = Config(local=LocalConfig(mdns=False, scan_interval_s=1.0),
                        bootstrap=BootstrapConfig(peers=()))
        radio.rssi["AA:01"] = -55
        events: list = []
        a_layer = BleLayer(config.local, stack=radio.stack("AA:01"))
        b_layer = BleLayer(config.local, stack=radio.stack("BB:02"))
        async with PeerDiscoveryCoordinator(Identity.generate(), config=config, local_layers=[a_layer],
                                            cache=None) as a, \
                PeerDiscoveryCoordinator(Identity.generate(), config=config, local_layers=[b_layer],
                                         cache=None, on_event=events.append) as b:
            await eventually(lambda: b.peer(a.node_id) is not None, "A in B's table", timeout=10)
            peer = b.peer(a.node_id)
            assert "ble" in peer.sources and peer.rssi == -55  # the PING also put it in the DHT table
            assert any(isinstance(e, PeerDiscovered) and e.source == "ble" for e in events)
            assert b.stats()["checks"]["pings"] >= 1  # A's record has a UDP address: PINGed first
            assert b.stats()["layers"]["ble"]["state"] == "running"
            assert b.stats()["layers"]["ble"]["gatt_records"] + b.stats()["layers"]["ble"].get(
                "resolved_from_table", 0) >= 1

    run(main(), 30)


def test_an_unavailable_ble_layer_leaves_the_coordinator_running():
    async def main() -> None:
        from sovereign_discovery import BootstrapConfig, Config

        config = Config(local=LocalConfig(mdns=False), bootstrap=BootstrapConfig(peers=()))
        layer = BleLayer(config.local, stack=FakeRadio().stack("AA:01", unavailable="no Bluetooth adapter"))
        events: list = []
        async with PeerDiscoveryCoordinator(Identity.generate(), config=config, local_layers=[layer],
                                            cache=None, on_event=events.append) as node:
            await eventually(lambda: any(isinstance(e, LayerStateChanged) for e in events), "the report")
            assert node.stats()["layers"]["ble"] == {"state": "unavailable", "reason": "no Bluetooth adapter"}
            assert node.health()["ok"]

    run(main())


def identities_with_a_peer_outside_the_table() -> tuple[Identity, Identity, Identity]:
    """X (a bootstrap node), A and B such that X and A share their first ID bit and B has the
    other one: with k = 1, B's bucket for that half holds X, so A stays out of B's routing table
    (and so out of its peer table) and B can reach A only by a lookup."""
    x = Identity.generate()
    bit = x.node_id[0] >> 7
    same = [i for i in (Identity.generate() for _ in range(64)) if i.node_id[0] >> 7 == bit]
    other = [i for i in (Identity.generate() for _ in range(64)) if i.node_id[0] >> 7 != bit]
    return x, same[0], other[0]


def test_the_coordinator_resolves_a_short_id_from_its_table_other_layers_and_the_dht():
    async def main() -> None:
        from sovereign_discovery import BootstrapConfig, Config, DhtSettings
        from sovereign_discovery.aio import DhtNode
        from sovereign_discovery.coordinator import _Context

        x_identity, a_identity, b_identity = identities_with_a_peer_outside_the_table()
        async with DhtNode(x_identity) as x, DhtNode(a_identity) as a:
            await a.bootstrap([x.contact])
            await a.announce()
            config = Config(local=LocalConfig(mdns=False, bluetooth=False), dht=DhtSettings(k=1),
                            bootstrap=BootstrapConfig(peers=(x.contact.pinned,), timeout_s=2.0, retries=0))
            async with PeerDiscoveryCoordinator(b_identity, config=config, cache=None) as b:
                assert await b.joined(10)
                assert a.node_id not in b.node.engine.table and b.peer(a.node_id) is None  # the setup
                ble, mdns = _Context(b, "ble"), _Context(b, "mdns")
                token = rotating_token(a.identity.public_key, 7)

                def knows_a(public_key: bytes) -> bool:
                    return rotating_token(public_key, 7) == token

                # a token cannot be looked up: A's key is not known yet
                assert await ble.resolve_peer(token, key_matches=knows_a, deadline_s=5) is None
                # memory only: nothing
                assert await ble.resolve_peer(bytes(a.node_id[:16]), lookup=False, deadline_s=5) is None
                # the hash is a prefix of A's ID: a FIND_NODE towards it finds A, which hands over its record
                found = await ble.resolve_peer(bytes(a.node_id[:16]), deadline_s=5)
                assert found is not None and found.source == "dht" and found.record == a.record
                assert a.node_id not in b.node.engine.table  # (still outside: a lookup, not the table)
                lookups = b.stats()["lookups"]
                assert lookups["resolve_dht"] == 1 and lookups["resolve_lookups"] == 1
                assert lookups["resolve_not_found"] == 2

                # a record another local layer verified (its PING not answered: no such address)
                c = make_record(addresses=[Address("127.0.0.1", 9)])
                mdns.peer_seen(c, address=Address("127.0.0.1", 9))
                found = await ble.resolve_peer(bytes(c.node_id[:16]), lookup=False, deadline_s=5)
                assert found is not None and found.source == "mdns" and found.record == c
                assert await mdns.resolve_peer(bytes(c.node_id[:16]), lookup=False, deadline_s=5) is None

                # in the peer table now (a lookup by the user): the token matches its known key
                assert await b.find_peer(a.node_id, deadline_s=5) is not None
                found = await ble.resolve_peer(token, key_matches=knows_a, deadline_s=5)
                assert found is not None and found.source == "table" and found.record.public_key == a.identity.public_key

                # what a layer passes wrongly is counted, never raised
                for bad in ("text", b"", bytes(21)):
                    assert await ble.resolve_peer(bad, deadline_s=5) is None
                assert await ble.resolve_peer(b"\x01", key_matches="not callable", deadline_s=5) is None
                assert await ble.resolve_peer(b"\x01", deadline_s=-1) is None
                assert b.stats()["lookups"]["resolve_bad_request"] == 5

    run(main(), 40)


def test_a_layer_reports_its_own_state_changes_through_the_coordinator():
    async def main() -> None:
        from sovereign_discovery import BootstrapConfig, Config

        config = Config(local=LocalConfig(mdns=False), bootstrap=BootstrapConfig(peers=()))
        radio = FakeRadio()
        layer = BleLayer(config.local, stack=radio.stack("AA:01"))
        events: list = []
        async with PeerDiscoveryCoordinator(Identity.generate(), config=config, local_layers=[layer],
                                            cache=None, on_event=events.append) as node:
            await eventually(lambda: node.stats()["layers"]["ble"]["state"] == "running", "the layer running")
            context = layer._context
            context.layer_state("unavailable", "BlueZ stopped")
            context.layer_state("unavailable", "BlueZ stopped")  # the same state again: no new event
            entry = node.stats()["layers"]["ble"]
            assert entry["state"] == "unavailable" and entry["reason"] == "BlueZ stopped"
            assert "sightings" in entry or "tracked_devices" in entry  # the layer's counters stay visible
            context.layer_state("running")
            context.layer_state("sleeping")  # not a state: counted, ignored
            changes = [(e.state, e.reason) for e in events if isinstance(e, LayerStateChanged)]
            assert changes == [("running", None), ("unavailable", "BlueZ stopped"), ("running", None)]
            assert node.stats()["checks"]["bad_layer_state"] == 1

    run(main())
