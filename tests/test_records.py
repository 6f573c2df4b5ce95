"""Signed peer records: round trips, and every way a record can be bad (tampered, forged,
expired, from the future, oversized, truncated, trailing garbage, non-canonical), plus the
published test vectors in docs/test-vectors.json."""

from __future__ import annotations

import dataclasses
import json
import struct
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sovereign_discovery import (
    Address,
    ArgumentTypeError,
    ArgumentValueError,
    BadSignatureError,
    DecodeError,
    Identity,
    MalformedRecordError,
    NodeId,
    PeerRecord,
    RecordExpiredError,
    RecordFromFutureError,
    RecordTooLargeError,
    SignaturePurpose,
    encode_public_key,
)
from sovereign_discovery.constants import (
    MAX_DATAGRAM_BYTES,
    MAX_RECORD_ADDRESSES,
    MAX_RECORD_BYTES,
    MAX_RECORD_CAPABILITIES,
    MAX_RECORD_LIFETIME_S,
)

NOW = 1_800_000_000
ME = Identity.from_seed(b"\x01" * 32)
MALLORY = Identity.from_seed(b"\x02" * 32)
VECTORS = Path(__file__).resolve().parent.parent / "docs" / "test-vectors.json"


def make(identity=ME, **overrides) -> PeerRecord:
    fields = dict(addresses=[Address("192.0.2.7", 4000), Address("2001:db8::7", 4000)],
                  capabilities=["store", "relay"], seq=5, expires_at=NOW + 3600)
    fields.update(overrides)
    return PeerRecord.create(identity, **fields)


def test_round_trip_and_derived_node_id():
    record = make()
    back = PeerRecord.decode(record.encode(), now=NOW)
    assert back == record
    assert back.node_id == ME.node_id == NodeId.from_public_key(back.public_key)
    assert back.capabilities == ("relay", "store")  # canonical order


addresses = st.one_of(
    st.builds(lambda a, b, c, d, p: Address(f"{a}.{b}.{c}.{d}", p), st.integers(1, 223),
              st.integers(0, 255), st.integers(0, 255), st.integers(1, 254), st.integers(1, 65535)),
    st.builds(lambda hi, lo, p: Address(f"2001:db8:{hi:x}::{lo:x}", p), st.integers(0, 0xFFFF),
              st.integers(1, 0xFFFF), st.integers(1, 65535)),
)
capabilities = st.from_regex(r"[a-z0-9][a-z0-9._/-]{0,31}", fullmatch=True)


@settings(max_examples=80, deadline=None)
@given(addrs=st.lists(addresses, max_size=MAX_RECORD_ADDRESSES, unique=True),
       caps=st.lists(capabilities, max_size=MAX_RECORD_CAPABILITIES, unique=True),
       seq=st.integers(0, 2**64 - 1), ttl=st.integers(1, MAX_RECORD_LIFETIME_S),
       protocol=st.integers(0, 2**16 - 1))
def test_any_valid_record_round_trips(addrs, caps, seq, ttl, protocol):
    record = PeerRecord.create(ME, addresses=addrs, capabilities=caps, seq=seq,
                               expires_at=NOW + ttl, protocol_version=protocol)
    assert len(record.encode()) <= MAX_RECORD_BYTES
    assert PeerRecord.decode(record.encode(), now=NOW) == record


def test_largest_record_fits_a_datagram_with_room_for_headers():
    record = make(addresses=[Address(f"2001:db8::{i + 1}", 65535) for i in range(MAX_RECORD_ADDRESSES)],
                  capabilities=[f"{i:x}" + "c" * 31 for i in range(MAX_RECORD_CAPABILITIES)])
    size = len(record.encode())
    assert size == 797 <= MAX_RECORD_BYTES <= MAX_DATAGRAM_BYTES - 280
    assert PeerRecord.decode(record.encode(), now=NOW) == record


def test_every_single_byte_tamper_is_rejected():
    encoded = make().encode()
    for position in range(len(encoded)):
        tampered = bytearray(encoded)
        tampered[position] ^= 0x01
        with pytest.raises(DecodeError):
            PeerRecord.decode(bytes(tampered), now=NOW)


def test_tampered_field_with_valid_structure_is_a_bad_signature():
    encoded = bytearray(make().encode())
    struct.pack_into(">Q", encoded, 33, 6)  # seq 5 -> 6
    with pytest.raises(BadSignatureError):
        PeerRecord.decode(bytes(encoded), now=NOW)


def test_forged_record_claiming_another_key_is_rejected():
    forged = bytearray(make(identity=MALLORY).encode())
    forged[1:33] = ME.public_key  # claim ME's identity, keep MALLORY's signature
    with pytest.raises(BadSignatureError):
        PeerRecord.decode(bytes(forged), now=NOW)


def test_signature_for_another_purpose_does_not_make_a_record():
    good = make().encode()
    body = good[:-64]
    wrong_domain = body + ME.sign(SignaturePurpose.SESSION_HANDSHAKE, body)
    with pytest.raises(BadSignatureError):
        PeerRecord.decode(wrong_domain, now=NOW)


def test_expired_and_future_records_are_rejected():
    record = make(expires_at=NOW + 10)
    assert PeerRecord.decode(record.encode(), now=NOW + 9.5)
    with pytest.raises(RecordExpiredError):
        PeerRecord.decode(record.encode(), now=NOW + 10)
    far = make(expires_at=NOW + MAX_RECORD_LIFETIME_S + 1)
    with pytest.raises(RecordFromFutureError):
        PeerRecord.decode(far.encode(), now=NOW)
    assert PeerRecord.decode(far.encode(), now=NOW + 1)  # exactly at the limit is fine


def test_oversized_input_is_rejected_before_parsing():
    with pytest.raises(RecordTooLargeError):
        PeerRecord.decode(make().encode() + bytes(MAX_RECORD_BYTES), now=NOW)


def test_every_truncation_is_rejected():
    encoded = make().encode()
    for end in range(len(encoded)):
        with pytest.raises(DecodeError):
            PeerRecord.decode(encoded[:end], now=NOW)


def test_trailing_garbage_is_rejected():
    encoded = make().encode()
    for garbage in (b"\x00", b"garbage", encoded[-64:]):
        with pytest.raises(DecodeError):
            PeerRecord.decode(encoded + garbage, now=NOW)


def _resign(body: bytes) -> bytes:
    return body + ME.sign(SignaturePurpose.PEER_RECORD, body)


def test_non_canonical_but_correctly_signed_encodings_are_rejected():
    body = make(capabilities=["a", "b"], addresses=[Address("192.0.2.1", 1)]).encode()[:-64]
    caps_at = body.index(b"\x02\x01a\x01b")
    swapped = body[:caps_at] + b"\x02\x01b\x01a"
    duplicated = body[:caps_at] + b"\x02\x01a\x01a"
    bad_name = body[:caps_at] + b"\x01\x01A"
    empty_name = body[:caps_at] + b"\x01\x00"
    wrong_version = b"\x02" + body[1:]
    unknown_kind = body.replace(b"\x04\xc0\x00\x02\x01", b"\x05\xc0\x00\x02\x01")
    port_zero = body.replace(b"\xc0\x00\x02\x01\x00\x01", b"\xc0\x00\x02\x01\x00\x00")
    for bad in (swapped, duplicated, bad_name, empty_name, wrong_version, unknown_kind, port_zero):
        with pytest.raises(MalformedRecordError):
            PeerRecord.decode(_resign(bad), now=NOW)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=1100))
def test_arbitrary_bytes_raise_only_decode_errors(data):
    try:
        PeerRecord.decode(data, now=NOW)
    except DecodeError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_mutated_records_raise_only_decode_errors(data):
    encoded = bytearray(make().encode())
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "insert", "delete"]))
        at = data.draw(st.integers(0, len(encoded)))
        if op == "flip" and at < len(encoded):
            encoded[at] ^= data.draw(st.integers(1, 255))
        elif op == "insert":
            encoded[at:at] = data.draw(st.binary(min_size=1, max_size=4))
        elif at < len(encoded):
            del encoded[at]
    try:
        PeerRecord.decode(bytes(encoded), now=NOW)
    except DecodeError:
        pass


def test_records_cannot_be_made_unchecked():
    record = make()
    with pytest.raises(ArgumentTypeError, match="PeerRecord.create"):
        PeerRecord(record.public_key, 9, record.expires_at, record.addresses, record.capabilities,
                   record.protocol_version, record.signature, record.node_id, record.encoded)
    with pytest.raises(ArgumentTypeError):
        dataclasses.replace(record, seq=9)  # an edited record would carry a stale signature


def test_newer_sequence_number_supersedes():
    old, new = make(seq=5), make(seq=6)
    assert new.supersedes(old) and not old.supersedes(new)
    assert not make(seq=5, capabilities=["other"]).supersedes(old)  # same seq: first seen wins
    assert not make(identity=MALLORY, seq=99).supersedes(old)  # another key never supersedes


@pytest.mark.parametrize("overrides, match", [
    (dict(capabilities=["Bad"]), "capability"),
    (dict(capabilities=[f"c{i}" for i in range(MAX_RECORD_CAPABILITIES + 1)]), "capabilities"),
    (dict(addresses=[Address("192.0.2.1", p) for p in range(1, MAX_RECORD_ADDRESSES + 2)]), "addresses"),
    (dict(addresses=[Address("192.0.2.1", 1)] * 2), "distinct"),
    (dict(seq=-1), "seq"),
    (dict(expires_at=2**64), "expires_at"),
    (dict(protocol_version=2**16), "protocol_version"),
])
def test_caller_mistakes_in_create_name_the_field(overrides, match):
    with pytest.raises(ArgumentValueError, match=match):
        make(**overrides)


# --- published test vectors ------------------------------------------------------------------------


def make_vectors() -> dict:
    """The vectors in docs/test-vectors.json, recomputed (Ed25519 signing is deterministic)."""
    out = {"description": "sovereign_discovery identity and peer-record test vectors (format v1)",
           "identities": [], "records": []}
    for seed in (bytes(32), bytes(range(32))):
        who = Identity.from_seed(seed)
        out["identities"].append({"seed_hex": seed.hex(), "public_key_hex": who.public_key.hex(),
                                  "public_key_text": encode_public_key(who.public_key),
                                  "node_id_hex": who.node_id.hex(), "node_id_text": str(who.node_id)})
    who = Identity.from_seed(bytes(range(32)))
    for fields in (
        dict(addresses=[], capabilities=[], seq=0, expires_at=1_800_000_000, protocol_version=1),
        dict(addresses=[Address("192.0.2.1", 4000), Address("2001:db8::1", 4001)],
             capabilities=["store", "relay", "chat/1"], seq=1_700_000_000_123,
             expires_at=1_800_003_600, protocol_version=1),
    ):
        record = PeerRecord.create(who, **fields)
        out["records"].append({
            "seed_hex": who.seed().hex(),
            "fields": {**fields, "addresses": [str(a) for a in fields["addresses"]],
                       "capabilities": list(record.capabilities)},
            "encoded_hex": record.encode().hex(), "encoded_bytes": len(record.encode()),
            "signed_message_prefix_hex": b"sovereign-discovery/v1\x00peer-record\x00".hex(),
        })
    return out


def test_published_vectors_match_the_code():
    published = json.loads(VECTORS.read_text())
    assert published == make_vectors()
    for vector in published["records"]:
        record = PeerRecord.decode(bytes.fromhex(vector["encoded_hex"]), now=1_800_000_000 - 1)
        assert [str(a) for a in record.addresses] == vector["fields"]["addresses"]


if __name__ == "__main__" and sys.argv[1:] == ["--write-vectors"]:
    VECTORS.write_text(json.dumps(make_vectors(), indent=2) + "\n")
