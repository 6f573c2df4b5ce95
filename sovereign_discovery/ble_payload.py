"""The Bluetooth LE advertisement payload: what a node puts on the air so that nearby peers can
tell who it is (or, with the rotating token, that it is *someone* they may already know), what it
offers, and whether the signed record they hold of it is current (docs/local-discovery.md,
"Bluetooth LE").

A legacy advertising PDU carries 31 bytes of AD structures (Core spec v5.4, Vol 3, Part C, §11;
each structure is ``length || type || data``). Ours holds three::

    02 01 06                 Flags: LE General Discoverable, BR/EDR not supported     3 bytes
    03 03 F5 FF              Complete List of 16-bit Service UUIDs: 0xFFF5           4 bytes
    17 16 F5 FF <20 bytes>   Service Data - 16-bit UUID 0xFFF5: the payload below    24 bytes
                                                                                  = 31 bytes

The UUID list is there because BlueZ files service-data UUIDs only under ``ServiceData``, not
``Device1.UUIDs``, and bleak's ``service_uuids=`` filter matches only the latter.

**0xFFF5 is a placeholder** until a 16-bit member UUID is assigned by the Bluetooth SIG; the
payload version lets a future assignment coexist with it.

Payload, format version 1 (:data:`PAYLOAD_BYTES` = 20 bytes)::

    offset len field
    0      1   version (high 4 bits, = 1) | flags (low 4 bits):
                 b0 FLAG_GATT      the full signed record can be read over GATT
                 b1 FLAG_MDNS      the node also announces itself over mDNS on this link
                 b2 FLAG_ROTATING  the ID field is a rotating token, not the stable peer hash
                 b3 reserved       sent as 0, ignored when read
    1      2   capability bits (uint16, little-endian; see capability_bits)
    3      16  peer ID: SHA-256(public key)[:16] (the node ID's first 16 bytes), or the token
    19     1   record sequence hint: seq mod 256

With :data:`FLAG_ROTATING` the ID is ``HMAC-SHA256(K, window)[:16]`` with
``K = SHA-256(domain || public key)`` and ``window = floor(unix_time / rotation_s)``, and the
capability bits and the sequence hint are XORed with the next three bytes of that HMAC. Whoever
knows the public key (a peer that met the node before) can compute the token of any window and so
recognise the node; a passive observer who does not know the key sees 20 bytes that change every
window and cannot link two windows through the payload. See docs for what it does *not* hide.

Capability bits are a 16-bit Bloom filter: each capability name sets two bits chosen by
SHA-256 of the name (:func:`capability_mask`). "The bits of ``relay`` are set" means *may* offer
relay: with ``n`` capabilities the false-positive rate is about ``(1 - e^(-2n/16))^2`` (1.4 % for
one capability, 10 % for three, 21 % for five). The signed record is authoritative; the bits only
let a scanner skip peers that certainly lack a capability.

:meth:`BlePayload.decode` raises only :class:`BlePayloadError` (a ``DecodeError``) whose
``reason`` is a short stats key. Nothing here does I/O or reads a clock.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from .errors import ArgumentTypeError, ArgumentValueError, DecodeError
from .identity import _check_public_key
from .records import PeerRecord, check_capability

__all__ = [
    "BlePayload",
    "BlePayloadError",
    "SERVICE_UUID16",
    "SERVICE_UUID",
    "RECORD_SERVICE_UUID",
    "RECORD_CHARACTERISTIC_UUID",
    "PAYLOAD_VERSION",
    "PAYLOAD_BYTES",
    "ID_BYTES",
    "LEGACY_ADVERTISING_BYTES",
    "FLAG_GATT",
    "FLAG_MDNS",
    "FLAG_ROTATING",
    "capability_mask",
    "capability_bits",
    "may_have_capability",
    "false_positive_rate",
    "peer_hash",
    "rotation_window",
    "rotating_token",
    "advertising_data",
]

#: 16-bit service UUID of the advertisement. A PLACEHOLDER until the Bluetooth SIG assigns one.
SERVICE_UUID16 = 0xFFF5
#: The same UUID in the 128-bit form bleak and BlueZ use as dictionary keys.
SERVICE_UUID = f"0000{SERVICE_UUID16:04x}-0000-1000-8000-00805f9b34fb"
#: GATT service and characteristic serving the full signed record (random 128-bit UUIDs: vendor
#: specific, no assignment needed).
RECORD_SERVICE_UUID = "4bc8ffc6-3ee3-4240-8af7-46b0de4bc715"
RECORD_CHARACTERISTIC_UUID = "f8d382a4-e724-4525-9f3f-9f5477b84500"

PAYLOAD_VERSION = 1
PAYLOAD_BYTES = 20
#: Bytes of the peer hash / rotating token: 128 bits, so a match is an identification, not a hint.
ID_BYTES = 16
#: What a legacy (BT 4.x) advertising PDU carries (Core v5.4, Vol 6, Part B, §2.3.1.1).
LEGACY_ADVERTISING_BYTES = 31

FLAG_GATT = 0x1
FLAG_MDNS = 0x2
FLAG_ROTATING = 0x4
_KNOWN_FLAGS = FLAG_GATT | FLAG_MDNS | FLAG_ROTATING

_LAYOUT = struct.Struct("<BH16sB")  # version|flags, capability bits, ID, seq hint
_CAPABILITY_DOMAIN = b"sovereign-discovery/v1\x00ble-capability\x00"
_TOKEN_DOMAIN = b"sovereign-discovery/v1\x00ble-token\x00"
_AD_FLAGS = bytes((2, 0x01, 0x06))  # LE General Discoverable | BR/EDR Not Supported
_AD_UUID16_LIST = 0x03
_AD_SERVICE_DATA16 = 0x16


class BlePayloadError(DecodeError):
    """Service data that is not a valid payload; ``reason`` is a short key for stats."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# --- capability bits -------------------------------------------------------------------------------


def capability_mask(name: str) -> int:
    """The bits (one or two of sixteen) that capability ``name`` sets in the advertisement."""
    digest = hashlib.sha256(_CAPABILITY_DOMAIN + check_capability(name).encode("ascii")).digest()
    return (1 << (digest[0] & 15)) | (1 << (digest[1] & 15))


def capability_bits(names: Iterable[str]) -> int:
    """The 16-bit Bloom filter of ``names``."""
    if isinstance(names, str):
        raise ArgumentTypeError("names must be an iterable of capability names, not one str")
    bits = 0
    for name in names:
        bits |= capability_mask(name)
    return bits


def may_have_capability(bits: int, name: str) -> bool:
    """False: the advertiser certainly lacks ``name``. True: it may have it (check the record)."""
    mask = capability_mask(name)
    return bits & mask == mask


def false_positive_rate(count: int) -> float:
    """Expected chance that :func:`may_have_capability` is wrongly True with ``count`` names set."""
    return (1.0 - math.exp(-2.0 * count / 16.0)) ** 2


# --- peer IDs and rotating tokens ------------------------------------------------------------------


def peer_hash(public_key: bytes) -> bytes:
    """The stable advertised ID: SHA-256(public key)[:16], i.e. the node ID's first 16 bytes."""
    return hashlib.sha256(_check_public_key(public_key)).digest()[:ID_BYTES]


def rotation_window(now: float, rotation_s: float) -> int:
    """The index of the token window holding Unix time ``now``."""
    if not isinstance(rotation_s, (int, float)) or isinstance(rotation_s, bool) or not rotation_s > 0:
        raise ArgumentValueError(f"rotation_s must be a positive number of seconds, not {rotation_s!r}")
    return max(0, int(now // rotation_s))


def _token_material(public_key: bytes, window: int) -> bytes:
    key = hashlib.sha256(_TOKEN_DOMAIN + _check_public_key(public_key)).digest()
    return hmac.new(key, struct.pack(">Q", window), hashlib.sha256).digest()


def rotating_token(public_key: bytes, window: int) -> bytes:
    """The 16-byte token ``public_key``'s node advertises during ``window``."""
    return _token_material(public_key, window)[:ID_BYTES]


# --- the payload -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BlePayload:
    """One decoded advertisement payload. With ``FLAG_ROTATING``, ``capabilities`` and
    ``seq_hint`` are as sent (masked) until :meth:`unmasked` is given the sender's key."""

    flags: int
    capabilities: int
    peer_id: bytes
    seq_hint: int
    version: int = PAYLOAD_VERSION

    @property
    def rotating(self) -> bool:
        return bool(self.flags & FLAG_ROTATING)

    @property
    def gatt(self) -> bool:
        return bool(self.flags & FLAG_GATT)

    @classmethod
    def for_record(cls, record: PeerRecord, *, gatt: bool, mdns: bool = False,
                   rotating_window: int | None = None) -> "BlePayload":
        """The payload advertising ``record``: with ``rotating_window`` (see
        :func:`rotation_window`) a masked rotating token, otherwise the stable peer hash."""
        if not isinstance(record, PeerRecord):
            raise ArgumentTypeError(f"record must be a PeerRecord, not {type(record).__name__}")
        flags = (FLAG_GATT if gatt else 0) | (FLAG_MDNS if mdns else 0)
        caps = capability_bits(record.capabilities)
        seq_hint = record.seq & 0xFF
        if rotating_window is None:
            return cls(flags, caps, peer_hash(record.public_key), seq_hint)
        material = _token_material(record.public_key, rotating_window)
        mask_caps = int.from_bytes(material[ID_BYTES:ID_BYTES + 2], "little")
        return cls(flags | FLAG_ROTATING, caps ^ mask_caps, material[:ID_BYTES],
                   seq_hint ^ material[ID_BYTES + 2])

    def unmasked(self, public_key: bytes, window: int) -> "BlePayload":
        """The payload with capabilities and seq hint in clear, for a token of ``window``."""
        if not self.rotating:
            return self
        material = _token_material(public_key, window)
        mask_caps = int.from_bytes(material[ID_BYTES:ID_BYTES + 2], "little")
        return BlePayload(self.flags, self.capabilities ^ mask_caps, self.peer_id,
                          self.seq_hint ^ material[ID_BYTES + 2], self.version)

    def matches(self, public_key: bytes, windows: Iterable[int] = ()) -> int | None:
        """Whether this payload names ``public_key``: for a stable hash, 0 if it does; for a
        rotating token, the first of ``windows`` whose token it is. None if it does not."""
        if not self.rotating:
            return 0 if hmac.compare_digest(self.peer_id, peer_hash(public_key)) else None
        for window in windows:
            if hmac.compare_digest(self.peer_id, rotating_token(public_key, window)):
                return window
        return None

    def encode(self) -> bytes:
        if not 0 <= self.flags <= _KNOWN_FLAGS or not 0 <= self.capabilities <= 0xFFFF \
                or len(self.peer_id) != ID_BYTES or not 0 <= self.seq_hint <= 0xFF:
            raise ArgumentValueError(f"payload fields out of range: {self!r}")
        return _LAYOUT.pack((self.version << 4) | self.flags, self.capabilities, self.peer_id,
                            self.seq_hint)

    @classmethod
    def decode(cls, data: object) -> "BlePayload":
        """Decode untrusted service data; raises only :class:`BlePayloadError`. A longer payload
        of the same version is accepted (its extra bytes are a later minor extension) up to the
        legacy budget; any other length, or another version, is refused."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise BlePayloadError("payload_type", f"service data must be bytes, not {type(data).__name__}")
        data = bytes(data)
        if len(data) < PAYLOAD_BYTES:
            raise BlePayloadError("payload_short", f"service data of {len(data)} bytes < {PAYLOAD_BYTES}")
        if len(data) > LEGACY_ADVERTISING_BYTES:
            raise BlePayloadError("payload_long", f"service data of {len(data)} bytes")
        head, caps, peer_id, seq_hint = _LAYOUT.unpack_from(data)
        version = head >> 4
        if version != PAYLOAD_VERSION:
            raise BlePayloadError("payload_version", f"payload version {version}")
        return cls(head & _KNOWN_FLAGS, caps, peer_id, seq_hint, version)


def advertising_data(payload: bytes) -> bytes:
    """The complete legacy advertising data (Flags, UUID list, service data) for ``payload``,
    as a controller would send it. Raises ArgumentValueError beyond 31 bytes."""
    if not isinstance(payload, (bytes, bytearray)):
        raise ArgumentTypeError(f"payload must be bytes, not {type(payload).__name__}")
    uuid = struct.pack("<H", SERVICE_UUID16)
    data = (_AD_FLAGS + bytes((3, _AD_UUID16_LIST)) + uuid
            + bytes((3 + len(payload), _AD_SERVICE_DATA16)) + uuid + bytes(payload))
    if len(data) > LEGACY_ADVERTISING_BYTES:
        raise ArgumentValueError(f"advertising data of {len(data)} bytes exceeds the legacy"
                                 f" {LEGACY_ADVERTISING_BYTES}")
    return data
