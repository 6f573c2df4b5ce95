"""DhtNode, the public asyncio node, over real UDP on loopback: port 0 only, every test bounded by
``asyncio.wait_for`` (no pytest plugin needed), no timed sleeps as synchronisation."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket

import pytest

from sovereign_discovery import (
    Address,
    ArgumentTypeError,
    ArgumentValueError,
    BootstrapError,
    ClosedError,
    Contact,
    ContactAdded,
    DhtConfig,
    DhtNode,
    EndpointError,
    ExternalAddressChanged,
    Identity,
    LookupFinished,
    LookupTimeoutError,
    PeerRecord,
    distance,
)
from sovereign_discovery.node import DROP_REASONS
from sovereign_discovery.session import SessionLimits

from .helpers import has_ipv6_loopback, run_bounded

#: Bound of one test (the slowest waits out a 2 s bootstrap request timeout).
TIMEOUT_S = 8.0
#: A lookup deadline shorter than any request timeout (2 × the 0.25 s minimum RTO): a lookup that
#: has asked a silent peer cannot end before it.
SHORT_DEADLINE_S = 0.3


def run(coro, timeout: float = TIMEOUT_S):
    return run_bounded(coro, timeout)


needs_ipv6 = pytest.mark.skipif(not has_ipv6_loopback(), reason="::1 cannot be bound here (no IPv6 loopback)")


def _port_is_free(address: Address) -> bool:
    """Whether a fresh UDP socket can bind ``address`` (no SO_REUSEADDR: an open socket there
    makes the bind fail with EADDRINUSE)."""
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind(address.to_tuple())
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False
            raise
    return True


@contextlib.asynccontextmanager
async def network(count: int, *, config: DhtConfig = DhtConfig(), host: str = "127.0.0.1"):
    """``count`` started nodes; all but the first bootstrapped from the first, one after the
    other (so every later node finds the earlier ones). Closed on exit."""
    async with contextlib.AsyncExitStack() as stack:
        nodes = [await stack.enter_async_context(DhtNode(Identity.generate(), host=host, config=config))
                 for _ in range(count)]
        for node in nodes[1:]:
            await node.bootstrap([nodes[0].contact])
        yield nodes


@contextlib.contextmanager
def silent_socket():
    """A bound UDP socket that never answers, as a Contact with a key nobody holds."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind(("127.0.0.1", 0))
        yield Contact(Identity.generate().public_key, Address(*sock.getsockname()))
    finally:
        sock.close()


def ids(contacts) -> set[bytes]:
    return {bytes(c.node_id) for c in contacts}


# --- life cycle ----------------------------------------------------------------------------------


def test_context_manager_binds_on_entry_and_closes_sockets_on_exit():
    async def main() -> None:
        node = DhtNode(Identity.generate())
        assert not node.closed
        async with node as entered:
            assert entered is node and not node.closed
            address = node.address
            assert str(address.ip) == "127.0.0.1" and address.port != 0
            assert node.addresses == [address]
            assert node.contact == Contact(node.identity.public_key, address)
            assert not _port_is_free(address)  # the node holds it
        assert node.closed
        assert _port_is_free(address)  # the socket was closed
        await node.close()  # idempotent
        assert node.closed
        with pytest.raises(ClosedError, match="starts once"):
            await node.start()

    run(main())


def test_start_and_close_without_context_manager_and_start_only_once():
    async def main() -> None:
        node = DhtNode(Identity.generate())
        assert await node.start() is node
        try:
            with pytest.raises(ClosedError, match="starts once"):
                await node.start()
            assert node.stats()["table_size"] == 0  # the failed second start left it serving
            address = node.address
        finally:
            await node.close()
        assert node.closed and _port_is_free(address)

    run(main())


def test_a_failed_start_releases_the_sockets_already_bound():
    async def main() -> None:
        # A port taken on ::1 but free on 127.0.0.1: the IPv4 socket binds, the IPv6 one fails.
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as taken:
            taken.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            taken.bind(("::1", 0))
            port = taken.getsockname()[1]
            v4 = Address("127.0.0.1", port)
            if not _port_is_free(v4):
                pytest.skip(f"port {port} is in use on 127.0.0.1 too")
            node = DhtNode(Identity.generate(), host=("127.0.0.1", "::1"), port=port)
            with pytest.raises(EndpointError, match=rf"\[::1\]:{port}: address already in use"):
                await node.start()
            assert node.closed
            assert _port_is_free(v4)  # the IPv4 socket bound before the failure was closed
            with pytest.raises(ClosedError):
                node.stats()

    if not has_ipv6_loopback():
        pytest.skip("::1 cannot be bound here (no IPv6 loopback)")
    run(main())


def _engine_uses(node: DhtNode, contact: Contact) -> list:
    """Every public method and property that needs the engine, as thunks returning awaitables
    (or raising at once for the synchronous ones)."""

    async def wrap(fn):
        return fn()

    target = bytes(20)
    return [
        ("addresses", lambda: wrap(lambda: node.addresses)),
        ("address", lambda: wrap(lambda: node.address)),
        ("contact", lambda: wrap(lambda: node.contact)),
        ("record", lambda: wrap(lambda: node.record)),
        ("engine", lambda: wrap(lambda: node.engine)),
        ("stats", lambda: wrap(node.stats)),
        ("bootstrap", lambda: node.bootstrap([contact])),
        ("bootstrap-line", lambda: node.bootstrap([contact.pinned])),
        ("find_closest", lambda: node.find_closest(target)),
        ("find_record", lambda: node.find_record(target)),
        ("find_providers", lambda: node.find_providers("store")),
        ("announce", lambda: node.announce()),
        ("announce_capability", lambda: node.announce_capability("store")),
    ]


@pytest.mark.parametrize("state", ["new", "closed"])
def test_every_engine_use_before_start_or_after_close_raises_closed_error(state):
    async def main() -> None:
        identity = Identity.generate()
        node = DhtNode(identity)
        if state == "closed":
            async with node:
                pass
        other = Contact(Identity.generate().public_key, Address("127.0.0.1", 9))
        expected = "not started" if state == "new" else "closed"
        wrong = {}
        for name, use in _engine_uses(node, other):
            try:
                await use()
            except ClosedError as exc:
                if expected not in str(exc):
                    wrong[name] = str(exc)
            else:
                wrong[name] = "no error"
        assert wrong == {}
        # What needs no engine still works.
        assert node.identity is identity and node.node_id == identity.node_id
        assert node.closed is (state == "closed")

    run(main())


def test_calls_in_flight_when_the_node_closes_fail_with_closed_error():
    async def main() -> None:
        async with network(2) as (live, doomed):
            node = live
            await doomed.close()  # now a silent peer in the table of `node`
            with silent_socket() as silent:
                calls = [asyncio.create_task(node.bootstrap([silent])),
                         asyncio.create_task(node.find_record(bytes(20))),
                         asyncio.create_task(node.find_closest(bytes(20)))]
                await asyncio.sleep(0)  # let each task run up to its await on the engine
                assert not any(c.done() for c in calls)
                assert node.stats()["queries_running"] == 3
                await node.close()
                results = await asyncio.gather(*calls, return_exceptions=True)
            assert [type(r) for r in results] == [ClosedError] * 3, results
            assert all("closed during the call" in str(r) for r in results)

    run(main())


# --- bootstrap -----------------------------------------------------------------------------------


def test_bootstrap_via_contact_and_via_pinned_line():
    async def main() -> None:
        async with DhtNode(Identity.generate()) as a, DhtNode(Identity.generate()) as b, \
                DhtNode(Identity.generate()) as c:
            line = a.contact.pinned
            assert line.endswith(f"@127.0.0.1:{a.address.port}")
            assert Contact.parse(line) == a.contact

            closest_b = await b.bootstrap([a.contact])
            assert ids(closest_b) == {a.node_id}
            closest_c = await c.bootstrap([line])
            assert ids(closest_c) == {a.node_id, b.node_id}
            assert all(isinstance(x, Contact) for x in closest_c)

            assert ids(c.engine.table) == {a.node_id, b.node_id}
            assert ids(a.engine.table) == {b.node_id, c.node_id}
            # The table holds each peer at the address it was heard from.
            assert {x.address for x in c.engine.table} == {a.address, b.address}

    run(main())


def test_bootstrap_error_when_no_contact_answers():
    async def main() -> None:
        async with DhtNode(Identity.generate()) as node:
            # Only itself: nobody to ask, fails at once.
            with pytest.raises(BootstrapError):
                await node.bootstrap([node.contact])
            with silent_socket() as first, silent_socket() as second:
                # deadline_s bounds the self-lookup only; the contacts' requests get their own
                # timeout (2 × the 1 s initial RTO), so this takes about 2 s.
                with pytest.raises(BootstrapError, match="none of the 2 bootstrap contacts answered") as info:
                    await node.bootstrap([first, second.pinned], deadline_s=SHORT_DEADLINE_S)
                assert str(first.address) in str(info.value) and str(second.address) in str(info.value)
            assert len(node.engine.table) == 0
            stats = node.stats()
            assert stats["queries_running"] == 0 and stats["outstanding_requests"] == 0

    run(main())


def test_bootstrap_error_when_the_pinned_key_is_wrong():
    async def main() -> None:
        async with DhtNode(Identity.generate()) as real, DhtNode(Identity.generate()) as joiner:
            impostor_line = Contact(Identity.generate().public_key, real.address).pinned
            with pytest.raises(BootstrapError):
                await joiner.bootstrap([impostor_line])
            # Nothing from that address entered either table: the real node could not prove the
            # pinned key, and the joiner's handshake was refused.
            assert len(joiner.engine.table) == 0 and real.node_id not in joiner.engine.table
            assert len(real.engine.table) == 0
            assert real.stats()["sessions"] == 0  # its side of the handshake never completed
            assert real.stats()["drops"]["session.bad_signature"] >= 1

    run(main())


def test_the_right_line_works_right_after_a_wrong_one():
    """The wrong-key handshake leaves the real node a live challenge echoing a MESSAGE of the
    joiner's doomed session; the joiner must still get through to the right key at once (it
    re-handshakes on a WHOAREYOU to any of its recent MESSAGEs), not after challenge_ttl_s."""

    async def main() -> None:
        async with DhtNode(Identity.generate()) as real, DhtNode(Identity.generate()) as joiner:
            with pytest.raises(BootstrapError):
                await joiner.bootstrap([Contact(Identity.generate().public_key, real.address).pinned])
            assert ids(await joiner.bootstrap([real.contact.pinned])) == {real.node_id}

    run(main())


def test_a_restarted_peer_is_reachable_again():
    """A peer restarts (same key and port, sessions lost) and is sent two MESSAGEs back to back:
    it challenges the first and drops the second as awaiting_handshake; the sender must
    re-handshake for that first one, not only for its last MESSAGE."""

    async def main() -> None:
        identity = Identity.generate()
        async with DhtNode(Identity.generate()) as node, DhtNode(Identity.generate()) as other:
            async with DhtNode(identity) as first_life:
                await node.bootstrap([first_life.contact])
                await other.bootstrap([first_life.contact])
                port = first_life.address.port
            async with DhtNode(identity, port=port) as second_life:  # same key, same port
                await second_life.announce()  # keeps its record in its own store
                found = None
                for _ in range(3):  # each attempt waits out the silent requests (~0.5 s)
                    found, _closest = await asyncio.gather(
                        node.find_record(identity.node_id, deadline_s=2.0),
                        node.find_closest(identity.node_id, deadline_s=2.0))  # two requests at once
                    if found is not None:
                        break
                assert found == second_life.record

    run(main())


@pytest.mark.parametrize("fast_path", [True, False])
def test_a_request_to_a_peer_that_evicted_our_session_still_succeeds(fast_path):
    """The peer keeps one session (``max_sessions=1``): a third node's handshake evicts ours. Our
    next PING, sealed in the session we still hold, is challenged, and the re-handshake carries
    it (answered by the serving fast path, in C or in Python as the run selects, or not)."""

    async def main() -> None:
        limits = SessionLimits(max_sessions=1)
        async with DhtNode(Identity.generate(), session_limits=limits, fast_path=fast_path) as b, \
                DhtNode(Identity.generate()) as a, DhtNode(Identity.generate()) as c:
            assert await a.ping(b.contact) is not None
            assert await c.ping(b.contact) is not None
            held = b.stats()["session"]
            assert held["sessions"] == 1 and held["sessions_evicted"] == 1
            assert a.stats()["session"]["sessions"] == 1  # A still holds its session with B
            handshakes = a.stats()["session"]["handshakes_initiated"]
            assert await a.ping(b.contact) is not None
            assert a.stats()["session"]["handshakes_initiated"] == handshakes + 1
            assert a.stats()["session"]["unsolicited_whoareyou"] == 0

    run(main())


# --- records, lookups, providers across a small network ------------------------------------------


def test_announce_find_record_find_closest_and_providers_across_eight_nodes():
    async def main() -> None:
        async with network(8) as nodes:
            everyone = {n.node_id for n in nodes}
            for node in nodes:
                assert len(node.engine.table) == 7
                assert node.record is None
                stored = await node.announce()
                assert stored == 7  # every other node is among the k = 20 closest
                record = node.record
                assert isinstance(record, PeerRecord)
                assert record.node_id == node.node_id and record.addresses == (node.address,)
                assert record.capabilities == ()

            for i, node in enumerate(nodes):
                seeker = nodes[(i + 3) % len(nodes)]
                found = await seeker.find_record(node.node_id)
                assert found == node.record  # same key, seq, addresses, signature

            assert await nodes[2].find_record(Identity.generate().node_id) is None

            target = Identity.generate().node_id
            seeker = nodes[5]
            closest = await seeker.find_closest(target)
            others = [n.node_id for n in nodes if n is not seeker]
            assert [c.node_id for c in closest] == sorted(others, key=lambda i: distance(i, target))
            assert ids(closest) <= everyone

            providers = nodes[1:4]
            for node in providers:
                assert await node.announce_capability("store") >= 1
                assert node.record.capabilities == ("store",)
            found = await nodes[7].find_providers("store")
            assert {r.node_id for r in found} == {n.node_id for n in providers}
            assert all("store" in r.capabilities for r in found)
            assert {r.addresses for r in found} == {(n.address,) for n in providers}
            two = await nodes[6].find_providers("store", count=2)
            assert len(two) == 2 and {r.node_id for r in two} <= {n.node_id for n in providers}
            assert await nodes[0].find_providers("nobody-offers-this") == []

            for node in nodes:
                assert node.stats()["drops"]["internal_error"] == 0

    run(main())


def test_lookup_timeout_error_carries_the_closest_peers_reached():
    async def main() -> None:
        config = DhtConfig(lookup_deadline_s=SHORT_DEADLINE_S)
        async with DhtNode(Identity.generate()) as alive, \
                DhtNode(Identity.generate(), config=config) as seeker:
            async with contextlib.AsyncExitStack() as stack:
                silent = [await stack.enter_async_context(DhtNode(Identity.generate())) for _ in range(3)]
                for node in silent:
                    await node.bootstrap([alive.contact])
                await seeker.bootstrap([alive.contact], deadline_s=5.0)  # meets all four
                assert len(seeker.engine.table) == 4
            # The three closed: still in the seeker's table, but they never answer now.

            # A per-call deadline: the live peer (the target itself, so asked first) answers, the
            # silent ones cannot before the deadline.
            with pytest.raises(LookupTimeoutError) as info:
                await seeker.find_closest(alive.node_id, deadline_s=SHORT_DEADLINE_S)
            assert isinstance(info.value, TimeoutError)
            assert alive.node_id in ids(info.value.closest)
            assert all(isinstance(c, Contact) for c in info.value.closest)

            # The config's deadline, for record and provider lookups with nothing in hand.
            with pytest.raises(LookupTimeoutError) as info:
                await seeker.find_record(Identity.generate().node_id)
            assert ids(info.value.closest) <= {alive.node_id}
            with pytest.raises(LookupTimeoutError):
                await seeker.find_providers("nobody-offers-this")
            assert seeker.stats()["drops"]["internal_error"] == 0

    run(main())


# --- address families ----------------------------------------------------------------------------


@needs_ipv6
def test_ipv6_loopback_nodes():
    async def main() -> None:
        async with network(3, host="::1") as nodes:
            a, b, c = nodes
            assert str(a.address.ip) == "::1" and a.address.version == 6
            line = a.contact.pinned
            assert line.endswith(f"@[::1]:{a.address.port}")
            async with DhtNode(Identity.generate(), host="::1") as d:
                assert ids(await d.bootstrap([line])) == {a.node_id, b.node_id, c.node_id}
                assert await c.announce() == 3
                record = await d.find_record(c.node_id)
                assert record is not None and record.addresses == (c.address,)
                assert list(d.stats()["udp"]) == [str(d.address)]

    run(main())


@needs_ipv6
def test_dual_stack_node_bridges_ipv4_and_ipv6_peers():
    async def main() -> None:
        # The single-stack nodes learn contacts of the family they have no socket for and wait for
        # them until the lookup deadline, so keep that short.
        quick = DhtConfig(lookup_deadline_s=0.5)
        async with DhtNode(Identity.generate(), host=("127.0.0.1", "::1")) as dual, \
                DhtNode(Identity.generate(), host="::1", config=quick) as v6, \
                DhtNode(Identity.generate(), host="127.0.0.1", config=quick) as v4:
            assert [a.version for a in dual.addresses] == [4, 6]
            assert dual.address == dual.addresses[0]
            assert dual.record is None
            v4_line, v6_line = (Contact(dual.identity.public_key, a).pinned for a in dual.addresses)
            assert ids(await v6.bootstrap([v6_line])) == {dual.node_id}
            assert dual.node_id in ids(await v4.bootstrap([v4_line]))
            heard = {c.node_id: c.address for c in dual.engine.table}
            assert heard == {v4.node_id: v4.address, v6.node_id: v6.address}

            assert await v4.announce() >= 1
            assert await v6.announce() >= 1
            record = await v6.find_record(v4.node_id)
            assert record is not None and record.addresses == (v4.address,)
            record = await v4.find_record(v6.node_id)
            assert record is not None and record.addresses == (v6.address,)

            udp = dual.stats()["udp"]
            assert set(udp) == {str(a) for a in dual.addresses}
            assert all(counters["datagrams_in"] > 0 for counters in udp.values())
            assert dual.stats()["no_route"] == 0

    run(main())


def _can_bind(host: str) -> bool:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind((host, 0))
        return True
    except OSError:
        return False


VOTER_HOSTS = [f"127.0.{i}.1" for i in (1, 2, 3)]  # three /24s: three distinct address voters


@pytest.mark.skipif(not all(_can_bind(h) for h in VOTER_HOSTS), reason="127.0.x.1 cannot be bound here")
def test_a_configured_advertised_address_is_kept_whatever_peers_report():
    async def main() -> None:
        configured = Address("192.0.2.7", 4000)  # e.g. a port forwarded on a NAT
        events: list = []
        async with DhtNode(Identity.generate(), advertised_address=configured, on_event=events.append) as node, \
                contextlib.AsyncExitStack() as stack:
            voters = [await stack.enter_async_context(DhtNode(Identity.generate(), host=h)) for h in VOTER_HOSTS]
            await node.bootstrap([v.contact for v in voters])
            # Each voter answered a PING with a PONG saying it saw the node at 127.0.0.1:port.
            assert node.stats()["messages_in"]["pong"] >= len(voters)
            assert await node.announce() == len(voters)
            assert node.record.addresses == (configured,)
            assert not any(isinstance(e, ExternalAddressChanged) for e in events)
            assert await voters[0].find_record(node.node_id) == node.record

    run(main())


# --- caller mistakes -----------------------------------------------------------------------------


def test_constructor_mistakes_name_the_parameter():
    identity = Identity.generate()
    cases = [
        (dict(identity=b"key"), ArgumentTypeError, "identity"),
        (dict(host=4), ArgumentTypeError, "host"),
        (dict(host=[]), ArgumentTypeError, "host"),
        (dict(host=b"127.0.0.1"), ArgumentTypeError, "host"),
        (dict(host="localhost"), ArgumentValueError, "host"),
        (dict(host="224.0.0.1"), ArgumentValueError, "host"),
        (dict(host=("127.0.0.1", "127.0.0.2")), ArgumentValueError, "host"),
        (dict(port=70000), ArgumentValueError, "port"),
        (dict(port=-1), ArgumentValueError, "port"),
        (dict(port=True), (ArgumentTypeError, ArgumentValueError), "port"),
        (dict(port="4000"), (ArgumentTypeError, ArgumentValueError), "port"),
        (dict(config={"bucket_size": 20}), ArgumentTypeError, "config"),
        (dict(advertised_address="127.0.0.1:4000"), ArgumentTypeError, "advertised_address"),
        (dict(on_event="print"), ArgumentTypeError, "on_event"),
    ]
    for kwargs, error, name in cases:
        args = {"identity": identity, **kwargs}
        with pytest.raises(error, match=name):
            DhtNode(args.pop("identity"), **args)


def test_call_mistakes_name_the_parameter_and_leave_the_node_usable():
    async def main() -> None:
        async with network(2) as (node, peer):
            cases = [
                (lambda: node.find_closest(b"\x00" * 19), ArgumentValueError, "target"),
                (lambda: node.find_closest("a" * 20), ArgumentTypeError, "target"),
                (lambda: node.find_closest(bytes(20), deadline_s=0), ArgumentValueError, "deadline_s"),
                (lambda: node.find_closest(bytes(20), deadline_s="1"), ArgumentTypeError, "deadline_s"),
                (lambda: node.find_record(b"\x00" * 21), ArgumentValueError, "node_id"),
                (lambda: node.find_record(None), ArgumentTypeError, "node_id"),
                (lambda: node.find_providers("store", count=0), ArgumentValueError, "count"),
                (lambda: node.find_providers("store", count="3"), ArgumentTypeError, "count"),
                (lambda: node.find_providers("Not A Name!"), ArgumentValueError, "capability"),
                (lambda: node.find_providers(7), ArgumentTypeError, "capability"),
                (lambda: node.announce_capability(""), ArgumentValueError, "capability"),
                (lambda: node.announce_capability(b"store"), ArgumentTypeError, "capability"),
                (lambda: node.bootstrap(peer.contact.pinned), ArgumentTypeError, "contacts"),
                (lambda: node.bootstrap([]), ArgumentValueError, "contact"),
                (lambda: node.bootstrap(["no-at-sign"]), ArgumentValueError, "contact"),
                (lambda: node.bootstrap([42]), ArgumentTypeError, "contacts"),
                (lambda: node.bootstrap([peer.contact], deadline_s=-1.0), ArgumentValueError, "deadline_s"),
            ]
            for call, error, name in cases:
                with pytest.raises(error, match=name):
                    await call()
            stats = node.stats()
            assert stats["queries_running"] == 0 and stats["outstanding_requests"] == 0
            assert node.engine.capabilities == frozenset()  # no half-done announcement
            assert ids(await node.find_closest(peer.node_id)) == {peer.node_id}

    run(main())


def test_wildcard_host_binds_all_interfaces():
    async def main() -> None:
        async with DhtNode(Identity.generate(), host="0.0.0.0") as wild, \
                DhtNode(Identity.generate(), host="127.0.0.1") as local:
            [(host, port)] = wild.bound
            assert host == "0.0.0.0" and port > 0
            assert wild.addresses == []  # no address a peer could use, until one is known
            with pytest.raises(ArgumentValueError, match="advertised_address"):
                wild.contact
            assert list(wild.stats()["udp"]) == [f"0.0.0.0:{port}"]
            # It serves on every interface: a loopback peer reaches it at 127.0.0.1.
            await wild.bootstrap([local.contact])
            assert local.node_id in wild.engine.table
            assert local.engine.table.get(wild.node_id).address == Address("127.0.0.1", port)

    run(main())


# --- stats and events ----------------------------------------------------------------------------


def test_stats_report_messages_drops_table_sessions_and_udp():
    async def main() -> None:
        async with network(3) as nodes:
            node = nodes[1]
            await node.find_closest(nodes[2].node_id)
            stats = node.stats()
            assert set(stats["drops"]) >= set(DROP_REASONS)
            assert any(reason.startswith("session.") for reason in stats["drops"])
            assert all(isinstance(v, int) for v in stats["drops"].values())
            assert stats["drops"]["internal_error"] == 0
            assert stats["messages_out"]["find_node"] >= 1 and stats["messages_in"]["nodes"] >= 1
            assert stats["messages_out"]["ping"] >= 1 and stats["messages_in"]["pong"] >= 1
            assert stats["table_size"] == len(node.engine.table) == 2
            assert stats["sessions"] == 2
            assert list(stats["udp"]) == [str(node.address)]
            udp = stats["udp"][str(node.address)]
            assert udp["datagrams_in"] > 0 and udp["datagrams_out"] > 0
            assert udp["handler_errors"] == 0 and udp["send_errors"] == 0
            assert stats["no_route"] == 0
            # A copy: changing it does not change the node's counters.
            stats["drops"]["internal_error"] = 99
            assert node.stats()["drops"]["internal_error"] == 0

    run(main())


def test_on_event_receives_contact_added_and_its_exceptions_do_not_break_the_node(caplog):
    seen: list = []

    def on_event(event) -> None:
        seen.append(event)
        raise RuntimeError("callback bug")

    async def main() -> None:
        async with DhtNode(Identity.generate()) as peer, \
                DhtNode(Identity.generate(), on_event=on_event) as node:
            await node.bootstrap([peer.contact])
            added = [e.contact for e in seen if isinstance(e, ContactAdded)]
            assert ids(added) == {peer.node_id}
            assert any(isinstance(e, LookupFinished) for e in seen)
            # The node keeps working after every callback raised.
            assert await peer.announce() == 1
            record = await node.find_record(peer.node_id)
            assert record == peer.record
            assert await node.announce() == 1
            stats = node.stats()
            assert stats["drops"]["internal_error"] == 0
            assert stats["udp"][str(node.address)]["handler_errors"] == 0

    with caplog.at_level(logging.ERROR, logger="sovereign_discovery.aio"):
        run(main())
    assert "on_event callback raised" in caplog.text
    assert "callback bug" in caplog.text


# --- direct requests ----------------------------------------------------------------------------


def test_ping_proves_the_key_and_puts_the_peer_in_the_table():
    async def main() -> None:
        async with DhtNode(Identity.generate()) as a, DhtNode(Identity.generate()) as b:
            assert len(a.engine.table) == 0
            rtt = await a.ping(b.contact)
            assert rtt is not None and 0 < rtt < 2.0
            assert b.node_id in a.engine.table and a.node_id in b.engine.table
            # the same address under a key nobody there holds: no answer, nothing enters
            impostor = Contact(Identity.generate().public_key, b.address)
            assert await a.ping(impostor.pinned) is None
            assert impostor.node_id not in a.engine.table
            with silent_socket() as silent:
                assert await a.ping(silent) is None
            assert await a.ping(a.contact) is None  # never itself
            with pytest.raises(ArgumentTypeError):
                await a.ping(b"not a contact")

    run(main())


def test_fetch_record_asks_the_peer_for_its_own_verified_record():
    async def main() -> None:
        async with DhtNode(Identity.generate()) as a, DhtNode(Identity.generate()) as b:
            assert await a.fetch_record(b.contact) is None  # b has signed no record yet
            await b.announce()
            record = await a.fetch_record(b.contact)
            assert record is not None and record == b.record and record.node_id == b.node_id
            assert (await a.fetch_record(a.contact)) is None  # a announced nothing
            await a.announce()
            assert await a.fetch_record(a.contact) == a.record  # itself: the own record, no request
            with silent_socket() as silent:
                assert await a.fetch_record(silent) is None

    run(main())
