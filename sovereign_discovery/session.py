"""The packet/session layer: authenticated, encrypted datagrams between Ed25519 identities.

Sans-IO: :class:`SessionLayer` takes datagrams, the source address and ``now`` (monotonic
seconds), and returns datagrams to send and messages delivered. It opens no socket, reads no
clock, and draws randomness only from the injected ``random_bytes``.

The packet format, the handshake, key derivation, the replay window and the anti-amplification
rule are specified in ``docs/protocol.md`` ("Packets (session layer)"); the threat model and what
each mechanism does and does not defend against are in ``docs/security.md``. The construction is
discv5 v5.1's (WHOAREYOU challenge, ephemeral X25519 key signed by the identity key, AEAD session
keys) with Ed25519 identities, HKDF-SHA256 (RFC 5869), X25519 (RFC 7748) and ChaCha20-Poly1305
(RFC 8439) from libsodium.

Network input never raises: every dropped datagram is counted by reason in :attr:`SessionLayer.stats`
and logged (the first of each reason at INFO, later ones at DEBUG). Caller mistakes raise
:class:`~sovereign_discovery.errors.ArgumentTypeError` / ``ArgumentValueError``.

Decisions beyond ``docs/protocol.md``:

- The HANDSHAKE answering a WHOAREYOU is not limited by the anti-amplification rule: the WHOAREYOU
  echoes the random nonce of a packet we sent to that address, which proves the address receives
  (the address-validation token of RFC 9000 §8.1).
- A WHOAREYOU answering one of the last 16 session MESSAGEs we sent to an address (the peer lost
  its session, e.g. restarted, or dropped it as idle or least recently used) is accepted too: we
  re-handshake carrying the last message again. Only a message of at most 64 bytes (a request
  without a record) is kept for this, and not an answer of the serving fast path: the sender of
  anything else retries it. Such a re-handshake carries an empty message, which installs the
  session and delivers nothing.
- Sessions are dropped after ``session_idle_s`` without use (10 min) and beyond ``max_sessions``
  (1,000, least recently used): see :class:`SessionLimits` for where the defaults come from. A
  0-RTT first contact's session that neither side uses again goes after ``unused_session_idle_s``
  (60 s), on both sides (docs/protocol.md, "Sessions of one exchange").
- One live challenge per (node ID, address), as sigp/discv5's handler does: while it lives, a
  session MESSAGE we cannot decrypt is dropped (``awaiting_handshake``) instead of replacing it,
  since the HANDSHAKE answering it may be overtaken on the way by the MESSAGEs sent right after
  it; a new random packet gets the live challenge again.
- Crossing handshakes (both peers initiate at once): both keep the session the lower node ID
  initiated, and the side that keeps its own reads the other for ``challenge_ttl_s``.

0-RTT first contact (docs/protocol.md, "0-RTT first contact"; on unless
``SessionLimits.zero_rtt`` is False): the first packet to a peer with no session is an INITIATE
carrying the handshake and the message at once, sealed to the peer's static key (Noise IK's first
message). The peer accepts it only while its timestamp is fresh and its ephemeral key unseen
(:mod:`.zero_rtt`), else answers a WHOAREYOU and the old handshake carries the message. Its first
packet back is an ACCEPT carrying a token that the session keys mix in, so the initiator's next
MESSAGE proves it received at its address; until then the answers obey the 3x rule. Unix time
is ``now + unix_offset`` (the engine's rule); without ``unix_offset`` the layer reads the wall
clock once, at its first call, to fix the offset (as the asyncio driver does for the engine).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import struct
import time
from collections import Counter, OrderedDict
from functools import lru_cache
from dataclasses import dataclass
from typing import Callable, NamedTuple

import nacl.bindings
import nacl.exceptions
import nacl.public
import nacl.signing

from . import aead
from .addresses import Address
from .constants import (
    MAX_DATAGRAM_BYTES,
    MAX_MESSAGE_BYTES,
    NODE_ID_BYTES,
    PUBLIC_KEY_BYTES,
    SIGNATURE_BYTES,
)
from .errors import ArgumentTypeError, ArgumentValueError
from .fastpath import REPLAYED, Cipher, index_key
from .identity import Identity, SignaturePurpose, verify_signature
from .routing import Contact
from .zero_rtt import FRESH, REPLAYED as INITIATE_REPLAYED, InitiateGuard

__all__ = [
    "SessionLayer",
    "SessionLimits",
    "Outgoing",
    "Delivered",
    "Received",
    "hkdf_sha256",
    "MAX_MESSAGE_BYTES",
    "MAX_PACKET_BYTES",
    "KIND_MESSAGE",
    "KIND_WHOAREYOU",
    "KIND_HANDSHAKE",
    "KIND_INITIATE",
    "KIND_ACCEPT",
    "MIN_INITIATE_BYTES",
    "MAX_INITIATE_MESSAGE_BYTES",
    "REPLAY_WINDOW",
    "DROP_REASONS",
]

_log = logging.getLogger(__name__)

# --- format (docs/protocol.md, "Packets (session layer)") ----------------------------------------

MAGIC = b"sd"
VERSION = 1
KIND_MESSAGE = 0
KIND_WHOAREYOU = 1
KIND_HANDSHAKE = 2
KIND_INITIATE = 3  # 0-RTT: handshake and first message in one packet
KIND_ACCEPT = 4  # 0-RTT: the answer to an INITIATE, carrying the address-validation token

#: Every datagram is at most 1,280 bytes (the IPv6 minimum MTU; discv5's limit too).
MAX_PACKET_BYTES = MAX_DATAGRAM_BYTES
_HEADER = struct.Struct(">2sBB12sH")  # magic, version, kind, nonce, authdata_len
_STATIC = _HEADER.size  # 18
_TAG = 16  # Poly1305 tag (RFC 8439)
_AUTH_MESSAGE = NODE_ID_BYTES  # src_node_id
_AUTH_WHOAREYOU = 16 + 8  # id_nonce, known_record_seq
_AUTH_HANDSHAKE = PUBLIC_KEY_BYTES + 32 + SIGNATURE_BYTES  # src key, ephemeral key, signature
_MESSAGE_HEAD = _STATIC + _AUTH_MESSAGE  # 38: the MESSAGE header, its AEAD associated data
_HANDSHAKE_HEAD = _STATIC + _AUTH_HANDSHAKE  # 146
_WHOAREYOU_BYTES = _STATIC + _AUTH_WHOAREYOU  # 42
_TIMESTAMP = 8  # the INITIATE's Unix time in ms
_AUTH_INITIATE = PUBLIC_KEY_BYTES + 32 + _TIMESTAMP + SIGNATURE_BYTES  # 136, then zero padding
_INITIATE_SIGNED = _STATIC + PUBLIC_KEY_BYTES + 32 + _TIMESTAMP  # 90: the header before the signature
_INITIATE_HEAD = _STATIC + _AUTH_INITIATE  # 154
#: An INITIATE is padded to at least ceil(1,280 / 3) bytes, so that the answer it buys under the
#: 3x anti-amplification rule (RFC 9000 §8.1) can be one full-size datagram.
MIN_INITIATE_BYTES = -(-MAX_DATAGRAM_BYTES // 3)  # 427
#: The largest first message an INITIATE carries (8 bytes less than a HANDSHAKE: the timestamp);
#: a larger one goes through the WHOAREYOU handshake.
MAX_INITIATE_MESSAGE_BYTES = MAX_PACKET_BYTES - _INITIATE_HEAD - _TAG  # 1,110
_TOKEN = 16  # the ACCEPT's address-validation token
_AUTH_ACCEPT = NODE_ID_BYTES + _TOKEN  # src_node_id, token
_ACCEPT_HEAD = _STATIC + _AUTH_ACCEPT  # 54
# The largest message (constants.MAX_MESSAGE_BYTES) assumes exactly this packet layout.
assert MAX_MESSAGE_BYTES == MAX_PACKET_BYTES - _HANDSHAKE_HEAD - _TAG == 1118
#: Random MESSAGE ("random packet" of discv5) payload length: looks like a short ciphertext.
_RANDOM_PAYLOAD = 32
#: Per-direction replay window in packets (as IPsec/WireGuard; docs/protocol.md).
REPLAY_WINDOW = 1024
_COUNTER_PREFIX = b"\x00\x00\x00\x00"
_COUNTER_NONCE = struct.Struct(">4xQ")
_U64 = struct.Struct(">Q")
_MAX_COUNTER = (1 << 64) - 1
_KDF_INFO = b"sovereign-discovery/v1 session keys"

#: Every reason a datagram can be dropped, each a key of ``stats``.
DROP_REASONS = (
    "too_large",  # over 1,280 bytes
    "malformed",  # shorter than its header, or authdata/payload length wrong for the kind
    "bad_magic",
    "unknown_version",
    "unknown_kind",
    "no_session",  # a MESSAGE from a (node ID, address) we share no session with (answered by WHOAREYOU)
    "decrypt_failed",  # AEAD failure (answered by WHOAREYOU when it was a MESSAGE)
    "replayed",  # a session counter already seen or older than the window
    "unsolicited_whoareyou",  # its nonce is not that of a packet we sent there and still await
    "unknown_challenge",  # a HANDSHAKE with no live challenge for (its key's ID, its address)
    "bad_signature",  # the HANDSHAKE's id_signature does not verify
    "bad_key",  # a key that is not a usable curve point, or an all-zero X25519 result
    "amplification_limited",  # a WHOAREYOU not sent: it would exceed 3x the bytes received
    "awaiting_handshake",  # a session MESSAGE we cannot decrypt while our challenge to it (or our INITIATE) is live
    # 0-RTT (docs/protocol.md, "0-RTT first contact"); a bad INITIATE signature (also one meant for
    # another node) is bad_signature, a failed tag decrypt_failed, a key that fails bad_key
    "initiate_disabled",  # an INITIATE while 0-RTT is off here (answered by WHOAREYOU)
    "initiate_stale",  # timestamp outside the window or before our start (answered by WHOAREYOU)
    "initiate_cache_full",  # the record of ephemeral keys seen is full (answered by WHOAREYOU)
    "initiate_rate_limited",  # over zero_rtt_per_s (answered by WHOAREYOU)
    "initiate_replayed",  # its ephemeral key was accepted before, within the window (not answered)
    "unsolicited_accept",  # an ACCEPT answering no INITIATE of ours still waiting at that address
    "internal_error",  # a bug: the datagram raised inside the layer (logged with a traceback)
)


# --- limits ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SessionLimits:
    """Caps and timeouts of a :class:`SessionLayer`. Every table fed by the network is bounded."""

    #: Established sessions, least recently used evicted (docs/protocol.md ``MAX_SESSIONS``):
    #: sigp/discv5's ``session_cache_capacity`` (1,000; go-ethereum's v5 session cache holds
    #: 1,024). A node talks to a few hundred peers at a time; the rest re-handshake on next use.
    max_sessions: int = 1_000
    #: A session is dropped this long after its handshake (``SESSION_LIFETIME_S``, 12 h).
    session_lifetime_s: float = 12 * 3600.0
    #: A session neither side has used for this long is dropped (``SESSION_IDLE_S``, 10 min):
    #: twice discv5's 300 s ping interval, so a peer pinged on that schedule keeps its session,
    #: while one met in a single lookup does not hold memory for the whole lifetime.
    session_idle_s: float = 600.0
    #: A session made by a 0-RTT first contact (INITIATE, ACCEPT) that is not used again is
    #: dropped this long after it was made, on both sides: the initiator's when neither side has
    #: sent in it since, the responder's while its address has not proved it receives (the peer
    #: has not sent in it). Most first contacts are one exchange of a lookup; each session costs
    #: both peers ~1 KB, and the next first contact is another INITIATE, which costs no round
    #: trip. The initiator counts from its INITIATE, so it drops its side first.
    unused_session_idle_s: float = 60.0
    #: Outstanding WHOAREYOU challenges in all (``MAX_CHALLENGES``), oldest evicted.
    max_challenges: int = 10_000
    #: Outstanding challenges per source IP: a flood from one host only recycles its own slots, so
    #: it cannot evict the challenges of others (NATs put several peers behind one IP).
    max_challenges_per_ip: int = 64
    #: A challenge is forgotten this long after it was sent (``CHALLENGE_TTL_S``, 5 s).
    challenge_ttl_s: float = 5.0
    #: Peers we are handshaking with (messages waiting for a WHOAREYOU), oldest evicted.
    max_pending_peers: int = 1_000
    #: Messages waiting per peer for a handshake; beyond it the oldest is dropped.
    max_pending_messages_per_peer: int = 16
    #: Messages waiting for a handshake are dropped this long after the first was queued.
    pending_ttl_s: float = 5.0
    #: A send to a peer still waiting for a WHOAREYOU re-sends the random packet after this long
    #: (the previous one or its answer may have been lost).
    handshake_retry_s: float = 1.0
    #: Byte counts of addresses that have not proved they receive (``MAX_UNVALIDATED_ADDRESSES``),
    #: least recently heard from evicted.
    max_unvalidated_addresses: int = 10_000
    #: To an unvalidated address send at most this many times the bytes received (RFC 9000 §8).
    #: A protocol rule: change it only in tests.
    amplification_factor: float = 3.0
    #: 0-RTT first contact (docs/protocol.md): send an INITIATE instead of a random packet, and
    #: accept INITIATEs. Off: the WHOAREYOU handshake only (an INITIATE is answered by WHOAREYOU).
    zero_rtt: bool = True
    #: An INITIATE's timestamp may be at most this old by our Unix clock (RFC 8446 §8.3: a
    #: freshness window; 30 s covers a slow path and a sender's clock running behind). Skew beyond
    #: the window costs the old round trip, nothing else.
    zero_rtt_window_s: float = 30.0
    #: ... and at most this far ahead of our clock. Also how long after our start no INITIATE is
    #: accepted (zero_rtt.py: our previous run may have accepted ones stamped that far ahead).
    zero_rtt_ahead_s: float = 5.0
    #: Ephemeral keys of INITIATEs accepted, kept until their timestamp leaves the window
    #: (RFC 8446 §8.2's bounded record). Full: INITIATEs are answered by WHOAREYOU. 10,000 in
    #: 60 s (twice the window, at most) is ~170 first contacts a second.
    max_zero_rtt_seen: int = 10_000
    #: INITIATEs a second whose signature and X25519 we compute (a token bucket, one second of
    #: burst); beyond it they are answered by WHOAREYOU (RFC 9000 §8.1.2: validate first under
    #: load). ~0.3 ms each on the test VM: 1,000/s is at most a third of a core.
    zero_rtt_per_s: float = 1_000.0
    #: Sessions made by an INITIATE whose address has not yet proved it receives (their first
    #: answer is limited by the 3x rule); the oldest is dropped beyond it, so spoofed INITIATEs
    #: can push out at most this many validated sessions.
    max_unvalidated_sessions: int = 100

    def __post_init__(self) -> None:
        if type(self.zero_rtt) is not bool:
            raise ArgumentTypeError(f"zero_rtt must be a bool, not {type(self.zero_rtt).__name__}")
        for name in self.__slots__:
            if name == "zero_rtt":
                continue
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ArgumentTypeError(f"{name} must be a number, not {type(value).__name__}")
            if not value > 0:
                raise ArgumentValueError(f"{name} must be positive, not {value!r}")
        for name in ("max_sessions", "max_challenges", "max_challenges_per_ip", "max_pending_peers",
                     "max_pending_messages_per_peer", "max_unvalidated_addresses", "max_zero_rtt_seen",
                     "max_unvalidated_sessions"):
            if not isinstance(getattr(self, name), int):
                raise ArgumentTypeError(f"{name} must be an int")


# --- results -----------------------------------------------------------------------------------


class Outgoing(NamedTuple):
    """A datagram to send to ``address``."""

    address: Address
    datagram: bytes


class Delivered(NamedTuple):
    """An authenticated message from ``peer`` (its key proven by the session, its address the
    datagram's source)."""

    peer: Contact
    message: bytes


class Received(NamedTuple):
    """What :meth:`SessionLayer.receive` produced: messages delivered and datagrams to send."""

    delivered: tuple[Delivered, ...]
    outgoing: tuple[Outgoing, ...]


#: Every counter :attr:`SessionLayer.stats` reports besides the table sizes.
STAT_NAMES = ("packets_in", "bytes_in", "packets_out", "bytes_out", "delivered", "handshakes_initiated",
              "handshakes_completed", "handshakes_crossed", "sessions_unconfirmed", "sessions_idle", "sessions_unused",
              "pending_dropped", "sessions_evicted", "challenges_evicted", "initiates_sent", "initiates_accepted",
              "initiates_fell_back", "addresses_validated", *DROP_REASONS)

_NOTHING = Received((), ())


# --- caller checks (shared with sim_session.SimulatedSessionLayer) -----------------------------


def check_send(peer: object, message: object) -> bytes:
    """``message`` as bytes, if ``send(peer, message, now)`` was called correctly; else the
    caller error naming the parameter."""
    if type(message) is not bytes:
        if not isinstance(message, (bytearray, memoryview)):
            raise ArgumentTypeError(f"message must be bytes, not {type(message).__name__}")
        message = bytes(message)
    if len(message) > MAX_MESSAGE_BYTES:
        raise ArgumentValueError(f"message is {len(message)} bytes; at most {MAX_MESSAGE_BYTES}")
    if not isinstance(peer, Contact):
        raise ArgumentTypeError(f"peer must be a Contact, not {type(peer).__name__}")
    return message


def check_receive(datagram: object, source: object) -> bytes:
    """``datagram`` as bytes, if ``receive(datagram, source, now)`` was called correctly; else
    the caller error naming the parameter (network content itself is never checked here)."""
    if type(datagram) is not bytes:
        if not isinstance(datagram, (bytearray, memoryview)):
            raise ArgumentTypeError(f"datagram must be bytes, not {type(datagram).__name__}")
        datagram = bytes(datagram)
    if not isinstance(source, Address):
        raise ArgumentTypeError(f"source must be an Address, not {type(source).__name__}")
    return datagram


# --- key derivation ----------------------------------------------------------------------------


def hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    """HKDF-SHA256 (RFC 5869): extract then expand ``length`` (≤ 8,160) bytes."""
    if not 0 < length <= 255 * 32:
        raise ArgumentValueError(f"length must be in 1..8160, not {length}")
    prk = hmac.new(salt or bytes(32), ikm, hashlib.sha256).digest()
    block, out = b"", []
    for i in range(1, -(-length // 32) + 1):
        block = hmac.new(prk, block + info + bytes((i,)), hashlib.sha256).digest()
        out.append(block)
    return b"".join(out)[:length]


def _session_keys(secret: bytes, challenge_data: bytes, id_a: bytes, id_b: bytes) -> tuple[bytes, bytes]:
    keys = hkdf_sha256(secret, challenge_data, _KDF_INFO + id_a + id_b, 64)
    return keys[:32], keys[32:]  # initiator_key (A→B), recipient_key (B→A)


@lru_cache(maxsize=4096)
def _x25519_public(ed25519_public: bytes) -> bytes:
    """A peer's Ed25519 key as the X25519 key its handshakes are sealed to (RFC 7748; libsodium's
    conversion, ~120 µs on the 2-core test VM: a third of building a HANDSHAKE). A pure function
    of the key, cached per process, bounded: the first handshake with a peer pays it, a
    re-handshake (after ``session_idle_s`` or a restart) and other nodes of the same process do
    not. A key that fails to convert raises and is not cached."""
    return nacl.bindings.crypto_sign_ed25519_pk_to_curve25519(ed25519_public)


def _initiator_secret(random_bytes: Callable[[int], bytes], peer_public_key: bytes) -> tuple[bytes, bytes] | None:
    """Handshake step 3's DH (HANDSHAKE and INITIATE alike): a fresh ephemeral key and its shared
    secret with the peer's static key, as ``(ephemeral public key, secret)``; None when the peer's
    key is unusable or gives a small-order point (RFC 7748 §6.1)."""
    try:
        peer_x25519 = _x25519_public(bytes(peer_public_key))
        ephemeral_key = nacl.public.PrivateKey(random_bytes(32))
        secret = nacl.bindings.crypto_scalarmult(bytes(ephemeral_key), peer_x25519)
    except nacl.exceptions.CryptoError:
        return None
    if secret == bytes(32):
        return None
    return bytes(ephemeral_key.public_key), secret


def _responder_secret(x25519_secret: bytes, ephemeral: bytes) -> bytes | None:
    """Handshake step 4's DH: our static key with the initiator's ephemeral one; None when the
    ephemeral key is unusable or gives a small-order point (RFC 7748 §6.1)."""
    try:
        secret = nacl.bindings.crypto_scalarmult(x25519_secret, ephemeral)
    except nacl.exceptions.CryptoError:
        return None
    return None if secret == bytes(32) else secret


def _handshake_signed(challenge_data: bytes, ephemeral: bytes, id_b: bytes) -> bytes:
    """What ``id_signature`` covers: a HANDSHAKE's (purpose ``session-handshake``, over the
    WHOAREYOU) and an INITIATE's (purpose ``session-initiate``, over its own header before the
    signature, which holds the nonce, the timestamp and the ephemeral key). ``id_b`` binds it
    to the recipient: it verifies at no other node."""
    return hashlib.sha256(challenge_data).digest() + ephemeral + id_b


# --- state -------------------------------------------------------------------------------------


class _Session:
    __slots__ = ("peer", "cipher", "created", "last_used", "touched", "last_message", "initiator",
                 "confirmed", "alternate", "alternate_until", "validated", "accept")

    def __init__(self, peer: Contact, send_key: bytes, recv_key: bytes, now: float) -> None:
        self.peer = peer
        #: keys, send counter and replay window (shared with the fast path's responder)
        self.cipher = Cipher(send_key, recv_key)
        self.created = now
        self.last_used = now
        self.touched = False  # used since it last came to the front of the LRU order (CLOCK)
        self.last_message = b""  # carried again by a re-handshake
        self.initiator = False  # we sent the HANDSHAKE that made it
        self.confirmed = True  # the peer has sent in it (an initiator's session starts unconfirmed)
        #: crossing handshakes: the peer's session we did not keep, still read until the time
        self.alternate: _Session | None = None
        self.alternate_until = 0.0
        #: the peer's address proved it receives (False for an INITIATE's session until the peer
        #: sends in it: our sends there obey the 3x rule, and the fast path does not serve it)
        self.validated = True
        #: an INITIATE's session before our first send: (the INITIATE's nonce, token, ACCEPT key)
        self.accept: tuple[bytes, bytes, bytes] | None = None

    @property
    def send_key(self) -> bytes:
        return self.cipher.send_key

    @property
    def recv_key(self) -> bytes:
        return self.cipher.recv_key


class _Challenge:
    __slots__ = ("data", "created")

    def __init__(self, data: bytes, created: float) -> None:
        self.data = data  # the WHOAREYOU packet: challenge_data
        self.created = created


class _Pending:
    __slots__ = ("peer", "messages", "nonces", "created", "last_random", "initiate")

    def __init__(self, peer: Contact, now: float) -> None:
        self.peer = peer
        self.messages: list[bytes] = []
        self.nonces: list[bytes] = []  # of the random packets (and INITIATE) sent, newest last
        self.created = now
        self.last_random = -float("inf")
        #: the INITIATE we sent (only the first attempt is one) while its ACCEPT may come
        self.initiate: _Initiate | None = None


class _Initiate:
    """What the initiator keeps of its INITIATE until the ACCEPT (or a WHOAREYOU) answers it."""

    __slots__ = ("nonce", "secret", "signed", "accept_key", "message", "sent")

    def __init__(self, nonce: bytes, secret: bytes, signed: bytes, accept_key: bytes, message: bytes,
                 sent: float) -> None:
        self.nonce = nonce
        self.secret = secret  # X25519(e, B): the session keys are derived from it with B's token
        self.signed = signed  # the INITIATE's header before the signature: the key schedule's salt
        self.accept_key = accept_key  # B -> A key of the INITIATE's keys: opens the ACCEPT
        self.message = message  # delivered if the ACCEPT comes; carried by the handshake if not
        self.sent = sent


_MAX_RANDOM_NONCES = 4  # random packets remembered per pending peer
#: The last message sent in a session is kept for a re-handshake only up to this size: requests
#: without a record (PING, FIND_NODE, FIND_VALUE: 17-29 bytes) are; answers (NODES ~1 KB) and
#: records are not, and go through again when their sender retries. Keeping every last message
#: cost up to 1.1 KB per session.
_MAX_KEPT_MESSAGE_BYTES = 64


def _kept(message: bytes) -> bytes:
    return message if len(message) <= _MAX_KEPT_MESSAGE_BYTES else b""
#: A WHOAREYOU answering one of the last this-many MESSAGEs sent in a session means the peer lost
#: it (restarted): re-handshake, carrying the last message again (earlier ones are the sender's
#: to retry).
_REHANDSHAKE_WINDOW = 16


# --- the layer ---------------------------------------------------------------------------------


class SessionLayer:
    """Sessions of one identity with its peers. See the module docstring and docs/protocol.md.

    - :meth:`send` encrypts a message to a peer, or starts a handshake and queues it;
    - :meth:`receive` takes a datagram and returns messages delivered and datagrams to send;
    - :meth:`expire` forgets stale challenges, queued messages and sessions (call it about once a
      second; lookups also check ages lazily).
    """

    def __init__(
        self,
        identity: Identity,
        *,
        random_bytes: Callable[[int], bytes] = os.urandom,
        limits: SessionLimits = SessionLimits(),
        known_record_seq: Callable[[bytes], int] | None = None,
        unix_offset: float | None = None,
    ) -> None:
        if not isinstance(identity, Identity):
            raise ArgumentTypeError(f"identity must be an Identity, not {type(identity).__name__}")
        if not callable(random_bytes):
            raise ArgumentTypeError("random_bytes must be callable")
        if not isinstance(limits, SessionLimits):
            raise ArgumentTypeError(f"limits must be SessionLimits, not {type(limits).__name__}")
        if known_record_seq is not None and not callable(known_record_seq):
            raise ArgumentTypeError("known_record_seq must be callable")
        if unix_offset is not None and (isinstance(unix_offset, bool) or not isinstance(unix_offset, (int, float))):
            raise ArgumentTypeError(f"unix_offset must be a number, not {type(unix_offset).__name__}")
        self._identity = identity
        self._id = bytes(identity.node_id)
        self._public_key = identity.public_key
        self._x25519_secret = bytes(nacl.signing.SigningKey(identity.seed()).to_curve25519_private_key())
        self._random = random_bytes
        self._limits = limits
        #: seq of the sender's record we hold, for WHOAREYOU (``known_record_seq`` of discv5)
        self._record_seq = known_record_seq or (lambda node_id: 0)
        self._sessions: OrderedDict[tuple[bytes, Address], _Session] = OrderedDict()  # LRU first
        #: validated addresses -> the node IDs of the sessions there (nearly always one)
        self._session_ids_at: dict[Address, tuple[bytes, ...]] = {}
        self._challenges: OrderedDict[tuple[bytes, Address], _Challenge] = OrderedDict()  # oldest first
        #: sessions we initiated and the peer has not yet used, by when they were made (oldest first)
        self._unconfirmed: OrderedDict[tuple[bytes, Address], float] = OrderedDict()
        self._challenges_per_ip: dict[object, dict[tuple[bytes, Address], None]] = {}  # oldest first
        self._pending: OrderedDict[tuple[bytes, Address], _Pending] = OrderedDict()  # oldest first
        self._pending_by_nonce: dict[bytes, tuple[bytes, Address]] = {}
        self._unvalidated: OrderedDict[Address, list[int]] = OrderedDict()  # [received, sent]
        #: Unix time = now + this (DhtEngine's rule); None: fixed from the wall clock at first use
        self._unix_offset = None if unix_offset is None else float(unix_offset)
        #: 0-RTT acceptance: freshness window, our start, ephemeral keys seen, rate (zero_rtt.py)
        self._guard = InitiateGuard(int(limits.zero_rtt_window_s * 1000), int(limits.zero_rtt_ahead_s * 1000),
                                    limits.max_zero_rtt_seen, limits.zero_rtt_per_s)
        #: sessions made by an INITIATE whose address has not proved it receives, oldest first
        self._unvalidated_sessions: OrderedDict[tuple[bytes, Address], None] = OrderedDict()
        #: sessions an ACCEPT made (our INITIATE answered), by when that INITIATE went out, oldest
        #: first, until unused_session_idle_s has passed or the session is gone
        self._zero_rtt_made: OrderedDict[tuple[bytes, Address], float] = OrderedDict()
        self._started = False  # the guard knows our start (set at the first call with a ``now``)
        #: the serving fast path's responder (attach_responder), which holds an index of sessions
        self._responder = None
        #: counters, each created on its first count (most of them stay 0): ``stats`` shows all
        self._stats: Counter[str] = Counter()

    # --- public API -----------------------------------------------------------------------------

    @property
    def node_id(self) -> bytes:
        return self._identity.node_id

    @property
    def limits(self) -> SessionLimits:
        return self._limits

    def address_proven(self, node_id: bytes, address: Address) -> bool:
        """Whether we share a session with ``node_id`` at ``address`` and that address has proved
        it receives: every session a HANDSHAKE made, and an INITIATE's once the peer sent in it
        (docs/security.md, "0-RTT first contact": until then its first message may be a copy
        raced from another address)."""
        key = (bytes(node_id), address)
        session = self._sessions.get(key)
        return session is not None and (session.validated or self._settle(key, session))

    @property
    def stats(self) -> dict[str, int]:
        """Counters (packets/bytes in and out, each drop reason, …) and current table sizes;
        what the fast path's responder did in these sessions is included."""
        out = dict.fromkeys(STAT_NAMES, 0)
        out.update(self._stats)
        if self._responder is not None:
            fast = self._responder.counters()
            for name in ("packets_in", "bytes_in", "delivered", "packets_out", "bytes_out"):
                out[name] += fast[name]
        out["sessions"] = len(self._sessions)
        out["challenges"] = len(self._challenges)
        out["pending_peers"] = len(self._pending)
        out["pending_messages"] = sum(len(p.messages) for p in self._pending.values())
        out["unvalidated_addresses"] = len(self._unvalidated)
        out["unvalidated_sessions"] = len(self._unvalidated_sessions)
        out["zero_rtt_seen"] = len(self._guard)
        return out

    def attach_responder(self, responder) -> None:
        """Index every established session in ``responder`` (a :class:`~.fastpath.Responder`)
        from now on, so that it answers PING and FIND_NODE in them (docs/engine.md, "The serving
        fast path"). Its counters are added to :attr:`stats`."""
        if self._responder is not None:
            raise ArgumentValueError("a responder is attached already")
        self._responder = responder
        for key, session in self._sessions.items():
            self._index(key, session)

    def has_session(self, node_id: bytes, address: Address, now: float | None = None) -> bool:
        """Whether a session with ``node_id`` at ``address`` is established (and, given ``now``,
        still within its lifetime)."""
        session = self._sessions.get((bytes(node_id), address))
        if session is None:
            return False
        return now is None or now - session.created < self._limits.session_lifetime_s

    def session_cipher(self, node_id: bytes, address: Address, now: float):
        """The :class:`~.fastpath.Cipher` of the established, confirmed session with ``node_id``
        at ``address`` (None if there is none, or it is past its lifetime), for a caller that
        seals and opens MESSAGE packets in bulk itself (``cipher.seal(own_id, message)``,
        ``cipher.open(packet)``), as benchmark clients do. Packets it seals are exactly those
        :meth:`send` would make; the session's last-used time and LRU place are not updated."""
        session = self._sessions.get((bytes(node_id), address))
        if (session is None or not session.confirmed or now - session.created >= self._limits.session_lifetime_s
                or not (session.validated or self._settle((bytes(node_id), address), session))):
            return None
        return session.cipher

    def send(self, peer: Contact, message: bytes, now: float) -> list[Outgoing]:
        """Encrypt ``message`` to ``peer``; returns the datagrams to send (possibly none, when the
        message waits for a handshake already under way)."""
        message = check_send(peer, message)
        if not isinstance(now, (int, float)) or isinstance(now, bool):
            raise ArgumentTypeError(f"now must be a number, not {type(now).__name__}")
        if not self._started:
            self._unix_ms(now)  # our start, for the 0-RTT guard
        key = (peer.node_id, peer.address)
        session = self._sessions.get(key)
        if session is not None:
            if now - session.created < self._limits.session_lifetime_s and session.cipher.send_counter < _MAX_COUNTER:
                session.last_used = now
                session.touched = True
                if session.validated or self._settle(key, session):
                    return [self._seal(session, message)]
                return self._seal_unvalidated(session, message)
            self._remove_session(key)
        return self._queue(key, peer, message, now)

    def receive(self, datagram: bytes, source: Address, now: float) -> Received:
        """Handle one datagram from ``source``. Never raises for any bytes: a bad datagram is
        dropped and counted under its reason in :attr:`stats`."""
        datagram = check_receive(datagram, source)
        if not self._started:
            self._unix_ms(now)  # our start, for the 0-RTT guard
        try:
            return self._receive(datagram, source, now)
        except Exception:  # a bug; never let network input crash the engine
            _log.exception("session layer: datagram from %s raised; dropped", source)
            self._stats["internal_error"] += 1
            return _NOTHING

    def expire(self, now: float) -> None:
        """Forget challenges and queued messages past their TTL, and sessions past their lifetime
        or idle for ``session_idle_s``; and 0-RTT ephemeral keys whose timestamps left the window."""
        self._guard.expire(self._unix_ms(now))
        limits = self._limits
        challenges = self._challenges
        while challenges:
            key, challenge = next(iter(challenges.items()))
            if now - challenge.created < limits.challenge_ttl_s:
                break
            self._pop_challenge(key)
        pending = self._pending
        while pending:
            key, entry = next(iter(pending.items()))
            if now - entry.created < limits.pending_ttl_s:
                break
            self._stats["pending_dropped"] += len(entry.messages)
            self._remove_pending(key)
        sessions = self._sessions
        # A session we initiated that the peer never used (it did not answer our HANDSHAKE, e.g.
        # it does not hold the key we pinned, or it is gone) is dropped after pending_ttl_s.
        unconfirmed = self._unconfirmed
        while unconfirmed:
            key, created = next(iter(unconfirmed.items()))
            if now - created < limits.pending_ttl_s:
                break
            del unconfirmed[key]
            session = sessions.get(key)
            if session is not None and not session.confirmed and session.created == created:
                self._remove_session(key)
                self._stats["sessions_unconfirmed"] += 1
        # 0-RTT sessions of one exchange (unused_session_idle_s): the responder's whose address
        # is still unproven (a MESSAGE the fast path opened proves it now: _settle) and in which
        # we have not sent since our ACCEPT ...
        unvalidated = self._unvalidated_sessions
        for _ in range(len(unvalidated)):
            key = next(iter(unvalidated))
            session = sessions[key]
            if now - session.created < limits.unused_session_idle_s:
                break
            if self._settle(key, session):
                continue
            if session.cipher.send_counter:  # we sent in it since the ACCEPT: in use, kept
                unvalidated.move_to_end(key)
                continue
            self._remove_session(key)
            if key not in self._challenges:  # nothing left to answer there: its credit goes too
                self._unvalidated.pop(key[1], None)
            self._stats["sessions_unused"] += 1
        # ... and the initiator's in which neither side has sent since the ACCEPT
        made = self._zero_rtt_made
        while made:
            key, sent = next(iter(made.items()))
            if now - sent < limits.unused_session_idle_s:
                break
            del made[key]
            cipher = sessions[key].cipher  # (a session that went took its entry with it)
            if not cipher.send_counter and not cipher.recv_max:
                self._remove_session(key)
                self._stats["sessions_unused"] += 1
        for _ in range(min(len(sessions), 256)):  # bounded work; an old session is also dropped on use
            key, session = next(iter(sessions.items()))
            if now - session.created >= limits.session_lifetime_s:
                self._remove_session(key)
            elif now - session.last_used >= limits.session_idle_s:
                self._remove_session(key)
                self._stats["sessions_idle"] += 1
            elif session.touched:  # CLOCK order, as in eviction
                session.touched = False
                sessions.move_to_end(key)
            else:
                break

    # --- receiving ------------------------------------------------------------------------------

    def _receive(self, datagram: bytes, source: Address, now: float) -> Received:
        stats = self._stats
        size = len(datagram)
        stats["packets_in"] += 1
        stats["bytes_in"] += size
        if size > MAX_PACKET_BYTES:
            self._credit_if_unvalidated(source, size)
            return self._drop("too_large", source)
        if size < _STATIC:
            self._credit_if_unvalidated(source, size)
            return self._drop("malformed", source)
        magic, version, kind, nonce, auth_len = _HEADER.unpack_from(datagram)
        if kind == KIND_MESSAGE and auth_len == _AUTH_MESSAGE and size >= _MESSAGE_HEAD + _TAG \
                and magic == MAGIC and version == VERSION:
            return self._on_message(datagram, source, nonce, now)  # credits unless delivered
        self._credit_if_unvalidated(source, size)
        if magic != MAGIC:
            return self._drop("bad_magic", source)
        if version != VERSION:
            return self._drop("unknown_version", source)
        if kind == KIND_MESSAGE:  # the well-formed ones were handled above
            return self._drop("malformed", source)
        if kind == KIND_WHOAREYOU:
            if auth_len != _AUTH_WHOAREYOU or size != _WHOAREYOU_BYTES:
                return self._drop("malformed", source)
            return self._on_whoareyou(datagram, source, nonce, now)
        if kind == KIND_HANDSHAKE:
            if auth_len != _AUTH_HANDSHAKE or size < _HANDSHAKE_HEAD + _TAG:
                return self._drop("malformed", source)
            return self._on_handshake(datagram, source, nonce, now)
        if kind == KIND_INITIATE:
            # padded exactly to MIN_INITIATE_BYTES with zero authdata bytes when shorter, never more
            padding = auth_len - _AUTH_INITIATE
            if (padding < 0 or size < _INITIATE_HEAD + padding + _TAG or size < MIN_INITIATE_BYTES
                    or (padding and size != MIN_INITIATE_BYTES)
                    or datagram[_INITIATE_HEAD:_INITIATE_HEAD + padding].count(0) != padding):
                return self._drop("malformed", source)
            return self._on_initiate(datagram, source, nonce, _INITIATE_HEAD + padding, now)
        if kind == KIND_ACCEPT:
            if auth_len != _AUTH_ACCEPT or size < _ACCEPT_HEAD + _TAG:
                return self._drop("malformed", source)
            return self._on_accept(datagram, source, nonce, now)
        return self._drop("unknown_kind", source)

    def _on_message(self, datagram: bytes, source: Address, nonce: bytes, now: float) -> Received:
        src_id = datagram[_STATIC:_MESSAGE_HEAD]
        key = (src_id, source)
        session = self._sessions.get(key)
        if session is None:
            reason = "no_session"
        elif now - session.created >= self._limits.session_lifetime_s:
            self._remove_session(key)
            reason = "no_session"
        elif datagram[4:8] != _COUNTER_PREFIX:  # a random nonce: a peer that lost its session
            reason = "decrypt_failed"
        else:
            # the window moves only after the tag verified (docs/protocol.md)
            message = session.cipher.open(datagram)
            if type(message) is not bytes and session.alternate is not None:
                if now < session.alternate_until:  # sealed under the crossing handshake's keys
                    other = session.alternate.cipher.open(datagram)
                    if other is not None:
                        message = other
                else:
                    session.alternate = None
                    self._index(key, session)
            if message is REPLAYED:
                return self._drop("replayed", source)  # the address has a session: validated
            if message is None:
                reason = "decrypt_failed"
            else:
                session.last_used = now
                session.touched = True
                if not session.confirmed:
                    session.confirmed = True
                    self._unconfirmed.pop(key, None)
                    self._index(key, session)
                if not session.validated:  # it used the keys our ACCEPT's token went into
                    self._validate(key, session)
                self._stats["delivered"] += 1
                return Received((Delivered(session.peer, message),), ())
        # docs/protocol.md, handshake step 2: answer what we cannot decrypt with a challenge.
        if source not in self._session_ids_at:
            self._credit(source, len(datagram))
        if session is None and datagram[4:8] == _COUNTER_PREFIX:
            pending = self._pending.get(key)
            if pending is not None and pending.initiate is not None:
                # sent in the session our INITIATE opens, overtaking its ACCEPT (we lack the token)
                return self._drop("awaiting_handshake", source)
        return self._challenge_unreadable(src_id, source, nonce, reason, now)

    def _challenge_unreadable(self, src_id: bytes, source: Address, nonce: bytes, reason: str,
                              now: float) -> Received:
        """A packet we cannot read (or will not, as a refused INITIATE) gets a WHOAREYOU echoing
        its nonce (docs/protocol.md, handshake step 2), counted under ``reason``."""
        key = (src_id, source)
        live = self._challenges.get(key)
        if live is not None and now - live.created < self._limits.challenge_ttl_s:
            # One live challenge per peer (sigp/discv5's handler does the same): a new one would
            # spoil the HANDSHAKE answering the live one, which a session MESSAGE sent right after
            # it can overtake on the way. A random packet (its WHOAREYOU may have been lost) gets
            # the live challenge again; a session MESSAGE waits for the handshake.
            if nonce[:4] == _COUNTER_PREFIX:
                return self._drop("awaiting_handshake", source)
            self._count(reason)
            return self._send_challenge(source, live.data)
        self._count(reason)
        return self._challenge(src_id, source, nonce, now)

    def _may_send(self, source: Address, size: int) -> bool:
        """Anti-amplification (RFC 9000 §8): to an address without a session, at most
        ``amplification_factor`` times the bytes received from it. Counts ``size`` if allowed."""
        if source in self._session_ids_at:
            return True
        counts = self._unvalidated.get(source)
        if counts is None or counts[1] + size > self._limits.amplification_factor * counts[0]:
            return False
        counts[1] += size
        return True

    def _send_challenge(self, source: Address, packet: bytes) -> Received:
        if not self._may_send(source, len(packet)):
            return self._drop("amplification_limited", source)
        return Received((), (self._out(source, packet),))

    def _challenge(self, src_id: bytes, source: Address, nonce: bytes, now: float) -> Received:
        if not self._may_send(source, _WHOAREYOU_BYTES):
            return self._drop("amplification_limited", source)
        seq = self._record_seq(src_id)
        if not isinstance(seq, int) or not 0 <= seq <= _MAX_COUNTER:
            seq = 0
        packet = _HEADER.pack(MAGIC, VERSION, KIND_WHOAREYOU, nonce, _AUTH_WHOAREYOU) + self._random(16) + _U64.pack(seq)
        key = (src_id, source)
        self._pop_challenge(key)  # at most one per (node ID, address): the newest
        ip = source.ip
        same_ip = self._challenges_per_ip.get(ip)
        if same_ip is not None and len(same_ip) >= self._limits.max_challenges_per_ip:
            self._pop_challenge(next(iter(same_ip)))
            self._stats["challenges_evicted"] += 1
        while len(self._challenges) >= self._limits.max_challenges:
            self._pop_challenge(next(iter(self._challenges)))
            self._stats["challenges_evicted"] += 1
        self._challenges[key] = _Challenge(packet, now)
        self._challenges_per_ip.setdefault(ip, {})[key] = None
        return Received((), (self._out(source, packet),))

    def _on_whoareyou(self, datagram: bytes, source: Address, nonce: bytes, now: float) -> Received:
        key = self._pending_by_nonce.get(nonce)
        pending = self._pending.get(key) if key is not None else None
        if pending is not None and key[1] == source:
            self._remove_pending(key)
            if now - pending.created >= self._limits.pending_ttl_s:
                self._stats["pending_dropped"] += len(pending.messages)
                return self._drop("unsolicited_whoareyou", source)
            if pending.initiate is not None and pending.initiate.nonce == nonce:
                # our INITIATE was refused (clock, load, 0-RTT off): the handshake carries its message
                self._stats["initiates_fell_back"] += 1
            return self._initiate(pending.peer, datagram, pending.messages, now)
        # The peer lost our session (restarted): it answers one of the last MESSAGEs we sent
        # there (it challenges the first it cannot read and keeps that challenge while the rest
        # arrive, so the answer may be to an earlier one than the last).
        if nonce[:4] == _COUNTER_PREFIX:
            counter = _COUNTER_NONCE.unpack(nonce)[0]
            for node_id in self._session_ids_at.get(source, ()):
                session = self._sessions[(node_id, source)]
                if 0 <= session.cipher.send_counter - counter < _REHANDSHAKE_WINDOW and counter > 0:
                    self._remove_session((node_id, source))
                    return self._initiate(session.peer, datagram, [session.last_message], now)
        return self._drop("unsolicited_whoareyou", source)

    def _initiate(self, peer: Contact, challenge_data: bytes, messages: list[bytes], now: float) -> Received:
        """Handshake step 3 (docs/protocol.md): answer a solicited WHOAREYOU with a HANDSHAKE."""
        id_b = bytes(peer.node_id)
        dh = _initiator_secret(self._random, peer.public_key)
        if dh is None:
            self._stats["pending_dropped"] += len(messages)
            return self._drop("bad_key", peer.address)
        ephemeral, secret = dh
        initiator_key, recipient_key = _session_keys(secret, challenge_data, self._id, id_b)
        signature = self._identity.sign(
            SignaturePurpose.SESSION_HANDSHAKE, _handshake_signed(challenge_data, ephemeral, id_b))
        nonce = self._random(12)
        header = _HEADER.pack(MAGIC, VERSION, KIND_HANDSHAKE, nonce, _AUTH_HANDSHAKE) + self._public_key + ephemeral + signature
        first = messages[0] if messages else b""
        packet = header + aead.encrypt(first, header, nonce, initiator_key)
        session = _Session(peer, initiator_key, recipient_key, now)
        session.initiator = True
        session.confirmed = False
        unconfirmed = self._unconfirmed
        unconfirmed.pop((id_b, peer.address), None)
        unconfirmed[(id_b, peer.address)] = now
        while len(unconfirmed) > self._limits.max_sessions:
            unconfirmed.popitem(last=False)
        session.last_message = _kept(first)  # carried again if the peer answers a later MESSAGE with WHOAREYOU
        self._install((id_b, peer.address), session)
        self._stats["handshakes_initiated"] += 1
        outgoing = [self._out(peer.address, packet)]
        for message in messages[1:]:
            outgoing.append(self._seal(session, message))
        return Received((), tuple(outgoing))

    def _on_handshake(self, datagram: bytes, source: Address, nonce: bytes, now: float) -> Received:
        """Handshake step 4 (docs/protocol.md)."""
        public_key = datagram[_STATIC:_STATIC + 32]
        ephemeral = datagram[_STATIC + 32:_STATIC + 64]
        signature = datagram[_STATIC + 64:_HANDSHAKE_HEAD]
        src_id = hashlib.sha256(public_key).digest()[:NODE_ID_BYTES]
        key = (src_id, source)
        challenge = self._pop_challenge(key)  # single use: consumed whatever follows
        if challenge is None or now - challenge.created >= self._limits.challenge_ttl_s:
            return self._drop("unknown_challenge", source)
        challenge_data = challenge.data
        if not verify_signature(public_key, SignaturePurpose.SESSION_HANDSHAKE,
                                _handshake_signed(challenge_data, ephemeral, self._id), signature):
            return self._drop("bad_signature", source)
        secret = _responder_secret(self._x25519_secret, ephemeral)
        if secret is None:
            return self._drop("bad_key", source)
        initiator_key, recipient_key = _session_keys(secret, challenge_data, src_id, self._id)
        message = aead.decrypt(datagram[_HANDSHAKE_HEAD:], datagram[:_HANDSHAKE_HEAD], nonce, initiator_key)
        if message is None:
            return self._drop("decrypt_failed", source)
        session = _Session(Contact(public_key, source), recipient_key, initiator_key, now)
        self._stats["handshakes_completed"] += 1
        if message:
            self._stats["delivered"] += 1
            delivered: tuple[Delivered, ...] = (Delivered(session.peer, message),)
        else:  # a re-handshake after an answer, which is not kept to be carried again
            delivered = ()
        if self._id < src_id and self._initiate_live(key, now):
            # Crossing with our INITIATE, which the peer (higher ID) accepts: that session is the
            # one both keep. This HANDSHAKE's message is delivered; what the peer seals in its own
            # session before it sees our INITIATE is lost (and retried by its sender).
            self._stats["handshakes_crossed"] += 1
            return Received(delivered, ())
        ours = self._sessions.get(key)
        if (ours is not None and ours.initiator and now - ours.created < self._limits.challenge_ttl_s
                and self._id < src_id):
            # Crossing handshakes (both sides initiated at once): each side would install the
            # other's session and neither could read the other. The session initiated by the
            # lower node ID wins on both sides; the loser's is still read for a while, for the
            # messages already sealed under it.
            ours.alternate = session
            ours.alternate_until = now + self._limits.challenge_ttl_s
            self._index(key, ours)  # out of the responder while it reads two sessions
            self._stats["handshakes_crossed"] += 1
            return Received(delivered, ())
        self._install(key, session)
        # Messages waiting for our own handshake with this peer go out in this session now; a
        # WHOAREYOU to our random packet arriving later is then unsolicited.
        pending = self._pending.get(key)
        if pending is None:
            return Received(delivered, ())
        self._remove_pending(key)
        return Received(delivered, tuple(self._seal(session, m) for m in pending.messages))

    # --- sending --------------------------------------------------------------------------------

    def _seal(self, session: _Session, message: bytes) -> Outgoing:
        packet = session.cipher.seal(self._id, message)
        session.last_message = _kept(message)
        address = session.peer.address
        stats = self._stats
        stats["packets_out"] += 1
        stats["bytes_out"] += len(packet)
        return Outgoing(address, packet)

    def _queue(self, key: tuple[bytes, Address], peer: Contact, message: bytes, now: float) -> list[Outgoing]:
        """Handshake step 1: queue the message; send a random packet unless one is fresh."""
        limits = self._limits
        pending = self._pending.get(key)
        if pending is not None and now - pending.created >= limits.pending_ttl_s:
            self._stats["pending_dropped"] += len(pending.messages)
            self._remove_pending(key)
            pending = None
        if pending is None:
            while len(self._pending) >= limits.max_pending_peers:
                oldest = next(iter(self._pending))
                self._stats["pending_dropped"] += len(self._pending[oldest].messages)
                self._remove_pending(oldest)
            pending = self._pending[key] = _Pending(peer, now)
        if len(pending.messages) >= limits.max_pending_messages_per_peer:
            del pending.messages[0]
            self._stats["pending_dropped"] += 1
        pending.messages.append(message)
        if now - pending.last_random < limits.handshake_retry_s:
            return []
        first_attempt = pending.last_random == -float("inf")
        pending.last_random = now
        nonce = self._random(12)
        if first_attempt and limits.zero_rtt and len(message) <= MAX_INITIATE_MESSAGE_BYTES:
            # 0-RTT: only the first attempt; a retry (nothing came back) takes the WHOAREYOU path,
            # which also reaches peers that drop INITIATEs
            packet = self._build_initiate(pending, nonce, message, now)
            if packet is None:
                self._stats["pending_dropped"] += len(pending.messages)
                self._remove_pending(key)
                self._drop("bad_key", peer.address)
                return []
        else:
            packet = (_HEADER.pack(MAGIC, VERSION, KIND_MESSAGE, nonce, _AUTH_MESSAGE) + self._id
                      + self._random(_RANDOM_PAYLOAD))
        if len(pending.nonces) >= _MAX_RANDOM_NONCES:
            self._pending_by_nonce.pop(pending.nonces.pop(0), None)
        pending.nonces.append(nonce)
        self._pending_by_nonce[nonce] = key
        return [self._out(peer.address, packet)]

    # --- 0-RTT first contact (docs/protocol.md, "0-RTT first contact") -------------------------

    def _unix_ms(self, now: float) -> int:
        """Our Unix time in ms at ``now``; the first call fixes our start for the guard."""
        if self._unix_offset is None:  # the layer's only clock read, once (aio.py does the same)
            self._unix_offset = time.time() - now
        unix_ms = int((now + self._unix_offset) * 1000)
        if not self._started:
            self._started = True
            self._guard.start(unix_ms)
        return unix_ms

    def _build_initiate(self, pending: _Pending, nonce: bytes, message: bytes, now: float) -> bytes | None:
        """The INITIATE carrying ``message`` to ``pending.peer``: handshake step 3 with the
        packet's own header (nonce, timestamp) where the WHOAREYOU was (Noise IK's first
        message). None if the peer's key is unusable (it would fail the handshake too)."""
        peer = pending.peer
        id_b = bytes(peer.node_id)
        dh = _initiator_secret(self._random, peer.public_key)
        if dh is None:
            return None
        ephemeral, secret = dh
        padding = max(0, MIN_INITIATE_BYTES - _INITIATE_HEAD - len(message) - _TAG)
        signed = (_HEADER.pack(MAGIC, VERSION, KIND_INITIATE, nonce, _AUTH_INITIATE + padding) + self._public_key
                  + ephemeral + _U64.pack(self._unix_ms(now)))
        initiate_key, accept_key = _session_keys(secret, signed, self._id, id_b)
        signature = self._identity.sign(SignaturePurpose.SESSION_INITIATE, _handshake_signed(signed, ephemeral, id_b))
        header = signed + signature + bytes(padding)
        pending.initiate = _Initiate(nonce, secret, signed, accept_key, message, now)
        self._stats["initiates_sent"] += 1
        return header + aead.encrypt(message, header, nonce, initiate_key)

    def _on_initiate(self, datagram: bytes, source: Address, nonce: bytes, head: int, now: float) -> Received:
        """The responder's side of an INITIATE: the guard's rules (zero_rtt.py), then handshake
        step 4 with the INITIATE's own header as the challenge."""
        public_key = datagram[_STATIC:_STATIC + 32]
        ephemeral = datagram[_STATIC + 32:_STATIC + 64]
        signed = datagram[:_INITIATE_SIGNED]
        src_id = hashlib.sha256(public_key).digest()[:NODE_ID_BYTES]
        if not self._limits.zero_rtt:  # refused as a random packet is: the handshake follows
            return self._challenge_unreadable(src_id, source, nonce, "initiate_disabled", now)
        timestamp = _U64.unpack_from(datagram, _STATIC + 64)[0]
        verdict = self._guard.check(timestamp, ephemeral, self._unix_ms(now), now)
        if verdict == INITIATE_REPLAYED:
            # accepted before (a duplicate or a replay): its sender already has our answer
            return self._drop(verdict, source)
        if verdict != FRESH:  # stale, or too many to vouch for: the old round trip, nothing lost
            return self._challenge_unreadable(src_id, source, nonce, verdict, now)
        if not verify_signature(public_key, SignaturePurpose.SESSION_INITIATE,
                                _handshake_signed(signed, ephemeral, self._id),
                                datagram[_INITIATE_SIGNED:_INITIATE_HEAD]):
            return self._drop("bad_signature", source)  # forged, tampered, or meant for another node
        secret = _responder_secret(self._x25519_secret, ephemeral)
        if secret is None:
            return self._drop("bad_key", source)
        initiate_key, accept_key = _session_keys(secret, signed, src_id, self._id)
        message = aead.decrypt(datagram[head:], datagram[:head], nonce, initiate_key)
        if message is None:
            return self._drop("decrypt_failed", source)
        self._guard.remember(timestamp, ephemeral)  # whatever follows: it is used up
        key = (src_id, source)
        if self._id < src_id and self._initiating(key, now):
            # Crossing first contacts: the lower node ID's INITIATE wins on both sides (as for
            # crossing handshakes). The higher one sends what its INITIATE carried in ours.
            self._stats["handshakes_crossed"] += 1
            return _NOTHING
        token = self._random(_TOKEN)
        initiator_key, recipient_key = _session_keys(secret, signed + token, src_id, self._id)
        session = _Session(Contact(public_key, source), recipient_key, initiator_key, now)
        session.validated = False
        session.accept = (nonce, token, accept_key)
        self._install(key, session)
        if source not in self._session_ids_at and source not in self._unvalidated:
            # not counted on receipt: the address had a proven session, which _install just replaced
            self._credit(source, len(datagram))
        self._stats["initiates_accepted"] += 1
        self._stats["handshakes_completed"] += 1
        delivered: tuple[Delivered, ...] = ()
        if message:
            self._stats["delivered"] += 1
            delivered = (Delivered(session.peer, message),)
        pending = self._pending.get(key)
        if pending is None:
            return Received(delivered, ())
        # what waited for our own handshake goes in this session (the first as its ACCEPT)
        self._remove_pending(key)
        outgoing: list[Outgoing] = []
        for m in pending.messages:
            outgoing.extend(self._seal_unvalidated(session, m))
        return Received(delivered, tuple(outgoing))

    def _initiating(self, key: tuple[bytes, Address], now: float) -> bool:
        """Whether we are opening a session with ``key`` ourselves: our INITIATE is out, or we
        made the session less than ``challenge_ttl_s`` ago."""
        if self._initiate_live(key, now):
            return True
        ours = self._sessions.get(key)
        return ours is not None and ours.initiator and now - ours.created < self._limits.challenge_ttl_s

    def _initiate_live(self, key: tuple[bytes, Address], now: float) -> bool:
        """Whether our INITIATE to ``key`` went out less than ``challenge_ttl_s`` ago, unanswered."""
        pending = self._pending.get(key)
        return (pending is not None and pending.initiate is not None
                and now - pending.initiate.sent < self._limits.challenge_ttl_s)

    def _seal_unvalidated(self, session: _Session, message: bytes) -> list[Outgoing]:
        """Send in an INITIATE's session whose address has not proved it receives: the first
        packet is the ACCEPT with our token; each obeys the 3x rule (RFC 9000 §8.1)."""
        address = session.peer.address
        accept = session.accept
        size = (_ACCEPT_HEAD if accept is not None else _MESSAGE_HEAD) + len(message) + _TAG
        if not self._may_send(address, size):
            self._drop("amplification_limited", address)
            return []
        if accept is None:
            return [self._seal(session, message)]
        session.accept = None
        nonce, token, accept_key = accept
        header = _HEADER.pack(MAGIC, VERSION, KIND_ACCEPT, nonce, _AUTH_ACCEPT) + self._id + token
        session.last_message = _kept(message)
        return [self._out(address, header + aead.encrypt(message, header, nonce, accept_key))]

    def _on_accept(self, datagram: bytes, source: Address, nonce: bytes, now: float) -> Received:
        """The initiator's side: the ACCEPT answers our INITIATE (it echoes its nonce); the
        session keys mix in its token, and what waited goes out in the session."""
        key = self._pending_by_nonce.get(nonce)
        pending = self._pending.get(key) if key is not None else None
        if (pending is None or key[1] != source or key[0] != datagram[_STATIC:_STATIC + NODE_ID_BYTES]
                or pending.initiate is None or pending.initiate.nonce != nonce):
            return self._drop("unsolicited_accept", source)
        initiate = pending.initiate
        message = aead.decrypt(datagram[_ACCEPT_HEAD:], datagram[:_ACCEPT_HEAD], nonce, initiate.accept_key)
        if message is None:
            return self._drop("decrypt_failed", source)  # not from the peer: the real one may follow
        self._remove_pending(key)
        if now - pending.created >= self._limits.pending_ttl_s:
            self._stats["pending_dropped"] += len(pending.messages)
            return self._drop("unsolicited_accept", source)
        token = datagram[_ACCEPT_HEAD - _TOKEN:_ACCEPT_HEAD]
        initiator_key, recipient_key = _session_keys(initiate.secret, initiate.signed + token, self._id, key[0])
        session = _Session(pending.peer, initiator_key, recipient_key, now)
        session.initiator = True  # for crossing handshakes; confirmed: the peer answered in it
        self._install(key, session)
        self._zero_rtt_made[key] = initiate.sent
        self._stats["handshakes_initiated"] += 1
        delivered: tuple[Delivered, ...] = ()
        if message:
            self._stats["delivered"] += 1
            delivered = (Delivered(session.peer, message),)
        rest = list(pending.messages)
        if initiate.message in rest:  # delivered with the INITIATE
            rest.remove(initiate.message)
        return Received(delivered, tuple(self._seal(session, m) for m in rest))

    def _validate(self, key: tuple[bytes, Address], session: _Session) -> None:
        """The peer of an INITIATE's session sent in it: its address receives (it used our
        token), so the session is like any other from now on."""
        session.validated = True
        session.accept = None
        self._unvalidated_sessions.pop(key, None)
        self._session_ids_at[key[1]] = self._session_ids_at.get(key[1], ()) + (key[0],)
        self._unvalidated.pop(key[1], None)
        self._stats["addresses_validated"] += 1

    def _settle(self, key: tuple[bytes, Address], session: _Session) -> bool:
        """Validate an INITIATE's session if the peer sent in it through the fast path (which
        opens MESSAGEs with the session's cipher without telling us); whether it is validated."""
        if session.cipher.recv_max:
            self._validate(key, session)
            return True
        return False

    def _out(self, address: Address, packet: bytes) -> Outgoing:
        self._stats["packets_out"] += 1
        self._stats["bytes_out"] += len(packet)
        return Outgoing(address, packet)

    # --- tables ---------------------------------------------------------------------------------

    def _install(self, key: tuple[bytes, Address], session: _Session) -> None:
        """A new handshake replaces the old session; the least recently used goes when full. An
        INITIATE's session (not validated) does not validate the address; at most
        ``max_unvalidated_sessions`` of them are kept, the oldest dropped."""
        self._remove_session(key)
        if not session.validated:
            unvalidated = self._unvalidated_sessions
            while len(unvalidated) >= self._limits.max_unvalidated_sessions:
                oldest = next(iter(unvalidated))
                if not self._settle(oldest, self._sessions[oldest]):
                    self._remove_session(oldest)
                    self._stats["sessions_evicted"] += 1
            unvalidated[key] = None
        sessions = self._sessions
        while len(sessions) >= self._limits.max_sessions:  # CLOCK: a used session gets a 2nd chance
            oldest, candidate = next(iter(sessions.items()))
            if candidate.touched:
                candidate.touched = False
                sessions.move_to_end(oldest)
                continue
            self._remove_session(oldest)
            self._stats["sessions_evicted"] += 1
        self._sessions[key] = session
        if session.validated:
            self._session_ids_at[key[1]] = self._session_ids_at.get(key[1], ()) + (key[0],)
            self._unvalidated.pop(key[1], None)  # the address proved it receives
        # An INITIATE's session is indexed at once, as a HANDSHAKE's: the fast path answers only
        # a MESSAGE under the keys our ACCEPT's token went into, i.e. from a validated address.
        self._index(key, session)

    def _index(self, key: tuple[bytes, Address], session: _Session) -> None:
        """Keep the responder's index in step: it holds the sessions the peer has used (an
        initiator's unconfirmed session may be one the peer never accepted) that read one set of
        keys (not while a crossing handshake's alternate is read)."""
        responder = self._responder
        if responder is None:
            return
        fast_key = index_key(key[0], key[1])
        if fast_key is None:
            return
        if session.confirmed and session.alternate is None:
            peer = session.peer
            responder.add(fast_key, session, session.cipher, peer, peer.address, peer.address.encode(),
                          session.created)
        else:
            responder.remove(fast_key)

    def _remove_session(self, key: tuple[bytes, Address]) -> None:
        session = self._sessions.pop(key, None)
        if session is None:
            return
        self._zero_rtt_made.pop(key, None)
        if self._responder is not None:
            fast_key = index_key(key[0], key[1])
            if fast_key is not None:
                self._responder.remove(fast_key)
        if not session.validated:  # not counted at its address
            del self._unvalidated_sessions[key]
            return
        ids = tuple(i for i in self._session_ids_at[key[1]] if i != key[0])
        if ids:
            self._session_ids_at[key[1]] = ids
        else:
            del self._session_ids_at[key[1]]

    def _pop_challenge(self, key: tuple[bytes, Address]) -> _Challenge | None:
        challenge = self._challenges.pop(key, None)
        if challenge is not None:
            ip = key[1].ip
            same_ip = self._challenges_per_ip[ip]
            del same_ip[key]
            if not same_ip:
                del self._challenges_per_ip[ip]
        return challenge

    def _remove_pending(self, key: tuple[bytes, Address]) -> None:
        pending = self._pending.pop(key, None)
        if pending is not None:
            for nonce in pending.nonces:
                self._pending_by_nonce.pop(nonce, None)

    def _credit_if_unvalidated(self, source: Address, size: int) -> None:
        if source not in self._session_ids_at:
            self._credit(source, size)

    def _credit(self, source: Address, size: int) -> None:
        counts = self._unvalidated.get(source)
        if counts is None:
            while len(self._unvalidated) >= self._limits.max_unvalidated_addresses:
                self._unvalidated.popitem(last=False)
            self._unvalidated[source] = [size, 0]
        else:
            counts[0] += size
            self._unvalidated.move_to_end(source)

    # --- counting -------------------------------------------------------------------------------

    def _count(self, reason: str) -> None:
        self._stats[reason] += 1
        if self._stats[reason] == 1:
            _log.info("session layer: first datagram dropped as %s", reason)

    def _drop(self, reason: str, source: Address) -> Received:
        self._count(reason)
        _log.debug("session layer: dropped a datagram from %s: %s", source, reason)
        return _NOTHING

