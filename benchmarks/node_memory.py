#!/usr/bin/env python3
"""Where a real node's memory goes, and how much of it stays: N ``DhtNode``s over real UDP on
127.0.0.1, all in this one process, joined and announced as in ``network_vs_kademlia.py``, then
measured right away and again after ``--wait`` seconds of idleness.

Run ``python benchmarks/node_memory.py [--nodes 200] [--wait 100] [--seed 1] [--top 15]
[--json]``. Figures are reported, never asserted (``tests/test_benchmark_node_memory.py`` checks
the output's shape at a tiny size).

1. **Nodes.** ``--nodes`` ``DhtNode``s on ``127.0.0.1`` port 0 with seeded identities
   (``Identity.from_seed`` of SHA-256 of the seed and the index) and the default ``DhtConfig`` and
   ``SessionLimits``.
2. **Join and announce.** Every node but node 0 runs ``bootstrap`` with node 0's pinned contact,
   16 at a time; then every node runs ``announce()``, 16 at a time; then the process waits until
   no node has a lookup running or a request awaiting an answer (at most 120 s).
3. **Measured** (``after_join``), then again after ``--wait`` seconds in which the nodes run
   their upkeep and nothing else (``after_wait``), each after ``gc.collect()``:
   - ``live_bytes_per_node``: the bytes of live Python objects that ``tracemalloc`` traces, since
     before the first node was made, divided by N. This figure shrinks when state is dropped;
   - ``rss_bytes_per_node``: the growth of the resident set size over the same span, divided by
     N. It does not shrink: the allocator keeps freed memory for reuse, so it shows the peak.
     ``tracemalloc`` adds its own bookkeeping to it, so compare it only between runs of this
     script (``network_vs_kademlia.py`` measures RSS without ``tracemalloc``);
   - ``sessions_per_node`` (of which ``unvalidated_sessions_per_node`` are 0-RTT sessions whose
     peer has not sent in them), ``table_per_node`` (routing-table contacts), and
     ``top``: the ``--top`` source lines holding the most live bytes, per node.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import json
import linecache
import logging
import os
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sovereign_discovery.aio import DhtNode  # noqa: E402
from sovereign_discovery.identity import Identity  # noqa: E402

CONCURRENCY = 16
IDLE_TIMEOUT_S = 120.0
IDLE_POLL_S = 0.1


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def _bounded(items: list[Any], work) -> None:
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(item: Any) -> None:
        async with gate:
            await work(item)

    await asyncio.gather(*(one(item) for item in items))


async def _idle(nodes: list[DhtNode]) -> bool:
    deadline = time.monotonic() + IDLE_TIMEOUT_S
    while time.monotonic() < deadline:
        busy = 0
        for node in nodes:
            stats = node.engine.stats()
            busy += stats["queries_running"] + stats["outstanding_requests"]
        if not busy:
            return True
        await asyncio.sleep(IDLE_POLL_S)
    return False


def _measure(nodes: list[DhtNode], rss_before: int, top: int) -> dict[str, Any]:
    gc.collect()
    n = len(nodes)
    snapshot = tracemalloc.take_snapshot()
    lines = []
    for stat in snapshot.statistics("lineno")[:top]:
        frame = stat.traceback[0]
        lines.append({"bytes_per_node": round(stat.size / n), "objects_per_node": round(stat.count / n, 1),
                      "where": f"{Path(frame.filename).name}:{frame.lineno}",
                      "code": linecache.getline(frame.filename, frame.lineno).strip()[:100]})
    sessions = [node.engine.session.stats for node in nodes]
    return {
        "live_bytes_per_node": round(tracemalloc.get_traced_memory()[0] / n),
        "rss_bytes_per_node": round((rss_bytes() - rss_before) / n),
        "sessions_per_node": round(sum(s["sessions"] for s in sessions) / n, 1),
        "unvalidated_sessions_per_node": round(sum(s["unvalidated_sessions"] for s in sessions) / n, 1),
        "sessions_unused_dropped": sum(s.get("sessions_unused", 0) for s in sessions),
        "sessions_idle_dropped": sum(s["sessions_idle"] for s in sessions),
        "table_per_node": round(sum(len(node.engine.table) for node in nodes) / n, 1),
        "top": lines,
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    logging.getLogger("sovereign_discovery").setLevel(logging.ERROR)
    gc.collect()
    rss_before = rss_bytes()
    tracemalloc.start(1)
    nodes: list[DhtNode] = []
    try:
        for i in range(args.nodes):
            seed = hashlib.sha256(b"node_memory %d %d" % (args.seed, i)).digest()
            nodes.append(await DhtNode(Identity.from_seed(seed), host="127.0.0.1", port=0).start())
        started = time.perf_counter()
        entry = nodes[0].contact.pinned
        await _bounded(nodes[1:], lambda node: node.bootstrap([entry]))
        await _bounded(nodes, lambda node: node.announce())
        idle = await _idle(nodes)
        out: dict[str, Any] = {"nodes": args.nodes, "seed": args.seed, "wait_s": args.wait,
                               "join_and_announce_s": round(time.perf_counter() - started, 2),
                               "went_idle": idle}
        out["after_join"] = _measure(nodes, rss_before, args.top)
        if args.wait > 0:
            await asyncio.sleep(args.wait)
            out["after_wait"] = _measure(nodes, rss_before, args.top)
        return out
    finally:
        tracemalloc.stop()
        for node in nodes:
            await node.close()


def _print(out: dict[str, Any]) -> None:
    print(f"{out['nodes']} nodes in one process, joined and announced in {out['join_and_announce_s']} s")
    for phase in ("after_join", "after_wait"):
        if phase not in out:
            continue
        m = out[phase]
        label = phase if phase == "after_join" else f"after {out['wait_s']:g} s idle"
        print(f"\n{label}: {m['live_bytes_per_node']:,} live bytes per node (RSS growth "
              f"{m['rss_bytes_per_node']:,}), {m['sessions_per_node']} sessions "
              f"({m['unvalidated_sessions_per_node']} unvalidated), table {m['table_per_node']}; "
              f"dropped: {m['sessions_unused_dropped']} unused, {m['sessions_idle_dropped']} idle")
        for line in m["top"]:
            print(f"  {line['bytes_per_node']:>7,} B {line['objects_per_node']:>6} obj  {line['where']:<24} {line['code']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=200, help="DhtNodes in this process (200)")
    parser.add_argument("--wait", type=float, default=100.0,
                        help="seconds of idleness before the second measurement (100; 0: none)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--top", type=int, default=15, help="source lines listed per measurement (15)")
    parser.add_argument("--json", action="store_true", help="one JSON object")
    args = parser.parse_args(argv)
    if args.nodes < 2:
        parser.error("--nodes must be >= 2")
    if not args.wait >= 0:
        parser.error("--wait must be >= 0")
    if args.top < 0:
        parser.error("--top must be >= 0")
    out = asyncio.run(run(args))
    if args.json:
        print(json.dumps(out))
    else:
        _print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
