"""The serving fast path (sovereign_discovery.fastpath): the C module against its pure-Python twin
(same bytes, same counters), the responder on real UDP sockets on 127.0.0.1 with scripted hooks,
and a DhtNode answering through it exactly as through the engine's own path — with forged,
tampered, replayed and rate-limited requests dropped and counted."""

from __future__ import annotations

import asyncio
import os
import select
import socket
import struct
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sovereign_discovery import Address, Contact, DhtConfig, DhtNode, Identity
from sovereign_discovery.errors import KernelUnavailableError
from sovereign_discovery.fastpath import FASTPATH_KERNEL, fastpath_module, index_key
from sovereign_discovery.keys import REQUIRE_C_ENV, _flag
from sovereign_discovery.session import KIND_WHOAREYOU, SessionLayer
from sovereign_discovery.wire import (
    FindNode,
    Nodes,
    Ping,
    Pong,
    Store,
    StoreResult,
    decode_message,
    encode_message,
)

from .helpers import has_ipv6_loopback, run_bounded

OWN_ID = bytes(range(20))
PEER_ID = bytes(range(100, 120))


def _module(name: str):
    try:
        return fastpath_module(name)
    except KernelUnavailableError:
        if _flag(REQUIRE_C_ENV):
            raise
        pytest.skip("the C fast path is not built")


@pytest.fixture(params=["c", "python"])
def fp(request):
    return _module(request.param)


def _keys(seed: int) -> tuple[bytes, bytes]:
    return bytes([seed]) * 32, bytes([seed + 1]) * 32


def _pair(module, seed: int = 1):
    """A sender (the twin's) and a receiver (``module``'s) sharing one direction's keys."""
    send_key, recv_key = _keys(seed)
    return fastpath_module("python").Cipher(send_key, recv_key), module.Cipher(recv_key, send_key)


def _outcome(module, result) -> str:
    if result is module.REPLAYED:
        return "replayed"
    return "failed" if result is None else "ok:" + result.hex()


# --- Cipher ----------------------------------------------------------------------------------------


def test_a_sealed_packet_has_the_message_layout_and_opens_once(fp):
    sender, receiver = _pair(fp)
    packet = sender.seal(PEER_ID, b"hello")
    magic, version, kind, nonce, auth_len = struct.unpack_from(">2sBB12sH", packet)
    assert (magic, version, kind, auth_len) == (b"sd", 1, 0, 20)
    assert nonce == bytes(4) + (1).to_bytes(8, "big") and packet[18:38] == PEER_ID
    assert len(packet) == 38 + 5 + 16 and sender.send_counter == 1
    assert receiver.open(packet) == b"hello" and receiver.recv_max == 1
    assert receiver.open(packet) is fp.REPLAYED  # the same counter again
    tampered = bytearray(sender.seal(PEER_ID, b"again"))
    tampered[-1] ^= 1
    assert receiver.open(bytes(tampered)) is None and receiver.recv_max == 1  # the window kept
    assert receiver.open(b"sd" + bytes(60)) is None  # not a MESSAGE of this version


def test_the_replay_window_is_1024_counters_and_moves_only_on_a_valid_tag(fp):
    sender, receiver = _pair(fp)
    packets = [sender.seal(PEER_ID, b"%d" % n) for n in range(1, 2001)]
    assert receiver.open(packets[1999]) == b"2000"
    assert receiver.open(packets[975]) is fp.REPLAYED  # counter 976: 1,024 behind
    assert receiver.open(packets[976]) == b"977"  # 1,023 behind: still in the window
    assert receiver.open(packets[976]) is fp.REPLAYED
    zero = bytearray(packets[0])
    zero[8:16] = bytes(8)  # counter 0 is never accepted
    assert receiver.open(bytes(zero)) is fp.REPLAYED


def test_cipher_argument_checks(fp):
    with pytest.raises(ValueError, match="32 bytes"):
        fp.Cipher(b"short", bytes(32))
    cipher = fp.Cipher(bytes(32), bytes(32))
    with pytest.raises(ValueError, match="own_id"):
        cipher.seal(b"x", b"m")
    with pytest.raises(ValueError, match="does not fit"):
        cipher.seal(OWN_ID, bytes(1227))
    assert len(cipher.seal(OWN_ID, bytes(1226))) == 1280


@settings(max_examples=60, deadline=None)
@given(order=st.lists(st.tuples(st.integers(0, 1199), st.booleans()), min_size=1, max_size=120))
def test_c_and_python_ciphers_agree_on_any_arrival_order(order):
    """Packets arriving in any order, repeated or tampered: the same answers and window."""
    c = _module("c")
    py = fastpath_module("python")
    sender = py.Cipher(*_keys(7))
    packets = [sender.seal(OWN_ID, b"m%d" % n) for n in range(1200)]
    receivers = [(module, module.Cipher(*reversed(_keys(7)))) for module in (c, py)]
    for index, tamper in order:
        packet = bytearray(packets[index])
        if tamper:
            packet[40] ^= 0x80
        outcomes = [_outcome(module, r.open(bytes(packet))) for module, r in receivers]
        assert outcomes[0] == outcomes[1]
        assert receivers[0][1].recv_max == receivers[1][1].recv_max


def test_c_and_python_ciphers_seal_the_same_bytes():
    c, py = _module("c"), fastpath_module("python")
    a, b = c.Cipher(*_keys(3)), py.Cipher(*_keys(3))
    for n in range(50):
        message = os.urandom(n * 20)
        assert a.seal(OWN_ID, message) == b.seal(OWN_ID, message)
    assert a.send_counter == b.send_counter == 50


# --- Responder on real sockets ------------------------------------------------------------------


def _socket(version: int = 4) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if version == 6 else socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("::1" if version == 6 else "127.0.0.1", 0))
    sock.setblocking(False)
    return sock


def _contacts(n: int) -> list[Contact]:
    return [Contact(Identity.from_seed(bytes([i + 1]) * 32).public_key, Address("127.0.0.1", 5000 + i))
            for i in range(n)]


class Hooks:
    """Scripted engine hooks that record their calls."""

    def __init__(self, contacts: list[Contact], admit: bool = True) -> None:
        self.contacts = contacts
        self.admitting = admit
        self.calls: list[tuple] = []

    def admit(self, address, now):
        self.calls.append(("admit", address, now))
        return self.admitting

    def enter_table(self, peer, now):
        self.calls.append(("enter", peer, now))

    def closest(self, target, count):
        self.calls.append(("closest", target, count))
        return list(self.contacts[:count])

    def own_seq(self):
        return 7

    def serve(self, peer, message, now):
        self.calls.append(("serve", peer, message, now))


class Rig:
    """A responder of ``module`` on its own server socket and one indexed session with a client
    socket (given, so that two rigs can share one client and see the same bytes)."""

    def __init__(self, module, hooks: Hooks, bucket_size: int = 20, lifetime: float = 3600.0,
                 client: socket.socket | None = None) -> None:
        self.module = module
        self.server = _socket()
        self.own_client = client is None
        self.client = _socket() if client is None else client
        self.hooks = hooks
        self.responder = module.Responder(OWN_ID, hooks.admit, hooks.enter_table, hooks.closest,
                                          hooks.own_seq, hooks.serve, bucket_size, lifetime, 1.0)
        send_key, recv_key = _keys(11)
        self.client_cipher = fastpath_module("python").Cipher(send_key, recv_key)
        self.cipher = module.Cipher(recv_key, send_key)
        host, port = self.client.getsockname()
        self.address = Address(host, port)
        self.peer = Contact(Identity.from_seed(bytes(32)).public_key, self.address)
        self.session = SimpleNamespace(last_used=0.0, touched=False, last_message=b"")
        self.key = index_key(PEER_ID, self.address)
        self.responder.add(self.key, self.session, self.cipher, self.peer, self.address,
                           self.address.encode(), 0.0)

    def close(self) -> None:
        self.server.close()
        if self.own_client:
            self.client.close()

    def send(self, *datagrams: bytes) -> None:
        for datagram in datagrams:
            self.client.sendto(datagram, self.server.getsockname())

    def request(self, message: bytes) -> bytes:
        return self.client_cipher.seal(PEER_ID, message)

    def serve(self, now: float = 10.0, send: bool = True, expect: int = 1):
        """serve_batch until ``expect`` datagrams were read (bounded in calls and time): the
        items, the unsent answers and the summed counts."""
        items, unsent, counts = [], [], [0] * 7
        for _ in range(50):
            if counts[0] + counts[2] >= expect:
                break
            select.select([self.server], [], [], 0.05)
            got, left, numbers = self.responder.serve_batch(self.server, now, 64, 1280, send)
            items += got
            unsent += left
            counts = [a + b for a, b in zip(counts, numbers)]
        return items, unsent, tuple(counts)

    def answers(self) -> list[bytes]:
        """The datagrams the client got (waits up to 0.2 s for each next one)."""
        out = []
        while select.select([self.client], [], [], 0.2)[0]:
            try:
                out.append(self.client.recv(2048))
            except BlockingIOError:
                break
        return out


def _scenario(module, client: socket.socket | None = None) -> dict:
    """PING, FIND_NODE, a STORE, an unknown sender, a tampered and a replayed request: what the
    responder returns, sends and counts."""
    rig = Rig(module, Hooks(_contacts(25)), client=client)
    try:
        ping = encode_message(Ping(b"P" * 8, 3))
        find = encode_message(FindNode(b"F" * 8, bytes(20)))
        store = b"\x05" + b"S" * 8 + bytes(20) + b"record"
        first = rig.request(ping)
        second, third = rig.request(find), rig.request(store)
        tampered = bytearray(rig.request(find))
        tampered[-3] ^= 1
        stranger = fastpath_module("python").Cipher(*_keys(40)).seal(b"\x09" * 20, ping)
        datagrams = [first, second, third, stranger, bytes(tampered), first]
        rig.send(*datagrams)
        items, unsent, counts = rig.serve(now=10.0, expect=len(datagrams))
        return {
            "items": items, "unsent": unsent, "counts": counts, "answers": rig.answers(),
            "counters": rig.responder.counters(),
            "session": (rig.session.last_used, rig.session.touched, rig.session.last_message),
            "calls": [c[0] for c in rig.hooks.calls],
            "client": rig.client.getsockname(), "sent_bytes": sum(len(d) for d in datagrams),
            "stranger": stranger, "tampered": bytes(tampered), "first": first,
            "peer": rig.peer,
        }
    finally:
        rig.close()


def test_the_responder_answers_ping_and_find_node_and_hands_back_the_rest(fp):
    out = _scenario(fp)
    client = out["client"]
    # the STORE was decrypted and left to the engine; the rest left untouched, in arrival order
    assert out["items"][0] == (1, out["peer"], b"\x05" + b"S" * 8 + bytes(20) + b"record")
    assert out["items"][1:] == [(0, out["stranger"], client), (0, out["tampered"], client),
                                (0, out["first"], client)]  # unknown sender, bad tag, replay
    assert out["unsent"] == [] and len(out["answers"]) == 2
    assert out["counts"] == (6, out["sent_bytes"], 0, 0, 2, sum(map(len, out["answers"])), 0)
    counters = out["counters"]
    assert counters["ping_in"] == counters["find_node_in"] == counters["pong_out"] == counters["nodes_out"] == 1
    assert counters["delivered"] == counters["packets_in"] == 3 and counters["packets_out"] == 2
    assert counters["bytes_out"] == sum(map(len, out["answers"])) and counters["hook_errors"] == 0
    assert out["session"][0] == 10.0 and out["session"][1] is True
    # the table hears of the peer once a second, not per request; both requests were admitted
    assert out["calls"] == ["admit", "enter", "admit", "closest"]


def test_the_answers_are_what_the_engine_would_send(fp):
    rig = Rig(fp, Hooks(_contacts(25)))
    try:
        rig.send(rig.request(encode_message(Ping(b"P" * 8, 3))),
                 rig.request(encode_message(FindNode(b"F" * 8, bytes(20)))))
        rig.serve(expect=2)
        pong, nodes = (decode_message(rig.client_cipher.open(a)) for a in rig.answers())
        assert isinstance(pong, Pong) and pong.request_id == b"P" * 8
        assert pong.record_seq == 7 and pong.observed == rig.address
        assert isinstance(nodes, Nodes) and nodes.request_id == b"F" * 8 and nodes.total == 1
        assert list(nodes.contacts) == _contacts(20)
        assert rig.session.last_message == b""  # answers are not kept for a re-handshake
    finally:
        rig.close()


def test_c_and_python_responders_do_the_same():
    client = _socket()
    try:
        c = _scenario(_module("c"), client)
        py = _scenario(fastpath_module("python"), client)
    finally:
        client.close()
    for key in ("items", "unsent", "counts", "answers", "counters", "calls", "session"):
        assert c[key] == py[key], key


def test_a_refused_request_goes_to_the_engine_unanswered(fp):
    rig = Rig(fp, Hooks(_contacts(3), admit=False))
    try:
        request = encode_message(FindNode(b"F" * 8, bytes(20)))
        rig.send(rig.request(request))
        items, _, _ = rig.serve()
        assert [(k, b) for k, _, b in items] == [(1, request)]  # the engine drops and counts it
        assert rig.answers() == [] and rig.responder.counters()["find_node_in"] == 0
    finally:
        rig.close()


def test_an_answer_over_one_message_is_left_to_the_engine(fp):
    rig = Rig(fp, Hooks(_contacts(25)), bucket_size=25)
    try:
        request = encode_message(FindNode(b"F" * 8, bytes(20)))
        rig.send(rig.request(request))
        items, _, _ = rig.serve(now=5.0)
        assert items == [] and rig.answers() == []
        assert rig.hooks.calls[-1] == ("serve", rig.peer, request, 5.0)
    finally:
        rig.close()


def test_an_expired_session_and_a_full_socket_are_left_to_python(fp):
    rig = Rig(fp, Hooks(_contacts(3)), lifetime=5.0)
    try:
        packet = rig.request(encode_message(Ping(b"P" * 8, 0)))
        rig.send(packet)
        items, _, _ = rig.serve(now=5.0)  # the session is 5 s old: the session layer expires it
        assert [k for k, _, _ in items] == [0] and rig.cipher.recv_max == 0
    finally:
        rig.close()
    rig = Rig(fp, Hooks(_contacts(3)))
    try:
        rig.send(rig.request(encode_message(Ping(b"P" * 8, 0))))
        items, unsent, counts = rig.serve(send=False)  # the endpoint's queue is not empty
        assert items == [] and counts[4] == 0
        assert [a for a, _ in unsent] == [rig.address]
        assert decode_message(rig.client_cipher.open(unsent[0][1])).request_id == b"P" * 8
    finally:
        rig.close()


def test_oversized_datagrams_are_counted_and_dropped(fp):
    rig = Rig(fp, Hooks([]))
    try:
        rig.send(bytes(1281), bytes(40))
        items, _, counts = rig.serve(expect=2)
        assert counts[:4] == (1, 40, 1, 0)  # one read, one over 1,280 bytes dropped
        assert items == [(0, bytes(40), rig.client.getsockname())]
    finally:
        rig.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_raising_hook_is_counted_and_the_engine_gets_the_request(fp):
    hooks = Hooks(_contacts(3))

    def broken(target, count):
        raise RuntimeError("a bug")

    hooks.closest = broken
    rig = Rig(fp, hooks)
    try:
        request = encode_message(FindNode(b"F" * 8, bytes(20)))
        rig.send(rig.request(request))
        items, _, _ = rig.serve(now=2.0)
        assert items == [] and rig.responder.counters()["hook_errors"] == 1
        assert rig.hooks.calls[-1] == ("serve", rig.peer, request, 2.0)
    finally:
        rig.close()


def test_removed_sessions_are_not_answered(fp):
    rig = Rig(fp, Hooks([]))
    try:
        assert rig.responder.indexed() == 1
        rig.responder.remove(rig.key)
        rig.responder.remove(rig.key)  # idempotent
        assert rig.responder.indexed() == 0
        packet = rig.request(encode_message(Ping(b"P" * 8, 0)))
        rig.send(packet)
        items, _, _ = rig.serve()
        assert items == [(0, packet, rig.client.getsockname())]
    finally:
        rig.close()


# --- a DhtNode through its fast path ------------------------------------------------------------


class Client:
    """A peer speaking to a node through the library's own SessionLayer over a UDP socket."""

    def __init__(self, node: DhtNode, seed: bytes | None = None) -> None:
        self.identity = Identity.generate() if seed is None else Identity.from_seed(seed)
        self.layer = SessionLayer(self.identity)
        self.server = node.contact
        self.sock = _socket(6 if self.server.address.version == 6 else 4)
        self.sock.connect(self.server.address.to_tuple())
        self.sent: list[bytes] = []

    async def exchange(self, message, *, expect: type | None) -> object | None:
        loop = asyncio.get_running_loop()
        for out in self.layer.send(self.server, encode_message(message), loop.time()):
            self.sent.append(out.datagram)
            self.sock.send(out.datagram)
        return await self.receive(expect)

    async def raw(self, timeout: float) -> list[bytes]:
        """The datagrams that arrive within ``timeout``, not handled."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        out = []
        while loop.time() < deadline:
            try:
                out.append(await asyncio.wait_for(loop.sock_recv(self.sock, 2048), deadline - loop.time()))
            except asyncio.TimeoutError:
                break
        return out

    async def receive(self, expect: type | None, timeout: float = 1.0) -> object | None:
        """The first answer of type ``expect`` (handshake packets are answered on the way);
        None if nothing of that type arrives within ``timeout``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            try:
                data = await asyncio.wait_for(loop.sock_recv(self.sock, 2048), deadline - loop.time())
            except asyncio.TimeoutError:
                return None
            received = self.layer.receive(data, self.server.address, loop.time())
            for out in received.outgoing:
                self.sock.send(out.datagram)
            for delivered in received.delivered:
                message = decode_message(delivered.message)
                if expect is not None and isinstance(message, expect):
                    return message
        return None


async def _answers(fast_path: bool) -> dict:
    identity = Identity.from_seed(b"\x05" * 32)
    async with DhtNode(identity, fast_path=fast_path) as node:
        loop = asyncio.get_running_loop()
        for contact in _contacts(30):
            node.engine.table.insert(contact, loop.time())
        client = Client(node, seed=b"\x06" * 32)  # the same table in both runs: it enters it
        try:
            first = await client.exchange(Ping(b"A" * 8, 0), expect=Pong)  # makes the session
            pong = await client.exchange(Ping(b"B" * 8, 0), expect=Pong)
            nodes = await client.exchange(FindNode(b"C" * 8, bytes(20)), expect=Nodes)
            stats = node.stats()
            closest = node.engine.table.closest(bytes(20), 20)
        finally:
            client.sock.close()
        return {"first": first, "pong": pong, "nodes": nodes, "stats": stats, "closest": closest}


def test_a_node_answers_the_same_with_and_without_its_fast_path():
    fast = run_bounded(_answers(True), 10)
    plain = run_bounded(_answers(False), 10)
    for out in (fast, plain):
        assert out["pong"].request_id == b"B" * 8 and out["pong"].record_seq == out["first"].record_seq
        assert list(out["nodes"].contacts) == out["closest"]
    # the same contacts (the client's own entry differs only in its port)
    assert [c.node_id for c in fast["nodes"].contacts] == [c.node_id for c in plain["nodes"].contacts]
    stats = fast["stats"]
    assert stats["fast_path"]["kernel"] == FASTPATH_KERNEL and stats["fast_path"]["sessions_indexed"] == 1
    # the first PING made the session (engine path); the next two were answered by the fast path
    assert stats["fast_path"]["ping_in"] == 1 and stats["fast_path"]["find_node_in"] == 1
    assert stats["messages_in"]["ping"] == 2 and stats["messages_in"]["find_node"] == 1
    assert stats["messages_out"]["pong"] == 2 and stats["messages_out"]["nodes"] == 1
    assert plain["stats"]["fast_path"] is None
    assert plain["stats"]["messages_in"] == stats["messages_in"]
    assert plain["stats"]["messages_out"] == stats["messages_out"]


def test_replayed_tampered_and_forged_requests_to_a_node_are_dropped_and_counted():
    async def main() -> None:
        async with DhtNode(Identity.generate()) as node:
            client = Client(node)
            try:
                assert await client.exchange(Ping(b"A" * 8, 0), expect=Pong) is not None
                assert await client.exchange(FindNode(b"B" * 8, bytes(20)), expect=Nodes) is not None
                captured = client.sent[-1]
                before = node.stats()["drops"]
                client.sock.send(captured)  # a replay: dropped without a word
                assert await client.raw(timeout=0.3) == []
                tampered = bytearray(client.layer.send(node.contact, encode_message(
                    FindNode(b"C" * 8, bytes(20))), asyncio.get_running_loop().time())[0].datagram)
                tampered[-1] ^= 1
                client.sock.send(bytes(tampered))  # a bad tag: challenged (WHOAREYOU), not answered
                assert [d[3] for d in await client.raw(timeout=0.3)] == [KIND_WHOAREYOU]
                forged = bytearray(captured)
                forged[18:38] = os.urandom(20)  # another sender's ID at the same address: challenged
                client.sock.send(bytes(forged))
                assert [d[3] for d in await client.raw(timeout=0.3)] == [KIND_WHOAREYOU]
                drops = node.stats()["drops"]
                assert drops["session.replayed"] == before["session.replayed"] + 1
                assert drops["session.decrypt_failed"] == before["session.decrypt_failed"] + 1
                assert drops["session.no_session"] == before["session.no_session"] + 1
                assert node.stats()["fast_path"]["find_node_in"] == 1
            finally:
                client.sock.close()

    run_bounded(main(), 10)


def test_a_node_rate_limits_through_its_fast_path():
    async def main() -> None:
        config = DhtConfig(rate_global_per_s=0.001, burst_global=3)
        async with DhtNode(Identity.generate(), config=config) as node:
            client = Client(node)
            try:
                answered = 0
                for n in range(8):
                    if await client.exchange(FindNode(bytes([n]) * 8, bytes(20)), expect=Nodes) is not None:
                        answered += 1
                stats = node.stats()
                assert answered == 3 and stats["drops"]["rate_limited"] == 5
                assert stats["messages_in"]["find_node"] == 8  # each counted once
            finally:
                client.sock.close()

    run_bounded(main(), 20)


def test_other_requests_in_an_indexed_session_reach_the_engine():
    async def main() -> None:
        async with DhtNode(Identity.generate()) as node:
            client = Client(node)
            try:
                assert await client.exchange(Ping(b"A" * 8, 0), expect=Pong) is not None
                assert node.stats()["fast_path"]["sessions_indexed"] == 1
                answer = await client.exchange(Store(b"S" * 8, bytes(client.identity.node_id), b"junk"),
                                               expect=StoreResult)
                assert answer is not None and answer.request_id == b"S" * 8  # refused, but answered
                assert node.stats()["drops"]["invalid_record_received"] == 1
            finally:
                client.sock.close()

    run_bounded(main(), 10)


def test_a_batch_served_from_inside_another_batch_gets_its_own_buffers(fp):
    """Responders share one set of batch buffers; a hook that reaches another responder (no engine
    does, but nothing forbids it) must not overwrite the batch in progress."""
    inner = Rig(fp, Hooks(_contacts(2)))
    outer_hooks = Hooks(_contacts(3))
    served_inside = []

    def enter_table(peer, now):
        served_inside.append(inner.serve(now=now))

    outer_hooks.enter_table = enter_table
    outer = Rig(fp, outer_hooks)
    try:
        inner.send(inner.request(encode_message(Ping(b"I" * 8, 0))))
        outer.send(outer.request(encode_message(FindNode(b"O" * 8, bytes(20)))),
                   outer.request(encode_message(Ping(b"Q" * 8, 0))))
        items, _, counts = outer.serve(expect=2)
        assert items == [] and counts[4] == 2 and len(served_inside) == 1
        assert [decode_message(outer.client_cipher.open(a)).request_id for a in outer.answers()] == \
            [b"O" * 8, b"Q" * 8]
        assert decode_message(inner.client_cipher.open(inner.answers()[0])).request_id == b"I" * 8
    finally:
        inner.close()
        outer.close()


@pytest.mark.skipif(not has_ipv6_loopback(), reason="::1 cannot be bound here (no IPv6 loopback)")
def test_a_node_on_ipv6_answers_through_its_fast_path():
    async def main() -> None:
        async with DhtNode(Identity.generate(), host="::1") as node:
            client = Client(node)
            try:
                assert await client.exchange(Ping(b"A" * 8, 0), expect=Pong) is not None
                pong = await client.exchange(Ping(b"B" * 8, 0), expect=Pong)
                nodes = await client.exchange(FindNode(b"C" * 8, bytes(20)), expect=Nodes)
                assert pong.observed == Address(*client.sock.getsockname()[:2])
                assert [c.node_id for c in nodes.contacts] == [client.identity.node_id]
                fast = node.stats()["fast_path"]
                assert fast["ping_in"] == 1 and fast["find_node_in"] == 1
            finally:
                client.sock.close()

    run_bounded(main(), 10)
