#!/usr/bin/env python3
"""mDNS latency benchmark (issue 5's targets): real ``PeerDiscoveryCoordinator`` processes with the
mDNS layer on real python-zeroconf, on one link.

Run ``python benchmarks/mdns_latency.py [--rounds N] [--liveness S]
[--mode auto|netns|netns6|loopback] [--json]``. Figures are reported, never asserted (``tests/test_mdns_processes.py`` runs a short
round and checks the shape and the outcomes).

The link: with ``--mode netns`` (the ``auto`` default when running as root with ``ip netns``) two
network namespaces joined by a veth pair, 169.254.77.1 (the observer's side) and 169.254.77.2 (the
peers' side), created for the run and deleted at its end — the closest model of two machines;
``--mode netns6`` is the same link over IPv6 only: unique local addresses fd5d:77::1 and fd5d:77::2
(assigned without duplicate address detection, so they are usable at once), mDNS on ff02::fb and
the DHT on those addresses; otherwise (``loopback``) every process on the host's 127.0.0.1 (no privilege needed; other mDNS
users on this host's loopback share it, so the service type is unique to the run). The output
says which one ran (``mode``).

Processes (each is this file in its hidden ``peer`` mode: one coordinator, bootstrap off, DHT on
the link address, mDNS on the link interface, printing one JSON line per event with
``time.time()`` stamps taken inside it):

- the **observer** O runs for the whole benchmark, with liveness interval ``--liveness``;
- each round starts two fresh **peers** P1 and P2 at once (a cold start: RFC 6762 probing, then
  announcements), then a fresh **late observer** O2 once both are announced and quiet (≥ 2.5 s,
  past the one-second rule), then stops P1 with SIGTERM (it says goodbye) and kills P2 with
  SIGKILL (no goodbye: a crash).

Figures (median, min, max over every sample, in ms):

1. ``cold_discovery_ms``: a peer's coordinator start → O's PeerDiscovered/PeerUpdated adding the
   source ``mdns`` (the record verified and the peer's authenticated PING answered). Target ≤ 1,500.
2. ``warm_discovery_ms``: O2's mDNS layer running (browsing) → O2 has the peer from mDNS;
   ``warm_from_start_ms`` counts from O2's coordinator start instead. Target ≤ 200.
3. ``goodbye_to_lost_ms``: SIGTERM sent to P1 → O withdraws ``mdns`` for it. Target ≤ 1,000.
4. ``crash_to_lost_ms``: SIGKILL sent to P2 → O withdraws ``mdns`` for it (liveness check).
   Target ≤ the liveness interval.

Also: ``early_losses``, how often O withdrew ``mdns`` for a peer that was still running (a
liveness false alarm; it comes back at the next answered PING), and O's own mDNS counters
(``observer_mdns_stats``).

Every wait is bounded; every process started is killed at the end, and the namespaces deleted,
even on error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[1]))

LOOPBACK = ("127.0.0.1", "127.0.0.1")
NETNS_ADDRESSES = ("169.254.77.1", "169.254.77.2")
NETNS6_ADDRESSES = ("fd5d:77::1", "fd5d:77::2")
MODES = {"loopback": ("loopback", LOOPBACK), "netns": ("netns-veth", NETNS_ADDRESSES),
         "netns6": ("netns-veth-ipv6", NETNS6_ADDRESSES)}
TARGETS_MS = {"cold_discovery_ms": 1500.0, "warm_discovery_ms": 200.0, "goodbye_to_lost_ms": 1000.0}
QUIET_S = 2.5  # after both peers are up: their announcements are over (RFC 6762 §8.3, one-second rule)


# --- the coordinator patch this benchmark (and tests/test_mdns*.py) needs until it is applied ----------


# --- one peer process ------------------------------------------------------------------------------------


def _emit(event: str, **fields) -> None:
    print(json.dumps({"ev": event, "t": time.time(), **fields}), flush=True)


async def peer_main(args: argparse.Namespace) -> int:
    from sovereign_discovery import BootstrapConfig, Config, DhtSettings, Identity, LocalConfig
    from sovereign_discovery.coordinator import LayerStateChanged, PeerDiscoveryCoordinator, PeerLost
    from sovereign_discovery.mdns import MdnsLayer

    local = LocalConfig(mdns_interfaces=(args.iface,), service_name=args.service, bluetooth=False)
    config = Config(local=local, bootstrap=BootstrapConfig(enabled=False),
                    dht=DhtSettings(listen_host=(args.listen or args.iface,)))
    identity = Identity.generate()
    mdns_peers: set[str] = set()

    def on_event(event) -> None:
        if isinstance(event, LayerStateChanged):
            _emit("layer", layer=event.layer, state=event.state, reason=event.reason)
            return
        peer = getattr(event, "peer", None)
        if peer is None:
            return
        key = str(peer.node_id)
        has = "mdns" in peer.sources and not isinstance(event, PeerLost)
        if has and key not in mdns_peers:
            mdns_peers.add(key)
            _emit("mdns_seen", peer=key, kind=type(event).__name__,
                  address=str(peer.addresses[0]) if peer.addresses else None)
        elif not has and key in mdns_peers:
            mdns_peers.discard(key)
            _emit("mdns_gone", peer=key, kind=type(event).__name__)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    _emit("start", node_id=str(identity.node_id))
    coordinator = PeerDiscoveryCoordinator(identity, config=config, cache=None,
                                           local_layers=[MdnsLayer(local, liveness_interval_s=args.liveness)],
                                           on_event=on_event)
    async with coordinator:
        _emit("listening", address=str(coordinator.node.address))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), args.hold)
        stats = coordinator.stats()
        _emit("closing", stats=stats["layers"]["mdns"],
              dht_drops={k: v for k, v in stats["dht"]["drops"].items() if v}, checks=stats["checks"])
    _emit("closed")
    return 0


# --- the parent ------------------------------------------------------------------------------------------


class Peer:
    """A peer process; its JSON lines are collected as they come."""

    def __init__(self, lab: "Lab", side: int, service: str, liveness_s: float, name: str) -> None:
        self.lab, self.side, self.service, self.liveness_s, self.name = lab, side, service, liveness_s, name
        self.lines: list[dict] = []
        self.node_id = ""
        self.proc: asyncio.subprocess.Process | None = None
        self._changed = asyncio.Event()
        self._reader: asyncio.Task | None = None

    async def start(self) -> "Peer":
        iface = self.lab.address(self.side)
        command = [*self.lab.prefix(self.side), sys.executable, str(HERE), "peer", "--iface", iface,
                   "--service", self.service, "--liveness", str(self.liveness_s), "--hold", "300"]
        self.proc = await asyncio.create_subprocess_exec(*command, stdout=subprocess.PIPE,
                                                         stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        self._reader = asyncio.create_task(self._read())
        start = await self.wait(lambda line: line["ev"] == "start", 20)
        self.node_id = start["node_id"]
        return self

    async def _read(self) -> None:
        while True:
            raw = await self.proc.stdout.readline()
            if not raw:
                break
            with contextlib.suppress(ValueError):
                self.lines.append(json.loads(raw))
            self._changed.set()

    async def wait(self, predicate, timeout_s: float) -> dict | None:
        """The first line matching ``predicate``, waiting at most ``timeout_s``; None then."""
        deadline = time.monotonic() + timeout_s
        while True:
            for line in self.lines:
                if predicate(line):
                    return line
            left = deadline - time.monotonic()
            if left <= 0 or (self.proc.returncode is not None and self._reader.done()):
                return None
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(left, 0.5))

    def first(self, event: str, **fields) -> dict | None:
        return next((line for line in self.lines if line["ev"] == event
                     and all(line.get(k) == v for k, v in fields.items())), None)

    def signal(self, number: int) -> float:
        sent = time.time()
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(number)
        return sent

    async def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.proc.wait(), 5)
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._reader, 2)


class Lab:
    """The link: the host loopback, or two namespaces joined by a veth pair."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        tag = f"{os.getpid() % 100000}"
        self.namespaces = (f"sdmA{tag}", f"sdmB{tag}")
        self.links = (f"sdmva{tag}", f"sdmvb{tag}")
        self._made: list[str] = []

    @staticmethod
    def netns_problem() -> str | None:
        """Why a veth lab cannot be made here, or None."""
        if os.geteuid() != 0:
            return "creating network namespaces needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN)"
        if shutil.which("ip") is None:
            return "the ip command (iproute2) is not installed"
        return None

    def address(self, side: int) -> str:
        return MODES[self.mode][1][side]

    def prefix(self, side: int) -> list[str]:
        return ["ip", "netns", "exec", self.namespaces[side]] if self.mode != "loopback" else []

    def __enter__(self) -> "Lab":
        if self.mode == "loopback":
            return self
        try:
            for ns in self.namespaces:
                _ip("netns", "add", ns)
                self._made.append(ns)
            _ip("link", "add", self.links[0], "netns", self.namespaces[0], "type", "veth",
                "peer", "name", self.links[1], "netns", self.namespaces[1])
            for side, (ns, link) in enumerate(zip(self.namespaces, self.links)):
                if self.mode == "netns6":
                    _ip("-n", ns, "addr", "add", f"{NETNS6_ADDRESSES[side]}/64", "dev", link, "nodad")
                else:
                    _ip("-n", ns, "addr", "add", f"{NETNS_ADDRESSES[side]}/24", "dev", link)
                _ip("-n", ns, "link", "set", "lo", "up")
                _ip("-n", ns, "link", "set", link, "up")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for ns in reversed(self._made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
        self._made.clear()


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")


def _summary(samples: list[float]) -> dict:
    if not samples:
        return {"median": None, "min": None, "max": None, "samples": []}
    return {"median": round(statistics.median(samples), 1), "min": round(min(samples), 1),
            "max": round(max(samples), 1), "samples": [round(s, 1) for s in samples]}


async def measure(mode: str, rounds: int, liveness_s: float) -> dict:
    service = f"_sdb{os.urandom(4).hex()}._udp.local."
    cold, warm, warm_start, goodbye, crash = [], [], [], [], []
    failures: list[str] = []
    early_losses = 0
    seen_at: list[str | None] = []  # where the observer reached each peer it discovered
    observer_stats: dict = {}
    observer_drops: dict = {}
    observer_checks: dict = {}
    started: list[Peer] = []

    async def spawn(side: int, name: str) -> Peer:
        peer = Peer(lab, side, service, liveness_s, name)
        started.append(peer)
        return await peer.start()

    def seen_by(observer: Peer, peer: Peer):
        return lambda line: line["ev"] == "mdns_seen" and line["peer"] == peer.node_id

    def gone_after(peer: Peer, sent: float):
        return lambda line: line["ev"] == "mdns_gone" and line["peer"] == peer.node_id and line["t"] >= sent

    with Lab(mode) as lab:
        try:
            observer = await spawn(0, "observer")
            if await observer.wait(lambda line: line["ev"] == "layer" and line["layer"] == "mdns", 10) \
                    is None:
                raise RuntimeError(f"the observer's mDNS layer did not start: {observer.lines}")
            layer = observer.first("layer", layer="mdns")
            if layer["state"] != "running":
                raise RuntimeError(f"the observer's mDNS layer is {layer['state']}: {layer['reason']}")
            for n in range(rounds):
                p1, p2 = await asyncio.gather(spawn(1, f"p1.{n}"), spawn(1, f"p2.{n}"))
                for peer in (p1, p2):
                    line = await observer.wait(seen_by(observer, peer), 8)
                    if line is None:
                        failures.append(f"round {n}: {peer.name} not discovered")
                    else:
                        cold.append((line["t"] - peer.first("start")["t"]) * 1000)
                        seen_at.append(line.get("address"))
                await asyncio.sleep(QUIET_S)
                late = await spawn(0, f"late.{n}")
                running = await late.wait(
                    lambda line: line["ev"] == "layer" and line["state"] == "running", 10)
                for peer in (p1, p2):
                    line = await late.wait(seen_by(late, peer), 5)
                    if line is None or running is None:
                        failures.append(f"round {n}: the late observer did not find {peer.name}")
                    else:
                        warm.append((line["t"] - running["t"]) * 1000)
                        warm_start.append((line["t"] - late.first("start")["t"]) * 1000)
                late.signal(signal.SIGTERM)
                sent = p1.signal(signal.SIGTERM)
                early_losses += sum(1 for line in observer.lines if line["ev"] == "mdns_gone"
                                    and line["peer"] in (p1.node_id, p2.node_id))
                line = await observer.wait(gone_after(p1, sent), 5)
                if line is None:
                    failures.append(f"round {n}: the goodbye of {p1.name} went unnoticed")
                else:
                    goodbye.append((line["t"] - sent) * 1000)
                killed = p2.signal(signal.SIGKILL)
                line = await observer.wait(gone_after(p2, killed), liveness_s + 5)
                if line is None:
                    failures.append(f"round {n}: the crash of {p2.name} went unnoticed")
                else:
                    crash.append((line["t"] - killed) * 1000)
                for peer in (p1, p2, late):
                    await peer.stop()
            observer.signal(signal.SIGTERM)
            closing = await observer.wait(lambda line: line["ev"] == "closing", 10)
            observer_stats = closing["stats"] if closing else {}
            observer_drops = closing["dht_drops"] if closing else {}
            observer_checks = closing["checks"] if closing else {}
        finally:
            await asyncio.gather(*(peer.stop() for peer in started))
    import zeroconf

    figures = {"cold_discovery_ms": _summary(cold), "warm_discovery_ms": _summary(warm),
               "warm_from_start_ms": _summary(warm_start), "goodbye_to_lost_ms": _summary(goodbye),
               "crash_to_lost_ms": _summary(crash)}
    targets = {**TARGETS_MS, "crash_to_lost_ms": liveness_s * 1000}
    return {
        "mode": MODES[mode][0],
        "link": sorted(set(MODES[mode][1])),
        "seen_at": seen_at,
        "rounds": rounds,
        "liveness_interval_s": liveness_s,
        **figures,
        "targets_ms": targets,
        "met": {name: (figures[name]["median"] is not None and figures[name]["median"] <= limit
                       if name != "crash_to_lost_ms" else
                       bool(crash) and figures[name]["max"] <= limit)
                for name, limit in targets.items()},
        "failures": failures,
        "early_losses": early_losses,
        "observer_mdns_stats": {k: observer_stats.get(k, 0) for k in (
            "verified", "goodbyes", "lost_liveness", "recovered", "pings", "pings_unanswered")},
        "observer_dht_drops": observer_drops,
        "observer_checks": observer_checks,
        "zeroconf": zeroconf.__version__,
        "python_version": platform.python_version(),
        "cpu_count": os.cpu_count(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    peer = sub.add_parser("peer", help=argparse.SUPPRESS)
    peer.add_argument("--iface", required=True)
    peer.add_argument("--listen")
    peer.add_argument("--service", required=True)
    peer.add_argument("--liveness", type=float, default=2.0)
    peer.add_argument("--hold", type=float, default=120.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--liveness", type=float, default=2.0, help="the observer's liveness interval (s)")
    parser.add_argument("--mode", choices=("auto", *MODES), default="auto")
    parser.add_argument("--json", action="store_true", help="print only the JSON result")
    args = parser.parse_args(argv)
    if args.command == "peer":
        return asyncio.run(peer_main(args))
    if not 1 <= args.rounds <= 100:
        parser.error("--rounds must be in 1..100")
    mode = args.mode
    problem = Lab.netns_problem()
    if mode == "auto":
        mode = "loopback" if problem else "netns"
    elif mode != "loopback" and problem:
        parser.error(f"--mode netns: {problem}")
    if not args.json:
        print(f"mDNS latency over {mode} ({args.rounds} rounds, liveness {args.liveness} s)"
              + (f"; no netns: {problem}" if problem else ""), file=sys.stderr)
    result = asyncio.run(measure(mode, args.rounds, args.liveness))
    print(json.dumps(result, indent=None if args.json else 2))
    return 0 if not result["failures"] else 1


if __name__ == "__main__":
    sys.exit(main())
