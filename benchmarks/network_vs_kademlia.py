#!/usr/bin/env python3
"""Real-network benchmark: N nodes over real UDP on 127.0.0.1 in several processes, our
:class:`~sovereign_discovery.aio.DhtNode` against the PyPI ``kademlia==2.2.3`` package's
``kademlia.network.Server`` on the same sizes, in the same run, with the same lookups (issue 6,
part 2).

Run ``python benchmarks/network_vs_kademlia.py [--nodes 200,500,2000] [--processes 4]
[--lookups 1000] [--seed 1] [--join-concurrency 16] [--json] [--plot FILE.png]
[--plot-from FILE.jsonl] [--no-progress]``. Speed is reported, never asserted (the smoke test
``tests/test_benchmark_network_vs_kademlia.py`` checks the output's shape and consistency).

For each size N, two phases, one after the other (ours, then kademlia), each on its own set of
``--processes`` worker processes (this file in a hidden ``--worker ours|kademlia`` mode, started
with ``subprocess`` and coordinated over pipes, one JSON object per line, as
``benchmarks/udp_requests.py`` does; every child is killed when its phase ends, even on error):

1. **Nodes.** Node ``i`` lives in worker ``i % processes``, all nodes of a worker on its one asyncio
   loop. Ours: a ``DhtNode`` on ``127.0.0.1`` port 0 (one UDP socket each) with the identity
   ``Identity.from_seed`` of seeded bytes and the library's default ``DhtConfig`` (see "Settings").
   Theirs: a ``kademlia.network.Server(ksize=20, alpha=3)`` listening on ``127.0.0.1`` port 0 with
   the same node ID (the first 160 bits of SHA-256 of our public key), its protocol class
   subclassed only to count the RPCs it sends and receives. Workers raise their open-file soft
   limit to the hard limit (one socket per node).
2. **Join** (``join_s``): every node but node 0 joins through node 0 (ours: ``bootstrap`` with
   node 0's pinned contact; theirs: ``bootstrap([(host, port)])``), at most
   ``--join-concurrency`` joins at a time per worker, all workers at once. A failed join is
   retried as the library's bootstrap layer retries (``BootstrapConfig``: 5 retries, exponential
   backoff with jitter), on both sides (``join_first_attempt_failures``, ``join_retries``). The
   join time of the whole network runs from the join command until every worker is idle (no
   lookup running and no request awaiting an answer in any of its nodes, confirmed by a second
   round): ours keeps refreshing buckets after ``bootstrap`` returns (Kademlia §2.3), and that is
   part of its join. Joins, announces and the waits for idleness are bounded in time (``120 s +
   0.5 s × N`` each); what did not finish is counted, and a network still busy is noted.
3. **Announce** (``announce_s``): every node publishes. Ours: ``announce()``, its signed record
   STOREd at the k closest of its own ID. Theirs: ``set(node_id, value)``, a value under a key
   derived from the node (kademlia stores it at the k closest of SHA-1(node ID)); the value is the
   node's own signed record bytes from our phase, so both store the same bytes. Then idle again.
4. **Memory** (``bytes_per_node``, ``memory_method: "rss_delta"``): each worker's resident set size
   (``/proc/self/statm``, after ``gc.collect()``) once the network has joined and announced, minus
   its resident set size before it made its first node (libraries imported, loop running), summed
   over the workers and divided by N. The same method on both sides. Kernel socket buffers are not
   in a process's RSS.
5. **Lookups**: the same ``--lookups`` seeded random pairs (source, target), source != target, on
   both networks, one lookup at a time (none overlaps another: each latency is one lookup alone on
   an otherwise idle network). Ours: ``find_record(target ID)``; success means the verified record
   it returns is byte for byte the target's own announced record. Theirs: ``get(target ID)``;
   success means it returns the target's value. Latency: the call's wall time in the source's
   worker (``time.perf_counter``). **Requests per lookup**: ours, ``LookupFinished.requests`` of the
   lookup (FIND_VALUE requests sent, a retry not counted again); theirs, the RPCs the source's
   protocol sent during ``get`` (``find_value`` calls, plus the ``store`` kademlia sends to the
   nearest node without the value, counted by wrapping ``RPCProtocol.__getattr__``, through which
   rpcudp sends every RPC). ``datagrams_per_lookup`` counts every datagram every node sent during
   the lookup phase, divided by the lookups (ours: UDP sockets' ``datagrams_out``, handshakes,
   retries, answers and liveness checks included; theirs: RPCs sent plus RPCs answered).
   Both answer from the source's own storage without any request when the source is one of the
   k nodes holding the value (``local_hits``, and ``p50_ms_without_local_hits``): kademlia's
   ``get`` does, and ours with its default record quorum of 1 (``DhtConfig.record_quorum``: the
   local copy is one valid record; a lookup with 0 requests is counted as a local hit).

Settings (``settings`` in the output): ours runs ``DhtConfig()`` unchanged unless
``--dht NAME=VALUE`` (any ``DhtConfig`` setting, repeatable) or ``--rate-limit`` is given. All our nodes share one IP, 127.0.0.1; the engine gives loopback
sources only its global token bucket (``rate_global_per_s`` = 2,000/s, burst 4,000, per node),
which no node reaches here (``rate_limited`` drops are reported, and should be 0). The session
layer's per-IP cap on outstanding WHOAREYOU challenges (64) applies to 127.0.0.1 as one IP; its
evictions are reported (``session_challenges_evicted``). Every first contact between two of our
nodes costs a handshake (random packet, WHOAREYOU, HANDSHAKE with X25519 and Ed25519); kademlia
has none.

Output: a table per size, or with ``--json`` one JSON object per line per size (at least
``nodes``, ``ours_p50_ms``, ``kademlia_p50_ms``, ``p50_ratio``, ``ours_success``,
``kademlia_success``, ``ours_bytes_per_node``, ``kademlia_bytes_per_node``). ``--plot FILE.png``
draws p50/p95 latency and memory per node against N for both (matplotlib, the ``bench`` extra);
``--plot-from FILE.jsonl`` draws it from saved ``--json`` lines without running anything.
Progress goes to stderr unless ``--no-progress``. If kademlia is not installed its figures are
``null`` and a note says how to install it. A failure (a worker that dies or does not answer in
time) exits 1 with a message on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import importlib.util
import io
import json
import logging
import os
import platform
import pstats
import random
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[1]
_BENCH = Path(__file__).resolve().parent
for _path in (str(_ROOT), str(_BENCH)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from lookup_scaling import Progress, rss_bytes  # noqa: E402
from udp_requests import (  # noqa: E402
    KADEMLIA_ERROR,
    KADEMLIA_INSTALL,
    BenchError,
    Child,
    _calibration_us,
    _cpu_model,
    _emit,
    _fmt,
    _kademlia_version,
    _library_revision,
    _loadavg,
    _percentile as _nearest_rank,
    _StdinCommands,
)

from sovereign_discovery import keys  # noqa: E402
from sovereign_discovery.config import BootstrapConfig  # noqa: E402
from sovereign_discovery.identity import Identity  # noqa: E402

SCRIPT = Path(__file__).resolve()
IMPLS = ("ours", "kademlia")
#: Failed lookups of ours examined after the lookup phase (``failed_lookup_details``).
MAX_POST_MORTEMS = 20
BUCKET_SIZE = 20
PARALLELISM = 3
#: Seconds one lookup may take in a worker before it counts as failed (both sides).
LOOKUP_TIMEOUT_S = 30.0
#: Bounds on the phases (a bigger network gets more time: N × this, plus a floor).
START_S_PER_NODE = 0.05
JOIN_S_PER_NODE = 0.5
PHASE_FLOOR_S = 120.0
#: Slack added to every wait of the parent on a worker.
SLACK_S = 30.0
#: A worker is idle when nothing runs; the parent confirms with a second round.
IDLE_POLL_S = 0.1
#: Retries of a failed join and their backoff: the library's bootstrap-layer defaults.
BOOTSTRAP = BootstrapConfig()
#: Seconds the parent watches the idle network's CPU before the lookups.
IDLE_SAMPLE_S = 2.0
#: Byte length of the filler value kademlia stores when our phase did not run (about a record's).
FILLER_BYTES = 200
TARGETS = {
    "p50_ratio": ("<=", 0.5),
    "ours_success": (">=", 0.999),
    "ours_bytes_per_node_vs_kademlia": ("<=", 1.0),
}
LIBRARY_LOGGERS = ("sovereign_discovery", "kademlia", "rpcudp")


# --- workers -------------------------------------------------------------------------------------


def _raise_nofile() -> list[int]:
    """Raise the open-file soft limit to the hard limit (one UDP socket per node)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass
    return list(resource.getrlimit(resource.RLIMIT_NOFILE))


class OursNetwork:
    """The nodes of one worker: ``DhtNode``s on 127.0.0.1, all on this loop."""

    def __init__(self, config: dict[str, Any]) -> None:
        from sovereign_discovery.node import DhtConfig

        self.dht_config = DhtConfig(**config.get("dht_config", {}))
        self.nodes: dict[int, Any] = {}
        self._watch: dict[int, bytes | None] = {}  # node -> target of its lookup under way
        self._finished: dict[int, Any] = {}  # node -> that lookup's LookupFinished

    async def start(self, index: int, seed: bytes) -> str:
        from sovereign_discovery.aio import DhtNode
        from sovereign_discovery.events import LookupFinished

        watch, finished = self._watch, self._finished

        def on_event(event: Any) -> None:
            if isinstance(event, LookupFinished) and event.target == watch.get(index):
                finished[index] = event

        node = DhtNode(Identity.from_seed(seed), host="127.0.0.1", port=0,
                       config=self.dht_config, on_event=on_event)
        await node.start()
        self.nodes[index] = node
        return node.contact.pinned

    async def join(self, index: int, contact: str) -> bool:
        node = self.nodes[index]
        await node.bootstrap([contact])
        return len(node.engine.table) > 0

    async def announce(self, index: int) -> int:
        return await self.nodes[index].announce()

    def record(self, index: int) -> str | None:
        record = self.nodes[index].record
        return None if record is None else record.encode().hex()

    def busy(self) -> int:
        """Lookups running plus requests awaiting an answer, over every node."""
        total = 0
        for node in self.nodes.values():
            stats = node.engine.stats()
            total += stats["queries_running"] + stats["outstanding_requests"]
        return total

    def _sent(self, node: Any) -> int:
        return sum(s["datagrams_out"] for s in node.stats()["udp"].values())

    async def lookup(self, index: int, target: bytes, expected: bytes) -> dict[str, Any]:
        from sovereign_discovery.errors import LookupTimeoutError

        node = self.nodes[index]
        self._watch[index] = target
        self._finished.pop(index, None)
        sent = self._sent(node)
        error = None
        started = time.perf_counter()
        try:
            record = await asyncio.wait_for(node.find_record(target), LOOKUP_TIMEOUT_S)
        except (LookupTimeoutError, asyncio.TimeoutError) as exc:
            record, error = None, type(exc).__name__
        elapsed = time.perf_counter() - started
        self._watch[index] = None
        finished = self._finished.pop(index, None)
        ok = record is not None and record.encode() == expected
        if record is None and error is None:
            error = "not_found"
        elif record is not None and not ok:
            error = "different_record"
        out = {"ok": ok, "found": record is not None, "ms": elapsed * 1000,
                "local_hit": finished is not None and finished.requests == 0,
                "requests": finished.requests if finished is not None else None,
                "rounds": finished.rounds if finished is not None else None,
                "source_datagrams": self._sent(node) - sent, "error": error}
        if not ok and finished is not None:  # where it ended, for inspect()
            out.update(ended_at=[c.node_id.hex() for c in finished.closest],
                       timed_out=finished.timed_out,
                       rounds_to_target=finished.rounds_to_target)
        return out

    def inspect(self, target: bytes) -> dict[str, Any]:
        """What this worker's nodes know of ``target``: which hold it in their routing table,
        which store its record (a failed lookup's post-mortem)."""
        in_table, holding, closer_known = [], [], {}
        key = int.from_bytes(target, "big")
        for node in self.nodes.values():
            engine = node.engine
            own = int.from_bytes(engine.node_id, "big") ^ key
            closer_known[bytes(engine.node_id).hex()] = sum(
                int.from_bytes(c.node_id, "big") ^ key < own for c in engine.table)
            if engine.table.get(target) is not None:
                in_table.append(bytes(engine.node_id).hex())
            if engine.store.get(target, time.time()) is not None:
                holding.append(bytes(engine.node_id).hex())
        own = next((n for n in self.nodes.values() if bytes(n.engine.node_id) == target), None)
        return {"in_table": in_table, "holding": holding, "closer_known": closer_known,
                "target_table_size": None if own is None else len(own.engine.table)}

    def counters(self) -> dict[str, Any]:
        out = {"datagrams_out": 0, "datagrams_in": 0, "table_size": 0, "sessions": 0,
               "stored_records": 0, "drops": {}, "challenges_evicted": 0, "retried": 0,
               "messages_out": {}, "handshakes": 0}
        for node in self.nodes.values():
            stats = node.stats()
            out["handshakes"] += stats["session"]["handshakes_initiated"]
            _add(out["messages_out"], stats["messages_out"])
            for udp in stats["udp"].values():
                out["datagrams_out"] += udp["datagrams_out"]
                out["datagrams_in"] += udp["datagrams_in"]
            out["table_size"] += stats["table_size"]
            out["sessions"] += stats["sessions"]
            out["stored_records"] += node.engine.store.stats.get("records", 0)
            out["challenges_evicted"] += stats["session"].get("challenges_evicted", 0)
            out["retried"] += stats["requests_retried"]
            _add(out["drops"], stats["drops"])
        return out

    async def close(self) -> None:
        for node in self.nodes.values():
            await node.close()


class KademliaNetwork:
    """The nodes of one worker: ``kademlia.network.Server``s on 127.0.0.1, all on this loop."""

    def __init__(self, config: dict[str, Any]) -> None:
        from kademlia.network import Server
        from kademlia.protocol import KademliaProtocol

        class CountingProtocol(KademliaProtocol):
            """kademlia's protocol, counting the RPCs it sends (every one goes through
            ``RPCProtocol.__getattr__``'s closure) and the requests it receives."""

            def __init__(self, *args: Any) -> None:
                super().__init__(*args)
                self.counts = [0, 0]  # RPCs sent, requests received
                self.by_name: dict[str, int] = {}  # RPCs sent by name

            def __getattr__(self, name: str) -> Any:
                func = super().__getattr__(name)
                if name.startswith("_") or name.startswith("rpc_"):
                    return func
                counts, by_name = self.counts, self.by_name

                def counted(address: Any, *args: Any) -> Any:
                    counts[0] += 1
                    by_name[name] = by_name.get(name, 0) + 1
                    return func(address, *args)

                return counted

            def datagram_received(self, data: bytes, addr: Any) -> None:
                if data[:1] == b"\x00":
                    self.counts[1] += 1
                super().datagram_received(data, addr)

        self._server_class = Server
        self._protocol_class = CountingProtocol
        self.nodes: dict[int, Any] = {}
        self.values: dict[int, bytes] = {int(i): bytes.fromhex(v)
                                         for i, v in config["values"].items()}

    async def start(self, index: int, seed: bytes) -> str:
        server = self._server_class(ksize=BUCKET_SIZE, alpha=PARALLELISM,
                                    node_id=bytes(Identity.from_seed(seed).node_id))
        server.protocol_class = self._protocol_class
        await server.listen(0, interface="127.0.0.1")
        self.nodes[index] = server
        return f"127.0.0.1:{server.transport.get_extra_info('sockname')[1]}"

    async def join(self, index: int, contact: str) -> bool:
        host, _, port = contact.rpartition(":")
        server = self.nodes[index]
        await server.bootstrap([(host, int(port))])
        return sum(len(b.nodes) for b in server.protocol.router.buckets) > 0

    async def announce(self, index: int) -> int:
        server = self.nodes[index]
        before = server.protocol.counts[0]
        ok = await server.set(bytes(server.node.id), self.values[index])
        return (server.protocol.counts[0] - before) if ok else 0  # RPCs: ~k stores + the crawl

    def record(self, index: int) -> str | None:
        return None

    def busy(self) -> int:
        return sum(len(server.protocol._outstanding) for server in self.nodes.values())

    async def lookup(self, index: int, target: bytes, expected: bytes) -> dict[str, Any]:
        from kademlia.utils import digest

        server = self.nodes[index]
        local = server.storage.get(digest(target)) is not None
        sent = server.protocol.counts[0]
        error = None
        started = time.perf_counter()
        try:
            value = await asyncio.wait_for(server.get(target), LOOKUP_TIMEOUT_S)
        except asyncio.TimeoutError as exc:
            value, error = None, type(exc).__name__
        elapsed = time.perf_counter() - started
        requests = server.protocol.counts[0] - sent
        if error is None and value != expected:
            error = "not_found" if value is None else "different_value"
        return {"ok": value == expected, "found": value is not None, "ms": elapsed * 1000,
                "requests": requests, "rounds": None, "source_datagrams": requests,
                "local_hit": local, "error": error}

    def counters(self) -> dict[str, Any]:
        out = {"datagrams_out": 0, "datagrams_in": 0, "table_size": 0, "sessions": 0,
               "stored_records": 0, "drops": {}, "challenges_evicted": 0, "retried": 0,
               "messages_out": {}, "handshakes": 0}
        for server in self.nodes.values():
            _add(out["messages_out"], server.protocol.by_name)
            sent, answered = server.protocol.counts
            out["datagrams_out"] += sent + answered  # each request received gets one answer
            out["datagrams_in"] += answered
            out["table_size"] += sum(len(b.nodes) for b in server.protocol.router.buckets)
            out["stored_records"] += len(server.storage.data)
        return out

    async def close(self) -> None:
        for server in self.nodes.values():
            server.stop()


def _count(items: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        out[item] = out.get(item, 0) + 1
    return out


def _add(total: dict[str, int], counts: dict[str, int]) -> None:
    for key, count in counts.items():
        if count:
            total[key] = total.get(key, 0) + count


async def _bounded(concurrency: int, items: list[int], work, timeout_s: float) -> list[Any]:
    """``work(item)`` for every item, at most ``concurrency`` at a time, all within ``timeout_s``;
    results in order (an exception, a timeout included, is returned as its type name)."""
    semaphore = asyncio.Semaphore(concurrency)
    deadline = time.monotonic() + timeout_s

    async def one(item: int) -> Any:
        async with semaphore:
            try:
                return await asyncio.wait_for(work(item), max(0.0, deadline - time.monotonic()))
            except Exception as exc:  # a failed or unfinished join or announce is counted
                return type(exc).__name__

    return await asyncio.gather(*(one(item) for item in items))


async def worker(impl: str, config: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    for name in LIBRARY_LOGGERS:  # both libraries log per timeout; keep stderr small, equally
        logging.getLogger(name).setLevel(logging.ERROR)
    nofile = _raise_nofile()
    commands: asyncio.Queue = asyncio.Queue()
    _StdinCommands(loop, commands.put_nowait, lambda: commands.put_nowait({"op": "quit"}))
    network = OursNetwork(config) if impl == "ours" else KademliaNetwork(config)
    indices = [int(i) for i in config["indices"]]
    seeds = [bytes.fromhex(s) for s in config["seeds"]]
    gc.collect()
    rss_before = rss_bytes()
    contacts = {}
    for index, seed in zip(indices, seeds):
        contacts[index] = await network.start(index, seed)
    _emit({"op": "ready", "contacts": contacts, "rss_before": rss_before, "nofile": nofile,
           "cpu": time.process_time(), "kernel": keys.KERNEL})

    async def idle(timeout_s: float) -> dict[str, Any]:
        started = time.perf_counter()
        busy = network.busy()
        while busy and time.perf_counter() - started < timeout_s:
            await asyncio.sleep(IDLE_POLL_S)
            busy = network.busy()
        return {"busy": busy, "waited_s": time.perf_counter() - started}

    profiler = None
    while True:
        command = await commands.get()
        op = command.get("op")
        reply: dict[str, Any] = {"op": op}
        if op == "join":
            joiners = [i for i in indices if i != 0]
            started = time.perf_counter()
            attempts: dict[int, list[str]] = {}  # node -> what each failed attempt gave
            rng = random.Random(indices[0])

            async def join(i: int) -> bool:
                # As the library's bootstrap layer does (BootstrapConfig's retries and backoff:
                # 5 retries after 1, 2, 4, 8, 16 s, less up to half), a failed join is tried
                # again, on both sides.
                for attempt in range(BOOTSTRAP.retries + 1):
                    if attempt:
                        await asyncio.sleep(BOOTSTRAP.backoff_delay(attempt, rng))
                    try:
                        if await network.join(i, command["contact"]):
                            return True
                        attempts.setdefault(i, []).append("empty_table")
                    except Exception as exc:
                        attempts.setdefault(i, []).append(type(exc).__name__)
                return False

            results = await _bounded(int(command["concurrency"]), joiners, join,
                                     float(command["timeout_s"]))
            reply.update(joined=sum(r is True for r in results),
                         failures=sum(r is not True for r in results),
                         first_attempt_failures=len(attempts),
                         retries=sum(len(a) for a in attempts.values()),
                         errors=_count(e for a in attempts.values() for e in a),
                         wall_s=time.perf_counter() - started)
        elif op == "announce":
            started = time.perf_counter()
            results = await _bounded(int(command["concurrency"]), indices, network.announce,
                                     float(command["timeout_s"]))
            stored = [r for r in results if isinstance(r, int)]
            reply["errors"] = _count(r for r in results if isinstance(r, str))
            reply.update(stored=stored, failures=sum(not isinstance(r, int) or r == 0
                                                    for r in results),
                         wall_s=time.perf_counter() - started)
        elif op == "idle":
            reply.update(await idle(float(command["timeout_s"])))
        elif op == "memory":
            gc.collect()
            reply.update(rss=rss_bytes(), rss_before=rss_before, nodes=len(indices),
                         maxrss_kib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        elif op == "records":
            reply["records"] = {i: network.record(i) for i in indices}
        elif op == "lookup":
            reply.update(await network.lookup(int(command["source"]),
                                              bytes.fromhex(command["target"]),
                                              bytes.fromhex(command["expected"])))
        elif op == "inspect":
            reply.update(network.inspect(bytes.fromhex(command["target"])))
        elif op == "counters":
            reply.update(network.counters())
        elif op == "profile":  # --profile: cProfile over the lookup phase
            if command["on"]:
                profiler = cProfile.Profile(time.process_time)  # CPU, not wall time
                profiler.enable()
            elif profiler is not None:
                profiler.disable()
                text = io.StringIO()
                pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(
                    int(command.get("top", 25)))
                reply["profile"] = text.getvalue()
                profiler = None
        elif op == "quit":
            await network.close()
            return
        else:
            reply["error"] = f"unknown op {op!r}"
        reply["cpu"] = time.process_time()
        _emit(reply)


def worker_main(args: argparse.Namespace) -> int:
    line = sys.stdin.readline()
    if not line:
        print("worker: no configuration on stdin", file=sys.stderr)
        return 2
    config = json.loads(line)
    if config.get("inject_failure"):
        print("worker: failing on purpose (--inject-failure)", file=sys.stderr)
        return 3

    async def bounded() -> None:
        await asyncio.wait_for(worker(args.worker, config), timeout=float(config["lifetime_s"]))

    try:
        asyncio.run(bounded())
    except asyncio.TimeoutError:
        print("worker: lifetime exceeded; exiting", file=sys.stderr)
        return 4
    return 0


# --- the parent ----------------------------------------------------------------------------------


def _percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100), rounded to 0.01 ms."""
    value = _nearest_rank(sorted(values), q / 100)
    return None if value is None else round(value, 2)


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


class Phase:
    """One implementation's network of N nodes over ``processes`` workers."""

    def __init__(self, impl: str, args: argparse.Namespace, nodes: int, seeds: list[bytes],
                 values: dict[int, bytes] | None, progress: bool) -> None:
        self.impl = impl
        self.args = args
        self.nodes = nodes
        self.seeds = seeds
        self.values = values
        self.progress = progress
        self.processes = min(args.processes, nodes)
        self.workers: list[Child] = []
        self.cpu: list[float] = [0.0] * self.processes  # each worker's CPU at its last reply
        self.out: dict[str, Any] = {"implementation": impl, "processes": self.processes}

    def _say(self, text: str) -> None:
        if self.progress:
            sys.stderr.write(f"[{self.impl} N={self.nodes}] {text}\n")
            sys.stderr.flush()

    def _all(self, command: dict[str, Any], timeout_s: float) -> list[dict[str, Any]]:
        for child in self.workers:
            child.send(command)
        replies = [child.expect("op", command["op"], timeout_s) for child in self.workers]
        for i, reply in enumerate(replies):
            self.cpu[i] = reply["cpu"]
        return replies

    def _cpu_total(self) -> float:
        return sum(self.cpu)

    def _idle(self, budget_s: float) -> dict[str, Any]:
        """Wait until every worker is idle twice in a row (a worker's busy state can be revived
        by another's requests), within ``budget_s``."""
        deadline = time.monotonic() + budget_s
        rounds = 0
        while True:
            rounds += 1
            left = max(0.0, deadline - time.monotonic())
            replies = self._all({"op": "idle", "timeout_s": left}, left + SLACK_S)
            busy = sum(r["busy"] for r in replies)
            if busy and left <= 0:
                return {"idle": False, "busy": busy, "rounds": rounds}
            if not busy and all(r["waited_s"] < IDLE_POLL_S for r in replies):
                return {"idle": True, "busy": 0, "rounds": rounds}

    def _expected(self, target: int) -> bytes:
        """What a lookup of ``target`` must return: its announced record (ours), its value."""
        if self.impl == "ours":
            return bytes.fromhex(self.out["records"].get(target) or "")
        return self.values[target]

    def run(self, pairs: list[tuple[int, int]], node_ids: list[bytes]) -> dict[str, Any]:
        args, out = self.args, self.out
        phase_s = PHASE_FLOOR_S + JOIN_S_PER_NODE * self.nodes
        lifetime = 4 * phase_s + len(pairs) * (LOOKUP_TIMEOUT_S / 10 + 1) + 600
        try:
            started = time.perf_counter()
            for w in range(self.processes):
                indices = list(range(w, self.nodes, self.processes))
                config = {"indices": indices, "seeds": [self.seeds[i].hex() for i in indices],
                          "lifetime_s": lifetime,
                          "inject_failure": args.inject_failure == self.impl and w == 1}
                if self.impl == "ours":
                    config["dht_config"] = _dht_changes(args)
                if self.impl == "kademlia":
                    config["values"] = {i: self.values[i].hex() for i in indices}
                child = Child(f"{self.impl} worker {w}", ["--worker", self.impl], self.workers,
                              script=SCRIPT)
                child.send(config)
            ready = [c.expect("op", "ready", PHASE_FLOOR_S + START_S_PER_NODE * self.nodes)
                     for c in self.workers]
            for i, r in enumerate(ready):
                self.cpu[i] = r["cpu"]
            contacts = {int(k): v for r in ready for k, v in r["contacts"].items()}
            out["start_s"] = round(time.perf_counter() - started, 2)
            out["nofile_limit"] = ready[0]["nofile"]
            out["kernel"] = ready[0]["kernel"]
            self._say(f"{self.nodes} nodes started in {out['start_s']} s; joining")

            cpu0, t0 = self._cpu_total(), time.perf_counter()
            joins = self._all({"op": "join", "contact": contacts[0], "timeout_s": phase_s,
                               "concurrency": args.join_concurrency}, phase_s + SLACK_S)
            out["bootstrap_calls_s"] = round(time.perf_counter() - t0, 2)
            settled = self._idle(phase_s)
            out["join_s"] = round(time.perf_counter() - t0, 2)
            out["join_cpu_s"] = round(self._cpu_total() - cpu0, 2)
            out["joined"] = sum(j["joined"] for j in joins)
            out["join_failures"] = sum(j["failures"] for j in joins)
            out["join_first_attempt_failures"] = sum(j["first_attempt_failures"] for j in joins)
            out["join_retries"] = sum(j["retries"] for j in joins)
            out["join_errors"] = {}
            for j in joins:
                _add(out["join_errors"], j["errors"])
            out["join_idle"] = settled["idle"]
            self._say(f"joined {out['joined']}/{self.nodes - 1} in {out['join_s']} s"
                      f" (bootstrap calls {out['bootstrap_calls_s']} s); announcing")

            cpu0, t0 = self._cpu_total(), time.perf_counter()
            announced = self._all({"op": "announce", "concurrency": args.join_concurrency,
                                   "timeout_s": phase_s}, phase_s + SLACK_S)
            settled = self._idle(phase_s)
            out["announce_s"] = round(time.perf_counter() - t0, 2)
            out["announce_cpu_s"] = round(self._cpu_total() - cpu0, 2)
            stored = [s for a in announced for s in a["stored"]]
            out["announce_failures"] = sum(a["failures"] for a in announced)
            out["announce_errors"] = {}
            for a in announced:
                _add(out["announce_errors"], a["errors"])
            out["announce_median_stored_at" if self.impl == "ours"
                else "announce_median_rpcs"] = statistics.median(stored) if stored else None
            out["announce_idle"] = settled["idle"]

            memory = self._all({"op": "memory"}, SLACK_S)
            out["bytes_per_node"] = round(sum(m["rss"] - m["rss_before"] for m in memory)
                                          / self.nodes)
            out["rss_mib_per_process"] = [round(m["rss"] / 2**20, 1) for m in memory]
            if self.impl == "ours":
                records = self._all({"op": "records"}, SLACK_S)
                out["records"] = {int(k): v for r in records for k, v in r["records"].items()}
            cpu0, t0 = self._cpu_total(), time.perf_counter()
            time.sleep(IDLE_SAMPLE_S)  # what the idle network costs (upkeep timers)
            self._all({"op": "counters"}, SLACK_S)
            out["idle_cpu_per_s"] = round((self._cpu_total() - cpu0)
                                          / (time.perf_counter() - t0), 3)
            before = self._all({"op": "counters"}, SLACK_S)
            if args.profile:
                self._all({"op": "profile", "on": True}, SLACK_S)
            self._say(f"announced in {out['announce_s']} s; {out['bytes_per_node']} B/node;"
                      f" {len(pairs)} lookups")

            cpu0, t0 = self._cpu_total(), time.perf_counter()
            results = self._lookups(pairs, node_ids, "lookups")
            out["lookups_s"] = round(time.perf_counter() - t0, 2)
            out["lookups_cpu_s"] = round(self._cpu_total() - cpu0, 2)
            out["cpu_ms_per_lookup"] = round(out["lookups_cpu_s"] / len(pairs) * 1000, 2)
            if self.impl == "ours":
                out["failed_lookup_details"] = self._post_mortem(pairs, node_ids, results)
            after = self._all({"op": "counters"}, SLACK_S)
            if args.profile:
                profiles = self._all({"op": "profile", "on": False}, SLACK_S)
                out["profile_worker_0"] = profiles[0]["profile"]
            if args.warm_pass:  # the same lookups again: sessions and caches are warm now
                cpu0 = self._cpu_total()
                warm = self._lookups(pairs, node_ids, "warm lookups")
                warm_after = self._all({"op": "counters"}, SLACK_S)
                summary = self._summarize(warm, after, warm_after)
                out["warm_pass"] = {key: summary[key] for key in (
                    "success", "failed_lookups", "lookup_errors", "p50_ms", "p95_ms", "p99_ms",
                    "requests_per_lookup_mean",
                    "datagrams_per_lookup", "messages_per_lookup", "handshakes_per_lookup")}
                out["warm_pass"]["cpu_ms_per_lookup"] = round(
                    (self._cpu_total() - cpu0) / len(pairs) * 1000, 2)
            memory = self._all({"op": "memory"}, SLACK_S)
            out["bytes_per_node_after_lookups"] = round(
                sum(m["rss"] - m["rss_before"] for m in memory) / self.nodes)
            out["maxrss_mib_per_process"] = [round(m["maxrss_kib"] / 1024, 1) for m in memory]
            for child in self.workers:
                child.send({"op": "quit"})
            for child in self.workers:
                try:
                    child.proc.wait(timeout=SLACK_S)
                except Exception:
                    pass
        finally:
            for child in self.workers:
                child.kill()
        out.update(self._summarize(results, before, after))
        return out

    def _post_mortem(self, pairs: list[tuple[int, int]], node_ids: list[bytes],
                     results: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """For the first failed lookups: the global XOR ranks (0 = the target) of the k nodes
        each ended at, and of the nodes that hold the target in their table or store its
        record (asked of every worker now, after the lookups)."""
        details = []
        for (source, target), result in zip(pairs, results):
            if result["ok"] or "ended_at" not in result or len(details) >= MAX_POST_MORTEMS:
                continue
            target_id = node_ids[target]
            key = int.from_bytes(target_id, "big")
            by_distance = sorted(range(self.nodes),
                                 key=lambda i: int.from_bytes(node_ids[i], "big") ^ key)
            rank = {node_ids[i].hex(): r for r, i in enumerate(by_distance)}
            replies = self._all({"op": "inspect", "target": target_id.hex()}, SLACK_S)
            in_table = sorted(rank[h] for r in replies for h in r["in_table"])
            closer = {h: n for r in replies for h, n in r["closer_known"].items()}
            holding = sorted(rank[h] for r in replies for h in r["holding"])
            details.append({
                "source": source, "target": target, "error": result["error"],
                "timed_out": result["timed_out"], "requests": result["requests"],
                "rounds": result["rounds"], "ms": round(result["ms"], 2),
                "ended_at_ranks": sorted(rank.get(h, -1) for h in result["ended_at"]),
                # how many table contacts closer to the target each of them knows
                "ended_at_closer_known": [closer[h] for h in sorted(
                    result["ended_at"], key=lambda h: rank.get(h, -1)) if h in closer],
                "source_rank": rank[node_ids[source].hex()],
                "in_table_ranks": in_table[:3 * BUCKET_SIZE], "in_tables": len(in_table),
                "holding_ranks": holding, "target_table_size": next(
                    (r["target_table_size"] for r in replies if r["target_table_size"] is not None),
                    None)})
        return details

    def _lookups(self, pairs: list[tuple[int, int]], node_ids: list[bytes],
                 label: str) -> list[dict[str, Any]]:
        """The lookups, one at a time, each in the worker of its source."""
        results = []
        bar = Progress(self.progress, f"[{self.impl} N={self.nodes}] {label}", len(pairs))
        for done, (source, target) in enumerate(pairs):
            w = source % self.processes
            child = self.workers[w]
            child.send({"op": "lookup", "source": source, "target": node_ids[target].hex(),
                        "expected": self._expected(target).hex()})
            reply = child.expect("op", "lookup", LOOKUP_TIMEOUT_S + SLACK_S)
            self.cpu[w] = reply["cpu"]
            results.append(reply)
            bar.update(done + 1)
        bar.close()
        return results

    def _summarize(self, results: list[dict[str, Any]], before: list[dict[str, Any]],
                   after: list[dict[str, Any]]) -> dict[str, Any]:
        lookups = len(results)
        ms = [r["ms"] for r in results]
        requests = [r["requests"] for r in results if r["requests"] is not None]
        source_datagrams = [r["source_datagrams"] for r in results]
        sent = sum(a["datagrams_out"] for a in after) - sum(b["datagrams_out"] for b in before)
        drops: dict[str, int] = {}
        messages: dict[str, int] = {}
        for a in after:
            _add(drops, a["drops"])
            _add(messages, a["messages_out"])
        for b in before:
            _add(messages, {k: -v for k, v in b["messages_out"].items()})
        handshakes = sum(a["handshakes"] for a in after) - sum(b["handshakes"] for b in before)
        out = {
            "lookups": lookups,
            "success": round(sum(r["ok"] for r in results) / lookups, 5) if lookups else None,
            "failed_lookups": sum(not r["ok"] for r in results),
            "lookup_errors": _count(r["error"] for r in results if r["error"]),
            "p50_ms": _percentile(ms, 50),
            "p95_ms": _percentile(ms, 95),
            "p99_ms": _percentile(ms, 99),
            "max_ms": round(max(ms), 2) if ms else None,
            "mean_ms": round(statistics.fmean(ms), 2) if ms else None,
            "requests_per_lookup_median": statistics.median(requests) if requests else None,
            "requests_per_lookup_mean": round(statistics.fmean(requests), 2) if requests else None,
            "source_datagrams_per_lookup_mean": (round(statistics.fmean(source_datagrams), 2)
                                                 if source_datagrams else None),
            "datagrams_per_lookup": round(sent / lookups, 1) if lookups else None,
            "messages_per_lookup": {k: round(v / lookups, 2) for k, v in sorted(messages.items())
                                    if v} if lookups else {},
            "handshakes_per_lookup": round(handshakes / lookups, 2) if lookups else None,
            "table_size_mean": round(sum(a["table_size"] for a in after) / self.nodes, 1),
            "stored_records_total": sum(a["stored_records"] for a in after),
            "drops": drops,
        }
        if self.impl == "ours":
            rounds = [r["rounds"] for r in results if r["rounds"] is not None]
            out["rounds_median"] = statistics.median(rounds) if rounds else None
            out["sessions_mean"] = round(sum(a["sessions"] for a in after) / self.nodes, 1)
            out["session_challenges_evicted"] = sum(a["challenges_evicted"] for a in after)
            out["requests_retried"] = sum(a["retried"] for a in after)
            out["rate_limited"] = drops.get("rate_limited", 0)
        out["local_hits"] = sum(bool(r.get("local_hit")) for r in results)
        remote = [r["ms"] for r in results if not r.get("local_hit")]
        out["p50_ms_without_local_hits"] = _percentile(remote, 50)
        return out


def _draw_pairs(rng: random.Random, nodes: int, count: int) -> list[tuple[int, int]]:
    return [tuple(rng.sample(range(nodes), 2)) for _ in range(count)]  # type: ignore[misc]


def measure_size(nodes: int, args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(f"{args.seed}:{nodes}")
    seeds = [rng.randbytes(32) for _ in range(nodes)]
    node_ids = [bytes(Identity.from_seed(s).node_id) for s in seeds]
    pairs = _draw_pairs(rng, nodes, args.lookups)
    progress = not args.no_progress
    row: dict[str, Any] = {
        "nodes": nodes, "processes": min(args.processes, nodes), "lookups": args.lookups,
        "seed": args.seed, "join_concurrency": args.join_concurrency,
        "loadavg_before": _loadavg(), "memory_method": "rss_delta",
        "settings": _settings(args), "notes": [],
    }
    started = time.perf_counter()
    ours = Phase("ours", args, nodes, seeds, None, progress).run(pairs, node_ids)
    records = {i: bytes.fromhex(r) for i, r in ours.pop("records").items() if r}
    row["loadavg_between"] = _loadavg()
    row["ours"] = ours
    kad = None
    if args.skip_kademlia:
        row["notes"].append("--skip-kademlia: ours alone (a diagnostic run), no ratios")
    elif KADEMLIA_ERROR is None:
        # kademlia stores the very bytes of each node's record (a filler if ours announced none).
        values = {i: records.get(i) or random.Random(i).randbytes(FILLER_BYTES)
                  for i in range(nodes)}
        kad = Phase("kademlia", args, nodes, seeds, values, progress).run(pairs, node_ids)
    else:
        row["notes"].append(f"kademlia is not installed ({KADEMLIA_ERROR}): its figures are null;"
                            f" install it with: {KADEMLIA_INSTALL}")
    row["kademlia"] = kad
    row["record_bytes_median"] = (statistics.median(len(r) for r in records.values())
                                  if records else None)
    row["loadavg_after"] = _loadavg()
    row["wall_s"] = round(time.perf_counter() - started, 1)
    for key in ("p50_ms", "p95_ms", "p99_ms", "success", "bytes_per_node", "join_s",
                "requests_per_lookup_mean", "datagrams_per_lookup"):
        name = key.replace("requests_per_lookup_mean", "requests_per_lookup")
        row[f"ours_{name}"] = ours[key]
        row[f"kademlia_{name}"] = kad[key] if kad else None
    row["p50_ratio"] = _ratio(row["ours_p50_ms"], row["kademlia_p50_ms"])
    row["p95_ratio"] = _ratio(row["ours_p95_ms"], row["kademlia_p95_ms"])
    row["bytes_per_node_ratio"] = _ratio(row["ours_bytes_per_node"],
                                         row["kademlia_bytes_per_node"])
    row["targets"] = _targets(row)
    if ours["rate_limited"]:
        row["notes"].append(f"{ours['rate_limited']} requests to our nodes were rate limited")
    if ours["session_challenges_evicted"]:
        row["notes"].append(f"{ours['session_challenges_evicted']} WHOAREYOU challenges were"
                            " evicted (64 per source IP, and all our nodes share 127.0.0.1)")
    for phase in (ours, kad):
        if phase and (not phase["join_idle"] or not phase["announce_idle"]):
            row["notes"].append(f"{phase['implementation']}: the network was still busy when the"
                                " join or announce phase's time ran out")
    return row


def _targets(row: dict[str, Any]) -> dict[str, Any]:
    values = {"p50_ratio": row["p50_ratio"], "ours_success": row["ours_success"],
              "ours_bytes_per_node_vs_kademlia": row["bytes_per_node_ratio"]}
    out = {}
    for name, (op, limit) in TARGETS.items():
        value = values[name]
        met = None if value is None else (value <= limit if op == "<=" else value >= limit)
        out[name] = {"value": value, "limit": f"{op} {limit:g}", "met": met}
    return out


def _dht_changes(args: argparse.Namespace) -> dict[str, Any]:
    """Our nodes' ``DhtConfig`` settings changed from the library's: ``--dht``, then
    ``--rate-limit``."""
    changed = dict(args.dht)
    if args.rate_limit:
        changed.update(rate_global_per_s=args.rate_limit, burst_global=2 * args.rate_limit)
    return changed


def _parse_dht_settings(items: list[str], parser: argparse.ArgumentParser) -> dict[str, Any]:
    """``--dht NAME=VALUE`` items as ``DhtConfig`` keyword arguments, checked by ``DhtConfig``."""
    from sovereign_discovery.node import DhtConfig

    changed: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name:
            parser.error(f"--dht: expected NAME=VALUE, got {item!r}")
        try:
            changed[name] = int(text) if text.lstrip("-").isdigit() else float(text)
        except ValueError:
            parser.error(f"--dht {name}: not a number: {text!r}")
    try:
        DhtConfig(**changed)
    except (TypeError, ValueError) as exc:  # an unknown name, or a value DhtConfig refuses
        parser.error(f"--dht: {exc}")
    return changed


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    from sovereign_discovery.node import DhtConfig

    changed = _dht_changes(args)
    default = DhtConfig(**changed)
    return {
        "ours_dht_config_changed": changed,
        "ours_rate_limits": {
            "loopback_uses": "the global token bucket only (engine rule for loopback sources)",
            "rate_global_per_s": changed.get("rate_global_per_s", default.rate_global_per_s),
            "burst_global": changed.get("burst_global", default.burst_global)},
        "ours": f"DhtNode, k={default.bucket_size}, alpha={default.parallelism}, real sessions",
        "kademlia": f"kademlia.network.Server(ksize={BUCKET_SIZE}, alpha={PARALLELISM}),"
                    " rpcudp wait_timeout 5 s",
        "lookup_timeout_s": LOOKUP_TIMEOUT_S,
    }


def _machine() -> dict[str, Any]:
    return {
        "kernel": keys.KERNEL, "python_version": platform.python_version(),
        "machine": platform.platform(), "cpu_model": _cpu_model(), "cpu_count": os.cpu_count(),
        "calibration_sum_range_1000_us": _calibration_us(),
        "library_revision": _library_revision(),
        "kademlia": {"available": KADEMLIA_ERROR is None, "error": KADEMLIA_ERROR,
                     "version": _kademlia_version()},
    }


# --- output --------------------------------------------------------------------------------------


ROWS = [
    ("lookup latency p50 ms", "p50_ms"), ("lookup latency p95 ms", "p95_ms"),
    ("lookup latency p99 ms", "p99_ms"), ("success", "success"),
    ("requests per lookup (mean)", "requests_per_lookup_mean"),
    ("datagrams per lookup, all nodes", "datagrams_per_lookup"),
    ("memory per node, bytes (RSS delta)", "bytes_per_node"),
    ("  after the lookups", "bytes_per_node_after_lookups"),
    ("join of the whole network, s", "join_s"), ("  CPU s (all workers)", "join_cpu_s"),
    ("announce, s", "announce_s"), ("CPU ms per lookup (all workers)", "cpu_ms_per_lookup"),
    ("mean table size", "table_size_mean"),
]


def print_table(row: dict[str, Any], machine: dict[str, Any]) -> None:
    ours, kad = row["ours"], row["kademlia"] or {}
    print(f"N = {row['nodes']} nodes in {row['processes']} processes, {row['lookups']} lookups,"
          f" seed {row['seed']}; load average {row['loadavg_before']} -> {row['loadavg_after']}")
    width = max(len(label) for label, _ in ROWS)
    print(f"  {'':<{width}}  {'ours':>12}  {'kademlia':>12}")
    for label, key in ROWS:
        print(f"  {label:<{width}}  {_fmt(ours.get(key)):>12}  {_fmt(kad.get(key)):>12}")
    print(f"  p50 ratio {_fmt(row['p50_ratio'])}, p95 ratio {_fmt(row['p95_ratio'])},"
          f" memory ratio {_fmt(row['bytes_per_node_ratio'])}")
    for name, t in row["targets"].items():
        state = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
        print(f"  target {name} {t['limit']}: {_fmt(t['value'])} -> {state}")
    for note in row["notes"]:
        print(f"  note: {note}")


def plot(rows: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = sorted(rows, key=lambda r: r["nodes"])
    sizes = [r["nodes"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for impl, color in (("ours", "tab:blue"), ("kademlia", "tab:orange")):
        label = "sovereign_discovery" if impl == "ours" else "kademlia 2.2.3"
        for q, style in (("p50", "-"), ("p95", "--")):
            values = [r.get(f"{impl}_{q}_ms") for r in rows]
            if any(v is not None for v in values):
                left.plot(sizes, values, marker="o", linestyle=style, color=color,
                          label=f"{label} {q}")
        memory = [r.get(f"{impl}_bytes_per_node") for r in rows]
        if any(v is not None for v in memory):
            right.plot(sizes, [None if v is None else v / 1024 for v in memory], marker="o",
                       color=color, label=label)
    left.set_ylabel("lookup latency, ms (log scale)")
    left.set_yscale("log")
    right.set_ylabel("memory per node, KiB (RSS delta)")
    right.set_ylim(bottom=0)
    for axis, title in ((left, "record lookup latency, real UDP on 127.0.0.1"),
                        (right, "memory per node")):
        axis.set_xscale("log")
        axis.set_xticks(sizes, [str(s) for s in sizes])
        axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axis.set_xlabel("nodes")
        axis.set_title(title, fontsize=10)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# --- command line --------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", default="200",
                        help="comma-separated network sizes, each 2..5000 (200)")
    parser.add_argument("--processes", type=int, default=4,
                        help="worker processes per network (4)")
    parser.add_argument("--lookups", type=int, default=1000,
                        help="lookups per size, the same pairs on both networks (1000)")
    parser.add_argument("--seed", type=int, default=1, help="seed of identities and pairs (1)")
    parser.add_argument("--join-concurrency", type=int, default=16,
                        help="joins (and announces) at a time per worker process (16)")
    parser.add_argument("--rate-limit", type=float, default=None,
                        help="set our nodes' rate_global_per_s (burst twice that); default:"
                        " the library's")
    parser.add_argument("--dht", action="append", default=[], metavar="NAME=VALUE",
                        help="change one of our nodes' DhtConfig settings (repeatable), e.g."
                        " --dht join_refresh_closest=20; default: the library's")
    parser.add_argument("--warm-pass", action="store_true",
                        help="run the same lookups a second time (sessions and caches warm) and"
                        " report them apart (warm_pass)")
    parser.add_argument("--profile", action="store_true",
                        help="cProfile every worker during the lookups; worker 0's top functions"
                        " by own time in the output (profile_worker_0)")
    parser.add_argument("--skip-kademlia", action="store_true",
                        help="run ours alone (diagnosing ours; no kademlia figures, no ratios)")
    parser.add_argument("--json", action="store_true", help="one JSON object per size")
    parser.add_argument("--plot", metavar="FILE.png", help="draw latency and memory against N")
    parser.add_argument("--plot-from", metavar="FILE.jsonl",
                        help="with --plot: draw from saved --json lines, run nothing")
    parser.add_argument("--no-progress", action="store_true", help="no progress on stderr")
    parser.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    parser.add_argument("--inject-failure", choices=IMPLS, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return args
    try:
        args.sizes = [int(s) for s in args.nodes.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--nodes: not a list of integers: {args.nodes!r}")
    if not args.sizes or not all(2 <= s <= 5000 for s in args.sizes):
        parser.error("--nodes: every size must be in 2..5000")
    if not 1 <= args.processes <= 64:
        parser.error("--processes must be in 1..64")
    if not 1 <= args.lookups <= 100_000:
        parser.error("--lookups must be in 1..100000")
    if not 1 <= args.join_concurrency <= 1024:
        parser.error("--join-concurrency must be in 1..1024")
    if args.rate_limit is not None and not args.rate_limit > 0:
        parser.error("--rate-limit must be positive")
    args.dht = _parse_dht_settings(args.dht, parser)
    if args.plot_from and not args.plot:
        parser.error("--plot-from needs --plot")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        parser.error("--plot needs matplotlib: pip install -e '.[bench]'")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args)
    if args.plot_from:
        rows = [json.loads(line) for line in Path(args.plot_from).read_text().splitlines()
                if line.strip()]
        plot(rows, args.plot)
        return 0
    if KADEMLIA_ERROR is not None:
        print(f"network_vs_kademlia: kademlia is not installed ({KADEMLIA_ERROR}); its figures"
              f" will be null. Install it with: {KADEMLIA_INSTALL}", file=sys.stderr)
    machine = _machine()
    rows = []
    try:
        for nodes in args.sizes:
            row = measure_size(nodes, args)
            row["machine"] = machine
            rows.append(row)
            if args.json:
                sys.stdout.write(json.dumps(row) + "\n")
                sys.stdout.flush()
            else:
                print_table(row, machine)
    except BenchError as exc:
        print(f"network_vs_kademlia benchmark failed: {exc}", file=sys.stderr)
        return 1
    if not args.json:
        print(f"machine: {machine['cpu_model']} x{machine['cpu_count']}, {machine['machine']},"
              f" Python {machine['python_version']}, kernel {machine['kernel']},"
              f" kademlia {machine['kademlia']['version']}, calibration"
              f" {machine['calibration_sum_range_1000_us']} µs, commit"
              f" {machine['library_revision']['commit']}")
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
