"""Events of the sans-IO DHT engine (:mod:`sovereign_discovery.node`): frozen dataclasses with
past-tense names, drained with :meth:`DhtEngine.events() <sovereign_discovery.node.DhtEngine.events>`.

Every command that starts a lookup returns a query ID at once; the events carrying that ID tell
how it ended. A lookup command (``find_node``, ``find_record``, ``find_providers``,
``announce_record``, ``announce_capability``, ``bootstrap``) always ends with one
:class:`LookupFinished`; the commands with a result of their own then add exactly one
:class:`RecordFound`, :class:`ProvidersFound` or :class:`RecordAnnounced` with the same ID. The
direct requests are not lookups: ``ping`` ends with one :class:`PingFinished`, ``fetch_record``
with one :class:`RecordFound`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .addresses import Address
from .keys import NodeId
from .records import PeerRecord
from .routing import Contact

__all__ = [
    "Event",
    "QueryId",
    "LookupFinished",
    "RecordFound",
    "ProvidersFound",
    "RecordAnnounced",
    "PingFinished",
    "ContactAdded",
    "ContactRemoved",
    "ExternalAddressChanged",
]

#: Query IDs are small increasing integers, unique within one engine.
QueryId = int


class Event:
    """Base class of every engine event."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class LookupFinished(Event):
    """The lookup of ``query`` toward ``target`` ended. ``closest`` holds the peers that answered,
    nearest first (at most k); ``timed_out`` says the overall deadline cut it short (``closest``
    is then the best partial result). ``rounds`` is the number of hops, ``requests`` the number
    of requests sent. ``rounds_to_target`` is the round in which a request was first sent to the
    peer whose ID is ``target`` (seeds are round 1), or None if it was never contacted."""

    query: QueryId
    target: NodeId
    closest: tuple[Contact, ...]
    timed_out: bool
    rounds: int
    requests: int
    rounds_to_target: int | None = None


@dataclass(frozen=True, slots=True)
class RecordFound(Event):
    """``find_record`` ended: the verified record of ``node_id`` with the highest ``seq`` seen,
    or None if no peer (nor the local store) held a valid one."""

    query: QueryId
    node_id: NodeId
    record: PeerRecord | None


@dataclass(frozen=True, slots=True)
class ProvidersFound(Event):
    """``find_providers`` ended: verified provider records of ``capability`` (one per provider,
    its highest ``seq``), at most the ``count`` asked for."""

    query: QueryId
    capability: str
    records: tuple[PeerRecord, ...]


@dataclass(frozen=True, slots=True)
class RecordAnnounced(Event):
    """``announce_record`` / ``announce_capability`` ended: ``stored_at`` peers answered STORED."""

    query: QueryId
    stored_at: int


@dataclass(frozen=True, slots=True)
class PingFinished(Event):
    """``ping`` ended: ``contact`` answered over an authenticated session (``rtt_s`` from the
    first send, ``record_seq`` the seq of the record it holds, 0 for none) or not (both None)."""

    query: QueryId
    contact: Contact
    answered: bool
    rtt_s: float | None
    record_seq: int | None


@dataclass(frozen=True, slots=True)
class ContactAdded(Event):
    """``contact`` entered the routing table (it completed a handshake, or was promoted from the
    replacement cache)."""

    contact: Contact


@dataclass(frozen=True, slots=True)
class ContactRemoved(Event):
    """``node_id`` left the routing table (it failed its liveness check)."""

    node_id: NodeId


@dataclass(frozen=True, slots=True)
class ExternalAddressChanged(Event):
    """Most peers that recently reported the address they saw us at (in PONGs) agree on
    ``address``, which differs from what the own record advertised: the record was re-signed
    with it (and is republished)."""

    address: Address
