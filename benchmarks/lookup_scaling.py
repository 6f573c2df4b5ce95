#!/usr/bin/env python3
"""Lookup-scaling benchmark: the project's own :class:`~sovereign_discovery.node.DhtEngine` in
the :class:`~sovereign_discovery.testing.SimulatedNetwork` (virtual time), at sizes from 10^2
nodes up, under four conditions (issue 6, item 1).

Run ``python benchmarks/lookup_scaling.py [--sizes 100,1000] [--lookups 200] [--seed 1]
[--sessions simulated|real] [--engine-caps default|lean] [--alpha 3] [--bucket-bits 1]
[--join auto|protocol|global]
[--protocol-join-max N] [--gc frozen|default] [--conditions no_loss,loss_10,...] [--json] [--plot FILE.png]
[--no-progress]``. Every random
choice comes from ``--seed``: the same arguments give the same figures (wall times and memory
aside). Speed is reported, never asserted; ``tests/test_benchmark_lookup_scaling.py`` checks the
output's shape and that every lookup succeeds at a small size with no loss.

Per size, in a child process of its own (forked, so that the memory of one size does not hide in
the next one's figures):

1. **Nodes.** ``N`` engines with deterministic identities at virtual addresses ``10.x.y.z:4000``,
   ``k = 20``, ``α = 3`` (``--alpha``), ``b = 1`` (``--bucket-bits``: Kademlia §4.2's bits per
   routing step, ``DhtConfig.bucket_bits``). Sessions (``--sessions``): ``simulated`` (the default) gives each engine a
   :class:`~sovereign_discovery.sim_session.SimulatedSessionLayer`, which carries messages without
   handshakes or encryption and delivers one only from the address the simulator's directory binds
   to the sender's node ID; ``real`` uses the library's own session layer (X25519 handshakes,
   ChaCha20-Poly1305 per datagram), about 5× slower to join. All engines share one seeded
   ``random.Random`` (request IDs, nonces): deterministic, and 2.5 KB per node less than one each.
   Settings changed from the defaults, so that only what is measured happens in virtual time:
   ``refresh_interval_s`` and ``replication_interval_s`` = 10^7 (no periodic bucket refresh or
   re-replication during a run: refresh happens only where a condition says so),
   ``record_ttl_s`` = 1 day (no republishing during a run), ``upkeep_interval_s`` = 30 (upkeep
   timers cost CPU per node and virtual second, and find nothing to do). ``--engine-caps lean``
   also bounds the engine's per-peer tables far below the defaults (``LEAN_CAPS``), to show how
   much of a node's memory they are; ``requests_not_sent`` counts what the caps refused.
2. **Network formation** (``--join``, ``auto`` = ``protocol`` up to ``--protocol-join-max`` nodes,
   ``global`` above). ``protocol``: node 0 starts alone; node ``i`` joins with the engine's own
   ``bootstrap`` through a random node already started (PING and FIND_NODE to it, the self-lookup,
   then a refresh of every prefix length farther than the nearest neighbour that holds no contact,
   plus ``DhtConfig.join_refresh_buckets`` (1) of the non-full ones, farthest first;
   docs/engine.md, "Upkeep"), one join every
   ``--join-interval`` virtual seconds (joins overlap); then every node announces its record
   with ``announce_record`` (lookup of its own ID, STORE at the k closest). ``joined_by_protocol``
   is true. ``global``: routing tables are filled from a global view (the sorted IDs: for each
   prefix length, up to k random nodes sharing exactly that many leading bits, laid out in one
   pass by ``RoutingTable.load``, which builds what ``insert`` would) and every node's signed
   record is put in the stores of its k true
   closest and its own (one shared record object per node); no message is sent.
   ``joined_by_protocol`` is false and ``records`` says ``global_view``.
3. **Memory** (``bytes_per_node``): the resident set size of the child after formation minus
   before the engines were made, divided by ``N`` (``memory_method: "rss_delta"``): engines,
   tables, stores, session layers, plus the simulator's share (directory, event heap), with
   Python's allocator overhead. With simulated sessions there is no per-peer session state; with
   ``global`` formation contacts and records are shared objects (a real network's nodes would each
   hold copies).
4. **Conditions**, in this order on the same network: ``no_loss``; ``loss_10`` (10% of datagrams
   lost, independently); then ``crashed_20_no_refresh`` (20% of the nodes crash, no loss, nobody
   refreshes); then ``crashed_20_after_refresh`` (the same crashed nodes; every live node first runs
   one forced refresh, ``refresh(now, force=True)``: a lookup of a random ID in every bucket).
   Each condition runs ``--lookups`` record lookups one after another (none overlaps another, so
   each latency is that of one lookup alone): a random live source looks up the record of a random
   other live node with ``find_record(quorum=0)``: the lookup runs until the target itself
   answers (its own copy is the newest) or the k closest have, so that it measures how Kademlia's
   routing reaches the target, as the issue asks (with the library's default quorum of 1 a lookup
   may stop at the first holder it meets, before reaching the target). **Success**: the lookup's ``RecordFound`` carries exactly
   the target's own signed record (byte for byte). ``target_in_closest_rate`` is the find_node
   criterion on the same lookups: the target is among the ``closest`` its ``LookupFinished``
   reports. Rounds: ``LookupFinished.rounds`` (the deepest hop contacted; seeds from the source's
   own table are round 1) and ``rounds_to_target`` (the round in which the target itself was first
   sent a request; its median is over the lookups that contacted it, ``target_contacted_rate``
   says how many did). Requests: ``LookupFinished.requests`` (FIND_VALUE requests sent, a retry not
   counted again). Latency: virtual time from the command to ``RecordFound``, i.e. to the end of
   the lookup (a FIND_VALUE lookup runs to the end to find the highest seq).
   ``rounds_to_target_counts``: how many lookups first contacted the target in each round.

Latency model (``latency_model`` in the output): every datagram independently takes a one-way
delay drawn from a log-normal distribution with median 50 ms and σ(ln) = 0.5 (p95 ≈ 114 ms, so
datagrams reorder); no bandwidth limit, no processing time (virtual time does not advance while an
engine computes); loss, where a condition has it, drops each datagram independently.

Collector (``--gc``): with every engine in one heap, CPython's automatic cyclic collection
traverses the whole network again and again as it grows; by default it is off and the benchmark
collects and freezes at batch boundaries instead (``Collector``), reporting in every row what the
collections found and took (``gc_collected``, ``gc_s``). The engines' figures do not change.

Output: a table on stdout, or with ``--json`` one JSON object per line per size and condition.
``--plot FILE.png`` draws median rounds (to the target, and to the end) and median requests
against the size (log x) for every condition (matplotlib, from the ``bench`` extra). A progress
line goes to stderr during long phases unless ``--no-progress``.
"""

from __future__ import annotations

import argparse
import bisect
import gc
import importlib.util
import json
import math
import multiprocessing
import os
import platform
import random
import resource
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from sovereign_discovery.addresses import Address  # noqa: E402
from sovereign_discovery.constants import MAX_BUCKET_BITS  # noqa: E402
from sovereign_discovery.events import LookupFinished, RecordAnnounced, RecordFound  # noqa: E402
from sovereign_discovery.identity import Identity  # noqa: E402
from sovereign_discovery.keys import KERNEL, KeyspaceIndex  # noqa: E402
from sovereign_discovery.node import DhtConfig, DhtEngine  # noqa: E402
from sovereign_discovery.records import PeerRecord  # noqa: E402
from sovereign_discovery.routing import Contact  # noqa: E402
from sovereign_discovery.sim_session import SimulatedDirectory, SimulatedSessionLayer  # noqa: E402
from sovereign_discovery.testing import LinkModel, SimulatedNetwork  # noqa: E402

CONDITIONS = ("no_loss", "loss_10", "crashed_20_no_refresh", "crashed_20_after_refresh")
LOSS = 0.10
CRASHED_FRACTION = 0.20
LATENCY_MEDIAN_S = 0.05
LATENCY_SIGMA = 0.5
EPOCH = 1.8e9  # Unix time of virtual time 0
#: Virtual seconds a lookup may take before it counts as never ended (its own deadline is 10 s).
LOOKUP_WAIT_S = 30.0
#: Virtual seconds after the last command of a phase for everything in flight to end.
SETTLE_S = 30.0
MAX_EVENTS = 1 << 62  # run_until's bound; phases are bounded in virtual time instead

CONFIG = DhtConfig(
    refresh_interval_s=1e7,
    replication_interval_s=1e7,
    record_ttl_s=86_400.0,
    upkeep_interval_s=30.0,
)
#: ``--engine-caps lean``: the per-peer tables of the engine bounded far below the defaults
#: (finished-request memo and outstanding requests 1,024 -> 128, round-trip estimators and
#: table re-entry times 4,096 -> 256, rate-limit buckets 10,000 IPs -> 64). These tables, not
#: the routing table, are most of an engine's memory once it has talked to a thousand peers.
LEAN_CAPS = {"max_outstanding_requests": 128, "max_rtt_entries": 256, "max_rate_limited_ips": 64}
LATENCY_MODEL = {
    "kind": "log-normal one-way delay per datagram, independent",
    "median_ms": LATENCY_MEDIAN_S * 1000,
    "sigma_ln": LATENCY_SIGMA,
    "p95_ms": round(LATENCY_MEDIAN_S * math.exp(1.6448536 * LATENCY_SIGMA) * 1000, 1),
    "bandwidth": "unlimited",
    "processing_time": "none",
}


# --- progress -------------------------------------------------------------------------------------


class Progress:
    """One carriage-return line on stderr, redrawn at most every half second."""

    def __init__(self, enabled: bool, label: str, total: int) -> None:
        self.enabled = enabled
        self.label = label
        self.total = max(total, 1)
        self.started = time.perf_counter()
        self.drawn = 0.0

    def update(self, done: int, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and now - self.drawn < 0.5:
            return
        self.drawn = now
        fraction = min(1.0, done / self.total)
        bar = "#" * int(fraction * 30)
        elapsed = now - self.started
        eta = f", ~{elapsed / fraction - elapsed:.0f} s left" if 0 < fraction < 1 else ""
        sys.stderr.write(f"\r{self.label} [{bar:<30}] {done}/{self.total} {elapsed:.0f} s{eta}   ")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            self.update(self.total, force=True)
            sys.stderr.write("\n")
            sys.stderr.flush()


# --- the cyclic garbage collector ----------------------------------------------------------------


class Collector:
    """CPython's cyclic garbage collector, with a whole network of engines in one heap.

    A full collection (generation 2) traverses every container object the process holds (about
    1.2 million at 5,000 nodes: 1.5 s), and CPython starts one whenever the objects promoted since
    the last one exceed a quarter of the rest (the ``gc`` module's long-lived heuristic). A growing
    network keeps promoting (tables, stores, lookups in flight), so every join pays for traversals
    of the whole network: 40 % of the join's CPU at 5,000 nodes (docs/benchmarks.md, "The cyclic
    collector"). Reference counting frees everything the engines drop; only reference cycles need
    the collector, and the audit below counts them.

    ``frozen`` (the default): automatic collection is off; at every batch boundary (1,000 joins,
    announces or refreshes, the end of each condition) ``sweep`` collects what was allocated since
    the previous one and freezes the survivors (``gc.freeze``: a permanent generation that later
    collections skip), so no object is traversed twice by a sweep. ``audit`` (once after formation
    and once after the last condition) unfreezes everything and runs one full collection: a cycle
    that a sweep could not see (one reaching a frozen object) is found there. ``default``: CPython's
    automatic collection, untouched, for comparison. In both, the rows report the collections, the
    unreachable objects they found (``gc_collected``: 0 means the engines made no garbage cycles)
    and the seconds they took (``gc_s``).
    """

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.seconds = 0.0
        self._started = 0.0
        self._stats = [dict(s) for s in gc.get_stats()]
        gc.callbacks.append(self._time)
        if mode == "frozen":
            gc.disable()
            self.sweep()

    def _time(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._started

    def sweep(self) -> None:
        if self.mode == "frozen":
            gc.collect()
            gc.freeze()

    def audit(self) -> None:
        if self.mode == "frozen":
            gc.unfreeze()
            gc.collect()
            gc.freeze()

    def figures(self) -> dict[str, Any]:
        stats = gc.get_stats()
        return {
            "gc": self.mode,
            "gc_collections": sum(s["collections"] - b["collections"] for s, b in zip(stats, self._stats)),
            "gc_collected": sum(s["collected"] - b["collected"] for s, b in zip(stats, self._stats)),
            "gc_s": round(self.seconds, 2),
        }


# --- the simulated network ----------------------------------------------------------------------


@dataclass
class Sim:
    """``N`` engines in one simulated network, with what the benchmark knows about them."""

    net: SimulatedNetwork
    engines: list[DhtEngine]
    addresses: list[Address]
    contacts: list[Contact]
    identities: list[Identity]
    records: dict[int, bytes] = field(default_factory=dict)  # node index -> its own encoded record
    collector: Collector | None = None

    def call(self, i: int, action) -> Any:
        return self.net.call(self.addresses[i], action)

    def drain(self) -> None:
        """Drop every engine's pending events (they would only accumulate); a batch boundary for
        the collector."""
        for engine in self.engines:
            engine.events()
        if self.collector is not None:
            self.collector.sweep()

    def settle(self, seconds: float = SETTLE_S) -> None:
        self.net.run_until(self.net.now + seconds, max_events=MAX_EVENTS)


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # pragma: no cover - not Linux
        return 0


def make_sim(size: int, seed: int, sessions: str, config: DhtConfig = CONFIG) -> Sim:
    net = SimulatedNetwork(seed=seed, link=LinkModel(LATENCY_MEDIAN_S, LATENCY_SIGMA))
    directory = SimulatedDirectory()
    shared = random.Random(seed + 1)
    keys = random.Random(seed)
    sim = Sim(net, [], [], [], [])
    for _ in range(size):
        identity = Identity.from_seed(keys.randbytes(32))
        address = net.new_address()
        layer = SimulatedSessionLayer(identity, directory) if sessions == "simulated" else None
        engine = DhtEngine(identity, config=config, random_bytes=shared.randbytes, rng=shared,
                           now=net.now, unix_offset=EPOCH, advertised_address=address,
                           learn_address=False, session_layer=layer)
        contact = engine.contact(address)
        directory.register(contact)
        net.add_host(engine, address)
        sim.engines.append(engine)
        sim.addresses.append(address)
        sim.contacts.append(contact)
        sim.identities.append(identity)
    return sim


def join_by_protocol(sim: Sim, rng: random.Random, interval_s: float, show: bool) -> int:
    """Node ``i`` bootstraps through a random node started before it. Returns how many joined
    (their join's ``LookupFinished`` names at least one peer)."""
    size = len(sim.engines)
    queries: dict[int, int] = {}
    joined = 0

    def collect(indices) -> int:
        found = 0
        for i in indices:
            query = queries.get(i)
            if query is None:
                continue
            for event in sim.engines[i].events():
                if isinstance(event, LookupFinished) and event.query == query:
                    del queries[i]
                    found += bool(event.closest)
                    break
        return found

    progress = Progress(show, f"{size} nodes: joining", size)
    for i in range(1, size):
        via = sim.contacts[rng.randrange(i)]
        queries[i] = sim.call(i, lambda e, now, c=via: e.bootstrap([c], now))
        sim.net.run_until(sim.net.now + interval_s, max_events=MAX_EVENTS)
        if i % 1000 == 0:  # events pile up in every engine: collect the joins, drop the rest
            joined += collect(range(size))
            sim.drain()
        progress.update(i)
    sim.settle()
    joined += collect(range(size))
    sim.drain()
    progress.close()
    return joined + 1  # node 0 is the network


def announce_by_protocol(sim: Sim, interval_s: float, show: bool) -> int:
    """Every node announces its record (``announce_record``). Returns how many were stored at one
    peer at least."""
    size = len(sim.engines)
    queries: dict[int, int] = {}
    stored = 0
    progress = Progress(show, f"{size} nodes: announcing", size)
    for i in range(size):
        queries[i] = sim.call(i, lambda e, now: e.announce_record(now))
        sim.net.run_until(sim.net.now + interval_s, max_events=MAX_EVENTS)
        progress.update(i + 1)
        if (i + 1) % 1000 == 0 or i + 1 == size:
            if i + 1 == size:
                sim.settle()
            for j, engine in enumerate(sim.engines):
                for event in engine.events():
                    if isinstance(event, RecordAnnounced) and queries.get(j) == event.query:
                        stored += event.stored_at > 0
                        del queries[j]
            if sim.collector is not None:
                sim.collector.sweep()
    progress.close()
    for i, engine in enumerate(sim.engines):
        sim.records[i] = engine.own_record.encoded
    return stored


def fill_from_global_view(sim: Sim, rng: random.Random, show: bool) -> None:
    """Routing tables from the sorted IDs: per bucket, up to k random nodes of the subtree it
    covers (per prefix length with b = 1; with b > 1 also per value of the bits after it up to the
    end of its b-bit digit), a Kademlia table in a network that has long settled; each node's
    signed record in the stores of its k true closest and its own."""
    size = len(sim.engines)
    k = CONFIG.bucket_size
    bits = sim.engines[0].table.bucket_bits if size else 1
    order = sorted(range(size), key=lambda i: sim.engines[i].node_id)
    ints = [int.from_bytes(sim.engines[i].node_id, "big") for i in order]
    now, unix = sim.net.now, sim.net.now + EPOCH
    progress = Progress(show, f"{size} nodes: filling tables", size)
    sorted_contacts = [sim.contacts[i] for i in order]
    for done, i in enumerate(order):
        me = ints[done]
        picked = []
        for prefix in range(160):
            shift = 159 - prefix
            low = ((me >> shift) ^ 1) << shift  # same first `prefix` bits, the next one flipped
            digit_end = min(prefix - prefix % bits + bits, 160)  # the bucket: these bits too
            width = shift - (160 - digit_end)
            for sub in range(1 << (digit_end - 1 - prefix)):
                sub_low = low + (sub << (shift - width)) if width else low
                start = bisect.bisect_left(ints, sub_low)
                end = bisect.bisect_left(ints, sub_low + (1 << (shift - width)))
                if end > start:
                    picks = range(start, end) if end - start <= k else rng.sample(range(start, end), k)
                    picked.extend(sorted_contacts[j] for j in picks)
            own_low = (me >> shift) << shift  # nodes sharing at least prefix + 1 bits: only me?
            if bisect.bisect_left(ints, own_low + (1 << shift)) - bisect.bisect_left(ints, own_low) <= 1:
                break
        # the table insert() would build from these (at most k per prefix), in one pass
        sim.engines[i].table.load(picked, now)
        progress.update(done + 1)
    progress.close()
    index = KeyspaceIndex((sim.engines[i].node_id, i) for i in order)  # exact closest-n
    progress = Progress(show, f"{size} nodes: placing records", size)
    for done, i in enumerate(order):
        engine = sim.engines[i]
        record = PeerRecord.create(sim.identities[i], addresses=[sim.addresses[i]], seq=1,
                                   expires_at=int(unix + CONFIG.record_ttl_s))
        sim.records[i] = record.encoded
        engine.store.put(engine.node_id, record, None, unix)
        for j in index.closest(engine.node_id, k + 1)[1:]:  # [0] is the node itself
            sim.engines[j].store.put(engine.node_id, record, engine.node_id, unix)
        progress.update(done + 1)
    progress.close()


def refresh_all(sim: Sim, alive: list[int], interval_s: float, show: bool) -> None:
    progress = Progress(show, f"{len(sim.engines)} nodes: one refresh", len(alive))
    for done, i in enumerate(alive):
        sim.call(i, lambda e, now: e.refresh(now, force=True))
        sim.net.run_until(sim.net.now + interval_s, max_events=MAX_EVENTS)
        if done % 1000 == 999:
            sim.drain()
        progress.update(done + 1)
    sim.settle()
    sim.drain()
    progress.close()


# --- lookups --------------------------------------------------------------------------------------


def run_lookups(sim: Sim, pairs: list[tuple[int, int]], show: bool, label: str) -> dict[str, Any]:
    """One ``find_record`` at a time; returns the figures of one condition."""
    found = in_closest = unfinished = 0
    rounds, rounds_to_target, requests, latencies_ms = [], [], [], []
    progress = Progress(show, label, len(pairs))
    for n, (source, target) in enumerate(pairs):
        engine = sim.engines[source]
        target_id = sim.engines[target].node_id
        start = sim.net.now
        query = sim.call(source, lambda e, now, t=target_id: e.find_record(t, now, quorum=0))
        got: dict[type, Any] = {}

        def ended() -> bool:
            for event in engine.events():
                if getattr(event, "query", None) == query:
                    got[type(event)] = event
            return RecordFound in got

        sim.net.run_until(start + LOOKUP_WAIT_S, until=ended, max_events=MAX_EVENTS)
        ended()
        record_found, finished = got.get(RecordFound), got.get(LookupFinished)
        if record_found is None or finished is None:
            unfinished += 1
            continue
        latencies_ms.append((sim.net.now - start) * 1000)
        rounds.append(finished.rounds)
        requests.append(finished.requests)
        if finished.rounds_to_target is not None:
            rounds_to_target.append(finished.rounds_to_target)
        in_closest += any(c.node_id == target_id for c in finished.closest)
        if record_found.record is not None and record_found.record.encoded == sim.records[target]:
            found += 1
        progress.update(n + 1)
    progress.close()
    total = len(pairs)
    return {
        "lookups": total,
        "success_rate": found / total,
        "target_in_closest_rate": in_closest / total,
        "lookups_unfinished": unfinished,
        "target_contacted_rate": len(rounds_to_target) / total,
        "median_rounds_to_target": _median(rounds_to_target),
        "rounds_to_target_counts": {str(r): n for r, n in sorted(Counter(rounds_to_target).items())},
        "median_rounds": _median(rounds),
        "median_requests": _median(requests),
        "mean_requests": round(statistics.fmean(requests), 2) if requests else None,
        "p50_ms": _percentile(latencies_ms, 50),
        "p95_ms": _percentile(latencies_ms, 95),
        "p99_ms": _percentile(latencies_ms, 99),
    }


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile, rounded to 0.1 ms."""
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)], 1)


def draw_pairs(rng: random.Random, alive: list[int], count: int) -> list[tuple[int, int]]:
    pairs = []
    for _ in range(count):
        source, target = rng.sample(alive, 2)
        pairs.append((source, target))
    return pairs


# --- one size -------------------------------------------------------------------------------------


def measure_size(size: int, args: argparse.Namespace, emit=None) -> list[dict[str, Any]]:
    """Every condition's figures at ``size``; each row is also given to ``emit`` as soon as it
    is measured."""
    show = args.progress
    rng = random.Random(args.seed * 1_000_003 + size)
    join = args.join if args.join != "auto" else ("protocol" if size <= args.protocol_join_max else "global")
    rss_before = rss_bytes()
    load_before = _load_average()
    started = time.perf_counter()
    config = CONFIG if args.engine_caps == "default" else replace(CONFIG, **LEAN_CAPS)
    config = replace(config, parallelism=args.alpha, bucket_bits=args.bucket_bits,
                     join_refresh_closest=args.join_refresh_closest)
    collector = Collector(args.gc)
    sim = make_sim(size, args.seed, args.sessions, config)
    sim.collector = collector
    build_s = time.perf_counter() - started
    started, cpu = time.perf_counter(), time.process_time()
    if join == "protocol":
        joined = join_by_protocol(sim, rng, args.join_interval, show)
        join_s, join_cpu = time.perf_counter() - started, time.process_time() - cpu
        started, cpu = time.perf_counter(), time.process_time()
        announced = announce_by_protocol(sim, args.join_interval, show)
        announce_s, announce_cpu = time.perf_counter() - started, time.process_time() - cpu
    else:
        fill_from_global_view(sim, rng, show)
        joined = announced = size
        join_s, announce_s = time.perf_counter() - started, 0.0
        join_cpu, announce_cpu = time.process_time() - cpu, 0.0
    bytes_per_node = (rss_bytes() - rss_before) / size
    collector.audit()
    gc_formation_s = collector.seconds
    datagrams_formation = sim.net.stats["sent"]
    tables = sorted(len(e.table) for e in sim.engines)
    common = {
        "nodes": size,
        "joined_by_protocol": join == "protocol",
        "records": "protocol" if join == "protocol" else "global_view",
        "joined": joined,
        "records_stored": announced,
        "sessions": args.sessions,
        "engine_caps": args.engine_caps,
        "latency_model": LATENCY_MODEL,
        "k": CONFIG.bucket_size,
        "alpha": config.parallelism,
        "bucket_bits": config.bucket_bits,
        "join_refresh_closest": config.join_refresh_closest,
        "seed": args.seed,
        "bytes_per_node": round(bytes_per_node),
        "memory_method": "rss_delta",
        "table_size_median": tables[len(tables) // 2],
        "table_size_min": tables[0],
        "build_wall_s": round(build_s, 2),
        "join_wall_s": round(join_s, 2),
        "announce_wall_s": round(announce_s, 2),
        "join_cpu_s": round(join_cpu, 2),
        "announce_cpu_s": round(announce_cpu, 2),
        "load_average_before": load_before,
        "datagrams_formation": datagrams_formation,
        "gc_formation_s": round(gc_formation_s, 2),
        "kernel": KERNEL,
        "python_version": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}",
    }
    rows = []
    everyone = list(range(size))
    alive = everyone
    crashed: list[int] = []
    for condition in CONDITIONS:
        if condition not in args.conditions:
            continue
        started, cpu = time.perf_counter(), time.process_time()
        sent_before = sim.net.stats["sent"]
        if condition.startswith("crashed_20") and not crashed:
            crashed = sorted(rng.sample(everyone, int(CRASHED_FRACTION * size)))
            for i in crashed:
                sim.net.crash(sim.addresses[i])
            dead = set(crashed)
            alive = [i for i in everyone if i not in dead]
        if condition == "crashed_20_after_refresh":
            refresh_all(sim, alive, args.join_interval, show)
        loss = LOSS if condition == "loss_10" else 0.0
        sim.net.link = LinkModel(LATENCY_MEDIAN_S, LATENCY_SIGMA, loss=loss)
        figures = run_lookups(sim, draw_pairs(rng, alive, args.lookups), show, f"{size} nodes: {condition}")
        sim.net.link = LinkModel(LATENCY_MEDIAN_S, LATENCY_SIGMA)
        sim.drain()
        collector.audit()
        row = {**common, "condition": condition, "loss": loss,
               "crashed_fraction": len(crashed) / size if condition.startswith("crashed") else 0.0,
               **figures,
               "wall_s": round(time.perf_counter() - started, 2),
               "cpu_s": round(time.process_time() - cpu, 2),
               "load_average_after": _load_average(),
               "liveness_checks": _liveness_checks(sim),
               "datagrams": sim.net.stats["sent"] - sent_before,
               "requests_not_sent": _requests_not_sent(sim),
               "virtual_time_s": round(sim.net.now, 1),
               **collector.figures()}
        row["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        rows.append(row)
        if emit is not None:
            emit(row)
    return rows


def _load_average() -> float | None:
    """The machine's 1-minute load average (other processes compete for the CPUs: wall times
    are then upper bounds, and ``*_cpu_s`` says what this process itself used)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # pragma: no cover - not POSIX
        return None


def _liveness_checks(sim: Sim) -> dict[str, int]:
    """The engines' liveness checks of full buckets so far, summed (``stats()["liveness_checks"]``)."""
    total: dict[str, int] = {}
    for engine in sim.engines:
        for key, value in engine.stats()["liveness_checks"].items():
            total[key] = total.get(key, 0) + value
    return total


def _requests_not_sent(sim: Sim) -> int:
    """Requests and lookups refused by the engines' caps so far (``outstanding_full`` and
    ``lookups_full`` drops, summed over live engines): non-zero means a cap shaped the figures."""
    total = 0
    for address, engine in zip(sim.addresses, sim.engines):
        if not sim.net.is_crashed(address):
            drops = engine.stats()["drops"]
            total += drops["outstanding_full"] + drops["lookups_full"]
    return total


def _child(size: int, args: argparse.Namespace, queue) -> None:
    try:
        measure_size(size, args, lambda row: queue.put(("row", row)))
        queue.put(("done", None))
    except BaseException as exc:  # report, then let the parent fail
        import traceback

        queue.put(("error", "".join(traceback.format_exception(exc))))


def run_size(size: int, args: argparse.Namespace, emit) -> None:
    """Measure one size in a forked child (a fresh heap for the memory figure), giving each
    condition's row to ``emit`` as it arrives."""
    if not hasattr(os, "fork"):  # pragma: no cover - not POSIX
        measure_size(size, args, emit)
        return
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child, args=(size, args, queue))
    child.start()
    try:
        while True:
            status, payload = queue.get()
            if status == "row":
                emit(payload)
            elif status == "done":
                break
            else:
                raise RuntimeError(f"size {size} failed in its child process:\n{payload}")
    finally:
        child.join()


# --- output -------------------------------------------------------------------------------------


def print_table(rows: list[dict[str, Any]]) -> None:
    head = (f"{'nodes':>8} {'condition':<25} {'success':>8} {'to-target':>9} {'rounds':>6} "
            f"{'requests':>8} {'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7} {'B/node':>8} {'joined':>8} {'wall s':>7}")
    print(head)
    for r in rows:
        print(f"{r['nodes']:>8} {r['condition']:<25} {r['success_rate']:>8.3f} "
              f"{_fmt(r['median_rounds_to_target']):>9} {_fmt(r['median_rounds']):>6} "
              f"{_fmt(r['median_requests']):>8} {_fmt(r['p50_ms']):>7} {_fmt(r['p95_ms']):>7} "
              f"{_fmt(r['p99_ms']):>7} {r['bytes_per_node']:>8} "
              f"{'protocol' if r['joined_by_protocol'] else 'global':>8} {r['wall_s']:>7}")
    if rows:
        r = rows[0]
        print(f"sessions: {r['sessions']}; latency: log-normal one-way, median "
              f"{LATENCY_MODEL['median_ms']:.0f} ms, sigma(ln) {LATENCY_SIGMA}; memory: RSS delta per node")


def _fmt(value) -> str:
    return "-" if value is None else f"{value:g}"


def plot(rows: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for condition in CONDITIONS:
        mine = sorted((r for r in rows if r["condition"] == condition), key=lambda r: r["nodes"])
        if not mine:
            continue
        sizes = [r["nodes"] for r in mine]
        line, = left.plot(sizes, [r["median_rounds"] for r in mine], marker="o", label=f"{condition}: to the end")
        left.plot(sizes, [r["median_rounds_to_target"] for r in mine], marker="x", linestyle="--",
                  color=line.get_color(), label=f"{condition}: to the target")
        right.plot(sizes, [r["median_requests"] for r in mine], marker="o", label=condition)
    for axis, title in ((left, "median rounds per lookup"), (right, "median requests per lookup")):
        axis.set_xscale("log")
        axis.set_xlabel("nodes (simulated)")
        axis.set_title(title)
        axis.grid(True, which="both", alpha=0.3)
        axis.set_ylim(bottom=0)
    left.legend(fontsize=7)
    right.legend(fontsize=7)
    sessions = rows[0]["sessions"] if rows else ""
    fig.suptitle(f"sovereign_discovery lookups in the simulator (k=20, α=3, {sessions} sessions)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100,1000", help="comma-separated node counts (100,1000)")
    parser.add_argument("--lookups", type=int, default=200, help="record lookups per size and condition (200)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--sessions", choices=("simulated", "real"), default="simulated",
                        help="session layer of every engine (simulated: no crypto; real: the library's)")
    parser.add_argument("--engine-caps", choices=("default", "lean"), default="default",
                        help="the engines' per-peer table caps: DhtConfig defaults, or lean (less memory)")
    parser.add_argument("--alpha", type=int, default=CONFIG.parallelism,
                        help=f"every engine's lookup parallelism, DhtConfig.parallelism ({CONFIG.parallelism})")
    parser.add_argument("--bucket-bits", type=int, default=CONFIG.bucket_bits,
                        help=f"every engine's Kademlia b, DhtConfig.bucket_bits ({CONFIG.bucket_bits})")
    parser.add_argument("--join-refresh-closest", type=int, default=CONFIG.join_refresh_closest,
                        help="closest peers a join refresh lookup ends at, DhtConfig."
                        f"join_refresh_closest ({CONFIG.join_refresh_closest}; k = the paper's)")
    parser.add_argument("--join", choices=("auto", "protocol", "global"), default="auto",
                        help="network formation: protocol joins, a global view, or auto (by size)")
    parser.add_argument("--protocol-join-max", type=int, default=5000,
                        help="with --join auto, the largest size formed by protocol joins (5000)")
    parser.add_argument("--join-interval", type=float, default=0.01,
                        help="virtual seconds between two joins (announces, refreshes) (0.01)")
    parser.add_argument("--gc", choices=("frozen", "default"), default="frozen",
                        help="the cyclic collector: swept and frozen at batch boundaries, or "
                        "CPython's automatic collection (frozen)")
    parser.add_argument("--conditions", default=",".join(CONDITIONS),
                        help="comma-separated subset of " + ",".join(CONDITIONS))
    parser.add_argument("--json", action="store_true", help="one JSON object per line per size and condition")
    parser.add_argument("--plot", metavar="FILE.png", help="draw rounds and requests against size")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress line on stderr")
    args = parser.parse_args(argv)
    try:
        args.sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        parser.error("--sizes must be comma-separated integers")
    if not args.sizes or min(args.sizes) < 3:
        parser.error("--sizes: every size must be at least 3")
    if args.lookups < 1:
        parser.error("--lookups must be at least 1")
    args.conditions = [c.strip() for c in args.conditions.split(",") if c.strip()]
    unknown = set(args.conditions) - set(CONDITIONS)
    if unknown or not args.conditions:
        parser.error(f"--conditions: unknown {sorted(unknown)}; choose from {', '.join(CONDITIONS)}")
    if args.plot:
        if importlib.util.find_spec("matplotlib") is None:  # checked now, not after a long run
            parser.error("--plot needs matplotlib: pip install -e '.[bench]'")
    if not args.join_interval > 0:
        parser.error("--join-interval must be > 0")
    if not 1 <= args.alpha <= 255:
        parser.error("--alpha must be 1..255")
    if not 1 <= args.bucket_bits <= MAX_BUCKET_BITS:
        parser.error(f"--bucket-bits must be 1..{MAX_BUCKET_BITS}")
    if not 1 <= args.join_refresh_closest <= 255:
        parser.error("--join-refresh-closest must be 1..255")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows: list[dict[str, Any]] = []

    def emit(row: dict[str, Any]) -> None:
        rows.append(row)
        if args.json:
            print(json.dumps(row), flush=True)

    for size in args.sizes:
        run_size(size, args, emit)
    if not args.json:
        print_table(rows)
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
