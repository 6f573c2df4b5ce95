"""The mDNS layer (sovereign_discovery.mdns): the TXT encoding, address choice, and the layer's
logic against the in-memory transport (verification, filtering itself, drops by reason, bounds,
re-announcing, goodbyes, liveness); then real python-zeroconf on 127.0.0.1 inside this process
(two layers, and two coordinators). Every test is bounded by ``run`` and every wait by
``eventually``. Real zeroconf tests browse a service type unique to the test, so other test runs
on this machine's loopback (which every process shares) cannot disturb them."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import sys
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sovereign_discovery import Address, Identity, LocalConfig, PeerRecord
from sovereign_discovery.config import BootstrapConfig, Config
from sovereign_discovery.layers import LayerUnavailable
from sovereign_discovery.mdns import (
    MAX_TXT_BYTES,
    MdnsLayer,
    TxtError,
    choose_address,
    create_layer,
    decode_txt,
    encode_txt,
    instance_name,
)
from sovereign_discovery.mdns_transport import NOT_INSTALLED, MemoryMdnsNetwork
from sovereign_discovery.testing import RecordingLayerContext

from .helpers import run_bounded




def run(coro, timeout: float = 30.0):
    return run_bounded(coro, timeout)


async def eventually(predicate, what: str, timeout: float = 5.0) -> float:
    """Poll ``predicate`` every 10 ms for at most ``timeout`` s; the seconds it took."""
    start = time.monotonic()
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return time.monotonic() - start
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def make_record(identity: Identity, *, seq: int = 1, ip: str = "192.0.2.1", port: int = 4000,
                expires_in: int = 600, capabilities=("relay",)) -> PeerRecord:
    return PeerRecord.create(identity, addresses=[Address(ip, port)], capabilities=capabilities, seq=seq,
                             expires_at=int(time.time()) + expires_in)


class FakeContext(RecordingLayerContext):
    """The shared recording context, keeping ``(record, address)`` per sighting; a PING is
    answered while the peer's node ID is in ``alive``."""

    bound: list = []  # a plain attribute (a test sets it), shadowing LayerContext's property

    def __init__(self, identity: Identity, record: PeerRecord | None = None, *,
                 with_ping: bool = True) -> None:
        super().__init__(identity, own=record)
        self.alive: set[bytes] = set()
        self.pinged: list[bytes] = []
        if not with_ping:
            self.ping = None

    def peer_seen(self, record, *, address=None, rssi=None, check_reachable=True) -> None:
        self.seen.append((record, address))

    async def ping(self, record, address=None) -> bool:
        self.pinged.append(bytes(record.node_id))
        await asyncio.sleep(0.005)
        return bytes(record.node_id) in self.alive

    def seen_ids(self) -> set[bytes]:
        return {bytes(r.node_id) for r, _ in self.seen}


class Node:
    """An identity, its record, a fake context and an mDNS layer on a memory network."""

    def __init__(self, network: MemoryMdnsNetwork, n: int, **layer_kwargs) -> None:
        self.identity = Identity.generate()
        self.ip = f"192.0.2.{n}"
        self.record = make_record(self.identity, ip=self.ip, port=4000 + n)
        self.context = FakeContext(self.identity, self.record,
                                   with_ping=layer_kwargs.pop("with_ping", True))
        self.transport = network.transport((self.ip,))
        self.layer = MdnsLayer(LocalConfig(mdns_interfaces=(self.ip,)), transport=self.transport,
                               **layer_kwargs)

    @property
    def key(self) -> bytes:
        return bytes(self.identity.node_id)


async def close(*nodes: Node) -> None:
    for node in nodes:
        await node.layer.close()


async def one_node(**layer_kwargs) -> tuple[MemoryMdnsNetwork, Node]:
    """Node 1 on a fresh memory link, started."""
    network = MemoryMdnsNetwork()
    node = Node(network, 1, **layer_kwargs)
    await node.layer.start(node.context)
    return network, node


async def two_nodes(a_kwargs: dict | None = None) -> tuple[MemoryMdnsNetwork, Node, Node]:
    """Nodes 1 and 2 on a fresh memory link, started, each having seen the other."""
    network = MemoryMdnsNetwork()
    a, b = Node(network, 1, **(a_kwargs or {})), Node(network, 2)
    a.context.alive.add(b.key)
    for node in (a, b):
        await node.layer.start(node.context)
    await eventually(lambda: a.context.seen and b.context.seen, "both sightings")
    return network, a, b


# --- the TXT encoding and addresses ------------------------------------------------------------------


def _largest_record(identity: Identity) -> PeerRecord:
    addresses = [Address(f"2001:db8::{n + 1}", 65535) for n in range(8)]
    capabilities = [f"{chr(97 + n)}" * 32 for n in range(16)]
    return PeerRecord.create(identity, addresses=addresses, capabilities=capabilities, seq=2**64 - 1,
                             expires_at=int(time.time()) + 600, protocol_version=65535)


def test_txt_carries_the_signed_record_in_strings_of_at_most_255_bytes():
    identity = Identity.generate()
    for record in (make_record(identity), _largest_record(identity)):
        rdata = encode_txt(record)
        strings, offset = [], 0
        while offset < len(rdata):
            strings.append(rdata[offset + 1:offset + 1 + rdata[offset]])
            offset += 1 + rdata[offset]
        assert strings[0] == b"v=1" and all(len(s) <= 255 for s in strings)
        assert [s[:3] for s in strings[1:]] == [b"r%d=" % n for n in range(len(strings) - 1)]
        assert len(rdata) <= MAX_TXT_BYTES
        assert PeerRecord.decode(decode_txt(rdata), now=time.time()) == record
    assert len(strings) == 5  # the 797-byte record needs four chunks


def _txt(*strings: bytes) -> bytes:
    return b"".join(bytes((len(s),)) + s for s in strings)


@pytest.mark.parametrize("rdata, reason", [
    (b"", "missing_txt_version"),
    (b"\x00", "missing_txt_version"),  # zeroconf's empty TXT
    (_txt(b"r0=abc"), "missing_txt_version"),
    (_txt(b"v=2", b"r0=abc"), "unsupported_txt_version"),
    (_txt(b"v=1"), "missing_record"),
    (_txt(b"v=1", b"r0="), "malformed_txt"),
    (_txt(b"v=1", b"r0=ab", b"r2=cd"), "malformed_txt"),
    (_txt(b"v=1", *[b"r%d=" % n + b"x" * 250 for n in range(5)]), "record_too_large"),
    (b"\x09v=1", "malformed_txt"),
    (b"\x01v" * 17, "txt_too_many_strings"),
    (_txt(*[b"k" * 250] * 6), "txt_too_large"),
])
def test_bad_txt_is_refused_with_its_reason(rdata, reason):
    with pytest.raises(TxtError) as caught:
        decode_txt(rdata)
    assert caught.value.reason == reason


def test_txt_keys_follow_rfc6763():
    """Keys are case-insensitive, the first of a repeated key wins, unknown keys are ignored."""
    assert decode_txt(_txt(b"V=1", b"x=later", b"R0=ab", b"r0=zz", b"r1=cd", b"=junk", b"flag")) == b"abcd"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=1400))
def test_decode_txt_of_arbitrary_bytes_raises_only_txt_error(data):
    try:
        decode_txt(data)
    except TxtError:
        pass


def test_the_address_chosen_is_signed_or_seen_and_never_an_unscoped_link_local():
    record = make_record(Identity.generate(), ip="192.0.2.7", port=4007)
    assert choose_address(("10.0.0.3", "192.0.2.7"), 5555, record) == Address("192.0.2.7", 4007)
    assert choose_address(("fe80::1", "2001:db8::5", "10.0.0.3"), 5555, record) == Address("10.0.0.3", 5555)
    assert choose_address(("fe80::1", "2001:db8::5"), 5555, record) == Address("2001:db8::5", 5555)
    assert choose_address(("fe80::1",), 5555, record) is None
    scoped = choose_address(("fe80::1%2", "fe80::2"), 5555, record)
    assert scoped is not None and scoped.ip == ipaddress.ip_address("fe80::1%2")
    assert choose_address(("224.0.0.251", "0.0.0.0", "junk"), 5555, record) is None
    assert choose_address(("10.0.0.3",), 0, record) is None


def test_a_link_local_address_in_a_record_is_used_only_with_the_zone_it_was_seen_with():
    """A record's addresses carry no zone (it means nothing on another machine), so a signed
    fe80:: address is only usable with the interface mDNS saw it on."""
    identity = Identity.generate()
    record = PeerRecord.create(identity, addresses=[Address("fe80::5", 4005), Address("2001:db8::9", 4009)],
                               seq=1, expires_at=int(time.time()) + 600)
    assert choose_address(("fe80::5%3",), 5555, record) == Address("fe80::5%3", 4005)  # scoped, signed port
    assert choose_address(("fe80::5",), 5555, record) is None  # neither side knows the link
    assert choose_address(("fe80::5", "10.0.0.3"), 5555, record) == Address("10.0.0.3", 5555)
    assert choose_address(("fe80::6%3",), 5555, record) == Address("fe80::6%3", 5555)  # seen, not signed
    assert choose_address(("2001:db8::9", "fe80::5%3"), 5555, record) == Address("2001:db8::9", 4009)
    only_link_local = PeerRecord.create(identity, addresses=[Address("fe80::5", 4005)], seq=2,
                                        expires_at=int(time.time()) + 600)
    assert choose_address((), 5555, only_link_local) is None


def test_the_coordinator_never_pings_an_unscoped_link_local_address():
    """A peer whose only address is an unscoped fe80:: (in its record, with nothing seen) cannot be
    reached: the sighting is refused at once, without a PING sent into an unknown link."""
    from sovereign_discovery.coordinator import PeerDiscoveryCoordinator, _Context

    no_network = Config(local=LocalConfig(mdns=False, bluetooth=False), bootstrap=BootstrapConfig(enabled=False))

    async def main() -> None:
        record = PeerRecord.create(Identity.generate(), addresses=[Address("fe80::5", 4005)], seq=1,
                                   expires_at=int(time.time()) + 600)
        async with PeerDiscoveryCoordinator(Identity.generate(), config=no_network, cache=None) as node:
            before = node.node.stats()["messages_out"]["ping"]
            _Context(node, "mdns").peer_seen(record)
            await eventually(lambda: node.stats()["checks"].get("unreachable"), "the refusal", timeout=1.5)
            checks = node.stats()["checks"]
            assert checks["link_local_skipped"] == 1 and node.peer(record.node_id) is None
            assert node.node.stats()["messages_out"]["ping"] == before

    run(main())


# --- the layer on the in-memory transport --------------------------------------------------------------


def test_two_nodes_find_each_other_verified_and_never_themselves():
    async def main() -> None:
        network, a, b = await two_nodes()
        (record, address), = a.context.seen
        assert record == b.record and address == Address(b.ip, 4002)  # the signed address that was seen
        assert b.context.seen[0][0] == a.record
        assert set(network.services) == {instance_name(a.key), instance_name(b.key)}
        stats = a.layer.stats()
        assert stats["own_service_seen"] >= 1 and stats["peers"] == 1 and stats["verified"] == 1
        assert stats["announce"] == "announced" and stats["announced_seq"] == 1 and stats["dropped"] == {}
        assert stats["interfaces"] == [a.ip] and stats["instance"] == instance_name(a.key)
        await close(a, b)

    run(main())


def test_bad_services_are_dropped_and_counted_by_reason_and_the_layer_keeps_running():
    async def main() -> None:
        network, a = await one_node(resolve_timeout_s=0.1)
        honest, victim = Identity.generate(), Identity.generate()
        good = make_record(honest)
        raw = bytearray(good.encode())
        raw[-1] ^= 1
        expired = make_record(honest, expires_in=-5)
        signed_txt = encode_txt(good)
        cases = {
            "malformed_txt": _txt(b"v=1", b"r0="),
            "unsupported_txt_version": _txt(b"v=9", b"r0=x"),
            "txt_too_large": b"\x05hello" * 300,
            "malformed_record": _txt(b"v=1", b"r0=" + b"\x01" * 40),
            "bad_signature": _txt(b"v=1", *[b"r%d=" % n + bytes(raw[o:o + 252])
                                            for n, o in enumerate(range(0, len(raw), 252))]),
            "expired_record": encode_txt(expired),
        }
        for n, txt in enumerate(cases.values()):
            network.publish(instance_name(Identity.generate().node_id), txt=txt, addresses=(f"10.0.0.{n}",))
        network.publish(instance_name(victim.node_id), txt=signed_txt)  # honest's record, victim's name
        network.publish("Not A Node Id", txt=signed_txt)
        network.silent.add(instance_name(honest.node_id))
        network.publish(instance_name(honest.node_id), txt=signed_txt)
        expected = {**{reason: 1 for reason in cases}, "instance_mismatch": 1, "bad_instance_name": 1,
                    "resolve_timeout": 1}
        await eventually(lambda: a.layer.stats()["dropped"] == expected, "every drop", timeout=3)
        assert a.context.seen == [] and a.layer.stats()["peers"] == 0
        # the honest service answers again: now it counts
        network.silent.clear()
        network.publish(instance_name(honest.node_id), txt=signed_txt, port=7)
        await eventually(lambda: a.context.seen_ids() == {bytes(honest.node_id)}, "the honest peer")
        await a.layer.close()

    run(main())


def test_a_flood_of_services_is_bounded():
    async def main() -> None:
        network, a = await one_node(max_services=5)
        for n in range(40):
            peer = Identity.generate()
            network.publish(instance_name(peer.node_id), txt=encode_txt(make_record(peer)),
                            addresses=(f"10.1.0.{n}",))

        def handled() -> int:
            stats = a.layer.stats()
            return stats["dropped"].get("too_many_services", 0) + stats["peers"]

        await eventually(lambda: handled() == 40, "the flood to be handled")
        stats = a.layer.stats()
        assert stats["peers"] == 5 and len(a.context.seen) == 5 and stats["resolving"] == 0
        assert stats["dropped"] == {"too_many_services": 35}
        await a.layer.close()

    run(main())


def test_a_changed_own_record_is_announced_again_and_a_newer_seq_replaces():
    async def main() -> None:
        network, a, b = await two_nodes()
        newer = make_record(a.identity, seq=2, ip=a.ip, port=4001, capabilities=("relay", "store"))
        a.context.change_own_record(newer)
        await eventually(lambda: len(b.context.seen) == 2, "b to see a's newer record")
        assert b.context.seen[-1][0] == newer and a.layer.stats()["announced_seq"] == 2
        assert PeerRecord.decode(decode_txt(a.transport.announced[-1].txt), now=time.time()) == newer
        # a replayed older record (anyone can replay it on the link) does not replace the newer one
        network.publish(instance_name(a.key), txt=encode_txt(a.record), port=4001, addresses=(a.ip,))
        await eventually(lambda: b.layer.stats()["dropped"].get("stale_record") == 1, "the stale record drop")
        assert len(b.context.seen) == 2 and b.layer.stats()["updated"] == 1
        # the same record again is no new sighting
        a.context.change_own_record(newer)
        await asyncio.sleep(0.05)
        assert len(a.transport.announced) == 2
        await close(a, b)

    run(main())


def test_a_goodbye_is_peer_gone_at_once_and_close_is_idempotent():
    async def main() -> None:
        network, a, b = await two_nodes()
        await b.layer.close()
        await b.layer.close()
        assert b.transport.closed and instance_name(b.key) not in network.services
        await eventually(lambda: a.context.gone == [b.key], "the goodbye")
        assert a.layer.stats()["goodbyes"] == 1 and a.layer.stats()["peers"] == 0
        await a.layer.close()
        with pytest.raises(Exception):
            await a.layer.start(a.context)

    run(main())


def test_a_crashed_peer_is_lost_within_the_liveness_interval_and_found_again_when_it_answers():
    async def main() -> None:
        interval = 0.4
        network, a, b = await two_nodes({"liveness_interval_s": interval})
        await asyncio.sleep(2 * interval)  # answering peers stay
        assert a.context.gone == [] and a.layer.stats()["pings"] >= 2
        b.transport.crash()  # no goodbye: its service stays on the link, its node stops answering
        a.context.alive.discard(b.key)
        crashed_at = time.monotonic()
        await eventually(lambda: a.context.gone == [b.key], "the crashed peer to be lost", timeout=3)
        assert time.monotonic() - crashed_at <= interval + 0.1
        assert instance_name(b.key) in network.services
        stats = a.layer.stats()
        assert stats["lost_liveness"] == 1 and stats["peers"] == 0 and stats["peers_lost"] == 1
        sightings = len(a.context.seen)
        a.context.alive.add(b.key)  # it was a blip: the lost peer is still PINGed, and comes back
        await eventually(lambda: len(a.context.seen) > sightings, "the peer to come back", timeout=3)
        assert a.layer.stats()["recovered"] == 1 and a.layer.stats()["peers"] == 1
        await a.layer.close()

    run(main())


def test_a_wildcard_bound_node_is_announced_with_its_bound_port_and_reached_where_it_was_seen():
    """A node bound to 0.0.0.0 has no address in its record until peers tell it one: the SRV
    carries the bound port (LayerContext.bound), the A record the interface address."""
    async def main() -> None:
        network = MemoryMdnsNetwork()
        a, b = Node(network, 1), Node(network, 2)
        a.context.change_own_record(PeerRecord.create(a.identity, addresses=[], seq=1,
                                                      expires_at=int(time.time()) + 600))
        a.context.bound = [("0.0.0.0", 4555)]
        b.context.change_own_record(PeerRecord.create(b.identity, addresses=[], seq=1,
                                                      expires_at=int(time.time()) + 600))
        for node in (a, b):
            await node.layer.start(node.context)
        await eventually(lambda: b.context.seen, "b to see a")
        assert b.context.seen[0][1] == Address(a.ip, 4555)
        stats = b.layer.stats()  # b knows no port of its own: it browses but cannot announce
        assert stats["announce"] == "no UDP port to announce yet" and stats["announce_skipped_no_port"] == 1
        assert a.context.seen == [] and instance_name(b.key) not in network.services
        await close(a, b)

    run(main())


def test_a_peer_whose_record_expires_is_gone():
    async def main() -> None:
        network, a = await one_node(liveness_interval_s=0.2)
        peer = Identity.generate()
        network.publish(instance_name(peer.node_id), txt=encode_txt(make_record(peer, expires_in=1)))
        await eventually(lambda: a.context.seen, "the peer")
        a.context.alive.add(bytes(peer.node_id))
        await eventually(lambda: a.context.gone == [bytes(peer.node_id)], "the record to expire", timeout=3)
        assert a.layer.stats()["expired"] == 1 and a.layer.stats()["peers"] == 0
        await a.layer.close()

    run(main())


def test_without_a_ping_in_the_context_liveness_is_off_and_said_so():
    async def main() -> None:
        network, a, b = await two_nodes({"with_ping": False, "liveness_interval_s": 0.2})
        b.transport.crash()
        await asyncio.sleep(0.5)
        assert a.context.gone == [] and a.layer.stats()["liveness"].startswith("off")
        await a.layer.close()

    run(main())


def test_unavailable_transports_and_a_missing_zeroconf_are_layer_unavailable(monkeypatch):
    async def main() -> None:
        network = MemoryMdnsNetwork()
        context = FakeContext(Identity.generate())
        layer = MdnsLayer(transport=network.transport(unavailable="no such interface"))
        with pytest.raises(LayerUnavailable) as caught:
            await layer.start(context)
        assert caught.value.layer == "mdns" and caught.value.reason == "no such interface"
        layer = create_layer(LocalConfig(mdns_interfaces=("192.0.2.250",)))
        with pytest.raises(LayerUnavailable, match="not the address of any interface"):
            await layer.start(context)
        monkeypatch.setitem(sys.modules, "zeroconf", None)
        layer = create_layer(LocalConfig(mdns_interfaces=("127.0.0.1",)))
        assert layer.name == "mdns"
        with pytest.raises(LayerUnavailable) as caught:
            await layer.start(context)
        assert caught.value.reason == NOT_INSTALLED
        await layer.close()

    run(main())


def test_wrong_arguments_are_caller_errors():
    with pytest.raises(TypeError):
        MdnsLayer({"mdns": True})
    with pytest.raises(ValueError):
        MdnsLayer(liveness_interval_s=0)
    with pytest.raises(ValueError):
        MdnsLayer(max_services=0)
    with pytest.raises(TypeError):
        MdnsLayer(max_services="many")
    with pytest.raises(TypeError):
        encode_txt(b"record")


# --- real python-zeroconf on 127.0.0.1, in this process --------------------------------------------------


def unique_service() -> str:
    return f"_sdt{os.urandom(4).hex()}._udp.local."


def loopback_config(service: str, **kwargs) -> LocalConfig:
    return LocalConfig(mdns_interfaces=("127.0.0.1",), service_name=service, bluetooth=False, **kwargs)


def test_two_zeroconf_layers_in_one_process_find_each_other_update_and_say_goodbye():
    pytest.importorskip("zeroconf")

    async def main() -> None:
        service = unique_service()
        nodes = []
        for n in (1, 2):
            identity = Identity.generate()
            record = make_record(identity, ip="127.0.0.1", port=40000 + n)
            context = FakeContext(identity, record)
            nodes.append((identity, record, context, MdnsLayer(loopback_config(service))))
        (ia, ra, ca, la), (ib, rb, cb, lb) = nodes
        try:
            await la.start(ca)
            await lb.start(cb)
            await eventually(lambda: ca.seen and cb.seen, "both sightings", timeout=6)
            assert ca.seen[0] == (rb, Address("127.0.0.1", 40002)) and cb.seen[0][0] == ra
            newer = make_record(ia, seq=2, ip="127.0.0.1", port=40001, capabilities=("store",))
            ca.change_own_record(newer)
            await eventually(lambda: cb.seen[-1][0] == newer, "the newer record", timeout=4)
            await lb.close()
            started = time.monotonic()
            await eventually(lambda: ca.gone == [bytes(ib.node_id)], "the goodbye", timeout=3)
            assert time.monotonic() - started < 1.5
            assert la.stats()["dropped"] == {} and la.stats()["own_service_seen"] >= 1
        finally:
            await la.close()
            await lb.close()

    run(main())


def test_two_coordinators_discover_each_other_over_mdns_and_notice_a_goodbye_and_a_crash(monkeypatch):
    """The whole path: mDNS sighting, authenticated PING, PeerDiscovered with source "mdns"; a
    goodbye withdraws mdns at once; a crashed peer (no goodbye) is withdrawn by the liveness check."""
    pytest.importorskip("zeroconf")
    from sovereign_discovery.coordinator import (
        PeerDiscovered,
        PeerDiscoveryCoordinator,
        PeerLost,
        PeerUpdated,
    )

    def config(service: str) -> Config:
        return Config(local=loopback_config(service), bootstrap=BootstrapConfig(enabled=False))

    async def main() -> None:
        service = unique_service()
        events: list = []
        late_events: list = []
        layers = [MdnsLayer(config(service).local, liveness_interval_s=1.0) for _ in range(3)]
        a = PeerDiscoveryCoordinator(Identity.generate(), config=config(service), cache=None,
                                     local_layers=[layers[0]], on_event=events.append)
        b = PeerDiscoveryCoordinator(Identity.generate(), config=config(service), cache=None,
                                     local_layers=[layers[1]], on_event=late_events.append)
        c = PeerDiscoveryCoordinator(Identity.generate(), config=config(service), cache=None,
                                     local_layers=[layers[2]])

        def has_mdns(node, peer) -> bool:
            held = node.peer(peer.node_id)
            return held is not None and "mdns" in held.sources

        async with a:
            await eventually(lambda: layers[0].stats()["announce"] == "announced", "a's announcement",
                             timeout=6)
            async with b, c:
                # b finds the announced a by browsing. a may have seen b's announcement and PINGed
                # b first: then b discovered a through that PING ("dht") and mdns joins it.
                await eventually(lambda: has_mdns(b, a), "b to find a", timeout=5)
                about_a = [e for e in late_events if isinstance(e, (PeerDiscovered, PeerUpdated))
                           and e.peer.node_id == a.node_id]
                assert isinstance(about_a[0], PeerDiscovered) and about_a[0].source in ("mdns", "dht")
                assert any(e.source == "mdns" and "mdns" in e.peer.sources for e in about_a)
                # a sees b and c once they are announced (b may have PINGed a first: then the
                # mdns source joins the dht one)
                await eventually(lambda: has_mdns(a, b) and has_mdns(a, c), "a to see b and c", timeout=8)
                assert a.peer(b.node_id).local and b.node_id in a.node.engine.table  # in the DHT table
                closed_at = time.monotonic()
                await b.close()  # a goodbye
                await eventually(lambda: not has_mdns(a, b), "b's goodbye", timeout=3)
                assert time.monotonic() - closed_at <= 1.5
                assert any(isinstance(e, (PeerLost, PeerUpdated)) and e.peer.node_id == b.node_id
                           and "mdns" not in e.peer.sources for e in events)
                # c crashes: its goodbye never goes out, its node stops answering
                monkeypatch.setattr(layers[2]._transport, "withdraw", _no_goodbye)
                monkeypatch.setattr(layers[2]._transport._azc, "async_unregister_all_services", _no_goodbye)
                await c.close()
                crashed_at = time.monotonic()
                await eventually(lambda: not has_mdns(a, c), "c to be lost", timeout=4)
                assert time.monotonic() - crashed_at <= 1.0 + 0.3
                assert layers[0].stats()["lost_liveness"] == 1 and layers[0].stats()["goodbyes"] == 1

    run(main(), timeout=40)


async def _no_goodbye() -> None:
    return None
