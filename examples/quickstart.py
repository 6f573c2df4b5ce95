"""Quick start: identities, signed peer records, and the routing table.

    python examples/quickstart.py

1. Three peers create Ed25519 identities and sign their peer records.
2. A receiver decodes the records from bytes and checks them; a tampered, a forged and an expired
   record are refused with the reason.
3. A routing table learns 5,000 contacts, keeps what Kademlia's rules allow, and answers who is
   closest to a target — exactly what a full scan would say.
"""

from __future__ import annotations

import os
import random
import time

import sovereign_discovery as sd


def main() -> None:
    print(f"sovereign_discovery {sd.__version__}: keyspace kernel = {sd.KERNEL} ({sd.KERNEL_REASON})\n")

    # 1. Identities and signed records -------------------------------------------------------------
    now = time.time()
    peers = [sd.Identity.generate() for _ in range(3)]
    records = []
    for i, peer in enumerate(peers):
        record = sd.PeerRecord.create(
            peer,
            addresses=[sd.Address("127.0.0.1", 4000 + i), sd.Address("::1", 4000 + i)],
            capabilities=["store", "relay"] if i == 0 else ["chat/1"],
            seq=int(now * 1000),  # a millisecond timestamp grows with every new record
            expires_at=int(now) + 3600,
        )
        records.append(record)
        print(f"peer {sd.encode_public_key(peer.public_key)}")
        print(f"  node ID {peer.node_id}  record: {len(record.encode())} bytes, caps {record.capabilities}")

    # 2. Receiving records from the network --------------------------------------------------------
    print("\nreceiving records:")
    for record in records:
        received = sd.PeerRecord.decode(record.encode(), now=time.time())
        print(f"  ok       {received.node_id.short()}… at {', '.join(map(str, received.addresses))}")

    tampered = bytearray(records[0].encode())
    tampered[40] ^= 1  # flip one bit of the sequence number
    mallory = sd.Identity.generate()
    forged = bytearray(sd.PeerRecord.create(mallory, addresses=[sd.Address("203.0.113.66", 4000)],
                                            seq=1, expires_at=int(now) + 60).encode())
    forged[1:33] = peers[0].public_key  # claim to be peer 0
    expired = sd.PeerRecord.create(peers[1], addresses=[], seq=1, expires_at=int(now) - 1).encode()
    for label, data in (("tampered", bytes(tampered)), ("forged", bytes(forged)),
                        ("expired", expired), ("garbage", os.urandom(200))):
        try:
            sd.PeerRecord.decode(data, now=time.time())
            print(f"  ACCEPTED {label}?!")
        except sd.DecodeError as exc:
            print(f"  refused  {label:9} {type(exc).__name__}: {exc}")

    # 3. The routing table -------------------------------------------------------------------------
    rng = random.Random(7)
    me = sd.Identity.from_seed(rng.randbytes(32))
    table = sd.RoutingTable(me.node_id)
    outcomes: dict[str, int] = {}
    for i in range(5000):
        contact = sd.Contact(rng.randbytes(32), sd.Address("127.0.0.1", 10000 + i))
        result = table.insert(contact, now=time.monotonic())
        outcomes[type(result).__name__] = outcomes.get(type(result).__name__, 0) + 1
    print(f"\nrouting table of {me.node_id.short()}…: offered 5000 contacts -> {outcomes}")
    print(f"  holds {len(table)} in {table.bucket_count} buckets, sizes {table.bucket_sizes()}")
    print("  (a full bucket keeps its long-lived entries: newcomers wait for a liveness check)")

    target = sd.NodeId(rng.randbytes(20))
    closest = table.closest(target, 5)
    oracle = sorted(table, key=lambda c: sd.distance(c.node_id, target))[:5]
    print(f"\n5 closest to {target.short()}… (exact: {closest == oracle}):")
    for contact in closest:
        print(f"  {contact.node_id}  distance 2^{sd.distance(contact.node_id, target).bit_length() - 1}")
    started = time.perf_counter()
    for _ in range(10000):
        table.closest(target, 20)
    print(f"\nclosest-20 over {len(table)} contacts: {(time.perf_counter() - started) / 10000 * 1e6:.2f} µs per query")


if __name__ == "__main__":
    main()
