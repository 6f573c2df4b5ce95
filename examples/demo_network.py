"""A small DHT on 127.0.0.1, across two processes: peers join, announce, and find each other.

    python examples/demo_network.py                 # 1 bootstrap node + 8 nodes, 3 of them in a 2nd process
    python examples/demo_network.py --nodes 12 --remote 4
    python examples/demo_network.py --remote 0      # everything in this process

What it shows, with the time each step took:

1. a bootstrap node starts and prints its pinned line ``<public key>@127.0.0.1:<port>``;
2. N nodes join through that line, some of them in a second process this script starts (real UDP
   between processes, authenticated sessions, no shared state): each says how many peers it
   learned;
3. each announces one capability (``storage``, ``relay`` or ``compute``) and its signed record;
   then how many peers each routing table holds. Nodes use k = 4 (``--k``): each record is
   stored at the 4 nodes closest to its ID, so most lookups must find it elsewhere;
4. each finds the next node's record by node ID (crossing between the processes), and an unused
   node ID is reported absent;
5. one lookup per capability finds its providers;
6. a node that pins the wrong key for the bootstrap node's address is refused (BootstrapError):
   whoever answers there cannot prove it holds the pinned key;

and ends with a summary line such as ``8/8 records found, 3/3 provider lookups complete, ...``.
The exit status is 0 when everything was found and the wrong key was refused, 1 otherwise.

The second process is this script with ``--serve-remote``: it hosts its nodes and runs the same
calls on request (JSON lines over its stdin/stdout), timing them itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

import sovereign_discovery as sd

CAPABILITIES = ("storage", "relay", "compute")
DEADLINE_S = 5.0  # of every lookup: the demo must end in seconds even if something is wrong


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _int_in(low: int, high: int):
    def parse(text: str) -> int:
        if not text.isdigit() or not low <= int(text) <= high:
            raise argparse.ArgumentTypeError(f"must be a number in {low}..{high}, not {text!r}")
        return int(text)
    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = _Parser(prog="demo_network.py",
                     description="Run a small sovereign_discovery DHT on 127.0.0.1 (a bootstrap "
                                 "node plus N nodes, some in a second process) and show peers "
                                 "joining, announcing and finding each other.")
    parser.add_argument("--nodes", type=_int_in(2, 64), default=8, metavar="N",
                        help="nodes besides the bootstrap node (default 8)")
    parser.add_argument("--remote", type=_int_in(0, 64), default=3, metavar="M",
                        help="how many of them run in a second process (default 3; 0: none)")
    parser.add_argument("--k", type=_int_in(1, 20), default=4, metavar="K",
                        help="Kademlia's k: bucket size, and how many peers store each record "
                             "(default 4, so that most nodes do not hold a given record)")
    parser.add_argument("--serve-remote", type=_int_in(1, 64), metavar="M", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_remote is None and args.remote >= args.nodes:
        parser.error(f"--remote ({args.remote}) must be smaller than --nodes ({args.nodes})")
    return args


# --- the calls, the same in both processes ---------------------------------------------------------


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 1)


async def perform(node: sd.DhtNode, op: str, arg: str) -> dict:
    """Run one demo call on ``node``; the result is plain data (it may cross a pipe as JSON)."""
    started = time.perf_counter()
    if op == "join":
        closest = await node.bootstrap([arg], deadline_s=DEADLINE_S)
        return {"ms": _ms(started), "closest": len(closest), "table": len(node.engine.table)}
    if op == "announce":
        # The capability first: announce() then stores the record that lists it.
        announced = await node.announce_capability(arg)
        stored = await node.announce()
        return {"ms": _ms(started), "stored": stored, "announced": announced}
    if op == "table":
        return {"table": len(node.engine.table)}
    if op == "find_record":
        node_id = sd.NodeId.parse(arg)
        held = node.engine.store.get(node_id, time.time()) is not None  # a copy of its own?
        try:
            record = await node.find_record(node_id, deadline_s=DEADLINE_S)
        except sd.LookupTimeoutError as exc:
            return {"ms": _ms(started), "timeout": True, "closest": len(exc.closest)}
        if record is None:
            return {"ms": _ms(started), "record": None}
        return {"ms": _ms(started), "held": held, "record": {
            "node_id": str(record.node_id), "addresses": [str(a) for a in record.addresses],
            "capabilities": list(record.capabilities), "seq": record.seq}}
    if op == "find_providers":
        try:
            records = await node.find_providers(arg, deadline_s=DEADLINE_S)
        except sd.LookupTimeoutError as exc:
            return {"ms": _ms(started), "timeout": True, "closest": len(exc.closest)}
        return {"ms": _ms(started), "providers": [str(r.node_id) for r in records]}
    if op == "stats":
        stats = node.stats()
        return {"in": sum(stats["messages_in"].values()), "out": sum(stats["messages_out"].values()),
                "retried": stats["requests_retried"], "internal_errors": stats["drops"]["internal_error"]}
    raise ValueError(f"unknown op {op!r}")


async def perform_safely(node: sd.DhtNode, op: str, arg: str) -> dict:
    try:
        return await perform(node, op, arg)
    except sd.SovereignDiscoveryError as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


# --- the second process ----------------------------------------------------------------------------


async def serve_remote(count: int, config: sd.DhtConfig) -> int:
    """Host ``count`` nodes; say hello with their IDs and addresses on stdout, then run each
    request line ``{"id", "node", "op", "arg"}`` from stdin and answer ``{"id", "result"}``.
    Ends (closing the nodes) at the end of stdin, e.g. when the demo exits."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    nodes = [await sd.DhtNode(sd.Identity.generate(), host="127.0.0.1", config=config).start()
             for _ in range(count)]

    def reply(message: dict) -> None:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()

    async def handle(request: dict) -> None:
        result = await perform_safely(nodes[request["node"]], request["op"], request["arg"])
        reply({"id": request["id"], "result": result})

    tasks = set()
    try:
        reply({"hello": [{"node_id": str(n.node_id), "address": str(n.address)} for n in nodes],
               "pid": os.getpid()})
        while line := await reader.readline():
            task = asyncio.create_task(handle(json.loads(line)))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
    finally:
        for task in list(tasks):
            task.cancel()
        for node in nodes:
            await node.close()
    return 0


# --- the demo --------------------------------------------------------------------------------------


class Peer:
    """A demo node, here or in the second process; ``call`` runs :func:`perform` on it."""

    def __init__(self, name: str, node_id: sd.NodeId, address: str, pid: int) -> None:
        self.name = name
        self.node_id = node_id
        self.address = address
        self.pid = pid
        self.capability = ""

    async def call(self, op: str, arg: str = "") -> dict:
        raise NotImplementedError


class LocalPeer(Peer):
    def __init__(self, name: str, node: sd.DhtNode) -> None:
        super().__init__(name, node.node_id, str(node.address), os.getpid())
        self.node = node

    async def call(self, op: str, arg: str = "") -> dict:
        return await perform_safely(self.node, op, arg)


class RemoteProcess:
    """The second process and the requests awaiting its answers."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.waiting: dict[int, asyncio.Future] = {}
        self.next_id = 0
        self.reader: asyncio.Task | None = None

    @classmethod
    async def start(cls, count: int, k: int) -> tuple["RemoteProcess", dict]:
        process = await asyncio.create_subprocess_exec(
            sys.executable, os.path.abspath(__file__), "--serve-remote", str(count), "--k", str(k),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        self = cls(process)
        line = await asyncio.wait_for(process.stdout.readline(), 20)
        if not line:
            raise RuntimeError(f"the second process exited (status {await process.wait()}) before starting its nodes")
        hello = json.loads(line)
        self.reader = asyncio.create_task(self._read())
        return self, hello

    async def _read(self) -> None:
        while line := await self.process.stdout.readline():
            message = json.loads(line)
            future = self.waiting.pop(message["id"], None)
            if future is not None and not future.done():
                future.set_result(message["result"])
        for future in self.waiting.values():  # it exited
            if not future.done():
                future.set_result({"error": "the second process exited"})
        self.waiting.clear()

    async def call(self, index: int, op: str, arg: str) -> dict:
        self.next_id += 1
        future = asyncio.get_running_loop().create_future()
        self.waiting[self.next_id] = future
        request = {"id": self.next_id, "node": index, "op": op, "arg": arg}
        try:
            self.process.stdin.write((json.dumps(request) + "\n").encode())
            await self.process.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            self.waiting.pop(self.next_id, None)
            return {"error": "the second process exited"}
        return await future

    async def stop(self) -> int:
        """Close its stdin (it closes its nodes and exits); kill it if it lingers."""
        if self.process.stdin is not None and not self.process.stdin.is_closing():
            self.process.stdin.close()
        try:
            status = await asyncio.wait_for(self.process.wait(), 5)
        except asyncio.TimeoutError:
            self.process.kill()
            status = await self.process.wait()
        if self.reader is not None:
            await self.reader
        return status


class RemotePeer(Peer):
    def __init__(self, name: str, node_id: sd.NodeId, address: str, pid: int,
                 remote: RemoteProcess, index: int) -> None:
        super().__init__(name, node_id, address, pid)
        self.remote = remote
        self.index = index

    async def call(self, op: str, arg: str = "") -> dict:
        return await self.remote.call(self.index, op, arg)


async def check_wrong_pin(bootstrap: sd.DhtNode) -> tuple[bool, str, float]:
    """A fresh node pins another key at the bootstrap node's address: it must be refused."""
    started = time.perf_counter()
    wrong = sd.Contact(sd.Identity.generate().public_key, bootstrap.address)
    async with sd.DhtNode(sd.Identity.generate(), host="127.0.0.1") as probe:
        try:
            await probe.bootstrap([wrong], deadline_s=DEADLINE_S)
        except sd.BootstrapError as exc:
            return True, f"refused ({type(exc).__name__}: {exc})", _ms(started)
        return False, "ACCEPTED: a peer answered for a key it does not hold", _ms(started)


async def demo(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    local_count = args.nodes - args.remote
    where = (f"{local_count} in this process, {args.remote} in a second process" if args.remote
             else "all in this process")
    print(f"sovereign_discovery {sd.__version__} (keyspace kernel: {sd.KERNEL}): a DHT on 127.0.0.1 "
          f"of 1 bootstrap node + {args.nodes} nodes ({where}), k = {args.k}\n")

    config = sd.DhtConfig(bucket_size=args.k)
    bootstrap = await sd.DhtNode(sd.Identity.generate(), host="127.0.0.1", config=config).start()
    pinned = bootstrap.contact.pinned
    print(f"bootstrap node {bootstrap.node_id.short()}… at {bootstrap.address}; its pinned line:\n  {pinned}\n")
    remote: RemoteProcess | None = None
    local_nodes: list[sd.DhtNode] = []
    pin_check = asyncio.create_task(check_wrong_pin(bootstrap))  # runs alongside; takes ~2 s
    try:
        peers: list[Peer] = []
        for i in range(local_count):
            node = await sd.DhtNode(sd.Identity.generate(), host="127.0.0.1", config=config).start()
            local_nodes.append(node)
            peers.append(LocalPeer(f"n{i + 1}", node))
        if args.remote:
            remote, hello = await RemoteProcess.start(args.remote, args.k)
            for j, info in enumerate(hello["hello"]):
                peers.append(RemotePeer(f"n{local_count + j + 1}", sd.NodeId.parse(info["node_id"]),
                                        info["address"], hello["pid"], remote, j))
        for i, peer in enumerate(peers):
            peer.capability = CAPABILITIES[i % len(CAPABILITIES)]
        names = {peer.node_id: peer.name for peer in peers}
        names[bootstrap.node_id] = "bootstrap"
        width = max(len(p.name) for p in peers)

        # 1. Join through the pinned line. ------------------------------------------------------
        print("join: every node bootstraps from the pinned line")
        joins = await asyncio.gather(*(peer.call("join", pinned) for peer in peers))
        joined = 0
        for peer, result in zip(peers, joins):
            head = f"  {peer.name:<{width}} {peer.node_id.short()}… {peer.address:<15} pid {peer.pid:<7}"
            if "error" in result:
                print(f"{head} FAILED to join: {result['error']}")
            else:
                joined += 1
                print(f"{head} joined in {result['ms']:6.1f} ms, learned {result['closest']} peers")
        if joined < len(peers):
            print(f"\n{joined}/{len(peers)} nodes joined: FAILED")
            return 1

        # 2. Announce records and capabilities. -------------------------------------------------
        print("\nannounce: each node announces one capability, then stores its signed record")
        announcements = await asyncio.gather(*(peer.call("announce", peer.capability) for peer in peers))
        for peer, result in zip(peers, announcements):
            if "error" in result:
                print(f"  {peer.name:<{width}} FAILED: {result['error']}")
            else:
                print(f"  {peer.name:<{width}} {peer.capability!r:<9} announced at {result['announced']} peers, "
                      f"record stored at {result['stored']} peers ({result['ms']:6.1f} ms)")
        tables = await asyncio.gather(*(peer.call("table") for peer in peers))
        print(f"\nrouting tables (peers held; {len(peers)} others exist): bootstrap {len(bootstrap.engine.table)}, "
              + ", ".join(f"{p.name} {t.get('table', '?')}" for p, t in zip(peers, tables)))

        # 3. Find records by node ID (one after another, so each latency is its own). -----------
        print("\nfind records by node ID:")
        records_found = 0
        for i, peer in enumerate(peers):
            target = peers[(i + 1) % len(peers)]
            result = await peer.call("find_record", str(target.node_id))
            crossing = ", across processes" if peer.pid != target.pid else ""
            head = f"  {peer.name:<{width}} -> {target.name:<{width}}"
            record = result.get("record")
            if (record and record["node_id"] == str(target.node_id) and target.address in record["addresses"]
                    and target.capability in record["capabilities"]):
                records_found += 1
                source = "asker held a copy" if result["held"] else "asker held no copy"
                print(f"{head} found    {', '.join(record['addresses']):<15} "
                      f"{','.join(record['capabilities']):<8} {result['ms']:6.1f} ms  ({source}{crossing})")
            else:
                why = result.get("error") or ("timed out" if result.get("timeout") else f"got {record!r}")
                print(f"{head} NOT FOUND ({why}{crossing}) {result.get('ms', 0):6.1f} ms")
        absent = sd.Identity.generate().node_id  # nobody has this ID
        result = await peers[0].call("find_record", str(absent))
        absent_ok = "record" in result and result["record"] is None
        print(f"  {peers[0].name:<{width}} -> {absent.short()}… (an ID no node has): "
              f"{'absent, as expected' if absent_ok else 'UNEXPECTED: ' + json.dumps(result)} "
              f"{result.get('ms', 0):6.1f} ms")

        # 4. Find capability providers. ---------------------------------------------------------
        print("\nfind capability providers:")
        complete = 0
        providers_expected = providers_found = 0
        for j, capability in enumerate(CAPABILITIES):
            expected = {p.node_id for p in peers if p.capability == capability}
            if not expected:
                continue
            # Ask from a node that does not provide it, the last ones first (the second process).
            asker = [p for p in reversed(peers) if p.capability != capability][j % 2]
            result = await asker.call("find_providers", capability)
            found = {sd.NodeId.parse(text) for text in result.get("providers", [])}
            providers_expected += len(expected)
            providers_found += len(found & expected)
            shown = ", ".join(sorted((names.get(n, n.short()) for n in found), key=lambda s: (len(s), s)))
            if "providers" in result and expected <= found:
                complete += 1
                print(f"  {asker.name:<{width}} asks for {capability!r:<9}: "
                      f"{f'{len(found)} providers ({shown})':<24} {result['ms']:6.1f} ms")
            else:
                missing = ", ".join(names[n] for n in expected - found)
                why = result.get("error") or ("timed out" if result.get("timeout") else f"missing {missing}")
                print(f"  {asker.name:<{width}} asks for {capability!r:<9}: INCOMPLETE ({why}) "
                      f"{result.get('ms', 0):6.1f} ms")
        lookups = sum(1 for c in CAPABILITIES if any(p.capability == c for p in peers))

        # 5. The pinned key. --------------------------------------------------------------------
        refused, how, took = await pin_check
        print(f"\npinned key: a node pinning another key at {bootstrap.address} was {how} after {took:.0f} ms")

        stats = await asyncio.gather(*(peer.call("stats") for peer in peers))
        messages = sum(s.get("in", 0) for s in stats) + sum(bootstrap.stats()["messages_in"].values())
        internal = sum(s.get("internal_errors", 0) for s in stats) + bootstrap.stats()["drops"]["internal_error"]
        ok = (records_found == len(peers) and absent_ok and complete == lookups and refused
              and internal == 0)
        print(f"traffic: {messages} messages delivered in all, "
              f"{sum(s.get('retried', 0) for s in stats)} requests retried, {internal} internal errors")
        print(f"\n{records_found}/{len(peers)} records found, {complete}/{lookups} provider lookups complete "
              f"({providers_found}/{providers_expected} providers), absent ID reported absent: "
              f"{'yes' if absent_ok else 'NO'}, wrong pinned key refused: {'yes' if refused else 'NO'}"
              f" — {'OK' if ok else 'FAILED'} in {time.perf_counter() - t0:.1f} s")
        return 0 if ok else 1
    finally:
        if not pin_check.done():
            pin_check.cancel()
        await asyncio.gather(pin_check, return_exceptions=True)
        if remote is not None:
            status = await remote.stop()
            if status != 0:
                print(f"(the second process exited with status {status})", file=sys.stderr)
        for node in local_nodes:
            await node.close()
        await bootstrap.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.serve_remote is not None:
            return asyncio.run(serve_remote(args.serve_remote, sd.DhtConfig(bucket_size=args.k)))
        return asyncio.run(asyncio.wait_for(demo(args), 60))
    except asyncio.TimeoutError:
        print("demo_network.py: error: the demo did not finish within 60 s", file=sys.stderr)
        return 1
    except (sd.EndpointError, RuntimeError) as exc:
        print(f"demo_network.py: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
