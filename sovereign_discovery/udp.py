"""The UDP endpoint under the asyncio driver: the only code that touches sockets.

Why not ``loop.create_datagram_endpoint``: Python 3.11's datagram transport reads each datagram
with ``sock.recvfrom(262144)``, allocating (then shrinking) a 256 KiB buffer per datagram, and
reads one datagram per readiness event. :class:`UdpEndpoint` registers the non-blocking socket with
``loop.add_reader`` and drains up to ``max_batch`` datagrams per event with
``recvfrom(max_datagram_bytes + 1)``: a protocol datagram is at most 1,280 bytes, so a longer one is
seen as such and dropped.

Network trouble never raises out of the endpoint: oversized datagrams, odd source addresses,
receive and send errors are counted in :attr:`UdpEndpoint.stats` and logged (the first of each
kind at INFO). Sends that would block wait in a bounded queue; when it is full the datagram is
dropped and counted, as UDP would drop it anyway. Caller mistakes raise typed errors, using a
closed endpoint raises :class:`~sovereign_discovery.errors.ClosedError`, and a failure to bind
raises :class:`~sovereign_discovery.errors.EndpointError` naming the address and the reason.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import logging
import socket
from collections.abc import Callable

from .addresses import Address, interned_address
from .constants import MAX_DATAGRAM_BYTES
from .errors import ArgumentTypeError, ArgumentValueError, ClosedError, EndpointError
from .fastpath import MAX_BATCH

__all__ = ["UdpEndpoint"]

_log = logging.getLogger(__name__)

#: Entries of each of the two per-process caches below before it starts again.
_MAX_SOURCES = 4096
#: source tuple -> Address (parsing an address with ipaddress costs ~10 µs) and Address ->
#: (host, port) (str() of an ipaddress costs microseconds too). Shared by every endpoint of the
#: process, as their entries are immutable and the same for every socket: a process hosting many
#: nodes holds each peer's once, not once per node. Bounded: a flood of sources costs misses only.
_sources: dict[tuple, Address] = {}
_destinations: dict[Address, tuple] = {}

DatagramHandler = Callable[[bytes, Address], None]


class UdpEndpoint:
    """One bound UDP socket (IPv4 or IPv6) on an asyncio loop. Make one with :meth:`open`."""

    def __init__(self) -> None:  # use UdpEndpoint.open
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handler: DatagramHandler | None = None
        self._address: Address | None = None
        self._bound: tuple[str, int] | None = None
        self._version = 4
        self._max_bytes = MAX_DATAGRAM_BYTES
        self._max_batch = 64
        self._queue: collections.deque[tuple[tuple, bytes]] = collections.deque()
        self._max_queue = 1024
        self._writing = False
        self._logged: set[str] = set()
        #: the serving fast path (use_responder): responder, on_message, clock, on_batch_done
        self._fast: tuple | None = None
        self.stats: dict[str, int] = dict.fromkeys(
            ("datagrams_in", "bytes_in", "datagrams_out", "bytes_out", "dropped_oversize",
             "dropped_bad_source", "dropped_send_queue_full", "receive_errors", "send_errors",
             "handler_errors"), 0)

    @classmethod
    async def open(
        cls,
        host: str,
        port: int,
        on_datagram: DatagramHandler,
        *,
        max_datagram_bytes: int = MAX_DATAGRAM_BYTES,
        max_batch: int = 64,
        max_send_queue: int = 1024,
        receive_buffer_bytes: int = 1 << 20,
    ) -> "UdpEndpoint":
        """Bind ``host:port`` (port 0 picks a free one) and start delivering datagrams to
        ``on_datagram(data, source)`` on the running loop.

        ``receive_buffer_bytes`` asks the kernel for a larger socket buffer (best effort: Linux
        caps it at ``net.core.rmem_max``): answers to parallel lookups arrive in bursts, and the
        default buffer (about 208 KiB on Linux) holds only about 256 small datagrams."""
        if not isinstance(host, str):
            raise ArgumentTypeError(f"host must be an IP address string, not {type(host).__name__}")
        if not isinstance(port, int) or not 0 <= port <= 65535:
            raise ArgumentValueError(f"port must be in 0..65535, not {port!r}")
        if not callable(on_datagram):
            raise ArgumentTypeError("on_datagram must be callable")
        for name, value in (("max_datagram_bytes", max_datagram_bytes), ("max_batch", max_batch),
                            ("max_send_queue", max_send_queue),
                            ("receive_buffer_bytes", receive_buffer_bytes)):
            if not isinstance(value, int) or value < 1:
                raise ArgumentValueError(f"{name} must be an int >= 1, not {value!r}")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # one family per socket
            sock.setblocking(False)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer_bytes)
            except OSError:  # a smaller buffer still works; the kernel keeps its default
                pass
            sock.bind((host, port))
            bound = sock.getsockname()
        except OSError as exc:
            sock.close()
            reason = "address already in use" if exc.errno == errno.EADDRINUSE else exc.strerror or str(exc)
            shown = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
            raise EndpointError(f"cannot bind UDP {shown}: {reason}") from exc
        self = cls()
        self._sock = sock
        self._loop = asyncio.get_running_loop()
        self._handler = on_datagram
        self._max_bytes = max_datagram_bytes
        self._max_batch = max_batch
        self._max_queue = max_send_queue
        self._bound = (bound[0], bound[1])
        self._version = 6 if family == socket.AF_INET6 else 4
        try:  # a wildcard (every interface) or multicast bind is no address a peer can send to
            self._address = Address(bound[0], bound[1])
        except ArgumentValueError:
            self._address = None
        self._loop.add_reader(sock.fileno(), self._read_ready)
        return self

    @property
    def address(self) -> Address | None:
        """The bound address (with the port the system chose for port 0); None when bound to a
        wildcard (``0.0.0.0`` / ``::``), which is no address a peer can send to: see :attr:`bound`."""  # noqa: E501
        if self._bound is None:
            raise ClosedError("the endpoint was never opened")
        return self._address

    @property
    def bound(self) -> tuple[str, int]:
        """``(host, port)`` as bound, wildcards included."""
        if self._bound is None:
            raise ClosedError("the endpoint was never opened")
        return self._bound

    @property
    def version(self) -> int:
        """The IP version of the socket: 4 or 6."""
        return self._version

    @property
    def receive_buffer_bytes(self) -> int:
        """The socket receive buffer the kernel granted (Linux reports twice the usable size)."""
        if self._sock is None:
            raise ClosedError("the UDP endpoint is closed")
        return self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)

    @property
    def closed(self) -> bool:
        return self._sock is None

    # --- receiving ------------------------------------------------------------------------------

    def use_responder(self, responder, on_datagram: DatagramHandler,
                      on_message: Callable[[object, bytes], None], clock: Callable[[], float],
                      on_batch_done: Callable[[], None]) -> None:
        """Read through the serving fast path (docs/engine.md): each readiness event reads one
        batch with ``responder.serve_batch``, which answers what it can; the datagrams it leaves
        go to ``on_datagram(data, source)``, the messages it decrypted and left to the engine to
        ``on_message(peer, message)``, in arrival order, and ``on_batch_done()`` runs once after
        the batch (the driver sends what the engine queued then)."""
        if not all(callable(f) for f in (on_datagram, on_message, clock, on_batch_done)):
            raise ArgumentTypeError("on_datagram, on_message, clock and on_batch_done must be callable")
        if self._max_bytes > MAX_DATAGRAM_BYTES:
            raise ArgumentValueError(f"the fast path reads datagrams of at most {MAX_DATAGRAM_BYTES} bytes")
        self._fast = (responder, on_datagram, on_message, clock, on_batch_done)

    def _read_ready(self) -> None:
        sock, handler, limit = self._sock, self._handler, self._max_bytes
        if sock is None or handler is None:
            return
        if self._fast is not None:
            self._read_batch(sock)
            return
        for _ in range(self._max_batch):
            try:
                data, source = sock.recvfrom(limit + 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. ICMP port unreachable reported on a later read
                self._count("receive_errors", f"receive error: {exc}")
                continue
            if len(data) > limit:
                self._count("dropped_oversize", f"dropped a datagram over {limit} bytes from {source}")
                continue
            self.stats["datagrams_in"] += 1
            self.stats["bytes_in"] += len(data)
            self._handle(handler, data, source)
            if self._sock is None:  # the handler closed us
                return

    def _read_batch(self, sock: socket.socket) -> None:
        responder, handler, on_message, clock, on_batch_done = self._fast
        items, unsent, counts = responder.serve_batch(
            sock, clock(), min(self._max_batch, MAX_BATCH), self._max_bytes, not self._queue)
        datagrams_in, bytes_in, oversize, receive_errors, datagrams_out, bytes_out, send_errors = counts
        stats = self.stats
        stats["datagrams_in"] += datagrams_in
        stats["bytes_in"] += bytes_in
        stats["datagrams_out"] += datagrams_out
        stats["bytes_out"] += bytes_out
        for key, count, message in (
                ("dropped_oversize", oversize, f"dropped a datagram over {self._max_bytes} bytes"),
                ("receive_errors", receive_errors, "receive error"),
                ("send_errors", send_errors, "a send was refused")):
            if count:
                stats[key] += count - 1
                self._count(key, message)
        for address, data in unsent:  # the socket would block: after what already waits
            self._enqueue(self._destination(address), data)
        for kind, first, second in items:
            if kind == 0:  # a datagram the fast path left untouched
                self._handle(handler, first, second)
            else:  # a message it decrypted: (peer, message)
                try:
                    on_message(first, second)
                except Exception:
                    stats["handler_errors"] += 1
                    _log.exception("message handler raised; message from %s dropped", first)
            if self._sock is None:  # the handler closed us
                return
        on_batch_done()

    def _handle(self, handler: DatagramHandler, data: bytes, source: tuple) -> None:
        address = _sources.get(source)
        if address is None:
            try:
                address = interned_address(Address(source[0], source[1]))
            except (ArgumentValueError, ArgumentTypeError):
                self._count("dropped_bad_source", f"dropped a datagram from unusable source {source}")
                return
            if len(_sources) >= _MAX_SOURCES:
                _sources.clear()
            _sources[source] = address
        try:
            handler(data, address)
        except Exception:  # the engine never raises on input; if it does, keep serving others
            self.stats["handler_errors"] += 1
            _log.exception("datagram handler raised; datagram from %s dropped", address)

    # --- sending --------------------------------------------------------------------------------

    def send(self, address: Address, data: bytes) -> bool:
        """Send one datagram. False if it was dropped (send queue full, or the system refused it:
        counted in ``stats``); True if it was sent or queued."""
        if self._sock is None:
            raise ClosedError("the UDP endpoint is closed")
        if not isinstance(address, Address):
            raise ArgumentTypeError(f"address must be an Address, not {type(address).__name__}")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ArgumentTypeError(f"data must be bytes, not {type(data).__name__}")
        if len(data) > self._max_bytes:
            raise ArgumentValueError(f"datagram of {len(data)} bytes exceeds {self._max_bytes}")
        destination = self._destination(address)
        if self._queue:  # keep order behind datagrams already waiting
            return self._enqueue(destination, bytes(data))
        return self._send_now(destination, data)

    def _destination(self, address: Address) -> tuple:
        destination = _destinations.get(address)
        if destination is None:
            destination = address.to_tuple()  # an IPv6 zone, if any, rides in the host string
            if len(_destinations) >= _MAX_SOURCES:
                _destinations.clear()
            _destinations[address] = destination
        return destination

    def _send_now(self, destination: tuple, data: bytes | bytearray | memoryview) -> bool:
        assert self._sock is not None
        try:
            self._sock.sendto(data, destination)
        except (BlockingIOError, InterruptedError):
            return self._enqueue(destination, bytes(data))
        except OSError as exc:  # unreachable network, wrong family, …: UDP gives no guarantee
            self._count("send_errors", f"send to {destination[:2]} failed: {exc}")
            return False
        self.stats["datagrams_out"] += 1
        self.stats["bytes_out"] += len(data)
        return True

    def _enqueue(self, destination: tuple, data: bytes) -> bool:
        if len(self._queue) >= self._max_queue:
            self._count("dropped_send_queue_full", "send queue full; dropping datagrams")
            return False
        self._queue.append((destination, data))
        if not self._writing and self._loop is not None and self._sock is not None:
            self._loop.add_writer(self._sock.fileno(), self._write_ready)
            self._writing = True
        return True

    def _write_ready(self) -> None:
        while self._queue and self._sock is not None:
            destination, data = self._queue[0]
            try:
                self._sock.sendto(data, destination)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._count("send_errors", f"send to {destination[:2]} failed: {exc}")
            else:
                self.stats["datagrams_out"] += 1
                self.stats["bytes_out"] += len(data)
            self._queue.popleft()
        self._stop_writing()

    def _stop_writing(self) -> None:
        if self._writing and self._loop is not None and self._sock is not None:
            self._loop.remove_writer(self._sock.fileno())
        self._writing = False

    # --- closing --------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop reading, drop queued datagrams, close the socket. Idempotent."""
        sock = self._sock
        if sock is None:
            return
        if self._loop is not None:
            self._loop.remove_reader(sock.fileno())
        self._stop_writing()
        self._queue.clear()
        self._sock = None
        sock.close()

    async def __aenter__(self) -> "UdpEndpoint":
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def _count(self, key: str, message: str) -> None:
        self.stats[key] += 1
        if key not in self._logged:
            self._logged.add(key)
            _log.info("%s (further ones at DEBUG; counted in stats[%r])", message, key)
        else:
            _log.debug(message)
