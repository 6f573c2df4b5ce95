"""The PeerDiscoveryCoordinator from code: events as an async iterator, the peer table, find_peer
and find_peers (docs/coordinator.md).

    python examples/coordinator.py                       # a self-contained run on 127.0.0.1
    python examples/coordinator.py --bootstrap PK@HOST:PORT [--capability relay] [--cache peers.sqlite3]

Without ``--bootstrap`` it starts a bootstrap coordinator and two more nodes announcing
``relay`` in this process, then runs the watched node against them. The watched node prints
every event as it comes, waits for the join, lists its peer table, finds the ``relay`` providers
and looks up one peer by node ID. Exits non-zero if it found nobody.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys

import sovereign_discovery as sd

NO_LOCAL = sd.LocalConfig(mdns=False, bluetooth=False)  # this example shows the DHT side


async def print_events(coordinator: sd.PeerDiscoveryCoordinator, events) -> None:
    async for event in events:  # ends when the coordinator closes
        if isinstance(event, sd.PeerDiscovered):
            caps = ", ".join(event.peer.record.capabilities) or "-"
            print(f"  event: discovered {event.peer.node_id} via {event.source} (capabilities: {caps})")
        elif isinstance(event, sd.PeerLost):
            print(f"  event: lost {event.peer.node_id} ({event.reason})")
        elif isinstance(event, sd.BootstrapRejected):
            print(f"  event: REFUSED {event.contact.pinned}: {event.reason}")
        else:
            print(f"  event: {type(event).__name__}")


async def watch(bootstrap: list[str], capability: str, cache: str | None) -> int:
    config = sd.Config(local=NO_LOCAL, bootstrap=sd.BootstrapConfig(peers=tuple(bootstrap), timeout_s=3))
    node = sd.PeerDiscoveryCoordinator(sd.Identity.generate(), config=config, cache=cache)
    events = node.events()  # subscribe before start: the join's events are seen too
    async with node:
        printer = asyncio.create_task(print_events(node, events))
        print(f"watched node {node.node.contact.pinned}")
        joined = await node.joined(timeout=15)
        print(f"joined: {joined}")
        await asyncio.sleep(0.5)  # routing-table peers' records arrive in the background
        print("peer table:")
        for peer in node.peers():
            print(f"  {peer.node_id}  sources={sorted(peer.sources)}  {', '.join(map(str, peer.addresses))}")
        providers = await node.find_peers(capability=capability, count=10)
        print(f"{len(providers)} provider(s) of {capability!r}: {[p.node_id.short() for p in providers]}")
        if providers:
            found = await node.find_peer(providers[0].node_id)
            print(f"find_peer({providers[0].node_id.short()}…): record seq {found.record.seq}, "
                  f"signature verified, from {sorted(found.sources)}")
        stats = node.stats()
        print(f"stats: {stats['peers']} peers, by source {stats['peers_by_source']}, "
              f"{stats['dht']['table_size']} in the routing table")
    await printer
    return 0 if node.peers() or providers else 1


async def self_contained(capability: str, cache: str | None) -> int:
    async with contextlib.AsyncExitStack() as stack:
        boot = await stack.enter_async_context(
            sd.PeerDiscoveryCoordinator(sd.Identity.generate(), config=sd.Config(local=NO_LOCAL)))
        line = boot.node.contact.pinned
        print(f"bootstrap node {line}")
        config = sd.Config(local=NO_LOCAL, bootstrap=sd.BootstrapConfig(peers=(line,)))
        for _ in range(2):
            peer = await stack.enter_async_context(
                sd.PeerDiscoveryCoordinator(sd.Identity.generate(), config=config, capabilities=[capability]))
            await peer.joined(timeout=10)
        return await watch([line], capability, cache)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bootstrap", action="append", default=[], metavar="PK@HOST:PORT")
    parser.add_argument("--capability", default="relay", metavar="NAME")
    parser.add_argument("--cache", metavar="FILE", help="a peer cache file (re-seeds the next run)")
    args = parser.parse_args()
    if args.bootstrap:
        return asyncio.run(watch(args.bootstrap, args.capability, args.cache))
    return asyncio.run(self_contained(args.capability, args.cache))


if __name__ == "__main__":
    sys.exit(main())
