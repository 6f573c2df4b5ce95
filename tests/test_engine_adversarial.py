"""Adversarial input to the sans-IO DHT engine (node.py), driven by hand with a manual ``now``:
forged, tampered, replayed, oversized and truncated datagrams, wrong-key contacts, answers to
requests never sent, and floods. Each must be dropped, counted under its reason in
``stats()["drops"]`` (the session layer's with a ``session.`` prefix), change nothing it must
not (table, store, outstanding requests, events), and never raise."""

from __future__ import annotations

import functools
import hashlib
import random
import struct
from collections import Counter

import nacl.bindings
import nacl.public
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sovereign_discovery.addresses import Address
from sovereign_discovery.events import (ContactAdded, ContactRemoved, LookupFinished,
                                        ProvidersFound, RecordFound)
from sovereign_discovery.identity import Identity, SignaturePurpose
from sovereign_discovery.node import DhtConfig
from sovereign_discovery.records import PeerRecord
from sovereign_discovery.routing import Contact
from sovereign_discovery.session import SessionLimits, hkdf_sha256
from sovereign_discovery.wire import (Announce, FindNode, FindValue, GetProviders, Nodes, Ping,
                                      Pong, Providers, Store, StoreResult, StoreStatus, Value,
                                      capability_key, encode_message)
from tests.test_node import EPOCH, A, B, C, D, Client, Hand, make_engine, of_type

RID = b"\xee" * 8
KIND_WHOAREYOU = 1
STORED, INVALID = StoreStatus.STORED, StoreStatus.INVALID_RECORD


# --- helpers -------------------------------------------------------------------------------------


def ident(tag: int) -> Identity:
    return Identity.from_seed(bytes([tag]) * 32)


def drops(engine) -> Counter:
    return Counter(engine.stats()["drops"])


def received(engine) -> int:
    return sum(engine.stats()["messages_in"].values())


def delta(engine, before: Counter) -> dict:
    """The drop counters that moved since ``before``."""
    after = drops(engine)
    after.subtract(before)
    return {reason: n for reason, n in after.items() if n}


def snapshot(engine) -> tuple:
    """What a dropped input must not change."""
    s = engine.stats()
    return ({bytes(c.node_id): c.address for c in engine.table}, s["store"]["records"],
            s["store"]["providers"], s["outstanding_requests"], s["queries_running"])


def served(config: DhtConfig = DhtConfig()):
    """An engine at A and a scripted client at D that has a session with it and is in its table."""
    hand = Hand()
    engine = hand.add(make_engine(1, A, config=config), A)
    client = hand.add(Client(50), D)
    assert [type(m) for m in ask(hand, client, engine, 0.0, Ping(RID, 0))] == [Pong]
    assert [type(e) for e in engine.events()] == [ContactAdded]
    return hand, engine, client


def ask(hand, client, engine, now: float, *messages) -> list:
    """``client`` sends ``messages`` to the engine at A; the messages it gets back."""
    for message in messages:
        client.send(engine.contact(A), message, now)
    hand.pump(now)
    return client.take()


def sealed(client: Client, engine, message, now: float) -> bytes:
    """The session MESSAGE carrying ``message`` from ``client`` to the engine, not delivered."""
    client.send(engine.contact(A), message, now)
    [(to, datagram)] = client.datagrams_to_send()
    assert to == A
    return datagram


def feed(engine, datagram: bytes, source: Address, now: float) -> list:
    engine.receive_datagram(datagram, source, now)
    return engine.datagrams_to_send()


def run_timers(hand, engine, now: float, until: float) -> float:
    """Drive the engine's timers (and deliver what they send) until nothing is outstanding."""
    while engine.stats()["outstanding_requests"] and now < until:
        hand.pump(now)
        now = engine.next_deadline()
        engine.handle_timer(now)
        hand.pump(now)
    return now


def flip(data: bytes, i: int) -> bytes:
    out = bytearray(data)
    out[i] ^= 0xFF
    return bytes(out)


def random_packet(rng: random.Random, src_id: bytes) -> bytes:
    """A "random packet" (docs/protocol.md, handshake step 1) claiming ``src_id``."""
    return b"sd\x01\x00" + rng.randbytes(12) + struct.pack(">H", 20) + src_id + rng.randbytes(32)


def forge_handshake(whoareyou: bytes, claimed_key: bytes, signer: Identity, recipient_key: bytes,
                    message: bytes, rng: random.Random) -> bytes:
    """A HANDSHAKE built as docs/protocol.md step 3 says, claiming ``claimed_key`` but signed by
    ``signer``: everything else (ephemeral key, session keys, AEAD) is right."""
    sender_id = hashlib.sha256(claimed_key).digest()[:20]
    recipient_id = hashlib.sha256(recipient_key).digest()[:20]
    ephemeral = nacl.public.PrivateKey(rng.randbytes(32))
    public = bytes(ephemeral.public_key)
    secret = nacl.bindings.crypto_scalarmult(
        bytes(ephemeral), nacl.bindings.crypto_sign_ed25519_pk_to_curve25519(recipient_key))
    info = b"sovereign-discovery/v1 session keys" + sender_id + recipient_id
    initiator_key = hkdf_sha256(secret, whoareyou, info, 64)[:32]
    signature = signer.sign(SignaturePurpose.SESSION_HANDSHAKE,
                            hashlib.sha256(whoareyou).digest() + public + recipient_id)
    nonce = rng.randbytes(12)
    header = b"sd\x01\x02" + nonce + struct.pack(">H", 128) + claimed_key + public + signature
    return header + nacl.bindings.crypto_aead_chacha20poly1305_ietf_encrypt(
        message, header, nonce, initiator_key)


def records(owner: Identity, forger: Identity):
    """(genuine, [signed by another key, seq tampered, signature tampered, expired])."""
    good, expired = (PeerRecord.create(owner, addresses=[D], capabilities=["store"], seq=7,
                                       expires_at=int(EPOCH) + ttl) for ttl in (600, -1))
    body = good.encoded[:-64]
    forged = body + forger.sign(SignaturePurpose.PEER_RECORD, body)
    return good, [forged, flip(good.encoded, 40), flip(good.encoded, len(good.encoded) - 1),
                  expired.encoded]


@functools.lru_cache(maxsize=1)
def captured_handshake() -> tuple[bytes, bytes]:
    """Client(50)'s random packet to make_engine(1) at A, and the HANDSHAKE (carrying a PING)
    answering that engine's WHOAREYOU. The engine is seeded, so every fresh copy fed the same
    random packet issues the same challenge, which this HANDSHAKE answers (the WHOAREYOU path:
    the client's 0-RTT is off)."""
    engine, client = make_engine(1, A), Client(50, SessionLimits(zero_rtt=False))
    client.send(engine.contact(A), Ping(RID, 0), 0.0)
    [(_, first)] = client.datagrams_to_send()
    [(_, whoareyou)] = feed(engine, first, D, 0.0)
    client.receive_datagram(whoareyou, A, 0.0)
    [(_, handshake)] = client.datagrams_to_send()
    return first, handshake


def challenged_engine():
    engine = make_engine(1, A)
    [(to, whoareyou)] = feed(engine, captured_handshake()[0], D, 0.0)
    assert to == D and whoareyou[3] == KIND_WHOAREYOU
    return engine


# --- 1. forgeries --------------------------------------------------------------------------------


def test_handshake_signed_by_another_key_than_it_claims_is_dropped():
    engine, victim, attacker = make_engine(1, A), ident(11), ident(12)
    rng, engine_key = random.Random(1), engine.contact(A).public_key
    ping = encode_message(Ping(RID, 0))
    [(to, whoareyou)] = feed(engine, random_packet(rng, victim.node_id), C, 0.0)
    assert to == C and whoareyou[3] == KIND_WHOAREYOU
    before, snap = drops(engine), snapshot(engine)
    forged = forge_handshake(whoareyou, victim.public_key, attacker, engine_key, ping, rng)
    assert feed(engine, forged, C, 0.0) == []
    assert delta(engine, before) == {"session.bad_signature": 1}
    assert engine.stats()["sessions"] == 0 and received(engine) == 0
    assert snapshot(engine) == snap and engine.events() == []
    # Control: the same construction signed by the key's holder is accepted.
    [(_, whoareyou)] = feed(engine, random_packet(rng, victim.node_id), C, 1.0)
    genuine = forge_handshake(whoareyou, victim.public_key, victim, engine_key, ping, rng)
    assert [to for to, _ in feed(engine, genuine, C, 1.0)] == [C]  # the PONG
    assert victim.node_id in engine.table


def test_message_claiming_another_node_id_is_not_delivered():
    hand, engine, victim = served()
    mallory = hand.add(Client(51), C)
    ask(hand, mallory, engine, 0.0, Ping(b"\x01" * 8, 0))
    engine.events()
    datagram = bytearray(sealed(mallory, engine, Ping(b"\x02" * 8, 0), 1.0))
    datagram[18:38] = victim.identity.node_id  # the header (associated data) claims the victim
    before, snap, n_in = drops(engine), snapshot(engine), received(engine)
    for source in (C, D):  # from Mallory's own address, and spoofing the victim's
        for _, out in feed(engine, bytes(datagram), source, 1.0):
            assert out[3] == KIND_WHOAREYOU  # a challenge at most, never an answer
    assert delta(engine, before) == {"session.no_session": 1, "session.decrypt_failed": 1}
    assert received(engine) == n_in and snapshot(engine) == snap and engine.events() == []
    assert ask(hand, victim, engine, 1.0, Ping(b"\x03" * 8, 0)) == [Pong(b"\x03" * 8, 0, D)]


def store_and_announce(hand, engine, client, raws: list[bytes], now: float) -> list:
    """STORE and ANNOUNCE (under "store") each record as ``client``; the answers."""
    key, cap = client.identity.node_id, capability_key("store")
    return ask(hand, client, engine, now, *(m for i, raw in enumerate(raws) for m in (
        Store(bytes([1, i]) * 4, key, raw), Announce(bytes([2, i]) * 4, cap, raw))))


def test_forged_tampered_and_expired_records_are_refused_by_store_and_announce():
    hand, engine, client = served()
    good, bad = records(client.identity, ident(13))
    before, snap = drops(engine), snapshot(engine)
    answers = store_and_announce(hand, engine, client, bad, 1.0)
    assert [(type(a), a.status) for a in answers] == [(StoreResult, INVALID)] * 2 * len(bad)
    assert snapshot(engine) == snap and engine.events() == []
    assert engine.store.get(client.identity.node_id, EPOCH + 1) is None
    assert engine.store.providers(capability_key("store"), EPOCH + 1, 20) == []
    assert set(delta(engine, before)) <= {"invalid_record_received"}  # counted: see the next test
    answers = store_and_announce(hand, engine, client, [good.encoded], 1.0)  # control
    assert [a.status for a in answers] == [STORED, STORED]


def test_forged_records_in_store_and_announce_are_counted():
    hand, engine, client = served()
    bad = records(client.identity, ident(13))[1]
    before = drops(engine)
    store_and_announce(hand, engine, client, bad, 1.0)
    assert delta(engine, before) == {"invalid_record_received": 2 * len(bad)}


def test_forged_and_tampered_records_in_value_and_providers_answers_are_dropped():
    hand, engine, client = served()  # the client is the engine's only peer: every lookup asks it
    owner = ident(14)
    good, bad = records(owner, ident(13))
    off_key = PeerRecord.create(ident(15), addresses=[C], capabilities=["relay"], seq=1,
                                expires_at=int(EPOCH) + 600)  # valid; not owner's, no "store"
    before, snap = drops(engine), snapshot(engine)
    for raw in bad + [off_key.encoded, good.encoded]:
        engine.find_record(owner.node_id, 1.0)
        hand.pump(1.0)
        [request] = client.take()
        assert isinstance(request, FindValue) and request.key == owner.node_id
        ask(hand, client, engine, 1.0, Value(request.request_id, raw))
        lookup, found = engine.events()
        assert isinstance(lookup, LookupFinished) and isinstance(found, RecordFound)
        assert found.record == (good if raw == good.encoded else None)
    engine.find_providers("store", 2.0, count=5)
    hand.pump(2.0)
    [request] = client.take()
    ask(hand, client, engine, 2.0, Providers(request.request_id, 1, bad + [off_key.encoded]))
    [found] = of_type(engine.events(), ProvidersFound)
    assert found.records == ()
    assert delta(engine, before) == {"invalid_record_received": 2 * len(bad) + 2}
    assert snapshot(engine) == snap  # nothing stored, the peer still in the table


def test_fetch_record_accepts_only_a_valid_record_of_the_peer_asked():
    """``fetch_record`` asks the client for the client's own record: forged or tampered records, a
    valid record of another key, or closer nodes instead all give None (the bad records counted);
    only the client's own valid record is returned."""
    hand, engine, client = served()
    peer = client.contact(D)
    own = PeerRecord.create(client.identity, addresses=[D], seq=3, expires_at=int(EPOCH) + 600)
    other = PeerRecord.create(ident(15), addresses=[C], seq=1, expires_at=int(EPOCH) + 600)
    forged = records(ident(16), ident(13))[1]
    before, snap = drops(engine), snapshot(engine)
    answers = [lambda rid, raw=raw: Value(rid, raw) for raw in forged + [other.encoded]]
    answers += [lambda rid: Nodes(rid, 1, ()), lambda rid: Value(rid, own.encoded)]
    for n, answer in enumerate(answers):
        query = engine.fetch_record(peer, 1.0)
        hand.pump(1.0)
        [request] = client.take()
        assert isinstance(request, FindValue) and request.key == peer.node_id
        ask(hand, client, engine, 1.0, answer(request.request_id))
        [found] = engine.events()
        assert isinstance(found, RecordFound) and found.query == query and found.node_id == peer.node_id
        assert found.record == (own if n == len(answers) - 1 else None)
    assert delta(engine, before) == {"invalid_record_received": len(forged) + 1}
    assert snapshot(engine) == snap


# --- 2. tampering (and truncation) ---------------------------------------------------------------


def variants(datagram: bytes, handshake: bool):
    """Every 1-byte flip and every truncation of a MESSAGE or HANDSHAKE, each with the reason it
    must be dropped under (docs/protocol.md). Header: magic 0-1, version 2, kind 3, nonce 4-15,
    authdata_len 16-17. MESSAGE: src_node_id 18-37 (another ID: no session). HANDSHAKE:
    src_public_key 18-49 (another ID: no challenge), ephemeral key 50-81 and id_signature 82-145
    (both signed). Then ciphertext and tag, the whole header being the AEAD's associated data.
    A packet shorter than its header + tag (54 / 162 bytes) is malformed."""
    head = ["bad_magic"] * 2 + ["unknown_version", "unknown_kind"] + ["decrypt_failed"] * 12
    head += ["malformed"] * 2 + (["unknown_challenge"] * 32 + ["bad_signature"] * 96 if handshake
                                 else ["no_session"] * 20)
    for i in range(len(datagram)):
        yield flip(datagram, i), head[i] if i < len(head) else "decrypt_failed"
        yield datagram[:i], "malformed" if i < len(head) + 16 else "decrypt_failed"


def test_every_flip_and_truncation_of_a_session_message_is_dropped_and_counted():
    hand, engine, client = served()
    datagram = sealed(client, engine, FindNode(b"\x05" * 8, bytes(20)), 1.0)  # not delivered
    before, snap, n_in = drops(engine), snapshot(engine), received(engine)
    expected, now = Counter(), 1.0
    for variant, reason in variants(datagram, handshake=False):
        now += 6.0  # past the challenge TTL (5 s): no live challenge left by the last variant
        for _, out in feed(engine, variant, D, now):
            assert out[3] == KIND_WHOAREYOU and len(out) == 42  # a challenge at most
        expected["session." + reason] += 1
    assert delta(engine, before) == expected
    assert received(engine) == n_in and snapshot(engine) == snap and engine.events() == []
    engine.receive_datagram(datagram, D, now)  # the replay window did not move
    hand.pump(now)
    assert [type(m) for m in client.take()] == [Nodes]


def test_every_flip_and_truncation_of_a_handshake_is_dropped_and_counted():
    _, handshake = captured_handshake()
    seen, expected = Counter(), Counter()
    for variant, reason in variants(handshake, handshake=True):
        engine = challenged_engine()  # a fresh challenge each time: one attempt consumes it
        before = drops(engine)
        engine.receive_datagram(variant, D, 0.0)
        moved = delta(engine, before)
        assert sum(moved.values()) == 1, moved
        seen.update(moved)
        expected["session." + reason] += 1
        assert engine.datagrams_to_send() == [] and engine.events() == []
        assert engine.stats()["sessions"] == 0 and len(engine.table) == 0 and received(engine) == 0
    assert seen == expected
    engine = challenged_engine()  # control: the genuine one is accepted
    engine.receive_datagram(handshake, D, 0.0)
    assert len(engine.table) == 1 and len(engine.datagrams_to_send()) == 1


# --- 3. replays ----------------------------------------------------------------------------------


def test_replayed_request_is_answered_once():
    hand, engine, client = served()
    datagram = sealed(client, engine, Ping(b"\x06" * 8, 0), 1.0)
    assert len(feed(engine, datagram, D, 1.0)) == 1
    before, snap, n_in = drops(engine), snapshot(engine), received(engine)
    assert feed(engine, datagram, D, 1.0) == [] and feed(engine, datagram, D, 30.0) == []
    assert delta(engine, before) == {"session.replayed": 2}
    assert received(engine) == n_in and snapshot(engine) == snap and engine.events() == []


def test_replayed_handshake_is_dropped():
    first, handshake = captured_handshake()
    engine = challenged_engine()
    assert len(feed(engine, handshake, D, 0.0)) == 1  # the PONG
    engine.events()
    before, snap = drops(engine), snapshot(engine)
    for source, now in ((D, 0.0), (D, 1.0), (C, 1.0)):
        assert feed(engine, handshake, source, now) == []
    assert delta(engine, before) == {"session.unknown_challenge": 3}
    # With a fresh challenge for the same peer (its random packet replayed too), the old
    # HANDSHAKE's signature covers the old challenge: it does not verify.
    [(_, whoareyou)] = feed(engine, first, D, 2.0)
    assert whoareyou[3] == KIND_WHOAREYOU and feed(engine, handshake, D, 2.0) == []
    assert delta(engine, before) == {"session.unknown_challenge": 3,
                                     "session.decrypt_failed": 1, "session.bad_signature": 1}
    assert engine.stats()["messages_in"]["ping"] == 1 and engine.stats()["sessions"] == 1
    assert snapshot(engine) == snap and engine.events() == []


def test_replayed_duplicate_and_late_answers_are_dropped():
    hand, engine, client = served()
    engine.find_node(b"\x07" * 20, 1.0)
    hand.pump(1.0)
    [request] = client.take()
    answer = sealed(client, engine, Nodes(request.request_id, 1, ()), 1.0)
    assert feed(engine, answer, D, 1.0) == []
    assert len(of_type(engine.events(), LookupFinished)) == 1
    before, snap = drops(engine), snapshot(engine)
    assert feed(engine, answer, D, 1.5) == []  # the captured datagram again
    ask(hand, client, engine, 1.5, Nodes(request.request_id, 1, ()))  # the answer sent anew
    assert delta(engine, before) == {"session.replayed": 1, "duplicate_response": 1}
    assert snapshot(engine) == snap and engine.events() == []
    # A request given up (sent, retried at its RTO, abandoned at twice it): its answer is late.
    engine.find_node(b"\x08" * 20, 2.0)
    hand.pump(2.0)
    [request] = client.take()
    rto = engine.rto(client.identity.node_id)
    engine.handle_timer(2.0 + rto)
    hand.pump(2.0 + rto)
    assert client.take() == [request]  # the retry, same ID
    engine.handle_timer(2.0 + 2 * rto)
    assert len(of_type(engine.events(), LookupFinished)) == 1
    before, snap = drops(engine), snapshot(engine)
    ask(hand, client, engine, 2.0 + 3 * rto, Nodes(request.request_id, 1, ()))  # within 2 x 2 RTO
    assert delta(engine, before) == {"late_response": 1}
    assert snapshot(engine) == snap and engine.events() == []


# --- 4. oversized --------------------------------------------------------------------------------


def test_oversized_datagrams_are_dropped_unanswered():
    hand, engine, client = served()
    rng = random.Random(4)
    real = sealed(client, engine, Ping(b"\x09" * 8, 0), 1.0)
    big = [real + bytes(1281 - len(real)), rng.randbytes(1281),
           b"sd\x01\x02" + rng.randbytes(2000), rng.randbytes(65_507)]
    before, snap = drops(engine), snapshot(engine)
    for datagram in big:
        for source in (D, C):  # the session's address and an unknown one
            assert feed(engine, datagram, source, 1.0) == []
    assert delta(engine, before) == {"session.too_large": 2 * len(big)}
    assert snapshot(engine) == snap and engine.events() == []
    assert len(feed(engine, real, D, 1.0)) == 1  # the genuine packet is still answered


# --- 5. wrong-key contacts -----------------------------------------------------------------------


def test_contact_with_a_wrong_key_for_its_address_fails_and_never_enters_the_table():
    hand = Hand()
    engine = hand.add(make_engine(1, A), A)
    real = hand.add(make_engine(2, B), B)  # the node actually at B
    helper = hand.add(Client(50), C)
    impostor = ident(16)  # nobody holds it at B
    ask(hand, helper, engine, 0.0, Ping(RID, 0))
    engine.events()
    real_before = drops(real)
    engine.find_node(impostor.node_id, 1.0)
    hand.pump(1.0)
    [request] = helper.take()
    ask(hand, helper, engine, 1.0, Nodes(request.request_id, 1, [Contact(impostor.public_key, B)]))
    assert engine.stats()["outstanding_requests"] == 1  # towards B, handshaking to the wrong key
    run_timers(hand, engine, 1.0, 30.0)
    [finished] = of_type(engine.events(), LookupFinished)
    assert finished.closest == (helper.contact(C),)  # the impostor failed
    assert impostor.node_id not in engine.table and real.node_id not in engine.table
    assert engine.node_id not in real.table and received(real) == 0
    # B's node cannot answer a handshake made towards another key: the signature covers its ID.
    moved = delta(real, real_before)
    assert moved["session.bad_signature"] >= 1
    assert set(moved) <= {"session.bad_signature", "session.no_session", "session.initiate_stale"}


def test_bootstrap_towards_a_wrong_key_puts_nothing_in_the_table():
    hand = Hand()
    real = hand.add(make_engine(2, B), B)
    engine = hand.add(make_engine(3, D), D)
    before = drops(engine)
    now = 0.0
    for key in (ident(16).public_key, bytes(32)):  # another node's key; a key that is no key
        now += 10.0
        query = engine.bootstrap([Contact(key, B)], now)
        now = run_timers(hand, engine, now, now + 60.0)
        [finished] = of_type(engine.events(), LookupFinished)
        assert finished.query == query and finished.closest == ()
        assert len(engine.table) == 0 and len(real.table) == 0 and received(engine) == 0
    assert real.stats()["drops"]["session.bad_signature"] >= 1
    assert delta(engine, before)["session.bad_key"] >= 1  # the all-zero key cannot be used
    engine.bootstrap([real.contact(B)], now + 10.0)  # control: the right key works
    hand.pump(now + 10.0)
    assert real.node_id in engine.table


# --- 6. answers to requests never sent -----------------------------------------------------------


def answers(rid: bytes, record: bytes) -> dict:
    return {Pong: Pong(rid, 0, D), Nodes: Nodes(rid, 1, ()), Value: Value(rid, record),
            StoreResult: StoreResult(rid, STORED), Providers: Providers(rid, 1, [record])}


def test_answers_with_unknown_ids_other_peers_or_wrong_types_are_unsolicited():
    hand, engine, x = served()
    y = hand.add(Client(51), C)
    ask(hand, y, engine, 0.0, Ping(RID, 0))
    engine.events()  # x and y are in the table: inserting them again emits nothing
    record = records(ident(14), ident(13))[0].encoded  # valid, and listing "store"
    engine.bootstrap([x.contact(D)], 1.0)
    engine.find_record(ident(14).node_id, 1.0)
    engine.find_providers("store", 1.0)
    hand.pump(1.0)
    asked = {type(m): m.request_id for m in x.take()}
    assert set(asked) == {Ping, FindNode, FindValue, GetProviders} and len(y.take()) == 2
    expected = {Ping: {Pong}, FindNode: {Nodes}, FindValue: {Value, Nodes},
                GetProviders: {Providers, Nodes}}
    bogus = [(x, m) for m in answers(b"\xaa" * 8, record).values()]  # unknown ID
    bogus += [(y, answers(asked[request], record)[kind]) for request, kind in (  # another peer
        (Ping, Pong), (FindNode, Nodes), (FindValue, Value), (GetProviders, Providers),
        (Ping, StoreResult))]
    bogus += [(x, m) for request, rid in asked.items()  # right ID and peer, wrong type
              for kind, m in answers(rid, record).items() if kind not in expected[request]]
    assert len(bogus) == 5 + 5 + 14
    before, snap = drops(engine), snapshot(engine)
    for peer, message in bogus:
        peer.send(engine.contact(A), message, 1.0)
    hand.pump(1.0)
    assert delta(engine, before) == {"unsolicited_response": 24}
    assert snapshot(engine) == snap and engine.events() == []
    assert engine.store.get(ident(14).node_id, EPOCH + 1) is None
    # The requests survived: the right answer is taken once (a second is a duplicate); and a
    # multi-part answer must keep its first part's type.
    rid = asked[GetProviders]
    ask(hand, x, engine, 1.0, Pong(asked[Ping], 0, D), Pong(asked[Ping], 0, D),
        Nodes(rid, 2, ()), Providers(rid, 2, [record]))
    assert delta(engine, before) == {"unsolicited_response": 25, "duplicate_response": 1}
    assert not of_type(engine.events(), ProvidersFound)


def test_a_dropped_answer_does_not_add_its_sender_to_the_table():
    hand = Hand()
    engine = hand.add(make_engine(1, A), A)
    stranger = hand.add(Client(52), C)
    ask(hand, stranger, engine, 0.0, Pong(b"\xaa" * 8, 0, A))
    assert engine.stats()["drops"]["unsolicited_response"] == 1
    assert engine.events() == [] and stranger.identity.node_id not in engine.table


# --- 7. floods -----------------------------------------------------------------------------------


def test_requests_from_one_ip_are_rate_limited_across_identities_and_ports():
    config = DhtConfig(rate_per_ip_per_s=1.0, burst_per_ip=20.0)
    hand = Hand()
    engine = hand.add(make_engine(1, A, config=config), A)
    sybils = [hand.add(Client(100 + i), Address("198.51.100.7", 5000 + i)) for i in range(10)]
    answered = [len(ask(hand, s, engine, 0.0, *(Ping(bytes([i, j]) * 4, 0) for j in range(5))))
                for i, s in enumerate(sybils)]
    assert answered == [5] * 4 + [0] * 6
    assert engine.stats()["drops"]["rate_limited"] == 30
    # A limited request does not let its sender into the table.
    assert {bytes(c.node_id) for c in engine.table} == {s.identity.node_id for s in sybils[:4]}
    assert len(of_type(engine.events(), ContactAdded)) == 4
    polite = hand.add(Client(99), Address("203.0.113.5", 4000))
    assert [type(m) for m in ask(hand, polite, engine, 0.0, Ping(RID, 0))] == [Pong]
    assert engine.stats()["rate_limited_ips"] == 2


def test_tables_stay_capped_under_a_flood_and_a_peer_is_still_served():
    # liveness_recent_s=0: every newcomer for a full bucket asks for a check (the default exempts
    # an oldest entry heard from in the last 15 minutes), so the flood exercises the request cap.
    config = DhtConfig(bucket_size=2, max_outstanding_requests=4, max_rate_limited_ips=16,
                       liveness_recent_s=0)
    hand, engine, client = served(config)
    limits, rng = SessionLimits(), random.Random(7)
    # 1,500 random packets claiming distinct node IDs from 3 hosts: challenges capped per IP.
    for i in range(1500):
        source = Address(f"198.51.100.{1 + i % 3}", rng.randrange(1024, 65536))
        engine.receive_datagram(random_packet(rng, rng.randbytes(20)), source, 1.0)
    # 1,000 arbitrary datagrams and 300 HANDSHAKE-shaped ones from as many addresses.
    for i in range(1300):
        source = Address(f"10.{i % 7}.{i // 250}.{i % 250 + 1}", 4000)
        data = rng.randbytes(rng.randrange(1400)) if i < 1000 else b"sd\x01\x02" + \
            rng.randbytes(12) + struct.pack(">H", 128) + rng.randbytes(rng.randrange(144, 1100))
        engine.receive_datagram(data, source, 1.0)
    engine.datagrams_to_send()
    assert engine.events() == [] and len(engine.table) == 1
    assert engine.stats()["outstanding_requests"] == 0
    # 300 identities complete handshakes and PING from 300 IPs: each full bucket's liveness
    # check is a request, capped by max_outstanding_requests (never answered here).
    for i in range(300):
        sybil, address = Client(1000 + i), Address(f"172.16.{i // 250}.{i % 250 + 1}", 4000)
        sybil.send(engine.contact(A), Ping(RID, 0), 2.0)
        for _ in range(2):
            for _, data in sybil.datagrams_to_send():
                engine.receive_datagram(data, address, 2.0)
            for _, data in [o for o in engine.datagrams_to_send() if o[0] == address]:
                sybil.receive_datagram(data, A, 2.0)
    stats, session = engine.stats(), engine.stats()["session"]
    assert stats["drops"]["internal_error"] == 0 and session["internal_error"] == 0
    assert session["challenges"] <= 3 * limits.max_challenges_per_ip < limits.max_challenges
    assert session["challenges_evicted"] >= 1500 - 3 * limits.max_challenges_per_ip
    assert session["sessions"] == 301 <= limits.max_sessions
    assert session["pending_peers"] <= limits.max_pending_peers
    assert session["unvalidated_addresses"] <= limits.max_unvalidated_addresses
    assert stats["outstanding_requests"] == 4 and stats["drops"]["outstanding_full"] > 0
    assert stats["rate_limited_ips"] == 16 and stats["rtt_entries"] <= config.max_rtt_entries
    assert stats["table_size"] <= 2 * 160 and stats["messages_in"]["ping"] == 301
    # Every datagram was delivered or dropped under exactly one reason (a WHOAREYOU withheld by
    # the amplification rule is counted on top of the drop that provoked it).
    counted = sum(n for reason, n in stats["drops"].items()
                  if reason.startswith("session.") and reason != "session.amplification_limited")
    assert session["packets_in"] == session["delivered"] + counted
    engine.datagrams_to_send()  # the established peer is still answered
    assert ask(hand, client, engine, 3.0, Ping(b"\x0b" * 8, 0)) == [Pong(b"\x0b" * 8, 0, D)]


# --- property: mutated real messages of every type, inside a session or as its packet -----------


def genuine_record() -> PeerRecord:
    return records(ident(14), ident(13))[0]  # Ed25519 is deterministic: the same bytes each time


@functools.lru_cache(maxsize=1)
def corpus() -> tuple[bytes, ...]:
    """The bytes of one real message of each type: requests as a client sends them, answers as
    the engine sent them (decrypted by the client)."""
    hand, engine, client = served()
    owner, good, key = ident(14), genuine_record().encoded, capability_key("store")
    requests = [Ping(RID, 0), FindNode(RID, owner.node_id), Store(RID, owner.node_id, good),
                FindValue(RID, owner.node_id), Announce(RID, key, good), GetProviders(RID, key)]
    got = [encode_message(m) for m in requests + ask(hand, client, engine, 0.0, *requests)]
    assert sorted({m[0] for m in got}) == list(range(1, 12))
    return tuple(got)


ANSWER_TYPES = {0x02, 0x04, 0x06, 0x08, 0x0B}
MUTATION = st.tuples(st.sampled_from(("flip", "set", "insert", "delete", "cut", "rid")),
                     st.integers(0, 1200), st.integers(0, 255))


def mutate(data: bytes, mutations, rids: list[bytes]) -> bytes:
    out = bytearray(data)
    for op, at, value in mutations:
        i = at % (len(out) + 1)
        if op == "flip" and out:
            out[i % len(out)] ^= 1 << (value % 8)
        elif op == "set" and out:
            out[i % len(out)] = value
        elif op == "insert":
            out[i:i] = bytes([value])
        elif op == "delete":
            del out[i:i + 1 + value % 4]
        elif op == "cut":
            del out[i:]
        elif op == "rid" and len(out) >= 9:  # aim at a request the engine is waiting on
            out[1:9] = rids[value % len(rids)]
    return bytes(out[:1118])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(index=st.integers(0, 10), aim=st.integers(0, 3), mutations=st.lists(MUTATION, max_size=4),
       in_packet=st.booleans())
def test_mutated_real_messages_never_raise_and_are_accounted_for(index, aim, mutations, in_packet):
    """Real messages of each type, answers aimed at a request the engine awaits, mutated either
    as plaintext inside a valid session or as the sealed packet."""
    hand, engine, client = served()
    engine.bootstrap([client.contact(D)], 1.0)
    engine.find_record(ident(14).node_id, 1.0)
    engine.find_providers("store", 1.0)
    hand.pump(1.0)
    rids = [m.request_id for m in client.take()]
    assert len(rids) == 4 and engine.stats()["outstanding_requests"] == 4
    engine.events()
    message = corpus()[index]
    if message[0] in ANSWER_TYPES:
        message = message[:1] + rids[aim] + message[9:]
    client.send_raw(engine.contact(A), message if in_packet else mutate(message, mutations, rids),
                    1.0)
    [(_, genuine)] = client.datagrams_to_send()
    datagram = mutate(genuine, mutations, rids) if in_packet else genuine
    before, n_in, session = drops(engine), received(engine), engine.stats()["session"]
    engine.receive_datagram(datagram, D, 1.0)
    engine.datagrams_to_send()
    after = engine.stats()
    assert after["drops"]["internal_error"] == 0 and after["session"]["internal_error"] == 0
    delivered = after["session"]["delivered"] - session["delivered"]
    assert delivered == (datagram == genuine)  # the session layer refuses any change to a packet
    # A delivered message is decoded (and counted by type) or counted as undecodable.
    assert received(engine) - n_in + delta(engine, before).get("undecodable", 0) == delivered
    assert {bytes(c.node_id) for c in engine.table} == {client.identity.node_id}
    # One message answers at most one request and moves at most one lookup (α new requests).
    assert after["store"]["records"] <= 1
    assert after["outstanding_requests"] <= 4 + engine.config.parallelism
    good = genuine_record().encoded
    for event in engine.events():
        assert not isinstance(event, (ContactAdded, ContactRemoved))
        if isinstance(event, RecordFound) and event.record is not None:
            assert event.record.encoded == good  # only the genuine record can be found
        if isinstance(event, ProvidersFound):
            assert all(r.encoded == good for r in event.records)
