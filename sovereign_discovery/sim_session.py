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
- Left out: handshakes (no WHOAREYOU round trip before the first message to a peer), encryption,
  replay windows, anti-amplification, and the per-peer session table (so no memory per session).
  It is *not* a security mechanism: anything that can put bytes in the simulator with a forged
  source address defeats it. Never use it on a real network; a real driver has no directory.

Frame: ``b"sd" || version (1) || kind 0x7F || sender node ID (20 bytes) || message``. The kind is
one the real layer rejects (``unknown_kind``), so the two can never be confused.
"""

from __future__ import annotations

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

#: The frame kind of simulated sessions (the real layer knows 0, 1 and 2 only).
KIND_SIMULATED = 0x7F
_PREFIX = MAGIC + bytes((VERSION, KIND_SIMULATED))
_HEAD = len(_PREFIX) + NODE_ID_BYTES  # 24

#: Every reason a frame is dropped: the real layer's (so the engine's ``session.*`` drop counters
#: exist; most stay 0) and ``unknown_peer``.
DROP_REASONS = (*REAL_DROP_REASONS, "unknown_peer")

_NOTHING = Received((), ())
_COUNTERS = ("packets_in", "bytes_in", "packets_out", "bytes_out", "delivered", *DROP_REASONS)


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

    __slots__ = ("_id", "_directory", "_stats")

    #: The real layer's limits, for the interface: unused (no per-peer state to bound).
    limits = SessionLimits()

    def __init__(self, identity: Identity, directory: SimulatedDirectory) -> None:
        if not isinstance(identity, Identity):
            raise ArgumentTypeError(f"identity must be an Identity, not {type(identity).__name__}")
        if not isinstance(directory, SimulatedDirectory):
            raise ArgumentTypeError(
                f"directory must be a SimulatedDirectory, not {type(directory).__name__}")
        self._id = bytes(identity.node_id)
        self._directory = directory
        self._stats = Counters(_COUNTERS)  # created on first use

    @property
    def node_id(self) -> bytes:
        return self._id

    @property
    def stats(self) -> dict[str, int]:
        """Counters as the real layer's; ``sessions`` is always 0 (no per-peer state)."""
        out = self._stats.full()
        out["sessions"] = 0
        return out

    def has_session(self, node_id: bytes, address: Address, now: float | None = None) -> bool:
        """Whether the directory has ``node_id`` at ``address`` (a simulated session always
        exists with a registered peer)."""
        contact = self._directory.get(address)
        return contact is not None and contact.node_id == bytes(node_id)

    def send(self, peer: Contact, message: bytes, now: float) -> list[Outgoing]:
        """One frame to ``peer.address`` carrying ``message`` (no handshake, no encryption)."""
        message = check_send(peer, message)
        frame = _PREFIX + self._id + message
        stats = self._stats
        stats["packets_out"] += 1
        stats["bytes_out"] += len(frame)
        return [Outgoing(peer.address, frame)]

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
        if datagram[3] != KIND_SIMULATED:
            return self._drop("unknown_kind")
        contact = self._directory.get(source)
        if contact is None or contact.node_id != datagram[4:_HEAD]:
            return self._drop("unknown_peer")
        stats["delivered"] += 1
        return Received((Delivered(contact, datagram[_HEAD:]),), ())

    def expire(self, now: float) -> None:
        """Nothing to expire (no per-peer state)."""

    def _drop(self, reason: str) -> Received:
        self._stats[reason] += 1
        return _NOTHING
