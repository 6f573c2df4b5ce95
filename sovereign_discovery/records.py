"""Signed, self-certifying peer records.

A :class:`PeerRecord` says how to reach a peer and what it offers, signed by the peer's own
Ed25519 key, so anyone can check it without trusting whoever relayed it. The node ID is derived
from the public key, never carried.

Canonical encoding, format version 1 (all integers big-endian)::

    version          u8        = 1
    public_key       32 bytes  raw Ed25519
    seq              u64       newer wins
    expires_at       u64       Unix seconds
    protocol_version u16
    address_count    u8        0..MAX_RECORD_ADDRESSES, then each address (addresses.py):
                               kind u8 (0x04 UDP/IPv4, 0x06 UDP/IPv6) || ip || port u16
    capability_count u8        0..MAX_RECORD_CAPABILITIES, then each: length u8 (1..32) || ASCII
    signature        64 bytes  Ed25519 over signed_message(PEER_RECORD, every byte before it)

Canonical means one encoding per record: capabilities are sorted and distinct, addresses are
distinct, and nothing follows the signature. The decoder refuses anything else, so a record's bytes
and its meaning are one. At every maximum the encoding is 797 bytes: under ``MAX_RECORD_BYTES``
(1,000, which also fits a BEP 44 mutable item) and so inside a 1,280-byte datagram with headers.

:meth:`PeerRecord.decode` checks, in order: size, structure, expiry (expired, or valid further
ahead than ``MAX_RECORD_LIFETIME_S``), signature. It raises only
:class:`~sovereign_discovery.errors.RecordError` subclasses (all :class:`DecodeError`\\ s).

Times in records are Unix seconds (wall clock), passed in as ``now`` like everything else.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

from .addresses import Address, decode_address
from .constants import (
    MAX_CAPABILITY_BYTES,
    MAX_RECORD_ADDRESSES,
    MAX_RECORD_BYTES,
    MAX_RECORD_CAPABILITIES,
    MAX_RECORD_LIFETIME_S,
    PUBLIC_KEY_BYTES,
    RECORD_FORMAT_VERSION,
    SIGNATURE_BYTES,
)
from .errors import (
    ArgumentTypeError,
    ArgumentValueError,
    BadSignatureError,
    DecodeError,
    MalformedRecordError,
    RecordExpiredError,
    RecordFromFutureError,
    RecordTooLargeError,
)
from .identity import Identity, SignaturePurpose, verify_signature
from .keys import NodeId

__all__ = ["PeerRecord", "check_capability", "CAPABILITY_PATTERN"]

#: Capability names: lowercase ASCII letters, digits and ``-._/``, starting with a letter or digit,
#: 1..32 bytes (``relay``, ``store``, ``chat/1``).
CAPABILITY_PATTERN = re.compile(r"[a-z0-9][a-z0-9._/-]{0,%d}" % (MAX_CAPABILITY_BYTES - 1))
_HEADER = struct.Struct(">B32sQQHB")  # version, key, seq, expires_at, protocol_version, n_addresses
_U64_MAX = (1 << 64) - 1
#: Records whose signature verified, by their exact encoding: the same record reaches a node many
#: times (STORE at the k closest, VALUE answers, replication), and an Ed25519 verification costs
#: ~60 us where a hit costs a dict lookup. Safe to share: the key is the exact bytes that verified
#: and PeerRecord is immutable; the time check still runs on every decode. Bounded: cleared when
#: full, so a flood of distinct records costs verifications, not memory. In a simulation, nodes
#: that decode the same record share one object.
_VERIFIED_CACHE_SIZE = 1024
_verified: dict[bytes, "PeerRecord"] = {}


def check_capability(name: object) -> str:
    """Return ``name`` if it is a valid capability name; raise a caller error naming it if not."""
    if not isinstance(name, str):
        raise ArgumentTypeError(f"capability must be a str, not {type(name).__name__}")
    if not CAPABILITY_PATTERN.fullmatch(name):
        raise ArgumentValueError(
            f"capability {name!r} must be 1..{MAX_CAPABILITY_BYTES} of [a-z0-9._/-],"
            " starting with a letter or digit"
        )
    return name


@dataclass(frozen=True, slots=True)
class PeerRecord:
    """A verified peer record. Make one with :meth:`create`, read one with :meth:`decode`; both
    give only records whose signature, bounds and expiry were checked."""

    public_key: bytes
    seq: int
    expires_at: int
    addresses: tuple[Address, ...]
    capabilities: tuple[str, ...]
    protocol_version: int
    signature: bytes
    node_id: NodeId = field(compare=False)
    encoded: bytes = field(compare=False, repr=False)

    def __init__(self, *args: object, **kwargs: object) -> None:
        raise ArgumentTypeError(
            "a PeerRecord is made only by PeerRecord.create (which signs) or PeerRecord.decode"
            " (which verifies), so that every record in hand has been checked"
        )

    @classmethod
    def _checked(cls, **fields: object) -> "PeerRecord":
        """Assemble a record whose fields ``create`` or ``decode`` has just checked."""
        record = object.__new__(cls)
        for name, value in fields.items():
            object.__setattr__(record, name, value)
        return record

    # --- making -----------------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        identity: Identity,
        *,
        addresses: Iterable[Address],
        capabilities: Iterable[str] = (),
        seq: int,
        expires_at: int,
        protocol_version: int = 1,
    ) -> "PeerRecord":
        """Sign a new record with ``identity``. ``seq`` must grow with every new record of the same
        key (a millisecond timestamp is a good choice); ``expires_at`` is in Unix seconds."""
        if not isinstance(identity, Identity):
            raise ArgumentTypeError(f"identity must be an Identity, not {type(identity).__name__}")
        addrs = tuple(addresses)
        for a in addrs:
            if not isinstance(a, Address):
                raise ArgumentTypeError(f"addresses must hold Address objects, not {type(a).__name__}")
        if len(addrs) > MAX_RECORD_ADDRESSES:
            raise ArgumentValueError(f"addresses: at most {MAX_RECORD_ADDRESSES}, got {len(addrs)}")
        if len(set(addrs)) != len(addrs):
            raise ArgumentValueError("addresses must be distinct")
        caps = tuple(sorted({check_capability(c) for c in capabilities}))
        if len(caps) > MAX_RECORD_CAPABILITIES:
            raise ArgumentValueError(f"capabilities: at most {MAX_RECORD_CAPABILITIES}, got {len(caps)}")
        for name, value, bits in (("seq", seq, 64), ("expires_at", expires_at, 64),
                                  ("protocol_version", protocol_version, 16)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise ArgumentTypeError(f"{name} must be an int, not {type(value).__name__}")
            if not 0 <= value < 1 << bits:
                raise ArgumentValueError(f"{name} must be in 0..2**{bits} - 1, not {value}")
        body = _encode_body(identity.public_key, seq, expires_at, protocol_version, addrs, caps)
        signature = identity.sign(SignaturePurpose.PEER_RECORD, body)
        return cls._checked(
            public_key=identity.public_key,
            seq=seq,
            expires_at=expires_at,
            addresses=addrs,
            capabilities=caps,
            protocol_version=protocol_version,
            signature=signature,
            node_id=identity.node_id,
            encoded=body + signature,
        )

    # --- reading ----------------------------------------------------------------------------------

    @classmethod
    def decode(cls, data: bytes, *, now: float) -> "PeerRecord":
        """Decode and verify untrusted bytes at Unix time ``now``. Raises only ``RecordError``
        subclasses, whatever ``data`` holds."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise MalformedRecordError(f"a record must be bytes, not {type(data).__name__}")
        data = bytes(data)
        if len(data) > MAX_RECORD_BYTES:
            raise RecordTooLargeError(f"record of {len(data)} bytes exceeds {MAX_RECORD_BYTES}")
        cached = _verified.get(data)
        if cached is not None:
            cached.check_time(now)
            return cached
        try:
            record = _parse(data)
        except MalformedRecordError:
            raise
        except DecodeError as exc:  # from decode_address
            raise MalformedRecordError(str(exc)) from exc
        record.check_time(now)
        body = data[: len(data) - SIGNATURE_BYTES]
        if not verify_signature(record.public_key, SignaturePurpose.PEER_RECORD, body, record.signature):
            raise BadSignatureError(f"record signature of {record.node_id.short()}… does not verify")
        if len(_verified) >= _VERIFIED_CACHE_SIZE:
            _verified.clear()
        _verified[data] = record
        return record

    def check_time(self, now: float) -> None:
        """Raise :class:`RecordExpiredError` or :class:`RecordFromFutureError` if ``now`` (Unix
        seconds) is outside the record's validity."""
        if not isinstance(now, (int, float)) or isinstance(now, bool):
            raise ArgumentTypeError(f"now must be Unix seconds (a number), not {type(now).__name__}")
        if self.expires_at <= now:
            raise RecordExpiredError(f"record of {self.node_id.short()}… expired at {self.expires_at}")
        if self.expires_at > now + MAX_RECORD_LIFETIME_S:
            raise RecordFromFutureError(
                f"record of {self.node_id.short()}… claims validity until {self.expires_at},"
                f" more than {MAX_RECORD_LIFETIME_S} s ahead"
            )

    def is_expired(self, now: float) -> bool:
        return self.expires_at <= now

    def supersedes(self, other: "PeerRecord") -> bool:
        """True if this is a newer record of the same key (strictly higher ``seq``). A record with
        the same ``seq`` never replaces the one already held (first seen wins, as in libp2p)."""
        if not isinstance(other, PeerRecord):
            raise ArgumentTypeError(f"other must be a PeerRecord, not {type(other).__name__}")
        return self.public_key == other.public_key and self.seq > other.seq

    def encode(self) -> bytes:
        return self.encoded

    def has_capability(self, name: str) -> bool:
        return name in self.capabilities

    def __repr__(self) -> str:
        addrs = ", ".join(str(a) for a in self.addresses)
        return (f"PeerRecord({self.node_id.short()}…, seq={self.seq}, expires_at={self.expires_at},"
                f" addresses=[{addrs}], capabilities={list(self.capabilities)})")


def _encode_body(
    public_key: bytes,
    seq: int,
    expires_at: int,
    protocol_version: int,
    addresses: tuple[Address, ...],
    capabilities: tuple[str, ...],
) -> bytes:
    parts = [_HEADER.pack(RECORD_FORMAT_VERSION, public_key, seq, expires_at, protocol_version, len(addresses))]
    parts.extend(a.encode() for a in addresses)
    parts.append(bytes((len(capabilities),)))
    for name in capabilities:
        raw = name.encode("ascii")
        parts.append(bytes((len(raw),)) + raw)
    return b"".join(parts)


def _parse(data: bytes) -> PeerRecord:
    """Structure only (no signature, no time). Raises DecodeError subclasses."""
    if len(data) < _HEADER.size + 1 + SIGNATURE_BYTES:
        raise MalformedRecordError(f"truncated record ({len(data)} bytes)")
    version, public_key, seq, expires_at, protocol_version, n_addresses = _HEADER.unpack_from(data)
    if version != RECORD_FORMAT_VERSION:
        raise MalformedRecordError(f"unknown record format version {version}")
    if n_addresses > MAX_RECORD_ADDRESSES:
        raise MalformedRecordError(f"{n_addresses} addresses exceed {MAX_RECORD_ADDRESSES}")
    end_of_body = len(data) - SIGNATURE_BYTES
    body = data[:end_of_body]
    offset = _HEADER.size
    addresses = []
    for _ in range(n_addresses):
        address, offset = decode_address(body, offset)
        addresses.append(address)
    if len(set(addresses)) != len(addresses):
        raise MalformedRecordError("duplicate address")
    if offset >= end_of_body:
        raise MalformedRecordError("truncated record: missing capability count")
    n_caps = body[offset]
    offset += 1
    if n_caps > MAX_RECORD_CAPABILITIES:
        raise MalformedRecordError(f"{n_caps} capabilities exceed {MAX_RECORD_CAPABILITIES}")
    capabilities = []
    for _ in range(n_caps):
        if offset >= end_of_body:
            raise MalformedRecordError("truncated capability")
        size = body[offset]
        raw = body[offset + 1 : offset + 1 + size]
        if not 1 <= size <= MAX_CAPABILITY_BYTES or len(raw) != size:
            raise MalformedRecordError("truncated or empty capability")
        offset += 1 + size
        try:
            name = raw.decode("ascii")
        except UnicodeDecodeError as exc:
            raise MalformedRecordError("capability is not ASCII") from exc
        if not CAPABILITY_PATTERN.fullmatch(name):
            raise MalformedRecordError(f"invalid capability name {name!r}")
        capabilities.append(name)
    if capabilities != sorted(set(capabilities)):
        raise MalformedRecordError("capabilities must be sorted and distinct")
    if offset != end_of_body:
        raise MalformedRecordError(f"{end_of_body - offset} unexpected bytes before the signature")
    assert len(public_key) == PUBLIC_KEY_BYTES and seq <= _U64_MAX
    return PeerRecord._checked(
        public_key=public_key,
        seq=seq,
        expires_at=expires_at,
        addresses=tuple(addresses),
        capabilities=tuple(capabilities),
        protocol_version=protocol_version,
        signature=data[end_of_body:],
        node_id=NodeId.from_public_key(public_key),
        encoded=data,
    )
