"""Small test helpers shared by several test modules."""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass

from sovereign_discovery.addresses import Address

_LOOPBACK = Address("127.0.0.1", 9)


@dataclass(frozen=True)
class Peer:
    """A routing-table entry whose ID the test chooses (real Contacts derive it from a key)."""

    node_id: bytes
    address: Address = _LOOPBACK


def id_near(base: bytes, delta: int) -> bytes:
    """``base`` XOR ``delta``: an ID sharing all but the last ``delta.bit_length()`` bits."""
    return (int.from_bytes(base, "big") ^ (delta % (1 << 160))).to_bytes(20, "big")


def model_bucket(local: bytes, node_id: bytes, bits: int) -> tuple[int, int]:
    """The textbook table's bucket of ``node_id`` with ``bits`` bits per routing step (Kademlia
    §4.2): (prefix length shared with ``local``, the bits after it up to the end of its digit)."""
    prefix = next((i for i in range(160) if (local[i // 8] ^ node_id[i // 8]) >> (7 - i % 8) & 1), 160)
    if prefix >= 160:
        return prefix, 0
    digit_end = min(prefix // bits * bits + bits, 160)
    return prefix, (int.from_bytes(node_id, "big") >> (160 - digit_end)) % (1 << (digit_end - 1 - prefix))


def brute_closest(entries, target: bytes, count: int) -> list:
    """The oracle: a full scan sorted by XOR distance."""
    goal = int.from_bytes(target, "big")
    return sorted(entries, key=lambda e: int.from_bytes(e.node_id, "big") ^ goal)[:count]


def has_ipv6_loopback() -> bool:
    """Whether ::1 can be bound here (IPv6 tests skip, saying why, where it cannot)."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


def run_bounded(coro, timeout: float):
    """Run ``coro`` on a fresh loop, failing it (not hanging) after ``timeout`` seconds."""
    return asyncio.run(asyncio.wait_for(coro, timeout))
