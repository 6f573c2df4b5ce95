"""PeerDiscoveryCoordinator over real UDP on 127.0.0.1 (port 0): the join through pinned bootstrap
peers, the merged peer table and its events, local layers through a scripted layer object, the
peer cache re-seeding a restarted node, and every layer switched off in turn. Each test is bounded
by ``run`` and every wait by ``eventually`` (a count- and time-bounded poll)."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from sovereign_discovery import (
    Address,
    ArgumentTypeError,
    ArgumentValueError,
    BootstrapAnswered,
    BootstrapConfig,
    BootstrapFinished,
    BootstrapRejected,
    ClosedError,
    Config,
    Contact,
    DhtNode,
    DhtSettings,
    Identity,
    LocalConfig,
    PeerCache,
    PeerRecord,
)
from sovereign_discovery.coordinator import (
    LayerStateChanged,
    PeerDiscovered,
    PeerDiscoveryCoordinator,
    PeerLost,
    PeerUpdated,
)
from sovereign_discovery.layers import LayerContext, LayerUnavailable

from .helpers import run_bounded

TIMEOUT_S = 30.0
NO_LOCAL = LocalConfig(mdns=False, bluetooth=False)


def run(coro, timeout: float = TIMEOUT_S):
    return run_bounded(coro, timeout)


async def eventually(predicate, what: str, timeout: float = 10.0) -> None:
    """Poll ``predicate`` every 20 ms, at most ``timeout`` seconds."""
    for _ in range(int(timeout / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def config(*peers: str, local: LocalConfig = NO_LOCAL, dht: DhtSettings = DhtSettings(),
           timeout_s: float = 2.0, retries: int = 0) -> Config:
    return Config(local=local, dht=dht,
                  bootstrap=BootstrapConfig(peers=peers, timeout_s=timeout_s, retries=retries,
                                            backoff_initial_s=0.1, backoff_max_s=0.2))


class ScriptedLayer:
    """A local layer the test drives: it hands the context to the test."""

    def __init__(self, name: str = "mdns", fail: Exception | None = None) -> None:
        self.name = name
        self.fail = fail
        self.context: LayerContext | None = None
        self.own_records: list[PeerRecord] = []
        self.closed = False

    async def start(self, context: LayerContext) -> None:
        if self.fail is not None:
            raise self.fail
        self.context = context
        context.on_own_record_changed(self.own_records.append)

    async def close(self) -> None:
        self.closed = True

    def stats(self) -> dict:
        return {"scripted": 1}


def ids(peers) -> set[bytes]:
    return {bytes(p.node_id) for p in peers}


# --- joining through pinned bootstrap peers ------------------------------------------------------


def test_nodes_join_through_a_bootstrap_node_and_find_each_other():
    async def main() -> None:
        async with contextlib.AsyncExitStack() as stack:
            boot = await stack.enter_async_context(PeerDiscoveryCoordinator(Identity.generate(), config=config()))
            line = boot.node.contact.pinned
            seen: list = []
            nodes = []
            for n in range(3):
                node = PeerDiscoveryCoordinator(Identity.generate(), config=config(line),
                                                capabilities=["relay"] if n else ["storage"],
                                                on_event=seen.append if n == 0 else None)
                nodes.append(await stack.enter_async_context(node))
            for node in nodes:
                assert await node.joined(10)
            everyone = {bytes(n.node_id) for n in (boot, *nodes)}
            for node in (boot, *nodes):
                await eventually(lambda node=node: ids(node.peers()) == everyone - {bytes(node.node_id)},
                                 f"{node.node_id.short()}'s peer table")
            first = nodes[0]
            assert "bootstrap" in first.peer(boot.node_id).sources
            assert any(isinstance(e, BootstrapAnswered) for e in seen)
            assert any(isinstance(e, BootstrapFinished) and e.ok for e in seen)
            discovered = {bytes(e.peer.node_id) for e in seen if isinstance(e, PeerDiscovered)}
            assert discovered == everyone - {bytes(first.node_id)}
            # find_peer answers from the table; find_peers by capability
            assert (await first.find_peer(nodes[2].node_id)).record.has_capability("relay")
            assert first.stats()["lookups"] == {"find_peer_from_table": 1}
            assert first.stats()["checks"].get("record_fetches", 0) >= 1
            relays = await boot.find_peers(capability="relay", count=5)
            assert ids(relays) == {bytes(nodes[1].node_id), bytes(nodes[2].node_id)}
            assert [p.node_id for p in await boot.find_peers(capability="storage")] == [first.node_id]
            stats = first.stats()
            assert stats["peers"] == 3 and stats["bootstrap"]["answered"] == 1
            assert stats["events"]["PeerDiscovered"] == 3 and stats["dht"]["table_size"] >= 3
            assert first.health() == {"ok": True, "state": "running", "joined": True,
                                      "table_size": stats["dht"]["table_size"], "peers": 3}

    run(main())


def test_find_peer_falls_back_to_a_dht_lookup():
    async def main() -> None:
        async with PeerDiscoveryCoordinator(Identity.generate(), config=config()) as boot:
            line = boot.node.contact.pinned
            async with DhtNode(Identity.generate()) as stranger, \
                    PeerDiscoveryCoordinator(Identity.generate(), config=config(line)) as node:
                await stranger.bootstrap([boot.node.contact])
                await stranger.announce()
                assert await node.joined(10)
                node._table.remove(stranger.node_id)  # as if the table had not learned it yet
                peer = await node.find_peer(stranger.node_id)
                assert peer is not None and peer.record == stranger.record and "dht" in peer.sources
                assert node.stats()["lookups"] == {"find_peer_from_dht": 1}
                absent = Identity.generate().node_id
                assert await node.find_peer(absent, deadline_s=2.0) is None

    run(main())


def test_a_wrong_pinned_key_is_refused_reported_and_nothing_from_it_enters():
    async def main() -> None:
        async with PeerDiscoveryCoordinator(Identity.generate(), config=config()) as real:
            impostor = Contact(Identity.generate().public_key, real.node.address)
            events: list = []
            node = PeerDiscoveryCoordinator(Identity.generate(), config=config(impostor.pinned),
                                            on_event=events.append)
            stream = node.events()
            async with node:
                assert not await node.joined(10)
                rejected = [e for e in events if isinstance(e, BootstrapRejected)]
                assert [e.contact for e in rejected] == [impostor]
                assert node.peers() == [] and len(node.node.engine.table) == 0
                bootstrap = node.stats()["bootstrap"]
                assert (bootstrap["answered"], bootstrap["rejected"], bootstrap["unreachable"]) == (0, 1, 0)
            # The async iterator got the same refusals as the callback (rejoin attempts included).
            assert [e async for e in stream if isinstance(e, BootstrapRejected)] == \
                [e for e in events if isinstance(e, BootstrapRejected)]

    run(main())


def test_a_node_nobody_answered_keeps_trying_to_join_with_backoff():
    import socket

    async def main() -> None:
        late = Identity.generate()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:  # the port the late node will take
            silent.bind(("127.0.0.1", 0))
            port = silent.getsockname()[1]
            line = Contact(late.public_key, Address("127.0.0.1", port)).pinned
            node = await PeerDiscoveryCoordinator(Identity.generate(), config=config(line, timeout_s=0.5)).start()
        try:
            assert not await node.joined(10)
            async with DhtNode(late, port=port) as bootstrap_node:
                await eventually(lambda: node.peer(late.node_id) is not None or
                                 late.node_id in node.node.engine.table, "the late bootstrap node", timeout=15)
                assert node.stats()["bootstrap"]["rejoin_attempts"] >= 1
                assert node.node_id in bootstrap_node.engine.table
        finally:
            await node.close()

    run(main())


# --- events ---------------------------------------------------------------------------------------


def test_events_iterator_sees_the_join_and_ends_on_close_and_is_bounded():
    async def main() -> None:
        async with PeerDiscoveryCoordinator(Identity.generate(), config=config()) as boot:
            node = PeerDiscoveryCoordinator(Identity.generate(), config=config(boot.node.contact.pinned))
            events = node.events()  # before start: sees the join too
            tiny = node.events(max_queued=1)
            await node.start()
            assert await node.joined(10)
            await eventually(lambda: node.peer(boot.node_id) is not None, "the bootstrap peer's record")
            await node.close()
            got = [event async for event in events]
            kinds = [type(e).__name__ for e in got]
            assert "BootstrapAnswered" in kinds and "BootstrapFinished" in kinds and "PeerDiscovered" in kinds
            assert [e async for e in tiny] == got[-1:]  # only the newest survived
            assert node.closed and node.health() == {"ok": False, "state": "closed"}
            with pytest.raises(ClosedError):
                node.stats()
            assert [e async for e in node.events()] == []  # after close: ends at once

    run(main())


def test_a_raising_callback_is_logged_and_counted_and_the_others_still_run(caplog):
    async def main() -> None:
        async with PeerDiscoveryCoordinator(Identity.generate(), config=config()) as boot:
            got: list = []

            def bad(event) -> None:
                raise RuntimeError("callback bug")

            node = PeerDiscoveryCoordinator(Identity.generate(), config=config(boot.node.contact.pinned),
                                            on_event=bad)
            node.add_callback(got.append)
            async with node:
                await eventually(lambda: any(isinstance(e, PeerDiscovered) for e in got), "PeerDiscovered")
                assert node.stats()["callback_errors"] >= 1
                node.remove_callback(got.append)

    run(main())
    assert "callback bug" in caplog.text


# --- local layers ---------------------------------------------------------------------------------


def test_a_local_sighting_is_pinged_before_it_is_reported_and_feeds_the_dht():
    async def main() -> None:
        layer = ScriptedLayer("mdns")
        events: list = []
        async with DhtNode(Identity.generate()) as neighbour, DhtNode(Identity.generate()) as silent_owner:
            await neighbour.announce()
            await silent_owner.announce()
            silent_record = silent_owner.record
            await silent_owner.close()  # its record is valid, but nobody answers there any more
            async with PeerDiscoveryCoordinator(Identity.generate(), config=config(local=LocalConfig()),
                                                local_layers=[layer], on_event=events.append) as node:
                await eventually(lambda: layer.context is not None, "the layer to start")
                assert any(e == LayerStateChanged("mdns", "running") for e in events)
                await eventually(lambda: layer.own_records, "the own record reaching the layer")
                assert layer.context.own_record == node.node.record
                layer.context.peer_seen(neighbour.record, address=neighbour.address)
                layer.context.peer_seen(silent_record)
                await eventually(lambda: node.peer(neighbour.node_id) is not None, "the neighbour")
                peer = node.peer(neighbour.node_id)
                assert peer.local and peer.sources >= {"mdns"} and peer.addresses[0] == neighbour.address
                assert neighbour.node_id in node.node.engine.table  # fed into the DHT routing table
                await eventually(lambda: node.stats()["checks"].get("unreachable", 0) == 1,
                                 "the silent peer's PING to fail", timeout=10)
                assert node.peer(silent_record.node_id) is None
                assert layer.context.known_peer(neighbour.node_id) == node.peer(neighbour.node_id)
                # a goodbye withdraws the layer's word
                layer.context.peer_gone(neighbour.node_id)
                held = node.peer(neighbour.node_id)
                if held is None:
                    assert any(isinstance(e, PeerLost) and e.peer.node_id == neighbour.node_id for e in events)
                else:
                    assert "mdns" not in held.sources and not held.local
                    assert any(isinstance(e, PeerUpdated) for e in events)
                # wrong types from a buggy layer are counted, never raised
                layer.context.peer_seen(b"not a record")
                layer.context.peer_gone(b"short")
                assert node.stats()["checks"]["bad_sighting"] == 2
                assert node.stats()["layers"]["mdns"] == {"state": "running", "reason": None, "scripted": 1}
        assert layer.closed

    run(main())


def test_a_ble_sighting_without_an_ip_path_is_reported_with_its_rssi():
    async def main() -> None:
        layer = ScriptedLayer("ble")
        other = Identity.generate()
        record = PeerRecord.create(other, addresses=[Address("192.0.2.9", 9)], seq=1,
                                   expires_at=int(time.time()) + 600)
        remote = Identity.generate()
        remote_record = PeerRecord.create(remote, addresses=[Address("192.0.2.10", 9)], seq=1,
                                          expires_at=int(time.time()) + 600)
        called: list = []
        node = PeerDiscoveryCoordinator(Identity.generate(), config=config(local=LocalConfig()),
                                        local_layers=[layer], on_event=called.append)
        stream = node.events()
        async with node:
            await eventually(lambda: layer.context is not None, "the layer to start")
            layer.context.peer_seen(record, rssi=-42, check_reachable=False)
            await eventually(lambda: node.peer(other.node_id) is not None, "the BLE peer")
            assert node.peer(other.node_id).rssi == -42 and node.peers(source="ble")[0].node_id == other.node_id
            # A remote peer seen later still comes after the local one (local peers are preferred).
            node._observe(remote_record, "dht")
            assert node.peer(remote.node_id).last_seen >= node.peer(other.node_id).last_seen
            assert [p.node_id for p in node.peers()] == [other.node_id, remote.node_id]
            assert [p.node_id for p in await node.find_peers(count=1)] == [other.node_id]
            # Its only layer says it is gone: the peer is lost, told to callbacks and iterators alike.
            layer.context.peer_gone(other.node_id)
            assert node.peer(other.node_id) is None
        lost = [e for e in called if isinstance(e, PeerLost)]
        assert [(e.peer.node_id, e.reason) for e in lost] == [(other.node_id, "gone")]
        assert [e async for e in stream if isinstance(e, PeerLost)] == lost
        assert any(isinstance(e, PeerDiscovered) and e.source == "ble" for e in called)

    run(main())


def test_unavailable_and_failing_layers_are_reported_and_the_rest_keeps_running():
    async def main() -> None:
        missing = ScriptedLayer("ble", fail=LayerUnavailable("ble", "no Bluetooth adapter"))
        broken = ScriptedLayer("mdns", fail=RuntimeError("bug in the layer"))
        events: list = []
        async with PeerDiscoveryCoordinator(Identity.generate(), config=config(local=LocalConfig()),
                                            local_layers=[missing, broken], on_event=events.append) as node:
            await eventually(lambda: len([e for e in events if isinstance(e, LayerStateChanged)]) == 2,
                             "both layer reports")
            layers = node.stats()["layers"]
            assert layers["ble"] == {"state": "unavailable", "reason": "no Bluetooth adapter"}
            assert layers["mdns"]["state"] == "failed" and "bug in the layer" in layers["mdns"]["reason"]
            assert await node.node.ping(node.node.contact) is None and node.health()["ok"]

    run(main())


def test_layers_switched_off_in_the_configuration_do_not_start():
    async def main() -> None:
        layer = ScriptedLayer("mdns")
        async with PeerDiscoveryCoordinator(Identity.generate(), config=config(local=LocalConfig(mdns=False)),
                                            local_layers=[layer]) as node:
            await asyncio.sleep(0.05)
            assert layer.context is None
            assert node.stats()["layers"]["mdns"] == {"state": "off", "reason": None}
        # Without explicit layers, the configured ones this installation lacks say why (mDNS only
        # on loopback: a test never announces on the machine's real interfaces).
        loopback = LocalConfig(mdns_interfaces=("127.0.0.1",))
        async with PeerDiscoveryCoordinator(Identity.generate(), config=config(local=loopback)) as node:
            layers = node.stats()["layers"]
            for name in ("mdns", "ble"):
                assert layers[name]["state"] in ("unavailable", "running", "starting"), layers

    run(main())


def test_with_the_bootstrap_layer_off_the_pinned_peers_are_not_contacted():
    async def main() -> None:
        async with PeerDiscoveryCoordinator(Identity.generate(), config=config()) as boot:
            off = config(boot.node.contact.pinned)
            off = Config(local=NO_LOCAL, bootstrap=BootstrapConfig(enabled=False, peers=off.bootstrap.peers))
            async with PeerDiscoveryCoordinator(Identity.generate(), config=off) as node:
                assert not await node.joined(10)
                assert node.stats()["bootstrap"]["state"] == "off" and len(node.node.engine.table) == 0
                assert sum(node.stats()["dht"]["messages_out"].values()) == 0
                assert boot.stats()["dht"]["table_size"] == 0

    run(main())


def test_with_the_dht_off_nothing_is_announced_or_looked_up():
    async def main() -> None:
        async with PeerDiscoveryCoordinator(Identity.generate(), config=config()) as boot:
            off = config(boot.node.contact.pinned, dht=DhtSettings(enabled=False))
            async with PeerDiscoveryCoordinator(Identity.generate(), config=off) as node:
                assert await node.joined(10)
                assert node.node.record is not None  # signed for local layers and direct fetches
                assert boot.node.engine.store.get(node.node_id, time.time()) is None  # stored nowhere
                assert await node.find_peer(Identity.generate().node_id) is None
                out = node.stats()["dht"]["messages_out"]
                assert out["store"] == 0 and out["announce"] == 0 and out["get_providers"] == 0

    run(main())


# --- the peer cache ---------------------------------------------------------------------------------


def test_a_restarted_node_rejoins_from_its_cache_when_the_bootstrap_node_is_gone(tmp_path):
    cache = tmp_path / "peers.sqlite3"

    async def main() -> None:
        boot = await PeerDiscoveryCoordinator(Identity.generate(), config=config()).start()
        line = boot.node.contact.pinned
        async with PeerDiscoveryCoordinator(Identity.generate(), config=config(line), capabilities=["relay"]) as peer:
            me = Identity.generate()
            async with PeerDiscoveryCoordinator(me, config=config(line), cache=cache) as node:
                await eventually(lambda: node.peer(peer.node_id) is not None, "the peer's record")
            with PeerCache.open(cache) as stored:
                assert {bytes(p.node_id) for p in stored.peers(time.time())} >= {bytes(peer.node_id)}
            await boot.close()  # every bootstrap peer is gone
            events: list = []
            async with PeerDiscoveryCoordinator(me, config=config(line), cache=cache, on_event=events.append) as node:
                assert await node.joined(15)
                await eventually(lambda: node.peer(peer.node_id) is not None, "the peer, again")
                assert "cache" in node.peer(peer.node_id).sources
                assert node.stats()["cache"]["reseeded"] >= 1
                assert any(isinstance(e, BootstrapFinished) and not e.ok for e in events)
                assert [p.node_id for p in await node.find_peers(capability="relay")] == [peer.node_id]

    run(main(), 60)


# --- caller mistakes ----------------------------------------------------------------------------------


def test_caller_mistakes_are_typed_and_named():
    identity = Identity.generate()
    with pytest.raises(ArgumentTypeError, match="identity"):
        PeerDiscoveryCoordinator(b"key")
    with pytest.raises(ArgumentTypeError, match="config"):
        PeerDiscoveryCoordinator(identity, config={"dht": {}})
    with pytest.raises(ArgumentValueError):
        PeerDiscoveryCoordinator(identity, capabilities=["Bad Name"])
    with pytest.raises(ArgumentTypeError, match="local layer"):
        PeerDiscoveryCoordinator(identity, local_layers=[object()])
    with pytest.raises(ArgumentValueError, match="one layer per name"):
        PeerDiscoveryCoordinator(identity, local_layers=[ScriptedLayer(), ScriptedLayer()])
    with pytest.raises(ArgumentTypeError, match="cache"):
        PeerDiscoveryCoordinator(identity, cache=42)

    async def main() -> None:
        node = PeerDiscoveryCoordinator(identity, config=config())
        with pytest.raises(ClosedError, match="not started"):
            node.stats()
        async with node:
            with pytest.raises(ArgumentValueError):
                await node.find_peers(capability="relay", count=0)
            with pytest.raises(ArgumentTypeError):
                await node.find_peer("not bytes")
        with pytest.raises(ClosedError):
            await node.start()

    run(main())
