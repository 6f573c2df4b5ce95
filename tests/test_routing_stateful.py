"""Rule-based test of RoutingTable against a model with one bucket per prefix length.

The model is the textbook table (Kademlia paper §2.2, §4.1): 160 buckets, least-recently-seen
order, a replacement cache, one liveness check at a time per full bucket. With b bits per routing
step (§4.2, ``bucket_bits``) a prefix length ``p`` has one bucket per value of the bits after bit
``p`` up to the end of its b-bit digit. The real table unfolds buckets on demand; this test holds
it to the model's contents, order and results after every step, and to a full-scan oracle for
closest-n. Both kernels are tested, with b = 1, 2 and 3.
"""

from __future__ import annotations

import random
from collections import defaultdict

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from sovereign_discovery import keys
from sovereign_discovery.routing import Full, Inserted, Pending, Rejected, Removed, RoutingTable, Updated

from .helpers import Peer, brute_closest, id_near, model_bucket

K = 3
CACHE = 2


class Model:
    def __init__(self, local: bytes, bits: int = 1) -> None:
        self.local = local
        self.bits = bits
        self.buckets: dict[tuple[int, int], list[Peer]] = defaultdict(list)
        self.cache: dict[tuple[int, int], list[Peer]] = defaultdict(list)
        self.checking: dict[tuple[int, int], Peer] = {}

    def _cpl(self, node_id: bytes) -> tuple[int, int]:
        return model_bucket(self.local, node_id, self.bits)

    def _index(self, bucket: list[Peer], node_id: bytes) -> int:
        return next((i for i, p in enumerate(bucket) if p.node_id == node_id), -1)

    def insert(self, peer: Peer) -> tuple:
        if peer.node_id == self.local:
            return ("Rejected", peer.node_id)
        b = self._cpl(peer.node_id)
        bucket = self.buckets[b]
        i = self._index(bucket, peer.node_id)
        if i >= 0:
            del bucket[i]
            bucket.append(peer)
            if b in self.checking and self.checking[b].node_id == peer.node_id:
                del self.checking[b]
            return ("Updated", peer.node_id)
        if len(bucket) < K:
            self._drop_cached(b, peer.node_id)
            bucket.append(peer)
            return ("Inserted", peer.node_id)
        cache = self.cache[b]
        self._drop_cached(b, peer.node_id)
        cache.append(peer)
        del cache[:-CACHE]
        if b in self.checking:
            return ("Full", peer.node_id, self.checking[b].node_id)
        self.checking[b] = bucket[0]
        return ("Pending", peer.node_id, bucket[0].node_id)

    def _drop_cached(self, b: int, node_id: bytes) -> Peer | None:
        cache = self.cache[b]
        i = self._index(cache, node_id)
        return cache.pop(i) if i >= 0 else None

    def touch(self, node_id: bytes) -> bool:
        if node_id == self.local:
            return False
        b = self._cpl(node_id)
        bucket = self.buckets[b]
        i = self._index(bucket, node_id)
        if i < 0:
            return False
        bucket.append(bucket.pop(i))
        if b in self.checking and self.checking[b].node_id == node_id:
            del self.checking[b]
        return True

    def remove(self, node_id: bytes) -> tuple | None:
        if node_id == self.local:
            return None
        b = self._cpl(node_id)
        bucket = self.buckets[b]
        i = self._index(bucket, node_id)
        if i < 0:
            dropped = self._drop_cached(b, node_id)
            return (dropped.node_id, None) if dropped else None
        gone = bucket.pop(i)
        if b in self.checking and self.checking[b].node_id == node_id:
            del self.checking[b]
        promoted = self.cache[b].pop() if self.cache[b] else None
        if promoted:
            bucket.append(promoted)
        return (gone.node_id, promoted.node_id if promoted else None)

    def contents(self) -> dict[tuple[int, int], list[bytes]]:
        return {b: [p.node_id for p in bucket] for b, bucket in self.buckets.items() if bucket}


def _describe(result) -> tuple:
    if isinstance(result, (Inserted, Updated)):
        return (type(result).__name__, result.contact.node_id)
    if isinstance(result, Pending):
        return ("Pending", result.contact.node_id, result.check.node_id)
    if isinstance(result, Full):
        return ("Full", result.contact.node_id, result.checking.node_id)
    if isinstance(result, Rejected):
        return ("Rejected", result.contact.node_id)
    raise AssertionError(f"unexpected result {result!r}")


def make_machine(kernel_name: str, bits: int = 1):
    class TableMachine(RuleBasedStateMachine):
        @initialize(seed=st.integers(0, 2**32 - 1))
        def setup(self, seed: int) -> None:
            rng = random.Random(seed)
            self.local = bytes(rng.getrandbits(8) for _ in range(20))
            # A pool spread over the keyspace: random IDs (shallow buckets) and IDs that share
            # 100..159 leading bits with the local ID (deep buckets, forcing repeated splits).
            pool = [Peer(bytes(rng.getrandbits(8) for _ in range(20))) for _ in range(16)]
            pool += [Peer(id_near(self.local, rng.randrange(1, 1 << rng.choice((2, 8, 20, 60)))))
                     for _ in range(24)]
            pool.append(Peer(self.local))  # the own ID must always be refused
            self.pool = pool
            self.rng = rng
            self.now = 0.0
            self.table = RoutingTable(self.local, bucket_size=K, replacement_cache_size=CACHE,
                                      kernel=keys.kernel_module(kernel_name), bucket_bits=bits)
            self.model = Model(self.local, bits)

        @rule(i=st.integers(0, 40))
        def insert(self, i: int) -> None:
            peer = self.pool[i % len(self.pool)]
            self.now += 1
            assert _describe(self.table.insert(peer, self.now)) == self.model.insert(peer)

        @precondition(lambda self: len(self.table) > 0)
        @rule(i=st.integers(0, 40))
        def touch(self, i: int) -> None:
            peer = self.pool[i % len(self.pool)]
            self.now += 1
            assert self.table.touch(peer.node_id, self.now) == self.model.touch(peer.node_id)

        @rule(i=st.integers(0, 40))
        def remove(self, i: int) -> None:
            peer = self.pool[i % len(self.pool)]
            self.now += 1
            got = self.table.remove(peer.node_id, self.now)
            expected = self.model.remove(peer.node_id)
            if expected is None:
                assert got is None
            else:
                assert isinstance(got, Removed)
                assert (got.contact.node_id, got.promoted.node_id if got.promoted else None) == expected

        @rule(near=st.booleans(), delta=st.integers(0, 2**64))
        def closest_matches_full_scan(self, near: bool, delta: int) -> None:
            target = id_near(self.local, delta) if near else bytes(self.rng.getrandbits(8) for _ in range(20))
            everything = list(self.table)
            for count in (0, 1, K, 20, len(everything) + 1):
                assert self.table.closest(target, count) == brute_closest(everything, target, count)

        @invariant()
        def matches_model(self) -> None:
            table = self.table
            got: dict[tuple[int, int], list[bytes]] = defaultdict(list)
            for peer in table:
                got[model_bucket(self.local, peer.node_id, bits)].append(peer.node_id)
            assert dict(got) == self.model.contents()
            assert len(table) == sum(len(v) for v in got.values())

        @invariant()
        def buckets_are_well_formed(self) -> None:
            # Buckets in the order of the model's (prefix, bits after it) below the last, which
            # holds every deeper contact; each member is found where it is.
            table = self.table
            last = table.bucket_count - 1
            placed: list[tuple[int, int]] = []
            for index in range(table.bucket_count):
                members = table.bucket(index)
                assert len(members) <= K
                keys_here = {model_bucket(self.local, peer.node_id, bits) for peer in members}
                if index < last:
                    assert len(keys_here) <= 1
                    placed.extend(keys_here)
                else:
                    assert all(key > other for key in keys_here for other in placed)
                for peer in members:
                    assert table.get(peer.node_id) is peer and table.bucket_index(peer.node_id) == index
            assert placed == sorted(placed)

    TableMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=60, deadline=None)
    return TableMachine


TestTablePython = make_machine("python").TestCase
TestTablePythonTwoBits = make_machine("python", 2).TestCase
TestTablePythonThreeBits = make_machine("python", 3).TestCase


def _c_available() -> bool:
    try:
        keys.kernel_module("c")
    except ImportError:
        if keys._flag(keys.REQUIRE_C_ENV):
            raise
        return False
    return True


TestTableC = pytest.mark.skipif(not _c_available(), reason="C kernel not built")(make_machine("c").TestCase)
TestTableCTwoBits = pytest.mark.skipif(not _c_available(), reason="C kernel not built")(make_machine("c", 2).TestCase)
