"""The public asyncio DHT node: :class:`DhtNode` runs a :class:`~sovereign_discovery.node.DhtEngine`
over real UDP (docs/dht-node.md).

The driver is thin (docs/engine.md, "Drivers"): each datagram read by a
:class:`~sovereign_discovery.udp.UdpEndpoint` goes to ``engine.receive_datagram`` with the loop's
monotonic clock; then the engine's datagrams are sent, its events resolve the futures of the
awaiting calls, and one ``loop.call_at`` timer is kept armed at ``engine.next_deadline()``. One
socket per address family: the engine's datagrams go out through the socket of their
destination's family.

Usage::

    async with DhtNode(identity, host="127.0.0.1", port=0) as node:
        await node.bootstrap([Contact.parse("…@127.0.0.1:4000")])
        await node.announce()
        record = await node.find_record(node_id)

Errors: caller mistakes raise :class:`~sovereign_discovery.errors.ArgumentTypeError` /
``ArgumentValueError``; a node used before it is started or after it is closed raises
:class:`~sovereign_discovery.errors.ClosedError`; a lookup cut short by its deadline with nothing to
show raises :class:`~sovereign_discovery.errors.LookupTimeoutError` carrying the closest peers it
reached; a bootstrap that no contact answered raises
:class:`~sovereign_discovery.errors.BootstrapError`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence

from .addresses import Address
from .constants import DEFAULT_BUCKET_SIZE
from .errors import (
    ArgumentTypeError,
    ArgumentValueError,
    BootstrapError,
    ClosedError,
    LookupTimeoutError,
)
from .events import (
    Event,
    LookupFinished,
    PingFinished,
    ProvidersFound,
    QueryId,
    RecordAnnounced,
    RecordFound,
)
from .identity import Identity
from .keys import NodeId, check_node_id
from .node import DhtConfig, DhtEngine
from .records import PeerRecord
from .routing import Contact
from .session import SessionLimits
from .udp import UdpEndpoint

__all__ = ["DhtNode"]

_log = logging.getLogger(__name__)

#: Which event ends each kind of call (the others end with LookupFinished alone).
_FINAL_EVENT = {"find_record": RecordFound, "find_providers": ProvidersFound, "announce": RecordAnnounced}
#: Direct requests: no lookup, one event ends the call.
_DIRECT_EVENT = {"ping": PingFinished, "fetch_record": RecordFound}


def _bound_text(endpoint: UdpEndpoint) -> str:
    host, port = endpoint.bound
    return f"[{host}]:{port}" if endpoint.version == 6 else f"{host}:{port}"


def _as_contact(contact: Contact | str) -> Contact:
    """A Contact as given, or parsed from a pinned line (anything else is left to the engine's
    type check)."""
    return Contact.parse(contact) if isinstance(contact, str) else contact


class _Call:
    __slots__ = ("kind", "future", "finished")

    def __init__(self, kind: str, future: asyncio.Future) -> None:
        self.kind = kind
        self.future = future
        self.finished: LookupFinished | None = None


class DhtNode:
    """A Kademlia DHT node on UDP: an async context manager that binds its sockets on entry and
    closes them on exit (or call :meth:`start` and :meth:`close`).

    ``host`` is one IP address to bind, or several (at most one per address family: e.g.
    ``("0.0.0.0", "::")`` for dual stack); ``port`` 0 lets the system choose. The node's record
    advertises ``advertised_address`` if given, else the first bound address unless it is a
    wildcard (``0.0.0.0`` / ``::``: then none until the node's peers report the address they see,
    and a majority of them agree). Without ``advertised_address`` the node also follows those
    reports when they disagree with the bound address (behind a NAT). ``on_event`` is called with every engine event (routing-table
    changes, external-address changes, lookup results) on the loop; it must not block.
    ``fast_path`` (default on) answers PING and FIND_NODE in established sessions through the
    serving fast path (:mod:`sovereign_discovery.fastpath`, docs/engine.md); off, every datagram
    takes the engine's own path (the answers are the same). ``session_limits`` sets the session
    layer's caps and timeouts (:class:`~sovereign_discovery.session.SessionLimits`: 1,000
    sessions, dropped after 10 min idle, by default).
    """

    def __init__(
        self,
        identity: Identity,
        *,
        host: str | Sequence[str] = "127.0.0.1",
        port: int = 0,
        config: DhtConfig = DhtConfig(),
        advertised_address: Address | None = None,
        on_event: Callable[[Event], None] | None = None,
        fast_path: bool = True,
        session_limits: SessionLimits | None = None,
    ) -> None:
        if not isinstance(identity, Identity):
            raise ArgumentTypeError(f"identity must be an Identity, not {type(identity).__name__}")
        hosts = [host] if isinstance(host, str) else list(host) if isinstance(host, (list, tuple)) else None
        if not hosts or not all(isinstance(h, str) for h in hosts):
            raise ArgumentTypeError("host must be an IP address string or a sequence of them")
        try:
            families = [ipaddress.ip_address(h).version for h in hosts]
        except ValueError:
            raise ArgumentValueError(f"host: not an IP address: {hosts}") from None
        if any(ipaddress.ip_address(h).is_multicast for h in hosts):
            raise ArgumentValueError(f"host: a multicast address cannot be bound for the DHT: {hosts}")
        if len(set(families)) != len(families):
            raise ArgumentValueError(f"host: at most one address per family, got {hosts}")
        if isinstance(port, bool) or not isinstance(port, int):
            raise ArgumentTypeError(f"port must be an int, not {type(port).__name__}")
        if not 0 <= port <= 65535:
            raise ArgumentValueError(f"port must be in 0..65535, not {port!r}")
        if not isinstance(config, DhtConfig):
            raise ArgumentTypeError(f"config must be a DhtConfig, not {type(config).__name__}")
        if advertised_address is not None and not isinstance(advertised_address, Address):
            raise ArgumentTypeError(
                f"advertised_address must be an Address, not {type(advertised_address).__name__}")
        if on_event is not None and not callable(on_event):
            raise ArgumentTypeError("on_event must be callable")
        if not isinstance(fast_path, bool):
            raise ArgumentTypeError(f"fast_path must be a bool, not {type(fast_path).__name__}")
        if session_limits is not None and not isinstance(session_limits, SessionLimits):
            raise ArgumentTypeError(
                f"session_limits must be a SessionLimits, not {type(session_limits).__name__}")
        self._identity = identity
        self._hosts = hosts
        self._port = port
        self._config = config
        self._advertised = advertised_address
        self._on_event = on_event
        self._fast_path = fast_path
        self._session_limits = session_limits
        self._engine: DhtEngine | None = None
        self._endpoints: dict[int, UdpEndpoint] = {}  # IP version -> endpoint
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        self._calls: dict[QueryId, _Call] = {}
        self._state = "new"  # new, open, closed
        self._no_route = 0

    # --- life cycle --------------------------------------------------------------------------------

    async def start(self) -> "DhtNode":
        """Bind the sockets and start serving. A node starts once."""
        if self._state != "new":
            raise ClosedError(f"the DHT node is {self._state}; a node starts once")
        self._loop = asyncio.get_running_loop()
        try:
            for host in self._hosts:
                endpoint = await UdpEndpoint.open(host, self._port, self._on_datagram)
                self._endpoints[endpoint.version] = endpoint
        except BaseException:
            for endpoint in self._endpoints.values():
                endpoint.close()
            self._endpoints.clear()
            self._state = "closed"
            raise
        advertised = self._advertised
        if advertised is None:  # the first concrete bound address; none for a wildcard bind
            advertised = next((e.address for e in self._endpoints.values() if e.address), None)
        now = self._loop.time()
        self._engine = DhtEngine(self._identity, config=self._config, random_bytes=os.urandom,
                                 now=now, unix_offset=time.time() - now, advertised_address=advertised,
                                 learn_address=self._advertised is None,
                                 families=tuple(self._endpoints), session_limits=self._session_limits)
        responder = self._engine.make_responder() if self._fast_path else None
        if responder is not None:
            for endpoint in self._endpoints.values():
                endpoint.use_responder(responder, self._on_batched_datagram, self._on_message,
                                       self._loop.time, self._flush_if_open)
        self._state = "open"
        self._arm()
        return self

    async def close(self) -> None:
        """Close the sockets and fail calls still waiting with ClosedError. Idempotent."""
        if self._state == "closed":
            return
        self._state = "closed"
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for endpoint in self._endpoints.values():
            endpoint.close()
        calls, self._calls = self._calls, {}
        for call in calls.values():
            if not call.future.done():
                call.future.set_exception(ClosedError("the DHT node was closed during the call"))

    async def __aenter__(self) -> "DhtNode":
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def closed(self) -> bool:
        return self._state == "closed"

    # --- inspection ----------------------------------------------------------------------------------

    @property
    def identity(self) -> Identity:
        return self._identity

    @property
    def node_id(self) -> NodeId:
        return self._identity.node_id

    @property
    def bound(self) -> list[tuple[str, int]]:
        """``(host, port)`` of each socket, one per family, wildcards included."""
        self._check_open()
        return [endpoint.bound for endpoint in self._endpoints.values()]

    @property
    def addresses(self) -> list[Address]:
        """The addresses peers can reach: the bound ones (with the ports the system chose),
        except that a wildcard socket contributes the advertised address of its family, if the
        node knows one."""
        self._check_open()
        advertised = self._engine.advertised_address if self._engine is not None else None
        out = []
        for endpoint in self._endpoints.values():
            if endpoint.address is not None:
                out.append(endpoint.address)
            elif advertised is not None and advertised.version == endpoint.version:
                out.append(advertised)
        return out

    @property
    def address(self) -> Address:
        """The advertised address if there is one, else the first of :attr:`addresses`. Raises
        ArgumentValueError for a node bound only to wildcards that knows no address yet (give
        it ``advertised_address``, or let its peers tell it: docs/dht-node.md)."""
        self._check_open()
        advertised = self._engine.advertised_address
        if advertised is not None:
            return advertised
        addresses = self.addresses
        if not addresses:
            raise ArgumentValueError(
                f"the node is bound to {', '.join(_bound_text(e) for e in self._endpoints.values())} and knows no "
                "address peers can reach yet: pass advertised_address")
        return addresses[0]

    @property
    def contact(self) -> Contact:
        """This node as others reach it (at :attr:`address`); ``node.contact.pinned`` is its
        pinned line ``<public key>@<host>:<port>`` for others to bootstrap from."""
        return Contact(self._identity.public_key, self.address)

    @property
    def record(self) -> PeerRecord | None:
        """The own signed record last made by :meth:`announce` / :meth:`announce_capability`."""
        return self._open_engine().own_record

    @property
    def engine(self) -> DhtEngine:
        """The sans-IO engine (read it: routing table, store, config; do not drive it)."""
        return self._open_engine()

    def stats(self) -> dict:
        """The engine's :meth:`~sovereign_discovery.node.DhtEngine.stats` (messages in and out,
        drops by reason, table size, session count, …) plus ``udp``: each socket's counters, and
        ``no_route`` (datagrams for a family no socket is bound for)."""
        stats = self._open_engine().stats()
        stats["udp"] = {_bound_text(e): dict(e.stats) for e in self._endpoints.values()}
        stats["no_route"] = self._no_route
        return stats

    # --- calls ---------------------------------------------------------------------------------------

    async def bootstrap(self, contacts: Iterable[Contact | str], *, deadline_s: float | None = None) -> list[Contact]:
        """Join through ``contacts`` (:class:`Contact` objects or pinned lines
        ``<public key>@<host>:<port>``): each is asked in parallel over an authenticated session
        (a peer that cannot prove the pinned key never answers), then a self-lookup fills the
        table. Returns the closest peers found. Raises BootstrapError if no contact answered."""
        engine = self._open_engine()
        if isinstance(contacts, (str, bytes)) or not isinstance(contacts, Iterable):
            raise ArgumentTypeError(f"contacts must be an iterable of Contact, not {type(contacts).__name__}")
        parsed = [_as_contact(c) for c in contacts]
        if not parsed:
            raise ArgumentValueError("bootstrap needs at least one contact")
        now = self._now()
        finished = await self._call("bootstrap", engine.bootstrap(parsed, now, deadline_s=deadline_s))
        if not finished.closest and len(engine.table) == 0:
            raise BootstrapError(f"none of the {len(parsed)} bootstrap contacts answered "
                                 f"({', '.join(str(c.address) for c in parsed[:5])})")
        return list(finished.closest)

    async def find_closest(self, target: bytes, *, deadline_s: float | None = None) -> list[Contact]:
        """The k peers closest to ``target`` that answered, nearest first. Raises
        LookupTimeoutError (with the closest reached) if the deadline cut the lookup short."""
        engine = self._open_engine()
        target = check_node_id("target", target)
        finished = await self._call("find_node", engine.find_node(target, self._now(), deadline_s=deadline_s))
        if finished.timed_out:
            raise LookupTimeoutError(f"lookup of {target.short()}… timed out", closest=finished.closest)
        return list(finished.closest)

    async def find_record(self, node_id: bytes, *, deadline_s: float | None = None,
                          quorum: int | None = None) -> PeerRecord | None:
        """The verified record of ``node_id`` with the highest ``seq`` among the first ``quorum``
        valid records received (``DhtConfig.record_quorum``, 1, by default; 0 = every record
        until the lookup ends; the target's own answer ends it), or None when the lookup
        completed without one. Raises LookupTimeoutError if the deadline cut it short with no
        record in hand."""
        engine = self._open_engine()
        node_id = check_node_id("node_id", node_id)
        found, finished = await self._call(
            "find_record", engine.find_record(node_id, self._now(), deadline_s=deadline_s, quorum=quorum))
        if found.record is None and finished is not None and finished.timed_out:
            raise LookupTimeoutError(f"record lookup of {node_id.short()}… timed out", closest=finished.closest)
        return found.record

    async def find_providers(self, capability: str, *, count: int = DEFAULT_BUCKET_SIZE,
                             deadline_s: float | None = None) -> list[PeerRecord]:
        """Verified records of peers announcing ``capability`` (at most ``count``). Raises
        LookupTimeoutError if the deadline cut the lookup short with none in hand."""
        engine = self._open_engine()
        query = engine.find_providers(capability, self._now(), count, deadline_s=deadline_s)
        found, finished = await self._call("find_providers", query)
        if not found.records and finished is not None and finished.timed_out:
            raise LookupTimeoutError(f"provider lookup of {capability!r} timed out", closest=finished.closest)
        return list(found.records)

    async def ping(self, contact: Contact | str) -> float | None:
        """PING ``contact`` (a :class:`Contact` or a pinned line) over an authenticated session:
        the round-trip time in seconds if it answered (it then holds its key at that address and
        is in the routing table), else None. Takes at most about twice the request timeout."""
        engine = self._open_engine()
        finished = await self._call("ping", engine.ping(_as_contact(contact), self._now()))
        return finished.rtt_s if finished.answered else None

    async def fetch_record(self, contact: Contact | str) -> PeerRecord | None:
        """Ask ``contact`` directly for its own signed record (one FIND_VALUE): the verified
        record, or None if it did not answer or holds none. See :meth:`find_record` to search."""
        engine = self._open_engine()
        found = await self._call("fetch_record", engine.fetch_record(_as_contact(contact), self._now()))
        return found.record

    async def announce(self, *, deadline_s: float | None = None) -> int:
        """Sign a new own record and STORE it at the k closest peers of the own ID (and keep it
        published: it is re-signed and stored again at half its TTL). Returns how many stored
        it; ``deadline_s`` bounds the lookup for those peers."""
        engine = self._open_engine()
        announced, _ = await self._call("announce", engine.announce_record(self._now(), deadline_s=deadline_s))
        return announced.stored_at

    async def announce_capability(self, name: str, *, deadline_s: float | None = None) -> int:
        """Add ``name`` to the own record's capabilities and ANNOUNCE it at the k closest peers of
        the capability's key (after :meth:`announce`, the re-signed record is stored under the own
        ID again too). Returns how many stored the announcement."""
        engine = self._open_engine()
        query = engine.announce_capability(name, self._now(), deadline_s=deadline_s)
        announced, _ = await self._call("announce", query)
        return announced.stored_at

    # --- driver --------------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._state != "open":
            raise ClosedError("the DHT node is closed" if self._state == "closed"
                              else "the DHT node is not started: use 'async with DhtNode(...)' or await start()")

    def _open_engine(self) -> DhtEngine:
        self._check_open()
        assert self._engine is not None
        return self._engine

    def _now(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    async def _call(self, kind: str, query: QueryId):
        assert self._loop is not None
        call = _Call(kind, self._loop.create_future())
        self._calls[query] = call
        self._flush()  # the command queued datagrams, and may have finished at once
        return await call.future

    def _on_datagram(self, data: bytes, source: Address) -> None:
        if self._state == "open":
            self._engine.receive_datagram(data, source, self._loop.time())  # never raises
            self._flush()

    def _on_batched_datagram(self, data: bytes, source: Address) -> None:  # flushed per batch
        if self._state == "open":
            self._engine.receive_datagram(data, source, self._loop.time())  # never raises

    def _on_message(self, peer: Contact, message: bytes) -> None:
        if self._state == "open":
            self._engine.receive_message(peer, message, self._loop.time())  # never raises

    def _flush_if_open(self) -> None:
        if self._state == "open":
            self._flush()

    def _on_timer(self) -> None:
        due = self._timer_at
        self._timer = None
        self._timer_at = float("inf")
        if self._state != "open":
            return
        # asyncio may run a timer up to its clock resolution early: the deadline has come.
        self._engine.handle_timer(max(self._loop.time(), due))
        self._flush()

    def _flush(self) -> None:
        """Send what the engine queued, deliver its events, re-arm the timer."""
        engine = self._engine
        endpoints = self._endpoints
        for address, datagram in engine.datagrams_to_send():
            endpoint = endpoints.get(address.version)
            if endpoint is None:
                self._no_route += 1
                continue
            endpoint.send(address, datagram)
        for event in engine.events():
            self._deliver(event)
        self._arm()

    def _deliver(self, event: Event) -> None:
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:
                _log.exception("on_event callback raised on %r", event)
        query = getattr(event, "query", None)
        call = self._calls.get(query) if query is not None else None
        if call is None:
            return
        direct = _DIRECT_EVENT.get(call.kind)
        if direct is not None:
            if isinstance(event, direct):
                self._resolve(query, event)
            return
        if isinstance(event, LookupFinished):
            final = _FINAL_EVENT.get(call.kind)
            if final is None:
                self._resolve(query, event)
            else:
                call.finished = event
        elif isinstance(event, _FINAL_EVENT.get(call.kind, ())):
            self._resolve(query, (event, call.finished))

    def _resolve(self, query: QueryId, value: object) -> None:
        call = self._calls.pop(query)
        if not call.future.done():  # the caller may have been cancelled
            call.future.set_result(value)

    def _arm(self) -> None:
        if self._state != "open":
            return
        deadline = self._engine.next_deadline()
        if deadline is None or deadline >= self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = self._loop.call_at(deadline, self._on_timer)
