"""A crypto-free session layer for simulations only: :class:`SimulatedSessionLayer`.

The real :class:`~sovereign_discovery.session.SessionLayer` proves every datagram's sender with an
X25519 handshake signed by the Ed25519 identity and a ChaCha20-Poly1305 tag per datagram. In a
:class:`~sovereign_discovery.testing.SimulatedNetwork` all hosts live in one process and the
simulator delivers every datagram with its true source address, so that proof can come from the
simulator instead: a :class:`SimulatedDirectory` says which contact (public key) lives at which
virtual address, and a frame is delivered only if it arrived from the address the directory binds
to the node ID it claims. What this keeps and what it leaves out:

- Kept: the engine's interface (``send``, ``receive``, ``expire``, ``stats``, ``has_session``,
  ``node_id``, ``limits``), its ``Received``/``Outgoing``/``Delivered`` results, the message size
  limit, and the rule that a message is delivered only from the sender it names (a frame from an
  address the directory does not know, or naming another node ID, is dropped as
  ``unknown_peer``). Network input never raises; drops are counted per reason.
- Round trips as the real layer's, by ``limits.zero_rtt`` (docs/protocol.md): on (the default),
  the first message to a peer goes at once, as the real layer's 0-RTT INITIATE does, and the
  answer comes straight back; no per-peer state is kept. Off, the WHOAREYOU handshake is
  modelled: the first send to a peer without a (simulated) session sends a HELLO frame and queues
  the message; the peer answers a CHALLENGE frame; the queued messages then go. A frame received
  from a peer opens a session with it (the real responder's session after the HANDSHAKE), so
  answers go at once. Sessions (``max_sessions``, least recently used dropped) and queued
  messages (``max_pending_peers`` × ``max_pending_messages_per_peer``, ``pending_ttl_s``) are
  bounded as in the real layer; a lost CHALLENGE is retried after ``handshake_retry_s``.
- Left out: encryption, replay windows, anti-amplification, the 0-RTT guard's refusals (clock,
  cache, rate) and packet sizes (an INITIATE's padding).
  It is *not* a security mechanism: anything that can put bytes in the simulator with a forged
  source address defeats it. Never use it on a real network; a real driver has no directory.

Frame: ``b"sd" || version (1) || kind || sender node ID (20 bytes) || message``, kind 0x7F (a
message), 0x7E (HELLO) or 0x7D (CHALLENGE), kinds the real layer rejects (``unknown_kind``), so the
two can never be confused.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

from .addresses import Address
from .constants import NODE_ID_BYTES
from .counters import Counters
from .errors import ArgumentTypeError
from .identity import Identity
from .routing import Contact
from .session import (
    DROP_REASONS as REAL_DROP_REASONS,
    MAGIC,
    MAX_PACKET_BYTES,
    VERSION,
    Delivered,
    Outgoing,
    Received,
    SessionLimits,
    check_receive,
    check_send,
)
from .wire import intern_contact

__all__ = ["SimulatedSessionLayer", "SimulatedDirectory", "KIND_SIMULATED", "DROP_REASONS"]

#: The frame kind of simulated sessions (the real layer knows 0 to 4 only).
KIND_SIMULATED = 0x7F
_KIND_HELLO = 0x7E  # zero_rtt off: the random packet of the WHOAREYOU handshake
_KIND_CHALLENGE = 0x7D  # zero_rtt off: its WHOAREYOU
_PREFIX = MAGIC + bytes((VERSION, KIND_SIMULATED))
_HELLO = MAGIC + bytes((VERSION, _KIND_HELLO))
_CHALLENGE = MAGIC + bytes((VERSION, _KIND_CHALLENGE))
_HEAD = len(_PREFIX) + NODE_ID_BYTES  # 24

#: Every reason a frame is dropped: the real layer's (so the engine's ``session.*`` drop counters
#: exist; most stay 0) and ``unknown_peer``.
DROP_REASONS = (*REAL_DROP_REASONS, "unknown_peer")

_NOTHING = Received((), ())
_COUNTERS = ("packets_in", "bytes_in", "packets_out", "bytes_out", "delivered", "handshakes_initiated",
             "pending_dropped", "sessions_evicted", *DROP_REASONS)


class SimulatedDirectory:
    """The simulator's trusted map from virtual address to the contact living there (one per
    address; a restarted host registers its new key). Shared by every simulated session layer of
    one network."""

    __slots__ = ("_by_address",)

    def __init__(self) -> None:
        self._by_address: dict[Address, Contact] = {}

    def register(self, contact: Contact) -> None:
        """``contact`` (its key and address) is now the host at ``contact.address``."""
        if not isinstance(contact, Contact):
            raise ArgumentTypeError(f"contact must be a Contact, not {type(contact).__name__}")
        old = self._by_address.get(contact.address)
        if old is not None:
            intern_contact(old, remove=True)
        self._by_address[contact.address] = contact
        intern_contact(contact)  # NODES answers naming it decode to this very object

    def unregister(self, address: Address) -> None:
        old = self._by_address.pop(address, None)
        if old is not None:
            intern_contact(old, remove=True)

    def get(self, address: Address) -> Contact | None:
        return self._by_address.get(address)

    def __len__(self) -> int:
        return len(self._by_address)

    def as_mapping(self) -> Mapping[Address, Contact]:
        return self._by_address


class SimulatedSessionLayer:
    """Same interface as :class:`~sovereign_discovery.session.SessionLayer`, without
    cryptography: authenticity comes from the simulator's :class:`SimulatedDirectory` (see the
    module docstring). Give it to :class:`~sovereign_discovery.node.DhtEngine` as
    ``session_layer=``. Simulations only."""

    __slots__ = ("_id", "_directory", "_stats", "_limits", "_sessions", "_pending")

    def __init__(self, identity: Identity, directory: SimulatedDirectory, *,
                 limits: SessionLimits = SessionLimits()) -> None:
        if not isinstance(identity, Identity):
            raise ArgumentTypeError(f"identity must be an Identity, not {type(identity).__name__}")
        if not isinstance(directory, SimulatedDirectory):
            raise ArgumentTypeError(
                f"directory must be a SimulatedDirectory, not {type(directory).__name__}")
        if not isinstance(limits, SessionLimits):
            raise ArgumentTypeError(f"limits must be SessionLimits, not {type(limits).__name__}")
        self._id = bytes(identity.node_id)
        self._directory = directory
        self._stats = Counters(_COUNTERS)  # created on first use
        self._limits = limits
        #: zero_rtt off only: peers we hold a simulated session with (least recently used first),
        #: and messages waiting for a CHALLENGE: key -> [first queued at, last HELLO at, messages]
        self._sessions: OrderedDict[tuple[bytes, Address], None] = OrderedDict()
        self._pending: OrderedDict[tuple[bytes, Address], list] = OrderedDict()

    @property
    def limits(self) -> SessionLimits:
        """The real layer's limits: ``zero_rtt`` chooses the round trips modelled; with it off,
        the session and queue caps apply."""
        return self._limits

    @property
    def node_id(self) -> bytes:
        return self._id

    def address_proven(self, node_id: bytes, address: Address) -> bool:
        """Always True: the simulated network delivers from the true source, no one spoofs."""
        return True

    @property
    def stats(self) -> dict[str, int]:
        """Counters as the real layer's; ``sessions`` and ``pending_peers`` are 0 unless
        ``zero_rtt`` is off (with it on, no per-peer state is kept)."""
        out = self._stats.full()
        out["sessions"] = len(self._sessions)
        out["pending_peers"] = len(self._pending)
        return out

    def has_session(self, node_id: bytes, address: Address, now: float | None = None) -> bool:
        """Whether the directory has ``node_id`` at ``address`` (a simulated session always
        exists with a registered peer)."""
        contact = self._directory.get(address)
        return contact is not None and contact.node_id == bytes(node_id)

    def send(self, peer: Contact, message: bytes, now: float) -> list[Outgoing]:
        """One frame to ``peer.address`` carrying ``message`` (no encryption); with ``zero_rtt``
        off and no session with ``peer``, a HELLO instead, the message queued."""
        message = check_send(peer, message)
        if not self._limits.zero_rtt:
            key = (bytes(peer.node_id), peer.address)
            if key in self._sessions:
                self._sessions.move_to_end(key)
            else:
                return self._queue(key, message, now)
        return [self._frame(peer.address, _PREFIX, message)]

    def _frame(self, address: Address, prefix: bytes, message: bytes = b"") -> Outgoing:
        frame = prefix + self._id + message
        stats = self._stats
        stats["packets_out"] += 1
        stats["bytes_out"] += len(frame)
        return Outgoing(address, frame)

    def _queue(self, key: tuple[bytes, Address], message: bytes, now: float) -> list[Outgoing]:
        limits, pending = self._limits, self._pending
        entry = pending.get(key)
        if entry is not None and now - entry[0] >= limits.pending_ttl_s:
            self._stats["pending_dropped"] += len(pending.pop(key)[2])
            entry = None
        if entry is None:
            while len(pending) >= limits.max_pending_peers:
                self._stats["pending_dropped"] += len(pending.popitem(last=False)[1][2])
            entry = pending[key] = [now, -float("inf"), []]
        if len(entry[2]) >= limits.max_pending_messages_per_peer:
            del entry[2][0]
            self._stats["pending_dropped"] += 1
        entry[2].append(message)
        if now - entry[1] < limits.handshake_retry_s:
            return []
        entry[1] = now
        return [self._frame(key[1], _HELLO)]

    def _open(self, key: tuple[bytes, Address]) -> None:
        sessions = self._sessions
        sessions[key] = None
        sessions.move_to_end(key)
        while len(sessions) > self._limits.max_sessions:
            sessions.popitem(last=False)
            self._stats["sessions_evicted"] += 1

    def receive(self, datagram: bytes, source: Address, now: float) -> Received:
        """Deliver the frame's message if the directory binds its node ID to ``source``; else
        drop and count it. Never raises for any bytes."""
        datagram = check_receive(datagram, source)
        stats = self._stats
        size = len(datagram)
        stats["packets_in"] += 1
        stats["bytes_in"] += size
        if size > MAX_PACKET_BYTES:
            return self._drop("too_large")
        if size < _HEAD:
            return self._drop("malformed")
        if datagram[:2] != MAGIC:
            return self._drop("bad_magic")
        if datagram[2] != VERSION:
            return self._drop("unknown_version")
        kind = datagram[3]
        if kind != KIND_SIMULATED and (kind not in (_KIND_HELLO, _KIND_CHALLENGE) or size != _HEAD):
            return self._drop("unknown_kind")
        contact = self._directory.get(source)
        if contact is None or contact.node_id != datagram[4:_HEAD]:
            return self._drop("unknown_peer")
        if kind == _KIND_HELLO:  # answered as the real layer answers a random packet
            return Received((), (self._frame(source, _CHALLENGE),))
        key = (bytes(contact.node_id), source)
        if kind == _KIND_CHALLENGE:
            entry = self._pending.pop(key, None)
            if entry is None or now - entry[0] >= self._limits.pending_ttl_s:
                return self._drop("unsolicited_whoareyou")
            self._open(key)
            self._stats["handshakes_initiated"] += 1
            return Received((), tuple(self._frame(source, _PREFIX, m) for m in entry[2]))
        if not self._limits.zero_rtt:
            self._open(key)  # the responder's session after the HANDSHAKE
        stats["delivered"] += 1
        return Received((Delivered(contact, datagram[_HEAD:]),), ())

    def expire(self, now: float) -> None:
        """Drop messages queued past ``pending_ttl_s`` (zero_rtt off; otherwise no state)."""
        pending = self._pending
        while pending:
            key, entry = next(iter(pending.items()))
            if now - entry[0] < self._limits.pending_ttl_s:
                break
            self._stats["pending_dropped"] += len(pending.pop(key)[2])

    def _drop(self, reason: str) -> Received:
        self._stats[reason] += 1
        return _NOTHING
