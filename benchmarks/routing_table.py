#!/usr/bin/env python3
"""Routing-table benchmark: ``RoutingTable`` (C and pure-Python kernels) against PyPI
``kademlia==2.2.3``, plus the global ``KeyspaceIndex`` and the memory a table costs.

Run ``python benchmarks/routing_table.py [--table-size N] [--fill {network,full-buckets}]
[--both-fills] [--network-cap C] [--network-slice-depth D] [--global-size M] [--queries Q]
[--seed S] [--json]``. Every random choice comes from ``random.Random(--seed)``, so a run is
reproducible. Speed is reported, never asserted; only the exactness of our results is checked
(by ``tests/test_benchmark_routing_table.py``).

Two ways to fill a table (``--fill``). ``network`` (the default) models the table of one node in
a network of ``M`` random other nodes: the number of them sharing exactly ``b`` leading bits with
the local ID is Binomial(M, 2^-(b+1)), every such candidate (up to a cap, see 1.) is offered to
each table in one shuffled order, and each table keeps what its own rules allow, so the near
buckets overflow and the deep ones are partly filled, as in a real network; ``M`` is chosen so
that our table is expected to hold about ``--table-size`` contacts. ``full-buckets`` offers
exactly 20 IDs per prefix length 0, 1, 2, … until ``--table-size``: every table then holds
everything, kademlia's bucket splits coincide with ours and its bucket walk looks exact, which
flatters it. ``network`` is the default because realistic tables have partly-filled deep
buckets, which is where a bucket walk returns wrong sets. ``--both-fills`` runs the table part
(steps 1–4) for both fills in one process.

What is measured, and how:

1. **Contacts.** A random local ID, then IDs sharing exactly ``b`` leading bits with it (bit ``b``
   flipped, the rest random) for ``b = 0, 1, 2, …``:

   - ``network``: ``network_size`` (M) is the integer whose expected table size
     ``Σ_b E[min(20, Binomial(M, 2^-(b+1)))]`` is nearest ``--table-size`` (doubling, then
     bisection on that formula, computed exactly). The M nodes are spread over prefix lengths by
     halving: ``Binomial(nodes left, 1/2)`` of them have prefix length ``b`` (so the count is
     Binomial(M, 2^-(b+1)) and the counts add up to M), until none is left; Binomial(n, 1/2) is
     drawn exactly (the set bits of n random bits) for n < 2^22, by a rounded normal draw above.
     Prefix length ``b`` is then cut into ``2^s`` equal slices, ``s`` the bits from ``b + 1`` to
     the next multiple of 5 (``network_slice_depth``), the counts per slice again drawn by
     halving, and at most ``network_slice_cap`` = 40 IDs are made per slice, to bound the work.
     The slices matter: kademlia 2.2.3 splits the bucket holding the local ID and also any bucket
     whose members' common prefix is not a multiple of 5, so a far prefix length becomes up to
     16 kademlia buckets, and a cap on the whole prefix length (say 80) would leave those buckets
     starved and partly filled as they never are in a real network, making kademlia's walk look
     far worse than it is (about 20 % exact on random targets instead of about 100 %; try
     ``--network-slice-depth 1 --network-cap 80``). With at least 20 per slice neither table's
     contents depend on the cap, only replacement caches and liveness checks do. Our table keeps,
     per prefix length, the first 20 offered (the rest go to the replacement cache, the insert
     returning ``Pending``/``Full``): asserted, with the actual count reported as
     ``c_table_size``/``python_table_size``. kademlia keeps what its rules allow
     (``kademlia_table_size``), several times more than ours.
   - ``full-buckets``: twenty IDs per ``b`` until ``--table-size`` IDs exist, a set a table with
     bucket size 20 can hold in full. Ours must hold every ID (asserted).

   Our entries are ``BenchPeer`` objects (a frozen, slotted dataclass with ``node_id: NodeId`` and
   ``address: Address``), not ``Contact``: a ``Contact`` derives its ID from a public key, so IDs
   cannot be chosen. The IDs are inserted in one shuffled order, the same for every
   implementation, into our table with the C kernel, ours with the Python kernel, and kademlia's
   ``RoutingTable`` (entries ``kademlia.node.Node(id, "127.0.0.1", port)``, inserted inside a
   running event loop with a stub protocol whose ``call_ping`` is an async no-op, since
   ``add_contact`` schedules a ping when a bucket is full and cannot split). For kademlia the
   number it holds is reported (``kademlia_table_size``).
2. **Closest-20.** ``--queries`` random targets through the public API: ``table.closest(target,
   20)`` for ours, ``table.find_neighbors(Node(target), k=20)`` for kademlia (the target ``Node``
   objects are made before timing, which favours kademlia slightly). Each target is timed with
   ``time.perf_counter_ns`` around a batch of ``r`` back-to-back calls, ``r`` chosen per
   implementation so that a batch lasts at least ~20 µs; the batch time / ``r`` is one sample.
   The garbage collector is off while timing (as in ``timeit``). Reported: median and p90 in µs,
   and ``speedup_vs_kademlia`` = kademlia median / C median.
3. **Exactness.** For every query, each implementation's answer is compared with a full scan of
   the IDs *that implementation's table holds*, sorted by XOR distance: the same IDs in the same
   order for ours, the same set for kademlia (kademlia's ``find_neighbors`` walks buckets outward
   from the target's and stops after k candidates, so it is approximate). Reported as the fraction
   of queries that match, plus kademlia's mean recall. A random target nearly always falls in one
   of the first few buckets, which (being full) then holds exactly the closest 20, so the same is
   also reported for up to 500 targets spread evenly over every prefix length up to 2 past the
   deepest ID offered (``*_exact_fraction_bucket_targets``): partly filled deep buckets are where a
   bucket walk goes wrong. The random targets are the same for both fills.
4. **Insertion.** All IDs offered (``inserted_ids``; with the ``network`` fill, including those a
   table refuses or parks) into a fresh table, µs per insert call (median of a few repeats).
5. **Global view.** A ``KeyspaceIndex`` of ``--global-size`` random IDs: closest-20 median with
   the C kernel (all queries) and the Python kernel (at most 200 queries), and exactness of both
   against a full scan on at most 50 queries.
6. **Memory.** ``bytes_per_contact``: what a routing table costs per contact, *excluding* the
   entry objects (a simulator shares them between tables). This always uses the
   ``full-buckets`` fill (``memory_fill``), whichever ``--fill`` is chosen, so that every table
   holds exactly ``--table-size`` contacts. The entries of ``--memory-tables`` tables (each with
   its own local ID, filled bucket by bucket to ``--table-size``) are made
   first; then ``tracemalloc`` traces building all the tables, and the growth is divided by the
   number of contacts they hold. ``projected_gib_for_1e6_nodes_400_contacts`` scales that to a
   simulator of a million nodes with 400 contacts each. The same is done for kademlia's table on
   fewer tables (``kademlia_bytes_per_contact``, per contact it holds; its ``Node`` objects are
   pre-made and excluded likewise).

If the C kernel is not built, its figures are ``null``; if kademlia is not installed, its figures
are ``null`` and a message says how to install it. ``--json`` prints exactly one JSON object on
stdout (messages go to stderr); otherwise a readable table. ``fill`` and ``network_size`` (``null``
for ``full-buckets``) say how the tables were filled; with ``--both-fills`` the top-level figures
are those of ``--fill`` and ``by_fill`` holds the figures of steps 1–4 for each fill. ``targets``
says whether each design target was met (``null`` when it could not be measured).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import heapq
import ipaddress
import json
import math
import platform
import random
import statistics
import sys
import time
import tracemalloc
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from sovereign_discovery import keys  # noqa: E402
from sovereign_discovery.addresses import Address  # noqa: E402
from sovereign_discovery.keys import KeyspaceIndex, NodeId  # noqa: E402
from sovereign_discovery.routing import RoutingTable  # noqa: E402

try:
    from kademlia.node import Node as KadNode
    from kademlia.routing import RoutingTable as KadRoutingTable

    KADEMLIA_ERROR: str | None = None
except ImportError as _exc:  # the comparison is optional
    KadNode = KadRoutingTable = None  # type: ignore[assignment,misc]
    KADEMLIA_ERROR = f"{type(_exc).__name__}: {_exc}"

try:
    C_KERNEL = keys.kernel_module("c")
    C_ERROR: str | None = None
except ImportError as _exc:  # KernelUnavailableError is an ImportError
    C_KERNEL = None
    C_ERROR = f"{type(_exc).__name__}: {_exc}"
PY_KERNEL = keys.kernel_module("python")

BUCKET_SIZE = 20
CLOSEST = 20
ID_BITS = 160
ID_BYTES = 20
MIN_BATCH_NS = 20_000
INSERT_REPEATS = 5
GLOBAL_PYTHON_QUERIES = 200
GLOBAL_EXACT_QUERIES = 50
BUCKET_TARGETS = 500
MAX_TABLE_SIZE = BUCKET_SIZE * 155  # bucket 155 still has 2**4 >= 20 IDs to choose from
FILLS = ("network", "full-buckets")
DEFAULT_FILL = "network"
KADEMLIA_SPLIT_DEPTH = 5  # kademlia 2.2.3 splits a far bucket unless its depth % 5 == 0
NETWORK_SLICE_CAP = 2 * BUCKET_SIZE  # network fill: IDs made per slice at most (bounds the work)
EXACT_HALF_MAX_BITS = 22  # Binomial(n, 1/2) exactly for n < 2**22, else normal
MEMORY_FILL = "full-buckets"


def fill_note(fill: str, cap: int = NETWORK_SLICE_CAP) -> str:
    """Two or three sentences on ``fill`` (for the readable output and ``fill_notes``)."""
    if fill == "network":
        return (
            "network: the table of one node among network_size (M) random nodes; prefix length b"
            f" gets Binomial(M, 2^-(b+1)) candidates (at most {cap} made per slice of kademlia's"
            " finest buckets), all offered in one shuffled order, and each table keeps what its"
            " own rules allow, so near buckets overflow and deep ones are partly filled. It is"
            " the default because real tables look like that, and partly-filled deep buckets are"
            " where a bucket walk goes wrong."
        )
    return (
        "full-buckets: exactly 20 IDs per prefix length until --table-size; every table holds"
        " them all and kademlia's splits coincide with ours, which flatters its bucket walk."
    )
KADEMLIA_INSTALL = "pip install 'sovereign-discovery[bench]'"
ENTRY_TYPE = (
    "BenchPeer: frozen slotted dataclass (node_id: NodeId, address: Address); not Contact,"
    " whose node_id is derived from a public key and so cannot be chosen"
)

_LOOPBACK = ipaddress.IPv4Address("127.0.0.1")
_SHARED_ADDRESS = Address(_LOOPBACK, 9)


@dataclass(frozen=True, slots=True)
class BenchPeer:
    """A routing-table entry with a chosen ID (cf. ``tests/helpers.Peer``)."""

    node_id: NodeId
    address: Address


class _StubProtocol:
    """What kademlia's table needs of a protocol: ``call_ping`` as an async no-op."""

    def __init__(self) -> None:
        self.pings = 0

    async def call_ping(self, node: Any) -> None:
        self.pings += 1


# --- IDs ---------------------------------------------------------------------------------------


def _bucket_ids(local: int, b: int, want: int, rng: random.Random) -> list[NodeId]:
    """``want`` distinct random IDs sharing exactly ``b`` leading bits with ``local``."""
    free = ID_BITS - 1 - b
    if (1 << free) < want:
        raise ValueError(f"prefix length {b} has only {1 << free} IDs, not {want}")
    keep = (local >> (ID_BITS - b)) << (ID_BITS - b) if b else 0
    flip = 1 << free
    head = keep | ((local & flip) ^ flip)
    seen: set[int] = set()
    out: list[NodeId] = []
    while len(out) < want:
        value = head | rng.getrandbits(free)
        if value not in seen:
            seen.add(value)
            out.append(NodeId.from_int(value))
    return out


def table_ids(local: int, n: int, rng: random.Random) -> list[NodeId]:
    """``n`` distinct IDs, 20 per shared-prefix length 0, 1, 2, … with ``local``."""
    out: list[NodeId] = []
    b = 0
    while len(out) < n:
        want = min(BUCKET_SIZE, n - len(out))
        if (1 << (ID_BITS - 1 - b)) < want:
            raise ValueError(f"table size {n} is too large: bucket {b} has too few IDs")
        out.extend(_bucket_ids(local, b, want, rng))
        b += 1
    return out


def expected_table_size(m: int, k: int = BUCKET_SIZE) -> float:
    """``Σ_b E[min(k, Binomial(m, 2^-(b+1)))]``: what a table with bucket size ``k`` holds, on
    average, in a network of ``m`` random other nodes (one bucket per prefix length)."""
    total = 0.0
    mf = float(m)
    for b in range(ID_BITS):
        p = 2.0 ** -(b + 1)
        mean = mf * p
        if mean < 1e-12:  # this and every deeper prefix: mean + mean/2 + … < 2 mean
            total += 2 * mean
            break
        if mean > 10 * k + 100:  # P(count < k) is below e^-100
            total += k
            continue
        # E[min(k, X)] = k - Σ_{j<k} (k - j) P(X = j); P(X = j) by the pmf recursion in logs
        # (lgamma(m + 1) - lgamma(m - j + 1) would cancel catastrophically for large m)
        log_q = math.log1p(-p)
        log_ratio = math.log(p) - log_q
        log_pmf = mf * log_q
        short = 0.0
        for j in range(min(k, m + 1)):
            if j:
                log_pmf += math.log((mf - j + 1) / j) + log_ratio
            short += (k - j) * math.exp(log_pmf)
        total += k - short
    return total


def network_size_for(n: int, k: int = BUCKET_SIZE) -> int:
    """The network size ``M`` whose expected table size is nearest ``n`` (the smaller on a tie)."""
    hi = 1
    while expected_table_size(hi, k) < n:
        hi *= 2
    lo = hi // 2  # expected_table_size(lo) < n, or lo == 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if expected_table_size(mid, k) >= n:
            hi = mid
        else:
            lo = mid
    candidates = [m for m in (lo, hi) if m >= 1]
    return min(candidates, key=lambda m: (abs(expected_table_size(m, k) - n), m))


def sample_half(rng: random.Random, n: int) -> int:
    """A draw from Binomial(n, 1/2): exact (the set bits of ``n`` random bits) up to
    ``2**EXACT_HALF_MAX_BITS`` trials, a rounded normal draw clamped to ``0..n`` above that
    (standard deviation >= 2**(EXACT_HALF_MAX_BITS/2 - 1): the difference is immaterial)."""
    if n <= 0:
        return 0
    if n.bit_length() <= EXACT_HALF_MAX_BITS:
        return rng.getrandbits(n).bit_count()
    return min(n, max(0, round(rng.gauss(n / 2, math.sqrt(n) / 2))))


def _split_halves(rng: random.Random, n: int, halvings: int) -> list[int]:
    """``n`` nodes spread uniformly over ``2**halvings`` equal slices: the count in each, in order
    (a multinomial draw, made by halving)."""
    if halvings == 0:
        return [n]
    left = sample_half(rng, n)
    return _split_halves(rng, left, halvings - 1) + _split_halves(rng, n - left, halvings - 1)


def network_ids(
    local: int,
    m: int,
    rng: random.Random,
    cap: int = NETWORK_SLICE_CAP,
    slice_depth: int = KADEMLIA_SPLIT_DEPTH,
) -> tuple[list[NodeId], list[int]]:
    """IDs of a network of ``m`` random other nodes as seen from ``local``, and the number of
    nodes per prefix length (up to the last non-zero one).

    The count with prefix length ``b`` is Binomial(m - (nodes at shorter prefixes), 1/2), so it
    is Binomial(m, 2^-(b+1)) and the counts add up to ``m``; the walk stops when no node is left.
    Prefix length ``b`` is then cut into ``2**s`` equal slices, ``s`` the bits from ``b + 1`` up
    to the next multiple of ``slice_depth`` (kademlia 2.2.3 splits a far bucket until its members
    share a multiple of 5 bits, so these slices are its finest buckets there), and at most ``cap``
    IDs are made per slice. With ``cap >= bucket_size`` neither table's contents depend on the
    cap (both keep the first ``bucket_size`` offered per bucket, in a uniformly shuffled order);
    only replacement caches and liveness checks do."""
    out: list[NodeId] = []
    per_prefix: list[int] = []
    left = m
    for b in range(ID_BITS):
        if left <= 0:
            break
        count = sample_half(rng, left)
        left -= count
        per_prefix.append(count)
        depth = b + 1
        halvings = min((-depth) % slice_depth, ID_BITS - depth)
        slice_free = ID_BITS - depth - halvings
        level_head = (local >> (ID_BITS - depth)) ^ 1  # local's first b bits, then bit b flipped
        for j, in_slice in enumerate(_split_halves(rng, count, halvings) if count else ()):
            want = min(in_slice, cap, 1 << slice_free)
            head = ((level_head << halvings) | j) << slice_free
            seen: set[int] = set()
            while len(seen) < want:
                value = head | rng.getrandbits(slice_free)
                if value not in seen:
                    seen.add(value)
                    out.append(NodeId.from_int(value))
    while per_prefix and per_prefix[-1] == 0:
        per_prefix.pop()
    return out, per_prefix


def prefix_length(local: int, node_id: bytes) -> int:
    """Leading bits ``node_id`` shares with ``local`` (``node_id`` is not ``local``)."""
    return ID_BITS - (local ^ as_int(node_id)).bit_length()


def first_per_prefix(local: int, offered: list[NodeId], k: int) -> set[NodeId]:
    """The first ``k`` IDs of each prefix length in ``offered``: what our table must keep."""
    seen: Counter[int] = Counter()
    kept: set[NodeId] = set()
    for node_id in offered:
        b = prefix_length(local, node_id)
        if seen[b] < k:
            kept.add(node_id)
        seen[b] += 1
    return kept


def id_in_bucket(local: int, b: int, rng: random.Random) -> bytes:
    """A random ID sharing exactly ``b`` leading bits with ``local``."""
    free = ID_BITS - 1 - b
    keep = (local >> (ID_BITS - b)) << (ID_BITS - b) if b else 0
    flip = 1 << free
    return (keep | ((local & flip) ^ flip) | rng.getrandbits(free)).to_bytes(ID_BYTES, "big")


def random_ids(n: int, rng: random.Random) -> list[NodeId]:
    seen: set[int] = set()
    out: list[NodeId] = []
    while len(out) < n:
        value = rng.getrandbits(ID_BITS)
        if value not in seen:
            seen.add(value)
            out.append(NodeId.from_int(value))
    return out


def as_int(node_id: bytes) -> int:
    return int.from_bytes(node_id, "big")


def oracle_closest(ints: list[int], target: bytes, count: int) -> list[int]:
    """Full scan: the ``count`` IDs (as ints) nearest ``target``, nearest first."""
    goal = as_int(target)
    return [d ^ goal for d in heapq.nsmallest(count, [v ^ goal for v in ints])]


# --- timing ------------------------------------------------------------------------------------


def _ours_batch(table: RoutingTable, target: bytes, reps: int) -> int:
    loop = range(reps)
    start = time.perf_counter_ns()
    for _ in loop:
        table.closest(target, CLOSEST)
    return time.perf_counter_ns() - start


def _kademlia_batch(table: Any, target: Any, reps: int) -> int:
    loop = range(reps)
    start = time.perf_counter_ns()
    for _ in loop:
        table.find_neighbors(target, k=CLOSEST)
    return time.perf_counter_ns() - start


def _index_batch(index: KeyspaceIndex, target: bytes, reps: int) -> int:
    loop = range(reps)
    start = time.perf_counter_ns()
    for _ in loop:
        index.closest(target, CLOSEST)
    return time.perf_counter_ns() - start


def time_per_call(
    batch: Callable[[Any, Any, int], int], subject: Any, targets: list, min_batch_ns: int
) -> tuple[list[float], int]:
    """Per-call ns for each target (one batch of ``reps`` calls each), and ``reps``."""
    probe = targets[: min(len(targets), 20)]
    for target in probe:  # warm-up
        batch(subject, target, 1)
    estimate = max(1.0, min(batch(subject, t, 1) for t in probe))
    reps = max(1, math.ceil(min_batch_ns / estimate))
    enabled = gc.isenabled()
    gc.disable()
    try:
        samples = [batch(subject, target, reps) / reps for target in targets]
    finally:
        if enabled:
            gc.enable()
    return samples, reps


def summary_us(samples_ns: list[float]) -> tuple[float, float]:
    """(median, p90) in µs."""
    ordered = sorted(samples_ns)
    median = statistics.median(ordered)
    p90 = statistics.quantiles(ordered, n=10, method="inclusive")[8] if len(ordered) > 1 else median
    return round(median / 1000, 4), round(p90 / 1000, 4)


# --- the implementations -----------------------------------------------------------------------


def build_ours(
    local: NodeId, entries: list[BenchPeer], kernel: Any, results: Counter[str] | None = None
) -> RoutingTable:
    """Insert every entry (no liveness check is ever answered); ``results`` counts the
    ``InsertResult`` kinds (``Inserted``, ``Pending``, ``Full``, …)."""
    table = RoutingTable(local, bucket_size=BUCKET_SIZE, kernel=kernel)
    for entry in entries:
        result = table.insert(entry, 0.0)
        if results is not None:
            results[type(result).__name__] += 1
    return table


def time_ours_insert(
    local: NodeId, entries: list[BenchPeer], kernel: Any, repeats: int, held: int
) -> float:
    """Median µs per insert call over ``repeats`` fresh tables (each must end holding ``held``)."""
    per_insert = []
    for _ in range(repeats):
        table = RoutingTable(local, bucket_size=BUCKET_SIZE, kernel=kernel)
        start = time.perf_counter_ns()
        for entry in entries:
            table.insert(entry, 0.0)
        per_insert.append((time.perf_counter_ns() - start) / len(entries))
        assert len(table) == held
    return round(statistics.median(per_insert) / 1000, 4)


def kademlia_contents(table: Any) -> list[Any]:
    return [node for bucket in table.buckets for node in bucket.nodes.values()]


async def _kademlia_build(local: bytes, nodes: list[Any], repeats: int) -> dict[str, Any]:
    """Inside a running loop: one table to query, and the insert timing on fresh tables."""
    protocol = _StubProtocol()
    local_node = KadNode(local, "127.0.0.1", 9000)
    table = KadRoutingTable(protocol, BUCKET_SIZE, local_node)
    for node in nodes:
        table.add_contact(node)
    await asyncio.sleep(0)  # let the scheduled no-op pings run (each counts itself)
    pings_one_table = protocol.pings
    per_insert = []
    for _ in range(repeats):
        fresh = KadRoutingTable(protocol, BUCKET_SIZE, local_node)
        start = time.perf_counter_ns()
        for node in nodes:
            fresh.add_contact(node)
        per_insert.append((time.perf_counter_ns() - start) / len(nodes))
        await asyncio.sleep(0)
    await asyncio.sleep(0)
    return {
        "table": table,
        "pings": pings_one_table,
        "insert_us": round(statistics.median(per_insert) / 1000, 4),
    }


# --- the phases --------------------------------------------------------------------------------


def fill_ids(
    fill: str,
    local: int,
    n: int,
    rng: random.Random,
    cap: int = NETWORK_SLICE_CAP,
    slice_depth: int = KADEMLIA_SPLIT_DEPTH,
) -> tuple[list[NodeId], dict[str, Any]]:
    """The IDs to offer for ``fill``, and what describes them."""
    if fill == "full-buckets":
        return table_ids(local, n, rng), {
            "network_size": None,
            "network_expected_table_size": None,
            "network_slice_cap": None,
            "network_slice_depth": None,
            "network_nodes_per_prefix": None,
        }
    if fill != "network":
        raise ValueError(f"unknown fill {fill!r}")
    m = network_size_for(n)
    ids, drawn = network_ids(local, m, rng, cap, slice_depth)
    return ids, {
        "network_size": m,
        "network_expected_table_size": round(expected_table_size(m), 2),
        "network_slice_cap": cap,
        "network_slice_depth": slice_depth,
        "network_nodes_per_prefix": drawn,
    }


def closest_phase(args: argparse.Namespace, fill: str, rng: random.Random) -> dict[str, Any]:
    """Steps 1-4 for one fill; returns their figures."""
    out: dict[str, Any] = {"fill": fill}
    n = args.table_size
    local = NodeId.from_int(rng.getrandbits(ID_BITS))
    local_int = local.to_int()
    # drawn before the IDs, so that both fills query the same random targets
    targets = [bytes(NodeId.from_int(rng.getrandbits(ID_BITS))) for _ in range(args.queries)]
    ids, info = fill_ids(fill, local_int, n, rng, args.network_cap, args.network_slice_depth)
    out.update(info)
    order = list(range(len(ids)))
    rng.shuffle(order)
    entries = [BenchPeer(ids[i], Address(_LOOPBACK, 10_000 + i % 50_000)) for i in order]
    out["inserted_ids"] = len(entries)
    must_keep = first_per_prefix(local_int, [e.node_id for e in entries], BUCKET_SIZE)
    if fill == "full-buckets":
        assert len(must_keep) == len(ids) == n
    # Random targets almost always fall in bucket 0..3, which (full) then holds exactly the
    # closest 20. Targets spread evenly over every prefix length (and just past the deepest) also
    # probe the deep, partly filled end of the table, where a bucket-walking search can go wrong.
    deepest = max(prefix_length(local_int, i) for i in ids)
    out["deepest_prefix_offered"] = deepest
    bucket_targets = [
        id_in_bucket(local_int, rng.randrange(deepest + 3), rng)
        for _ in range(min(args.queries, BUCKET_TARGETS))
    ]
    out["bucket_targets"] = len(bucket_targets)

    results: Counter[str] = Counter()
    ours: dict[str, RoutingTable | None] = {
        "c": build_ours(local, entries, C_KERNEL) if C_KERNEL is not None else None,
        "python": build_ours(local, entries, PY_KERNEL, results),
    }
    out["ours_insert_results"] = dict(sorted(results.items()))
    for name, table in ours.items():
        if table is None:
            out[f"{name}_table_size"] = out[f"{name}_bucket_count"] = None
            continue
        held = {e.node_id for e in table}
        assert len(table) == len(held) == len(must_keep), (
            f"our table ({name} kernel) holds {len(table)} contacts, not {len(must_keep)}"
        )
        assert held == must_keep, f"our table ({name}) does not hold the first 20 per prefix"
        out[f"{name}_table_size"] = len(table)
        out[f"{name}_bucket_count"] = table.bucket_count

    # closest-20 timing and exactness, ours
    for name, table in ours.items():
        if table is None:
            for key in (
                "closest_us",
                "closest_p90_us",
                "closest_reps",
                "exact_fraction",
                "exact_fraction_bucket_targets",
            ):
                out[f"{name}_{key}"] = None
            continue
        samples, reps = time_per_call(_ours_batch, table, targets, args.min_batch_ns)
        out[f"{name}_closest_us"], out[f"{name}_closest_p90_us"] = summary_us(samples)
        out[f"{name}_closest_reps"] = reps
        ints = [as_int(e.node_id) for e in table]
        for suffix, queried in (("", targets), ("_bucket_targets", bucket_targets)):
            exact = 0
            for target in queried:
                got = [as_int(e.node_id) for e in table.closest(target, CLOSEST)]
                exact += got == oracle_closest(ints, target, CLOSEST)
            out[f"{name}_exact_fraction{suffix}"] = exact / len(queried)

    # kademlia
    kad_keys = (
        "kademlia_table_size",
        "kademlia_replacement_nodes",
        "kademlia_bucket_count",
        "kademlia_pings_requested",
        "kademlia_find_neighbors_us",
        "kademlia_find_neighbors_p90_us",
        "kademlia_find_neighbors_reps",
        "kademlia_exact_fraction",
        "kademlia_mean_recall",
        "kademlia_exact_fraction_bucket_targets",
        "kademlia_mean_recall_bucket_targets",
        "kademlia_insert_us",
    )
    if KadRoutingTable is None:
        out.update(dict.fromkeys(kad_keys))
    else:
        nodes = [KadNode(bytes(e.node_id), "127.0.0.1", e.address.port) for e in entries]
        loop = asyncio.new_event_loop()
        try:
            built = loop.run_until_complete(_kademlia_build(bytes(local), nodes, INSERT_REPEATS))
        finally:
            loop.close()
        table = built["table"]
        held_nodes = kademlia_contents(table)
        out["kademlia_table_size"] = len(held_nodes)
        out["kademlia_replacement_nodes"] = sum(len(b.replacement_nodes) for b in table.buckets)
        out["kademlia_bucket_count"] = len(table.buckets)
        out["kademlia_pings_requested"] = built["pings"]
        out["kademlia_insert_us"] = built["insert_us"]
        kad_targets = [KadNode(target) for target in targets]
        samples, reps = time_per_call(_kademlia_batch, table, kad_targets, args.min_batch_ns)
        median, p90 = summary_us(samples)
        out["kademlia_find_neighbors_us"], out["kademlia_find_neighbors_p90_us"] = median, p90
        out["kademlia_find_neighbors_reps"] = reps
        ints = [node.long_id for node in held_nodes]
        for suffix, queried in (("", targets), ("_bucket_targets", bucket_targets)):
            exact = 0
            recall = 0.0
            for target in queried:
                got = {node.long_id for node in table.find_neighbors(KadNode(target), k=CLOSEST)}
                want = set(oracle_closest(ints, target, CLOSEST))
                exact += got == want
                recall += len(got & want) / len(want) if want else 1.0
            out[f"kademlia_exact_fraction{suffix}"] = exact / len(queried)
            out[f"kademlia_mean_recall{suffix}"] = round(recall / len(queried), 4)

    c_us, kad_us = out.get("c_closest_us"), out.get("kademlia_find_neighbors_us")
    out["speedup_vs_kademlia"] = round(kad_us / c_us, 2) if c_us and kad_us else None

    # insertion
    held = len(must_keep)
    out["c_insert_us"] = (
        time_ours_insert(local, entries, C_KERNEL, INSERT_REPEATS, held)
        if C_KERNEL is not None
        else None
    )
    out["python_insert_us"] = time_ours_insert(local, entries, PY_KERNEL, INSERT_REPEATS, held)
    return out


def global_phase(args: argparse.Namespace, rng: random.Random, out: dict[str, Any]) -> None:
    ids = random_ids(args.global_size, rng)
    targets = [bytes(NodeId.from_int(rng.getrandbits(ID_BITS))) for _ in range(args.queries)]
    python_targets = targets[:GLOBAL_PYTHON_QUERIES]
    exact_targets = targets[:GLOBAL_EXACT_QUERIES]
    out["global_python_queries"] = len(python_targets)
    out["global_exact_queries"] = len(exact_targets)
    ints = [as_int(i) for i in ids]
    oracles = [oracle_closest(ints, t, CLOSEST) for t in exact_targets]

    fractions = []
    for name, kernel, timed in (("c", C_KERNEL, targets), ("python", PY_KERNEL, python_targets)):
        if kernel is None:
            out[f"{name}_global_closest_us"] = None
            out[f"{name}_global_closest_p90_us"] = None
            out[f"{name}_global_exact_fraction"] = None
            continue
        index = KeyspaceIndex(((i, i) for i in ids), kernel=kernel)
        samples, _ = time_per_call(_index_batch, index, timed, args.min_batch_ns)
        out[f"{name}_global_closest_us"], out[f"{name}_global_closest_p90_us"] = summary_us(samples)
        exact = sum(
            [as_int(v) for v in index.closest(t, CLOSEST)] == want
            for t, want in zip(exact_targets, oracles)
        )
        out[f"{name}_global_exact_fraction"] = exact / len(exact_targets)
        fractions.append(exact / len(exact_targets))
        del index
    # every available kernel must agree with the full scan
    out["global_exact_fraction"] = min(fractions)


def _memory_entries(
    args: argparse.Namespace, rng: random.Random, tables: int
) -> list[tuple[NodeId, list[BenchPeer]]]:
    made = []
    for _ in range(tables):
        local = NodeId.from_int(rng.getrandbits(ID_BITS))
        ids = table_ids(local.to_int(), args.table_size, rng)
        rng.shuffle(ids)
        made.append((local, [BenchPeer(i, _SHARED_ADDRESS) for i in ids]))
    return made


def _traced_growth(build: Callable[[], Any]) -> tuple[int, Any]:
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        built = build()
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    return after - before, built


def memory_phase(args: argparse.Namespace, rng: random.Random, out: dict[str, Any]) -> None:
    made = _memory_entries(args, rng, args.memory_tables)
    kernel = C_KERNEL if C_KERNEL is not None else PY_KERNEL

    def build() -> list[RoutingTable]:
        return [build_ours(local, entries, kernel) for local, entries in made]

    growth, tables = _traced_growth(build)
    held = sum(len(t) for t in tables)
    assert held == args.memory_tables * args.table_size
    out["memory_fill"] = MEMORY_FILL  # whichever --fill: every table holds --table-size contacts
    out["memory_tables"] = args.memory_tables
    out["bytes_per_contact"] = round(growth / held, 2)
    out["projected_gib_for_1e6_nodes_400_contacts"] = round(
        growth / held * 400 * 1_000_000 / 2**30, 3
    )
    del tables, made

    if KadRoutingTable is None:
        out["kademlia_bytes_per_contact"] = None
        return
    kad_tables = max(1, args.memory_tables // 10)
    kad_made = [
        (bytes(local), [KadNode(bytes(e.node_id), "127.0.0.1", 9) for e in entries])
        for local, entries in _memory_entries(args, rng, kad_tables)
    ]
    protocol = _StubProtocol()

    async def kad_build() -> list[Any]:
        tables = []
        for local, nodes in kad_made:
            table = KadRoutingTable(protocol, BUCKET_SIZE, KadNode(local, "127.0.0.1", 9000))
            for node in nodes:
                table.add_contact(node)
            tables.append(table)
        for _ in range(3):  # let the no-op pings finish and their tasks go
            await asyncio.sleep(0)
        return tables

    loop = asyncio.new_event_loop()
    try:
        growth, tables = _traced_growth(lambda: loop.run_until_complete(kad_build()))
    finally:
        loop.close()
    held = sum(len(kademlia_contents(t)) for t in tables)
    out["kademlia_memory_tables"] = kad_tables
    out["kademlia_bytes_per_contact"] = round(growth / held, 2) if held else None


# --- report ------------------------------------------------------------------------------------


def _target(
    value: Any, limit: float, op: str, condition: str | None = None, held: bool = True
) -> dict[str, Any]:
    if value is None:
        met = None
    elif op == "<=":
        met = value <= limit
    elif op == ">=":
        met = value >= limit
    else:
        met = value == limit
    entry: dict[str, Any] = {"value": value, "limit": f"{op} {limit}", "met": met}
    if condition is not None:
        entry["condition"] = condition
        entry["condition_held"] = held
    return entry


def targets(out: dict[str, Any]) -> dict[str, Any]:
    return {
        "c_closest_us": _target(
            out["c_closest_us"], 1.5, "<=", "table_size ~400", 350 <= out["table_size"] <= 450
        ),
        "speedup_vs_kademlia": _target(
            out["speedup_vs_kademlia"],
            15,
            ">=",
            "kademlia's table as big as ours (kademlia_table_size == c_table_size)",
            out.get("kademlia_table_size") is not None
            and out.get("kademlia_table_size") == out.get("c_table_size"),
        ),
        "c_exact_fraction": _target(out["c_exact_fraction"], 1.0, "=="),
        "c_global_closest_us": _target(
            out["c_global_closest_us"],
            5.0,
            "<=",
            "global_size 100000",
            out["global_size"] >= 100_000,
        ),
        "projected_gib_for_1e6_nodes_400_contacts": _target(
            out["projected_gib_for_1e6_nodes_400_contacts"],
            16.0,
            "<=",
            "table_size ~400 (bytes_per_contact includes per-table overhead spread over it)",
            350 <= out["table_size"] <= 450,
        ),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    master = random.Random(args.seed)
    seeds = [master.getrandbits(64) for _ in range(3)]
    fills = [args.fill] + [f for f in FILLS if f != args.fill] if args.both_fills else [args.fill]
    out: dict[str, Any] = {
        "table_size": args.table_size,
        "fill": args.fill,
        "network_size": None,
        "network_cap": args.network_cap,
        "network_slice_depth": args.network_slice_depth,
        "fills_run": fills,
        "global_size": args.global_size,
        "queries": args.queries,
        "seed": args.seed,
        "bucket_size": BUCKET_SIZE,
        "closest_count": CLOSEST,
        "min_batch_ns": args.min_batch_ns,
        "insert_repeats": INSERT_REPEATS,
        "entry_type": ENTRY_TYPE,
        "kernel": {
            "default": keys.KERNEL,
            "default_reason": keys.KERNEL_REASON,
            "c_available": C_KERNEL is not None,
            "c_error": C_ERROR,
            "python_module": PY_KERNEL.__name__,
            "c_module_file": getattr(C_KERNEL, "__file__", None),
            "c_module_mtime": _mtime(getattr(C_KERNEL, "__file__", None)),
        },
        "kademlia": {
            "available": KadRoutingTable is not None,
            "error": KADEMLIA_ERROR,
            "version": _kademlia_version(),
        },
        "python_version": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "machine": platform.platform(),
        "cpu": platform.machine(),
        "notes": [],
        "fill_notes": {f: fill_note(f, args.network_cap) for f in fills},
    }
    if C_KERNEL is None:
        out["notes"].append(f"C kernel not built ({C_ERROR}): C figures are null")
    if KadRoutingTable is None:
        out["notes"].append(
            f"kademlia is not installed ({KADEMLIA_ERROR}): its figures are null;"
            f" install it with: {KADEMLIA_INSTALL}"
        )
    # the same seed for each fill: the same local ID and the same random targets
    by_fill = {fill: closest_phase(args, fill, random.Random(seeds[0])) for fill in fills}
    out.update(by_fill[args.fill])
    for fill, figures in by_fill.items():
        ours_held, kad_held = figures.get("python_table_size"), figures.get("kademlia_table_size")
        if ours_held and kad_held and kad_held > 1.5 * ours_held:
            out["notes"].append(
                f"{fill} fill: kademlia holds {kad_held} contacts to our {ours_held} (it also"
                " splits far buckets until their members share a multiple of 5 bits), so its"
                " find_neighbors times are for a bigger table"
            )
    if args.both_fills:
        out["by_fill"] = by_fill
    global_phase(args, random.Random(seeds[1]), out)
    memory_phase(args, random.Random(seeds[2]), out)
    out["notes"].append(
        f"bytes_per_contact and kademlia_bytes_per_contact use the {MEMORY_FILL} fill"
        " (memory_fill), whichever --fill was chosen, so every traced table holds exactly"
        " --table-size contacts"
    )
    out["targets"] = targets(out)
    out["elapsed_s"] = round(time.perf_counter() - started, 2)
    return out


def _mtime(path: str | None) -> str | None:
    """When the C extension was built (others may rebuild it between runs)."""
    if path is None:
        return None
    stamp = Path(path).stat().st_mtime
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stamp))


def _kademlia_version() -> str | None:
    if KadRoutingTable is None:
        return None
    try:
        from importlib.metadata import version

        return version("kademlia")
    except Exception:  # pragma: no cover - metadata missing
        return None


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1e6 else f"{value:,.0f}"
    return str(value)


FILL_ROWS = [
    ("network size M (nodes)", "network_size"),
    ("IDs offered (inserted in shuffled order)", "inserted_ids"),
    ("deepest prefix length offered", "deepest_prefix_offered"),
    ("contacts held, ours", "python_table_size"),
    ("contacts held, kademlia", "kademlia_table_size"),
    ("kademlia buckets / ours", "_bucket_counts"),
    ("closest-20 median, C (µs)", "c_closest_us"),
    ("closest-20 p90, C (µs)", "c_closest_p90_us"),
    ("closest-20 median, Python kernel (µs)", "python_closest_us"),
    ("closest-20 p90, Python kernel (µs)", "python_closest_p90_us"),
    ("kademlia find_neighbors median (µs)", "kademlia_find_neighbors_us"),
    ("kademlia find_neighbors p90 (µs)", "kademlia_find_neighbors_p90_us"),
    ("speedup C vs kademlia (x)", "speedup_vs_kademlia"),
    ("exact fraction, C", "c_exact_fraction"),
    ("exact fraction, Python kernel", "python_exact_fraction"),
    ("exact fraction, kademlia (own contents)", "kademlia_exact_fraction"),
    ("kademlia mean recall (own contents)", "kademlia_mean_recall"),
    ("exact fraction, C, targets in every bucket", "c_exact_fraction_bucket_targets"),
    ("exact fraction, Python, targets in every bucket", "python_exact_fraction_bucket_targets"),
    ("exact fraction, kademlia, targets in every bucket", "kademlia_exact_fraction_bucket_targets"),
    ("kademlia mean recall, targets in every bucket", "kademlia_mean_recall_bucket_targets"),
    ("kademlia replacement nodes", "kademlia_replacement_nodes"),
    ("kademlia pings requested (1 table)", "kademlia_pings_requested"),
    ("insert call, C (µs)", "c_insert_us"),
    ("insert call, Python kernel (µs)", "python_insert_us"),
    ("insert call, kademlia (µs)", "kademlia_insert_us"),
]
OTHER_ROWS = [
    ("global closest-20 median, C (µs)", "c_global_closest_us"),
    ("global closest-20 median, Python (µs)", "python_global_closest_us"),
    ("global exact fraction", "global_exact_fraction"),
    ("bytes per contact, ours (full-buckets fill)", "bytes_per_contact"),
    ("GiB for 1e6 nodes x 400 contacts", "projected_gib_for_1e6_nodes_400_contacts"),
    ("bytes per contact, kademlia (full-buckets fill)", "kademlia_bytes_per_contact"),
]


def _cell(figures: dict[str, Any], key: str) -> str:
    if key == "_bucket_counts":
        kad, ours = figures.get("kademlia_bucket_count"), figures.get("python_bucket_count")
        return f"{_fmt(kad)} / {_fmt(ours)}"
    return _fmt(figures.get(key))


def print_table(out: dict[str, Any]) -> None:
    by_fill = out.get("by_fill") or {out["fill"]: out}
    fills = list(by_fill)
    print(
        f"Routing-table benchmark: table {out['table_size']} (requested), fill"
        f" {' and '.join(fills)}, global {out['global_size']}, {out['queries']} queries,"
        f" seed {out['seed']}"
    )
    print(
        f"kernel: default {out['kernel']['default']}, C available: {out['kernel']['c_available']};"
        f" kademlia: {out['kademlia']['version'] or 'not installed'};"
        f" Python {out['python_version']} on {out['machine']}"
    )
    print(f"entries: {out['entry_type']}")
    print("fills (--fill; network is the default):")
    for fill in FILLS:
        print(f"  {fill_note(fill, out['network_cap'])}")
    width = max(len(label) for label, _ in FILL_ROWS + OTHER_ROWS)
    cells = {fill: [_cell(by_fill[fill], key) for _, key in FILL_ROWS] for fill in fills}
    col = max([len(fill) for fill in fills] + [len(c) for column in cells.values() for c in column])
    print(f"  {'':<{width}}  " + "  ".join(f"{fill:>{col}}" for fill in fills))
    for i, (label, _) in enumerate(FILL_ROWS):
        print(f"  {label:<{width}}  " + "  ".join(f"{cells[fill][i]:>{col}}" for fill in fills))
    for label, key in OTHER_ROWS:
        print(f"  {label:<{width}}  {_fmt(out.get(key)):>{col}}")
    print(f"targets (from the {out['fill']} fill):")
    for name, t in out["targets"].items():
        state = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
        cond = ""
        if "condition" in t:
            held = "yes" if t["condition_held"] else "no, this run differs"
            cond = f" (at {t['condition']}: {held})"
        print(f"  {name} {t['limit']}: {_fmt(t['value'])} -> {state}{cond}")
    for note in out["notes"]:
        print(f"note: {note}")
    print(f"elapsed: {out['elapsed_s']} s")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--table-size", type=int, default=400, help="contacts per table (400)")
    parser.add_argument(
        "--fill",
        choices=FILLS,
        default=DEFAULT_FILL,
        help="how tables are filled (network: one node's view of a random network, sized so our"
        " table holds about --table-size; full-buckets: 20 IDs per prefix length)",
    )
    parser.add_argument(
        "--network-cap",
        type=int,
        default=NETWORK_SLICE_CAP,
        help=f"network fill: IDs made per slice at most ({NETWORK_SLICE_CAP}); see the docstring",
    )
    parser.add_argument(
        "--network-slice-depth",
        type=int,
        default=KADEMLIA_SPLIT_DEPTH,
        help=f"network fill: cut each prefix length into slices down to the next multiple of"
        f" this many bits ({KADEMLIA_SPLIT_DEPTH}, kademlia's finest far buckets); 1 caps whole"
        " prefix lengths, which starves kademlia's far buckets",
    )
    parser.add_argument(
        "--both-fills",
        action="store_true",
        help="run the table part for both fills; top-level figures are those of --fill",
    )
    parser.add_argument("--global-size", type=int, default=100_000, help="IDs in the KeyspaceIndex")
    parser.add_argument("--queries", type=int, default=2000, help="closest-20 targets (2000)")
    parser.add_argument("--seed", type=int, default=1, help="seed of random.Random (1)")
    parser.add_argument("--memory-tables", type=int, default=200, help="tables traced for memory")
    parser.add_argument("--min-batch-ns", type=int, default=MIN_BATCH_NS, help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if not 1 <= args.table_size <= MAX_TABLE_SIZE:
        parser.error(f"--table-size must be in 1..{MAX_TABLE_SIZE}")
    if args.global_size < CLOSEST:
        parser.error(f"--global-size must be >= {CLOSEST}")
    if args.network_cap < BUCKET_SIZE:
        parser.error(f"--network-cap must be >= {BUCKET_SIZE}")
    if args.network_slice_depth < 1:
        parser.error("--network-slice-depth must be >= 1")
    if args.queries < 1 or args.memory_tables < 1:
        parser.error("--queries and --memory-tables must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if C_KERNEL is None:
        print(f"routing_table benchmark: the C kernel is not built ({C_ERROR});"
              " C figures will be null", file=sys.stderr)
    if KadRoutingTable is None:
        print(
            f"routing_table benchmark: kademlia is not installed ({KADEMLIA_ERROR}); its figures"
            f" will be null. Install it with: {KADEMLIA_INSTALL}",
            file=sys.stderr,
        )
    out = run(args)
    if args.json:
        json.dump(out, sys.stdout)
        sys.stdout.write("\n")
    else:
        print_table(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
