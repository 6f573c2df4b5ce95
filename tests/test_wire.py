"""The message codec: round trips of every type, size bounds, strict decoding of hostile bytes
(only DecodeError, canonical acceptance), caller errors, capability keys, and response splitting."""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sovereign_discovery import Address, ArgumentTypeError, ArgumentValueError, DecodeError, NodeId
from sovereign_discovery.constants import MAX_DATAGRAM_BYTES, MAX_RECORD_BYTES
from sovereign_discovery.routing import Contact
from sovereign_discovery.wire import (
    MAX_MESSAGE_BYTES,
    MAX_NODES_PER_MESSAGE,
    Announce,
    FindNode,
    FindValue,
    GetProviders,
    MessageType,
    Nodes,
    Ping,
    Pong,
    Providers,
    Store,
    StoreResult,
    StoreStatus,
    Value,
    capability_key,
    decode_message,
    encode_message,
    encode_nodes_answer,
    new_request_id,
    split_nodes,
    split_providers,
)

RID = bytes(range(8))
ID = NodeId(bytes(range(20)))
HANDSHAKE_OVERHEAD = 162  # docs/protocol.md: 18 header + 128 authdata + 16 tag
FAST = settings(max_examples=100, deadline=None)

# --- strategies --------------------------------------------------------------------------------

ipv4 = st.ip_addresses(v=4).filter(lambda ip: not ip.is_unspecified and not ip.is_multicast)
ipv6 = st.ip_addresses(v=6).filter(
    lambda ip: not ip.is_unspecified and not ip.is_multicast and ip.ipv4_mapped is None
)
ports = st.integers(1, 65535)
addresses = st.builds(Address, st.one_of(ipv4, ipv6), ports)
contacts = st.builds(Contact, st.binary(min_size=32, max_size=32), addresses)
request_ids = st.binary(min_size=8, max_size=8)
node_ids = st.binary(min_size=20, max_size=20).map(NodeId)
u64 = st.integers(0, 2**64 - 1)
records = st.binary(min_size=1, max_size=MAX_RECORD_BYTES)
totals = st.integers(1, 16)


def _providers_fitting(draw_records):
    """Trim a record list so that the PROVIDERS message fits."""
    kept, size = [], 11
    for r in draw_records:
        if size + 2 + len(r) > MAX_MESSAGE_BYTES:
            break
        kept.append(r)
        size += 2 + len(r)
    return kept


messages = st.one_of(
    st.builds(Ping, request_ids, u64),
    st.builds(Pong, request_ids, u64, addresses),
    st.builds(FindNode, request_ids, node_ids),
    st.builds(Nodes, request_ids, totals, st.lists(contacts, max_size=MAX_NODES_PER_MESSAGE)),
    st.builds(Store, request_ids, node_ids, records),
    st.builds(StoreResult, request_ids, st.sampled_from(StoreStatus)),
    st.builds(FindValue, request_ids, node_ids),
    st.builds(Value, request_ids, records),
    st.builds(Announce, request_ids, node_ids, records),
    st.builds(GetProviders, request_ids, node_ids),
    st.builds(
        Providers,
        request_ids,
        totals,
        st.lists(st.binary(min_size=1, max_size=300), min_size=1, max_size=40)
        .map(_providers_fitting)
        .filter(bool),
    ),
)


def v6_contact(i: int) -> Contact:
    key = hashlib.sha256(i.to_bytes(4, "big")).digest()
    return Contact(key, Address(ipaddress.IPv6Address((0x2001_0DB8 << 96) + i + 1), 1 + i))


def v4_contact(i: int) -> Contact:
    key = hashlib.sha256(b"v4" + i.to_bytes(4, "big")).digest()
    return Contact(key, Address(ipaddress.IPv4Address(0x0A000001 + i), 1 + i))


def largest_messages() -> list:
    """One message of every type at its largest."""
    big = bytes(range(256)) * 3 + bytes(MAX_RECORD_BYTES - 768)
    return [
        Ping(RID, 2**64 - 1),
        Pong(RID, 2**64 - 1, Address("2001:db8::1", 65535)),
        FindNode(RID, ID),
        Nodes(RID, 16, [v6_contact(i) for i in range(MAX_NODES_PER_MESSAGE)]),
        Store(RID, ID, big),
        StoreResult(RID, StoreStatus.STALE),
        FindValue(RID, ID),
        Value(RID, big),
        Announce(RID, ID, big),
        GetProviders(RID, ID),
        Providers(RID, 16, [big]),
        Providers(RID, 16, [b"p" * 551, b"q" * 552]),  # exactly MAX_MESSAGE_BYTES
        Providers(RID, 16, [b"x"] * 255),  # the most records
    ]


def sample_messages() -> list:
    """One small valid message of each type (for truncation and mutation tests)."""
    return [
        Ping(RID, 7),
        Pong(RID, 7, Address("192.0.2.1", 4000)),
        FindNode(RID, ID),
        Nodes(RID, 2, [v4_contact(0), v6_contact(1)]),
        Store(RID, ID, b"record"),
        StoreResult(RID, StoreStatus.STORED),
        FindValue(RID, ID),
        Value(RID, b"record"),
        Announce(RID, ID, b"record"),
        GetProviders(RID, ID),
        Providers(RID, 1, [b"one", b"two"]),
    ]


def fields_of(message) -> dict:
    return {f.name: getattr(message, f.name) for f in dataclasses.fields(message)}


def check_decoded(data: bytes) -> None:
    """Decoding ``data`` either raises DecodeError, or gives a message that the public constructor
    accepts unchanged and that encodes back to exactly ``data`` (canonical decoding)."""
    try:
        message = decode_message(data)
    except DecodeError:
        return
    assert type(message)(**fields_of(message)) == message
    assert encode_message(message) == data


# --- round trips and sizes ---------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(messages)
def test_round_trip_every_type(message):
    data = encode_message(message)
    assert len(data) <= MAX_MESSAGE_BYTES
    assert data[0] == message.TYPE
    back = decode_message(data)
    assert back == message
    assert type(back) is type(message)
    assert encode_message(back) == data


def test_round_trip_covers_all_types():
    assert {type(m).TYPE for m in sample_messages()} == set(MessageType)
    for message in sample_messages():
        assert decode_message(encode_message(message)) == message


@pytest.mark.parametrize("message", largest_messages(), ids=lambda m: type(m).__name__)
def test_largest_messages_fit_a_handshake_packet(message):
    data = encode_message(message)
    assert len(data) <= MAX_MESSAGE_BYTES
    assert len(data) + HANDSHAKE_OVERHEAD <= MAX_DATAGRAM_BYTES
    assert decode_message(data) == message


def test_max_message_bytes():
    assert MAX_MESSAGE_BYTES == 1280 - 162 == 1118
    assert len(encode_message(Providers(RID, 1, [b"p" * 551, b"q" * 552]))) == MAX_MESSAGE_BYTES
    assert len(encode_message(largest_messages()[3])) == 11 + 20 * (32 + 19)


def test_decoded_contacts_derive_node_ids():
    sent = [v4_contact(i) for i in range(10)] + [v6_contact(i) for i in range(10)]
    back = decode_message(encode_message(Nodes(RID, 1, sent)))
    assert isinstance(back, Nodes)
    for contact, original in zip(back.contacts, sent):
        assert isinstance(contact, Contact)
        assert contact.node_id == NodeId.from_public_key(contact.public_key) == original.node_id
        assert contact.address == original.address
    assert {c.address.version for c in back.contacts} == {4, 6}


def test_decoded_ids_are_node_ids_and_fields_are_typed():
    find = decode_message(encode_message(FindNode(RID, ID)))
    assert type(find.target) is NodeId and type(find.request_id) is bytes
    result = decode_message(encode_message(StoreResult(RID, 4)))
    assert result.status is StoreStatus.STALE


@given(st.lists(contacts, max_size=20))
@settings(max_examples=40, deadline=None)
def test_nodes_with_hypothesis_contacts(items):
    back = decode_message(encode_message(Nodes(RID, 1, items)))
    assert [(c.public_key, c.address, c.node_id) for c in back.contacts] == [
        (c.public_key, c.address, NodeId.from_public_key(c.public_key)) for c in items
    ]


def test_known_encodings():
    assert encode_message(Ping(RID, 258)) == b"\x01" + RID + struct.pack(">Q", 258)
    assert encode_message(Pong(RID, 1, Address("192.0.2.1", 4000))) == (
        b"\x02" + RID + struct.pack(">Q", 1) + b"\x04\xc0\x00\x02\x01\x0f\xa0"
    )
    assert encode_message(StoreResult(RID, StoreStatus.STORE_FULL)) == b"\x06" + RID + b"\x03"
    assert encode_message(Providers(RID, 2, [b"ab"])) == b"\x0b" + RID + b"\x02\x01\x00\x02ab"
    contact = v4_contact(0)
    assert encode_message(Nodes(RID, 1, [contact])) == (
        b"\x04" + RID + b"\x01\x01" + contact.public_key + contact.address.encode()
    )


# --- hostile bytes -----------------------------------------------------------------------------

arbitrary = st.one_of(
    st.binary(max_size=1400),
    st.tuples(st.integers(0, 12), st.binary(max_size=1200)).map(lambda t: bytes([t[0]]) + t[1]),
    # plausible headers: a known type, then small counts, so NODES/PROVIDERS bodies get parsed
    st.tuples(st.sampled_from([4, 11]), request_ids, st.integers(0, 17), st.integers(0, 21),
              st.binary(max_size=1100)).map(lambda t: bytes([t[0]]) + t[1] + bytes(t[2:4]) + t[4]),
)


@settings(max_examples=600, deadline=None)
@given(arbitrary)
def test_arbitrary_bytes_raise_only_decode_error(data):
    check_decoded(data)


@st.composite
def mutated(draw):
    data = bytearray(encode_message(draw(messages)))
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["flip", "insert", "delete", "set"]))
        at = draw(st.integers(0, len(data)))
        if action == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=3))
        elif data and at < len(data):
            if action == "delete":
                del data[at : at + draw(st.integers(1, 3))]
            elif action == "flip":
                data[at] ^= 1 << draw(st.integers(0, 7))
            else:
                data[at] = draw(st.integers(0, 255))
    return bytes(data)


@settings(max_examples=400, deadline=None)
@given(mutated())
def test_mutated_encodings_raise_only_decode_error(data):
    check_decoded(data)


@pytest.mark.parametrize("message", sample_messages() + largest_messages(), ids=lambda m: type(m).__name__)
def test_every_truncation_is_rejected(message):
    data = encode_message(message)
    # STORE, VALUE and ANNOUNCE end with the record as "the rest", without a length: a cut inside
    # the record leaves a shorter record, which only PeerRecord.decode (the signature) can refuse.
    shortest_valid = len(data) - len(message.record) + 1 if hasattr(message, "record") else len(data)
    for size in range(len(data)):
        if size >= shortest_valid:
            assert decode_message(data[:size]).record == message.record[: size - len(data)]
            continue
        with pytest.raises(DecodeError):
            decode_message(data[:size])


@pytest.mark.parametrize("message", sample_messages(), ids=lambda m: type(m).__name__)
def test_trailing_bytes_are_rejected_where_not_a_record(message):
    data = encode_message(message) + b"\x00"
    if isinstance(message, (Store, Value, Announce)):
        # The record is "the rest": a longer record is another valid message, not garbage.
        assert decode_message(data).record == message.record + b"\x00"
    else:
        with pytest.raises(DecodeError, match="trailing"):
            decode_message(data)


@pytest.mark.parametrize("kind", [0x00, 0x0C, 0x7F, 0xFF])
def test_unknown_type(kind):
    with pytest.raises(DecodeError, match="unknown message type"):
        decode_message(bytes([kind]) + RID + bytes(20))


def test_non_bytes_input_raises_decode_error():
    for value in (None, "text", 5, [1, 2]):
        with pytest.raises(DecodeError):
            decode_message(value)  # type: ignore[arg-type]
    data = encode_message(FindNode(RID, ID))
    assert decode_message(bytearray(data)) == decode_message(memoryview(data)) == FindNode(RID, ID)


def nodes_bytes(total: int, items: list[Contact], count: int | None = None) -> bytes:
    body = b"".join(c.public_key + c.address.encode() for c in items)
    return b"\x04" + RID + bytes([total, len(items) if count is None else count]) + body


def test_nodes_count_and_total_bounds():
    items = [v4_contact(i) for i in range(21)]
    assert len(decode_message(nodes_bytes(1, items[:20])).contacts) == 20
    with pytest.raises(DecodeError, match="count 21"):
        decode_message(nodes_bytes(1, items))
    with pytest.raises(DecodeError, match="count 255"):
        decode_message(nodes_bytes(1, items[:1], count=255))
    for total in (0, 17, 255):
        with pytest.raises(DecodeError, match="total"):
            decode_message(nodes_bytes(total, items[:1]))
    assert decode_message(nodes_bytes(16, [])).contacts == ()


def test_bad_addresses_are_rejected():
    contact = v4_contact(0)
    good = nodes_bytes(1, [contact])
    address_at = 11 + 32
    for kind in (0x00, 0x05, 0x41):
        with pytest.raises(DecodeError, match="contact 0: unknown address kind"):
            decode_message(good[:address_at] + bytes([kind]) + good[address_at + 1 :])
    with pytest.raises(DecodeError, match="port"):
        decode_message(good[:-2] + b"\x00\x00")
    unspecified = b"\x04" + bytes(4) + b"\x0f\xa0"
    with pytest.raises(DecodeError, match="unspecified"):
        decode_message(good[:address_at] + unspecified)
    mapped = b"\x06" + ipaddress.IPv6Address("::ffff:192.0.2.1").packed + b"\x0f\xa0"
    with pytest.raises(DecodeError, match="IPv4-mapped"):
        decode_message(good[:address_at] + mapped)
    pong = encode_message(Pong(RID, 1, Address("192.0.2.1", 4000)))
    with pytest.raises(DecodeError, match="PONG observed address: port"):
        decode_message(pong[:-2] + b"\x00\x00")
    with pytest.raises(DecodeError, match="PONG observed address: unknown address kind"):
        decode_message(pong[:17] + b"\x05" + pong[18:])


def providers_bytes(total: int, items: list[bytes], count: int | None = None) -> bytes:
    body = b"".join(struct.pack(">H", len(r)) + r for r in items)
    return b"\x0b" + RID + bytes([total, len(items) if count is None else count]) + body


def test_providers_rejections():
    assert decode_message(providers_bytes(1, [b"a", b"bc"])).records == (b"a", b"bc")
    with pytest.raises(DecodeError, match="length 0"):
        decode_message(providers_bytes(1, [b"a", b""]))
    with pytest.raises(DecodeError, match="count 0"):
        decode_message(providers_bytes(1, []))
    with pytest.raises(DecodeError, match="length 1001"):
        decode_message(providers_bytes(1, [b"r" * 1001]))
    for total in (0, 17):
        with pytest.raises(DecodeError, match="total"):
            decode_message(providers_bytes(total, [b"a"]))
    with pytest.raises(DecodeError, match="truncated"):
        decode_message(providers_bytes(1, [b"a"], count=2))


def test_records_in_rest_must_be_1_to_1000_bytes():
    for kind, head in ((0x05, ID), (0x08, b""), (0x09, ID)):
        with pytest.raises(DecodeError):
            decode_message(bytes([kind]) + RID + head)
        with pytest.raises(DecodeError, match="over 1000"):
            decode_message(bytes([kind]) + RID + head + b"r" * 1001)
        assert decode_message(bytes([kind]) + RID + head + b"r" * 1000).record == b"r" * 1000


def test_unknown_store_status():
    for status in (5, 0x80, 0xFF):
        with pytest.raises(DecodeError, match="status"):
            decode_message(b"\x06" + RID + bytes([status]))


def test_messages_over_max_are_rejected():
    over = providers_bytes(1, [b"p" * 551, b"q" * 553])
    assert len(over) == MAX_MESSAGE_BYTES + 1
    with pytest.raises(DecodeError, match="over MAX_MESSAGE_BYTES"):
        decode_message(over)
    with pytest.raises(DecodeError, match="over MAX_MESSAGE_BYTES"):
        decode_message(b"\x03" + bytes(MAX_DATAGRAM_BYTES))


# --- caller mistakes ---------------------------------------------------------------------------

BAD_CALLS = [
    (lambda: Ping(b"short", 1), ArgumentValueError, "request_id"),
    (lambda: Ping("12345678", 1), ArgumentTypeError, "request_id"),
    (lambda: Ping(RID, -1), ArgumentValueError, "record_seq"),
    (lambda: Ping(RID, 2**64), ArgumentValueError, "record_seq"),
    (lambda: Ping(RID, True), ArgumentTypeError, "record_seq"),
    (lambda: Ping(RID, 1.0), ArgumentTypeError, "record_seq"),
    (lambda: Pong(RID, 1, "192.0.2.1:4000"), ArgumentTypeError, "observed"),
    (lambda: Pong(RID, 1, Address("fe80::1%eth0", 4000)), ArgumentValueError, "observed"),
    (lambda: FindNode(RID, b"x" * 19), ArgumentValueError, "target"),
    (lambda: FindNode(RID, 5), ArgumentTypeError, "target"),
    (lambda: Nodes(RID, 0, []), ArgumentValueError, "total"),
    (lambda: Nodes(RID, 17, []), ArgumentValueError, "total"),
    (lambda: Nodes(RID, "1", []), ArgumentTypeError, "total"),
    (lambda: Nodes(RID, 1, [v4_contact(i) for i in range(21)]), ArgumentValueError, "contacts"),
    (lambda: Nodes(RID, 1, [v4_contact(0), "peer"]), ArgumentTypeError, "contacts\\[1\\]"),
    (lambda: Nodes(RID, 1, 5), ArgumentTypeError, "contacts"),
    (lambda: Nodes(RID, 1, [Contact(bytes(32), Address("fe80::1%eth0", 1))]), ArgumentValueError,
     "contacts\\[0\\].address"),
    (lambda: Store(RID, bytes(21), b"r"), ArgumentValueError, "key"),
    (lambda: Store(RID, ID, b""), ArgumentValueError, "record"),
    (lambda: Store(RID, ID, b"r" * 1001), ArgumentValueError, "record"),
    (lambda: Store(RID, ID, "record"), ArgumentTypeError, "record"),
    (lambda: StoreResult(RID, 5), ArgumentValueError, "status"),
    (lambda: StoreResult(RID, "STORED"), ArgumentTypeError, "status"),
    (lambda: FindValue(RID, None), ArgumentTypeError, "key"),
    (lambda: Value(RID, b""), ArgumentValueError, "record"),
    (lambda: Announce(RID, b"k", b"r"), ArgumentValueError, "capability_key"),
    (lambda: GetProviders(RID, "k" * 20), ArgumentTypeError, "capability_key"),
    (lambda: Providers(RID, 1, []), ArgumentValueError, "records"),
    (lambda: Providers(RID, 1, [b"a", b""]), ArgumentValueError, "records\\[1\\]"),
    (lambda: Providers(RID, 1, [b"a" * 1001]), ArgumentValueError, "records\\[0\\]"),
    (lambda: Providers(RID, 1, b"abc"), ArgumentTypeError, "records"),
    (lambda: Providers(RID, 1, [b"a"] * 256), ArgumentValueError, "records"),
    (lambda: Providers(RID, 1, [b"p" * 551, b"q" * 553]), ArgumentValueError, "MAX_MESSAGE_BYTES"),
    (lambda: encode_message("PING"), ArgumentTypeError, "message"),
    (lambda: new_request_id(lambda n: b"\x00" * (n - 1)), ArgumentValueError, "random_bytes"),
    (lambda: new_request_id(None), ArgumentTypeError, "random_bytes"),
    (lambda: capability_key("Relay"), ArgumentValueError, "capability"),
    (lambda: capability_key(b"relay"), ArgumentTypeError, "capability"),
    (lambda: split_nodes(RID, [v4_contact(i) for i in range(321)]), ArgumentValueError, "contacts"),
    (lambda: split_providers(RID, []), ArgumentValueError, "records"),
    (lambda: split_providers(RID, [b"r" * 1000] * 17), ArgumentValueError, "records"),
    (lambda: split_providers(RID, [b""]), ArgumentValueError, "records\\[0\\]"),
]


@pytest.mark.parametrize("call, error, field", BAD_CALLS, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD_CALLS)])
def test_caller_mistakes_raise_typed_errors_naming_the_field(call, error, field):
    with pytest.raises(error, match=field):
        call()


def test_constructors_normalise_input():
    m = Store(bytearray(RID), bytes(ID), bytearray(b"rec"))
    assert type(m.request_id) is bytes and type(m.key) is NodeId and type(m.record) is bytes
    assert StoreResult(RID, 2).status is StoreStatus.KEY_NOT_DERIVED
    assert Nodes(RID, 1, iter([v4_contact(0)])).contacts == (v4_contact(0),)
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.record = b"x"  # type: ignore[misc]


def test_new_request_id():
    assert new_request_id(lambda n: bytes(range(n))) == bytes(range(8))
    a, b = new_request_id(), new_request_id()
    assert len(a) == len(b) == 8 and a != b


# --- capability keys ---------------------------------------------------------------------------


def test_capability_key_is_stable():
    # Computed once as hashlib.sha256(b"sovereign-discovery/capability\x00relay").digest()[:20].
    assert capability_key("relay").hex() == "3a4d45e6d8c3d3f8226f7d7c7c59b9bdd38775f1"
    for name in ("store", "chat/1", "a", "x" * 32):
        expected = hashlib.sha256(b"sovereign-discovery/capability\x00" + name.encode()).digest()[:20]
        assert capability_key(name) == expected
        assert type(capability_key(name)) is NodeId
    assert capability_key("relay") != capability_key("store")


@pytest.mark.parametrize("name", ["", "Relay", "-relay", "x" * 33, "relay ", "rélay", "a\x00"])
def test_capability_key_rejects_invalid_names(name):
    with pytest.raises(ArgumentValueError):
        capability_key(name)


# --- splitting responses -----------------------------------------------------------------------


@pytest.mark.parametrize("count, pieces", [(0, 1), (1, 1), (20, 1), (21, 2), (40, 2), (41, 3), (320, 16)])
def test_split_nodes(count, pieces):
    items = [v6_contact(i) if i % 2 else v4_contact(i) for i in range(count)]
    messages = split_nodes(RID, items)
    assert len(messages) == pieces
    decoded = [decode_message(encode_message(m)) for m in messages]
    assert all(m.total == pieces and m.request_id == RID for m in decoded)
    assert all(len(m.contacts) <= MAX_NODES_PER_MESSAGE for m in decoded)
    assert [c for m in decoded for c in m.contacts] == items


@given(st.lists(st.binary(min_size=1, max_size=MAX_RECORD_BYTES), min_size=1, max_size=16))
@FAST
def test_split_providers(items):
    messages = split_providers(RID, items)
    assert 1 <= len(messages) <= 16
    decoded = []
    for m in messages:
        data = encode_message(m)
        assert len(data) <= MAX_MESSAGE_BYTES
        decoded.append(decode_message(data))
    assert all(m.total == len(messages) for m in decoded)
    assert [r for m in decoded for r in m.records] == items
    # greedy packing: no piece could have taken the next piece's first record
    for m, following in zip(decoded, decoded[1:]):
        size = len(encode_message(m))
        assert size + 2 + len(following.records[0]) > MAX_MESSAGE_BYTES or len(m.records) == 255


def test_split_providers_bounds():
    assert len(split_providers(RID, [b"r" * 1000] * 16)) == 16
    many_small = split_providers(RID, [b"x"] * 600)
    assert [len(m.records) for m in many_small] == [255, 255, 90]
    assert len(split_providers(RID, [b"p" * 551, b"q" * 552])) == 1
    assert len(split_providers(RID, [b"p" * 551, b"q" * 553])) == 2


def test_contact_cache_is_bounded_and_transparent(monkeypatch):
    from sovereign_discovery import wire

    monkeypatch.setattr(wire, "_CONTACT_CACHE_SIZE", 8)
    monkeypatch.setattr(wire, "_contact_cache", {})
    items = [v4_contact(i) for i in range(10)] + [v6_contact(i) for i in range(10)]
    data = encode_message(Nodes(RID, 1, items))
    first = decode_message(data)
    assert len(wire._contact_cache) <= 8
    again = decode_message(data)  # partly from the cache
    assert first == again and list(again.contacts) == items
    assert [c.node_id for c in again.contacts] == [NodeId.from_public_key(c.public_key) for c in items]
    # a cached contact's bytes followed by a bad one still fail
    bad = nodes_bytes(1, items[:2])[:-2] + b"\x00\x00"
    with pytest.raises(DecodeError, match="contact 1: port"):
        decode_message(bad)


def test_ipv4_nodes_of_known_contacts_decode_to_the_same_objects_and_stay_strict(monkeypatch):
    from sovereign_discovery import wire

    monkeypatch.setattr(wire, "_contact_cache", {})
    items = [v4_contact(i) for i in range(MAX_NODES_PER_MESSAGE)]
    data = encode_message(Nodes(RID, 1, items))
    first = decode_message(data)  # every contact new: decoded one by one, cached
    again = decode_message(data)  # every contact cached: the IPv4 shortcut
    assert again == first and list(again.contacts) == items
    assert all(a is b for a, b in zip(again.contacts, first.contacts))
    # one unknown contact among known ones: decoded (and checked) like the others
    fresh = v4_contact(99)
    mixed = decode_message(encode_message(Nodes(RID, 1, items[:5] + [fresh])))
    assert list(mixed.contacts) == items[:5] + [fresh]
    # the shortcut applies to exact sizes only: a trailing byte still fails
    with pytest.raises(DecodeError, match="trailing"):
        decode_message(data + b"\x00")
    bad_port = data[:-2] + b"\x00\x00"  # the last contact's port 0: not known, so checked
    with pytest.raises(DecodeError, match="port"):
        decode_message(bad_port)


def test_encode_nodes_answer_is_a_one_message_nodes():
    contacts = [v6_contact(i) if i % 2 else v4_contact(i) for i in range(MAX_NODES_PER_MESSAGE)]
    assert encode_nodes_answer(RID, contacts) == encode_message(Nodes(RID, 1, contacts))
    assert encode_nodes_answer(RID, []) == encode_message(Nodes(RID, 1, ()))
    zoned = Contact(bytes(range(32)), Address("fe80::1%eth0", 4000))
    assert decode_message(encode_nodes_answer(RID, [contacts[0], zoned, contacts[1]])).contacts == (
        contacts[0], contacts[1])  # a link-local contact means nothing elsewhere: left out
    with pytest.raises(ArgumentValueError, match="at most"):
        encode_nodes_answer(RID, contacts + [contacts[0]])


def test_decoded_addresses_are_interned_per_process_and_the_table_is_bounded():
    from sovereign_discovery import addresses as interning

    encoded = Address("192.0.2.7", 4000).encode()
    first, end = interning.decode_address(b"x" + encoded, 1)
    again, _ = interning.decode_address(encoded, 0)
    assert end == 1 + len(encoded) and first is again and first == Address("192.0.2.7", 4000)
    assert interning.interned_address(Address("192.0.2.7", 4000)) is first
    for port in range(1, interning.MAX_INTERNED_ADDRESSES + 2):
        interning.decode_address(Address("198.51.100.1", port).encode(), 0)
    assert len(interning._interned) <= interning.MAX_INTERNED_ADDRESSES
