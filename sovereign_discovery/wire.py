"""Messages of the UDP protocol: types, encoding, and strict decoding (docs/protocol.md, section
"Messages (wire layer)"). No keys, no sessions, no I/O: the session layer carries the bytes.

Format (all integers big-endian)::

    message = type u8 || request_id (8 bytes) || body

    0x01 PING           record_seq u64
    0x02 PONG           record_seq u64 || observed address (addresses.py encoding)
    0x03 FIND_NODE      target (20)
    0x04 NODES          total u8 (1..16) || count u8 (0..20) || (public_key (32) || address) x count
    0x05 STORE          key (20) || record (rest, 1..1000 bytes)
    0x06 STORE_RESULT   status u8 (StoreStatus)
    0x07 FIND_VALUE     key (20)
    0x08 VALUE          record (rest, 1..1000 bytes)
    0x09 ANNOUNCE       capability_key (20) || record (rest, 1..1000 bytes)
    0x0A GET_PROVIDERS  capability_key (20)
    0x0B PROVIDERS      total u8 (1..16) || count u8 (1..255) || (length u16 (1..1000) || record) x count

A contact's node ID is derived from its public key, never sent. Record bytes stay opaque bytes
here; the engine checks them with ``PeerRecord.decode(now=...)``. ``total`` says how many messages
make up a multi-datagram response (:func:`split_nodes`, :func:`split_providers`).

Errors:

- :func:`decode_message` raises only :class:`~sovereign_discovery.errors.DecodeError`, whatever
  the bytes: unknown type, truncated or trailing bytes, a count or length out of range, a bad
  address, an unknown status, a message over :data:`MAX_MESSAGE_BYTES`. The decoding is canonical:
  whatever it accepts, :func:`encode_message` turns back into the same bytes.
- Message constructors raise :class:`~sovereign_discovery.errors.ArgumentTypeError` or
  :class:`~sovereign_discovery.errors.ArgumentValueError` naming the field, so every message in
  hand encodes within :data:`MAX_MESSAGE_BYTES`.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar, Union

from .addresses import KIND_UDP4, Address, decode_address
from .constants import MAX_MESSAGE_BYTES, MAX_RECORD_BYTES, NODE_ID_BYTES, PUBLIC_KEY_BYTES
from .errors import ArgumentTypeError, ArgumentValueError, DecodeError
from .keys import NodeId, check_node_id
from .records import check_capability
from .routing import Contact

__all__ = [
    "MessageType",
    "StoreStatus",
    "Ping",
    "Pong",
    "FindNode",
    "Nodes",
    "Store",
    "StoreResult",
    "FindValue",
    "Value",
    "Announce",
    "GetProviders",
    "Providers",
    "Message",
    "encode_message",
    "decode_message",
    "capability_key",
    "new_request_id",
    "split_nodes",
    "split_providers",
    "MAX_MESSAGE_BYTES",
    "MAX_NODES_PER_MESSAGE",
    "encode_nodes_answer",
    "MAX_RESPONSE_MESSAGES",
    "REQUEST_ID_BYTES",
]

#: Contacts in one NODES message (Kademlia's k = 20; 20 IPv6 contacts make a 1,031-byte message).
MAX_NODES_PER_MESSAGE = 20
#: Messages in one multi-datagram response (NODES or PROVIDERS ``total``).
MAX_RESPONSE_MESSAGES = 16
REQUEST_ID_BYTES = 8
#: Records in one PROVIDERS message: its ``count`` is one byte.
_MAX_PROVIDERS_PER_MESSAGE = 255
_CAPABILITY_KEY_PREFIX = b"sovereign-discovery/capability\x00"
_U64_MAX = (1 << 64) - 1


class MessageType(IntEnum):
    PING = 0x01
    PONG = 0x02
    FIND_NODE = 0x03
    NODES = 0x04
    STORE = 0x05
    STORE_RESULT = 0x06
    FIND_VALUE = 0x07
    VALUE = 0x08
    ANNOUNCE = 0x09
    GET_PROVIDERS = 0x0A
    PROVIDERS = 0x0B


class StoreStatus(IntEnum):
    """The answer to STORE and ANNOUNCE."""

    STORED = 0
    INVALID_RECORD = 1
    #: The STORE key is not derived from the record's node ID (or the ANNOUNCE key from none of
    #: its capabilities).
    KEY_NOT_DERIVED = 2
    STORE_FULL = 3
    #: Older than the record already held.
    STALE = 4


# --- precompiled layouts -----------------------------------------------------------------------

_HEAD = struct.Struct(">B8s")  # type, request_id
_WITH_U64 = struct.Struct(">B8sQ")  # PING, and the head of PONG
_WITH_ID = struct.Struct(">B8s20s")  # FIND_NODE, FIND_VALUE, GET_PROVIDERS; head of STORE, ANNOUNCE
_WITH_COUNTS = struct.Struct(">B8sBB")  # head of NODES and PROVIDERS: total, count
_WITH_STATUS = struct.Struct(">B8sB")  # STORE_RESULT
_LENGTH = struct.Struct(">H")
_HEAD_SIZE = _HEAD.size
_ID_SIZE = _WITH_ID.size
_COUNTS_SIZE = _WITH_COUNTS.size

# Bytes of an IPv4 contact (key 32, kind 1 + ip 4 + port 2), where in a NODES message the kind
# byte of the first one is, and that kind byte.
_IPV4_CONTACT = PUBLIC_KEY_BYTES + 1 + 4 + 2
_IPV4_KINDS = _COUNTS_SIZE + PUBLIC_KEY_BYTES
_IPV4_KIND = bytes((KIND_UDP4,))
# Bytes of one contact at most (IPv6 address: kind 1 + ip 16 + port 2).
_MAX_CONTACT_BYTES = PUBLIC_KEY_BYTES + 1 + 16 + 2
assert _COUNTS_SIZE + MAX_NODES_PER_MESSAGE * _MAX_CONTACT_BYTES <= MAX_MESSAGE_BYTES
assert _ID_SIZE + MAX_RECORD_BYTES <= MAX_MESSAGE_BYTES

_new = object.__new__
_set = object.__setattr__
_bytes_new = bytes.__new__

#: Decoded contacts by their exact encoding (public key || address). Building a Contact costs
#: ~15 us (ipaddress parsing, reachability checks, SHA-256 of the key) and the same peers recur in
#: NODES answers all the time; a hit costs a dict lookup. Safe to share: the value is what decoding
#: those exact bytes gives, and Contact is immutable. Bounded: cleared when full, so a flood of
#: distinct contacts costs misses, not memory.
_CONTACT_CACHE_SIZE = 4096
_contact_cache: dict[bytes, Contact] = {}
#: Contacts a trusted simulator registered (:func:`intern_contact`): consulted on a cache miss,
#: never filled from the network, so NODES answers in a simulation of any size decode to the very
#: contact objects the simulator made (one per node, shared by every table and lookup).
_interned: dict[bytes, Contact] = {}


def intern_contact(contact: Contact, *, remove: bool = False) -> None:
    """Let NODES decoding return ``contact`` itself for its exact encoding (or stop, with
    ``remove``). For simulators that hold every node's contact (``sim_session.
    SimulatedDirectory`` calls it); a real node never needs it."""
    if not isinstance(contact, Contact):
        raise ArgumentTypeError(f"contact must be a Contact, not {type(contact).__name__}")
    if remove:
        if _interned.get(contact.encode()) is contact:
            del _interned[contact.encode()]
    else:
        _interned[contact.encode()] = contact


# --- caller checks -----------------------------------------------------------------------------


def _check_request_id(value: object) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise ArgumentTypeError(f"request_id must be bytes, not {type(value).__name__}")
    if len(value) != REQUEST_ID_BYTES:
        raise ArgumentValueError(f"request_id must be {REQUEST_ID_BYTES} bytes long, not {len(value)}")
    return bytes(value)


def _check_u64(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ArgumentTypeError(f"{name} must be an int, not {type(value).__name__}")
    if not 0 <= value <= _U64_MAX:
        raise ArgumentValueError(f"{name} must be in 0..2**64 - 1, not {value}")
    return int(value)


def _check_record(name: str, value: object) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise ArgumentTypeError(f"{name} must be bytes, not {type(value).__name__}")
    if not 1 <= len(value) <= MAX_RECORD_BYTES:
        raise ArgumentValueError(f"{name} must be 1..{MAX_RECORD_BYTES} bytes long, not {len(value)}")
    return bytes(value)


def _check_total(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ArgumentTypeError(f"total must be an int, not {type(value).__name__}")
    if not 1 <= value <= MAX_RESPONSE_MESSAGES:
        raise ArgumentValueError(f"total must be in 1..{MAX_RESPONSE_MESSAGES}, not {value}")
    return int(value)


def _check_address(name: str, value: object) -> Address:
    if not isinstance(value, Address):
        raise ArgumentTypeError(f"{name} must be an Address, not {type(value).__name__}")
    if value.ip.version == 6 and value.ip.scope_id:  # type: ignore[union-attr]
        raise ArgumentValueError(f"{name} {value} has a zone; zoned addresses cannot be sent")
    return value


def _check_contact(i: int, contact: object) -> None:
    if not isinstance(contact, Contact):
        raise ArgumentTypeError(f"contacts[{i}] must be a Contact, not {type(contact).__name__}")
    _check_address(f"contacts[{i}].address", contact.address)


# --- messages ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ping:
    """Liveness check; carries the ``seq`` of the sender's own record."""

    TYPE: ClassVar[MessageType] = MessageType.PING
    request_id: bytes
    record_seq: int

    def __init__(self, request_id: bytes, record_seq: int) -> None:
        _set(self, "request_id", _check_request_id(request_id))
        _set(self, "record_seq", _check_u64("record_seq", record_seq))


@dataclass(frozen=True, slots=True)
class Pong:
    """Answers PING: the responder's record ``seq`` and the address the PING came from."""

    TYPE: ClassVar[MessageType] = MessageType.PONG
    request_id: bytes
    record_seq: int
    observed: Address

    def __init__(self, request_id: bytes, record_seq: int, observed: Address) -> None:
        _set(self, "request_id", _check_request_id(request_id))
        _set(self, "record_seq", _check_u64("record_seq", record_seq))
        _set(self, "observed", _check_address("observed", observed))


@dataclass(frozen=True, slots=True)
class FindNode:
    TYPE: ClassVar[MessageType] = MessageType.FIND_NODE
    request_id: bytes
    target: NodeId

    def __init__(self, request_id: bytes, target: bytes) -> None:
        _set(self, "request_id", _check_request_id(request_id))
        _set(self, "target", check_node_id("target", target))


@dataclass(frozen=True, slots=True)
class Nodes:
    """Contacts (at most :data:`MAX_NODES_PER_MESSAGE`); one of ``total`` messages of a response."""

    TYPE: ClassVar[MessageType] = MessageType.NODES
    request_id: bytes
    total: int
    contacts: tuple[Contact, ...]

    def __init__(self, request_id: bytes, total: int, contacts: Iterable[Contact]) -> None:
        _set(self, "request_id", _check_request_id(request_id))
        _set(self, "total", _check_total(total))
        if type(contacts) is tuple or type(contacts) is list:  # the common cases, checked fast
            items = tuple(contacts)
        elif isinstance(contacts, (str, bytes)) or not isinstance(contacts, Iterable):
            raise ArgumentTypeError(f"contacts must be an iterable of Contact, not {type(contacts).__name__}")
        else:
            items = tuple(contacts)
        if len(items) > MAX_NODES_PER_MESSAGE:
            raise ArgumentValueError(f"contacts: at most {MAX_NODES_PER_MESSAGE}, got {len(items)}")
        for i, contact in enumerate(items):
            # A contact encoded once (cached) is encodable: only new ones need the address check.
            if type(contact) is not Contact or contact._encoded is None:
                _check_contact(i, contact)
        _set(self, "contacts", items)


@dataclass(frozen=True, slots=True)
class Store:
    """Asks the recipient to hold ``record`` under ``key``."""

    TYPE: ClassVar[MessageType] = MessageType.STORE
    request_id: bytes
    key: NodeId
    record: bytes

    def __init__(self, request_id: bytes, key: bytes, record: bytes) -> None:
        _set(self, "request_id", _check_request_id(request_id))
        _set(self, "key", check_node_id("key", key))
        _set(self, "record", _check_record("record", record))


@dataclass(frozen=True, slots=True)
class StoreResult:
    """Answers STORE and ANNOUNCE."""

    TYPE: ClassVar[MessageType] = MessageType.STORE_RESULT
    request_id: bytes
    status: StoreStatus

    def __init__(self, request_id: bytes, status: StoreStatus | int) -> None:
        _set(self, "request_id", _check_request_id(request_id))
        if not isinstance(status, int) or isinstance(status, bool):
            raise ArgumentTypeError(f"status must be a StoreStatus, not {type(status).__name__}")
        try:
            _set(self, "status", StoreStatus(status))
        except ValueError:
            raise ArgumentValueError(f"status must be a StoreStatus (0..4), not {status}") from None


@dataclass(frozen=True, slots=True)
class FindValue:
    TYPE: ClassVar[MessageType] = MessageType.FIND_VALUE
    request_id: bytes
    key: NodeId

    def __init__(self, request_id: bytes, key: bytes) -> None:
        _set(self, "request_id", _check_request_id(request_id))
        _set(self, "key", check_node_id("key", key))


@dataclass(frozen=True, slots=True)
class Value:
    """Answers FIND_VALUE with the record held (unverified bytes)."""

    TYPE: ClassVar[MessageType] = MessageType.VALUE
    request_id: bytes
    record: bytes

    def __init__(self, request_id: bytes, record: bytes) -> None:
        _set(self, "request_id", _check_request_id(request_id))
        _set(self, "record", _check_record("record", record))


@dataclass(frozen=True, slots=True)
class Announce:
    """A provider's own signed record, offered under one of its capabilities' keys."""

    TYPE: ClassVar[MessageType] = MessageType.ANNOUNCE
    request_id: bytes
    capability_key: NodeId
    record: bytes

    def __init__(self, request_id: bytes, capability_key: bytes, record: bytes) -> None:
        _set(self, "request_id", _check_request_id(request_id))
        _set(self, "capability_key", check_node_id("capability_key", capability_key))
        _set(self, "record", _check_record("record", record))


@dataclass(frozen=True, slots=True)
class GetProviders:
    TYPE: ClassVar[MessageType] = MessageType.GET_PROVIDERS
    request_id: bytes
    capability_key: NodeId

    def __init__(self, request_id: bytes, capability_key: bytes) -> None:
        _set(self, "request_id", _check_request_id(request_id))
        _set(self, "capability_key", check_node_id("capability_key", capability_key))


@dataclass(frozen=True, slots=True)
class Providers:
    """Provider records (unverified bytes); one of ``total`` messages of a response."""

    TYPE: ClassVar[MessageType] = MessageType.PROVIDERS
    request_id: bytes
    total: int
    records: tuple[bytes, ...]

    def __init__(self, request_id: bytes, total: int, records: Iterable[bytes]) -> None:
        _set(self, "request_id", _check_request_id(request_id))
        _set(self, "total", _check_total(total))
        if isinstance(records, (str, bytes, bytearray, memoryview)) or not isinstance(records, Iterable):
            raise ArgumentTypeError(f"records must be an iterable of bytes, not {type(records).__name__}")
        items = tuple(_check_record(f"records[{i}]", r) for i, r in enumerate(records))
        if not 1 <= len(items) <= _MAX_PROVIDERS_PER_MESSAGE:
            raise ArgumentValueError(f"records: 1..{_MAX_PROVIDERS_PER_MESSAGE} needed, got {len(items)}")
        size = _providers_size(items)
        if size > MAX_MESSAGE_BYTES:
            raise ArgumentValueError(
                f"records: the message would be {size} bytes, over MAX_MESSAGE_BYTES"
                f" ({MAX_MESSAGE_BYTES}); use split_providers"
            )
        _set(self, "records", items)


Message = Union[Ping, Pong, FindNode, Nodes, Store, StoreResult, FindValue, Value, Announce,
                GetProviders, Providers]


def _providers_size(records: tuple[bytes, ...]) -> int:
    return _COUNTS_SIZE + sum(_LENGTH.size + len(r) for r in records)


# --- encoding ----------------------------------------------------------------------------------


def _encode_ping(m: Ping) -> bytes:
    return _WITH_U64.pack(0x01, m.request_id, m.record_seq)


def _encode_pong(m: Pong) -> bytes:
    return _WITH_U64.pack(0x02, m.request_id, m.record_seq) + m.observed.encode()


def _encode_find_node(m: FindNode) -> bytes:
    return _WITH_ID.pack(0x03, m.request_id, m.target)


def _encode_nodes(m: Nodes) -> bytes:
    return _WITH_COUNTS.pack(0x04, m.request_id, m.total, len(m.contacts)) + b"".join(
        [c.encode() for c in m.contacts])


def _encode_store(m: Store) -> bytes:
    return _WITH_ID.pack(0x05, m.request_id, m.key) + m.record


def _encode_store_result(m: StoreResult) -> bytes:
    return _WITH_STATUS.pack(0x06, m.request_id, m.status)


def _encode_find_value(m: FindValue) -> bytes:
    return _WITH_ID.pack(0x07, m.request_id, m.key)


def _encode_value(m: Value) -> bytes:
    return _HEAD.pack(0x08, m.request_id) + m.record


def _encode_announce(m: Announce) -> bytes:
    return _WITH_ID.pack(0x09, m.request_id, m.capability_key) + m.record


def _encode_get_providers(m: GetProviders) -> bytes:
    return _WITH_ID.pack(0x0A, m.request_id, m.capability_key)


def _encode_providers(m: Providers) -> bytes:
    parts = [_WITH_COUNTS.pack(0x0B, m.request_id, m.total, len(m.records))]
    pack_length = _LENGTH.pack
    for r in m.records:
        parts.append(pack_length(len(r)))
        parts.append(r)
    return b"".join(parts)


_ENCODERS: dict[type, Callable[..., bytes]] = {
    Ping: _encode_ping,
    Pong: _encode_pong,
    FindNode: _encode_find_node,
    Nodes: _encode_nodes,
    Store: _encode_store,
    StoreResult: _encode_store_result,
    FindValue: _encode_find_value,
    Value: _encode_value,
    Announce: _encode_announce,
    GetProviders: _encode_get_providers,
    Providers: _encode_providers,
}


def encode_message(message: Message) -> bytes:
    """The bytes of ``message`` (at most :data:`MAX_MESSAGE_BYTES`, ensured by its constructor)."""
    encoder = _ENCODERS.get(type(message))
    if encoder is None:
        raise ArgumentTypeError(f"message must be one of the wire message types, not {type(message).__name__}")
    return encoder(message)


# --- decoding ----------------------------------------------------------------------------------
# Decoders build messages without re-running the caller checks: every field is checked here.
# IDs are made with bytes.__new__(NodeId, ...) (NodeId is a plain bytes subclass without state),
# skipping NodeId's type and length checks, which the struct layouts already guarantee.


def _exact(name: str, n: int, size: int) -> DecodeError:
    if n < size:
        return DecodeError(f"truncated {name}: {n} bytes, {size} needed")
    return DecodeError(f"{name}: {n - size} trailing bytes")


def _decode_ping(data: bytes, n: int) -> Ping:
    if n != 17:
        raise _exact("PING", n, 17)
    _, request_id, seq = _WITH_U64.unpack(data)
    m = _new(Ping)
    _set(m, "request_id", request_id)
    _set(m, "record_seq", seq)
    return m


def _decode_pong(data: bytes, n: int) -> Pong:
    if n < 17:
        raise DecodeError(f"truncated PONG: {n} bytes")
    _, request_id, seq = _WITH_U64.unpack_from(data)
    try:
        observed, end = decode_address(data, 17)
    except DecodeError as exc:
        raise DecodeError(f"PONG observed address: {exc}") from None
    if end != n:
        raise DecodeError(f"PONG: {n - end} trailing bytes")
    m = _new(Pong)
    _set(m, "request_id", request_id)
    _set(m, "record_seq", seq)
    _set(m, "observed", observed)
    return m


def _id_decoder(cls: type, field_name: str, label: str) -> Callable[[bytes, int], Message]:
    unpack = _WITH_ID.unpack

    def decode(data: bytes, n: int) -> Message:
        if n != _ID_SIZE:
            raise _exact(label, n, _ID_SIZE)
        _, request_id, raw_id = unpack(data)
        m = _new(cls)
        _set(m, "request_id", request_id)
        _set(m, field_name, _bytes_new(NodeId, raw_id))  # 20 bytes by the layout
        return m

    return decode


def _decode_nodes(data: bytes, n: int) -> Nodes:
    if n < _COUNTS_SIZE:
        raise DecodeError(f"truncated NODES: {n} bytes")
    _, request_id, total, count = _WITH_COUNTS.unpack_from(data)
    if not 1 <= total <= MAX_RESPONSE_MESSAGES:
        raise DecodeError(f"NODES total {total} outside 1..{MAX_RESPONSE_MESSAGES}")
    if count > MAX_NODES_PER_MESSAGE:
        raise DecodeError(f"NODES count {count} over {MAX_NODES_PER_MESSAGE}")
    if count and n == _COUNTS_SIZE + _IPV4_CONTACT * count \
            and data[_IPV4_KINDS::_IPV4_CONTACT] == _IPV4_KIND * count:
        # Every contact IPv4 (the common case): the encodings are fixed-size slices, looked up
        # in C (map); all known (interned or cached: decoded and checked before) -> done.
        raws = [data[o:o + _IPV4_CONTACT] for o in range(_COUNTS_SIZE, n, _IPV4_CONTACT)]
        # all(): truthiness, None or a Contact (``None in`` would call Contact.__eq__ per item)
        known = list(map(_interned.get, raws)) if _interned else [None]
        if not all(known):
            known = list(map(_contact_cache.get, raws))
        if all(known):
            return _nodes(request_id, total, known)
    contacts = []
    offset = _COUNTS_SIZE
    cache = _contact_cache
    for i in range(count):
        key_end = offset + PUBLIC_KEY_BYTES
        if key_end >= n:
            raise DecodeError(f"NODES: truncated contact {i}")
        # The address kind says the contact's length: 0x04 -> 7 address bytes, 0x06 -> 19.
        kind = data[key_end]
        end = key_end + (7 if kind == 0x04 else 19)
        contact = None
        if kind in (0x04, 0x06) and end <= n:
            raw = data[offset:end]
            # A simulation interns every contact: one lookup there; a real node's is empty.
            contact = (_interned.get(raw) if _interned else None) or cache.get(raw)
        if contact is None:
            try:
                address, end = decode_address(data, key_end)
            except DecodeError as exc:
                raise DecodeError(f"NODES contact {i}: {exc}") from None
            contact = Contact(data[offset:key_end], address)
            _set(contact, "_encoded", bytes(data[offset:end]))
            if len(cache) >= _CONTACT_CACHE_SIZE:
                cache.clear()
            cache[data[offset:end]] = contact
        contacts.append(contact)
        offset = end
    if offset != n:
        raise DecodeError(f"NODES: {n - offset} trailing bytes")
    return _nodes(request_id, total, contacts)


def _nodes(request_id: bytes, total: int, contacts: list[Contact]) -> Nodes:
    """A decoded NODES, built without the constructor's second pass over checked fields."""
    m = _new(Nodes)
    _set(m, "request_id", request_id)
    _set(m, "total", total)
    _set(m, "contacts", tuple(contacts))
    return m


def _record_rest(label: str, data: bytes, start: int, n: int) -> bytes:
    size = n - start
    if size < 1:
        raise DecodeError(f"truncated {label}: no record")
    if size > MAX_RECORD_BYTES:
        raise DecodeError(f"{label}: record of {size} bytes over {MAX_RECORD_BYTES}")
    return data[start:]


def _keyed_record_decoder(cls: type, field_name: str, label: str) -> Callable[[bytes, int], Message]:
    unpack_from = _WITH_ID.unpack_from

    def decode(data: bytes, n: int) -> Message:
        if n < _ID_SIZE:
            raise DecodeError(f"truncated {label}: {n} bytes")
        _, request_id, raw_id = unpack_from(data)
        record = _record_rest(label, data, _ID_SIZE, n)
        m = _new(cls)
        _set(m, "request_id", request_id)
        _set(m, field_name, _bytes_new(NodeId, raw_id))  # 20 bytes by the layout
        _set(m, "record", record)
        return m

    return decode


def _decode_store_result(data: bytes, n: int) -> StoreResult:
    if n != _WITH_STATUS.size:
        raise _exact("STORE_RESULT", n, _WITH_STATUS.size)
    _, request_id, status = _WITH_STATUS.unpack(data)
    if status > 4:
        raise DecodeError(f"unknown STORE_RESULT status {status}")
    m = _new(StoreResult)
    _set(m, "request_id", request_id)
    _set(m, "status", StoreStatus(status))
    return m


def _decode_value(data: bytes, n: int) -> Value:
    record = _record_rest("VALUE", data, _HEAD_SIZE, n)
    m = _new(Value)
    _set(m, "request_id", data[1:_HEAD_SIZE])
    _set(m, "record", record)
    return m


def _decode_providers(data: bytes, n: int) -> Providers:
    if n < _COUNTS_SIZE:
        raise DecodeError(f"truncated PROVIDERS: {n} bytes")
    _, request_id, total, count = _WITH_COUNTS.unpack_from(data)
    if not 1 <= total <= MAX_RESPONSE_MESSAGES:
        raise DecodeError(f"PROVIDERS total {total} outside 1..{MAX_RESPONSE_MESSAGES}")
    if count == 0:
        raise DecodeError("PROVIDERS count 0 (an empty answer is NODES)")
    records = []
    offset = _COUNTS_SIZE
    unpack_length = _LENGTH.unpack_from
    for i in range(count):
        if offset + 2 > n:
            raise DecodeError(f"PROVIDERS: truncated length of record {i}")
        (size,) = unpack_length(data, offset)
        if not 1 <= size <= MAX_RECORD_BYTES:
            raise DecodeError(f"PROVIDERS record {i}: length {size} outside 1..{MAX_RECORD_BYTES}")
        offset += 2
        end = offset + size
        if end > n:
            raise DecodeError(f"PROVIDERS: truncated record {i}")
        records.append(data[offset:end])
        offset = end
    if offset != n:
        raise DecodeError(f"PROVIDERS: {n - offset} trailing bytes")
    m = _new(Providers)
    _set(m, "request_id", request_id)
    _set(m, "total", total)
    _set(m, "records", tuple(records))
    return m


_DECODERS: dict[int, Callable[[bytes, int], Message]] = {
    0x01: _decode_ping,
    0x02: _decode_pong,
    0x03: _id_decoder(FindNode, "target", "FIND_NODE"),
    0x04: _decode_nodes,
    0x05: _keyed_record_decoder(Store, "key", "STORE"),
    0x06: _decode_store_result,
    0x07: _id_decoder(FindValue, "key", "FIND_VALUE"),
    0x08: _decode_value,
    0x09: _keyed_record_decoder(Announce, "capability_key", "ANNOUNCE"),
    0x0A: _id_decoder(GetProviders, "capability_key", "GET_PROVIDERS"),
    0x0B: _decode_providers,
}


def decode_message(data: bytes) -> Message:
    """Decode one message from untrusted bytes. Raises only :class:`DecodeError`, whatever
    ``data`` is (see the module docstring for the reasons)."""
    if type(data) is not bytes:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise DecodeError(f"a message must be bytes, not {type(data).__name__}")
        data = bytes(data)
    n = len(data)
    if n > MAX_MESSAGE_BYTES:
        raise DecodeError(f"message of {n} bytes over MAX_MESSAGE_BYTES ({MAX_MESSAGE_BYTES})")
    if n < _HEAD_SIZE:
        raise DecodeError(f"truncated message: {n} bytes, the header alone is {_HEAD_SIZE}")
    decoder = _DECODERS.get(data[0])
    if decoder is None:
        raise DecodeError(f"unknown message type 0x{data[0]:02x}")
    return decoder(data, n)


# --- helpers -----------------------------------------------------------------------------------


def capability_key(name: str) -> NodeId:
    """The DHT key of a capability: the first 20 bytes of
    SHA-256(``"sovereign-discovery/capability\\x00"`` || name) (docs/protocol.md, ANNOUNCE)."""
    check_capability(name)
    digest = hashlib.sha256(_CAPABILITY_KEY_PREFIX + name.encode("ascii")).digest()
    return NodeId(digest[:NODE_ID_BYTES])


def new_request_id(random_bytes: Callable[[int], bytes] = os.urandom) -> bytes:
    """A fresh 8-byte request ID from ``random_bytes(n)`` (the engine injects its randomness)."""
    if not callable(random_bytes):
        raise ArgumentTypeError(f"random_bytes must be callable, not {type(random_bytes).__name__}")
    value = random_bytes(REQUEST_ID_BYTES)
    if not isinstance(value, (bytes, bytearray)) or len(value) != REQUEST_ID_BYTES:
        raise ArgumentValueError(
            f"random_bytes({REQUEST_ID_BYTES}) must return {REQUEST_ID_BYTES} bytes, not {value!r:.40}"
        )
    return bytes(value)


def encode_nodes_answer(request_id: bytes, contacts: list[Contact]) -> bytes:
    """The bytes of a one-message NODES answer (``total`` 1) carrying ``contacts`` that are
    :class:`Contact` objects (a routing table's), at most :data:`MAX_NODES_PER_MESSAGE`: the
    serving hot path, built from the contacts' cached encodings without a :class:`Nodes` object.
    Contacts with a zoned (link-local) address mean nothing elsewhere and are left out."""
    if len(contacts) > MAX_NODES_PER_MESSAGE:
        raise ArgumentValueError(f"contacts: at most {MAX_NODES_PER_MESSAGE}, got {len(contacts)}")
    try:
        body = b"".join([c._encoded or c.encode() for c in contacts])
    except ArgumentValueError:  # a zoned address
        contacts = _without_zoned(contacts)
        body = b"".join([c.encode() for c in contacts])
    return _WITH_COUNTS.pack(0x04, _check_request_id(request_id), 1, len(contacts)) + body


def _without_zoned(contacts) -> list:
    """``contacts`` less those with a zoned (link-local) address, which mean nothing elsewhere;
    anything that is not a Contact is kept, for the Nodes constructor to refuse by name."""
    return [c for c in contacts
            if not (isinstance(c, Contact) and c.address.ip.version == 6 and c.address.ip.scope_id)]


def split_nodes(request_id: bytes, contacts: Iterable[Contact]) -> list[Nodes]:
    """Pack ``contacts`` (at most 16 x 20) in order into NODES messages carrying the right
    ``total``. No contacts give one empty NODES message. Contacts with a zoned (link-local)
    address are left out, as by :func:`encode_nodes_answer`."""
    if isinstance(contacts, (str, bytes)) or not isinstance(contacts, Iterable):
        raise ArgumentTypeError(f"contacts must be an iterable of Contact, not {type(contacts).__name__}")
    items = tuple(_without_zoned(contacts))
    step = MAX_NODES_PER_MESSAGE
    if len(items) <= step:  # k = 20 fits one message
        return [Nodes(request_id, 1, items)]
    pieces = [items[i : i + step] for i in range(0, len(items), step)]
    if len(pieces) > MAX_RESPONSE_MESSAGES:
        raise ArgumentValueError(
            f"contacts: at most {MAX_RESPONSE_MESSAGES * step} fit one response, got {len(items)}"
        )
    return [Nodes(request_id, len(pieces), piece) for piece in pieces]


def split_providers(request_id: bytes, records: Iterable[bytes]) -> list[Providers]:
    """Pack ``records`` in order into as few PROVIDERS messages as fit, each within
    :data:`MAX_MESSAGE_BYTES`, carrying the right ``total``. At least one record is needed (with
    none, answer GET_PROVIDERS with NODES)."""
    if isinstance(records, (str, bytes, bytearray, memoryview)) or not isinstance(records, Iterable):
        raise ArgumentTypeError(f"records must be an iterable of bytes, not {type(records).__name__}")
    items = [_check_record(f"records[{i}]", r) for i, r in enumerate(records)]
    if not items:
        raise ArgumentValueError("records: at least one is needed (answer with NODES instead)")
    pieces: list[list[bytes]] = []
    current: list[bytes] = []
    size = _COUNTS_SIZE
    for record in items:
        grown = size + _LENGTH.size + len(record)
        if current and (grown > MAX_MESSAGE_BYTES or len(current) == _MAX_PROVIDERS_PER_MESSAGE):
            pieces.append(current)
            current, grown = [], _COUNTS_SIZE + _LENGTH.size + len(record)
        current.append(record)
        size = grown
    pieces.append(current)
    if len(pieces) > MAX_RESPONSE_MESSAGES:
        raise ArgumentValueError(
            f"records: they need {len(pieces)} messages, over {MAX_RESPONSE_MESSAGES} in one response"
        )
    return [Providers(request_id, len(pieces), piece) for piece in pieces]
