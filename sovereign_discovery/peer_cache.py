"""The persistent peer cache: verified records of the peers a node has seen, kept in SQLite (the
standard library's ``sqlite3``) so that a restarted node can re-seed its routing table even when
every bootstrap peer is gone. ``docs/peer-cache.md`` is the user guide and gives the reasons.

Use::

    with PeerCache.open("peers.sqlite3", max_peers=10_000) as cache:
        cache.put(record, "mdns", now=time.time())        # -> PutResult
        for peer in cache.peers(time.time(), limit=200):   # most recently seen first
            peer.record, peer.sources, peer.first_seen, peer.last_seen

What is stored, per peer (one row, keyed by node ID)
    The signed record's encoding, the source layers that reported it (``"bootstrap"``,
    ``"mdns"``, ``"ble"``, ``"dht"``, …), and when it was first and last seen (Unix seconds). A
    stored record is trusted no more than bytes from the network: every read decodes it again with
    :meth:`PeerRecord.decode` at the caller's ``now``, so a record that no longer verifies
    (tampered on disk, expired, node ID not matching its key) is skipped, counted in
    :meth:`PeerCache.stats` by reason, deleted (unless it is only "too far ahead", which a clock
    that stepped back explains), and never returned.

Which record wins
    As in the DHT record store: a strictly higher ``seq`` replaces the record held; a lower
    ``seq``, or the same ``seq`` with different bytes, is ``STALE`` and changes nothing (not even
    last seen); the same bytes again is ``REFRESHED`` (last seen, sources). The comparison is made
    against the *decoded* stored record, so a stored row that no longer verifies is replaced by
    any valid record of that peer.

Bounds
    At most ``max_peers`` rows; inserting one more evicts the least recently seen (ties: the
    lowest node ID), never the peer just written. At most ``MAX_SOURCES_PER_PEER`` source names
    per peer. Records are at most ``MAX_RECORD_BYTES``. So the file cannot grow without bound.

Durability
    Write-ahead logging, ``synchronous=FULL`` by default, exclusive locking, one transaction per
    call: when :meth:`put` returns, the entry survives a kill of the process (and, with ``FULL``,
    a power cut). A cache killed mid-write reopens on its last committed state.

Corruption
    :meth:`PeerCache.open` never starts on a file that is not a valid cache: garbage, a truncated
    file, a foreign SQLite database, another schema version, or one failing ``PRAGMA
    quick_check`` (the header is read before SQLite opens the file, since SQLite itself would
    delete a stray ``-wal`` or roll back a foreign hot journal). Such a file (with its ``-wal``/``-shm``/``-journal`` companions) is renamed to
    ``<name>.corrupt-<UTC timestamp>``, never deleted; a WARNING names both paths; an empty cache
    is created in its place; :attr:`PeerCache.set_aside` and ``stats()["set_aside"]`` report it.

Errors
    :class:`PeerCacheError` (also an :class:`OSError`) when the file or its directory cannot be
    used: permissions, not a directory, a directory where the file should be, disk full, I/O
    error, or another process holding the cache; ``path`` names it. A valid file is never set
    aside because of such a problem. :class:`WrongThreadError` when a cache is used from a thread
    other than the one that opened it. Caller mistakes raise
    :class:`~sovereign_discovery.errors.ArgumentTypeError` /
    :class:`~sovereign_discovery.errors.ArgumentValueError` naming the parameter; a closed cache
    raises :class:`~sovereign_discovery.errors.ClosedError`.

Threads and asyncio
    Every call blocks the calling thread (a ``put`` costs about one fsync; figures in the doc).
    The connection belongs to the thread that opened the cache; use it from that thread only
    (the event loop's thread, or one dedicated worker thread).
"""

from __future__ import annotations

import logging
import math
import os
import re
import sqlite3
import stat
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from .errors import (
    ArgumentTypeError,
    ArgumentValueError,
    BadSignatureError,
    ClosedError,
    PeerCacheError,
    RecordError,
    RecordExpiredError,
    RecordFromFutureError,
    WrongThreadError,
)
from .keys import NodeId, check_node_id
from .records import PeerRecord

__all__ = [
    "PeerCache",
    "CachedPeer",
    "PutResult",
    "SetAside",
    "SCHEMA_VERSION",
    "APPLICATION_ID",
    "DEFAULT_MAX_PEERS",
    "MAX_PEERS_LIMIT",
    "MAX_SOURCES_PER_PEER",
    "MAX_BATCH",
    "SOURCE_PATTERN",
]

log = logging.getLogger(__name__)

#: ``PRAGMA application_id`` of a peer cache ("SDPC"): tells our files from other SQLite files.
APPLICATION_ID = 0x53445043
#: ``PRAGMA user_version``: the schema below. A file with another version is set aside.
SCHEMA_VERSION = 1
#: Default cap on cached peers: more than a routing table holds in practice (of its 160 buckets
#: only the farthest ~15 fill); measured 3 MB on disk with typical 155-byte records, 11 MB with
#: records at the 797-byte field maximum.
DEFAULT_MAX_PEERS = 10_000
#: Largest ``max_peers`` accepted (about 1.1 GB with maximal records).
MAX_PEERS_LIMIT = 1_000_000
#: Distinct source names kept per peer (the layers: bootstrap, mdns, ble, dht, …).
MAX_SOURCES_PER_PEER = 8
#: Most sightings one :meth:`PeerCache.put_many` call (one transaction) may carry.
MAX_BATCH = 1_000
#: Source names: a lowercase letter, then up to 15 of ``[a-z0-9_-]``.
SOURCE_PATTERN = re.compile(r"[a-z][a-z0-9_-]{0,15}")
#: After a checkpoint, the WAL file is truncated to at most this size.
_JOURNAL_SIZE_LIMIT_BYTES = 4 * 1024 * 1024
_SYNCHRONOUS = ("full", "normal")
_READ_CHUNK = 64
_HEADER_BYTES = 100  # the SQLite database header (https://sqlite.org/fileformat.html, 1.3)
_SQLITE_MAGIC = b"SQLite format 3\x00"

# The schema. Small columns first and the record last, so scans and the eviction index never touch
# the record bytes. ``expires_at`` copies the record's expiry for prune(); it is only a hint: reads
# decode ``record`` and trust nothing else about it.
_SCHEMA = (
    """CREATE TABLE peers (
        node_id    BLOB    NOT NULL PRIMARY KEY,  -- 20 bytes: SHA-256(public key)[:20]
        expires_at INTEGER NOT NULL,              -- the record's expiry, Unix seconds
        first_seen REAL    NOT NULL,              -- Unix seconds
        last_seen  REAL    NOT NULL,              -- Unix seconds
        sources    TEXT    NOT NULL,              -- sorted distinct layer names, space-separated
        record     BLOB    NOT NULL               -- the signed PeerRecord encoding
    )""",
    "CREATE INDEX peers_by_last_seen ON peers (last_seen, node_id)",
)
_EXPECTED_OBJECTS = {("table", "peers"), ("index", "peers_by_last_seen")}
_EXPECTED_COLUMNS = [  # (name, declared type, not null, primary key position), from table_info
    ("node_id", "BLOB", 1, 1),
    ("expires_at", "INTEGER", 1, 0),
    ("first_seen", "REAL", 1, 0),
    ("last_seen", "REAL", 1, 0),
    ("sources", "TEXT", 1, 0),
    ("record", "BLOB", 1, 0),
]

# Primary result codes (the low byte of an extended code) meaning "this file is not a database".
_SQLITE_CORRUPT = 11
_SQLITE_NOTADB = 26
_SQLITE_BUSY = 5
_SQLITE_LOCKED = 6

# Reasons a stored record is skipped on read; each is a key of stats() ("skipped_<reason>").
_SKIP_REASONS = ("expired", "from_future", "bad_signature", "malformed", "wrong_node_id")
_COUNTERS = (
    "inserted", "replaced", "refreshed", "stale", "rejected_expired", "rejected_from_future",
    "evicted", "removed", "pruned", *(f"skipped_{r}" for r in _SKIP_REASONS),
)


# --- public value types ----------------------------------------------------------------------


class PutResult(Enum):
    """What :meth:`PeerCache.put` did."""

    INSERTED = "inserted"          # a peer not cached before
    REPLACED = "replaced"          # a strictly newer seq (or the stored record no longer verified)
    REFRESHED = "refreshed"        # the same record again: last seen and sources updated
    STALE = "stale"                # an older seq, or the same seq with other bytes: nothing changed
    REJECTED = "rejected"          # the record is not valid at ``now`` (expired, or too far ahead)


@dataclass(frozen=True, slots=True)
class CachedPeer:
    """A cached peer: its record (verified again when read), the layers that reported it, and when
    it was first and last seen (Unix seconds)."""

    node_id: NodeId
    record: PeerRecord
    sources: tuple[str, ...]   # sorted
    first_seen: float
    last_seen: float


@dataclass(frozen=True, slots=True)
class SetAside:
    """A file that was not a valid cache and was moved aside when the cache was opened."""

    path: Path       # where the cache is (now a fresh, empty cache)
    moved_to: Path   # where the bad file is now (its -wal/-shm/-journal beside it, same prefix)
    reason: str


class _NotACache(Exception):
    """Internal: the file exists but is not a valid cache (set it aside)."""


# --- the cache -------------------------------------------------------------------------------


class PeerCache:
    """An SQLite cache of verified peer records. ``PeerCache.open(path)`` (or ``PeerCache(path)``);
    a context manager; :meth:`close` when done. See the module docstring for the rules."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_peers: int = DEFAULT_MAX_PEERS,
        synchronous: str = "full",
        lock_timeout_s: float = 2.0,
    ) -> None:
        if not isinstance(path, (str, os.PathLike)):
            raise ArgumentTypeError(f"path must be a str or a path, not {type(path).__name__}")
        self._path = Path(os.fspath(path))
        if str(self._path) in ("", ":memory:"):
            raise ArgumentValueError(f"path must name a file, not {str(path)!r}")
        self._max_peers = _check_int("max_peers", max_peers, 1, MAX_PEERS_LIMIT)
        if not isinstance(synchronous, str):
            raise ArgumentTypeError(f"synchronous must be a str, not {type(synchronous).__name__}")
        if synchronous.lower() not in _SYNCHRONOUS:
            raise ArgumentValueError(f"synchronous must be 'full' or 'normal', not {synchronous!r}")
        self._synchronous = synchronous.lower()
        if (not isinstance(lock_timeout_s, (int, float)) or isinstance(lock_timeout_s, bool)):
            raise ArgumentTypeError(f"lock_timeout_s must be a number, not {type(lock_timeout_s).__name__}")
        if not (math.isfinite(lock_timeout_s) and 0 <= lock_timeout_s <= 3600):
            raise ArgumentValueError(f"lock_timeout_s must be in 0..3600, not {lock_timeout_s}")
        self._lock_timeout_s = float(lock_timeout_s)
        self._stats: dict[str, int] = dict.fromkeys(_COUNTERS, 0)
        self._thread = threading.get_ident()
        self._conn: sqlite3.Connection | None = None
        self._count = 0
        self.set_aside: SetAside | None = None
        """Set when :meth:`open` found a file that was not a valid cache and moved it aside."""

        try:
            conn = self._connect()
        except _NotACache as bad:
            reason = str(bad)
            moved_to = _move_aside(self._path)
            self.set_aside = SetAside(self._path, moved_to, reason)
            log.warning(
                "peer cache %s is not a valid cache (%s); moved it to %s and started an empty"
                " cache in its place (the old file is kept for inspection; delete it when no"
                " longer needed)", self._path, reason, moved_to,
            )
            try:
                conn = self._connect()
            except _NotACache as again:  # a file we just created: only a broken disk does this
                raise PeerCacheError(
                    f"peer cache {self._path}: a freshly created cache is not valid ({again})",
                    path=self._path) from None
        self._conn = conn
        try:
            self._count = conn.execute("SELECT count(*) FROM peers").fetchone()[0]
            if self._count > self._max_peers:  # reopened with a smaller cap
                with self._transaction():
                    self._evict(keep=None)
        except BaseException:
            self.close()
            raise

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        max_peers: int = DEFAULT_MAX_PEERS,
        synchronous: str = "full",
        lock_timeout_s: float = 2.0,
    ) -> "PeerCache":
        """Open the cache at ``path``, creating it (mode 0600) if missing.

        ``max_peers`` caps the number of peers (the least recently seen are evicted, also at once
        if the file holds more). ``synchronous`` is ``"full"`` (default: a committed entry survives
        a kill and a power cut) or ``"normal"`` (survives a kill; a power cut may roll back the
        last commits). ``lock_timeout_s``: how long to wait for another process holding the file
        before giving up with :class:`PeerCacheError`.

        A file that is not a valid cache is set aside (see :attr:`set_aside`), never used, never
        deleted. Raises :class:`PeerCacheError` when the file or directory cannot be used.
        """
        return cls(path, max_peers=max_peers, synchronous=synchronous, lock_timeout_s=lock_timeout_s)

    # --- properties -------------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        return self._path

    @property
    def max_peers(self) -> int:
        return self._max_peers

    @property
    def closed(self) -> bool:
        return self._conn is None

    def __len__(self) -> int:
        """Rows held (records not yet re-verified; :meth:`peers` may skip some)."""
        self._check_usable()
        return self._count

    def __enter__(self) -> "PeerCache":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._conn is None else f"{self._count} peers"
        return f"PeerCache({str(self._path)!r}, {state}, max_peers={self._max_peers})"

    # --- writing ----------------------------------------------------------------------------------

    def put(self, record: PeerRecord, source: str, now: float) -> PutResult:
        """Record a sighting of ``record`` by the layer ``source`` at Unix time ``now``, in one
        transaction. When this returns, the entry is committed (see the module docstring)."""
        self._check_usable()
        _check_record(record)
        _check_source(source)
        now = _check_now(now)
        with self._transaction():
            return self._put(record, source, now)

    def put_many(self, sightings: Iterable[tuple[PeerRecord, str]], now: float) -> list[PutResult]:
        """:meth:`put` for up to ``MAX_BATCH`` ``(record, source)`` pairs, all in one transaction
        (one fsync): all are committed, or (on an error) none."""
        self._check_usable()
        if isinstance(sightings, (str, bytes)) or not isinstance(sightings, Iterable):
            raise ArgumentTypeError(f"sightings must be an iterable of (record, source) pairs,"
                                    f" not {type(sightings).__name__}")
        batch = []
        for item in sightings:
            if len(batch) == MAX_BATCH:
                raise ArgumentValueError(f"sightings: at most {MAX_BATCH} per call")
            if not isinstance(item, tuple) or len(item) != 2:
                raise ArgumentTypeError("sightings must hold (record, source) pairs")
            _check_record(item[0])
            _check_source(item[1])
            batch.append(item)
        now = _check_now(now)
        with self._transaction():
            return [self._put(record, source, now) for record, source in batch]

    def remove(self, node_id: bytes) -> bool:
        """Forget a peer. True if it was cached."""
        self._check_usable()
        node_id = check_node_id("node_id", node_id)
        with self._transaction():
            removed = self._execute("DELETE FROM peers WHERE node_id = ?", (bytes(node_id),)).rowcount
            self._count -= removed
            self._stats["removed"] += removed
        return bool(removed)

    def prune(self, now: float) -> int:
        """Delete the peers whose stored expiry has passed at ``now``; return how many."""
        self._check_usable()
        now = _check_now(now)
        with self._transaction():
            pruned = self._execute("DELETE FROM peers WHERE expires_at <= ?", (_sql_int(now),)).rowcount
            self._count -= pruned
            self._stats["pruned"] += pruned
        return pruned

    # --- reading ----------------------------------------------------------------------------------

    def get(self, node_id: bytes, now: float) -> CachedPeer | None:
        """The cached peer ``node_id`` if its record still verifies at ``now``, else None (a row
        that no longer verifies is counted and deleted)."""
        self._check_usable()
        node_id = check_node_id("node_id", node_id)
        now = _check_now(now)
        row = self._execute(
            "SELECT node_id, record, sources, first_seen, last_seen FROM peers WHERE node_id = ?",
            (bytes(node_id),)).fetchone()
        if row is None:
            return None
        peer, reason = _verified(row, now)
        if peer is None:
            self._drop_invalid([(row[0], reason)])
        return peer

    def peers(self, now: float, *, limit: int | None = None, source: str | None = None) -> list[CachedPeer]:
        """Cached peers whose records verify at ``now``, most recently seen first (ties: higher
        node ID first); at most ``limit``; only those reported by ``source`` if given. Made to
        re-seed a routing table on restart. Rows that no longer verify are counted and deleted."""
        self._check_usable()
        now = _check_now(now)
        if limit is not None:
            limit = _check_int("limit", limit, 0, MAX_PEERS_LIMIT)
        if source is not None:
            _check_source(source)
        if limit == 0:
            return []
        sql = "SELECT node_id, record, sources, first_seen, last_seen FROM peers"
        params: tuple = ()
        if source is not None:
            sql += " WHERE instr(' ' || sources || ' ', ?) > 0"
            params = (f" {source} ",)
        sql += " ORDER BY last_seen DESC, node_id DESC"
        found: list[CachedPeer] = []
        invalid: list[tuple[bytes, str]] = []
        cursor = self._execute(sql, params)
        try:
            while limit is None or len(found) < limit:
                rows = self._fetch(cursor, _READ_CHUNK)
                if not rows:
                    break
                for row in rows:
                    peer, reason = _verified(row, now)
                    if peer is None:
                        invalid.append((row[0], reason))
                    else:
                        found.append(peer)
                        if len(found) == limit:
                            break
        finally:
            cursor.close()
        if invalid:
            self._drop_invalid(invalid)
        return found

    def stats(self) -> dict[str, int]:
        """Counters: ``peers`` (rows), ``max_peers``, ``schema_version``, ``set_aside`` (1 if this
        open moved a bad file aside), puts by result (``inserted``, ``replaced``, ``refreshed``,
        ``stale``, ``rejected_expired``, ``rejected_from_future``), ``evicted``, ``removed``,
        ``pruned``, and rows skipped on read by reason (``skipped_expired``,
        ``skipped_from_future``, ``skipped_bad_signature``, ``skipped_malformed``,
        ``skipped_wrong_node_id``). Counts since this open."""
        out = dict(self._stats)
        out["peers"] = self._count if self._conn is not None else 0
        out["max_peers"] = self._max_peers
        out["schema_version"] = SCHEMA_VERSION
        out["set_aside"] = int(self.set_aside is not None)
        return out

    def close(self) -> None:
        """Close the cache (checkpointing the WAL into the file). Idempotent."""
        if self._conn is None:
            return
        self._check_thread()
        conn, self._conn = self._conn, None
        try:
            conn.close()
        except sqlite3.Error as exc:  # pragma: no cover - close only checkpoints
            raise _cache_error(self._path, "close", exc) from exc

    # --- internals: opening -------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        """A connection to a valid cache at ``self._path`` (created if missing or empty). Raises
        _NotACache for a file to set aside, PeerCacheError for one that cannot be used."""
        path = _preflight(self._path)
        _check_header(path)
        try:
            conn = sqlite3.connect(str(path), timeout=self._lock_timeout_s, isolation_level=None,
                                   check_same_thread=True)
        except sqlite3.Error as exc:
            raise _cache_error(path, "open", exc) from exc
        try:
            # Exclusive: one process per cache (a second one gets PeerCacheError), and no -shm file.
            conn.execute("PRAGMA locking_mode=EXCLUSIVE")
            # Reading the header: garbage bytes fail here with SQLITE_NOTADB.
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            objects = {(t, n) for t, n in conn.execute(
                "SELECT type, name FROM sqlite_master WHERE name NOT LIKE 'sqlite!_%' ESCAPE '!'")}
            fresh = not objects and app_id == 0 and version == 0
            if not fresh:
                _check_file(conn, app_id, version, objects)
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise PeerCacheError(f"peer cache {path}: cannot use write-ahead logging"
                                     f" (journal mode stays {mode!r})", path=path)
            conn.execute(f"PRAGMA synchronous={self._synchronous.upper()}")
            conn.execute(f"PRAGMA journal_size_limit={_JOURNAL_SIZE_LIMIT_BYTES}")
            if fresh:
                conn.execute("BEGIN IMMEDIATE")
                for statement in _SCHEMA:
                    conn.execute(statement)
                conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
                conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                conn.execute("COMMIT")
        except sqlite3.Error as exc:
            conn.close()
            if _is_corrupt(exc):
                raise _NotACache(f"SQLite: {exc}") from None
            raise _cache_error(path, "open", exc) from exc
        except BaseException:
            conn.close()
            raise
        return conn

    # --- internals: writing -------------------------------------------------------------------

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """One write transaction; counters roll back with it."""
        conn = self._conn
        assert conn is not None
        saved_stats, saved_count = dict(self._stats), self._count
        try:
            conn.execute("BEGIN IMMEDIATE")
            yield
            conn.execute("COMMIT")
        except BaseException as exc:
            self._stats, self._count = saved_stats, saved_count
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:  # pragma: no cover - SQLite rolled back already
                    pass
            if isinstance(exc, sqlite3.Error):
                raise _cache_error(self._path, "write", exc) from exc
            raise

    def _put(self, record: PeerRecord, source: str, now: float) -> PutResult:
        try:
            record.check_time(now)
        except RecordExpiredError:
            self._stats["rejected_expired"] += 1
            return PutResult.REJECTED
        except RecordFromFutureError:
            self._stats["rejected_from_future"] += 1
            return PutResult.REJECTED
        key = bytes(record.node_id)
        row = self._execute("SELECT record, sources, first_seen, last_seen FROM peers WHERE node_id = ?",
                            (key,)).fetchone()
        if row is None:
            self._execute(
                "INSERT INTO peers (node_id, expires_at, first_seen, last_seen, sources, record)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (key, record.expires_at, now, now, source, record.encoded))
            self._count += 1
            self._stats["inserted"] += 1
            if self._count > self._max_peers:
                self._evict(keep=key)
            return PutResult.INSERTED
        stored_bytes, stored_sources, first_seen, last_seen = row
        sources = _merge_sources(stored_sources, source)
        first_seen, last_seen = min(first_seen, now), max(last_seen, now)
        if stored_bytes == record.encoded:
            self._execute("UPDATE peers SET first_seen = ?, last_seen = ?, sources = ? WHERE node_id = ?",
                          (first_seen, last_seen, sources, key))
            self._stats["refreshed"] += 1
            return PutResult.REFRESHED
        try:
            stored = PeerRecord.decode(stored_bytes, now=now)
            still_valid = stored.node_id == record.node_id
        except RecordError:
            still_valid = False
        if still_valid and record.seq <= stored.seq:
            self._stats["stale"] += 1
            return PutResult.STALE
        self._execute(
            "UPDATE peers SET expires_at = ?, first_seen = ?, last_seen = ?, sources = ?, record = ?"
            " WHERE node_id = ?",
            (record.expires_at, first_seen, last_seen, sources, record.encoded, key))
        self._stats["replaced"] += 1
        return PutResult.REPLACED

    def _evict(self, keep: bytes | None) -> None:
        """Delete the least recently seen rows (except ``keep``) down to ``max_peers``."""
        excess = self._count - self._max_peers
        if excess <= 0:
            return
        evicted = self._execute(
            "DELETE FROM peers WHERE node_id IN (SELECT node_id FROM peers WHERE node_id IS NOT ?"
            " ORDER BY last_seen, node_id LIMIT ?)", (keep, excess)).rowcount
        self._count -= evicted
        self._stats["evicted"] += evicted

    def _drop_invalid(self, rows: list[tuple[bytes, str]]) -> None:
        """Count rows that failed verification on read; delete those that can never verify again
        (a record "from the future" is kept: the clock may have stepped back). The deletion is
        best effort: a read still answers if it cannot write (the rows are skipped again later)."""
        for _, reason in rows:
            self._stats[f"skipped_{reason}"] += 1
        log.debug("peer cache %s: %d stored records no longer verify", self._path, len(rows))
        doomed = [(node_id,) for node_id, reason in rows if reason != "from_future"]
        if not doomed:
            return
        try:
            with self._transaction():
                for params in doomed:
                    self._count -= self._execute("DELETE FROM peers WHERE node_id = ?", params).rowcount
        except PeerCacheError as exc:
            log.warning("peer cache %s: could not delete %d invalid records: %s",
                        self._path, len(doomed), exc)

    # --- internals: plumbing ------------------------------------------------------------------

    def _execute(self, sql: str, params: tuple = ()) -> sqlite3.Cursor:
        assert self._conn is not None
        try:
            return self._conn.execute(sql, params)
        except sqlite3.Error as exc:
            if self._conn.in_transaction:
                raise  # _transaction maps it after rolling back
            raise _cache_error(self._path, "read", exc) from exc

    def _fetch(self, cursor: sqlite3.Cursor, size: int) -> list:
        try:
            return cursor.fetchmany(size)
        except sqlite3.Error as exc:
            raise _cache_error(self._path, "read", exc) from exc

    def _check_thread(self) -> None:
        if threading.get_ident() != self._thread:
            raise WrongThreadError(
                f"peer cache {self._path} was opened in another thread; its SQLite connection"
                " may be used only there")

    def _check_usable(self) -> None:
        if self._conn is None:
            raise ClosedError(f"peer cache {self._path} is closed")
        self._check_thread()


# --- helpers ---------------------------------------------------------------------------------


def _check_int(name: str, value: object, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ArgumentTypeError(f"{name} must be an int, not {type(value).__name__}")
    if not low <= value <= high:
        raise ArgumentValueError(f"{name} must be in {low}..{high}, not {value}")
    return value


def _check_now(now: object) -> float:
    if not isinstance(now, (int, float)) or isinstance(now, bool):
        raise ArgumentTypeError(f"now must be Unix seconds (a number), not {type(now).__name__}")
    if not (math.isfinite(now) and 0 <= now < 2**62):
        raise ArgumentValueError(f"now must be finite, non-negative Unix seconds, not {now}")
    return float(now)


def _check_record(record: object) -> None:
    if not isinstance(record, PeerRecord):
        raise ArgumentTypeError(f"record must be a PeerRecord, not {type(record).__name__}")


def _check_source(source: object) -> None:
    if not isinstance(source, str):
        raise ArgumentTypeError(f"source must be a str, not {type(source).__name__}")
    if not SOURCE_PATTERN.fullmatch(source):
        raise ArgumentValueError(
            f"source {source!r} must be a lowercase letter then up to 15 of [a-z0-9_-]"
            " (a layer name: 'bootstrap', 'mdns', 'ble', 'dht')")


def _merge_sources(stored: str, source: str) -> str:
    names = set(stored.split())
    if source in names:
        return stored
    names.add(source)
    if len(names) > MAX_SOURCES_PER_PEER:
        raise ArgumentValueError(
            f"source {source!r}: a peer keeps at most {MAX_SOURCES_PER_PEER} source names,"
            f" and this one has {sorted(names - {source})}")
    return " ".join(sorted(names))


def _sql_int(now: float) -> int:
    return math.floor(now)


def _verified(row: tuple, now: float) -> tuple[CachedPeer | None, str]:
    """Decode a stored row again, as untrusted bytes. (peer, "") or (None, skip reason)."""
    node_id, raw, sources, first_seen, last_seen = row
    if not isinstance(raw, bytes):
        return None, "malformed"
    try:
        record = PeerRecord.decode(raw, now=now)
    except RecordExpiredError:
        return None, "expired"
    except RecordFromFutureError:
        return None, "from_future"
    except BadSignatureError:
        return None, "bad_signature"
    except RecordError:  # malformed or too large
        return None, "malformed"
    if record.node_id != node_id:
        return None, "wrong_node_id"
    if (not isinstance(sources, str) or not isinstance(first_seen, float)
            or not isinstance(last_seen, float)):
        return None, "malformed"
    return CachedPeer(record.node_id, record, tuple(sources.split()), first_seen, last_seen), ""


def _is_corrupt(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB)


def _cache_error(path: Path, action: str, exc: sqlite3.Error) -> PeerCacheError:
    code = getattr(exc, "sqlite_errorcode", None)
    name = getattr(exc, "sqlite_errorname", None) or type(exc).__name__
    if code is not None and code & 0xFF in (_SQLITE_BUSY, _SQLITE_LOCKED):
        return PeerCacheError(f"peer cache {path} is in use by another process ({exc})", path=path)
    if _is_corrupt(exc):
        return PeerCacheError(
            f"peer cache {path} turned out corrupt while in use ({exc}); close it and open it"
            " again: PeerCache.open sets a corrupt file aside", path=path)
    return PeerCacheError(f"cannot {action} peer cache {path}: {exc} ({name})", path=path)


def _preflight(path: Path) -> Path:
    """Typed errors for a file or directory we cannot use, before SQLite gives vaguer ones; creates
    a missing file with mode 0600 (the cache tells who this node talks to). Returns ``path``."""
    directory = path.parent
    try:
        info = os.stat(path)
    except FileNotFoundError:
        info = None
    except OSError as exc:
        where = directory if isinstance(exc, NotADirectoryError) else path
        raise PeerCacheError(f"cannot use peer cache {path}: {exc.strerror}", path=where) from exc
    if info is None:
        if not directory.is_dir():
            raise PeerCacheError(
                f"cannot create peer cache {path}: directory {directory} does not exist",
                path=directory)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        except OSError as exc:
            raise PeerCacheError(f"cannot create peer cache {path}: {exc.strerror}"
                                 f" (directory {directory})", path=directory) from exc
        else:
            os.close(fd)
            _fsync_directory(directory)
        return path
    if not stat.S_ISREG(info.st_mode):
        raise PeerCacheError(f"peer cache {path} is not a regular file", path=path)
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError as exc:
        raise PeerCacheError(f"cannot open peer cache {path} for reading and writing:"
                             f" {exc.strerror}", path=path) from exc
    os.close(fd)
    # SQLite creates path-wal beside the file, so the directory must be writable too.
    if not os.access(directory, os.W_OK | os.X_OK):
        raise PeerCacheError(f"cannot use peer cache {path}: directory {directory} is not writable"
                             " (SQLite keeps its write-ahead log beside the file)", path=directory)
    return path


def _check_header(path: Path) -> None:
    """Raise _NotACache for a file that cannot be a cache, judged from its first 100 bytes alone.

    This runs before SQLite sees the file, because SQLite itself discards data in two cases:
    it deletes a ``-wal`` file found beside an empty database or beside one whose header says it
    is not in WAL mode, and it rolls back a foreign database's hot journal. Every cache is in WAL
    mode from its first byte on, so those files are set aside untouched. The application ID in
    the header is checked only when it is neither 0 nor ours: a cache killed before its first
    checkpoint has ID 0 in the file and the real one in its write-ahead log.
    """
    wal = Path(f"{path}-wal")
    try:
        with open(path, "rb") as handle:
            header = handle.read(_HEADER_BYTES)
        wal_bytes = wal.stat().st_size if wal.exists() else 0
    except OSError as exc:
        raise PeerCacheError(f"cannot read peer cache {path}: {exc.strerror}", path=path) from exc
    if not header:
        if wal_bytes:
            raise _NotACache(f"an empty file beside a {wal_bytes}-byte write-ahead log")
        return  # a new cache
    if len(header) < _HEADER_BYTES:
        raise _NotACache(f"truncated: {len(header)} bytes, shorter than an SQLite header")
    if header[:16] != _SQLITE_MAGIC:
        raise _NotACache("not an SQLite database (no SQLite header)")
    if header[18:20] != b"\x02\x02":
        raise _NotACache("an SQLite database not in WAL mode, so not a peer cache")
    app_id = int.from_bytes(header[68:72], "big")
    if app_id not in (0, APPLICATION_ID):
        raise _NotACache(f"not a peer cache: SQLite application_id is {app_id:#x},"
                         f" not {APPLICATION_ID:#x}")


def _check_file(conn: sqlite3.Connection, app_id: int, version: int, objects: set) -> None:
    """Raise _NotACache unless ``conn`` holds an intact peer cache of this schema version."""
    if app_id != APPLICATION_ID:
        raise _NotACache(f"not a peer cache: SQLite application_id is {app_id:#x},"
                         f" not {APPLICATION_ID:#x}")
    if version != SCHEMA_VERSION:
        raise _NotACache(f"schema version {version}; this library reads version {SCHEMA_VERSION}")
    problems = [row[0] for row in conn.execute("PRAGMA quick_check(5)")]
    if problems != ["ok"]:
        raise _NotACache("quick_check: " + "; ".join(p.replace("\n", " ") for p in problems))
    if objects != _EXPECTED_OBJECTS:
        raise _NotACache(f"unexpected schema objects {sorted(objects)}")
    columns = [(name, type_.upper(), notnull, pk) for _, name, type_, notnull, _, pk
               in conn.execute("PRAGMA table_info(peers)")]
    if columns != _EXPECTED_COLUMNS:
        raise _NotACache(f"unexpected columns {columns}")


def _move_aside(path: Path) -> Path:
    """Rename ``path`` and its SQLite companions to ``<name>.corrupt-<UTC time>[-n]``. The
    companions go first: a stale -wal left beside a new file would be replayed into it."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    suffixes = ("-wal", "-journal", "-shm")
    for n in range(1, 1000):
        target = path.with_name(f"{path.name}.corrupt-{stamp}" + ("" if n == 1 else f"-{n}"))
        if not any(os.path.lexists(f"{target}{s}") for s in ("", *suffixes)):
            break
    else:  # pragma: no cover - a thousand set-aside files in one second
        raise PeerCacheError(f"cannot find a free name to set peer cache {path} aside", path=path)
    try:
        for suffix in suffixes:
            companion = Path(f"{path}{suffix}")
            if os.path.lexists(companion):
                os.rename(companion, f"{target}{suffix}")
        os.rename(path, target)
    except OSError as exc:
        raise PeerCacheError(
            f"peer cache {path} is not a valid cache and cannot be set aside as {target}:"
            f" {exc.strerror}; move it away by hand", path=path) from exc
    _fsync_directory(path.parent)
    return target


def _fsync_directory(directory: Path) -> None:
    """Make a rename or a creation in ``directory`` durable (best effort: not every OS can)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)
