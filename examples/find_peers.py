"""Nodes find each other through a bootstrap node.

    python examples/find_peers.py                         # standalone: starts its own bootstrap node
    python examples/find_peers.py --bootstrap PUBLIC_KEY@127.0.0.1:4000 --nodes 5

With ``--bootstrap`` (repeatable) it joins an existing network, e.g. one started with
``examples/bootstrap_node.py``; without it, it first starts a bootstrap node in this process. Then:

1. N nodes start on 127.0.0.1 and join through the pinned bootstrap contacts (each contact must
   prove it holds the pinned key);
2. each announces one capability (ANNOUNCE at the k closest of the capability's key):
   ``demo/storage``, ``demo/relay`` or ``demo/compute`` in turn, then its signed record (STORE at
   the k closest of its ID);
3. each finds the next node's record by node ID, and the providers of the next node's capability.

Every line says what happened and how long it took. The exit status is 0 when every record and
every expected provider was found, 1 otherwise (2 for bad arguments). Providers announced by
other runs on the same network are listed as "from elsewhere". See docs/dht-node.md.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import sovereign_discovery as sd

CAPABILITIES = ("demo/storage", "demo/relay", "demo/compute")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _contact(text: str) -> sd.Contact:
    try:
        return sd.Contact.parse(text)
    except (sd.ArgumentValueError, sd.ArgumentTypeError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _count(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 200:
        raise argparse.ArgumentTypeError(f"must be a number in 1..200, not {text!r}")
    return int(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 600:
        raise argparse.ArgumentTypeError(f"must be a number of seconds in (0, 600], not {text!r}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = _Parser(
        prog="find_peers.py",
        description="Start N DHT nodes on 127.0.0.1, join through pinned bootstrap contacts, "
                    "announce records and capabilities, and find them again.")
    parser.add_argument("--bootstrap", action="append", type=_contact, default=[],
                        metavar="PK@HOST:PORT",
                        help="a pinned bootstrap contact (repeatable); without one, a bootstrap "
                             "node is started in this process")
    parser.add_argument("--nodes", type=_count, default=5, metavar="N",
                        help="how many nodes to start (default 5)")
    parser.add_argument("--deadline", type=_seconds, default=10.0, metavar="SECONDS",
                        help="deadline of each lookup (default 10)")
    return parser.parse_args(argv)


def _ms(started: float) -> str:
    return f"{(time.perf_counter() - started) * 1000:.1f} ms"


async def run(args: argparse.Namespace) -> int:
    nodes: list[sd.DhtNode] = []
    own_bootstrap: sd.DhtNode | None = None
    try:
        contacts = list(args.bootstrap)
        if not contacts:
            own_bootstrap = await sd.DhtNode(sd.Identity.generate()).start()
            contacts = [own_bootstrap.contact]
            print(f"no --bootstrap given: started a bootstrap node here: {own_bootstrap.contact.pinned}")
        for _ in range(args.nodes):
            nodes.append(await sd.DhtNode(sd.Identity.generate(), host="127.0.0.1").start())
        names = {node.node_id: f"n{i + 1}" for i, node in enumerate(nodes)}
        width = len(f"n{len(nodes)}")

        def name(node_id: bytes) -> str:
            return names.get(node_id, f"{sd.NodeId(node_id).short()}…")

        # 1. Join. ---------------------------------------------------------------------------------
        print(f"\njoining through {len(contacts)} pinned contact(s):")

        async def join(node: sd.DhtNode) -> tuple[list[sd.Contact] | Exception, str]:
            started = time.perf_counter()
            try:
                return await node.bootstrap(contacts, deadline_s=args.deadline), _ms(started)
            except (sd.BootstrapError, sd.LookupTimeoutError) as exc:
                return exc, _ms(started)

        joined = await asyncio.gather(*(join(node) for node in nodes))
        failed = 0
        for node, (result, took) in zip(nodes, joined):
            label = f"{names[node.node_id]:<{width}} {node.node_id.short()}… at {node.address}"
            if isinstance(result, Exception):
                failed += 1
                print(f"  {label}  FAILED to join: {type(result).__name__}: {result}")
            else:
                print(f"  {label}  joined in {took}, {len(result)} peers closest to it, "
                      f"table {len(node.engine.table)}")
        if failed:
            print(f"\n{failed}/{len(nodes)} nodes could not join: is the bootstrap node running, "
                  f"and is its pinned key right?")
            return 1

        # 2. Announce. -----------------------------------------------------------------------------
        print("\nannouncing records and capabilities:")
        capability = {node.node_id: CAPABILITIES[i % len(CAPABILITIES)] for i, node in enumerate(nodes)}

        async def announce(node: sd.DhtNode) -> tuple[int, int, str]:
            started = time.perf_counter()
            # The capability first: announce() then stores the record that lists it.
            announced = await node.announce_capability(capability[node.node_id])
            stored = await node.announce()
            return stored, announced, _ms(started)

        for node, (stored, announced, took) in zip(
                nodes, await asyncio.gather(*(announce(node) for node in nodes))):
            print(f"  {names[node.node_id]:<{width}} {capability[node.node_id]!r} announced at "
                  f"{announced} peers, record stored at {stored} peers ({took})")
        print("  tables: " + ", ".join(f"{names[n.node_id]} {len(n.engine.table)}" for n in nodes))

        # 3. Find records by node ID. --------------------------------------------------------------
        print("\nfinding records by node ID:")
        records_found = 0
        for i, node in enumerate(nodes):
            target = nodes[(i + 1) % len(nodes)]
            started = time.perf_counter()
            try:
                record = await node.find_record(target.node_id, deadline_s=args.deadline)
            except sd.LookupTimeoutError as exc:
                print(f"  {names[node.node_id]:<{width}} -> {names[target.node_id]:<{width}} TIMED OUT "
                      f"after {_ms(started)}; closest reached: {len(exc.closest)} peers")
                continue
            took = _ms(started)
            if (record is not None and target.address in record.addresses
                    and capability[target.node_id] in record.capabilities):
                records_found += 1
                print(f"  {names[node.node_id]:<{width}} -> {names[target.node_id]:<{width}} found: "
                      f"{', '.join(map(str, record.addresses))}, capabilities "
                      f"{', '.join(record.capabilities) or '-'}, seq {record.seq} ({took})")
            else:
                print(f"  {names[node.node_id]:<{width}} -> {names[target.node_id]:<{width}} NOT FOUND "
                      f"({record!r}, {took})")

        # 4. Find capability providers. ------------------------------------------------------------
        print("\nfinding capability providers:")
        providers_complete = 0
        for i, node in enumerate(nodes):
            wanted = capability[nodes[(i + 1) % len(nodes)].node_id]
            expected = {n.node_id for n in nodes if capability[n.node_id] == wanted}
            started = time.perf_counter()
            try:
                records = await node.find_providers(wanted, deadline_s=args.deadline)
            except sd.LookupTimeoutError as exc:
                print(f"  {names[node.node_id]:<{width}} {wanted!r}: TIMED OUT after {_ms(started)}; "
                      f"closest reached: {len(exc.closest)} peers")
                continue
            took = _ms(started)
            found = {r.node_id for r in records}
            ours = sorted((name(n) for n in found & expected), key=lambda s: (len(s), s))
            elsewhere = len(found - expected)
            missing = sorted((name(n) for n in expected - found), key=lambda s: (len(s), s))
            if not missing:
                providers_complete += 1
            print(f"  {names[node.node_id]:<{width}} {wanted!r}: {len(found & expected)}/{len(expected)} "
                  f"providers: {', '.join(ours) or '-'}"
                  + (f" (+{elsewhere} from elsewhere)" if elsewhere else "")
                  + (f"; MISSING {', '.join(missing)}" if missing else "") + f" ({took})")

        ok = records_found == len(nodes) and providers_complete == len(nodes)
        print(f"\n{records_found}/{len(nodes)} records found, {providers_complete}/{len(nodes)} "
              f"provider lookups complete: {'OK' if ok else 'FAILED'}")
        return 0 if ok else 1
    finally:
        for node in nodes:
            await node.close()
        if own_bootstrap is not None:
            await own_bootstrap.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return asyncio.run(run(args))
    except sd.EndpointError as exc:
        print(f"find_peers.py: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
