"""The SQLite peer cache: round trips, which record wins, re-verification on read, the cap,
sources, re-seed order, crash safety under SIGKILL, corruption set aside, typed file errors, and a
stateful model test."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import os
import random
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from sovereign_discovery.addresses import Address
from sovereign_discovery.errors import ArgumentTypeError, ArgumentValueError, ClosedError
from sovereign_discovery.identity import Identity
from sovereign_discovery.keys import NodeId
from sovereign_discovery.peer_cache import (
    APPLICATION_ID,
    MAX_BATCH,
    MAX_SOURCES_PER_PEER,
    SCHEMA_VERSION,
    PeerCache,
    PeerCacheError,
    PutResult,
    WrongThreadError,
)
from sovereign_discovery.records import PeerRecord
from sovereign_discovery.routing import Contact

NOW = 1_700_000_000
HOUR = 3600
REPO = Path(__file__).resolve().parent.parent


@functools.lru_cache(maxsize=None)
def identity(i: int) -> Identity:
    return Identity.from_seed(hashlib.sha256(b"peer-cache-test %d" % i).digest())


@functools.lru_cache(maxsize=None)
def record(i: int, seq: int = 1, variant: int = 0, expires_at: int = NOW + HOUR) -> PeerRecord:
    """Peer ``i``'s record number ``seq``; ``variant`` gives other bytes for the same seq."""
    return PeerRecord.create(identity(i), addresses=[Address("192.0.2.1", 1000 + i * 10 + variant)],
                             capabilities=["relay"] if variant else [], seq=seq, expires_at=expires_at)


def nid(i: int) -> NodeId:
    return identity(i).node_id


def raw_sql(path: Path, sql: str, params: tuple = ()) -> list:
    """Run SQL on a closed cache file with a plain sqlite3 connection (the attacker's view)."""
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute(sql, params).fetchall()
        conn.commit()
        return rows
    finally:
        conn.close()


def set_aside_files(path: Path) -> list[Path]:
    return sorted(path.parent.glob(path.name + ".corrupt-*"))


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "peers.sqlite3"


# --- basics -----------------------------------------------------------------------------------


def test_round_trip_across_reopen(path):
    with PeerCache.open(path) as cache:
        assert cache.put(record(1), "dht", NOW) is PutResult.INSERTED
        assert cache.put(record(2, variant=1), "mdns", NOW + 5) is PutResult.INSERTED
        assert len(cache) == 2
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with PeerCache.open(path) as cache:
        peer = cache.get(nid(2), NOW + 10)
        assert peer is not None
        assert peer.record == record(2, variant=1) and peer.record.encode() == record(2, variant=1).encode()
        assert peer.node_id == nid(2) and isinstance(peer.node_id, NodeId)
        assert peer.record.capabilities == ("relay",)
        assert peer.sources == ("mdns",)
        assert (peer.first_seen, peer.last_seen) == (NOW + 5, NOW + 5)
        assert cache.get(nid(3), NOW) is None
        assert [p.node_id for p in cache.peers(NOW + 10)] == [nid(2), nid(1)]
        stats = cache.stats()
        assert stats["peers"] == 2 and stats["set_aside"] == 0 and cache.set_aside is None
        assert stats["schema_version"] == SCHEMA_VERSION
    assert raw_sql(path, "PRAGMA application_id") == [(APPLICATION_ID,)]
    assert raw_sql(path, "PRAGMA journal_mode") == [("wal",)]


def test_newer_seq_wins_older_is_ignored(path):
    with PeerCache.open(path) as cache:
        assert cache.put(record(1, seq=5), "dht", NOW) is PutResult.INSERTED
        assert cache.put(record(1, seq=4), "mdns", NOW + 1) is PutResult.STALE
        assert cache.put(record(1, seq=5, variant=1), "mdns", NOW + 1) is PutResult.STALE
        peer = cache.get(nid(1), NOW + 2)
        # a stale sighting changes nothing, not even last seen or sources
        assert peer.record.seq == 5 and peer.record.capabilities == ()
        assert peer.sources == ("dht",) and peer.last_seen == NOW
        assert cache.put(record(1, seq=5), "dht", NOW + 3) is PutResult.REFRESHED
        assert cache.get(nid(1), NOW + 3).last_seen == NOW + 3
        assert cache.put(record(1, seq=6, variant=1), "mdns", NOW + 4) is PutResult.REPLACED
    with PeerCache.open(path) as cache:
        peer = cache.get(nid(1), NOW + 5)
        assert peer.record == record(1, seq=6, variant=1)
        assert peer.sources == ("dht", "mdns") and (peer.first_seen, peer.last_seen) == (NOW, NOW + 4)
        assert cache.put(record(1, seq=5), "dht", NOW + 6) is PutResult.STALE
        assert cache.get(nid(1), NOW + 6).record.seq == 6
        assert len(cache) == 1


def test_a_tampered_seq_column_cannot_block_updates(path):
    """The comparison is made against the decoded stored record, not a column one could edit."""
    with PeerCache.open(path) as cache:
        cache.put(record(1, seq=1), "dht", NOW)
    raw_sql(path, "UPDATE peers SET expires_at = ?", (2**62,))
    with PeerCache.open(path) as cache:
        assert cache.put(record(1, seq=2), "dht", NOW + 1) is PutResult.REPLACED
        assert cache.get(nid(1), NOW + 1).record.seq == 2


def test_put_rejects_records_not_valid_at_now(path):
    with PeerCache.open(path) as cache:
        assert cache.put(record(1, expires_at=NOW), "dht", NOW) is PutResult.REJECTED
        far = record(2, expires_at=NOW + 30 * 24 * HOUR)  # create() signs it; decode() would refuse
        assert cache.put(far, "dht", NOW) is PutResult.REJECTED
        assert len(cache) == 0
        stats = cache.stats()
        assert stats["rejected_expired"] == 1 and stats["rejected_from_future"] == 1


def test_expired_and_tampered_records_are_skipped_and_counted_on_read(path):
    with PeerCache.open(path) as cache:
        for i in range(5):
            cache.put(record(i, expires_at=NOW + 100 if i == 0 else NOW + HOUR), "dht", NOW + i)
    # flip one byte of peer 1's stored signature, and one inside peer 2's signed body
    (blob1,), = raw_sql(path, "SELECT record FROM peers WHERE node_id = ?", (bytes(nid(1)),))
    flipped = bytearray(blob1)
    flipped[-1] ^= 0x01
    raw_sql(path, "UPDATE peers SET record = ? WHERE node_id = ?", (bytes(flipped), bytes(nid(1))))
    (blob2,), = raw_sql(path, "SELECT record FROM peers WHERE node_id = ?", (bytes(nid(2)),))
    flipped = bytearray(blob2)
    flipped[40] ^= 0x80  # inside seq: still well formed, signature no longer matches
    raw_sql(path, "UPDATE peers SET record = ? WHERE node_id = ?", (bytes(flipped), bytes(nid(2))))
    # peer 3's row carries peer 4's (valid) record: the ID does not match the key
    (blob4,), = raw_sql(path, "SELECT record FROM peers WHERE node_id = ?", (bytes(nid(4)),))
    raw_sql(path, "UPDATE peers SET record = ? WHERE node_id = ?", (blob4, bytes(nid(3))))
    with PeerCache.open(path) as cache:
        assert len(cache) == 5
        got = cache.peers(NOW + 200)  # peer 0 has expired by now
        assert [p.node_id for p in got] == [nid(4)]
        stats = cache.stats()
        assert stats["skipped_expired"] == 1
        assert stats["skipped_bad_signature"] == 2
        assert stats["skipped_wrong_node_id"] == 1
        assert len(cache) == 1  # invalid rows are deleted, so they are counted once
        assert cache.peers(NOW + 200) == got and cache.stats()["skipped_bad_signature"] == 2
        # a valid record of a peer whose stored row was tampered with replaces it
        assert cache.put(record(1), "dht", NOW + 300) is PutResult.INSERTED


def test_get_skips_a_tampered_record(path):
    with PeerCache.open(path) as cache:
        cache.put(record(1, seq=3), "dht", NOW)
    raw_sql(path, "UPDATE peers SET record = substr(record, 1, 60)")  # truncated blob
    with PeerCache.open(path) as cache:
        assert cache.get(nid(1), NOW) is None
        assert cache.stats()["skipped_malformed"] == 1 and len(cache) == 0


def test_a_read_answers_even_when_it_cannot_delete_invalid_rows(path, caplog):
    with PeerCache.open(path) as cache:
        cache.put(record(1, expires_at=NOW + 10), "dht", NOW)
        cache.put(record(2), "dht", NOW)
        cache._conn.execute("PRAGMA query_only = 1")  # every write now fails
        with caplog.at_level(logging.WARNING, logger="sovereign_discovery.peer_cache"):
            assert [p.node_id for p in cache.peers(NOW + 20)] == [nid(2)]
        assert "could not delete 1 invalid records" in caplog.text
        assert cache.stats()["skipped_expired"] == 1 and len(cache) == 2
        with pytest.raises(PeerCacheError, match="cannot write peer cache"):
            cache.put(record(3), "dht", NOW)
        cache._conn.execute("PRAGMA query_only = 0")
        assert [p.node_id for p in cache.peers(NOW + 20)] == [nid(2)] and len(cache) == 1


def test_a_record_from_the_future_is_skipped_but_kept(path):
    """If the clock steps back, a record looks valid too far ahead: skip it, do not delete it."""
    with PeerCache.open(path) as cache:
        cache.put(record(1, expires_at=NOW + 6 * 24 * HOUR), "dht", NOW)
        assert cache.peers(NOW - 2 * 24 * HOUR) == []
        assert cache.stats()["skipped_from_future"] == 1 and len(cache) == 1
        assert [p.node_id for p in cache.peers(NOW)] == [nid(1)]


def test_prune_deletes_expired_rows(path):
    with PeerCache.open(path) as cache:
        cache.put(record(1, expires_at=NOW + 10), "dht", NOW)
        cache.put(record(2, expires_at=NOW + 20), "dht", NOW)
        assert cache.prune(NOW + 10.5) == 1
        assert [p.node_id for p in cache.peers(NOW + 11)] == [nid(2)]
        assert cache.stats()["pruned"] == 1


def test_remove(path):
    with PeerCache.open(path) as cache:
        cache.put(record(1), "dht", NOW)
        assert cache.remove(nid(1)) is True
        assert cache.remove(nid(1)) is False
        assert cache.get(nid(1), NOW) is None and len(cache) == 0
    with PeerCache.open(path) as cache:
        assert len(cache) == 0 and cache.stats()["removed"] == 0


# --- bounds, sources, order ------------------------------------------------------------------


def test_cap_evicts_the_least_recently_seen(path):
    with PeerCache.open(path, max_peers=3) as cache:
        for i in range(3):
            cache.put(record(i), "dht", NOW + i)
        cache.put(record(0), "mdns", NOW + 10)  # peer 0 seen again: now peer 1 is the oldest
        cache.put(record(3), "dht", NOW + 11)
        assert {p.node_id for p in cache.peers(NOW + 12)} == {nid(0), nid(2), nid(3)}
        assert cache.stats()["evicted"] == 1 and len(cache) == 3
        # a peer written with an older time than everyone else is still kept (the others go)
        cache.put(record(4), "dht", NOW + 1)
        assert cache.get(nid(4), NOW + 12) is not None
        assert {p.node_id for p in cache.peers(NOW + 12)} == {nid(0), nid(3), nid(4)}
        for i in range(5, 20):
            cache.put(record(i), "dht", NOW + 100 + i)
        assert len(cache) == 3
        assert [p.node_id for p in cache.peers(NOW + 200)] == [nid(19), nid(18), nid(17)]
    assert raw_sql(path, "SELECT count(*) FROM peers") == [(3,)]
    with PeerCache.open(path, max_peers=2) as cache:  # a smaller cap evicts at once
        assert len(cache) == 2 and cache.stats()["evicted"] == 1
        assert [p.node_id for p in cache.peers(NOW + 200)] == [nid(19), nid(18)]


def test_source_tracking(path):
    with PeerCache.open(path) as cache:
        cache.put(record(1), "mdns", NOW)
        cache.put(record(1), "dht", NOW + 5)
        cache.put(record(1), "mdns", NOW + 7)
        cache.put(record(2), "bootstrap", NOW + 1)
        cache.put(record(3), "ble", NOW + 2)
        peer = cache.get(nid(1), NOW + 10)
        assert peer.sources == ("dht", "mdns")
        assert (peer.first_seen, peer.last_seen) == (NOW, NOW + 7)
        assert [p.node_id for p in cache.peers(NOW, source="mdns")] == [nid(1)]
        assert [p.node_id for p in cache.peers(NOW, source="dht")] == [nid(1)]
        assert [p.node_id for p in cache.peers(NOW, source="bootstrap")] == [nid(2)]
        assert cache.peers(NOW, source="dh") == []  # whole names only
        with pytest.raises(ArgumentValueError, match="source"):
            cache.put(record(1), "mDNS", NOW)
        with pytest.raises(ArgumentTypeError, match="source"):
            cache.put(record(1), None, NOW)
        names = [f"layer{n}" for n in range(MAX_SOURCES_PER_PEER - 2)]
        for name in names:
            cache.put(record(1), name, NOW + 8)
        with pytest.raises(ArgumentValueError, match="at most 8 source names"):
            cache.put(record(1), "onemore", NOW + 9)
        peer = cache.get(nid(1), NOW + 10)
        assert peer.sources == tuple(sorted(["dht", "mdns", *names])) and peer.last_seen == NOW + 8


def test_restart_reseeds_most_recently_seen_first(path):
    rng = random.Random(7)
    seen = {i: NOW + rng.randrange(1000) + i / 100 for i in range(30)}
    with PeerCache.open(path) as cache:
        for i, when in seen.items():
            cache.put(record(i), "dht", when)
    expected = [nid(i) for i in sorted(seen, key=seen.get, reverse=True)]
    with PeerCache.open(path) as cache:  # "after a restart"
        assert [p.node_id for p in cache.peers(NOW + 2000)] == expected
        seed = cache.peers(NOW + 2000, limit=8)
        assert [p.node_id for p in seed] == expected[:8]
        contacts = [Contact(p.record.public_key, p.record.addresses[0]) for p in seed]
        assert [c.node_id for c in contacts] == expected[:8]
        assert cache.peers(NOW, limit=0) == []


def test_put_many_is_one_transaction(path):
    with PeerCache.open(path) as cache:
        results = cache.put_many([(record(1), "dht"), (record(2), "mdns"), (record(1), "mdns")], NOW)
        assert results == [PutResult.INSERTED, PutResult.INSERTED, PutResult.REFRESHED]
        with pytest.raises(ArgumentValueError):  # checked before anything is written
            cache.put_many([(record(3), "dht"), (record(4), "BAD")], NOW)
        assert cache.get(nid(3), NOW) is None
        with pytest.raises(ArgumentValueError, match="at most"):
            cache.put_many(((record(1), "dht") for _ in range(MAX_BATCH + 1)), NOW)
        with pytest.raises(ArgumentTypeError):
            cache.put_many([record(3)], NOW)


def test_disk_full_raises_a_typed_error_and_loses_nothing(path):
    with PeerCache.open(path) as cache:
        cache.put(record(0), "dht", NOW)
        pages = cache._conn.execute("PRAGMA page_count").fetchone()[0]
        cache._conn.execute(f"PRAGMA max_page_count={pages}")  # "the disk is full"
        before = cache.stats()
        with pytest.raises(PeerCacheError, match="peers.sqlite3") as info:
            cache.put_many([(record(i), "dht") for i in range(1, 40)], NOW + 1)
        assert isinstance(info.value, OSError) and info.value.path == path
        assert cache.stats() == before  # counters rolled back with the transaction
        assert [p.node_id for p in cache.peers(NOW + 1)] == [nid(0)]
        cache._conn.execute("PRAGMA max_page_count=1000000")
        assert cache.put(record(1), "dht", NOW + 2) is PutResult.INSERTED
    with PeerCache.open(path) as cache:
        assert len(cache) == 2


# --- caller mistakes, threads, closing -----------------------------------------------------------


def test_argument_errors(path):
    with pytest.raises(ArgumentTypeError, match="path"):
        PeerCache.open(42)
    with pytest.raises(ArgumentValueError, match="path"):
        PeerCache.open(":memory:")
    with pytest.raises(ArgumentValueError, match="max_peers"):
        PeerCache.open(path, max_peers=0)
    with pytest.raises(ArgumentTypeError, match="max_peers"):
        PeerCache.open(path, max_peers=True)
    with pytest.raises(ArgumentValueError, match="synchronous"):
        PeerCache.open(path, synchronous="off")
    with pytest.raises(ArgumentValueError, match="lock_timeout_s"):
        PeerCache.open(path, lock_timeout_s=-1)
    assert not path.exists()  # argument errors come before any file is touched
    with PeerCache.open(path) as cache:
        with pytest.raises(ArgumentTypeError, match="record"):
            cache.put(record(1).encode(), "dht", NOW)
        with pytest.raises(ArgumentTypeError, match="now"):
            cache.put(record(1), "dht", "now")
        with pytest.raises(ArgumentValueError, match="now"):
            cache.peers(float("nan"))
        with pytest.raises(ArgumentValueError, match="node_id"):
            cache.get(b"short", NOW)
        with pytest.raises(ArgumentValueError, match="limit"):
            cache.peers(NOW, limit=-1)


def test_closed_cache_and_wrong_thread(path):
    cache = PeerCache.open(path)
    errors = []

    def other_thread():
        try:
            cache.put(record(1), "dht", NOW)
        except WrongThreadError as exc:
            errors.append(exc)

    worker = threading.Thread(target=other_thread)
    worker.start()
    worker.join(10)
    assert len(errors) == 1 and "another thread" in str(errors[0])
    cache.close()
    cache.close()  # idempotent
    assert cache.closed
    with pytest.raises(ClosedError):
        cache.get(nid(1), NOW)
    with pytest.raises(ClosedError):
        cache.put(record(1), "dht", NOW)


# --- file problems: typed errors, never a set-aside ----------------------------------------------


def test_missing_directory_path_is_a_directory_parent_is_a_file(tmp_path):
    with pytest.raises(PeerCacheError, match="does not exist") as info:
        PeerCache.open(tmp_path / "nope" / "peers.sqlite3")
    assert info.value.path == tmp_path / "nope"
    (tmp_path / "adir").mkdir()
    with pytest.raises(PeerCacheError, match="not a regular file") as info:
        PeerCache.open(tmp_path / "adir")
    assert info.value.path == tmp_path / "adir" and (tmp_path / "adir").is_dir()
    (tmp_path / "afile").write_bytes(b"x")
    with pytest.raises(PeerCacheError, match="afile") as info:
        PeerCache.open(tmp_path / "afile" / "peers.sqlite3")
    assert isinstance(info.value, OSError)
    assert (tmp_path / "afile").read_bytes() == b"x"


def test_a_cache_in_use_by_another_connection_is_refused_not_set_aside(path):
    with PeerCache.open(path) as cache:
        cache.put(record(1), "dht", NOW)
        with pytest.raises(PeerCacheError, match="in use by another process") as info:
            PeerCache.open(path, lock_timeout_s=0.05)
        assert info.value.path == path
        assert set_aside_files(path) == []
        assert cache.get(nid(1), NOW) is not None


def _open_as_other_user(path: Path) -> dict:
    """PeerCache.open(path) in a forked child that cannot override permissions (root drops to
    nobody); the outcome as a dict."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: report, then leave without running any pytest machinery
        try:
            os.close(read_end)
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
            try:
                PeerCache.open(path, lock_timeout_s=0).close()
                out = {"error": None}
            except PeerCacheError as exc:
                out = {"error": "PeerCacheError", "message": str(exc), "path": str(exc.path),
                       "oserror": isinstance(exc, OSError)}
            except BaseException as exc:  # noqa: BLE001 - reported to the parent
                out = {"error": type(exc).__name__, "message": str(exc)}
            os.write(write_end, json.dumps(out).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    chunks = []
    with os.fdopen(read_end, "rb") as reader:
        while chunk := reader.read(65536):
            chunks.append(chunk)
    os.waitpid(pid, 0)
    return json.loads(b"".join(chunks))


@pytest.fixture
def shared_dir():
    """A directory under /tmp that an unprivileged user can reach (tmp_path may not be)."""
    base = Path(tempfile.mkdtemp(prefix="peer-cache-perm-"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        for p in [base, *base.rglob("*")]:
            p.chmod(0o700)
        shutil.rmtree(base)


@pytest.mark.skipif(not hasattr(os, "fork") or os.name != "posix", reason="POSIX permissions")
def test_unreadable_file_gives_a_typed_error_naming_it(shared_dir):
    folder = shared_dir / "open"
    folder.mkdir()
    folder.chmod(0o777)  # the child could rename the file: it must not
    path = folder / "peers.sqlite3"
    with PeerCache.open(path) as cache:
        cache.put(record(1), "dht", NOW)
    path.chmod(0o000)
    out = _open_as_other_user(path)
    assert out["error"] == "PeerCacheError" and out["oserror"], out
    assert out["path"] == str(path) and str(path) in out["message"]
    assert "Permission denied" in out["message"]
    path.chmod(0o600)
    assert set_aside_files(path) == []
    with PeerCache.open(path) as cache:
        assert cache.get(nid(1), NOW) is not None


@pytest.mark.skipif(not hasattr(os, "fork") or os.name != "posix", reason="POSIX permissions")
def test_unwritable_directory_gives_a_typed_error_naming_it(shared_dir):
    folder = shared_dir / "ro"
    folder.mkdir()
    existing = folder / "existing.sqlite3"
    with PeerCache.open(existing) as cache:
        cache.put(record(1), "dht", NOW)
    existing.chmod(0o666)
    folder.chmod(0o555)
    out = _open_as_other_user(folder / "new.sqlite3")  # cannot create the file
    assert out["error"] == "PeerCacheError" and out["path"] == str(folder), out
    assert str(folder) in out["message"]
    out = _open_as_other_user(existing)  # cannot create its write-ahead log
    assert out["error"] == "PeerCacheError" and out["path"] == str(folder), out
    assert "not writable" in out["message"]
    assert not (folder / "new.sqlite3").exists() and set_aside_files(existing) == []


# --- corruption: set aside, never used, never deleted ------------------------------------------


def _valid_cache(path: Path, peers: int = 3) -> None:
    with PeerCache.open(path) as cache:
        cache.put_many([(record(i), "dht") for i in range(peers)], NOW)


def _garbage(path: Path) -> None:
    path.write_bytes(random.Random(1).randbytes(20_000))


def _truncated(path: Path) -> None:
    _valid_cache(path, peers=400)
    size = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.truncate(size // 2)


def _tiny(path: Path) -> None:
    path.write_bytes(b"SQLite format 3\x00\x10")


def _foreign(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")
    conn.execute("INSERT INTO notes (text) VALUES ('my precious data')")
    conn.commit()
    conn.close()


_DIE_MID_TRANSACTION = r"""
import os, sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("PRAGMA cache_size = 1")  # spill changed pages to the file before the commit
conn.execute("BEGIN")
conn.executemany("INSERT INTO notes (text) VALUES (?)", [("x" * 500,)] * 200)
os._exit(0)  # the writer dies: a hot journal stays beside a half-written file
"""


def _foreign_with_hot_journal(path: Path) -> None:
    """A foreign database whose writer died mid-transaction (SQLite would roll it back on open)."""
    _foreign(path)
    subprocess.run([sys.executable, "-c", _DIE_MID_TRANSACTION, str(path)], check=True, timeout=60)
    assert Path(f"{path}-journal").stat().st_size > 0


def _foreign_wal(path: Path, application_id: int = 1234) -> None:
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA application_id = {application_id}")
    conn.execute("CREATE TABLE notes (text TEXT)")
    conn.commit()
    conn.close()


def _foreign_wal_without_id(path: Path) -> None:
    _foreign_wal(path, application_id=0)


def _wrong_version(path: Path) -> None:
    _valid_cache(path)
    raw_sql(path, "PRAGMA user_version = 99")


def _wrong_schema(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    conn.execute("CREATE TABLE peers (node_id BLOB PRIMARY KEY, record BLOB)")
    conn.commit()
    conn.close()


def _damaged_page(path: Path) -> None:
    _valid_cache(path, peers=400)
    size = path.stat().st_size
    with open(path, "r+b") as handle:  # a page in the middle: the header still reads fine
        handle.seek((size // 4096 // 2) * 4096)
        handle.write(random.Random(2).randbytes(4096))


@pytest.mark.parametrize("damage", [_garbage, _truncated, _tiny, _foreign, _foreign_with_hot_journal,
                                    _foreign_wal, _foreign_wal_without_id, _wrong_version,
                                    _wrong_schema, _damaged_page])
def test_an_invalid_file_is_set_aside_and_a_fresh_cache_works(path, damage, caplog):
    damage(path)
    original = path.read_bytes()
    journal = Path(f"{path}-journal")
    original_journal = journal.read_bytes() if journal.exists() else None
    with caplog.at_level(logging.WARNING, logger="sovereign_discovery.peer_cache"):
        cache = PeerCache.open(path)
    with cache:
        aside = cache.set_aside
        assert aside is not None and aside.path == path and aside.reason
        assert cache.stats()["set_aside"] == 1
        assert aside.moved_to.read_bytes() == original  # kept, byte for byte
        if original_journal is not None:  # the hot journal went along, not rolled back
            assert Path(f"{aside.moved_to}-journal").read_bytes() == original_journal
        else:
            assert set_aside_files(path) == [aside.moved_to]
        assert aside.moved_to.name.startswith("peers.sqlite3.corrupt-")
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        message = warnings[0].getMessage()
        assert str(path) in message and str(aside.moved_to) in message
        assert len(cache) == 0
        assert cache.put(record(9), "dht", NOW) is PutResult.INSERTED
    with PeerCache.open(path) as cache:  # the fresh cache is a valid cache
        assert cache.set_aside is None
        assert [p.node_id for p in cache.peers(NOW)] == [nid(9)]
    assert aside.moved_to.read_bytes() == original
    if original_journal is not None:  # the pair is still that database: its recovery works
        assert raw_sql(aside.moved_to, "SELECT text FROM notes") == [("my precious data",)]


def test_set_aside_takes_the_write_ahead_log_along_and_never_overwrites(path):
    _foreign(path)
    Path(f"{path}-wal").write_bytes(b"not really a log")
    with PeerCache.open(path) as first:
        moved = first.set_aside.moved_to
    assert Path(f"{moved}-wal").read_bytes() == b"not really a log"
    _garbage(path)  # again, within the same second most likely
    with PeerCache.open(path) as second:
        assert second.set_aside.moved_to != moved
    assert len(set_aside_files(path)) == 3  # two set-aside files and the first one's -wal
    assert moved.exists()


def test_an_empty_file_beside_a_write_ahead_log_is_set_aside_with_it(path):
    """SQLite would delete a -wal found beside an empty file: set both aside instead."""
    path.write_bytes(b"")
    Path(f"{path}-wal").write_bytes(b"committed frames, perhaps")
    with PeerCache.open(path) as cache:
        assert "write-ahead log" in cache.set_aside.reason
        assert Path(f"{cache.set_aside.moved_to}-wal").read_bytes() == b"committed frames, perhaps"


def test_the_files_a_kill_leaves_before_any_checkpoint_open_as_a_valid_cache(path, tmp_path):
    """Copy a live cache's file and write-ahead log: the state a SIGKILL leaves. The file's own
    header still has application_id 0 (the real one is in the log); that is not corruption."""
    snapshot = tmp_path / "snapshot.sqlite3"
    with PeerCache.open(path) as cache:
        cache.put_many([(record(i), "dht") for i in range(5)], NOW)
        shutil.copyfile(path, snapshot)
        shutil.copyfile(f"{path}-wal", f"{snapshot}-wal")
    assert snapshot.read_bytes()[68:72] == bytes(4)
    with PeerCache.open(snapshot) as cache:
        assert cache.set_aside is None
        assert {p.node_id for p in cache.peers(NOW)} == {nid(i) for i in range(5)}


def test_an_empty_file_is_a_new_cache_not_a_corrupt_one(path):
    path.write_bytes(b"")
    with PeerCache.open(path) as cache:
        assert cache.set_aside is None
        cache.put(record(1), "dht", NOW)
    with PeerCache.open(path) as cache:
        assert len(cache) == 1


# --- crash safety -----------------------------------------------------------------------------

_WRITER = r"""
import sys, time
from sovereign_discovery.addresses import Address
from sovereign_discovery.identity import Identity
from sovereign_discovery.peer_cache import PeerCache
from sovereign_discovery.records import PeerRecord

path, start, synchronous = sys.argv[1], int(sys.argv[2]), sys.argv[3]
cache = PeerCache.open(path, max_peers=1_000_000, synchronous=synchronous)
print("ready", flush=True)
for i in range(start, start + 100_000):  # bounded; the parent kills it long before
    now = time.time()
    # a new peer, then a newer record of an earlier one: inserts and replacements
    for peer, seq in ((i, 1), (i // 2, i + 1)):
        identity = Identity.from_seed(peer.to_bytes(32, "big"))
        record = PeerRecord.create(identity, addresses=[Address("192.0.2.7", 1 + peer % 65535)],
                                   seq=seq, expires_at=int(now) + 3600)
        cache.put(record, "dht", now)
        print(f"{peer} {seq} {identity.node_id}", flush=True)  # only after put returned
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
@pytest.mark.parametrize("synchronous", ["full", "normal"])
def test_sigkill_at_random_points_loses_no_committed_put(path, synchronous):
    """A writer is SIGKILLed at random moments; every put it reported as returned must be there.
    (A kill is a process crash: both settings survive it; only a power cut tells them apart.)"""
    seed = random.randrange(1 << 32)
    rng = random.Random(seed)
    committed: dict[str, int] = {}  # node ID text -> highest seq whose put returned
    start, kills, deadline = 0, 0, time.monotonic() + 60
    while kills < 6 and time.monotonic() < deadline:
        child = subprocess.Popen([sys.executable, "-c", _WRITER, str(path), str(start), synchronous],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
        try:
            assert child.stdout.readline() == b"ready\n", child.stderr.read().decode()
            time.sleep(rng.uniform(0.0, 0.3))  # the random point of the kill
            assert child.poll() is None, "the writer stopped before it was killed"
            child.send_signal(signal.SIGKILL)
            out, err = child.communicate(timeout=30)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        assert child.returncode == -signal.SIGKILL, err.decode()
        kills += 1
        lines = out.decode().split("\n")[:-1]  # complete lines: each printed after its put returned
        for line in lines:
            _, seq, node_id = line.split()
            committed[node_id] = max(committed.get(node_id, 0), int(seq))
        start += len(lines) // 2 + 1
        with PeerCache.open(path) as cache:  # opens cleanly on what the kill left
            assert cache.set_aside is None, f"seed {seed}: {cache.set_aside}"
            held = {str(p.node_id): p.record.seq for p in cache.peers(time.time())}
            stats = cache.stats()
        assert not any(v for k, v in stats.items() if k.startswith("skipped_")), stats
        missing = {k: v for k, v in committed.items() if held.get(k, -1) < v}
        assert not missing, f"seed {seed}: kill {kills} lost committed puts {missing}"
    assert kills == 6 and len(committed) > 6, (kills, len(committed))


def test_asyncio_use_through_one_worker_thread(path):
    """The pattern docs/peer-cache.md recommends: one dedicated thread owns the connection."""

    async def main():
        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="peer-cache") as worker:
            cache = await loop.run_in_executor(worker, PeerCache.open, path)
            try:
                put = await loop.run_in_executor(worker, cache.put, record(1), "dht", NOW)
                seed = await loop.run_in_executor(worker, functools.partial(cache.peers, NOW, limit=8))
                with pytest.raises(WrongThreadError):
                    cache.get(nid(1), NOW)  # from the event loop's thread: refused
            finally:
                await loop.run_in_executor(worker, cache.close)
        return put, seed

    put, seed = asyncio.run(main())
    assert put is PutResult.INSERTED and [p.node_id for p in seed] == [nid(1)]


# --- a stateful model -------------------------------------------------------------------------


class CacheAgainstModel(RuleBasedStateMachine):
    """Random puts, removes and reopens against a dict model of the documented rules."""

    MAX_PEERS = 3

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="peer-cache-model-"))
        self.path = self.dir / "peers.sqlite3"
        self.cache = PeerCache.open(self.path, max_peers=self.MAX_PEERS, synchronous="normal")
        self.model: dict[bytes, dict] = {}
        self.now = float(NOW)

    @rule(peer=st.integers(0, 4), seq=st.integers(0, 3), variant=st.integers(0, 1),
          source=st.sampled_from(["dht", "mdns", "ble"]), dt=st.sampled_from([0, 0.25, 1, 7]))
    def put(self, peer, seq, variant, source, dt):
        self.now += dt
        rec = record(peer, seq, variant)
        key = bytes(rec.node_id)
        held = self.model.get(key)
        if held is None:
            expected = PutResult.INSERTED
            self.model[key] = {"record": rec, "sources": {source}, "first": self.now, "last": self.now}
            if len(self.model) > self.MAX_PEERS:
                victim = min((k for k in self.model if k != key),
                             key=lambda k: (self.model[k]["last"], k))
                del self.model[victim]
        elif held["record"].encoded == rec.encoded or rec.seq > held["record"].seq:
            expected = PutResult.REFRESHED if held["record"].encoded == rec.encoded else PutResult.REPLACED
            held.update(record=rec, first=min(held["first"], self.now), last=max(held["last"], self.now))
            held["sources"].add(source)
        else:
            expected = PutResult.STALE
        assert self.cache.put(rec, source, self.now) is expected

    @rule(peer=st.integers(0, 4))
    def remove(self, peer):
        key = bytes(nid(peer))
        assert self.cache.remove(nid(peer)) is (self.model.pop(key, None) is not None)

    @rule()
    def reopen(self):
        self.cache.close()
        self.cache = PeerCache.open(self.path, max_peers=self.MAX_PEERS, synchronous="normal")
        assert self.cache.set_aside is None

    @invariant()
    def matches_model(self):
        expected = sorted(self.model.items(), key=lambda kv: (kv[1]["last"], kv[0]), reverse=True)
        got = self.cache.peers(self.now)
        assert [bytes(p.node_id) for p in got] == [k for k, _ in expected]
        for peer, (_, m) in zip(got, expected):
            assert peer.record.encoded == m["record"].encoded
            assert peer.sources == tuple(sorted(m["sources"]))
            assert (peer.first_seen, peer.last_seen) == (m["first"], m["last"])
        assert len(self.cache) == len(self.model)

    def teardown(self):
        self.cache.close()
        shutil.rmtree(self.dir)


TestCacheAgainstModel = CacheAgainstModel.TestCase
TestCacheAgainstModel.settings = settings(max_examples=40, stateful_step_count=25, deadline=None,
                                          suppress_health_check=[HealthCheck.too_slow])
