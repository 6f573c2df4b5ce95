"""The coordinator's peer table: one entry per peer, merged from every layer (DESIGN.md
"Coordinator"; docs/coordinator.md).

An entry holds the peer's verified :class:`~sovereign_discovery.records.PeerRecord` (the highest
``seq`` seen from any layer), the layers currently vouching for it (``sources``), when it was
first and last seen (Unix seconds), the addresses to reach it (those a local layer saw it at
first, then the record's), and the Bluetooth signal strength where a BLE sighting gave one.

Rules:

- Only verified records enter: a ``PeerRecord`` can only be made by ``create`` (signs) or
  ``decode`` (verifies), and :meth:`PeerTable.observe` checks its expiry at ``now`` again.
- A newer record (strictly higher ``seq``) replaces the held one; an older one only refreshes the
  sighting (source, last seen). The record a peer proves with its key is the record that counts.
- A peer is *lost* when the last layer vouching for it withdraws (:meth:`withdraw`), or when its
  record expires (:meth:`expire`).
- Bounded: at most ``max_peers`` entries. A new peer beyond that evicts the least recently seen
  peer that no local layer vouches for (local peers are preferred, DESIGN.md); if every entry is
  local, the least recently seen of all.

This module is pure bookkeeping: no I/O, no clock (``now`` is passed in).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from .addresses import Address
from .errors import ArgumentTypeError, ArgumentValueError
from .identity import encode_public_key
from .keys import NodeId
from .records import PeerRecord, check_capability

__all__ = ["PeerInfo", "PeerTable", "LOCAL_SOURCES", "SOURCES", "DEFAULT_MAX_PEERS"]

#: The layers that see a peer on the local link. Local peers come first in every listing.
LOCAL_SOURCES = frozenset({"mdns", "ble"})
#: Every source name a peer-table entry can carry.
SOURCES = frozenset({"bootstrap", "dht", "cache"}) | LOCAL_SOURCES
DEFAULT_MAX_PEERS = 10_000


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """A peer as the coordinator knows it (a snapshot: the table replaces it on every change)."""

    node_id: NodeId
    record: PeerRecord
    sources: frozenset[str]
    first_seen: float
    last_seen: float
    addresses: tuple[Address, ...]
    rssi: int | None = None
    local_addresses: tuple[Address, ...] = field(default=(), repr=False)

    @property
    def local(self) -> bool:
        """Whether a local layer (mDNS, BLE) currently sees the peer."""
        return not self.sources.isdisjoint(LOCAL_SOURCES)

    def has_capability(self, name: str) -> bool:
        return self.record.has_capability(name)

    def as_dict(self) -> dict:
        """A JSON-ready view (what ``GET /peers`` and ``sovereign-discovery peers --json`` show)."""
        record = self.record
        return {
            "node_id": str(self.node_id),
            "public_key": encode_public_key(record.public_key),
            "sources": sorted(self.sources),
            "local": self.local,
            "first_seen": self.first_seen,
            "last_seen": self.last_seen,
            "addresses": [str(a) for a in self.addresses],
            "capabilities": list(record.capabilities),
            "seq": record.seq,
            "expires_at": record.expires_at,
            "rssi": self.rssi,
        }


def _order_key(peer: PeerInfo) -> tuple:
    """Local peers first, nearer (stronger RSSI) first among them, then most recently seen."""
    rssi = peer.rssi if peer.rssi is not None else -1000
    return (not peer.local, -rssi if peer.local else 0, -peer.last_seen, bytes(peer.node_id))


class PeerTable:
    """The merged peer table. :meth:`observe` and :meth:`withdraw` return what changed, so the
    coordinator can turn it into events."""

    def __init__(self, max_peers: int = DEFAULT_MAX_PEERS) -> None:
        if isinstance(max_peers, bool) or not isinstance(max_peers, int):
            raise ArgumentTypeError(f"max_peers must be an int, not {type(max_peers).__name__}")
        if not 1 <= max_peers <= 10_000_000:
            raise ArgumentValueError(f"max_peers must be in 1..10000000, not {max_peers}")
        self._max = max_peers
        self._peers: dict[bytes, PeerInfo] = {}
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._peers)

    def __iter__(self):
        """The entries in no particular order (``peers()`` sorts)."""
        return iter(self._peers.values())

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._peers

    def get(self, node_id: bytes) -> PeerInfo | None:
        return self._peers.get(bytes(node_id))

    def observe(self, record: PeerRecord, source: str, now: float, *, address: Address | None = None,
                rssi: int | None = None) -> tuple[PeerInfo, bool, PeerInfo | None]:
        """Record that ``source`` vouches for the peer of ``record`` (seen at ``address``, with
        signal ``rssi``, when the layer knows them). Returns ``(peer, is_new, evicted)``:
        the entry after the change, whether the peer was not in the table, and the entry evicted
        to make room (or None). Raises ArgumentValueError for an expired record or an unknown
        source (the coordinator checks both before; these are programming errors)."""
        if not isinstance(record, PeerRecord):
            raise ArgumentTypeError(f"record must be a PeerRecord, not {type(record).__name__}")
        if source not in SOURCES:
            raise ArgumentValueError(f"source must be one of {sorted(SOURCES)}, not {source!r}")
        if record.is_expired(now):
            raise ArgumentValueError(f"record of {record.node_id.short()}… expired at {record.expires_at}")
        key = bytes(record.node_id)
        held = self._peers.get(key)
        local = source in LOCAL_SOURCES
        if held is None:
            evicted = self._make_room()
            local_addresses = (address,) if local and address is not None else ()
            peer = PeerInfo(record.node_id, record, frozenset({source}), now, now,
                            _addresses(local_addresses, record), rssi if source == "ble" else None,
                            local_addresses)
            self._peers[key] = peer
            return peer, True, evicted
        if record.seq > held.record.seq:
            held = replace(held, record=record)
        local_addresses = held.local_addresses
        if local and address is not None and address not in local_addresses:
            local_addresses = (address, *local_addresses)[:4]
        peer = replace(held, sources=held.sources | {source}, last_seen=max(held.last_seen, now),
                       local_addresses=local_addresses, addresses=_addresses(local_addresses, held.record),
                       rssi=rssi if source == "ble" and rssi is not None else held.rssi)
        self._peers[key] = peer
        return peer, False, None

    def withdraw(self, node_id: bytes, source: str) -> tuple[PeerInfo | None, bool]:
        """``source`` no longer vouches for the peer. Returns ``(peer, lost)``: the entry (after
        the change, or as it was if it left the table) and whether it left the table because no
        source is left. ``(None, False)`` for a peer not in the table."""
        key = bytes(node_id)
        held = self._peers.get(key)
        if held is None or source not in held.sources:
            return held, False
        sources = held.sources - {source}
        if not sources:
            del self._peers[key]
            return held, True
        peer = replace(held, sources=sources)
        if source == "ble":
            peer = replace(peer, rssi=None)
        if source in LOCAL_SOURCES and peer.sources.isdisjoint(LOCAL_SOURCES):
            peer = replace(peer, local_addresses=(), addresses=_addresses((), peer.record))
        self._peers[key] = peer
        return peer, False

    def remove(self, node_id: bytes) -> PeerInfo | None:
        return self._peers.pop(bytes(node_id), None)

    def expire(self, now: float) -> list[PeerInfo]:
        """Remove and return the peers whose record has expired at ``now``."""
        gone = [p for p in self._peers.values() if p.record.is_expired(now)]
        for peer in gone:
            del self._peers[bytes(peer.node_id)]
        return gone

    def peers(self, *, capability: str | None = None, source: str | None = None,
              limit: int | None = None) -> list[PeerInfo]:
        """The peers, local first (strongest signal first), then most recently seen; only those
        announcing ``capability`` / vouched for by ``source`` if given."""
        if capability is not None:
            check_capability(capability)
        if source is not None and source not in SOURCES:
            raise ArgumentValueError(f"source must be one of {sorted(SOURCES)}, not {source!r}")
        selected: Iterable[PeerInfo] = self._peers.values()
        if capability is not None:
            selected = (p for p in selected if p.record.has_capability(capability))
        if source is not None:
            selected = (p for p in selected if source in p.sources)
        ordered = sorted(selected, key=_order_key)
        return ordered if limit is None else ordered[:limit]

    def count_by_source(self) -> dict[str, int]:
        counts = dict.fromkeys(sorted(SOURCES), 0)
        for peer in self._peers.values():
            for source in peer.sources:
                counts[source] += 1
        return counts

    def _make_room(self) -> PeerInfo | None:
        if len(self._peers) < self._max:
            return None
        candidates = [p for p in self._peers.values() if not p.local] or list(self._peers.values())
        victim = min(candidates, key=lambda p: (p.last_seen, bytes(p.node_id)))
        del self._peers[bytes(victim.node_id)]
        self.evicted += 1
        return victim


def _addresses(local: tuple[Address, ...], record: PeerRecord) -> tuple[Address, ...]:
    return local + tuple(a for a in record.addresses if a not in local)
