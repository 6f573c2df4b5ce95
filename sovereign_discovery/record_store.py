"""The DHT record store: peer records under keys derived from their node IDs, and provider records
under capability keys. No I/O and no clock: ``now`` is Unix seconds, passed in (records carry Unix
expiry times).

Everything handed in is a verified :class:`~sovereign_discovery.records.PeerRecord` (the engine
decodes and checks the signature first); the store re-checks its validity window at ``now``.
Content problems never raise: they are :class:`~sovereign_discovery.wire.StoreStatus` answers,
counted by reason in :attr:`RecordStore.stats` (the first of each reason is logged at info, the
rest at debug). Caller mistakes raise :class:`~sovereign_discovery.errors.ArgumentTypeError` or
:class:`~sovereign_discovery.errors.ArgumentValueError` naming the parameter.

Rules, with their reasons:

Peer records (STORE, FIND_VALUE)
    A record is accepted only under a key *derived from its own node ID*: index 0 of
    :func:`derived_keys` is the node ID itself; index ``i >= 1`` is the first 20 bytes of
    SHA-256(``"sovereign-discovery/replica\\x00"`` || node ID || ``i`` as u8). With
    ``replicas = 0`` (the default) only the node ID is accepted; ``replicas = r`` also accepts the
    ``r`` replica keys (DESIGN.md, "Replicas at derived keys"). So nobody can park a record under
    someone else's key, and every key holds records of one node only.

Which record wins
    A strictly higher ``seq`` replaces the record held. A lower ``seq`` is ``STALE``. An equal
    ``seq`` with *different* bytes is ``STALE`` too: the first record seen wins, as in libp2p
    (:meth:`PeerRecord.supersedes`); only the owner can sign two such records, and it should bump
    ``seq`` instead. An equal ``seq`` with *identical* bytes is a refresh and answers ``STORED``
    (so a STORE retransmitted after a lost STORE_RESULT does not look like a failure): it changes
    nothing except the replication clock and the retention (below).

Retention
    An entry is kept until ``min(record.expires_at, stored_at + limits.max_ttl_s)`` and never past
    the record's own expiry. A refresh or a replacement moves ``stored_at`` to ``now``. Expired
    entries disappear from every answer at once (a heap of deadlines is drained on every call;
    :meth:`RecordStore.expire` does the same explicitly).

Caps, and why a full store refuses instead of evicting
    Every container is bounded by :class:`StoreLimits`. When a cap is reached, a *new* entry is
    refused with ``STORE_FULL``; established entries are never evicted to make room. Evicting
    (oldest, soonest-expiring or random) would let anyone who can send STOREs flush the good
    records by flooding; refusing means a flood only fills the free space, and the records held
    stay until they expire. A newer ``seq`` for a key already held is always accepted (it does
    not add an entry), with one exception forced by the byte cap: a newer record that is
    *larger* than the one it replaces and does not fit ``max_total_bytes`` is refused with
    ``STORE_FULL`` and the held record stays. (Only the owner can make that happen to its own
    entry; with the default limits the byte cap cannot be reached by peer records alone.)

Per-source quotas
    ``source`` identifies on whose behalf an entry is stored: today the sending peer's node ID,
    later perhaps its IP group; the store treats it as an opaque hashable. An entry is charged to
    the source that *created* it, for as long as it lives: refreshes and replacements by other
    sources do not move the charge (a replacement is always accepted, so it must not depend on
    the new source's quota). ``source=None`` means the local node (its own records, records it
    chose to keep): charged to no quota, still counted by every global cap.

Provider records (ANNOUNCE, GET_PROVIDERS)
    The value under a capability key is the provider's own signed record, and it must list a
    capability ``name`` with ``capability_key(name) == key`` (else ``KEY_NOT_DERIVED``). One entry
    per provider node ID and key; the same seq rules as above. A key holds at most
    ``max_providers_per_key`` providers; when full, a new provider is refused (``STORE_FULL``),
    not swapped for the provider expiring soonest: expiry is chosen by the signer, so "keep those
    that expire last" would let an attacker with a few identities and week-long records push out
    honest providers using the default one-hour TTL, while refusing keeps the established
    providers, who stay as long as they re-announce (a newer seq is always accepted).
    :meth:`RecordStore.providers` answers most recently announced first.

Replication (Kademlia paper §2.5)
    :meth:`RecordStore.due_for_replication` lists the entries not replicated for ``interval_s``
    (oldest first); the engine re-publishes them to the k closest nodes and calls
    :meth:`RecordStore.mark_replicated`. Storing a new entry, a newer seq or an identical refresh
    resets the clock: the paper's optimisation, which assumes that whoever sent the STORE sent it
    to the other k - 1 closest nodes too. Owners republish their own records before expiry; the
    store does not extend anyone's expiry. Provider entries have the same pair of methods.
"""

from __future__ import annotations

import hashlib
import heapq
import logging
import math
from collections.abc import Hashable
from dataclasses import dataclass

from .constants import MAX_RECORD_LIFETIME_S, NODE_ID_BYTES
from .counters import Counters
from .errors import ArgumentTypeError, ArgumentValueError
from .keys import NodeId, check_node_id
from .records import PeerRecord
from .wire import StoreStatus, capability_key

__all__ = [
    "RecordStore",
    "StoreLimits",
    "derived_keys",
    "DROP_REASONS",
    "MAX_REPLICAS",
    "REPLICA_KEY_PREFIX",
]

_log = logging.getLogger(__name__)

#: Domain separation of replica keys: SHA-256(prefix || node ID || i as u8)[:20].
REPLICA_KEY_PREFIX = b"sovereign-discovery/replica\x00"
#: The replica index is one byte.
MAX_REPLICAS = 255

#: Every reason a STORE or ANNOUNCE can be refused, each a key of ``stats``. ``full_*`` name the
#: cap that was reached (all answer ``STORE_FULL``).
DROP_REASONS = (
    "invalid_record",
    "key_not_derived",
    "stale",
    "full_records",
    "full_bytes",
    "full_source",
    "full_provider_keys",
    "full_providers_per_key",
)
_COUNTERS = ("stored", "replaced", "refreshed", "expired")
_STAT_NAMES = (*_COUNTERS, *DROP_REASONS)  # one tuple shared by every store


def derived_keys(node_id: bytes, replicas: int = 0) -> tuple[NodeId, ...]:
    """The keys under which ``node_id``'s record may be stored: ``node_id`` itself, then the first
    20 bytes of SHA-256(:data:`REPLICA_KEY_PREFIX` || node_id || i as u8) for i in 1..replicas."""
    node_id = check_node_id("node_id", node_id)
    replicas = _check_replicas(replicas)
    return (node_id,) + tuple(_replica_key(node_id, i) for i in range(1, replicas + 1))


def _replica_key(node_id: bytes, index: int) -> NodeId:
    digest = hashlib.sha256(REPLICA_KEY_PREFIX + node_id + bytes((index,))).digest()
    return NodeId(digest[:NODE_ID_BYTES])


@dataclass(frozen=True, slots=True)
class StoreLimits:
    """The hard caps of a :class:`RecordStore`. Every one bounds something the network feeds."""

    #: Peer-record entries (one per key held); a STORE for a new key beyond it is STORE_FULL.
    #: Kademlia nodes hold the records of the keys they are among the k closest to, so a few
    #: times k^2 is ample for an honest network.
    max_records: int = 10_000
    #: Sum of the encoded sizes of every record held (peer and provider entries; a record held
    #: under several keys counts each time). 10,000 peer records at the largest possible encoding
    #: (797 bytes) fit, so peer records alone never hit it with the defaults.
    max_total_bytes: int = 16 * 1024 * 1024
    #: Capability keys with at least one provider.
    max_provider_keys: int = 1_000
    #: Providers (distinct node IDs) under one capability key: a GET_PROVIDERS answer never needs
    #: more than a few k of them.
    max_providers_per_key: int = 64
    #: Peer-record entries created on behalf of one source (its node ID, or its IP group): one
    #: sender can fill at most this share of ``max_records``.
    max_records_per_source: int = 100
    #: Provider entries created on behalf of one source.
    max_providers_per_source: int = 100
    #: Longest an entry is kept after it was stored or last refreshed, whatever expiry its record
    #: claims (never longer than the record's own expiry). Default: the longest a record may
    #: claim (MAX_RECORD_LIFETIME_S, a week), i.e. the record's own expiry decides.
    max_ttl_s: float = float(MAX_RECORD_LIFETIME_S)

    def __post_init__(self) -> None:
        for name in self.__slots__:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ArgumentTypeError(f"{name} must be a number, not {type(value).__name__}")
            if name != "max_ttl_s" and not isinstance(value, int):
                raise ArgumentTypeError(f"{name} must be an int, not {type(value).__name__}")
            if not (math.isfinite(value) and value > 0):
                raise ArgumentValueError(f"{name} must be positive and finite, not {value!r}")


class _Entry:
    """One record held: under a key (peer records) or under (capability key, provider ID)."""

    __slots__ = ("record", "source", "keep_until", "replicated_at", "key", "provider_id")

    def __init__(self, record: PeerRecord, source: Hashable, keep_until: float, now: float,
                 key: NodeId, provider_id: NodeId | None) -> None:
        self.record = record
        self.source = source
        self.keep_until = keep_until  # never changed: a new time is a new entry (the heap's order)
        self.replicated_at = now
        self.key = key
        self.provider_id = provider_id

    def __lt__(self, other: "_Entry") -> bool:  # the deadline heap's order
        return self.keep_until < other.keep_until


class RecordStore:
    """Bounded store of peer records and provider records. See the module docstring for the
    rules; ``limits`` gives the caps, ``replicas`` how many replica keys per node ID are accepted
    besides the node ID itself (0..255)."""

    __slots__ = (
        "_limits",
        "_replicas",
        "_records",
        "_providers",
        "_provider_count",
        "_bytes",
        "_record_charges",
        "_provider_charges",
        "_deadlines",
        "_stats",
        "_records_floor",
        "_providers_floor",
    )

    def __init__(self, limits: StoreLimits | None = None, *, replicas: int = 0) -> None:
        if limits is None:
            limits = StoreLimits()
        if not isinstance(limits, StoreLimits):
            raise ArgumentTypeError(f"limits must be a StoreLimits, not {type(limits).__name__}")
        self._limits = limits
        self._replicas = _check_replicas(replicas)
        self._records: dict[NodeId, _Entry] = {}
        #: capability key -> provider node ID -> entry, least recently announced first
        self._providers: dict[NodeId, dict[NodeId, _Entry]] = {}
        self._provider_count = 0
        self._bytes = 0
        self._record_charges: dict[Hashable, int] = {}
        self._provider_charges: dict[Hashable, int] = {}
        #: the entries themselves, a heap by ``keep_until``; one no longer held under its key is
        #: stale (a new retention time makes a new entry) and skipped. No (time, key) tuple per
        #: entry: at 10^6 simulated nodes of ~21 records each, 56 bytes a record count.
        self._deadlines: list[_Entry] = []
        self._stats = Counters(_STAT_NAMES)  # created on first use
        #: at most the oldest ``replicated_at`` of the peer records and of the provider entries:
        #: upkeep asks what is due every 30 s, and until the cutoff passes this, nothing is (no
        #: scan of every entry; a simulator runs 10^6 stores)
        self._records_floor = self._providers_floor = math.inf

    # --- settings and sizes ---------------------------------------------------------------------

    @property
    def limits(self) -> StoreLimits:
        return self._limits

    @property
    def replicas(self) -> int:
        return self._replicas

    def __len__(self) -> int:
        """Entries held: peer records plus provider entries (expired ones not yet drained
        included; call :meth:`expire` first for an exact count at a given time)."""
        return len(self._records) + self._provider_count

    @property
    def stats(self) -> dict[str, int]:
        """Counters (``stored``, ``replaced``, ``refreshed``, ``expired``, and every
        :data:`DROP_REASONS` entry) and current sizes (``records``, ``provider_keys``,
        ``providers``, ``bytes``, ``sources``)."""
        out = self._stats.full()
        out["records"] = len(self._records)
        out["provider_keys"] = len(self._providers)
        out["providers"] = self._provider_count
        out["bytes"] = self._bytes
        out["sources"] = len(self._record_charges.keys() | self._provider_charges.keys())
        return out

    # --- peer records ---------------------------------------------------------------------------

    def put(self, key: bytes, record: PeerRecord, source: Hashable, now: float) -> StoreStatus:
        """Store ``record`` under ``key`` on behalf of ``source`` (STORE). Returns the status to
        answer with; see the module docstring for the rules."""
        key = check_node_id("key", key)
        _check_record(record)
        _check_source(source)
        now = _check_now(now)
        self._drain(now)
        if not _valid_at(record, now):
            return self._refuse("invalid_record", StoreStatus.INVALID_RECORD, record)
        if not self._is_derived(key, record.node_id):
            return self._refuse("key_not_derived", StoreStatus.KEY_NOT_DERIVED, record)
        held = self._records.get(key)
        if held is not None:
            return self._update(held, record, now)
        limits = self._limits
        if _over_quota(self._record_charges, source, limits.max_records_per_source):
            return self._refuse("full_source", StoreStatus.STORE_FULL, record)
        if len(self._records) >= limits.max_records:
            return self._refuse("full_records", StoreStatus.STORE_FULL, record)
        if self._bytes + len(record.encoded) > limits.max_total_bytes:
            return self._refuse("full_bytes", StoreStatus.STORE_FULL, record)
        self._records[key] = self._new_entry(key, None, record, source, now)
        _charge(self._record_charges, source)
        return StoreStatus.STORED

    def get(self, key: bytes, now: float) -> PeerRecord | None:
        """The record held under ``key`` (FIND_VALUE), or None. Expired entries are removed first
        and never returned."""
        key = check_node_id("key", key)
        self._drain(_check_now(now))
        entry = self._records.get(key)
        return None if entry is None else entry.record

    def due_for_replication(self, now: float, interval_s: float,
                            limit: int | None = None) -> list[tuple[NodeId, PeerRecord]]:
        """``(key, record)`` of the peer records not replicated for ``interval_s`` seconds, least
        recently replicated first, at most ``limit`` of them (all if None). Re-publish each to the
        k closest nodes of its key, then call :meth:`mark_replicated` (Kademlia paper §2.5)."""
        now = _check_now(now)
        cutoff = now - _check_interval(interval_s)
        limit = _check_limit(limit)
        self._drain(now)
        if cutoff < self._records_floor:
            return []
        self._records_floor = min((e.replicated_at for e in self._records.values()), default=math.inf)
        due = [(e.replicated_at, key, e.record) for key, e in self._records.items()
               if e.replicated_at <= cutoff]
        due.sort(key=lambda item: (item[0], item[1]))
        return [(key, record) for _, key, record in due[:limit]]

    def mark_replicated(self, key: bytes, now: float) -> bool:
        """Note that the record under ``key`` was re-published at ``now``. False if none is held."""
        key = check_node_id("key", key)
        now = _check_now(now)
        entry = self._records.get(key)
        if entry is None:
            return False
        self._replicated(entry, now)
        return True

    # --- provider records -----------------------------------------------------------------------

    def add_provider(self, capability_key: bytes, record: PeerRecord, source: Hashable,
                     now: float) -> StoreStatus:
        """Hold ``record`` as a provider under ``capability_key`` (ANNOUNCE) on behalf of
        ``source``. Returns the status to answer with; see the module docstring for the rules."""
        key = check_node_id("capability_key", capability_key)
        _check_record(record)
        _check_source(source)
        now = _check_now(now)
        self._drain(now)
        if not _valid_at(record, now):
            return self._refuse("invalid_record", StoreStatus.INVALID_RECORD, record)
        if not _announces(record, key):
            return self._refuse("key_not_derived", StoreStatus.KEY_NOT_DERIVED, record)
        provider_id = record.node_id
        group = self._providers.get(key)
        held = None if group is None else group.get(provider_id)
        if held is not None:
            status = self._update(held, record, now)
            if status is StoreStatus.STORED:
                _to_end(group, provider_id)  # type: ignore[arg-type]
            return status
        limits = self._limits
        if _over_quota(self._provider_charges, source, limits.max_providers_per_source):
            return self._refuse("full_source", StoreStatus.STORE_FULL, record)
        if group is None and len(self._providers) >= limits.max_provider_keys:
            return self._refuse("full_provider_keys", StoreStatus.STORE_FULL, record)
        if group is not None and len(group) >= limits.max_providers_per_key:
            return self._refuse("full_providers_per_key", StoreStatus.STORE_FULL, record)
        if self._bytes + len(record.encoded) > limits.max_total_bytes:
            return self._refuse("full_bytes", StoreStatus.STORE_FULL, record)
        if group is None:
            group = self._providers[key] = {}
        group[provider_id] = self._new_entry(key, provider_id, record, source, now)
        self._provider_count += 1
        _charge(self._provider_charges, source)
        return StoreStatus.STORED

    def providers(self, capability_key: bytes, now: float, count: int) -> list[PeerRecord]:
        """At most ``count`` unexpired provider records under ``capability_key`` (GET_PROVIDERS),
        most recently announced first."""
        key = check_node_id("capability_key", capability_key)
        now = _check_now(now)
        if not isinstance(count, int) or isinstance(count, bool):
            raise ArgumentTypeError(f"count must be an int, not {type(count).__name__}")
        if count < 0:
            raise ArgumentValueError(f"count must be >= 0, not {count}")
        self._drain(now)
        group = self._providers.get(key)
        if not group or count == 0:
            return []
        out: list[PeerRecord] = []
        for entry in reversed(group.values()):
            out.append(entry.record)
            if len(out) == count:
                break
        return out

    def providers_due_for_replication(self, now: float, interval_s: float,
                                      limit: int | None = None) -> list[tuple[NodeId, PeerRecord]]:
        """``(capability_key, record)`` of the provider entries not replicated for ``interval_s``
        seconds, least recently replicated first, at most ``limit`` (all if None). The provider's
        node ID is ``record.node_id``, for :meth:`mark_provider_replicated`."""
        now = _check_now(now)
        cutoff = now - _check_interval(interval_s)
        limit = _check_limit(limit)
        self._drain(now)
        if cutoff < self._providers_floor:
            return []
        self._providers_floor = min((e.replicated_at for group in self._providers.values()
                                     for e in group.values()), default=math.inf)
        due = [(e.replicated_at, key, pid, e.record) for key, group in self._providers.items()
               for pid, e in group.items() if e.replicated_at <= cutoff]
        due.sort(key=lambda item: (item[0], item[1], item[2]))
        return [(key, record) for _, key, _, record in due[:limit]]

    def mark_provider_replicated(self, capability_key: bytes, provider_id: bytes,
                                 now: float) -> bool:
        """Note that ``provider_id``'s entry under ``capability_key`` was re-published at
        ``now``. False if none is held."""
        key = check_node_id("capability_key", capability_key)
        provider_id = check_node_id("provider_id", provider_id)
        now = _check_now(now)
        entry = self._providers.get(key, {}).get(provider_id)
        if entry is None:
            return False
        self._replicated(entry, now)
        return True

    # --- upkeep ---------------------------------------------------------------------------------

    def expire(self, now: float) -> int:
        """Remove every entry whose retention ended at or before ``now``; return how many."""
        now = _check_now(now)
        before = self._stats["expired"]
        self._drain(now)
        return self._stats["expired"] - before

    # --- internals ------------------------------------------------------------------------------

    def _is_derived(self, key: NodeId, node_id: NodeId) -> bool:
        if key == node_id:
            return True
        return any(key == _replica_key(node_id, i) for i in range(1, self._replicas + 1))

    def _keep_until(self, record: PeerRecord, now: float) -> float:
        # the record's own int when it is the sooner (no float per entry: ~500 bytes a node)
        return min(record.expires_at, now + self._limits.max_ttl_s)

    def _new_entry(self, key: NodeId, provider_id: NodeId | None, record: PeerRecord,
                   source: Hashable, now: float) -> _Entry:
        entry = _Entry(record, source, self._keep_until(record, now), now, key, provider_id)
        self._bytes += len(record.encoded)
        self._stats["stored"] += 1
        self._schedule(entry)
        return entry

    def _update(self, held: _Entry, record: PeerRecord, now: float) -> StoreStatus:
        """A record for an entry already held: replace (newer seq), refresh (same bytes) or
        refuse (older, or same seq with other bytes: first seen wins)."""
        old = held.record
        if record.seq > old.seq and record.public_key == old.public_key:
            grown = len(record.encoded) - len(old.encoded)
            if self._bytes + grown > self._limits.max_total_bytes:
                return self._refuse("full_bytes", StoreStatus.STORE_FULL, record)
            self._bytes += grown
            keep_until = self._keep_until(record, now)
            self._stats["replaced"] += 1
        elif record.encoded == old.encoded:
            record = old  # the copy held stays
            keep_until = max(held.keep_until, self._keep_until(record, now))
            self._stats["refreshed"] += 1
        else:
            return self._refuse("stale", StoreStatus.STALE, record)
        if keep_until != held.keep_until:  # a new entry in the same place; the old one is stale
            key, provider_id = held.key, held.provider_id
            held = _Entry(record, held.source, keep_until, now, key, provider_id)
            if provider_id is None:
                self._records[key] = held
            else:
                self._providers[key][provider_id] = held
            self._schedule(held)
        held.record = record
        self._replicated(held, now)  # Kademlia §2.5: the sender stored it at the k closest too
        return StoreStatus.STORED

    def _replicated(self, entry: _Entry, now: float) -> None:
        entry.replicated_at = now
        if entry.provider_id is None:
            self._records_floor = min(self._records_floor, now)
        else:
            self._providers_floor = min(self._providers_floor, now)

    def _schedule(self, entry: _Entry) -> None:
        self._replicated(entry, entry.replicated_at)
        heapq.heappush(self._deadlines, entry)
        # Replacements leave stale items behind; rebuild so the heap stays within twice the
        # number of entries (a hard cap like every other container).
        if len(self._deadlines) > 2 * len(self) + 64:
            heap = list(self._records.values())
            for group in self._providers.values():
                heap.extend(group.values())
            heapq.heapify(heap)
            self._deadlines = heap

    def _drain(self, now: float) -> None:
        """Remove the entries whose retention ended at or before ``now``."""
        heap = self._deadlines
        while heap and heap[0].keep_until <= now:
            entry = heapq.heappop(heap)
            key, provider_id = entry.key, entry.provider_id
            if provider_id is None:
                if self._records.get(key) is entry:
                    del self._records[key]
                    _release(self._record_charges, entry.source)
                    self._bytes -= len(entry.record.encoded)
                    self._stats["expired"] += 1
            else:
                group = self._providers.get(key)
                if group is not None and group.get(provider_id) is entry:
                    del group[provider_id]  # type: ignore[union-attr]
                    if not group:
                        del self._providers[key]
                    self._provider_count -= 1
                    _release(self._provider_charges, entry.source)
                    self._bytes -= len(entry.record.encoded)
                    self._stats["expired"] += 1

    def _refuse(self, reason: str, status: StoreStatus, record: PeerRecord) -> StoreStatus:
        self._stats[reason] += 1
        if self._stats[reason] == 1:
            _log.info("record store: first record refused as %s (%r)", reason, record)
        else:
            _log.debug("record store: refused %r as %s", record, reason)
        return status


# --- helpers -----------------------------------------------------------------------------------


def _to_end(group: dict, provider_id: NodeId) -> None:
    """Move ``provider_id`` to the most-recently-announced end of its (insertion-ordered) dict."""
    group[provider_id] = group.pop(provider_id)


def _over_quota(charges: dict[Hashable, int], source: Hashable, limit: int) -> bool:
    """True if ``source`` may create no more entries (the local node, None, has no quota)."""
    return source is not None and charges.get(source, 0) >= limit


def _charge(charges: dict[Hashable, int], source: Hashable) -> None:
    if source is not None:
        charges[source] = charges.get(source, 0) + 1


def _release(charges: dict[Hashable, int], source: Hashable) -> None:
    if source is not None:
        left = charges[source] - 1
        if left:
            charges[source] = left
        else:
            del charges[source]


def _valid_at(record: PeerRecord, now: float) -> bool:
    """Not expired, and not valid further ahead than MAX_RECORD_LIFETIME_S (records.py)."""
    return now < record.expires_at <= now + MAX_RECORD_LIFETIME_S


def _announces(record: PeerRecord, key: NodeId) -> bool:
    return any(capability_key(name) == key for name in record.capabilities)




def _check_record(value: object) -> None:
    if not isinstance(value, PeerRecord):
        raise ArgumentTypeError(f"record must be a verified PeerRecord, not {type(value).__name__}")


def _check_source(value: object) -> None:
    try:
        hash(value)
    except TypeError:
        raise ArgumentTypeError(f"source must be hashable, not {type(value).__name__}") from None


def _check_now(now: object) -> float:
    if not isinstance(now, (int, float)) or isinstance(now, bool):
        raise ArgumentTypeError(f"now must be Unix seconds (a number), not {type(now).__name__}")
    if not math.isfinite(now):
        raise ArgumentValueError(f"now must be finite, not {now!r}")
    return float(now)


def _check_interval(interval_s: object) -> float:
    if not isinstance(interval_s, (int, float)) or isinstance(interval_s, bool):
        raise ArgumentTypeError(f"interval_s must be a number, not {type(interval_s).__name__}")
    if not (math.isfinite(interval_s) and interval_s >= 0):
        raise ArgumentValueError(f"interval_s must be finite and >= 0, not {interval_s!r}")
    return float(interval_s)


def _check_limit(limit: object) -> int | None:
    if limit is None:
        return None
    if not isinstance(limit, int) or isinstance(limit, bool):
        raise ArgumentTypeError(f"limit must be an int or None, not {type(limit).__name__}")
    if limit < 0:
        raise ArgumentValueError(f"limit must be >= 0, not {limit}")
    return limit


def _check_replicas(replicas: object) -> int:
    if not isinstance(replicas, int) or isinstance(replicas, bool):
        raise ArgumentTypeError(f"replicas must be an int, not {type(replicas).__name__}")
    if not 0 <= replicas <= MAX_REPLICAS:
        raise ArgumentValueError(f"replicas must be in 0..{MAX_REPLICAS}, not {replicas}")
    return replicas
