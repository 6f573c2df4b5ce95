"""First contact: the 0-RTT INITIATE against the WHOAREYOU handshake (docs/protocol.md).

Prints JSON: microseconds to build and to accept an INITIATE and a HANDSHAKE (the session layer
alone, no sockets: best of ``--repeat`` runs of ``--count`` packets each), and the datagrams,
bytes and round trips one first request and its answer cost in each mode.

    python benchmarks/handshake.py [--count 300] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sovereign_discovery.addresses import Address  # noqa: E402
from sovereign_discovery.fastpath import FASTPATH_KERNEL  # noqa: E402
from sovereign_discovery.identity import Identity  # noqa: E402
from sovereign_discovery.routing import Contact  # noqa: E402
from sovereign_discovery.session import SessionLayer, SessionLimits  # noqa: E402

EPOCH = 1.8e9
NOW = 10.0  # layers start at 0; an INITIATE is accepted from 5 s on
REQUEST = b"\x03" + bytes(8) + bytes(20)  # a FIND_NODE's size (29 bytes)
ANSWER = bytes(600)  # a NODES answer's order of size


def make(seed: int, zero_rtt: bool) -> SessionLayer:
    limits = SessionLimits(zero_rtt=zero_rtt, max_sessions=100_000, max_unvalidated_sessions=100_000,
                           max_zero_rtt_seen=100_000, zero_rtt_per_s=1e9, max_challenges=100_000,
                           max_pending_peers=100_000, max_unvalidated_addresses=100_000)
    layer = SessionLayer(Identity.from_seed(bytes([seed]) * 32), random_bytes=random.Random(seed).randbytes,
                         limits=limits, unix_offset=EPOCH)
    layer.expire(0.0)
    return layer


def address(i: int) -> Address:
    return Address(f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{(i & 255) or 1}", 1024 + i % 60_000)


def timed(function, items) -> float:
    start = time.perf_counter()
    for item in items:
        function(item)
    return (time.perf_counter() - start) / len(items) * 1e6


def one_run(count: int, run: int) -> dict[str, float]:
    b_id = Identity.from_seed(bytes([2]) * 32)
    # 0-RTT: A builds INITIATEs (one per address of B: each a first contact), B accepts them
    a, b = make(1, True), make(2, True)
    peers = [Contact(b_id.public_key, address(run * count + i)) for i in range(count)]
    sources = [address(100_000 + run * count + i) for i in range(count)]
    initiates: list[bytes] = []
    build_initiate = timed(lambda p: initiates.extend(o.datagram for o in a.send(p, REQUEST, NOW)), peers)
    pairs = list(zip(initiates, sources))
    accept_initiate = timed(lambda x: b.receive(x[0], x[1], NOW), pairs)
    assert b.stats["initiates_accepted"] == count
    # WHOAREYOU handshake: random packet, WHOAREYOU, then A builds the HANDSHAKE, B accepts it
    a, b = make(1, False), make(2, False)
    challenges = []
    for peer, source in zip(peers, sources):
        [random_packet] = a.send(peer, REQUEST, NOW)
        [challenge] = b.receive(random_packet.datagram, source, NOW).outgoing
        challenges.append((challenge.datagram, peer.address, source))
    handshakes: list[tuple[bytes, Address]] = []
    build_handshake = timed(
        lambda c: handshakes.append((a.receive(c[0], c[1], NOW).outgoing[0].datagram, c[2])), challenges)
    accept_handshake = timed(lambda h: b.receive(h[0], h[1], NOW), handshakes)
    assert b.stats["handshakes_completed"] == count
    return {"build_initiate_us": build_initiate, "accept_initiate_us": accept_initiate,
            "build_handshake_us": build_handshake, "accept_handshake_us": accept_handshake}


def first_request(zero_rtt: bool) -> dict[str, int]:
    """One request and its answer between fresh layers; a round trip is a turn of A -> B -> A."""
    a_id, b_id = Identity.from_seed(bytes([1]) * 32), Identity.from_seed(bytes([2]) * 32)
    a, b = make(1, zero_rtt), make(2, zero_rtt)
    a_addr, b_addr = Address("10.0.0.1", 4001), Address("10.0.0.2", 4002)
    to_a = Contact(a_id.public_key, a_addr)
    to_b = [(o.datagram, b_addr) for o in a.send(Contact(b_id.public_key, b_addr), REQUEST, NOW)]
    datagrams = bytes_ = round_trips = 0
    answered = False
    while to_b and not answered:
        round_trips += 1
        to_a_now = []
        for datagram, _ in to_b:
            datagrams, bytes_ = datagrams + 1, bytes_ + len(datagram)
            result = b.receive(datagram, a_addr, NOW)
            to_a_now += [o.datagram for o in result.outgoing]
            for _ in result.delivered:  # the request: B answers it
                to_a_now += [o.datagram for o in b.send(to_a, ANSWER, NOW)]
        to_b = []
        for datagram in to_a_now:
            datagrams, bytes_ = datagrams + 1, bytes_ + len(datagram)
            result = a.receive(datagram, b_addr, NOW)
            answered = answered or bool(result.delivered)
            to_b += [(o.datagram, b_addr) for o in result.outgoing]
    assert answered
    return {"datagrams": datagrams, "bytes": bytes_, "round_trips": round_trips}


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=_positive, default=300, help="packets per run (300)")
    parser.add_argument("--repeat", type=_positive, default=5,
                        help="runs (the best of each figure is kept; 5)")
    args = parser.parse_args()
    runs = [one_run(args.count, run) for run in range(args.repeat)]
    best = {name: round(min(run[name] for run in runs), 1) for name in runs[0]}
    print(json.dumps({
        "fastpath_kernel": FASTPATH_KERNEL, "count": args.count, "repeat": args.repeat,
        "microseconds": best,
        "first_request": {"zero_rtt": first_request(True), "whoareyou": first_request(False)},
    }, indent=2))


if __name__ == "__main__":
    main()
