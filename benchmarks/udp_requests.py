#!/usr/bin/env python3
"""UDP request benchmark: how many requests per second one ``DhtNode`` answers over real UDP on
127.0.0.1 from a client in another process (authenticated PING and FIND_NODE), against a PyPI
``kademlia==2.2.3`` node (rpcudp) answering its ``ping`` RPC, in the same run on the same machine.

Run ``python benchmarks/udp_requests.py [--duration S] [--repeat R] [--table-size N]
[--window W] [--clients C] [--profile] [--json]``. Speed is reported, never asserted (the smoke test
``tests/test_benchmark_udp_requests.py`` checks only the shape and consistency of the output).

Processes (every one is this file, started with ``subprocess`` and a hidden mode):

- **the parent** draws the routing-table contacts, starts the others, coordinates them through
  pipes (one JSON object per line), and kills every child it started when it ends, even on error;
- **our server** (``--serve ours``): a real :class:`sovereign_discovery.aio.DhtNode` on
  ``127.0.0.1`` (its own ``UdpEndpoint``, engine, session layer), with the token buckets raised to
  10⁹ requests/s (``rate_per_ip_per_s``, ``burst_per_ip``, ``rate_global_per_s``, ``burst_global``:
  the defaults, 50/s per IP, would refuse a one-IP benchmark) and its routing table filled with
  ``--table-size`` contacts inserted directly into ``node.engine.table``. It prints its pinned
  contact line (``node.contact.pinned``), then answers ``mark`` (its CPU time, clock and message
  counters), ``profile on|off`` and ``stats`` on its stdin;
- **the kademlia server** (``--serve kademlia``): a ``kademlia.network.Server`` listening on
  ``127.0.0.1`` with the same node ID and the same table contacts (``router.add_contact``), its
  protocol class subclassed only to count the ``ping`` / ``find_node`` RPCs it answers;
- **clients** (``--client ours|kademlia``): cheap on purpose, so that the server is the bottleneck.
  Ours speaks the protocol with the library's own sans-IO parts over a plain connected UDP socket:
  one :class:`~sovereign_discovery.session.SessionLayer` handshake (answered by a PING), then a
  window of ``--window`` requests in flight (``wire.encode_message`` bytes of ``Ping`` /
  ``FindNode`` with each request's ID spliced in, sealed in the session's ``Cipher`` from
  ``SessionLayer.session_cipher``: the packets ``SessionLayer.send`` would make), keyed by request
  ID and refilled as answers arrive. An answer counts only if the session authenticated it,
  its request ID is one in flight and its type is the expected one (PONG / NODES, with a plausible
  NODES header); every 256th answer is also fully decoded with ``wire.decode_message``. The kademlia
  client sends rpcudp datagrams itself (``0x00 || msg_id (20) || msgpack([name, args])``, exactly
  what ``RPCProtocol`` sends) and counts an answer only if it is ``0x01 || msg_id`` of a request in
  flight with the expected body (the server's node ID for ping; a msgpack array for find_node, fully
  unpacked every 256th). rpcudp itself would add a future, a timer and two tasks per call to the
  client. Requests unanswered after ``--timeout`` are counted lost and replaced. Both clients
  read and write in batches (``recvmmsg`` / ``sendmmsg`` through ``sovereign_discovery.fastpath``'s
  ``recv_batch`` / ``send_batch``).

One measurement: the clients handshake, then on ``go`` send for ``--warmup`` seconds, then for
``--duration`` seconds (the window), then stop sending and wait up to ``--timeout`` for what is in
flight. The parent asks the server for a ``mark`` when the window opens and when it closes. Both
servers run for the whole benchmark and the four measurements (ours PING, ours FIND_NODE,
kademlia ping, kademlia find_node) run in ``--repeat`` alternating rounds, so that the machine's
ups and downs fall on all of them; each figure is the median over the rounds (the counts shown are
those of the round with the median rate, and ``repeats`` lists every round). Figures:

- ``*_per_s``: answers the clients received inside the window / the window's length (client
  clocks; several clients are summed);
- ``cpu_us_per_request``: the server process's own CPU time (``time.process_time()``: user + sys,
  all threads) between the two marks, divided by the FIND_NODE requests it answered between them
  (its NODES messages out). Both counts come from the server at the same instants, so the ratio
  does not depend on how quickly the parent's marks arrive;
- ``server_kernel_cpu_fraction``: the share of the server's CPU time spent in the kernel
  (``os.times().system``: system calls and, on loopback, the network stack of both directions);
- ``server_cpu_utilization`` and ``client_cpu_utilization``: CPU seconds / wall seconds in the
  window, per process; the side near 1.0 is the one that saturates (``bottleneck``);
- ``server_runqueue_wait_fraction`` (Linux ``/proc/self/schedstat``: runnable but waiting for a
  CPU) and ``server_cpu_steal_fraction`` (``/proc/stat``: the server's virtual CPU given to another
  machine by the hypervisor) say whether something else competed during a window;
- latency percentiles (request sent to answer received, client side), loss, counts.

Both servers run with fixed glibc malloc thresholds (``GLIBC_TUNABLES``, see
``SERVER_MALLOC_TUNABLES``; ``--default-malloc`` to disable): asyncio's datagram transport under
kademlia allocates a 256 KiB buffer per datagram, and whether glibc serves it from the heap or by
mmap/munmap depends on the process's history, so kademlia's ping cost ~100 µs in some runs and
~150 µs in others. The fixed thresholds give it its fast case every time. Our server (1,281-byte
reads) is not affected.

With two or more CPUs the servers are pinned to the first and the clients to the others
(``os.sched_setaffinity``; ``--no-pin`` to disable), so "on one core" means one core. With
``--profile`` one more FIND_NODE measurement runs with ``cProfile`` on in our server; its rate is
reported apart (profiling slows the server) with the top functions by own time.

``--json`` prints exactly one JSON object on stdout; otherwise a readable table. ``targets``
says whether each target of the issue was met. If kademlia is not installed, its figures are
``null`` and a note says how to install it. A failure (a child that dies, a handshake that never
completes, a server that answers nothing) exits non-zero with a message on stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import resource
import select
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from sovereign_discovery import keys  # noqa: E402
from sovereign_discovery.fastpath import MAX_BATCH, recv_batch, send_batch  # noqa: E402
from sovereign_discovery.addresses import Address  # noqa: E402
from sovereign_discovery.identity import Identity  # noqa: E402
from sovereign_discovery.routing import Contact, Inserted, RoutingTable  # noqa: E402

try:
    import kademlia
    import umsgpack

    KADEMLIA_FILE: str | None = kademlia.__file__
    KADEMLIA_ERROR: str | None = None
except ImportError as _exc:  # the comparison is optional
    umsgpack = None  # type: ignore[assignment]
    KADEMLIA_FILE = None
    KADEMLIA_ERROR = f"{type(_exc).__name__}: {_exc}"

KADEMLIA_INSTALL = "pip install 'sovereign-discovery[bench]'"
SCRIPT = Path(__file__).resolve()
BUCKET_SIZE = 20
#: The server's token buckets in this benchmark (the defaults would refuse a one-IP benchmark).
BENCH_RATE = 1e9
#: Identities drawn at most while filling the table (~100 µs each here).
MAX_FILL_DRAWS = 150_000
#: Every this many answers a client fully decodes one (wire.decode_message / umsgpack.unpackb).
VERIFY_EVERY = 256
#: Latency samples kept per client at most.
MAX_LATENCY_SAMPLES = 200_000
HANDSHAKE_TIMEOUT_S = 10.0
#: Slack added to every wait of the parent on a child.
SLACK_S = 15.0
TARGETS = {
    "ours_find_node_per_s": (">=", 10_000),
    "ratio_find_node_vs_kademlia_ping": (">=", 5.0),
    "cpu_us_per_request": ("<=", 40.0),
}

PING, PONG, FIND_NODE, NODES = 0x01, 0x02, 0x03, 0x04
#: glibc malloc settings for both servers (docs/benchmarks.md): asyncio's datagram transport,
#: under kademlia, allocates a 256 KiB buffer per datagram received, and whether glibc serves it
#: from the heap or with mmap/munmap depends on the process's allocation history (its dynamic
#: mmap threshold): kademlia's ping then costs ~100 or ~150 µs from run to run. Fixed thresholds
#: give it its fast, steady case. Our server reads into 1,281-byte buffers and is not affected.
SERVER_MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=4194304:glibc.malloc.trim_threshold=67108864"
REQUEST_TYPES = frozenset((0x01, 0x03, 0x05, 0x07, 0x09, 0x0A))  # wire.MessageType requests


class BenchError(RuntimeError):
    """A measurement could not be made (reported on stderr, exit status 1)."""


# --- small helpers -------------------------------------------------------------------------------


def _emit(obj: dict[str, Any]) -> None:
    """One JSON line on stdout (the pipe to the parent)."""
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _pin(cpu: int | None) -> None:
    if cpu is not None and cpu >= 0 and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cpu})


def _schedstat() -> list[int] | None:
    """[ns on a CPU, ns runnable but waiting for one] of this (single-threaded) process, from
    Linux's /proc/self/schedstat; None elsewhere. The wait shows CPU contention: a process that
    always has work is on a CPU or waiting for one."""
    try:
        run_ns, wait_ns, _ = Path("/proc/self/schedstat").read_text().split()
        return [int(run_ns), int(wait_ns)]
    except (OSError, ValueError):
        return None


def _cpu_ticks(cpu: int | None) -> list[int] | None:
    """[all ticks, steal ticks] of ``cpu`` (or of all CPUs) from Linux's /proc/stat. Steal is time
    the hypervisor gave this virtual CPU's turn to another machine: invisible to the process, it
    shows up only as a slower run."""
    name = "cpu" if cpu is None else f"cpu{cpu}"
    try:
        for line in Path("/proc/stat").read_text().splitlines():
            fields = line.split()
            if fields and fields[0] == name:
                ticks = [int(x) for x in fields[1:9]]
                return [sum(ticks), ticks[7] if len(ticks) > 7 else 0]
    except (OSError, ValueError):
        pass
    return None


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _kademlia_version() -> str | None:
    if KADEMLIA_ERROR is not None:
        return None
    try:
        from importlib.metadata import version

        return version("kademlia")
    except Exception:  # pragma: no cover - metadata missing
        return None


def _percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[index]


# --- the table contacts --------------------------------------------------------------------------


def make_table(seed: int, size: int, max_draws: int = MAX_FILL_DRAWS) -> dict[str, Any]:
    """The server's identity seed and the contacts its table holds: real Ed25519 identities
    (``Identity.from_seed`` of seeded random bytes, so a run is reproducible) drawn until a
    ``RoutingTable`` of the server's ID holds ``size`` of them (or ``max_draws`` were drawn).
    Random IDs fill a table as a real network does: prefix length ``b`` gets a 2^-(b+1) share, so
    about 11,000 draws give 200 contacts (20 per prefix length 0..9). Addresses are 127.1.x.y
    loopback addresses nobody listens on (the server sends there only a liveness check, if any)."""
    rng = random.Random(seed)
    server_seed = rng.randbytes(32)
    server_id = Identity.from_seed(server_seed).node_id
    table = RoutingTable(server_id, bucket_size=BUCKET_SIZE)
    held: list[Contact] = []
    draws = 0
    started = time.perf_counter()
    while len(table) < size and draws < max_draws:
        draws += 1
        public_key = Identity.from_seed(rng.randbytes(32)).public_key
        address = Address(f"127.1.{(draws >> 8) & 255}.{draws & 255}", 1024 + draws % 60_000)
        contact = Contact(public_key, address)
        if isinstance(table.insert(contact, 0.0), Inserted):
            held.append(contact)
    # The table keeps at most 20 per prefix length and never evicts: only Inserted ones stay.
    assert len(held) == len(table)
    return {
        "server_seed": server_seed.hex(),
        "server_id": server_id.hex(),
        "contacts": held,
        "draws": draws,
        "seconds": round(time.perf_counter() - started, 2),
        "bucket_sizes": table.bucket_sizes(),
    }


# --- servers -------------------------------------------------------------------------------------


class _StdinCommands:
    """Lines from stdin on the running loop; EOF (the parent is gone) stops the server."""

    def __init__(self, loop, handle, stop) -> None:
        self._buffer = b""
        self._handle = handle
        self._stop = stop
        self._loop = loop
        self._fd = sys.stdin.fileno()
        os.set_blocking(self._fd, False)
        loop.add_reader(self._fd, self._ready)

    def _ready(self) -> None:
        try:
            chunk = os.read(self._fd, 65536)
        except BlockingIOError:
            return
        if not chunk:
            self._loop.remove_reader(self._fd)
            self._stop()
            return
        self._buffer += chunk
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            if line.strip():
                self._handle(json.loads(line))


async def serve_ours(config: dict[str, Any]) -> None:
    import asyncio
    import cProfile
    import io
    import pstats

    from sovereign_discovery.aio import DhtNode
    from sovereign_discovery.node import DhtConfig

    loop = asyncio.get_running_loop()
    identity = Identity.from_seed(bytes.fromhex(config["server_seed"]))
    rate = float(config["rate"])
    dht_config = DhtConfig(rate_per_ip_per_s=rate, burst_per_ip=rate, rate_global_per_s=rate,
                           burst_global=rate)
    done = loop.create_future()
    profiler = cProfile.Profile()
    profiling = False

    async with DhtNode(identity, host="127.0.0.1", port=0, config=dht_config) as node:
        table = node.engine.table
        now = loop.time()
        for public_key, address in config["contacts"]:
            table.insert(Contact(bytes.fromhex(public_key), Address.parse(address)), now)

        def mark() -> dict[str, Any]:
            stats = node.stats()
            drops = {k: v for k, v in stats["drops"].items() if v}
            return {"t": time.monotonic(), "cpu": time.process_time(), "sys": os.times().system,
                    "sched": _schedstat(),
                    "in": stats["messages_in"],
                    "out": stats["messages_out"], "drops": drops, "table_size": stats["table_size"],
                    "sessions": stats["sessions"], "udp": stats["udp"]}

        def handle(command: dict[str, Any]) -> None:
            nonlocal profiling
            op = command.get("op")
            if op == "mark":
                _emit({"op": "mark", **mark()})
            elif op == "profile":
                if command["on"] and not profiling:
                    profiler.enable()
                    profiling = True
                elif not command["on"] and profiling:
                    profiler.disable()
                    profiling = False
                _emit({"op": "profile", "on": profiling})
            elif op == "stats":
                out = {"op": "stats", **mark(), "stats": node.stats(),
                       "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}
                if command.get("profile"):
                    text = io.StringIO()
                    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
                    out["profile"] = text.getvalue()
                _emit(out)
            elif op == "quit":
                if not done.done():
                    done.set_result(None)

        def stop() -> None:
            if not done.done():
                done.set_result(None)

        _StdinCommands(loop, handle, stop)
        _emit({"op": "ready", "pinned": node.contact.pinned, "table_size": len(table),
               "node_id": node.node_id.hex(), "kernel": keys.KERNEL,
               "config": {"rate_per_ip_per_s": rate, "burst_per_ip": rate,
                          "rate_global_per_s": rate, "burst_global": rate}})
        await asyncio.wait_for(done, timeout=float(config["lifetime_s"]))


async def serve_kademlia(config: dict[str, Any]) -> None:
    import asyncio

    from kademlia.network import Server
    from kademlia.node import Node
    from kademlia.protocol import KademliaProtocol

    loop = asyncio.get_running_loop()
    answered = {"ping": 0, "find_node": 0}

    class CountingProtocol(KademliaProtocol):
        """kademlia's protocol, counting the RPCs it answers (one dict increment each)."""

        def rpc_ping(self, sender, nodeid):
            answered["ping"] += 1
            return super().rpc_ping(sender, nodeid)

        def rpc_find_node(self, sender, nodeid, key):
            answered["find_node"] += 1
            return super().rpc_find_node(sender, nodeid, key)

    server = Server(ksize=BUCKET_SIZE, node_id=bytes.fromhex(config["server_id"]))
    server.protocol_class = CountingProtocol
    await server.listen(0, interface="127.0.0.1")
    done = loop.create_future()
    try:
        router = server.protocol.router
        for node_id, host, port in config["kademlia_contacts"]:
            router.add_contact(Node(bytes.fromhex(node_id), host, port))
        held = sum(len(b.nodes) for b in router.buckets)
        port = server.transport.get_extra_info("sockname")[1]

        def mark() -> dict[str, Any]:
            return {"t": time.monotonic(), "cpu": time.process_time(), "sys": os.times().system,
                    "sched": _schedstat(),
                    "answered": dict(answered)}

        def handle(command: dict[str, Any]) -> None:
            op = command.get("op")
            if op == "mark":
                _emit({"op": "mark", **mark()})
            elif op == "stats":
                _emit({"op": "stats", **mark(),
                       "table_size": sum(len(b.nodes) for b in router.buckets),
                       "buckets": len(router.buckets),
                       "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss})
            elif op == "quit" and not done.done():
                done.set_result(None)

        def stop() -> None:
            if not done.done():
                done.set_result(None)

        _StdinCommands(loop, handle, stop)
        _emit({"op": "ready", "port": port, "node_id": server.node.id.hex(), "table_size": held,
               "buckets": len(router.buckets)})
        await asyncio.wait_for(done, timeout=float(config["lifetime_s"]))
    finally:
        server.stop()


def serve_main(args: argparse.Namespace) -> int:
    import asyncio

    _pin(args.cpu)
    line = sys.stdin.readline()  # the configuration, one JSON line
    if not line:
        print("server: no configuration on stdin", file=sys.stderr)
        return 2
    config = json.loads(line)
    if config.get("inject_failure"):
        print("server: failing on purpose (--inject-failure server)", file=sys.stderr)
        return 3
    runner = serve_ours if args.serve == "ours" else serve_kademlia
    try:
        asyncio.run(runner(config))
    except asyncio.TimeoutError:
        print("server: lifetime exceeded; exiting", file=sys.stderr)
        return 4
    return 0


# --- clients -------------------------------------------------------------------------------------


class _Window:
    """Requests in flight keyed by ID, their send times, and the counts of one client."""

    def __init__(self, window: int, timeout_s: float) -> None:
        self.window = window
        self.timeout_s = timeout_s
        self.inflight: dict[bytes, float] = {}
        self.sent = self.answered = self.lost = self.unexpected = self.verified = 0
        self.server_requests = 0  # requests the server sent us (a liveness check): not answered
        self.late = 0  # answers to requests already counted lost
        self.expired: dict[bytes, None] = {}  # IDs of requests counted lost (bounded, oldest first)
        self.in_window = 0
        self.latencies: list[float] = []

    def expire(self, now: float) -> int:
        """Count requests older than the timeout as lost; return how many."""
        cutoff = now - self.timeout_s
        old = [rid for rid, sent in self.inflight.items() if sent < cutoff]
        expired = self.expired
        for rid in old:
            del self.inflight[rid]
            expired[rid] = None
        while len(expired) > 65536:
            del expired[next(iter(expired))]
        self.lost += len(old)
        return len(old)

    def stray(self, rid: bytes) -> None:
        """An answer whose ID is not in flight: late (its request was counted lost) or
        unexpected."""
        if self.expired.pop(rid, 0) is None:
            self.late += 1
        else:
            self.unexpected += 1


def _wait_go(args: argparse.Namespace) -> None:
    line = sys.stdin.readline()
    if line.strip() != "go":
        raise BenchError(f"client: expected 'go' on stdin, got {line!r}")
    if args.inject_failure == "client":
        raise BenchError("client: failing on purpose (--inject-failure client)")


def _run_window(sock: socket.socket, state: _Window, send_one, on_datagram, outbox: list[bytes],
                warmup_s: float, duration_s: float) -> dict[str, Any]:
    """The measured loop shared by both clients: warm-up, window, drain (all bounded in time).
    Both read and write in batches (recvmmsg / sendmmsg through sovereign_discovery.fastpath's
    recv_batch / send_batch): ``send_one`` appends datagrams to ``outbox``, sent after each batch
    of answers is handled."""
    monotonic = time.monotonic
    inflight = state.inflight
    start = monotonic()
    window_at = start + warmup_s
    end_at = window_at + duration_s
    drain_until = end_at + state.timeout_s
    for _ in range(state.window):
        send_one(start)
    _send_all(sock, outbox)
    sending, opened = True, False
    cpu_open = cpu_close = wall_open = wall_close = 0.0
    sched_open = sched_close = None
    next_expire = start + state.timeout_s / 4
    latencies = state.latencies
    while True:
        batch = recv_batch(sock, MAX_BATCH, 2048)
        now = monotonic()
        for data in batch:
            sent_at = on_datagram(data, now)
            if sent_at is not None and sending:
                if opened:
                    state.in_window += 1
                    if len(latencies) < MAX_LATENCY_SAMPLES:
                        latencies.append(now - sent_at)
                send_one(now)
        if not opened and now >= window_at:
            opened = True
            wall_open, cpu_open, sched_open = now, time.process_time(), _schedstat()
            _emit({"event": "start"})
        if sending and now >= end_at:
            sending = False
            wall_close, cpu_close, sched_close = now, time.process_time(), _schedstat()
            _emit({"event": "end"})
        if not sending and (not inflight or now >= drain_until):
            break
        if now >= next_expire:
            lost = state.expire(now)
            if sending:
                for _ in range(lost):
                    send_one(now)
            next_expire = now + state.timeout_s / 4
        if outbox:
            _send_all(sock, outbox)
        if not batch:
            select.select([sock], [], [], 0.005)
    state.lost += len(inflight)
    inflight.clear()
    latencies = sorted(state.latencies)
    window = wall_close - wall_open
    return {
        "event": "result",
        "sent": state.sent,
        "answered": state.answered,
        "answered_in_window": state.in_window,
        "lost": state.lost,
        "unexpected": state.unexpected,
        "verified_full_decode": state.verified,
        "server_requests": state.server_requests,
        "late": state.late,
        "window_s": window,
        "rate_per_s": state.in_window / window if window > 0 else 0.0,
        "cpu_s_in_window": cpu_close - cpu_open,
        "cpu_utilization": (cpu_close - cpu_open) / window if window > 0 else None,
        "runqueue_wait_fraction": _wait_fraction(sched_open, sched_close, window),
        "latency_ms": {
            "p50": _ms(_percentile(latencies, 0.50)),
            "p90": _ms(_percentile(latencies, 0.90)),
            "p99": _ms(_percentile(latencies, 0.99)),
            "max": _ms(latencies[-1] if latencies else None),
        },
    }


def _send_all(sock: socket.socket, outbox: list[bytes]) -> None:
    """Send and empty ``outbox`` (bounded: waits at most 1 s for the socket to drain)."""
    deadline = time.monotonic() + 1.0
    while outbox:
        sent = send_batch(sock, outbox)
        del outbox[:sent]
        if outbox:
            if time.monotonic() >= deadline:
                raise BenchError(f"client: {len(outbox)} requests could not be sent for 1 s")
            select.select([], [sock], [], 0.01)


def _wait_fraction(first: list[int] | None, last: list[int] | None, wall_s: float) -> float | None:
    if first is None or last is None or wall_s <= 0:
        return None
    return round((last[1] - first[1]) / 1e9 / wall_s, 3)


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 3)


def _connected_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    except OSError:
        pass
    sock.bind(("127.0.0.1", 0))
    sock.connect((host, port))
    sock.setblocking(False)
    return sock


def client_ours(args: argparse.Namespace) -> dict[str, Any]:
    from sovereign_discovery.session import SessionLayer
    from sovereign_discovery.wire import FindNode, Nodes, Ping, decode_message, encode_message

    server = Contact.parse(args.target)
    identity = Identity.from_seed(os.urandom(32))
    layer = SessionLayer(identity)
    host, port = server.address.to_tuple()
    sock = _connected_socket(host, port)
    source = server.address  # a connected socket hears only the server
    state = _Window(args.window, args.timeout)
    inflight = state.inflight
    kind = args.kind
    expected = PONG if kind == "ping" else NODES
    # Requests are wire.encode_message's bytes with the request ID spliced in (type || ID || body):
    # building a FindNode object per request would cost the client ~10 % more. Checked below.
    if kind == "ping":
        bodies = [encode_message(Ping(bytes(8), 0))[9:]]
    else:
        bodies = [encode_message(FindNode(bytes(8), os.urandom(20)))[9:] for _ in range(1024)]
    head = bytes((PING if kind == "ping" else FIND_NODE,))
    probe_rid = os.urandom(8)
    made = head + probe_rid + bodies[0]
    assert made == encode_message(Ping(probe_rid, 0) if kind == "ping"
                                  else FindNode(probe_rid, bodies[0])), "request layout changed"
    mask = len(bodies) - 1
    pack_id = struct.Struct(">Q").pack
    counter = 0
    nodes_counts: dict[int, int] = {}
    send = sock.send
    layer_send, layer_receive = layer.send, layer.receive
    outbox: list[bytes] = []
    own_id = bytes(identity.node_id)
    # After the handshake the client seals and opens in its session's Cipher directly
    # (SessionLayer.session_cipher: the same packets SessionLayer.send makes, without its
    # per-call checks), so that it stays cheaper than the server it loads.
    cipher = None

    def send_one(now: float) -> None:
        nonlocal counter
        counter += 1
        rid = pack_id(counter)
        message = head + rid + bodies[counter & mask]
        if cipher is not None:
            outbox.append(cipher.seal(own_id, message))
        else:
            for out in layer_send(server, message, now):
                outbox.append(out.datagram)
        inflight[rid] = now
        state.sent += 1

    def on_datagram(data: bytes, now: float) -> float | None:
        nonlocal cipher
        message = cipher.open(data) if cipher is not None else None
        if type(message) is bytes:
            return on_message(message)
        # anything else through the session layer (a WHOAREYOU: the server lost the session)
        received = layer_receive(data, source, now)
        for out in received.outgoing:
            send(out.datagram)
        cipher = layer.session_cipher(server.node_id, source, now)
        result = None
        for delivered in received.delivered:
            sent_at = on_message(delivered.message)
            if sent_at is not None:
                result = sent_at
        return result

    def on_message(message: bytes) -> float | None:
        if message[0] in REQUEST_TYPES:
            state.server_requests += 1
            return None
        sent_at = inflight.pop(message[1:9], None)
        if sent_at is None:
            state.stray(message[1:9])
            return None
        if message[0] != expected:
            state.unexpected += 1
            return None
        if expected == NODES:
            total, count = message[9], message[10]
            if total != 1 or not 1 <= count <= BUCKET_SIZE:
                state.unexpected += 1
                return None
            nodes_counts[count] = nodes_counts.get(count, 0) + 1
        state.answered += 1
        if state.answered % VERIFY_EVERY == 1:
            decoded = decode_message(message)
            if kind == "find_node":
                ok = isinstance(decoded, Nodes) and len(decoded.contacts) == message[10]
            else:
                ok = (type(decoded).__name__ == "Pong"
                      and decoded.observed.port == sock.getsockname()[1])
            if not ok:
                raise BenchError(f"answer failed full decoding: {decoded!r}")
            state.verified += 1
        return sent_at

    # The handshake: one PING, answered (the session layer re-sends its random packet if needed).
    deadline = time.monotonic() + HANDSHAKE_TIMEOUT_S
    rid = b"\xff" * 8
    ping = encode_message(Ping(rid, 0))
    answered = False
    last_try = -math.inf
    while not answered:
        now = time.monotonic()
        if now >= deadline:
            raise BenchError(f"client: no answer to the handshake PING from {server.address}"
                             f" in {HANDSHAKE_TIMEOUT_S} s")
        if now - last_try >= 1.0:
            last_try = now
            for out in layer_send(server, ping, now):
                send(out.datagram)
        if not select.select([sock], [], [], 0.05)[0]:
            continue
        try:
            data = sock.recv(2048)
        except BlockingIOError:
            continue
        except ConnectionRefusedError:
            raise BenchError(f"client: {server.address} refused (ICMP port unreachable)") from None
        received = layer_receive(data, source, time.monotonic())
        for out in received.outgoing:
            send(out.datagram)
        answered = any(d.message[:1] == bytes((PONG,)) and d.message[1:9] == rid
                       for d in received.delivered)
    cipher = layer.session_cipher(server.node_id, source, time.monotonic())
    if cipher is None:
        raise BenchError("client: no established session after the handshake")
    _emit({"event": "ready", "handshakes": layer.stats["handshakes_initiated"]})
    _wait_go(args)
    try:
        result = _run_window(sock, state, send_one, on_datagram, outbox, args.warmup, args.duration)
    except ConnectionRefusedError:
        raise BenchError("client: the server's port became unreachable (did it die?)") from None
    result["nodes_per_answer"] = {str(k): v for k, v in sorted(nodes_counts.items())}
    result["session"] = {k: v for k, v in layer.stats.items() if v}
    return result


def client_kademlia(args: argparse.Namespace) -> dict[str, Any]:
    host, _, port = args.target.rpartition(":")
    server_id = bytes.fromhex(args.server_id)
    sock = _connected_socket(host, int(port))
    state = _Window(args.window, args.timeout)
    inflight = state.inflight
    kind = args.kind
    client_id = os.urandom(20)
    prefix = b"\x00"
    if kind == "ping":
        bodies = [umsgpack.packb(["ping", [client_id]])]
        expected_body = umsgpack.packb(server_id)
    else:
        bodies = [umsgpack.packb(["find_node", [client_id, os.urandom(20)]]) for _ in range(1024)]
        expected_body = None
    id_head = os.urandom(12)
    pack_id = struct.Struct(">Q").pack
    counter = 0
    send = sock.send
    array_heads = set(range(0x90, 0xA0)) | {0xDC, 0xDD}
    outbox: list[bytes] = []

    def send_one(now: float) -> None:
        nonlocal counter
        counter += 1
        msg_id = id_head + pack_id(counter)
        outbox.append(prefix + msg_id + bodies[counter & (len(bodies) - 1)])
        inflight[msg_id] = now
        state.sent += 1

    def on_datagram(data: bytes, now: float) -> float | None:
        if data[:1] == b"\x00":  # an rpcudp request to us (e.g. a ping of the table's head)
            state.server_requests += 1
            return None
        if len(data) < 22 or data[0] != 0x01:
            state.unexpected += 1
            return None
        sent_at = inflight.pop(data[1:21], None)
        if sent_at is None:
            state.stray(data[1:21])
            return None
        body = data[21:]
        if expected_body is not None:
            if body != expected_body:
                state.unexpected += 1
                return None
        elif body[0] not in array_heads:
            state.unexpected += 1
            return None
        state.answered += 1
        if state.answered % VERIFY_EVERY == 1:
            value = umsgpack.unpackb(body)
            if kind == "ping":
                ok = value == server_id
            else:
                ok = isinstance(value, list) and all(
                    len(item) == 3 and len(item[0]) == 20 for item in value)
            if not ok:
                raise BenchError(f"kademlia answer failed full decoding: {value!r:.200}")
            state.verified += 1
        return sent_at

    # No handshake in rpcudp: one ping proves the server answers (and registers this client).
    deadline = time.monotonic() + HANDSHAKE_TIMEOUT_S
    probe = b"\x00" + b"\xee" * 20 + umsgpack.packb(["ping", [client_id]])
    while True:
        now = time.monotonic()
        if now >= deadline:
            raise BenchError(f"client: no answer from the kademlia node at {args.target}")
        send(probe)
        if select.select([sock], [], [], 0.5)[0]:
            try:
                data = sock.recv(2048)
            except ConnectionRefusedError:
                raise BenchError(f"client: {args.target} refused (ICMP port unreachable)") from None
            if data[:21] == b"\x01" + b"\xee" * 20:
                break
    _emit({"event": "ready"})
    _wait_go(args)
    try:
        return _run_window(sock, state, send_one, on_datagram, outbox, args.warmup, args.duration)
    except ConnectionRefusedError:
        raise BenchError("client: the kademlia server's port became unreachable (did it die?)"
                         ) from None


def client_main(args: argparse.Namespace) -> int:
    _pin(args.cpu)
    try:
        result = client_ours(args) if args.client == "ours" else client_kademlia(args)
    except BenchError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    _emit(result)
    return 0


# --- the parent ----------------------------------------------------------------------------------


class Child:
    """A child process speaking JSON lines; stderr goes to a temporary file (shown on failure)."""

    def __init__(self, name: str, argv: list[str], children: list["Child"],
                 env: dict[str, str] | None = None, script: Path = SCRIPT) -> None:
        self.name = name
        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([sys.executable, str(script), *argv], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr, cwd=_ROOT, env=env)
        children.append(self)
        self._fd = self.proc.stdout.fileno()
        self._buffer = b""

    def send(self, obj: Any) -> None:
        line = obj if isinstance(obj, str) else json.dumps(obj)
        try:
            self.proc.stdin.write(line.encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise BenchError(f"{self.name} is gone (exit {self.proc.poll()}):"
                             f" {self.error_text()}") from None

    def read(self, timeout_s: float) -> dict[str, Any]:
        """The next JSON line, waiting at most ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"{self.name}: no answer within {timeout_s:.1f} s")
            if select.select([self._fd], [], [], min(left, 0.5))[0]:
                chunk = os.read(self._fd, 1 << 20)
                if not chunk:
                    self.proc.wait(timeout=5)
                    raise BenchError(f"{self.name} exited with status {self.proc.returncode}:"
                                     f" {self.error_text()}")
                self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def expect(self, key: str, value: str, timeout_s: float) -> dict[str, Any]:
        message = self.read(timeout_s)
        if message.get(key) != value:
            raise BenchError(f"{self.name}: expected {key}={value!r}, got {message!r:.300}")
        return message

    def command(self, op: str, timeout_s: float = SLACK_S, **extra: Any) -> dict[str, Any]:
        self.send({"op": op, **extra})
        return self.expect("op", op, timeout_s)

    def error_text(self) -> str:
        try:
            self.stderr.seek(0)
            text = self.stderr.read().decode(errors="replace").strip()
        except (OSError, ValueError):
            return "(stderr unavailable)"
        return text[-2000:] or "(nothing on stderr)"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover - a kill that did not take
            pass
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass
        self.stderr.close()


def _cpus(pin: bool) -> tuple[int | None, list[int | None]]:
    """The server's CPU and the clients' CPUs (None: not pinned)."""
    if not pin or not hasattr(os, "sched_getaffinity"):
        return None, [None]
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, [None]
    return cpus[0], cpus[1:]


def measure(args: argparse.Namespace, server: Child, impl: str, kind: str, target: str,
            client_cpus: list[int | None], children: list[Child], *, server_id: str = "",
            profile: bool = False, server_cpu: int | None = None) -> dict[str, Any]:
    """One measurement: ``args.clients`` clients of ``impl`` sending ``kind`` to ``server``."""
    clients = []
    try:
        for i in range(args.clients):
            cpu = client_cpus[i % len(client_cpus)]
            argv = ["--client", impl, "--kind", kind, "--target", target,
                    "--window", str(args.window), "--duration", str(args.duration),
                    "--warmup", str(args.warmup), "--timeout", str(args.timeout),
                    "--cpu", str(-1 if cpu is None else cpu)]
            if server_id:
                argv += ["--server-id", server_id]
            if args.inject_failure == "client":
                argv += ["--inject-failure", "client"]
            clients.append(Child(f"{impl} client {i} ({kind})", argv, children))
        for client in clients:
            client.expect("event", "ready", HANDSHAKE_TIMEOUT_S + SLACK_S)
        for client in clients:
            client.send("go")
        for client in clients:
            client.expect("event", "start", args.warmup + SLACK_S)
        first = server.command("mark")
        first["ticks"] = _cpu_ticks(server_cpu)
        if profile:
            server.command("profile", on=True)
        for client in clients:
            client.expect("event", "end", args.duration + SLACK_S)
        if profile:
            server.command("profile", on=False)
        last = server.command("mark")
        last["ticks"] = _cpu_ticks(server_cpu)
        results = [client.expect("event", "result", args.timeout + SLACK_S) for client in clients]
        for client in clients:
            client.proc.wait(timeout=SLACK_S)
            if client.proc.returncode != 0:
                raise BenchError(f"{client.name} exited with status {client.proc.returncode}:"
                                 f" {client.error_text()}")
    finally:
        for client in clients:
            client.kill()
            children.remove(client)
    return summarize(impl, kind, results, first, last)


def summarize(impl: str, kind: str, results: list[dict[str, Any]], first: dict[str, Any],
              last: dict[str, Any]) -> dict[str, Any]:
    wall = last["t"] - first["t"]
    cpu = last["cpu"] - first["cpu"]
    if impl == "ours":
        answer = "pong" if kind == "ping" else "nodes"
        server_answered = last["out"][answer] - first["out"][answer]
        server_received = last["in"][kind] - first["in"][kind]
        drops = {k: v - first["drops"].get(k, 0) for k, v in last["drops"].items()
                 if v != first["drops"].get(k, 0)}
    else:
        server_answered = server_received = last["answered"][kind] - first["answered"][kind]
        drops = {}
    rate = sum(r["rate_per_s"] for r in results)
    client_util = [r["cpu_utilization"] for r in results]
    server_util = cpu / wall if wall > 0 else None
    server_wait = _wait_fraction(first.get("sched"), last.get("sched"), wall)
    steal = None
    if first.get("ticks") and last.get("ticks") and last["ticks"][0] > first["ticks"][0]:
        total = last["ticks"][0] - first["ticks"][0]
        steal = round((last["ticks"][1] - first["ticks"][1]) / total, 3)
    # CPU demand: on a CPU or waiting for one. Near 1.0: the process always had work.
    server_demand = server_util
    if server_util is not None and server_wait is not None:
        server_demand = server_util + server_wait
    client_waits = [r.get("runqueue_wait_fraction") for r in results]
    client_demand = [u + w if u is not None and w is not None else u
                     for u, w in zip(client_util, client_waits)]
    out = {
        "implementation": impl,
        "kind": kind,
        "rate_per_s": round(rate, 1),
        "sent": sum(r["sent"] for r in results),
        "answered": sum(r["answered"] for r in results),
        "answered_in_window": sum(r["answered_in_window"] for r in results),
        "lost": sum(r["lost"] for r in results),
        "unexpected": sum(r["unexpected"] for r in results),
        "verified_full_decode": sum(r["verified_full_decode"] for r in results),
        "server_requests_to_client": sum(r["server_requests"] for r in results),
        "late": sum(r["late"] for r in results),
        "window_s": round(max(r["window_s"] for r in results), 3),
        "server_window_s": round(wall, 3),
        "server_answered_in_window": server_answered,
        "server_received_in_window": server_received,
        "server_rate_per_s": round(server_answered / wall, 1) if wall > 0 else None,
        "server_cpu_s": round(cpu, 4),
        "server_cpu_us_per_request": (round(cpu / server_answered * 1e6, 2)
                                      if server_answered else None),
        "server_cpu_utilization": round(server_util, 3) if server_util is not None else None,
        # the share of that CPU time spent in the kernel (system calls, the loopback network stack)
        "server_kernel_cpu_fraction": (round((last["sys"] - first["sys"]) / cpu, 3)
                                       if cpu > 0 and "sys" in first else None),
        "server_runqueue_wait_fraction": server_wait,
        "server_cpu_steal_fraction": steal,
        "server_cpu_demand": round(server_demand, 3) if server_demand is not None else None,
        "client_cpu_utilization": [round(u, 3) if u is not None else None for u in client_util],
        "client_runqueue_wait_fraction": [r.get("runqueue_wait_fraction") for r in results],
        "latency_ms": (results[0]["latency_ms"] if len(results) == 1
                       else [r["latency_ms"] for r in results]),
        "server_drops_in_window": drops,
    }
    if impl == "ours":
        out["nodes_per_answer"] = results[0].get("nodes_per_answer")
        out["client_session"] = results[0].get("session")
    top_client = max((d for d in client_demand if d is not None), default=0.0)
    if server_demand is not None and server_demand >= 0.9 and server_demand >= top_client:
        out["bottleneck"] = "server"
    elif top_client >= 0.9:
        out["bottleneck"] = "client"
    else:
        out["bottleneck"] = "neither"  # e.g. a window too small to keep the server busy
    if out["answered_in_window"] <= 0:
        raise BenchError(f"{impl} {kind}: no request was answered in the window: {out}")
    return out


def combine(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """The repetitions of one measurement: the one with the (low) median rate, whose counts and
    figures are shown, plus the median CPU per request and every repetition's main figures."""
    ordered = sorted(samples, key=lambda m: m["rate_per_s"])
    out = dict(ordered[(len(ordered) - 1) // 2])  # statistics.median_low by rate
    cpu = [m["server_cpu_us_per_request"] for m in samples
           if m["server_cpu_us_per_request"] is not None]
    out["server_cpu_us_per_request_median"] = sorted(cpu)[(len(cpu) - 1) // 2] if cpu else None
    out["rate_per_s_range"] = [ordered[0]["rate_per_s"], ordered[-1]["rate_per_s"]]
    out["repeats"] = [
        {key: m[key] for key in ("rate_per_s", "server_cpu_us_per_request",
                                 "server_cpu_utilization", "server_runqueue_wait_fraction",
                                 "server_cpu_steal_fraction", "client_cpu_utilization",
                                 "client_runqueue_wait_fraction", "lost", "bottleneck")}
        for m in samples
    ]
    return out


def _calibration_us() -> float:
    """µs for ``sum(range(1000))`` (best of 5 × 200): how fast this Python runs here, to compare
    machines (about 8–10 µs on a current desktop)."""
    best = math.inf
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(200):
            sum(range(1000))
        best = min(best, (time.perf_counter() - t0) / 200)
    return round(best * 1e6, 2)


def _library_revision() -> dict[str, Any]:
    """The commit and the library files changed since (figures move as the library does)."""
    def git(*argv: str) -> str | None:
        try:
            done = subprocess.run(["git", *argv], cwd=_ROOT, capture_output=True, text=True,
                                  timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout if done.returncode == 0 else None

    commit = git("rev-parse", "--short", "HEAD")
    changed = git("status", "--porcelain", "--", "sovereign_discovery")  # lines "XY path"
    return {"commit": commit.strip() if commit else None,
            "library_files_changed": None if changed is None else
            sorted(line[3:] for line in changed.splitlines() if len(line) > 3)}


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not on this platform
        return None


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    load_before = _loadavg()
    server_cpu, client_cpus = _cpus(not args.no_pin)
    table = make_table(args.seed, args.table_size)
    contacts: list[Contact] = table["contacts"]
    out: dict[str, Any] = {
        "duration_s": args.duration,
        "repeat": args.repeat,
        "warmup_s": args.warmup,
        "window": args.window,
        "clients": args.clients,
        "timeout_s": args.timeout,
        "seed": args.seed,
        "table_size_requested": args.table_size,
        "table_size": len(contacts),
        "table_fill": (
            f"{len(contacts)} contacts of real Ed25519 identities (Identity.from_seed, seeded),"
            f" kept from {table['draws']} random identities by a RoutingTable of the server's ID"
            f" (20 per prefix length, as in a network of that many nodes), inserted directly into"
            f" node.engine.table (and into kademlia's router with add_contact, same node ID)"
        ),
        "table_bucket_sizes": table["bucket_sizes"],
        "rate_limits": (
            f"our server runs with rate_per_ip_per_s = burst_per_ip = rate_global_per_s ="
            f" burst_global = {BENCH_RATE:.0e} (the defaults, 50/s per IP and 2000/s in all, would"
            f" refuse most of a one-IP benchmark)"
        ),
        "pinned": {"server_cpu": server_cpu,
                   "client_cpus": client_cpus if server_cpu is not None else None},
        "kernel": keys.KERNEL,
        "kernel_reason": keys.KERNEL_REASON,
        "python_version": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "machine": platform.platform(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "calibration_sum_range_1000_us": _calibration_us(),
        "library_revision": _library_revision(),
        "loadavg_before": load_before,
        "kademlia": {"available": KADEMLIA_ERROR is None, "error": KADEMLIA_ERROR,
                     "version": _kademlia_version(), "module_file": KADEMLIA_FILE},
        "notes": [],
        "measurements": {},
    }
    if len(contacts) < args.table_size:
        out["notes"].append(
            f"the table holds {len(contacts)} contacts, not {args.table_size}: {table['draws']}"
            " random identities fill it no further (each prefix length past 9 needs twice as"
            " many)")
    per_round = 4 * (args.warmup + args.duration + args.timeout + 2 * SLACK_S)
    lifetime = per_round * (args.repeat + 1) + 120
    children: list[Child] = []
    cpu_arg = ["--cpu", str(-1 if server_cpu is None else server_cpu)]
    server_env = None
    if not args.default_malloc and "GLIBC_TUNABLES" not in os.environ:
        server_env = {**os.environ, "GLIBC_TUNABLES": SERVER_MALLOC_TUNABLES}
    out["server_malloc_tunables"] = (server_env or os.environ).get("GLIBC_TUNABLES")
    rounds: dict[str, list[dict[str, Any]]] = {}
    try:
        # Both servers run for the whole benchmark (an idle one costs nothing), so that the
        # measurements can alternate: ours, kademlia, ours, … share the machine's ups and downs.
        server = Child("our server", ["--serve", "ours", *cpu_arg], children, server_env)
        server.send({"server_seed": table["server_seed"], "rate": BENCH_RATE,
                     "lifetime_s": lifetime,
                     "contacts": [[c.public_key.hex(), str(c.address)] for c in contacts],
                     "inject_failure": args.inject_failure == "server"})
        ready = server.expect("op", "ready", SLACK_S + 30)
        if ready["table_size"] != len(contacts):
            raise BenchError(f"our server holds {ready['table_size']} contacts,"
                             f" not {len(contacts)}")
        out["server_pinned_contact"] = ready["pinned"]
        out["server_kernel"] = ready["kernel"]
        plan = [("ours", kind, server, ready["pinned"], "") for kind in ("ping", "find_node")]
        kad = None
        if KADEMLIA_ERROR is None:
            kad = Child("kademlia server", ["--serve", "kademlia", *cpu_arg], children, server_env)
            kad.send({"server_id": table["server_id"], "lifetime_s": lifetime,
                      "kademlia_contacts": [[c.node_id.hex(), str(c.address.ip), c.address.port]
                                            for c in contacts]})
            kready = kad.expect("op", "ready", SLACK_S + 30)
            out["kademlia_table_size"] = kready["table_size"]
            plan += [("kademlia", kind, kad, f"127.0.0.1:{kready['port']}", kready["node_id"])
                     for kind in ("ping", "find_node")]
        else:
            out["notes"].append(f"kademlia is not installed ({KADEMLIA_ERROR}): its figures are"
                                f" null; install it with: {KADEMLIA_INSTALL}")
        for _ in range(args.repeat):
            for impl, kind, child, target, server_id in plan:
                rounds.setdefault(f"{impl}_{kind}", []).append(
                    measure(args, child, impl, kind, target, client_cpus, children,
                            server_id=server_id, server_cpu=server_cpu))
        if args.profile:
            rounds["ours_find_node_profiled"] = [measure(
                args, server, "ours", "find_node", ready["pinned"], client_cpus, children,
                profile=True, server_cpu=server_cpu)]
        final = server.command("stats", profile=args.profile)
        out["ours_server_stats"] = {
            "messages_in": {k: v for k, v in final["stats"]["messages_in"].items() if v},
            "messages_out": {k: v for k, v in final["stats"]["messages_out"].items() if v},
            "drops": {k: v for k, v in final["stats"]["drops"].items() if v},
            "table_size": final["stats"]["table_size"],
            "sessions": final["stats"]["sessions"],
            "udp": final["stats"]["udp"],
            "maxrss_kib": final["maxrss_kib"],
        }
        if args.profile:
            out["profile_top_tottime"] = final.get("profile", "")
        server.send({"op": "quit"})
        if kad is not None:
            kfinal = kad.command("stats")
            out["kademlia_server_stats"] = {key: kfinal[key] for key in
                                            ("answered", "table_size", "buckets", "maxrss_kib")}
            kad.send({"op": "quit"})
        for child in children:
            try:
                child.proc.wait(timeout=SLACK_S)
            except subprocess.TimeoutExpired:
                out["notes"].append(f"{child.name} did not exit on 'quit'; killed")
    finally:
        for child in children:
            child.kill()
    out["measurements"] = {name: combine(samples) for name, samples in rounds.items()}
    m = out["measurements"]
    fig = lambda name, key: m[name][key] if name in m else None  # noqa: E731
    out["ours_ping_per_s"] = fig("ours_ping", "rate_per_s")
    out["ours_find_node_per_s"] = fig("ours_find_node", "rate_per_s")
    out["kademlia_ping_per_s"] = fig("kademlia_ping", "rate_per_s")
    out["kademlia_find_node_per_s"] = fig("kademlia_find_node", "rate_per_s")
    out["cpu_us_per_request"] = fig("ours_find_node", "server_cpu_us_per_request_median")
    out["cpu_us_per_ping"] = fig("ours_ping", "server_cpu_us_per_request_median")
    out["kademlia_cpu_us_per_ping"] = fig("kademlia_ping", "server_cpu_us_per_request_median")
    out["kademlia_cpu_us_per_find_node"] = fig("kademlia_find_node",
                                               "server_cpu_us_per_request_median")
    kad_ping = out["kademlia_ping_per_s"]
    out["ratio_find_node_vs_kademlia_ping"] = (
        round(out["ours_find_node_per_s"] / kad_ping, 2) if kad_ping else None)
    kad_find = out["kademlia_find_node_per_s"]
    out["ratio_find_node_vs_kademlia_find_node"] = (
        round(out["ours_find_node_per_s"] / kad_find, 2) if kad_find else None)
    out["ratio_ping_vs_kademlia_ping"] = (
        round(out["ours_ping_per_s"] / kad_ping, 2) if kad_ping else None)
    out["bottleneck"] = {name: mm["bottleneck"] for name, mm in m.items()}
    out["targets"] = {}
    for name, (op, limit) in TARGETS.items():
        value = out[name]
        met = None if value is None else (value >= limit if op == ">=" else value <= limit)
        out["targets"][name] = {"value": value, "limit": f"{op} {limit:g}", "met": met}
    out["loadavg_after"] = _loadavg()
    waits = [w for mm in m.values() for r in mm["repeats"]
             for w in [r["server_runqueue_wait_fraction"], *r["client_runqueue_wait_fraction"]]
             if w is not None]
    out["max_runqueue_wait_fraction"] = max(waits, default=None)
    steals = [r["server_cpu_steal_fraction"] for mm in m.values() for r in mm["repeats"]
              if r["server_cpu_steal_fraction"] is not None]
    out["max_server_cpu_steal_fraction"] = max(steals, default=None)
    if steals and max(steals) >= 0.05:
        out["notes"].append(
            f"the hypervisor took up to {max(steals):.0%} of the server's CPU in a window (steal):"
            " that round ran slower (see repeats)")
    if waits and max(waits) >= 0.05:
        out["notes"].append(
            f"a server or client waited for a CPU up to {max(waits):.0%} of a window: other"
            " processes competed for the CPUs, so some rates are lower than on an idle machine"
            " (see repeats); the CPU-time figures are less affected")
    out["elapsed_s"] = round(time.perf_counter() - started, 2)
    return out


# --- output --------------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 100 else f"{value:,.3g}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, list):
        return ", ".join(_fmt(v) for v in value)
    if isinstance(value, dict):
        return " ".join(f"{k}={_fmt(v)}" for k, v in value.items()) or "-"
    return str(value)


ROWS = [
    ("answered per second (client side, median)", "rate_per_s"),
    ("  lowest / highest of the repeats", "rate_per_s_range"),
    ("answered per second (server side)", "server_rate_per_s"),
    ("server CPU µs per answered request (median)", "server_cpu_us_per_request_median"),
    ("server CPU utilization (CPU s / wall s)", "server_cpu_utilization"),
    ("server CPU share in the kernel", "server_kernel_cpu_fraction"),
    ("server waiting for a CPU (fraction of wall)", "server_runqueue_wait_fraction"),
    ("server's CPU stolen by the hypervisor", "server_cpu_steal_fraction"),
    ("client CPU utilization", "client_cpu_utilization"),
    ("client waiting for a CPU", "client_runqueue_wait_fraction"),
    ("bottleneck", "bottleneck"),
    ("sent / answered (all phases)", "_sent_answered"),
    ("answered in window", "answered_in_window"),
    ("lost (timed out) / late / unexpected", "_lost"),
    ("answers fully decoded and checked", "verified_full_decode"),
    ("latency ms p50 / p90 / p99", "_latency"),
    ("server drops in window", "server_drops_in_window"),
]


def _cell(m: dict[str, Any], key: str) -> str:
    if key == "rate_per_s_range":
        return " / ".join(_fmt(v) for v in m[key])
    if key == "_sent_answered":
        return f"{m['sent']:,} / {m['answered']:,}"
    if key == "_lost":
        return f"{m['lost']:,} / {m['late']:,} / {m['unexpected']:,}"
    if key == "_latency":
        lat = m["latency_ms"]
        lat = lat[0] if isinstance(lat, list) else lat
        return " / ".join(_fmt(lat[q]) for q in ("p50", "p90", "p99"))
    return _fmt(m.get(key))


def print_table(out: dict[str, Any]) -> None:
    print(f"UDP request benchmark: {out['clients']} client process(es), window {out['window']},"
          f" {out['duration_s']} s per measurement after {out['warmup_s']} s warm-up,"
          f" {out['repeat']} alternating round(s) (medians; the other figures are from the median"
          f" round), seed {out['seed']}")
    print(f"machine: {out['cpu_model']} x{out['cpu_count']}, {out['machine']},"
          f" Python {out['python_version']}, keyspace kernel {out['kernel']};"
          f" kademlia {out['kademlia']['version'] or 'not installed'}")
    print(f"calibration: sum(range(1000)) takes {out['calibration_sum_range_1000_us']} µs here;"
          f" load average before / after: {out['loadavg_before']} / {out['loadavg_after']}")
    rev = out["library_revision"]
    print(f"library: commit {rev['commit']},"
          f" library files changed since: {rev['library_files_changed']}")
    pinned = out["pinned"]
    print("pinning: " + (f"server on CPU {pinned['server_cpu']}, clients on {pinned['client_cpus']}"
                         if pinned["server_cpu"] is not None else "none"))
    print(f"table: {out['table_fill']}")
    print(f"rate limits: {out['rate_limits']}")
    names = list(out["measurements"])
    cells = {n: [_cell(out["measurements"][n], key) for _, key in ROWS] for n in names}
    width = max(len(label) for label, _ in ROWS)
    col = max([len(n) for n in names] + [len(c) for column in cells.values() for c in column])
    print(f"  {'':<{width}}  " + "  ".join(f"{n:>{col}}" for n in names))
    for i, (label, _) in enumerate(ROWS):
        print(f"  {label:<{width}}  " + "  ".join(f"{cells[n][i]:>{col}}" for n in names))
    print(f"ours FIND_NODE / kademlia ping: {_fmt(out['ratio_find_node_vs_kademlia_ping'])}x;"
          f" / kademlia find_node: {_fmt(out['ratio_find_node_vs_kademlia_find_node'])}x;"
          f" ours PING / kademlia ping: {_fmt(out['ratio_ping_vs_kademlia_ping'])}x")
    print("targets:")
    for name, t in out["targets"].items():
        state = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
        print(f"  {name} {t['limit']}: {_fmt(t['value'])} -> {state}")
    if out.get("profile_top_tottime"):
        print("profile of our server during 'ours_find_node_profiled' (top by own time):")
        print(out["profile_top_tottime"])
    for note in out["notes"]:
        print(f"note: {note}")
    print(f"elapsed: {out['elapsed_s']} s")


# --- command line --------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per measurement (3)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="rounds of the four measurements, alternating; medians reported (3)")
    parser.add_argument("--warmup", type=float, default=0.5,
                        help="seconds before each window (0.5)")
    parser.add_argument("--table-size", type=int, default=200,
                        help="contacts in the serving node's routing table (200)")
    parser.add_argument("--window", type=int, default=64, help="requests in flight per client (64)")
    parser.add_argument("--clients", type=int, default=1, help="client processes (1)")
    parser.add_argument("--timeout", type=float, default=1.0,
                        help="seconds after which a request counts as lost (1)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the table's identities (1)")
    parser.add_argument("--profile", action="store_true",
                        help="one more FIND_NODE run with cProfile on in our server;"
                        " top entries shown")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--default-malloc", action="store_true",
                        help="run the servers without the fixed glibc malloc thresholds"
                        " (see the docs)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    # hidden modes: the children
    parser.add_argument("--serve", choices=("ours", "kademlia"), help=argparse.SUPPRESS)
    parser.add_argument("--client", choices=("ours", "kademlia"), help=argparse.SUPPRESS)
    parser.add_argument("--kind", choices=("ping", "find_node"), default="ping",
                        help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    parser.add_argument("--server-id", default="", help=argparse.SUPPRESS)
    parser.add_argument("--cpu", type=int, default=-1, help=argparse.SUPPRESS)
    # tests: a server that dies before it is ready, or a client that dies in its first measurement
    parser.add_argument("--inject-failure", choices=("server", "client"), default=None,
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not (0 < args.duration <= 3600) or not (0 <= args.warmup <= 600):
        parser.error("--duration must be in (0, 3600] and --warmup in [0, 600]")
    if not 0 < args.timeout <= 60:
        parser.error("--timeout must be in (0, 60]")
    if not 0 <= args.table_size <= 400:
        parser.error("--table-size must be in 0..400")
    if not 1 <= args.window <= 4096:
        parser.error("--window must be in 1..4096")
    if not 1 <= args.repeat <= 100:
        parser.error("--repeat must be in 1..100")
    if not 1 <= args.clients <= 16:
        parser.error("--clients must be in 1..16")
    if args.client == "kademlia" and KADEMLIA_ERROR is not None:
        parser.error(f"kademlia is not installed: {KADEMLIA_ERROR}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve:
        return serve_main(args)
    if args.client:
        return client_main(args)
    if KADEMLIA_ERROR is not None:
        print(f"udp_requests benchmark: kademlia is not installed ({KADEMLIA_ERROR}); its figures"
              f" will be null. Install it with: {KADEMLIA_INSTALL}", file=sys.stderr)
    try:
        out = run(args)
    except BenchError as exc:
        print(f"udp_requests benchmark failed: {exc}", file=sys.stderr)
        return 1
    if args.json:
        json.dump(out, sys.stdout)
        sys.stdout.write("\n")
    else:
        print_table(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
