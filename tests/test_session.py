"""The packet/session layer, engine-level: bytes move between SessionLayer objects directly, with a
manual clock and seeded randomness (no sockets)."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sovereign_discovery.addresses import Address
from sovereign_discovery.errors import ArgumentTypeError, ArgumentValueError
from sovereign_discovery.identity import Identity, SignaturePurpose
from sovereign_discovery.routing import Contact
from sovereign_discovery.session import (
    MAX_MESSAGE_BYTES,
    REPLAY_WINDOW,
    SessionLayer,
    SessionLimits,
    hkdf_sha256,
)

A_ADDR = Address("10.0.0.1", 4001)
B_ADDR = Address("10.0.0.2", 4002)
C_ADDR = Address("10.0.0.3", 4003)


def ident(tag: int) -> Identity:
    return Identity.from_seed(bytes([tag]) * 32)


def layer(identity: Identity, seed: int = 0, **limits) -> SessionLayer:
    """A layer with seeded randomness. These tests are about the WHOAREYOU handshake, so 0-RTT
    is off unless asked for (tests/test_session_zero_rtt.py covers it)."""
    rng = random.Random(seed)
    limits.setdefault("zero_rtt", False)
    return SessionLayer(identity, random_bytes=rng.randbytes, limits=SessionLimits(**limits))


def deliver(receiver: SessionLayer, outgoing, source: Address, now: float = 0.0):
    """Feed every datagram of ``outgoing`` to ``receiver`` as from ``source``; returns (delivered
    messages, datagrams the receiver sent back)."""
    delivered, replies = [], []
    for out in outgoing:
        result = receiver.receive(out.datagram, source, now)
        delivered.extend(result.delivered)
        replies.extend(result.outgoing)
    return delivered, replies


def handshake(a, a_addr, b, b_id, b_addr, message=b"hello", now=0.0):
    """A sends ``message`` to B through a full handshake; returns what B delivered."""
    first = a.send(Contact(b_id.public_key, b_addr), message, now)
    assert len(first) == 1 and first[0].address == b_addr
    _, challenge = deliver(b, first, a_addr, now)
    assert len(challenge) == 1 and len(challenge[0].datagram) == 42
    _, hs = deliver(a, challenge, b_addr, now)
    delivered, _ = deliver(b, hs, a_addr, now)
    return delivered, hs


@pytest.fixture
def pair():
    a_id, b_id = ident(1), ident(2)
    a, b = layer(a_id, 1), layer(b_id, 2)
    delivered, _ = handshake(a, A_ADDR, b, b_id, B_ADDR)
    assert [d.message for d in delivered] == [b"hello"]
    return a_id, a, b_id, b


def test_hkdf_rfc5869_test_case_1():
    okm = hkdf_sha256(
        bytes.fromhex("0b" * 22), bytes.fromhex("000102030405060708090a0b0c"),
        bytes.fromhex("f0f1f2f3f4f5f6f7f8f9"), 42)
    assert okm.hex() == (
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865")


def test_handshake_then_many_messages_both_ways(pair):
    a_id, a, b_id, b = pair
    assert b.has_session(a_id.node_id, A_ADDR) and a.has_session(b_id.node_id, B_ADDR)
    # B replies through the session the handshake made; the peer is A's key at A's address
    got, _ = deliver(a, b.send(Contact(a_id.public_key, A_ADDR), b"reply", 0), B_ADDR)
    assert [(d.peer.public_key, d.peer.address, d.message) for d in got] == [(b_id.public_key, B_ADDR, b"reply")]
    for i in range(200):
        to_b = a.send(Contact(b_id.public_key, B_ADDR), b"a%d" % i, 1)
        to_a = b.send(Contact(a_id.public_key, A_ADDR), b"b%d" % i, 1)
        assert len(to_b) == len(to_a) == 1
        assert [d.message for d in deliver(b, to_b, A_ADDR, 1)[0]] == [b"a%d" % i]
        assert [d.message for d in deliver(a, to_a, B_ADDR, 1)[0]] == [b"b%d" % i]
    assert a.stats["handshakes_initiated"] == 1 and b.stats["handshakes_completed"] == 1
    assert b.stats["handshakes_initiated"] == 0 and a.stats["challenges"] == b.stats["challenges"] == 0
    # the two directions use different keys
    sa = a._sessions[(b_id.node_id, B_ADDR)]
    assert sa.send_key != sa.recv_key
    sb = b._sessions[(a_id.node_id, A_ADDR)]
    assert (sb.send_key, sb.recv_key) == (sa.recv_key, sa.send_key)


def test_pending_messages_flush_after_handshake():
    a_id, b_id = ident(1), ident(2)
    a, b = layer(a_id, 1), layer(b_id, 2)
    peer_b = Contact(b_id.public_key, B_ADDR)
    first = a.send(peer_b, b"m0", 0)
    assert a.send(peer_b, b"m1", 0.1) == [] and a.send(peer_b, b"m2", 0.2) == []  # queued
    _, challenge = deliver(b, first, A_ADDR)
    _, packets = deliver(a, challenge, B_ADDR)
    assert len(packets) == 3  # the HANDSHAKE with m0, then m1 and m2 in the new session
    got, _ = deliver(b, packets, A_ADDR)
    assert [d.message for d in got] == [b"m0", b"m1", b"m2"]


def test_send_rejects_bad_arguments(pair):
    _, a, b_id, _ = pair
    peer = Contact(b_id.public_key, B_ADDR)
    with pytest.raises(ArgumentValueError):
        a.send(peer, b"x" * (MAX_MESSAGE_BYTES + 1), 0)
    with pytest.raises(ArgumentTypeError):
        a.send(peer, "text", 0)
    with pytest.raises(ArgumentTypeError):
        a.send(B_ADDR, b"x", 0)
    out = a.send(peer, b"x" * MAX_MESSAGE_BYTES, 0)
    assert len(out[0].datagram) <= 1280
    with pytest.raises(ArgumentValueError):
        SessionLimits(max_sessions=0)


def test_largest_message_fits_a_handshake():
    a_id, b_id = ident(1), ident(2)
    a, b = layer(a_id, 1), layer(b_id, 2)
    delivered, hs = handshake(a, A_ADDR, b, b_id, B_ADDR, message=b"m" * MAX_MESSAGE_BYTES)
    assert len(hs[0].datagram) == 1280 and delivered[0].message == b"m" * MAX_MESSAGE_BYTES


# --- forgeries ---------------------------------------------------------------------------------


def test_handshake_signed_by_another_key_is_dropped():
    a_id, b_id, m_id = ident(1), ident(2), ident(3)
    a, b = layer(a_id, 1), layer(b_id, 2)
    _, challenge = deliver(b, a.send(Contact(b_id.public_key, B_ADDR), b"hi", 0), A_ADDR)
    _, hs = deliver(a, challenge, B_ADDR)
    packet = bytearray(hs[0].datagram)
    # replace the id_signature by M's signature over the same bytes: claims A's key, signed by M
    ephemeral = bytes(packet[50:82])
    import hashlib
    signed = hashlib.sha256(challenge[0].datagram).digest() + ephemeral + b_id.node_id
    packet[82:146] = m_id.sign(SignaturePurpose.SESSION_HANDSHAKE, signed)
    result = b.receive(bytes(packet), A_ADDR, 0)
    assert result.delivered == () and b.stats["bad_signature"] == 1
    assert not b.has_session(a_id.node_id, A_ADDR)


def test_message_claiming_another_node_id_is_not_delivered(pair):
    a_id, a, b_id, b = pair
    m_id = ident(3)
    m = layer(m_id, 3)
    handshake(m, C_ADDR, b, b_id, B_ADDR)
    datagram = bytearray(m.send(Contact(b_id.public_key, B_ADDR), b"i am A", 0)[0].datagram)
    datagram[18:38] = a_id.node_id
    # from A's (spoofed) address: A's session is found, but M's key does not open it
    result = b.receive(bytes(datagram), A_ADDR, 0)
    assert result.delivered == () and b.stats["decrypt_failed"] == 1
    # from M's own address: no session for (A, M's address)
    before = b.stats["no_session"]
    result = b.receive(bytes(datagram), C_ADDR, 0)
    assert result.delivered == () and b.stats["no_session"] == before + 1


def test_handshake_towards_a_wrong_static_key_fails():
    a_id, b_id, x_id = ident(1), ident(2), ident(3)
    a, b = layer(a_id, 1), layer(b_id, 2)
    delivered, _ = handshake(a, A_ADDR, b, x_id, B_ADDR)  # A believes B_ADDR holds X's key
    assert delivered == []
    assert b.stats["bad_signature"] + b.stats["decrypt_failed"] == 1
    assert not b.has_session(a_id.node_id, A_ADDR)


# --- tampering and replay ----------------------------------------------------------------------


def test_every_flipped_byte_is_dropped(pair):
    a_id, a, b_id, b = pair
    datagram = a.send(Contact(b_id.public_key, B_ADDR), b"payload", 0)[0].datagram
    before = b.stats
    for i in range(len(datagram)):
        tampered = bytearray(datagram)
        tampered[i] ^= 0xFF
        assert b.receive(bytes(tampered), A_ADDR, 0).delivered == (), i
    after = b.stats
    drops = ("bad_magic", "unknown_version", "unknown_kind", "malformed", "decrypt_failed", "no_session", "replayed",
                 "awaiting_handshake")
    assert sum(after[r] - before[r] for r in drops) == len(datagram)
    assert after["delivered"] == before["delivered"]
    # the window did not move: the genuine packet is still accepted
    assert [d.message for d in b.receive(datagram, A_ADDR, 0).delivered] == [b"payload"]


def test_replays_and_reordering(pair):
    a_id, a, b_id, b = pair
    peer = Contact(b_id.public_key, B_ADDR)
    packets = [a.send(peer, b"%d" % i, 0)[0].datagram for i in range(REPLAY_WINDOW + 10)]
    first = packets[0]
    assert b.receive(first, A_ADDR, 0).delivered
    assert b.receive(first, A_ADDR, 0).delivered == () and b.stats["replayed"] == 1
    # reordered within the window: each delivered once
    for i in (5, 3, 4, 2, 1):
        assert [d.message for d in b.receive(packets[i], A_ADDR, 0).delivered] == [b"%d" % i]
        assert b.receive(packets[i], A_ADDR, 0).delivered == ()
    assert b.stats["replayed"] == 6
    # jump ahead: counters older than the window are dropped even if never seen
    assert b.receive(packets[-1], A_ADDR, 0).delivered
    assert b.receive(packets[8], A_ADDR, 0).delivered == () and b.stats["replayed"] == 7
    assert b.receive(packets[-5], A_ADDR, 0).delivered  # inside the window


def test_replayed_handshake_is_dropped():
    a_id, b_id = ident(1), ident(2)
    a, b = layer(a_id, 1), layer(b_id, 2)
    delivered, hs = handshake(a, A_ADDR, b, b_id, B_ADDR)
    assert delivered
    assert b.receive(hs[0].datagram, A_ADDR, 0).delivered == ()
    assert b.stats["unknown_challenge"] == 1


def test_unsolicited_whoareyou_is_dropped(pair):
    a_id, a, b_id, b = pair
    c_id = ident(3)
    c = layer(c_id, 3)
    # a WHOAREYOU answering a packet A never sent
    _, challenge = deliver(b, c.send(Contact(b_id.public_key, B_ADDR), b"x", 0), C_ADDR)
    assert a.receive(challenge[0].datagram, B_ADDR, 0) == ((), ())
    assert a.stats["unsolicited_whoareyou"] == 1
    # a genuine WHOAREYOU from the wrong address
    first = a.send(Contact(c_id.public_key, C_ADDR), b"y", 0)
    _, challenge = deliver(c, first, A_ADDR)
    assert a.receive(challenge[0].datagram, B_ADDR, 0) == ((), ())
    assert a.stats["unsolicited_whoareyou"] == 2


def test_oversized_and_truncated_packets_are_dropped(pair):
    a_id, a, b_id, b = pair
    datagram = a.send(Contact(b_id.public_key, B_ADDR), b"m", 0)[0].datagram
    assert b.receive(datagram + bytes(1281 - len(datagram)), A_ADDR, 0) == ((), ())
    assert b.stats["too_large"] == 1
    for cut in range(len(datagram)):
        assert b.receive(datagram[:cut], A_ADDR, 0).delivered == ()
    assert b.stats["malformed"] + b.stats["decrypt_failed"] == len(datagram)


def test_session_is_bound_to_the_address(pair):
    a_id, a, b_id, b = pair
    datagram = a.send(Contact(b_id.public_key, B_ADDR), b"m", 0)[0].datagram
    result = b.receive(datagram, C_ADDR, 0)
    assert result.delivered == () and len(result.outgoing) == 1
    assert result.outgoing[0].address == C_ADDR and len(result.outgoing[0].datagram) == 42


# --- anti-amplification and caps ---------------------------------------------------------------


def random_message_packet(rng: random.Random, node_id: bytes | None = None, size: int = 70) -> bytes:
    header = b"sd\x01\x00" + rng.randbytes(12) + (20).to_bytes(2, "big")
    return header + (node_id or rng.randbytes(20)) + rng.randbytes(size - 38)


def test_anti_amplification_flood_from_one_address():
    b_id = ident(2)
    b = layer(b_id, 2)
    rng = random.Random(7)
    received = sent = 0
    for i in range(2000):
        packet = random_message_packet(rng, size=54 + i % 100)
        received += len(packet)
        sent += sum(len(o.datagram) for o in b.receive(packet, A_ADDR, 0).outgoing)
        assert sent <= 3 * received
    assert sent > 0


def test_anti_amplification_limit_is_enforced_and_lifted_by_a_handshake():
    a_id, b_id = ident(1), ident(2)
    b = layer(b_id, 2, amplification_factor=0.5)  # tighter than WHOAREYOU/MESSAGE, to see it bite
    rng = random.Random(8)
    received = sent = 0
    for _ in range(100):
        packet = random_message_packet(rng, size=54)
        received += len(packet)
        sent += sum(len(o.datagram) for o in b.receive(packet, A_ADDR, 0).outgoing)
        assert sent <= 0.5 * received
    assert b.stats["amplification_limited"] > 0
    a = layer(a_id, 1)
    delivered, _ = handshake(a, A_ADDR, b, b_id, B_ADDR)  # the WHOAREYOU fits the credit
    assert delivered and b.stats["unvalidated_addresses"] == 0
    # validated: answered without limit now
    for _ in range(20):
        assert b.receive(random_message_packet(rng, size=54), A_ADDR, 0).outgoing


def test_tables_stay_capped_under_a_flood_and_legitimate_peers_still_connect():
    b_id = ident(2)
    limits = dict(max_challenges=1000, max_unvalidated_addresses=1000, max_challenges_per_ip=8, max_sessions=50)
    b = layer(b_id, 2, **limits)
    rng = random.Random(9)
    for i in range(100_000):
        source = Address(f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255 or 1}", 1000 + i % 50000)
        b.receive(random_message_packet(rng), source, i * 1e-5)
        if i % 10_000 == 0:
            stats = b.stats
            assert stats["challenges"] <= 1000 and stats["unvalidated_addresses"] <= 1000
    stats = b.stats
    assert stats["challenges"] == 1000 and stats["unvalidated_addresses"] == 1000
    assert len(b._challenges_per_ip) <= 1000
    # a flood of many IDs from one host only recycles that host's challenges, so a legitimate
    # handshake interleaved with it still completes
    a_id = ident(1)
    a = layer(a_id, 1)
    flooder = Address("10.9.9.9", 9999)
    first = a.send(Contact(b_id.public_key, B_ADDR), b"legit", 1)
    _, challenge = deliver(b, first, A_ADDR, 1)
    for _ in range(5000):
        b.receive(random_message_packet(rng), flooder, 1)
    assert sum(1 for k in b._challenges if k[1] == flooder) == 8
    _, hs = deliver(a, challenge, B_ADDR, 1)
    delivered, _ = deliver(b, hs, A_ADDR, 1)
    assert [d.message for d in delivered] == [b"legit"]
    # sessions are capped too
    for tag in range(3, 80):
        peer = layer(ident(tag), tag)
        handshake(peer, Address("10.8.0.1", 2000 + tag), b, b_id, B_ADDR, now=2)
        assert b.stats["sessions"] <= 50
    assert b.stats["sessions_evicted"] > 0


def test_pending_tables_are_capped():
    a_id = ident(1)
    a = layer(a_id, 1, max_pending_peers=10, max_pending_messages_per_peer=3)
    for tag in range(2, 40):
        for i in range(5):
            a.send(Contact(ident(tag).public_key, B_ADDR), b"m%d" % i, 0)
    stats = a.stats
    assert stats["pending_peers"] == 10 and stats["pending_messages"] == 30
    assert len(a._pending_by_nonce) <= 10 * 4


# --- expiry and restarts -----------------------------------------------------------------------


def test_expired_challenge_drops_a_late_handshake():
    a_id, b_id = ident(1), ident(2)
    a, b = layer(a_id, 1), layer(b_id, 2)
    _, challenge = deliver(b, a.send(Contact(b_id.public_key, B_ADDR), b"hi", 0), A_ADDR, 0)
    _, hs = deliver(a, challenge, B_ADDR, 0)
    b.expire(5.0)
    assert b.stats["challenges"] == 0
    assert deliver(b, hs, A_ADDR, 5.0)[0] == [] and b.stats["unknown_challenge"] == 1


def test_late_handshake_is_dropped_without_expire_call():
    a_id, b_id = ident(1), ident(2)
    a, b = layer(a_id, 1), layer(b_id, 2)
    _, challenge = deliver(b, a.send(Contact(b_id.public_key, B_ADDR), b"hi", 0), A_ADDR, 0)
    _, hs = deliver(a, challenge, B_ADDR, 0)
    assert deliver(b, hs, A_ADDR, 5.1)[0] == [] and b.stats["unknown_challenge"] == 1


def test_pending_messages_expire():
    a_id, b_id = ident(1), ident(2)
    a, b = layer(a_id, 1), layer(b_id, 2)
    first = a.send(Contact(b_id.public_key, B_ADDR), b"hi", 0)
    _, challenge = deliver(b, first, A_ADDR, 0)
    a.expire(5.0)
    assert a.stats["pending_peers"] == 0 and a.stats["pending_dropped"] == 1
    assert deliver(a, challenge, B_ADDR, 5.0) == ([], [])
    assert a.stats["unsolicited_whoareyou"] == 1


def test_sessions_expire_after_their_lifetime(pair):
    a_id, a, b_id, b = pair
    lifetime = b.limits.session_lifetime_s
    b.expire(lifetime)
    assert not b.has_session(a_id.node_id, A_ADDR)
    # A's session is stale too when used: a new handshake starts
    out = a.send(Contact(b_id.public_key, B_ADDR), b"x", lifetime)
    _, challenge = deliver(b, out, A_ADDR, lifetime)
    _, hs = deliver(a, challenge, B_ADDR, lifetime)
    assert [d.message for d in deliver(b, hs, A_ADDR, lifetime)[0]] == [b"x"]


def test_idle_sessions_expire_and_used_ones_stay():
    a_id, b_id, c_id = ident(1), ident(2), ident(3)
    b = layer(b_id, 2, session_idle_s=60.0)
    a, c = layer(a_id, 1), layer(c_id, 3)
    handshake(a, A_ADDR, b, b_id, B_ADDR)
    handshake(c, C_ADDR, b, b_id, B_ADDR)
    to_b = Contact(b_id.public_key, B_ADDR)
    assert [d.message for d in deliver(b, c.send(to_b, b"busy", 50.0), C_ADDR, 50.0)[0]] == [b"busy"]
    b.expire(59.9)
    assert b.has_session(a_id.node_id, A_ADDR) and b.stats["sessions_idle"] == 0
    b.expire(60.0)  # A's session is 60 s idle, C's 10 s
    assert not b.has_session(a_id.node_id, A_ADDR) and b.has_session(c_id.node_id, C_ADDR)
    assert b.stats["sessions_idle"] == 1 and b.stats["sessions"] == 1
    # A still holds its session: its next message is challenged, and the re-handshake carries it
    before = b.stats["no_session"]
    out = a.send(to_b, b"still there?", 61.0)
    delivered, challenge = deliver(b, out, A_ADDR, 61.0)
    assert delivered == [] and b.stats["no_session"] == before + 1
    _, hs = deliver(a, challenge, B_ADDR, 61.0)
    assert [d.message for d in deliver(b, hs, A_ADDR, 61.0)[0]] == [b"still there?"]
    # the old session's packets stay dead: replayed into the new one, the tag fails
    assert deliver(b, out, A_ADDR, 61.1)[0] == []


def test_the_session_table_is_bounded_and_an_evicted_peer_reconnects():
    ids_ = [ident(10 + i) for i in range(4)]
    b_id = ident(2)
    b = layer(b_id, 2, max_sessions=2)
    peers = [layer(i, 10 + n) for n, i in enumerate(ids_)]
    addrs = [Address("10.0.1.%d" % (n + 1), 5000) for n in range(4)]
    for peer, addr in zip(peers, addrs):
        handshake(peer, addr, b, b_id, B_ADDR)
        assert b.stats["sessions"] <= 2
    assert b.stats["sessions_evicted"] == 2
    assert not b.has_session(ids_[0].node_id, addrs[0])
    to_b = Contact(b_id.public_key, B_ADDR)
    out = peers[0].send(to_b, b"m", 1.0)
    _, challenge = deliver(b, out, addrs[0], 1.0)
    _, hs = deliver(peers[0], challenge, B_ADDR, 1.0)
    assert [d.message for d in deliver(b, hs, addrs[0], 1.0)[0]] == [b"m"]
    assert b.stats["sessions"] == 2


def test_a_rehandshake_after_a_long_message_delivers_nothing_and_the_session_works(pair):
    """A message over 64 bytes (an answer, a record) is not kept for a re-handshake, nor is an
    answer of the fast path: a WHOAREYOU to it installs a new session through a HANDSHAKE carrying
    an empty message, delivered to nobody; the sender's retry goes through in the new session."""
    a_id, a, b_id, b = pair
    to_a = Contact(a_id.public_key, A_ADDR)
    assert len(b.send(to_a, b"k" * 64, 4.0)) == 1  # kept, then replaced by the next one
    out = b.send(to_a, b"n" * 65, 5.0)
    a2 = layer(a_id, 77)  # A lost the session
    _, challenge = deliver(a2, out, B_ADDR, 5.0)
    _, hs = deliver(b, challenge, A_ADDR, 5.0)
    assert len(hs) == 1
    delivered, _ = deliver(a2, hs, B_ADDR, 5.0)
    assert delivered == [] and a2.stats["handshakes_completed"] == 1 and a2.stats["delivered"] == 0
    got, _ = deliver(a2, b.send(to_a, b"n" * 65, 5.1), B_ADDR, 5.1)
    assert [d.message for d in got] == [b"n" * 65]


def test_restarted_initiator_rehandshakes(pair):
    a_id, a, b_id, b = pair
    a2 = layer(a_id, 99)  # same identity, sessions lost
    first = a2.send(Contact(b_id.public_key, B_ADDR), b"after restart", 10)
    delivered, challenge = deliver(b, first, A_ADDR, 10)
    assert delivered == [] and b.stats["decrypt_failed"] == 1  # B still has the old session
    _, hs = deliver(a2, challenge, B_ADDR, 10)
    assert [d.message for d in deliver(b, hs, A_ADDR, 10)[0]] == [b"after restart"]
    got, _ = deliver(a2, b.send(Contact(a_id.public_key, A_ADDR), b"welcome back", 10), B_ADDR, 10)
    assert [d.message for d in got] == [b"welcome back"]


def test_restarted_recipient_gets_the_message_through_a_new_handshake(pair):
    a_id, a, b_id, b = pair
    b2 = layer(b_id, 98)  # B restarts; A still holds the old session
    out = a.send(Contact(b_id.public_key, B_ADDR), b"still there?", 10)
    _, challenge = deliver(b2, out, A_ADDR, 10)
    _, hs = deliver(a, challenge, B_ADDR, 10)  # answers the last MESSAGE A sent there
    assert [d.message for d in deliver(b2, hs, A_ADDR, 10)[0]] == [b"still there?"]


def test_restarted_recipient_of_several_messages_rehandshakes():
    """B restarts; A sends two messages at once. B challenges the first and drops the second
    (awaiting_handshake); A accepts the challenge to the earlier message and re-handshakes."""
    a_id, b_id = ident(1), ident(2)
    a, b = layer(a_id, 1), layer(b_id, 2)
    handshake(a, A_ADDR, b, b_id, B_ADDR)
    b2 = layer(b_id, 97)
    peer = Contact(b_id.public_key, B_ADDR)
    first, second = a.send(peer, b"m1", 1) + a.send(peer, b"m2", 1)
    _, challenge = deliver(b2, [first], A_ADDR, 1)
    assert b2.receive(second.datagram, A_ADDR, 1) == ((), ())
    assert b2.stats["awaiting_handshake"] == 1
    _, hs = deliver(a, challenge, B_ADDR, 1)
    assert a.stats["unsolicited_whoareyou"] == 0 and len(hs) == 1
    assert [d.message for d in deliver(b2, hs, A_ADDR, 1)[0]] == [b"m2"]  # the last one, again
    assert [d.message for d in deliver(b2, a.send(peer, b"m1", 1.1), A_ADDR, 1.1)[0]] == [b"m1"]


def test_crossing_handshakes_agree_on_one_session():
    """A and B start handshakes with each other at once. Both keep the session the lower node ID
    initiated; messages already sealed under the other one are still read."""
    a_id, b_id = ident(1), ident(2)
    a, b = layer(a_id, 1), layer(b_id, 2)
    to_b, to_a = Contact(b_id.public_key, B_ADDR), Contact(a_id.public_key, A_ADDR)
    random_a, random_b = a.send(to_b, b"a1", 0), b.send(to_a, b"b1", 0)
    _, challenge_for_a = deliver(b, random_a, A_ADDR)
    _, challenge_for_b = deliver(a, random_b, B_ADDR)
    _, handshake_a = deliver(a, challenge_for_a, B_ADDR)  # both now initiate
    _, handshake_b = deliver(b, challenge_for_b, A_ADDR)
    got_b, _ = deliver(b, handshake_a, A_ADDR)
    got_a, _ = deliver(a, handshake_b, B_ADDR)
    assert [d.message for d in got_a] == [b"b1"] and [d.message for d in got_b] == [b"a1"]
    assert a.stats["handshakes_crossed"] + b.stats["handshakes_crossed"] == 1
    # From here on every message is read, both ways, without another handshake.
    for i in range(5):
        assert [d.message for d in deliver(b, a.send(to_b, b"x%d" % i, 0.1), A_ADDR, 0.1)[0]] == [b"x%d" % i]
        assert [d.message for d in deliver(a, b.send(to_a, b"y%d" % i, 0.1), B_ADDR, 0.1)[0]] == [b"y%d" % i]
    for layer_ in (a, b):
        assert layer_.stats["decrypt_failed"] == 0 and layer_.stats["handshakes_initiated"] == 1


def test_messages_sealed_under_the_losing_crossing_session_are_still_read():
    a_id, b_id = ident(1), ident(2)
    a, b = layer(a_id, 1), layer(b_id, 2)
    low, high = (a, b) if a_id.node_id < b_id.node_id else (b, a)
    low_addr, high_addr = (A_ADDR, B_ADDR) if low is a else (B_ADDR, A_ADDR)
    low_id, high_id = (a_id, b_id) if low is a else (b_id, a_id)
    to_high, to_low = Contact(high_id.public_key, high_addr), Contact(low_id.public_key, low_addr)
    _, challenge_for_low = deliver(high, low.send(to_high, b"l1", 0), low_addr)
    _, challenge_for_high = deliver(low, high.send(to_low, b"h1", 0), high_addr)
    _, handshake_low = deliver(low, challenge_for_low, high_addr)
    _, handshake_high = deliver(high, challenge_for_high, low_addr)
    # The higher ID sends more under its own session before it sees the lower's handshake.
    early = high.send(to_low, b"h2", 0) + high.send(to_low, b"h3", 0)
    too_late = high.send(to_low, b"h6", 0)
    deliver(low, handshake_high, high_addr)  # the lower ID keeps its own session
    deliver(high, handshake_low, low_addr)  # the higher ID switches to it
    late = high.send(to_low, b"h4", 0)
    assert [d.message for d in deliver(low, late + early, high_addr)[0]] == [b"h4", b"h2", b"h3"]
    assert low.stats["decrypt_failed"] == 0
    # The losing session is read only for a while (the challenge TTL, 5 s).
    assert deliver(low, too_late, high_addr, 6.0)[0] == []
    assert low.stats["decrypt_failed"] == 1


def test_a_session_the_peer_never_uses_is_dropped():
    """Our HANDSHAKE went to a peer that cannot answer (wrong pinned key, or gone): the session we
    installed for it is dropped after pending_ttl_s; one the peer used stays."""
    a_id, b_id = ident(1), ident(2)
    a, b = layer(a_id, 1), layer(b_id, 2)
    peer = Contact(b_id.public_key, B_ADDR)
    _, challenge = deliver(b, a.send(peer, b"ping", 0), A_ADDR)
    deliver(a, challenge, B_ADDR)  # the HANDSHAKE is lost
    assert a.has_session(b_id.node_id, B_ADDR)
    a.expire(4.0)
    assert a.has_session(b_id.node_id, B_ADDR)
    a.expire(5.5)
    assert not a.has_session(b_id.node_id, B_ADDR) and a.stats["sessions_unconfirmed"] == 1
    # A session the peer answered in is kept.
    delivered, _ = handshake(a, A_ADDR, b, b_id, B_ADDR, now=10.0)
    assert delivered
    deliver(a, b.send(Contact(a_id.public_key, A_ADDR), b"pong", 10.0), B_ADDR, 10.0)
    a.expire(20.0)
    assert a.has_session(b_id.node_id, B_ADDR)


def test_lost_whoareyou_is_retried():
    a_id, b_id = ident(1), ident(2)
    a, b = layer(a_id, 1), layer(b_id, 2)
    peer = Contact(b_id.public_key, B_ADDR)
    a.send(peer, b"one", 0)  # its WHOAREYOU is lost
    retry = a.send(peer, b"two", 1.5)
    assert len(retry) == 1
    _, challenge = deliver(b, retry, A_ADDR, 1.5)
    _, packets = deliver(a, challenge, B_ADDR, 1.5)
    assert [d.message for d in deliver(b, packets, A_ADDR, 1.5)[0]] == [b"one", b"two"]


def test_message_overtaking_its_handshake_does_not_spoil_it():
    """HANDSHAKE and the MESSAGEs sent right after it, reordered on the way: the responder keeps its
    live challenge (no second WHOAREYOU), so the HANDSHAKE still completes; the early MESSAGE is
    dropped as awaiting_handshake and gets through when sent again."""
    a_id, b_id = ident(1), ident(2)
    a, b = layer(a_id, 1), layer(b_id, 2)
    peer = Contact(b_id.public_key, B_ADDR)
    first = a.send(peer, b"one", 0)
    second = a.send(peer, b"two", 0)
    assert second == []  # queued behind the random packet
    _, challenge = deliver(b, first, A_ADDR)
    _, packets = deliver(a, challenge, B_ADDR)
    assert len(packets) == 2  # HANDSHAKE(one), MESSAGE(two)
    handshake_packet, message_packet = packets
    assert b.receive(message_packet.datagram, A_ADDR, 0) == ((), ())  # overtook the handshake
    assert b.stats["awaiting_handshake"] == 1 and b.stats["no_session"] == 1  # the random packet only
    assert [d.message for d in b.receive(handshake_packet.datagram, A_ADDR, 0).delivered] == [b"one"]
    assert b.stats["bad_signature"] == 0 and b.stats["handshakes_completed"] == 1
    again = a.send(peer, b"two", 0.1)
    assert [d.message for d in deliver(b, again, A_ADDR, 0.1)[0]] == [b"two"]


def test_retried_random_packet_gets_the_live_challenge_again():
    """The WHOAREYOU was lost and the initiator sent a new random packet: the responder sends the
    same challenge again (not a new one, which would spoil a HANDSHAKE already on its way)."""
    a_id, b_id = ident(1), ident(2)
    a, b = layer(a_id, 1), layer(b_id, 2)
    peer = Contact(b_id.public_key, B_ADDR)
    _, lost = deliver(b, a.send(peer, b"one", 0), A_ADDR, 0)
    _, challenge = deliver(b, a.send(peer, b"two", 1.5), A_ADDR, 1.5)
    assert challenge[0].datagram == lost[0].datagram
    _, packets = deliver(a, challenge, B_ADDR, 1.5)
    assert [d.message for d in deliver(b, packets, A_ADDR, 1.5)[0]] == [b"one", b"two"]
    # once the challenge has expired, a new random packet gets a fresh one
    a2 = layer(ident(1), 7)
    _, fresh = deliver(b, a2.send(peer, b"three", 10), A_ADDR, 10)
    assert fresh[0].datagram != lost[0].datagram


# --- arbitrary input ---------------------------------------------------------------------------


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=1400))
def test_receive_never_raises_on_arbitrary_bytes(data):
    b = _FUZZ_B
    result = b.receive(data, A_ADDR, 0)
    assert result.delivered == ()
    assert b.stats["internal_error"] == 0


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_receive_never_raises_on_mutated_real_packets(data):
    kind = data.draw(st.sampled_from(sorted(_REAL_PACKETS)))
    packet = bytearray(_REAL_PACKETS[kind])
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "extend"]))
        if op == "flip" and packet:
            i = data.draw(st.integers(0, len(packet) - 1))
            packet[i] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del packet[data.draw(st.integers(0, len(packet))):]
        else:
            packet += data.draw(st.binary(max_size=64))
    for receiver, source in ((_FUZZ_A, B_ADDR), (_FUZZ_B, A_ADDR)):
        result = receiver.receive(bytes(packet), source, 0)
        assert result.delivered == ()
        assert receiver.stats["internal_error"] == 0


def _fuzz_setup():
    a_id, b_id = ident(1), ident(2)
    a, b = layer(a_id, 1), layer(b_id, 2)
    first = a.send(Contact(b_id.public_key, B_ADDR), b"hi", 0)
    _, challenge = deliver(b, first, A_ADDR)
    _, hs = deliver(a, challenge, B_ADDR)
    deliver(b, hs, A_ADDR)
    message = a.send(Contact(b_id.public_key, B_ADDR), b"in session", 0)
    deliver(b, message, A_ADDR)  # delivered once; mutations of it must never be
    # a fresh challenge pending at B and a pending handshake at A, for the WHOAREYOU/HANDSHAKE paths
    a.send(Contact(ident(3).public_key, C_ADDR), b"x", 0)
    packets = {"random": first[0].datagram, "whoareyou": challenge[0].datagram,
               "handshake": hs[0].datagram, "message": message[0].datagram}
    return a, b, packets


_FUZZ_A, _FUZZ_B, _REAL_PACKETS = _fuzz_setup()
