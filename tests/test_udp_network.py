"""A DHT of 51 DhtNodes over real UDP on 127.0.0.1, in two OS processes.

The test process runs a bootstrap node and 25 nodes; a child process (this file run as a script
by ``sys.executable``, with the same environment, so the same keyspace kernel) runs 25 more,
bootstrapping from the pinned line of the parent's bootstrap node. Every node announces its record
and its process's capability; then every node's record is looked up from a node in the *other*
process (51 lookups across the process boundary), and provider lookups in each process find the
other process's providers. The child answers over stdout with JSON lines and takes its commands on
stdin; it is killed in a ``finally``, and every wait is bounded.

All nodes share one source IP here, so the per-IP request rate limit (meant for distinct hosts)
is raised to the global one: with the default (50/s, burst 100) the bootstrap node drops dozens
of its own test network's requests as ``rate_limited``; retries absorb that, but the run gets
slower and less repeatable.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path

import pytest

import sovereign_discovery
from sovereign_discovery import Contact, DhtConfig, DhtNode, Identity

NODES_PER_PROCESS = 25  # plus the parent's bootstrap node: 51 in all
CHILD_FLAG = "--dht-network-child"
#: Overall bound of the test (it takes a few seconds); each wait on the child has its own too.
OVERALL_TIMEOUT_S = 60.0
STEP_TIMEOUT_S = 30.0
PROVIDER_LOOKUPS = 5
PROVIDER_COUNT = 10
CAPABILITY = {"parent": "svc-parent", "child": "svc-child"}

CONFIG = DhtConfig(rate_per_ip_per_s=DhtConfig().rate_global_per_s, burst_per_ip=DhtConfig().burst_global)


# --- shared by both processes ----------------------------------------------------------------------


async def start_nodes(stack: contextlib.AsyncExitStack, count: int) -> list[DhtNode]:
    return [await stack.enter_async_context(DhtNode(Identity.generate(), config=CONFIG))
            for _ in range(count)]


async def join_and_announce(nodes: list[DhtNode], bootstrap_line: str, side: str) -> list[list[int]]:
    """Bootstrap every node from ``bootstrap_line`` (one after the other: simultaneous joins
    make pairs of nodes handshake both ways at once, which costs re-handshakes and retries),
    then announce each node's record and capability, all at once. Returns [[stored_at of the
    record, of the capability], ...]."""
    for node in nodes:
        await node.bootstrap([bootstrap_line])
    return await announce(nodes, side)


async def announce(nodes: list[DhtNode], side: str) -> list[list[int]]:
    async def one(node: DhtNode) -> list[int]:
        # Capability first: announce_capability re-signs the record but stores it only under the
        # capability's key, so announce() after it stores the record listing the capability.
        capability = await node.announce_capability(CAPABILITY[side])
        return [await node.announce(), capability]
    return list(await asyncio.gather(*(one(node) for node in nodes)))


def describe(node: DhtNode) -> dict:
    return {"id": node.node_id.hex(), "address": str(node.address), "pinned": node.contact.pinned}


async def look_up(nodes: list[DhtNode], records: list[str], capability: str) -> dict:
    """From ``nodes`` (round robin): find_record of every ID in ``records`` and
    ``PROVIDER_LOOKUPS`` provider lookups of ``capability``. JSON-ready results; an exception
    is reported as its repr."""

    async def record(i: int, node_id: str) -> dict:
        seeker = nodes[i % len(nodes)]
        try:
            found = await seeker.find_record(bytes.fromhex(node_id))
        except Exception as exc:  # reported, then asserted on by the parent
            return {"id": node_id, "error": repr(exc)}
        if found is None:
            return {"id": node_id, "found": None}
        return {"id": node_id, "found": found.node_id.hex(),
                "addresses": [str(a) for a in found.addresses], "capabilities": list(found.capabilities)}

    async def providers(i: int) -> dict:
        seeker = nodes[(i * 7) % len(nodes)]
        try:
            found = await seeker.find_providers(capability, count=PROVIDER_COUNT)
        except Exception as exc:
            return {"error": repr(exc)}
        return {"found": [[r.node_id.hex(), [str(a) for a in r.addresses]] for r in found]}

    results = await asyncio.gather(*(record(i, node_id) for i, node_id in enumerate(records)),
                                   *(providers(i) for i in range(PROVIDER_LOOKUPS)))
    return {"records": results[:len(records)], "providers": results[len(records):]}


def health(nodes: list[DhtNode]) -> list[dict]:
    """What must be zero everywhere, and the table sizes."""
    out = []
    for node in nodes:
        stats = node.stats()
        out.append({
            "id": node.node_id.hex(),
            "internal_error": stats["drops"]["internal_error"],
            "session_internal_error": stats["drops"]["session.internal_error"],
            "handler_errors": sum(u["handler_errors"] for u in stats["udp"].values()),
            "no_route": stats["no_route"],
            "table_size": stats["table_size"],
            "requests_retried": stats["requests_retried"],  # (for the failure report)
        })
    return out


# --- the child process ---------------------------------------------------------------------------


def _emit(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def _read_command() -> dict:
    line = await asyncio.to_thread(sys.stdin.readline)
    if not line:  # the parent went away
        raise SystemExit("stdin closed")
    return json.loads(line)


async def _child(bootstrap_line: str, count: int) -> None:
    async with contextlib.AsyncExitStack() as stack:
        nodes = await start_nodes(stack, count)
        stored = await join_and_announce(nodes, bootstrap_line, "child")
        _emit({"kind": "ready", "kernel": sovereign_discovery.KERNEL, "pid": os.getpid(),
               "nodes": [describe(n) for n in nodes], "stored": stored})
        command = await _read_command()
        assert command["kind"] == "look_up", command
        _emit({"kind": "results", **await look_up(nodes, command["records"], command["capability"])})
        command = await _read_command()  # keep serving the parent's lookups until told to stop
        assert command["kind"] == "quit", command
        _emit({"kind": "health", "nodes": health(nodes)})


def child_main(argv: list[str]) -> None:
    bootstrap_line, count = argv[0], int(argv[1])
    asyncio.run(asyncio.wait_for(_child(bootstrap_line, count), OVERALL_TIMEOUT_S + 30.0))


# --- the test ------------------------------------------------------------------------------------


class Child:
    """The child process: JSON lines out, commands in, every read bounded."""

    def __init__(self, process: asyncio.subprocess.Process, stderr_path: str) -> None:
        self.process = process
        self.stderr_path = stderr_path

    def stderr(self) -> str:
        return Path(self.stderr_path).read_text(errors="replace")[-4000:]

    async def read(self, kind: str) -> dict:
        assert self.process.stdout is not None
        try:
            line = await asyncio.wait_for(self.process.stdout.readline(), STEP_TIMEOUT_S)
        except asyncio.TimeoutError:
            pytest.fail(f"no {kind!r} from the child within {STEP_TIMEOUT_S} s; stderr:\n{self.stderr()}")
        if not line:
            pytest.fail(f"the child exited before {kind!r} (code {await self.process.wait()}); "
                        f"stderr:\n{self.stderr()}")
        message = json.loads(line)
        assert message["kind"] == kind, message
        return message

    async def send(self, message: dict) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write((json.dumps(message) + "\n").encode())
        await self.process.stdin.drain()


def check_records(results: list[dict], expected: dict[str, str], capability: str) -> None:
    """Every record lookup found the record of the ID asked, advertising that node's address."""
    assert [r["id"] for r in results] == list(expected)
    failures = [r for r in results if r.get("found") != r["id"]]
    assert not failures, f"{len(failures)} of {len(results)} record lookups failed: {failures[:5]}"
    for r in results:
        assert r["addresses"] == [expected[r["id"]]], r
        assert r["capabilities"] == [capability], r


def check_providers(results: list[dict], expected: dict[str, str]) -> None:
    assert len(results) == PROVIDER_LOOKUPS
    for r in results:
        assert "error" not in r, r
        found = r["found"]
        assert len(found) == PROVIDER_COUNT, r
        assert len({node_id for node_id, _ in found}) == PROVIDER_COUNT
        for node_id, addresses in found:
            assert node_id in expected, f"provider {node_id} is not a node of the other process"
            assert addresses == [expected[node_id]]


def check_health(rows: list[dict]) -> None:
    for row in rows:
        assert row["internal_error"] == 0 and row["session_internal_error"] == 0, row
        assert row["handler_errors"] == 0 and row["no_route"] == 0, row
        assert row["table_size"] > 0, row


async def spawn_child(bootstrap_line: str, stderr_file) -> asyncio.subprocess.Process:
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return await asyncio.create_subprocess_exec(
        sys.executable, str(Path(__file__).resolve()), CHILD_FLAG, bootstrap_line, str(NODES_PER_PROCESS),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=stderr_file, env=env, cwd=root)


def test_fifty_one_nodes_in_two_processes_find_each_other():
    async def main() -> None:
        with tempfile.NamedTemporaryFile("w+", prefix="dht-child-", suffix=".stderr") as stderr_file:
            async with contextlib.AsyncExitStack() as stack:
                bootstrap, *nodes = await start_nodes(stack, 1 + NODES_PER_PROCESS)
                everyone = [bootstrap, *nodes]
                process = await spawn_child(bootstrap.contact.pinned, stderr_file)
                child = Child(process, stderr_file.name)
                try:
                    # The parent's nodes join while the child starts; the child's join after.
                    stored = await join_and_announce(nodes, bootstrap.contact.pinned, "parent")
                    stored += await announce([bootstrap], "parent")
                    assert all(r >= 1 and c >= 1 for r, c in stored), stored

                    ready = await child.read("ready")
                    assert ready["pid"] != os.getpid()
                    assert ready["kernel"] == sovereign_discovery.KERNEL  # same environment
                    assert all(r >= 1 and c >= 1 for r, c in ready["stored"]), ready["stored"]
                    theirs = {n["id"]: n["address"] for n in ready["nodes"]}
                    ours = {n.node_id.hex(): str(n.address) for n in everyone}
                    assert len(theirs) == NODES_PER_PROCESS and not set(theirs) & set(ours)
                    assert len(theirs) + len(ours) >= 50
                    assert all(str(Contact.parse(n["pinned"]).address) == n["address"] for n in ready["nodes"])

                    # Lookups across the boundary, both ways at once.
                    await child.send({"kind": "look_up", "records": list(ours), "capability": CAPABILITY["parent"]})
                    mine = await look_up(everyone, list(theirs), CAPABILITY["child"])
                    results = await child.read("results")

                    check_records(mine["records"], theirs, CAPABILITY["child"])
                    check_providers(mine["providers"], theirs)
                    check_records(results["records"], ours, CAPABILITY["parent"])
                    check_providers(results["providers"], ours)

                    await child.send({"kind": "quit"})
                    child_health = await child.read("health")
                    assert len(child_health["nodes"]) == NODES_PER_PROCESS
                    check_health(child_health["nodes"])
                    check_health(health(everyone))
                    assert await asyncio.wait_for(process.wait(), STEP_TIMEOUT_S) == 0, child.stderr()
                finally:
                    if process.returncode is None:
                        process.kill()
                        await process.wait()

    asyncio.run(asyncio.wait_for(main(), OVERALL_TIMEOUT_S))


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == CHILD_FLAG:
    child_main(sys.argv[2:])
