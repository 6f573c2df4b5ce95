"""The serving fast path in pure Python: the executable specification of ``_fastpath.c``.

Same classes and functions, same argument checks, same bytes out, same counters
(``tests/test_fastpath.py`` runs both side by side). ``docs/engine.md`` ("The serving fast path")
says what the responder answers and what it hands back.

- :class:`Cipher`: one session's keys, send counter and replay window; seals and opens MESSAGE
  packets (``docs/protocol.md``, "Packets"), ChaCha20-Poly1305 IETF from libsodium (:mod:`.aead`).
- :class:`Responder`: reads up to ``max_batch`` datagrams from a socket; a MESSAGE in an indexed
  session whose plaintext is a well-formed PING or FIND_NODE is answered at once (the engine's
  token buckets, routing table and own record seq are asked through the hooks), everything else
  goes back in arrival order: ``(0, datagram, source)`` untouched (no session, failed tag, replay,
  other packet kinds), or ``(1, peer, message)`` decrypted, for the engine.
- :func:`recv_batch` / :func:`send_batch`: batch I/O on a connected socket (benchmark clients).
"""

from __future__ import annotations

import logging
import socket
import struct

from . import aead
from .wire import encode_nodes_answer

_log = logging.getLogger(__name__)

__all__ = ["Cipher", "Responder", "REPLAYED", "MAX_BATCH", "recv_batch", "send_batch"]

MAX_BATCH = 64
REPLAYED = object()  # Cipher.open: a counter seen before or older than the window

_ID_BYTES = 20
_MESSAGE_HEAD = 38  # magic 2, version 1, kind 1, nonce 12, authdata length 2, src node ID 20
_TAG = aead.TAG_BYTES
_MAX_PACKET = 1280
_MAX_SEALED_MESSAGE = _MAX_PACKET - _MESSAGE_HEAD - _TAG
_WINDOW_BITS = 1024  # session.REPLAY_WINDOW
_WINDOW_MASK = (1 << _WINDOW_BITS) - 1
_MAX_U64 = (1 << 64) - 1
_MAX_NODES = 20  # wire.MAX_NODES_PER_MESSAGE
_PING_BYTES = 17  # type, request ID, seq
_FIND_NODE_BYTES = 29  # type, request ID, target
_HEAD = b"sd\x01\x00\x00\x00\x00\x00"  # magic, version, KIND_MESSAGE, the nonce's zero prefix
_AUTH_LEN = b"\x00\x14"  # authdata: the 20-byte source node ID
_U64 = struct.Struct(">Q")
_MAX_SEND_RETRIES = 8

COUNTER_NAMES = ("packets_in", "bytes_in", "delivered", "packets_out", "bytes_out",
                 "ping_in", "find_node_in", "pong_out", "nodes_out", "hook_errors")


def _is_counter_message(d: bytes) -> bool:
    return (_MESSAGE_HEAD + _TAG <= len(d) <= _MAX_PACKET and d[:8] == _HEAD
            and d[16:18] == _AUTH_LEN)


class Cipher:
    """``Cipher(send_key, recv_key)``: one session's AEAD keys, send counter and replay window."""

    __slots__ = ("send_key", "recv_key", "send_counter", "recv_max", "_seen")

    def __init__(self, send_key: bytes, recv_key: bytes) -> None:
        send_key, recv_key = bytes(send_key), bytes(recv_key)
        if len(send_key) != 32 or len(recv_key) != 32:
            raise ValueError("send_key and recv_key must be 32 bytes each")
        self.send_key = send_key
        self.recv_key = recv_key
        self.send_counter = 0  # the last counter sealed; the first packet uses 1
        self.recv_max = 0  # the highest counter accepted
        self._seen = 1  # bit d: counter recv_max - d was accepted (counter 0 never is)

    def seal(self, own_id: bytes, message: bytes) -> bytes:
        """The MESSAGE packet of ``message`` under the next send counter."""
        own_id, message = bytes(own_id), bytes(message)
        if len(own_id) != _ID_BYTES:
            raise ValueError("own_id must be 20 bytes")
        if len(message) > _MAX_SEALED_MESSAGE:
            raise ValueError(f"message of {len(message)} bytes does not fit a packet"
                             f" (at most {_MAX_SEALED_MESSAGE})")
        if self.send_counter == _MAX_U64:
            raise OverflowError("the session's send counter is exhausted")
        return self._seal(own_id, message)

    def _seal(self, own_id: bytes, message: bytes) -> bytes:
        self.send_counter += 1
        counter = _U64.pack(self.send_counter)
        header = _HEAD + counter + _AUTH_LEN + own_id
        return header + aead.encrypt(message, header, header[4:16], self.send_key)

    def open(self, packet: bytes) -> bytes | object | None:
        """The plaintext; None if ``packet`` is not a counter MESSAGE or its tag fails; REPLAYED
        for a counter seen before or older than the window. The window moves only after the tag
        verified (docs/protocol.md)."""
        packet = bytes(packet)
        if not _is_counter_message(packet):
            return None
        return self._open(packet)

    def _open(self, packet: bytes) -> bytes | object | None:
        counter = _U64.unpack_from(packet, 8)[0]
        behind = self.recv_max - counter
        if behind >= 0 and (behind >= _WINDOW_BITS or (self._seen >> behind) & 1):
            return REPLAYED
        message = aead.decrypt(packet[_MESSAGE_HEAD:], packet[:_MESSAGE_HEAD], packet[4:16],
                               self.recv_key)
        if message is None:
            return None
        if behind < 0:
            self._seen = ((self._seen << -behind) | 1) & _WINDOW_MASK
            self.recv_max = counter
        else:
            self._seen |= 1 << behind
        return message


class _Entry:
    __slots__ = ("session", "cipher", "peer", "address", "observed", "created",
                 "entered_at")


def _index_key(node_id: bytes, source: tuple) -> bytes | None:
    """node ID || IP (4 or 16 bytes) || port, as the C responder builds it; None for a scoped
    IPv6 source (the index never holds one)."""
    if len(source) == 2:
        return node_id + socket.inet_pton(socket.AF_INET, source[0]) + source[1].to_bytes(2, "big")
    if source[3] or "%" in source[0]:
        return None
    return node_id + socket.inet_pton(socket.AF_INET6, source[0]) + source[1].to_bytes(2, "big")


class Responder:
    """The serving fast path of one socket. See the module docstring and docs/engine.md."""

    def __init__(self, own_id: bytes, admit, enter_table, closest, own_seq, serve, bucket_size: int,
                 session_lifetime_s: float, reenter_s: float) -> None:
        own_id = bytes(own_id)
        if len(own_id) != _ID_BYTES:
            raise ValueError("own_id must be 20 bytes")
        if not all(callable(h) for h in (admit, enter_table, closest, own_seq, serve)):
            raise TypeError("the hooks must be callable")
        if bucket_size < 1:
            raise ValueError("bucket_size must be at least 1")
        self._own_id = own_id
        self._admit, self._enter_table, self._closest = admit, enter_table, closest
        self._own_seq, self._serve = own_seq, serve
        self._bucket_size = int(bucket_size)
        self._lifetime = float(session_lifetime_s)
        self._reenter_s = float(reenter_s)
        self._index: dict[bytes, _Entry] = {}
        self._counters = dict.fromkeys(COUNTER_NAMES, 0)

    def add(self, key: bytes, session, cipher: Cipher, peer, address, observed: bytes,
            created: float) -> None:
        """Index a session: ``key`` is node ID || IP || port (:func:`index_key`)."""
        if not isinstance(key, bytes) or not isinstance(observed, bytes):
            raise TypeError("key and observed must be bytes")
        if not isinstance(cipher, Cipher):
            raise TypeError("cipher must be a Cipher")
        if len(key) not in (_ID_BYTES + 6, _ID_BYTES + 18):
            raise ValueError("key must be node ID || IPv4 or IPv6 address || port")
        entry = _Entry()
        entry.session, entry.cipher, entry.peer, entry.address = session, cipher, peer, address
        entry.observed = observed
        entry.created, entry.entered_at = float(created), -1e300
        self._index[key] = entry

    def remove(self, key: bytes) -> None:
        self._index.pop(key, None)

    def counters(self) -> dict[str, int]:
        return dict(self._counters)

    def indexed(self) -> int:
        return len(self._index)

    def serve_batch(self, sock: socket.socket, now: float, max_batch: int, max_bytes: int,
                    send: bool) -> tuple[list, list, tuple]:
        """Read up to ``max_batch`` datagrams; answer what this path can; return ``(items,
        unsent, udp_counts)``: the rest in arrival order, the answers left for the send queue as
        ``(address, datagram)`` (the session's Address), and ``(datagrams_in, bytes_in, oversize, receive_errors,
        datagrams_out, bytes_out, send_errors)``."""
        if not 1 <= max_batch <= MAX_BATCH or not 1 <= max_bytes <= _MAX_PACKET:
            raise ValueError(f"max_batch must be 1..{MAX_BATCH} and max_bytes 1..{_MAX_PACKET}")
        datagrams_in = bytes_in = oversize = receive_errors = 0
        received: list[tuple[bytes, tuple]] = []
        for _ in range(max_batch):  # recvmmsg(2) in the C module
            try:
                received.append(sock.recvfrom(max_bytes + 1))
            except (BlockingIOError, InterruptedError):
                break
            except OSError:  # e.g. ICMP port unreachable reported on a later read
                if received:
                    break
                receive_errors += 1
        items: list = []
        answers: list[tuple[tuple, object, bytes]] = []  # (source, the session's Address, packet)
        for data, source in received:
            if len(data) > max_bytes:
                oversize += 1
                continue
            datagrams_in += 1
            bytes_in += len(data)
            if not self._serve_one(data, source, now, items, answers):
                items.append((0, data, source))
        datagrams_out = bytes_out = send_errors = sent = retries = 0
        while send and sent < len(answers) and retries < _MAX_SEND_RETRIES:  # sendmmsg(2)
            source, _, packet = answers[sent]
            try:
                sock.sendto(packet, source)
            except BlockingIOError:
                break
            except InterruptedError:
                retries += 1
                continue
            except OSError:  # refused (unreachable, …): UDP gives no guarantee
                send_errors += 1
                retries += 1
            else:
                datagrams_out += 1
                bytes_out += len(packet)
            sent += 1
        unsent = [(address, packet) for _, address, packet in answers[sent:]]
        return items, unsent, (datagrams_in, bytes_in, oversize, receive_errors, datagrams_out,
                               bytes_out, send_errors)

    def _serve_one(self, d: bytes, source: tuple, now: float, items: list, answers: list) -> bool:
        if not _is_counter_message(d):
            return False
        try:
            key = _index_key(d[18:_MESSAGE_HEAD], source)
        except (OSError, ValueError):
            return False
        entry = self._index.get(key) if key is not None else None
        if entry is None:
            return False
        cipher = entry.cipher
        if now - entry.created >= self._lifetime or cipher.send_counter >= _MAX_U64 - 1:
            return False  # the session layer expires it
        plain = cipher._open(d)
        if type(plain) is not bytes:
            return False  # the session layer counts the failure (the window did not move)
        c = self._counters
        c["packets_in"] += 1
        c["bytes_in"] += len(d)
        c["delivered"] += 1
        session = entry.session
        session.last_used = now
        session.touched = True
        ping = len(plain) == _PING_BYTES and plain[0] == 0x01
        find_node = len(plain) == _FIND_NODE_BYTES and plain[0] == 0x03
        if not ping and not find_node:  # another message: the engine's
            items.append((1, entry.peer, plain))
            return True
        try:  # the engine's admission (token buckets), as DhtEngine._on_message applies it
            admitted = bool(self._admit(entry.address, now))
        except Exception:
            self._hook_failed()
            admitted = False
        if not admitted:  # refused (or a failed hook): the engine drops and counts it
            items.append((1, entry.peer, plain))
            return True
        if now - entry.entered_at >= self._reenter_s:
            try:
                self._enter_table(entry.peer, now)
            except Exception:
                self._hook_failed()
            entry.entered_at = now
        reply = self._answer(entry, plain)
        if reply is None or len(answers) >= MAX_BATCH:  # the engine serves it (admitted already)
            try:
                self._serve(entry.peer, plain, now)
            except Exception:
                self._hook_failed()
            return True
        session.last_message = b""  # an answer is not kept for a re-handshake (see the C module)
        packet = cipher._seal(self._own_id, reply)
        answers.append((source, entry.address, packet))
        c["ping_in" if ping else "find_node_in"] += 1
        c["pong_out" if ping else "nodes_out"] += 1
        c["packets_out"] += 1
        c["bytes_out"] += len(packet)
        return True

    def _answer(self, entry: _Entry, plain: bytes) -> bytes | None:
        """PONG or NODES for ``plain``; None when the engine must serve it (its answer does not
        fit one NODES message, a contact cannot be encoded, a hook failed)."""
        if plain[0] == 0x01:  # PING -> PONG(request ID, own record seq, observed address)
            try:
                seq = self._own_seq()
                return b"\x02" + plain[1:9] + _U64.pack(seq) + entry.observed
            except Exception:
                self._hook_failed()
                return None
        try:  # FIND_NODE -> NODES(request ID, total 1, the bucket_size closest contacts)
            contacts = self._closest(plain[9:29], self._bucket_size)
        except Exception:
            self._hook_failed()
            return None
        if type(contacts) is not list or len(contacts) > _MAX_NODES:
            return None
        answer = encode_nodes_answer(plain[1:9], contacts)
        # a contact with a zoned address was left out: the engine answers (as the C module does)
        return answer if answer[10] == len(contacts) else None

    def _hook_failed(self) -> None:
        """A hook raised: a bug on the Python side. Counted and reported (the C module reports it
        through sys.unraisablehook); the engine's own path then handles the message."""
        self._counters["hook_errors"] += 1
        _log.exception("fast path: a hook raised")


def recv_batch(sock: socket.socket, max_count: int, max_bytes: int) -> list[bytes]:
    """Up to ``max_count`` datagrams waiting on a connected socket (recvmmsg(2) in C)."""
    if not 1 <= max_count <= MAX_BATCH or not 1 <= max_bytes <= 65535:
        raise ValueError(f"max_count must be 1..{MAX_BATCH} and max_bytes 1..65535")
    out: list[bytes] = []
    for _ in range(max_count):
        try:
            out.append(sock.recv(max_bytes, socket.MSG_DONTWAIT))
        except BlockingIOError:
            break
        except OSError:
            if out:
                break
            raise
    return out


def send_batch(sock: socket.socket, datagrams: list[bytes]) -> int:
    """Send ``datagrams`` on a connected socket until one would block; how many were sent
    (sendmmsg(2) in C)."""
    if type(datagrams) is not list:
        raise TypeError("datagrams must be a list")
    if any(type(d) is not bytes for d in datagrams):
        raise TypeError("datagrams must be bytes")
    sent = 0
    for datagram in datagrams:
        try:
            sock.send(datagram, socket.MSG_DONTWAIT)
        except BlockingIOError:
            break
        sent += 1
    return sent
