"""0-RTT first contact (docs/protocol.md, "0-RTT first contact"; docs/security.md): INITIATE and
ACCEPT between SessionLayer objects directly, with a manual clock, an injected Unix offset and
seeded randomness (no sockets)."""

from __future__ import annotations

import hashlib
import random
import struct

import nacl.bindings
import nacl.exceptions
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sovereign_discovery import aead
from sovereign_discovery.addresses import Address
from sovereign_discovery.errors import ArgumentTypeError
from sovereign_discovery.fastpath import fastpath_module
from sovereign_discovery.identity import Identity, SignaturePurpose
from sovereign_discovery.routing import Contact
from sovereign_discovery.session import (
    KIND_ACCEPT,
    KIND_INITIATE,
    KIND_MESSAGE,
    KIND_WHOAREYOU,
    MAX_INITIATE_MESSAGE_BYTES,
    MAX_MESSAGE_BYTES,
    MIN_INITIATE_BYTES,
    SessionLayer,
    SessionLimits,
    hkdf_sha256,
)
from sovereign_discovery.sim_session import SimulatedDirectory, SimulatedSessionLayer
from tests.test_session import A_ADDR, B_ADDR, C_ADDR, ident

EPOCH = 1.8e9  # Unix time at virtual time 0
T = 10.0  # every layer starts at 0; an INITIATE is accepted from zero_rtt_ahead_s (5 s) on
SIGNED = 90  # an INITIATE's header before the signature
HEAD = 154  # ... and with it


def layer(identity: Identity, seed: int = 0, *, skew_s: float = 0.0, start: float = 0.0, **limits) -> SessionLayer:
    """A layer whose Unix clock is EPOCH + now (+ skew_s), started at ``start``."""
    rng = random.Random(seed)
    made = SessionLayer(identity, random_bytes=rng.randbytes, limits=SessionLimits(**limits),
                        unix_offset=EPOCH + skew_s)
    made.expire(start)
    return made


def deliver(receiver: SessionLayer, outgoing, source: Address, now: float = T):
    delivered, replies = [], []
    for out in outgoing:
        result = receiver.receive(out.datagram, source, now)
        delivered.extend(d.message for d in result.delivered)
        replies.extend(result.outgoing)
    return delivered, replies


@pytest.fixture
def ab():
    a_id, b_id = ident(1), ident(2)
    return a_id, layer(a_id, 1), b_id, layer(b_id, 2)


def first_contact(a, b, a_id, b_id, message=b"ping", answer=b"pong", now=T):
    """A's first request to B and B's answer: returns (INITIATE, ACCEPT) datagrams."""
    [initiate] = a.send(Contact(b_id.public_key, B_ADDR), message, now)
    got, replies = deliver(b, [initiate], A_ADDR, now)
    assert got == [message] and replies == []
    [accept] = b.send(Contact(a_id.public_key, A_ADDR), answer, now)
    got, replies = deliver(a, [accept], B_ADDR, now)
    assert got == [answer] and replies == []
    return initiate.datagram, accept.datagram


def drops(layer_: SessionLayer) -> dict:
    return {k: v for k, v in layer_.stats.items() if v}


# --- the exchange -------------------------------------------------------------------------------


def test_a_first_request_costs_one_datagram_each_way(ab):
    a_id, a, b_id, b = ab
    initiate, accept = first_contact(a, b, a_id, b_id)
    assert initiate[3] == KIND_INITIATE and len(initiate) == MIN_INITIATE_BYTES == 427
    assert accept[3] == KIND_ACCEPT and accept[4:16] == initiate[4:16]  # it echoes the nonce
    assert a.stats["packets_out"] == b.stats["packets_out"] == 1  # no WHOAREYOU, no HANDSHAKE
    assert a.stats["packets_in"] == b.stats["packets_in"] == 1
    assert b.stats["initiates_accepted"] == 1 and a.stats["initiates_sent"] == 1
    assert a.stats["challenges"] == b.stats["challenges"] == 0
    # the next MESSAGE validates B's view of A's address; sessions agree both ways
    assert b.stats["unvalidated_sessions"] == 1
    for i in range(20):
        assert deliver(b, a.send(Contact(b_id.public_key, B_ADDR), b"a%d" % i, T), A_ADDR)[0] == [b"a%d" % i]
        assert deliver(a, b.send(Contact(a_id.public_key, A_ADDR), b"b%d" % i, T), B_ADDR)[0] == [b"b%d" % i]
    assert b.stats["addresses_validated"] == 1 and b.stats["unvalidated_sessions"] == 0
    sa, sb = a._sessions[(b_id.node_id, B_ADDR)], b._sessions[(a_id.node_id, A_ADDR)]
    assert (sb.send_key, sb.recv_key) == (sa.recv_key, sa.send_key) and sa.send_key != sa.recv_key


def test_session_keys_mix_in_the_accept_token(ab):
    """The session keys are HKDF(secret, salt = INITIATE header before the signature || token):
    not the keys the INITIATE itself was sealed with, which the ACCEPT's token alone changes."""
    a_id, a, b_id, b = ab
    initiate, accept = first_contact(a, b, a_id, b_id)
    token = accept[38:54]
    sb = b._sessions[(a_id.node_id, A_ADDR)]
    message = a.send(Contact(b_id.public_key, B_ADDR), b"x", T)[0].datagram
    shared = nacl.bindings.crypto_scalarmult(b._x25519_secret, initiate[50:82])
    info = b"sovereign-discovery/v1 session keys" + a_id.node_id + b_id.node_id
    k0 = hkdf_sha256(shared, initiate[:SIGNED], info, 64)
    k1 = hkdf_sha256(shared, initiate[:SIGNED] + token, info, 64)
    assert (sb.recv_key, sb.send_key) == (k1[:32], k1[32:]) and k0 != k1
    head = len(initiate) - len(b"ping") - 16  # the header, padding included
    assert aead.decrypt(initiate[head:], initiate[:head], initiate[4:16], k0[:32]) == b"ping"
    assert aead.decrypt(message[38:], message[:38], message[4:16], k0[:32]) is None
    assert aead.decrypt(accept[54:], accept[:54], accept[4:16], k0[32:]) == b"pong"


def test_messages_queued_behind_the_initiate_go_once_the_accept_comes(ab):
    a_id, a, b_id, b = ab
    to_b = Contact(b_id.public_key, B_ADDR)
    [initiate] = a.send(to_b, b"m0", T)
    assert a.send(to_b, b"m1", T) == [] and a.send(to_b, b"m2", T) == []
    assert deliver(b, [initiate], A_ADDR)[0] == [b"m0"]
    accept = b.send(Contact(a_id.public_key, A_ADDR), b"r0", T)
    got, rest = deliver(a, accept, B_ADDR)
    assert got == [b"r0"] and len(rest) == 2 and all(o.datagram[3] == KIND_MESSAGE for o in rest)
    assert deliver(b, rest, A_ADDR)[0] == [b"m1", b"m2"]


def test_a_message_too_large_for_an_initiate_takes_the_whoareyou_path(ab):
    a_id, a, b_id, b = ab
    big = b"L" * (MAX_INITIATE_MESSAGE_BYTES + 1)
    assert MAX_INITIATE_MESSAGE_BYTES + 8 == MAX_MESSAGE_BYTES
    [random_packet] = a.send(Contact(b_id.public_key, B_ADDR), big, T)
    assert random_packet.datagram[3] == KIND_MESSAGE and len(random_packet.datagram) == 70
    _, challenge = deliver(b, [random_packet], A_ADDR)
    _, hs = deliver(a, challenge, B_ADDR)
    assert deliver(b, hs, A_ADDR)[0] == [big]
    # the largest that fits is sent 0-RTT, in a full-size datagram
    c = layer(ident(3), 3)
    [initiate] = c.send(Contact(b_id.public_key, B_ADDR), big[:-1], T)
    assert initiate.datagram[3] == KIND_INITIATE and len(initiate.datagram) == 1280
    assert deliver(b, [initiate], C_ADDR)[0] == [big[:-1]]


# --- forgeries and tampering ---------------------------------------------------------------------


def forge(initiate: bytes, signer: Identity, purpose=SignaturePurpose.SESSION_INITIATE, to: bytes = b"") -> bytes:
    signed = hashlib.sha256(initiate[:SIGNED]).digest() + initiate[50:82] + to
    return initiate[:SIGNED] + signer.sign(purpose, signed) + initiate[HEAD:]


def test_forged_or_misused_signatures_are_dropped_unanswered(ab):
    a_id, a, b_id, b = ab
    [initiate] = a.send(Contact(b_id.public_key, B_ADDR), b"i am A", T)
    packet = initiate.datagram
    m_id = ident(3)
    for forged in (
        forge(packet, m_id, to=b_id.node_id),  # claims A's key, signed by M
        forge(packet, a_id, SignaturePurpose.SESSION_HANDSHAKE, b_id.node_id),  # a handshake signature
        forge(packet, a_id, to=ident(4).node_id),  # A's, but for another node
    ):
        assert b.receive(forged, A_ADDR, T) == ((), ())
    assert b.stats["bad_signature"] == 3 and b.stats["sessions"] == 0 and b.stats["zero_rtt_seen"] == 0
    # A's own is still accepted (nothing was recorded for the forgeries)
    assert deliver(b, [initiate], A_ADDR)[0] == [b"i am A"]


def test_every_flipped_byte_is_dropped_and_the_genuine_packet_still_accepted(ab):
    a_id, a, b_id, b = ab
    [initiate] = a.send(Contact(b_id.public_key, B_ADDR), b"payload", T)
    packet = initiate.datagram
    for i in range(len(packet)):
        tampered = bytearray(packet)
        tampered[i] ^= 0x41
        result = b.receive(bytes(tampered), A_ADDR, T)
        assert result.delivered == (), i
        # only a header the layer cannot tell from a random packet (kind, clock) gets a WHOAREYOU
        assert all(o.datagram[3] == KIND_WHOAREYOU for o in result.outgoing)
    stats = b.stats
    assert stats["delivered"] == 0 and stats["sessions"] == 0 and stats["internal_error"] == 0
    # ciphertext flips fail the tag; padding flips are malformed; the nonce, ephemeral key,
    # timestamp and public key are signed (a timestamp flip may also make it stale)
    assert stats["decrypt_failed"] == len(packet) - HEAD - (MIN_INITIATE_BYTES - HEAD - 16 - len(b"payload"))
    assert stats["malformed"] >= MIN_INITIATE_BYTES - HEAD - 16 - len(b"payload")
    reasons = ("bad_magic", "unknown_version", "unknown_kind", "malformed", "bad_signature", "bad_key",
               "decrypt_failed", "initiate_stale", "no_session", "unsolicited_whoareyou", "unsolicited_accept")
    assert sum(stats[r] for r in reasons) == len(packet)
    assert deliver(b, [initiate], A_ADDR)[0] == [b"payload"]


def test_oversized_truncated_and_badly_padded_initiates_are_malformed(ab):
    a_id, a, b_id, b = ab
    [initiate] = a.send(Contact(b_id.public_key, B_ADDR), b"m", T)
    packet = initiate.datagram
    assert b.receive(packet + bytes(1281 - len(packet)), A_ADDR, T) == ((), ())
    assert b.stats["too_large"] == 1
    for cut in range(len(packet)):
        assert b.receive(packet[:cut], A_ADDR, T).delivered == ()
    assert b.stats["malformed"] == len(packet) and b.stats["internal_error"] == 0
    # padding beyond MIN_INITIATE_BYTES, or an unpadded short one, is not canonical
    longer = packet[:16] + struct.pack(">H", 137 + 7 + 100) + packet[18:HEAD + 7] + bytes(100) + packet[HEAD + 7:]
    assert b.receive(longer, A_ADDR, T) == ((), ()) and b.stats["malformed"] == len(packet) + 1
    assert deliver(b, [initiate], A_ADDR)[0] == [b"m"]


def test_a_small_order_ephemeral_key_is_refused_as_bad_key(ab):
    """An attacker signs an INITIATE (with its own key) whose ephemeral key is a small-order
    point: the X25519 result would be all zero (RFC 7748 §6.1)."""
    _, _, b_id, b = ab
    m_id = ident(5)
    m = layer(m_id, 5)
    [initiate] = m.send(Contact(b_id.public_key, B_ADDR), b"x", T)
    packet = bytearray(initiate.datagram)
    packet[50:82] = bytes(32)
    assert b.receive(forge(bytes(packet), m_id, to=b_id.node_id), C_ADDR, T) == ((), ())
    assert b.stats["bad_key"] == 1 and b.stats["sessions"] == 0


def test_a_peer_key_that_does_not_convert_drops_the_first_message():
    a = layer(ident(1), 1)
    bad = next(bytes([i]) * 32 for i in range(256) if _unconvertible(bytes([i]) * 32))
    assert a.send(Contact(bad, B_ADDR), b"x", T) == []
    assert a.stats["bad_key"] == 1 and a.stats["pending_peers"] == 0 and a.stats["pending_dropped"] == 1


def _unconvertible(key: bytes) -> bool:
    try:
        nacl.bindings.crypto_sign_ed25519_pk_to_curve25519(key)
    except nacl.exceptions.CryptoError:
        return True
    return False


# --- replay -----------------------------------------------------------------------------------


def test_a_replay_within_the_window_is_dropped_unanswered(ab):
    a_id, a, b_id, b = ab
    initiate, _ = first_contact(a, b, a_id, b_id)
    for source, now in ((A_ADDR, T), (A_ADDR, T + 29), (C_ADDR, T + 1)):  # also from another address
        assert b.receive(initiate, source, now) == ((), ())
    assert b.stats["initiate_replayed"] == 3 and b.stats["delivered"] == 1
    assert b.stats["initiates_accepted"] == 1


def test_a_replay_after_the_window_is_stale_and_its_record_is_gone(ab):
    a_id, a, b_id, b = ab
    initiate, _ = first_contact(a, b, a_id, b_id)
    b.expire(T + 30.0)
    assert b.stats["zero_rtt_seen"] == 1  # still within the window
    b.expire(T + 30.002)
    assert b.stats["zero_rtt_seen"] == 0  # left with its timestamp
    result = b.receive(initiate, A_ADDR, T + 30.002)
    assert result.delivered == () and b.stats["initiate_stale"] == 1
    [whoareyou] = result.outgoing  # as a random packet: A no longer waits, so it is unsolicited
    assert a.receive(whoareyou.datagram, B_ADDR, T + 30.002) == ((), ())
    assert a.stats["unsolicited_whoareyou"] == 1


def test_a_replay_to_a_restarted_node_is_refused(ab):
    a_id, a, b_id, b = ab
    initiate, _ = first_contact(a, b, a_id, b_id)
    for restarted_at in (T + 1, T - 4.9):  # B restarts just after, or even 4.9 s before it saw it
        b2 = layer(b_id, 22, start=restarted_at)
        result = b2.receive(initiate, A_ADDR, T + 2)
        assert result.delivered == () and b2.stats["initiate_stale"] == 1 and b2.stats["zero_rtt_seen"] == 0
        assert [o.datagram[3] for o in result.outgoing] == [KIND_WHOAREYOU]


def test_a_restarted_node_accepts_initiates_again_after_the_ahead_window(ab):
    a_id, a, b_id, b = ab
    b2 = layer(b_id, 22, start=T)
    c = layer(ident(3), 3)
    [early] = c.send(Contact(b_id.public_key, B_ADDR), b"early", T + 4.9)
    assert b2.receive(early.datagram, C_ADDR, T + 4.9).delivered == ()  # refused: it falls back
    c2 = layer(ident(3), 33)
    [late] = c2.send(Contact(b_id.public_key, B_ADDR), b"late", T + 5.0)
    assert deliver(b2, [late], C_ADDR, T + 5.0)[0] == [b"late"]


def test_a_replay_to_another_node_fails_its_signature(ab):
    a_id, a, b_id, b = ab
    initiate, _ = first_contact(a, b, a_id, b_id)
    c = layer(ident(3), 3)
    assert c.receive(initiate, A_ADDR, T) == ((), ()) and c.stats["bad_signature"] == 1


# --- fallbacks ------------------------------------------------------------------------------------


@pytest.mark.parametrize("skew_s", [-31.0, 5.1, 3600.0])
def test_a_skewed_clock_falls_back_to_the_handshake_and_delivers_once(skew_s):
    a_id, b_id = ident(1), ident(2)
    a, b = layer(a_id, 1, skew_s=skew_s), layer(b_id, 2)
    to_b = Contact(b_id.public_key, B_ADDR)
    [initiate] = a.send(to_b, b"m0", T)
    assert a.send(to_b, b"m1", T) == []
    got, challenge = deliver(b, [initiate], A_ADDR)
    assert got == [] and b.stats["initiate_stale"] == 1 and challenge[0].datagram[3] == KIND_WHOAREYOU
    assert challenge[0].datagram[4:16] == initiate.datagram[4:16]
    _, packets = deliver(a, challenge, B_ADDR)
    assert a.stats["initiates_fell_back"] == 1 and len(packets) == 2
    assert deliver(b, packets, A_ADDR)[0] == [b"m0", b"m1"]  # each once
    assert b.stats["delivered"] == 2 and b.stats["handshakes_completed"] == 1
    # the WHOAREYOU answered an INITIATE of 427 bytes: well within 3x
    assert b.stats["bytes_out"] <= 3 * len(initiate.datagram)


def test_a_full_record_falls_back_and_empties_as_the_window_moves():
    b_id = ident(2)
    b = layer(b_id, 2, max_zero_rtt_seen=2)
    to_b = Contact(b_id.public_key, B_ADDR)
    peers = [(layer(ident(10 + i), 10 + i), Address("10.0.1.%d" % (i + 1), 5000)) for i in range(4)]
    for peer, address in peers[:2]:
        assert deliver(b, peer.send(to_b, b"in", T), address)[0] == [b"in"]
    peer, address = peers[2]
    [initiate] = peer.send(to_b, b"full", T)
    got, challenge = deliver(b, [initiate], address)
    assert got == [] and b.stats["initiate_cache_full"] == 1 and b.stats["zero_rtt_seen"] == 2
    _, hs = deliver(peer, challenge, B_ADDR)
    assert deliver(b, hs, address)[0] == [b"full"]  # nothing lost
    later = T + 30.01  # the two entries' timestamps have left the window
    peer, address = peers[3]
    assert deliver(b, peer.send(to_b, b"room", later), address, later)[0] == [b"room"]
    assert b.stats["zero_rtt_seen"] == 1


def test_over_the_rate_an_initiate_falls_back():
    b_id = ident(2)
    b = layer(b_id, 2, zero_rtt_per_s=2.0)
    to_b = Contact(b_id.public_key, B_ADDR)
    outcomes = []
    for i in range(4):
        peer = layer(ident(10 + i), 10 + i)
        got, replies = deliver(b, peer.send(to_b, b"x", T), Address("10.0.2.%d" % (i + 1), 5000))
        outcomes.append((got, [o.datagram[3] for o in replies]))
    assert outcomes == [([b"x"], [])] * 2 + [([], [KIND_WHOAREYOU])] * 2
    assert b.stats["initiate_rate_limited"] == 2


def test_zero_rtt_off_is_the_old_handshake_on_either_side():
    a_id, b_id = ident(1), ident(2)
    # off at the sender: a random packet (70 bytes), WHOAREYOU, HANDSHAKE
    a, b = layer(a_id, 1, zero_rtt=False), layer(b_id, 2)
    [first] = a.send(Contact(b_id.public_key, B_ADDR), b"m", T)
    assert first.datagram[3] == KIND_MESSAGE and len(first.datagram) == 70
    _, challenge = deliver(b, [first], A_ADDR)
    _, hs = deliver(a, challenge, B_ADDR)
    assert deliver(b, hs, A_ADDR)[0] == [b"m"] and b.stats["initiates_accepted"] == 0
    # off at the recipient: the INITIATE is answered as a random packet; the handshake carries it
    a, b = layer(a_id, 1), layer(b_id, 2, zero_rtt=False)
    [initiate] = a.send(Contact(b_id.public_key, B_ADDR), b"m", T)
    got, challenge = deliver(b, [initiate], A_ADDR)
    assert got == [] and b.stats["initiate_disabled"] == 1
    _, hs = deliver(a, challenge, B_ADDR)
    assert deliver(b, hs, A_ADDR)[0] == [b"m"] and a.stats["initiates_fell_back"] == 1
    with pytest.raises(ArgumentTypeError):
        SessionLimits(zero_rtt=1)
    with pytest.raises(ArgumentTypeError):
        SessionLayer(a_id, unix_offset="now")


# --- anti-amplification and address validation ------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(first=st.integers(0, MAX_INITIATE_MESSAGE_BYTES), answers=st.lists(st.integers(0, MAX_MESSAGE_BYTES),
                                                                          min_size=1, max_size=6))
def test_answers_to_an_unvalidated_address_stay_within_three_times_what_it_sent(first, answers):
    a_id, b_id = ident(1), ident(2)
    a, b = layer(a_id, 1), layer(b_id, 2)
    [initiate] = a.send(Contact(b_id.public_key, B_ADDR), b"q" * first, T)
    received = len(initiate.datagram)
    assert received >= MIN_INITIATE_BYTES
    deliver(b, [initiate], A_ADDR)
    sent = []
    for size in answers:
        sent += b.send(Contact(a_id.public_key, A_ADDR), b"r" * size, T)
        assert sum(len(o.datagram) for o in sent) <= 3 * received
    assert sent and len(sent[0].datagram) == answers[0] + 70  # one full-size answer always fits
    assert b.stats["amplification_limited"] == len(answers) - len(sent)
    # A's next message proves it received the ACCEPT at its address: no limit from then on
    deliver(a, sent, B_ADDR)
    deliver(b, a.send(Contact(b_id.public_key, B_ADDR), b"next", T), A_ADDR)
    assert b.stats["addresses_validated"] == 1
    for _ in range(5):
        assert len(b.send(Contact(a_id.public_key, A_ADDR), b"r" * MAX_MESSAGE_BYTES, T)) == 1


def test_a_spoofed_initiate_gets_one_bounded_answer_and_its_session_never_validates(ab):
    """M signs an INITIATE with its own key but spoofs the victim's source address: B's answers
    to the victim stay within 3x; M cannot derive the session keys (the token went to the
    victim), so nothing it sends validates the address."""
    _, _, b_id, b = ab
    m_id = ident(6)
    m = layer(m_id, 6)
    victim = Address("10.0.9.9", 9999)
    [initiate] = m.send(Contact(b_id.public_key, B_ADDR), b"q", T)
    deliver(b, [initiate], victim)
    to_victim = [o for _ in range(10) for o in b.send(Contact(m_id.public_key, victim), b"r" * 900, T)]
    assert sum(len(o.datagram) for o in to_victim) <= 3 * len(initiate.datagram) and len(to_victim) == 1
    # M guesses: its pending session has no token, so what it seals opens nothing at B
    for _ in range(3):
        m.send(Contact(b_id.public_key, B_ADDR), b"guess", T + 2)
    assert b.stats["addresses_validated"] == 0


def test_unvalidated_sessions_are_capped_and_do_not_evict_validated_ones():
    b_id = ident(2)
    b = layer(b_id, 2, max_sessions=20, max_unvalidated_sessions=5)
    to_b = Contact(b_id.public_key, B_ADDR)
    friends = []
    for i in range(10):  # validated sessions
        peer, address = layer(ident(30 + i), 30 + i), Address("10.0.3.%d" % (i + 1), 5000)
        deliver(b, peer.send(to_b, b"hi", T), address)
        deliver(peer, b.send(Contact(ident(30 + i).public_key, address), b"ok", T), B_ADDR)
        deliver(b, peer.send(to_b, b"again", T), address)
        friends.append((ident(30 + i).node_id, address))
    attacker = ident(7)
    for i in range(200):  # spoofed INITIATEs, each from another address
        spoofer = layer(attacker, 1000 + i)
        deliver(b, spoofer.send(to_b, b"x", T), Address("10.1.%d.%d" % (i // 250, i % 250 + 1), 6000))
        assert b.stats["unvalidated_sessions"] <= 5 and b.stats["sessions"] <= 20
    assert all(b.has_session(node_id, address) for node_id, address in friends)
    assert b.stats["zero_rtt_seen"] == 210


# --- sessions of one exchange (SessionLimits.unused_session_idle_s) ------------------------------


UNUSED_S = SessionLimits().unused_session_idle_s


def test_a_session_of_one_exchange_is_dropped_on_both_sides_and_the_next_contact_is_0rtt(ab):
    a_id, a, b_id, b = ab
    first_contact(a, b, a_id, b_id)  # A's INITIATE at T; B's session made at T
    for side in (a, b):
        side.expire(T + UNUSED_S - 0.5)
        assert side.stats["sessions"] == 1 and side.stats["sessions_unused"] == 0
    for side in (a, b):
        side.expire(T + UNUSED_S)
        assert side.stats["sessions"] == 0 and side.stats["sessions_unused"] == 1
    assert b.stats["unvalidated_sessions"] == 0 and b.stats["unvalidated_addresses"] == 0
    # what is left of the exchange is nothing: the next request opens a session as the first did
    later = T + UNUSED_S + 1
    [again] = a.send(Contact(b_id.public_key, B_ADDR), b"ping again", later)
    assert again.datagram[3] == KIND_INITIATE
    assert deliver(b, [again], A_ADDR, later)[0] == [b"ping again"]


def test_the_initiator_drops_its_side_first(ab):
    """A counts from its INITIATE, B from its receipt: B never holds a session A has dropped
    unless the INITIATE took no time on the way."""
    a_id, a, b_id, b = ab
    [initiate] = a.send(Contact(b_id.public_key, B_ADDR), b"ping", T)
    deliver(b, [initiate], A_ADDR, T + 0.2)
    deliver(a, b.send(Contact(a_id.public_key, A_ADDR), b"pong", T + 0.2), B_ADDR, T + 0.4)
    a.expire(T + UNUSED_S)
    b.expire(T + UNUSED_S)
    assert a.stats["sessions"] == 0 and b.stats["sessions"] == 1
    b.expire(T + 0.2 + UNUSED_S)
    assert b.stats["sessions"] == 0


@pytest.mark.parametrize("who", ["initiator", "responder", "responder_lost"])
def test_a_session_used_after_its_exchange_is_kept(ab, who):
    """Either side sending once more in the session makes it an ordinary one: kept by both past
    unused_session_idle_s (until session_idle_s without use), and no drop counted."""
    a_id, a, b_id, b = ab
    first_contact(a, b, a_id, b_id)
    if who == "initiator":
        assert deliver(b, a.send(Contact(b_id.public_key, B_ADDR), b"more", T + 1), A_ADDR, T + 1)[0] == [b"more"]
    else:  # B sends once more; A does not answer in the session (yet)
        [more] = b.send(Contact(a_id.public_key, A_ADDR), b"more", T + 1)
        assert more.datagram[3] == KIND_MESSAGE
        if who == "responder":
            assert deliver(a, [more], B_ADDR, T + 1)[0] == [b"more"]
    for side in (a, b):
        side.expire(T + UNUSED_S + 1)
    assert b.stats["sessions"] == 1 and b.stats["sessions_unused"] == 0
    if who != "responder_lost":
        assert a.stats["sessions"] == 1 and a.stats["sessions_unused"] == 0
        assert b.stats["unvalidated_sessions"] == (who == "responder")
    else:  # B's message was lost: A saw nothing after the ACCEPT, its side goes
        assert a.stats["sessions"] == 0 and a.stats["sessions_unused"] == 1
        assert b.stats["unvalidated_sessions"] == 1
    for side in (a, b):
        side.expire(T + 1 + SessionLimits().session_idle_s)
        assert side.stats["sessions"] == 0


def test_an_unused_session_validated_by_the_fast_path_is_kept(ab):
    """The fast path opens MESSAGEs without telling the layer: an unproven session whose cipher
    moved is validated at expiry, not dropped."""
    a_id, a, b_id, b = ab
    first_contact(a, b, a_id, b_id)
    [message] = a.send(Contact(b_id.public_key, B_ADDR), b"served", T + 1)
    session = b._sessions[(a_id.node_id, A_ADDR)]
    assert session.cipher.open(message.datagram) == b"served"  # as the fast path would
    b.expire(T + UNUSED_S)
    assert b.stats["sessions"] == 1 and b.stats["addresses_validated"] == 1
    assert b.stats["sessions_unused"] == 0 and b.stats["unvalidated_sessions"] == 0


# --- crossing, restarts -------------------------------------------------------------------------


def test_crossing_initiates_agree_on_the_lower_ids_session_and_deliver_each_message_once(ab):
    a_id, a, b_id, b = ab
    to_b, to_a = Contact(b_id.public_key, B_ADDR), Contact(a_id.public_key, A_ADDR)
    [from_a] = a.send(to_b, b"a1", T)
    [from_b] = b.send(to_a, b"b1", T)
    got_b, replies_b = deliver(b, [from_a], A_ADDR)
    got_a, replies_a = deliver(a, [from_b], B_ADDR)
    low_got, high_got = (got_a, got_b) if a_id.node_id < b_id.node_id else (got_b, got_a)
    high_replies = replies_b if a_id.node_id < b_id.node_id else replies_a
    assert low_got == [] and len(high_replies) == 1 and high_replies[0].datagram[3] == KIND_ACCEPT
    # the lower one's INITIATE won: the higher one's message rides in its ACCEPT
    got, _ = (deliver(a, replies_b, B_ADDR) if a_id.node_id < b_id.node_id else deliver(b, replies_a, A_ADDR))
    delivered = sorted(got_a + got_b + got)
    assert delivered == [b"a1", b"b1"]
    assert a.stats["handshakes_crossed"] + b.stats["handshakes_crossed"] == 1
    for i in range(5):
        assert deliver(b, a.send(to_b, b"x%d" % i, T), A_ADDR)[0] == [b"x%d" % i]
        assert deliver(a, b.send(to_a, b"y%d" % i, T), B_ADDR)[0] == [b"y%d" % i]
    assert a.stats["decrypt_failed"] == b.stats["decrypt_failed"] == 0


def test_an_initiate_crossing_a_handshake_keeps_one_session():
    """A (0-RTT) and B (0-RTT off, so its first contact is a random packet) start at once."""
    a_id, b_id = ident(1), ident(2)
    a, b = layer(a_id, 1), layer(b_id, 2, zero_rtt=False)
    to_b, to_a = Contact(b_id.public_key, B_ADDR), Contact(a_id.public_key, A_ADDR)
    [initiate] = a.send(to_b, b"a1", T)
    [random_b] = b.send(to_a, b"b1", T)
    _, challenge_for_b = deliver(a, [random_b], B_ADDR)
    got_b, challenge_for_a = deliver(b, [initiate], A_ADDR)  # refused: B's 0-RTT is off
    _, hs_b = deliver(b, challenge_for_b, A_ADDR)
    got_a, after = deliver(a, hs_b, B_ADDR)
    _, hs_a = deliver(a, challenge_for_a, B_ADDR)
    got_b2, _ = deliver(b, after + hs_a, A_ADDR)
    assert sorted(got_a + got_b + got_b2) == [b"a1", b"b1"]
    for i in range(3):
        assert deliver(b, a.send(to_b, b"x%d" % i, T), A_ADDR)[0] == [b"x%d" % i]
        assert deliver(a, b.send(to_a, b"y%d" % i, T), B_ADDR)[0] == [b"y%d" % i]


def test_a_restarted_initiator_opens_a_new_session_by_initiate(ab):
    a_id, a, b_id, b = ab
    first_contact(a, b, a_id, b_id)
    deliver(b, a.send(Contact(b_id.public_key, B_ADDR), b"validate", T), A_ADDR)
    a2 = layer(a_id, 99, start=T)
    [initiate] = a2.send(Contact(b_id.public_key, B_ADDR), b"after restart", T + 1)
    assert initiate.datagram[3] == KIND_INITIATE
    assert deliver(b, [initiate], A_ADDR, T + 1)[0] == [b"after restart"]
    got, _ = deliver(a2, b.send(Contact(a_id.public_key, A_ADDR), b"welcome back", T + 1), B_ADDR, T + 1)
    assert got == [b"welcome back"]


def test_a_restarted_recipient_rehandshakes_through_whoareyou(ab):
    a_id, a, b_id, b = ab
    first_contact(a, b, a_id, b_id)
    b2 = layer(b_id, 98, start=T)
    out = a.send(Contact(b_id.public_key, B_ADDR), b"still there?", T + 1)
    got, challenge = deliver(b2, out, A_ADDR, T + 1)
    assert got == [] and b2.stats["no_session"] == 1
    _, hs = deliver(a, challenge, B_ADDR, T + 1)
    assert deliver(b2, hs, A_ADDR, T + 1)[0] == [b"still there?"]


def test_a_lost_accept_is_retried_through_the_handshake(ab):
    a_id, a, b_id, b = ab
    to_b = Contact(b_id.public_key, B_ADDR)
    [initiate] = a.send(to_b, b"q1", T)
    assert deliver(b, [initiate], A_ADDR)[0] == [b"q1"]
    b.send(Contact(a_id.public_key, A_ADDR), b"lost", T)  # the ACCEPT is lost
    [retry] = a.send(to_b, b"q2", T + 1.5)  # the retry is a random packet
    assert retry.datagram[3] == KIND_MESSAGE and len(retry.datagram) == 70
    _, challenge = deliver(b, [retry], A_ADDR, T + 1.5)
    _, packets = deliver(a, challenge, B_ADDR, T + 1.5)
    assert deliver(b, packets, A_ADDR, T + 1.5)[0] == [b"q1", b"q2"]  # q1 again: the sender's retry


def test_accepts_that_answer_nothing_of_ours_are_dropped(ab):
    a_id, a, b_id, b = ab
    initiate, accept = first_contact(a, b, a_id, b_id)
    assert a.receive(accept, B_ADDR, T) == ((), ())  # replayed: the INITIATE was answered
    c = layer(ident(3), 3)
    [to_c] = a.send(Contact(ident(3).public_key, C_ADDR), b"hi", T)
    deliver(c, [to_c], A_ADDR)
    [accept_c] = c.send(Contact(a_id.public_key, A_ADDR), b"yo", T)
    assert a.receive(accept_c.datagram, B_ADDR, T) == ((), ())  # from the wrong address
    tampered = bytearray(accept_c.datagram)
    tampered[-1] ^= 1
    assert a.receive(bytes(tampered), C_ADDR, T) == ((), ()) and a.stats["decrypt_failed"] == 1
    assert a.stats["unsolicited_accept"] == 2
    assert deliver(a, [accept_c], C_ADDR)[0] == [b"yo"]  # the genuine one still works


def test_a_session_message_overtaking_the_accept_is_dropped_without_a_challenge(ab):
    a_id, a, b_id, b = ab
    [initiate] = a.send(Contact(b_id.public_key, B_ADDR), b"q", T)
    deliver(b, [initiate], A_ADDR)
    to_a = Contact(a_id.public_key, A_ADDR)
    accept, second = b.send(to_a, b"r1", T) + b.send(to_a, b"r2", T)
    assert a.receive(second.datagram, B_ADDR, T) == ((), ()) and a.stats["awaiting_handshake"] == 1
    assert deliver(a, [accept], B_ADDR)[0] == [b"r1"]
    assert deliver(a, [second], B_ADDR)[0] == [b"r2"]  # readable once the token came


# --- the fast path ------------------------------------------------------------------------------


class _Recorder:
    """Stands in for a fastpath.Responder: records what the layer indexes."""

    def __init__(self):
        self.index = {}

    def add(self, key, session, cipher, peer, address, observed, created):
        self.index[key] = cipher

    def remove(self, key):
        self.index.pop(key, None)

    def counters(self):
        return dict.fromkeys(("packets_in", "bytes_in", "delivered", "packets_out", "bytes_out"), 0)


@pytest.mark.parametrize("zero_rtt", [True, False])
def test_sessions_are_indexed_in_the_fast_path_as_handshake_ones_are(zero_rtt):
    a_id, b_id = ident(1), ident(2)
    a, b = layer(a_id, 1, zero_rtt=zero_rtt), layer(b_id, 2, zero_rtt=zero_rtt)
    ra, rb = _Recorder(), _Recorder()
    a.attach_responder(ra)
    b.attach_responder(rb)
    out = a.send(Contact(b_id.public_key, B_ADDR), b"q", T)
    for _ in range(2):
        _, back = deliver(b, out, A_ADDR)
        out, _ = [], None
        if back:
            _, out = deliver(a, back, B_ADDR)
    assert len(rb.index) == 1 and len(ra.index) == 0  # the responder's at once; ours once answered
    deliver(a, b.send(Contact(a_id.public_key, A_ADDR), b"r", T), B_ADDR)
    assert len(ra.index) == 1
    [cipher_b] = rb.index.values()
    [cipher_a] = ra.index.values()
    assert (cipher_a.send_key, cipher_a.recv_key) == (cipher_b.recv_key, cipher_b.send_key)


@pytest.mark.parametrize("kernel", ["c", "python"])
def test_a_message_opened_by_the_fast_path_validates_the_address(ab, kernel):
    """The fast path opens MESSAGEs with the session's cipher; one it opened counts as the
    proof of address (the layer sees the cipher's window moved)."""
    module = fastpath_module(kernel)
    a_id, a, b_id, b = ab
    b._sessions.clear()
    [initiate] = a.send(Contact(b_id.public_key, B_ADDR), b"q", T)
    deliver(b, [initiate], A_ADDR)
    session = b._sessions[(a_id.node_id, A_ADDR)]
    # a cipher of the kernel under test with the session's keys, in the session's place
    session.cipher = module.Cipher(session.cipher.send_key, session.cipher.recv_key)
    deliver(a, b.send(Contact(a_id.public_key, A_ADDR), b"r", T), B_ADDR)
    [message] = a.send(Contact(b_id.public_key, B_ADDR), b"served", T)
    assert session.cipher.open(message.datagram) == b"served"  # as the fast path would
    assert b.stats["addresses_validated"] == 0
    assert len(b.send(Contact(a_id.public_key, A_ADDR), b"x" * MAX_MESSAGE_BYTES, T)) == 1
    assert b.stats["addresses_validated"] == 1 and b.stats["unvalidated_sessions"] == 0


# --- arbitrary input --------------------------------------------------------------------------


def _fuzz_setup():
    a_id, b_id = ident(1), ident(2)
    a, b = layer(a_id, 1), layer(b_id, 2)
    initiate, accept = first_contact(a, b, a_id, b_id)
    a.send(Contact(ident(3).public_key, C_ADDR), b"pending", T)  # an INITIATE of A's waits
    return a, b, {"initiate": initiate, "accept": accept}


_FUZZ_A, _FUZZ_B, _PACKETS = _fuzz_setup()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_initiates_and_accepts_never_raise_nor_deliver(data):
    packet = bytearray(_PACKETS[data.draw(st.sampled_from(sorted(_PACKETS)))])
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "extend", "kind"]))
        if op == "flip" and packet:
            i = data.draw(st.integers(0, len(packet) - 1))
            packet[i] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del packet[data.draw(st.integers(0, len(packet))):]
        elif op == "kind" and len(packet) > 3:
            packet[3] = data.draw(st.sampled_from([KIND_INITIATE, KIND_ACCEPT]))
        else:
            packet += data.draw(st.binary(max_size=64))
    for receiver, source in ((_FUZZ_A, B_ADDR), (_FUZZ_B, A_ADDR), (_FUZZ_A, C_ADDR)):
        now = data.draw(st.floats(0, 100))
        result = receiver.receive(bytes(packet), source, now)
        assert result.delivered == ()
        assert receiver.stats["internal_error"] == 0


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=18, max_size=1300), st.sampled_from([KIND_INITIATE, KIND_ACCEPT]))
def test_arbitrary_bytes_of_the_new_kinds_never_raise(body, kind):
    packet = b"sd\x01" + bytes((kind,)) + body
    for receiver in (_FUZZ_A, _FUZZ_B):
        assert receiver.receive(packet, A_ADDR, T).delivered == ()
        assert receiver.stats["internal_error"] == 0


# --- the simulated layer ------------------------------------------------------------------------


@pytest.mark.parametrize("zero_rtt, frames", [(True, 2), (False, 4)])
def test_the_simulated_layer_models_the_same_round_trips(zero_rtt, frames):
    directory = SimulatedDirectory()
    a_id, b_id = ident(1), ident(2)
    directory.register(Contact(a_id.public_key, A_ADDR))
    directory.register(Contact(b_id.public_key, B_ADDR))
    limits = SessionLimits(zero_rtt=zero_rtt)
    a, b = (SimulatedSessionLayer(a_id, directory, limits=limits), SimulatedSessionLayer(b_id, directory, limits=limits))
    hosts = {A_ADDR: (a, B_ADDR), B_ADDR: (b, A_ADDR)}
    in_flight = [(B_ADDR, o.datagram) for o in a.send(Contact(b_id.public_key, B_ADDR), b"q", 0)]
    moved, answered = 0, []
    while in_flight and moved < 10:
        to, datagram = in_flight.pop(0)
        moved += 1
        receiver, source = hosts[to]
        result = receiver.receive(datagram, source, 0)
        in_flight += [(o.address, o.datagram) for o in result.outgoing]
        for d in result.delivered:
            if d.message == b"q":
                in_flight += [(o.address, o.datagram) for o in b.send(d.peer, b"r", 0)]
            else:
                answered.append(d.message)
    assert answered == [b"r"] and moved == frames
    # the next request costs one frame each way in both modes
    assert len(a.send(Contact(b_id.public_key, B_ADDR), b"q2", 0)) == 1
    assert a.limits.zero_rtt is zero_rtt


# --- through the engine -------------------------------------------------------------------------


def test_engines_meet_by_zero_rtt_on_the_engines_clock():
    """DhtEngine gives the session layer it builds its own ``unix_offset`` (virtual time here), so
    a node's first contact with a running one is 0-RTT end to end."""
    from sovereign_discovery.node import DhtEngine
    from tests.test_node import EPOCH as ENGINE_EPOCH, Hand

    def engine(seed: int, address: Address) -> DhtEngine:
        r = random.Random(seed)
        identity = Identity.from_seed(r.randbytes(32))
        return DhtEngine(identity, random_bytes=r.randbytes, rng=random.Random(seed + 1), now=0.0,
                         unix_offset=ENGINE_EPOCH, advertised_address=address)

    hand = Hand()
    a, b = hand.add(engine(1, A_ADDR), A_ADDR), hand.add(engine(2, B_ADDR), B_ADDR)
    a.bootstrap([b.contact(B_ADDR)], 0.0)
    hand.pump(0.0)  # B has just started: A's INITIATE falls back to the handshake
    assert a.stats()["session"]["initiates_fell_back"] == 1 and a.node_id in b.table
    c = hand.add(engine(3, C_ADDR), C_ADDR)
    c.bootstrap([b.contact(B_ADDR)], T)
    hand.pump(T)
    session = c.stats()["session"]
    assert session["initiates_fell_back"] == 0 and session["initiates_sent"] >= 1
    assert b.stats()["session"]["initiates_accepted"] == 1 and b.stats()["session"]["addresses_validated"] == 1
    assert b.node_id in c.table and c.node_id in b.table


def test_a_raced_copy_of_an_initiate_does_not_move_a_known_contact():
    """An observer copies A's INITIATE and delivers it to B first from another address X: B
    serves the request (it cannot tell), but the contact B holds for A at its proven address stays
    there (node.py, ``unproven_address``); A's own copy is then a replay."""
    from sovereign_discovery.addresses import Address
    from sovereign_discovery.node import DhtEngine
    from tests.test_node import EPOCH as ENGINE_EPOCH, Hand

    x_addr = Address("192.0.2.99", 4000)

    def engine(seed: int, address: Address, now: float = 0.0) -> DhtEngine:
        r = random.Random(seed)
        identity = Identity.from_seed(random.Random(seed).randbytes(32))
        return DhtEngine(identity, random_bytes=r.randbytes, rng=random.Random(seed + 1), now=now,
                         unix_offset=ENGINE_EPOCH, advertised_address=address)

    hand = Hand()
    a, b = hand.add(engine(1, A_ADDR), A_ADDR), hand.add(engine(2, B_ADDR), B_ADDR)
    a.bootstrap([b.contact(B_ADDR)], 0.0)
    hand.pump(0.0)
    assert b.table.get(a.node_id).address == A_ADDR  # proven by the WHOAREYOU handshake
    # A restarts (same key, same address, no session): its first packet to B is an INITIATE.
    restarted = engine(1, A_ADDR, T)
    restarted.ping(b.contact(B_ADDR), T)
    (destination, initiate), = restarted.datagrams_to_send()
    assert destination == B_ADDR and initiate[3] == KIND_INITIATE
    b.receive_datagram(initiate, x_addr, T)  # the raced copy arrives first
    assert b.stats()["session"]["initiates_accepted"] == 1
    assert [d for d, _ in b.datagrams_to_send()] == [x_addr]  # served, within the 3x rule
    assert b.table.get(a.node_id).address == A_ADDR  # not moved to X
    assert b.stats()["drops"]["unproven_address"] == 1
    b.receive_datagram(initiate, A_ADDR, T)  # A's own copy: a replay now
    assert b.stats()["drops"]["session.initiate_replayed"] == 1
    assert b.table.get(a.node_id).address == A_ADDR
