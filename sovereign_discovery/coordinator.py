"""The :class:`PeerDiscoveryCoordinator`: what a user runs (DESIGN.md "Coordinator",
docs/coordinator.md).

It owns one :class:`~sovereign_discovery.aio.DhtNode` (the authenticated UDP endpoint every layer
shares), and runs the enabled layers concurrently:

- **bootstrap**: the pinned peers (:class:`~sovereign_discovery.bootstrap.BootstrapLayer`); a peer
  that cannot prove its pinned key is refused and reported (:class:`BootstrapRejected`);
- **cache**: the peers of the persistent :class:`~sovereign_discovery.peer_cache.PeerCache` are
  contacted again on start (an authenticated PING and FIND_NODE each, then a self-lookup), so a
  node rejoins when every bootstrap peer is gone;
- **local** layers (mDNS, BLE: :mod:`sovereign_discovery.layers` is their interface): a verified
  sighting is checked with an authenticated PING before it is reported; the answer feeds the
  peer into the DHT routing table;
- **dht**: the own record and capabilities are announced once the node has peers; peers that
  enter the routing table are asked for their signed record (one direct FIND_VALUE).

Everything lands in one :class:`~sovereign_discovery.peer_table.PeerTable` (verified record,
sources, first/last seen, addresses, RSSI), which emits :class:`PeerDiscovered`,
:class:`PeerUpdated` and :class:`PeerLost`, delivered to callbacks and to every ``async for`` over
:meth:`PeerDiscoveryCoordinator.events`. Peer-table changes are written to the cache in batches
(one transaction per second, on a dedicated thread: the SQLite connection belongs to it).

Where a peer comes from (its ``sources``): ``bootstrap`` (a pinned peer that proved its key),
``cache`` (a cached peer that answered again), ``mdns`` / ``ble`` (seen on the local link),
``dht`` (in the routing table, or found by a lookup). A source withdraws when the peer leaves
the routing table (bootstrap, cache, dht) or the local layer reports it gone; the peer is lost
when no source is left, or when its record expires.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ipaddress
import logging
import os
import random
import time
from collections import Counter, OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .addresses import Address
from .aio import DhtNode
from .bootstrap import BootstrapEvent, BootstrapLayer, BootstrapRejected
from .config import Config
from .constants import DEFAULT_BUCKET_SIZE
from .constants import NODE_ID_BYTES
from .errors import (
    ArgumentTypeError,
    ArgumentValueError,
    ClosedError,
    LookupTimeoutError,
    SovereignDiscoveryError,
)
from .events import ContactAdded, ContactRemoved, Event
from .identity import Identity
from .keys import NodeId, check_node_id
from .layers import LAYER_STATES, LayerContext, LayerUnavailable, LocalLayer, ResolvedPeer, record_matches
from .peer_cache import PeerCache
from .peer_table import DEFAULT_MAX_PEERS, LOCAL_SOURCES, PeerInfo, PeerTable
from .records import PeerRecord, check_capability
from .routing import Contact

__all__ = [
    "PeerDiscoveryCoordinator",
    "DiscoveryEvent",
    "PeerDiscovered",
    "PeerUpdated",
    "PeerLost",
    "LayerStateChanged",
    "BootstrapRejected",
]

_log = logging.getLogger(__name__)

#: How many cached peers are contacted on start (most recently seen first): several buckets' worth.
RESEED_PEERS = 64
#: Peer-table changes are committed to the cache at most this often (and on close).
CACHE_FLUSH_S = 1.0
#: Record fetches and reachability PINGs in flight at once; sightings waiting beyond the queue
#: bound are dropped and counted (network input never grows memory without bound).
MAX_CHECKS_IN_FLIGHT = 8
MAX_QUEUED_CHECKS = 1024
#: A local sighting of a peer checked less than this long ago only refreshes its entry.
RECHECK_AFTER_S = 30.0
#: A routing-table peer's record is fetched again when this little of its lifetime is left.
REFRESH_BEFORE_EXPIRY_S = 600.0
REFETCH_AFTER_S = 60.0
#: Events queued per ``events()`` iterator before the oldest are dropped (and counted).
DEFAULT_EVENT_QUEUE = 1000
#: Records local layers reported (verified), kept so that another layer can resolve a short peer
#: ID through them (``LayerContext.resolve_peer``) before the PING confirms the peer; the least
#: recently reported beyond this are forgotten.
MAX_LOCAL_RECORDS = 256
#: ``resolve_peer`` calls asking the network at once; beyond it they answer from memory only.
MAX_RESOLVES_IN_FLIGHT = 4
#: Known keys ``resolve_peer`` offers a layer's ``key_matches`` per call (each may cost HMACs); the
#: loop yields every ``_RESOLVE_YIELD_EVERY`` of them.
MAX_RESOLVE_KEYS = 4096
_RESOLVE_YIELD_EVERY = 256
#: Contacts whose ID or key matches asked for their record per ``resolve_peer`` call.
MAX_RESOLVE_FETCHES = 2


# --- events ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DiscoveryEvent:
    """Base class of the coordinator's own events (the bootstrap layer's events, e.g.
    :class:`BootstrapRejected`, are delivered as they are)."""


@dataclass(frozen=True, slots=True)
class PeerDiscovered(DiscoveryEvent):
    """``peer`` entered the peer table, reported by ``source``."""

    peer: PeerInfo
    source: str


@dataclass(frozen=True, slots=True)
class PeerUpdated(DiscoveryEvent):
    """A known peer has a newer record, or ``source`` began or stopped vouching for it."""

    peer: PeerInfo
    source: str


@dataclass(frozen=True, slots=True)
class PeerLost(DiscoveryEvent):
    """``peer`` left the peer table: ``reason`` is ``"gone"`` (no layer vouches for it any more),
    ``"expired"`` (its record expired) or ``"evicted"`` (the table was full)."""

    peer: PeerInfo
    reason: str


@dataclass(frozen=True, slots=True)
class LayerStateChanged(DiscoveryEvent):
    """Layer ``layer`` is now ``state``: ``"running"``, ``"off"`` (switched off),
    ``"unavailable"`` (``reason`` says why) or ``"failed"`` (it crashed; ``reason``)."""

    layer: str
    state: str
    reason: str | None = None


AnyEvent = DiscoveryEvent | BootstrapEvent


class _Subscription:
    """One ``async for`` over the events: a bounded queue that drops the oldest when full."""

    def __init__(self, owner: "PeerDiscoveryCoordinator", max_queued: int) -> None:
        self._owner = owner
        self._queue: deque = deque()
        self._max = max_queued
        self._wakeup = asyncio.Event()
        self._ended = False
        self.dropped = 0

    def push(self, event: AnyEvent) -> None:
        if len(self._queue) >= self._max:
            self._queue.popleft()
            self.dropped += 1
            self._owner._count["events_dropped"] += 1
        self._queue.append(event)
        self._wakeup.set()

    def end(self) -> None:
        self._ended = True
        self._wakeup.set()

    def __aiter__(self) -> "_Subscription":
        return self

    async def __anext__(self) -> AnyEvent:
        while not self._queue:
            if self._ended:
                self._owner._subscriptions.discard(self)
                raise StopAsyncIteration
            self._wakeup.clear()
            await self._wakeup.wait()
        return self._queue.popleft()

    async def aclose(self) -> None:
        self._ended = True
        self._queue.clear()
        self._owner._subscriptions.discard(self)


# --- the coordinator ------------------------------------------------------------------------------


class PeerDiscoveryCoordinator:
    """Runs the discovery layers of ``config`` for ``identity``; an async context manager (or
    :meth:`start` / :meth:`close`). See the module docstring and docs/coordinator.md.

    ``capabilities`` are announced besides ``config.node.capabilities``. ``cache`` is the peer
    cache file (default ``config.node.cache_file``; None: no cache). ``local_layers`` are the
    local layer objects to run (default: those ``config.local`` switches on that this
    installation provides). ``on_event`` is called with every event on the loop (it must not
    block; an exception it raises is logged). ``max_peers`` bounds the peer table.
    """

    def __init__(
        self,
        identity: Identity,
        *,
        config: Config | None = None,
        capabilities: Iterable[str] = (),
        cache: str | os.PathLike[str] | None | object = ...,
        local_layers: Sequence[LocalLayer] | None = None,
        on_event: Callable[[AnyEvent], None] | None = None,
        max_peers: int = DEFAULT_MAX_PEERS,
    ) -> None:
        if not isinstance(identity, Identity):
            raise ArgumentTypeError(f"identity must be an Identity, not {type(identity).__name__}")
        config = Config() if config is None else config
        if not isinstance(config, Config):
            raise ArgumentTypeError(f"config must be a Config, not {type(config).__name__}")
        if isinstance(capabilities, str) or not isinstance(capabilities, Iterable):
            raise ArgumentTypeError("capabilities must be an iterable of capability names")
        caps = {check_capability(c) for c in (*config.node.capabilities, *capabilities)}
        if cache is ...:
            cache = config.node.cache_file
        if cache is not None and not isinstance(cache, (str, os.PathLike)):
            raise ArgumentTypeError(f"cache must be a path or None, not {type(cache).__name__}")
        if local_layers is not None:
            if isinstance(local_layers, (str, bytes)) or not isinstance(local_layers, Sequence):
                raise ArgumentTypeError("local_layers must be a sequence of layer objects")
            for layer in local_layers:
                if not isinstance(layer, LocalLayer) or layer.name not in LOCAL_SOURCES:
                    raise ArgumentTypeError(
                        f"each local layer needs name in {sorted(LOCAL_SOURCES)}, start, close and stats;"
                        f" got {layer!r}")
            if len({layer.name for layer in local_layers}) != len(local_layers):
                raise ArgumentValueError("local_layers: at most one layer per name")
        if on_event is not None and not callable(on_event):
            raise ArgumentTypeError("on_event must be callable")
        self._identity = identity
        self._config = config
        self._capabilities = tuple(sorted(caps))
        self._cache_path = Path(os.fspath(cache)) if cache is not None else None
        self._explicit_layers = local_layers
        self._callbacks: list[Callable[[AnyEvent], None]] = [on_event] if on_event else []
        self._table = PeerTable(max_peers)
        self._subscriptions: set[_Subscription] = set()
        self._count: Counter[str] = Counter()
        self._state = "new"  # new, open, closed
        self._node: DhtNode | None = None
        self._cache: PeerCache | None = None
        self._cache_thread: concurrent.futures.ThreadPoolExecutor | None = None
        self._cache_pending: dict[tuple[bytes, str], PeerRecord] = {}
        self._layers: dict[str, LocalLayer] = {}
        self._layer_state: dict[str, tuple[str, str | None]] = {}
        self._tasks: set[asyncio.Task] = set()
        self._checks: OrderedDict[tuple[bytes, str], tuple] = OrderedDict()  # queued sightings
        self._checked_at: dict[tuple[bytes, str], float] = {}
        self._check_wakeup: asyncio.Event | None = None
        self._fetching: set[bytes] = set()
        self._origin: dict[bytes, str] = {}  # routing-table peers we know how we met: bootstrap, cache
        self._own_record_callbacks: list[Callable[[PeerRecord], None]] = []
        self._own_record: PeerRecord | None = None
        self._joined: asyncio.Event | None = None
        self._bootstrap: BootstrapLayer | None = None
        self._bootstrap_state = "off"
        self._reseeded = 0
        self._announce_on_contact = False
        self._refetched: dict[bytes, float] = {}
        self._local_records: OrderedDict[bytes, tuple[str, PeerRecord]] = OrderedDict()
        self._resolves_in_flight = 0
        self._rng = random.Random()
        self._started_at = 0.0

    # --- life cycle ------------------------------------------------------------------------------

    async def start(self) -> "PeerDiscoveryCoordinator":
        """Bind the DHT node, open the cache, start every enabled layer, and return at once: the
        join (bootstrap, cache re-seed, first announcement) goes on in the background (await
        :meth:`joined` to wait for it). Raises OSError if the UDP port cannot be bound and
        PeerCacheError if the cache cannot be used (nothing is left running then)."""
        if self._state != "new":
            raise ClosedError(f"the coordinator is {self._state}; a coordinator starts once")
        self._state = "open"
        self._started_at = time.time()
        self._joined = asyncio.Event()
        self._check_wakeup = asyncio.Event()
        try:
            node = DhtNode(self._identity, on_event=self._on_dht_event, **self._config.dht.dht_node_kwargs())
            await node.start()
            self._node = node
            if self._cache_path is not None:
                self._cache_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="peer-cache")
                self._cache = await self._in_cache_thread(PeerCache.open, self._cache_path)
        except BaseException:
            await self._shutdown()
            raise
        self._spawn(self._join(), "join")
        self._spawn(self._run_checks(), "checks")
        self._spawn(self._upkeep(), "upkeep")
        for layer in self._choose_layers():
            self._layer_state[layer.name] = ("starting", None)
            self._spawn(self._start_layer(layer), f"layer {layer.name}")
        return self

    async def close(self) -> None:
        """Stop every layer (local layers say goodbye), flush the cache and close it, close the
        DHT node, and end every events() iterator. Idempotent."""
        if self._state == "closed":
            return
        self._state = "closed"
        await self._shutdown()

    async def __aenter__(self) -> "PeerDiscoveryCoordinator":
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def closed(self) -> bool:
        return self._state == "closed"

    async def joined(self, timeout: float | None = None) -> bool:
        """Wait until the join is over (bootstrap and cache re-seed done, the own record announced
        if the node has peers); True if the routing table then holds peers. ``timeout``
        (seconds) bounds the wait: False when it runs out."""
        self._check_open()
        try:
            await asyncio.wait_for(self._joined.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return len(self._node.engine.table) > 0

    # --- inspection -------------------------------------------------------------------------------

    @property
    def identity(self) -> Identity:
        return self._identity

    @property
    def node_id(self) -> NodeId:
        return self._identity.node_id

    @property
    def node(self) -> DhtNode:
        """The DHT node (its ``contact.pinned`` is the line others bootstrap from)."""
        self._check_open()
        return self._node

    @property
    def capabilities(self) -> tuple[str, ...]:
        return self._capabilities

    def peers(self, *, capability: str | None = None, source: str | None = None) -> list[PeerInfo]:
        """The peer table: local peers first (strongest signal first), then most recently seen;
        only those announcing ``capability`` / vouched for by ``source`` if given."""
        return self._table.peers(capability=capability, source=source)

    def peer(self, node_id: bytes) -> PeerInfo | None:
        """The peer table's entry for ``node_id`` (no lookup)."""
        return self._table.get(check_node_id("node_id", node_id))

    async def find_peer(self, node_id: bytes, *, deadline_s: float | None = None) -> PeerInfo | None:
        """The peer ``node_id``: from the peer table if it is there, else found by a DHT record
        lookup (then added to the table). None if the lookup completed without it. Raises
        LookupTimeoutError if ``deadline_s`` (default ``dht.lookup_timeout_s``) cut it short."""
        node_id = check_node_id("node_id", node_id)
        self._check_open()
        held = self._table.get(node_id)
        if held is not None and not held.record.is_expired(time.time()):
            self._count["lookup.find_peer_from_table"] += 1
            return held
        if not self._config.dht.enabled:
            return None
        self._count["lookup.find_peer_from_dht"] += 1
        record = await self._node.find_record(node_id, deadline_s=deadline_s)
        if record is None or self._state != "open":
            return None
        self._observe(record, "dht")
        return self._table.get(node_id)

    async def find_peers(self, *, capability: str | None = None, count: int = DEFAULT_BUCKET_SIZE,
                         deadline_s: float | None = None) -> list[PeerInfo]:
        """Up to ``count`` peers (announcing ``capability`` if given), local peers first: from the
        peer table, and when it holds fewer than ``count`` such peers, from a DHT provider lookup
        of the capability (found peers join the table). Raises LookupTimeoutError if the lookup
        timed out with nothing found and the table had none either."""
        if capability is not None:
            check_capability(capability)
        if isinstance(count, bool) or not isinstance(count, int):
            raise ArgumentTypeError(f"count must be an int, not {type(count).__name__}")
        if not 1 <= count <= 1000:
            raise ArgumentValueError(f"count must be in 1..1000, not {count}")
        self._check_open()
        held = self._table.peers(capability=capability)  # never holds this node (see _observe)
        if len(held) >= count or capability is None or not self._config.dht.enabled:
            return held[:count]
        try:
            records = await self._node.find_providers(capability, count=count, deadline_s=deadline_s)
        except SovereignDiscoveryError:
            if held:
                return held
            raise
        if self._state == "open":
            for record in records:
                self._observe(record, "dht")
        return self._table.peers(capability=capability)[:count]

    def stats(self) -> dict:
        """Counters of every part: ``peers``, ``peers_by_source``, ``events`` (by type),
        ``layers`` (state, reason, the layer's own counters), ``bootstrap``, ``cache`` (None
        without one), ``checks`` (sightings and record fetches), ``lookups`` (find_peer answered from
        the table or the DHT), and ``dht``
        (:meth:`DhtNode.stats`)."""
        self._check_open()
        layers = {}
        for name in sorted(LOCAL_SOURCES | set(self._layer_state)):
            state, reason = self._layer_state.get(name, ("off", None))
            entry: dict = {"state": state, "reason": reason}
            layer = self._layers.get(name)
            if layer is not None:  # running, or unavailable for now (its backend went away)
                with contextlib.suppress(Exception):
                    entry.update(layer.stats())
                entry.update(state=state, reason=reason)
            layers[name] = entry
        finished = self._bootstrap.finished if self._bootstrap is not None else None
        count = self._count
        return {
            "node_id": str(self.node_id),
            "uptime_s": round(time.time() - self._started_at, 3),
            "joined": self._joined.is_set(),
            "peers": len(self._table),
            "peers_local": sum(1 for p in self._table if p.local),
            "peers_by_source": self._table.count_by_source(),
            "peers_evicted": self._table.evicted,
            "events": {k[6:]: v for k, v in sorted(count.items()) if k.startswith("event.")},
            "events_dropped": count["events_dropped"],
            "callback_errors": count["callback_errors"],
            "checks": {k[6:]: v for k, v in sorted(count.items()) if k.startswith("check.")},
            "lookups": {k[7:]: v for k, v in sorted(count.items()) if k.startswith("lookup.")},
            "layers": layers,
            "bootstrap": {
                "state": self._bootstrap_state,
                "answered": len(finished.answered) if finished else 0,
                "rejected": len(finished.rejected) if finished else 0,
                "unreachable": len(finished.unreachable) if finished else 0,
                "rejoin_attempts": count["bootstrap_rejoin_attempts"],
            },
            "cache": self._cache_stats(),
            "dht": self._node.stats(),
        }

    def health(self) -> dict:
        """``ok``: the node is running (its sockets are open); ``joined``: the join is over;
        ``table_size``: peers in the routing table (0 for a bootstrap node nobody contacted)."""
        if self._state != "open" or self._node is None or self._node.closed:
            return {"ok": False, "state": self._state}
        return {"ok": True, "state": "running", "joined": self._joined.is_set(),
                "table_size": len(self._node.engine.table), "peers": len(self._table)}

    # --- events --------------------------------------------------------------------------------------

    def events(self, *, max_queued: int = DEFAULT_EVENT_QUEUE) -> AsyncIterator[AnyEvent]:
        """An async iterator over the events from now on; it ends when the coordinator closes.
        Call it before :meth:`start` (or entering ``async with``) to see the join's events too.
        At most ``max_queued`` events wait; beyond that the oldest are dropped (counted in
        ``stats()["events_dropped"]``)."""
        if isinstance(max_queued, bool) or not isinstance(max_queued, int) or max_queued < 1:
            raise ArgumentValueError(f"max_queued must be a positive int, not {max_queued!r}")
        subscription = _Subscription(self, max_queued)
        if self._state == "closed":
            subscription.end()
        else:
            self._subscriptions.add(subscription)
        return subscription

    def add_callback(self, callback: Callable[[AnyEvent], None]) -> None:
        """Call ``callback`` with every event from now on (on the loop; it must not block)."""
        if not callable(callback):
            raise ArgumentTypeError("callback must be callable")
        self._callbacks.append(callback)

    def remove_callback(self, callback: Callable[[AnyEvent], None]) -> None:
        with contextlib.suppress(ValueError):
            self._callbacks.remove(callback)

    def _emit(self, event: AnyEvent) -> None:
        self._count["event." + type(event).__name__] += 1
        for callback in list(self._callbacks):
            try:
                callback(event)
            except Exception:
                self._count["callback_errors"] += 1
                _log.exception("event callback raised on %r", event)
        for subscription in list(self._subscriptions):
            subscription.push(event)

    # --- the peer table ----------------------------------------------------------------------------

    def _observe(self, record: PeerRecord, source: str, *, address: Address | None = None,
                 rssi: int | None = None) -> None:
        if record.node_id == self.node_id:
            return
        now = time.time()
        if record.is_expired(now):
            self._count["check.expired_record"] += 1
            return
        before = self._table.get(record.node_id)
        peer, new, evicted = self._table.observe(record, source, now, address=address, rssi=rssi)
        if evicted is not None:
            self._emit(PeerLost(evicted, "evicted"))
        if new:
            self._emit(PeerDiscovered(peer, source))
        elif before is not None and (peer.record.seq != before.record.seq or peer.sources != before.sources):
            self._emit(PeerUpdated(peer, source))
        if self._cache is not None:
            pending = self._cache_pending
            key = (bytes(record.node_id), source)
            if key in pending or len(pending) < 4 * MAX_QUEUED_CHECKS:
                pending[key] = peer.record
            else:
                self._count["check.cache_backlog_dropped"] += 1

    def _withdraw(self, node_id: bytes, sources: Iterable[str]) -> None:
        for source in sources:
            before = self._table.get(node_id)
            peer, lost = self._table.withdraw(node_id, source)
            if lost:
                self._emit(PeerLost(peer, "gone"))
                return
            if before is not None and peer is not None and peer.sources != before.sources:
                self._emit(PeerUpdated(peer, source))

    # --- DHT events ----------------------------------------------------------------------------------

    def _on_dht_event(self, event: Event) -> None:
        if self._state != "open":
            return
        if isinstance(event, ContactAdded):
            self._queue_check((bytes(event.contact.node_id), "fetch"), ("fetch", event.contact))
            if self._announce_on_contact and self._config.dht.enabled:
                self._announce_on_contact = False
                self._spawn(self._announce(), "announce")
        elif isinstance(event, ContactRemoved):
            self._origin.pop(bytes(event.node_id), None)
            self._withdraw(event.node_id, ("dht", "bootstrap", "cache"))
        self._check_own_record()

    def _check_own_record(self) -> None:
        """Tell the local layers when the own record changed (re-signed: new address,
        capabilities, or a republish)."""
        own = self._node.record if self._node is not None and not self._node.closed else None
        if own is not None and own is not self._own_record:
            self._own_record = own
            for callback in list(self._own_record_callbacks):
                try:
                    callback(own)
                except Exception:
                    _log.exception("own-record callback raised")

    # --- checks: record fetches for routing-table peers, PINGs for local sightings ----------------------

    def _queue_check(self, key: tuple[bytes, str], item: tuple) -> None:
        """Queue a record fetch (``("fetch", contact)``) or a sighting to confirm
        (``("sighting", layer, record, address, rssi, check_reachable)``); a newer item for the
        same peer and kind replaces a queued one; beyond the bound, new ones are dropped."""
        checks = self._checks
        if key not in checks and len(checks) >= MAX_QUEUED_CHECKS:
            self._count["check.queue_full"] += 1
            _log.debug("check queue full: %s dropped", item)
            return
        checks[key] = item
        self._check_wakeup.set()

    async def _run_checks(self) -> None:
        running: set[asyncio.Task] = set()
        while self._state == "open":
            while self._checks and len(running) < MAX_CHECKS_IN_FLIGHT:
                _, item = self._checks.popitem(last=False)
                task = asyncio.create_task(self._check(*item))
                running.add(task)
                task.add_done_callback(running.discard)
                task.add_done_callback(lambda _t: self._check_wakeup.set())
            self._check_wakeup.clear()
            await self._check_wakeup.wait()

    async def _check(self, kind: str, *args) -> None:
        try:
            if kind == "fetch":
                await self._fetch(*args)
            else:
                await self._confirm_sighting(*args)
        except ClosedError:
            pass
        except Exception:
            self._count["check.internal_error"] += 1
            _log.exception("%s check of %s failed", kind, args)

    async def _fetch(self, contact: Contact, refresh: bool = False) -> None:
        """A peer entered the routing table (or its record is old): ask it for its signed record."""
        key = bytes(contact.node_id)
        source = self._origin.get(key, "dht")
        held = self._table.get(key)
        if held is not None and source in held.sources and not refresh:
            return
        self._count["check.record_fetches"] += 1
        record = await self._node.fetch_record(contact)
        if self._state != "open":
            return
        if record is None:  # the engine accepts only a valid record of the key asked
            self._count["check.record_fetch_failed"] += 1
            return
        if self._node.engine.table.get(contact.node_id) is None:
            return  # it left the table meanwhile
        self._observe(record, source)

    async def _confirm_sighting(self, source: str, record: PeerRecord, address: Address | None,
                                rssi: int | None, check_reachable: bool) -> None:
        if check_reachable:
            self._count["check.pings"] += 1
            candidates = [address] if address is not None else list(record.addresses)
            if address is not None and address.version == 6 and address.ip.is_link_local:
                candidates += [a for a in record.addresses if a != address]  # a zone the node may not take
            if not await self._answers(record, candidates):
                self._count["check.unreachable"] += 1
                _log.info("%s saw %s but it does not answer an authenticated PING", source,
                          record.node_id.short())
                return
        if self._state == "open":
            self._checked_at[(bytes(record.node_id), source)] = time.monotonic()
            self._observe(record, source, address=address, rssi=rssi)

    # --- the layer context (what local layers call) ----------------------------------------------------

    def _sighting(self, layer: str, record: object, address: object, rssi: object, check_reachable: bool) -> None:
        if self._state != "open":
            return
        if not self._valid_sighting(record, address, rssi):
            _log.warning("layer %s reported a sighting of the wrong types (%s, %s, %s): ignored", layer,
                         type(record).__name__, type(address).__name__, type(rssi).__name__)
            return
        if record.node_id == self.node_id:
            return
        if record.is_expired(time.time()):
            self._count["check.expired_record"] += 1
            return
        self._count[f"check.sightings_{layer}"] += 1
        self._remember_local_record(layer, record)
        key = (bytes(record.node_id), layer)
        held = self._table.get(record.node_id)
        checked = self._checked_at.get(key)
        if (held is not None and layer in held.sources and checked is not None
                and time.monotonic() - checked < RECHECK_AFTER_S
                and (address is None or address in held.local_addresses)):
            self._observe(record, layer, address=address, rssi=rssi)  # a refresh: no new PING
            return
        if len(self._checked_at) > 4 * self._table_bound():
            self._checked_at.clear()
        self._queue_check(key, ("sighting", layer, record, address, rssi, check_reachable))

    def _remember_local_record(self, layer: str, record: PeerRecord) -> None:
        """Keep what a local layer verified for other layers' ``resolve_peer`` (newest seq, LRU)."""
        key = bytes(record.node_id)
        held = self._local_records.pop(key, None)
        if held is not None and held[1].public_key == record.public_key and held[1].seq > record.seq:
            record, layer = held[1], held[0]
        self._local_records[key] = (layer, record)
        while len(self._local_records) > MAX_LOCAL_RECORDS:
            self._local_records.popitem(last=False)

    async def _resolve_peer(self, layer: str, peer_id: object, key_matches: object, lookup: object,
                            deadline_s: object) -> ResolvedPeer | None:
        """``LayerContext.resolve_peer`` for ``layer`` (see there): the peer table, then records
        other local layers verified, then (with ``lookup``) the DHT; counted in
        ``stats()["lookups"]`` as ``resolve_<source>``, ``resolve_not_found``, ``resolve_timeout``,
        ``resolve_busy`` (the network was not asked: too many in flight) and ``resolve_bad_request``."""
        if self._state != "open":
            return None
        if (not isinstance(peer_id, (bytes, bytearray)) or not 1 <= len(peer_id) <= NODE_ID_BYTES
                or (key_matches is not None and not callable(key_matches))
                or isinstance(deadline_s, bool) or not isinstance(deadline_s, (int, float))
                or not 0 < deadline_s <= 60):
            self._count["lookup.resolve_bad_request"] += 1
            return None
        peer_id = bytes(peer_id)
        try:
            async with asyncio.timeout(float(deadline_s)):
                found = await self._resolve_in_memory(layer, peer_id, key_matches)
                if found is None and lookup and self._node is not None and not self._node.closed:
                    if self._resolves_in_flight >= MAX_RESOLVES_IN_FLIGHT:
                        self._count["lookup.resolve_busy"] += 1
                    else:
                        self._resolves_in_flight += 1
                        try:
                            found = await self._resolve_in_dht(peer_id, key_matches)
                        finally:
                            self._resolves_in_flight -= 1
        except TimeoutError:
            self._count["lookup.resolve_timeout"] += 1
            return None
        except ClosedError:
            return None
        except SovereignDiscoveryError as exc:  # the engine refused a request: nothing found
            self._count["lookup.resolve_failed"] += 1
            _log.debug("resolving %s for %s failed: %s", peer_id.hex(), layer, exc)
            return None
        self._count[f"lookup.resolve_{found.source}" if found is not None else "lookup.resolve_not_found"] += 1
        return found

    async def _resolve_in_memory(self, layer: str, peer_id: bytes,
                                 key_matches: Callable[[bytes], bool] | None) -> ResolvedPeer | None:
        """The peer table, then the records other local layers reported."""
        now = time.time()
        if key_matches is None and len(peer_id) == NODE_ID_BYTES:  # a whole ID: no scan needed
            held = self._table.get(peer_id)
            local = self._local_records.get(peer_id)
            candidates = [("table", held.record)] if held is not None else []
            candidates += [local] if local is not None and local[0] != layer else []
        else:
            candidates = [("table", peer.record) for peer in self._table]
            candidates += [(source, record) for source, record in reversed(self._local_records.values())
                           if source != layer]
        for n, (source, record) in enumerate(candidates[:MAX_RESOLVE_KEYS]):
            if key_matches is not None and n and not n % _RESOLVE_YIELD_EVERY:
                await asyncio.sleep(0)  # a layer's key_matches may cost HMACs: keep the loop responsive
            if record_matches(record, peer_id, key_matches, now):
                return ResolvedPeer(record, source)
        return None

    async def _resolve_in_dht(self, peer_id: bytes,
                              key_matches: Callable[[bytes], bool] | None) -> ResolvedPeer | None:
        """Routing-table contacts whose ID (prefix) or key matches are asked for their own record;
        for a prefix with none in the table, a FIND_NODE towards the prefix (the peer, if it is in
        the DHT, is the closest node to it by far) finds one first. Tokens need a known key."""
        node = self._node
        table = node.engine.table
        if key_matches is None:
            target = peer_id + bytes(NODE_ID_BYTES - len(peer_id))
            contacts = [c for c in table.closest(target, MAX_RESOLVE_FETCHES)
                        if bytes(c.node_id).startswith(peer_id)]
            if not contacts and self._config.dht.enabled:
                self._count["lookup.resolve_lookups"] += 1
                try:
                    closest = await node.find_closest(target)
                except LookupTimeoutError as exc:
                    closest = list(exc.closest)
                contacts = [c for c in closest if bytes(c.node_id).startswith(peer_id)]
        else:
            contacts = []
            for n, contact in enumerate(list(table)[:MAX_RESOLVE_KEYS]):
                if n and not n % _RESOLVE_YIELD_EVERY:
                    await asyncio.sleep(0)
                try:
                    if key_matches(contact.public_key):
                        contacts.append(contact)
                except Exception:
                    continue
                if len(contacts) >= MAX_RESOLVE_FETCHES:
                    break
        now = time.time()
        for contact in contacts[:MAX_RESOLVE_FETCHES]:
            record = await node.fetch_record(contact)  # a valid record of that very key, or None
            if record is None and self._config.dht.enabled:
                with contextlib.suppress(LookupTimeoutError):
                    record = await node.find_record(contact.node_id)  # stored at its k closest
            if record is not None and record_matches(record, peer_id, key_matches, now):
                return ResolvedPeer(record, "dht")
        return None

    def _layer_reported(self, layer: str, state: object, reason: object) -> None:
        """A started layer's own state change (``LayerContext.layer_state``)."""
        if self._state != "open" or layer not in self._layers:
            return
        if state not in LAYER_STATES or (reason is not None and not isinstance(reason, str)):
            self._count["check.bad_layer_state"] += 1
            _log.warning("layer %s reported an unknown state %r (%r): ignored", layer, state, reason)
            return
        reason = None if state == "running" else (reason or "no reason given")
        if self._layer_state.get(layer) == (state, reason):
            return
        self._layer_state[layer] = (state, reason)
        log = _log.info if state == "running" else _log.warning
        log("%s layer is %s%s", layer, state, f": {reason}" if reason else "")
        self._emit(LayerStateChanged(layer, state, reason))

    def _valid_sighting(self, record: object, address: object, rssi: object = None) -> bool:
        """A layer passed a PeerRecord, an Address (or None) and an int RSSI (or None); else it is
        counted as a bad sighting."""
        if (isinstance(record, PeerRecord) and (address is None or isinstance(address, Address))
                and (rssi is None or (isinstance(rssi, int) and not isinstance(rssi, bool)))):
            return True
        self._count["check.bad_sighting"] += 1
        return False

    def _table_bound(self) -> int:
        return max(len(self._table), 256)

    def _gone(self, layer: str, node_id: object) -> None:
        if self._state != "open":
            return
        try:
            node_id = check_node_id("node_id", node_id)
        except SovereignDiscoveryError:
            self._count["check.bad_sighting"] += 1
            return
        self._checks.pop((bytes(node_id), layer), None)
        self._checked_at.pop((bytes(node_id), layer), None)
        self._withdraw(node_id, (layer,))

    async def _ping_peer(self, layer: str, record: object, address: object) -> bool:
        """A local layer's liveness check: does the peer of ``record`` answer an authenticated
        PING, at ``address`` first, then at the record's addresses?"""
        if self._state != "open":
            return False
        if not self._valid_sighting(record, address):
            return False
        self._count[f"check.liveness_pings_{layer}"] += 1
        candidates = [address] if address is not None else []
        if await self._answers(record, candidates + [a for a in record.addresses if a != address]):
            return True
        self._count[f"check.liveness_unanswered_{layer}"] += 1
        return False

    async def _answers(self, record: PeerRecord, candidates: Sequence[Address]) -> bool:
        """Whether the peer of ``record`` answers an authenticated PING at one of the first four
        ``candidates``, tried in order. An IPv6 link-local address without a zone is skipped: it
        does not say which link to send on (a record's addresses carry no zone)."""
        usable = [a for a in candidates if not _unscoped_link_local(a)]
        if len(usable) < len(candidates):
            self._count["check.link_local_skipped"] += len(candidates) - len(usable)
        for where in usable[:4]:
            try:
                if await self._node.ping(Contact(record.public_key, where)) is not None:
                    return True
            except ClosedError:
                return False
            except SovereignDiscoveryError:  # an address a contact cannot have (a zone)
                continue
        return False

    # --- tasks ---------------------------------------------------------------------------------------

    def _spawn(self, coro, name: str) -> None:
        task = asyncio.create_task(coro, name=f"coordinator {name}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            _log.error("%s failed", task.get_name(), exc_info=task.exception())

    async def _join(self) -> None:
        """Sign the own record first (so that every peer that meets us can fetch it), then run the
        bootstrap layer and the cache re-seed side by side, then announce to the k closest."""
        try:
            await self._announce()  # an empty table: signs and keeps the record, stores nowhere
            parts = []
            bootstrap = self._config.bootstrap
            if bootstrap.enabled and (bootstrap.peers or bootstrap.fallback_peers):
                for contact in (*bootstrap.peers, *bootstrap.fallback_peers):
                    self._origin[bytes(contact.node_id)] = "bootstrap"
                self._bootstrap = BootstrapLayer(self._node, bootstrap, on_event=self._on_bootstrap_event)
                self._bootstrap_state = "running"
                parts.append(self._run_bootstrap())
            else:
                self._bootstrap_state = "off" if not bootstrap.enabled else "no peers"
            if self._cache is not None:
                parts.append(self._reseed())
            await asyncio.gather(*parts)
            if len(self._node.engine.table) > 0:
                await self._announce()
            else:  # a bootstrap node, or nobody answered: announce when the first peer comes
                self._announce_on_contact = True
                if self._bootstrap is not None:
                    self._spawn(self._rejoin(), "rejoin")
        finally:
            self._joined.set()

    async def _rejoin(self) -> None:
        """Nobody answered and nothing else filled the routing table: run the bootstrap layer
        again, waiting ``bootstrap.backoff_delay`` (exponential, with jitter) between attempts,
        until the table holds a peer (one that contacted us counts too)."""
        attempt = 0
        while self._state == "open" and len(self._node.engine.table) == 0:
            attempt += 1
            await asyncio.sleep(self._config.bootstrap.backoff_delay(min(attempt + 1, 64), self._rng))
            if len(self._node.engine.table) > 0:
                break
            self._bootstrap_state = "running"
            self._count["bootstrap_rejoin_attempts"] += 1
            await self._run_bootstrap()

    async def _run_bootstrap(self) -> None:
        finished = await self._bootstrap.run()
        self._bootstrap_state = "done" if finished.ok else "failed"

    def _on_bootstrap_event(self, event: BootstrapEvent) -> None:
        if isinstance(event, BootstrapRejected):
            self._origin.pop(bytes(event.contact.node_id), None)
        self._emit(event)

    async def _reseed(self) -> None:
        cached = await self._in_cache_thread(self._cache.peers, time.time(), limit=RESEED_PEERS)
        families = {ipaddress.ip_address(host).version for host, _ in self._node.bound}
        contacts = []
        for peer in cached:
            key = bytes(peer.node_id)
            self._origin.setdefault(key, "cache")
            contacts.extend(Contact(peer.record.public_key, a) for a in peer.record.addresses[:2]
                            if a.version in families)
        self._reseeded = len(cached)
        if not contacts:
            return
        _log.info("contacting %d cached peer(s) again", len(cached))
        with contextlib.suppress(SovereignDiscoveryError):
            await self._node.bootstrap(contacts, deadline_s=self._config.bootstrap.timeout_s * 2)

    async def _announce(self) -> None:
        """Sign the own record (with the capabilities) and, with the DHT on, STORE / ANNOUNCE it
        at the k closest peers (the engine republishes it at TTL/2 from then on). With the DHT
        off this runs once, at start, with an empty routing table: the record is signed (local
        layers and direct fetches serve it) and stored nowhere."""
        deadline = self._config.dht.lookup_timeout_s
        node = self._node
        if not self._config.dht.enabled and node.record is not None:
            return
        try:
            await node.announce(deadline_s=deadline)
            for name in self._capabilities:
                await node.announce_capability(name, deadline_s=deadline)
        except SovereignDiscoveryError as exc:
            _log.warning("announcing the own record failed: %s", exc)
        self._check_own_record()

    async def _upkeep(self) -> None:
        """Once a second: expired records leave the table; the cache gets the batch of changes."""
        while self._state == "open":
            await asyncio.sleep(CACHE_FLUSH_S)
            now = time.time()
            for peer in self._table.expire(now):
                self._emit(PeerLost(peer, "expired"))
            self._refresh_records(now)
            await self._flush_cache()

    def _refresh_records(self, now: float) -> None:
        """Peers republish at half their record's lifetime (Kademlia §2.5): ask a routing-table
        peer for its newer record when the one held has less than a quarter of its lifetime (at
        most REFRESH_BEFORE_EXPIRY_S) left, at most once per REFETCH_AFTER_S."""
        table = self._node.engine.table
        last = self._refetched
        for peer in list(self._table):
            record = peer.record
            left = record.expires_at - now
            lifetime = max(record.expires_at - peer.first_seen, 1.0)
            if left > min(REFRESH_BEFORE_EXPIRY_S, lifetime / 4) or peer.sources <= LOCAL_SOURCES:
                continue
            key = bytes(peer.node_id)
            held = table.get(peer.node_id)
            if held is None or now - last.get(key, 0.0) < REFETCH_AFTER_S:
                continue
            if len(last) > 4 * self._table_bound():
                last.clear()
            last[key] = now
            self._queue_check((key, "fetch"), ("fetch", held, True))

    async def _flush_cache(self) -> None:
        if self._cache is None or not self._cache_pending:
            return
        batch, self._cache_pending = self._cache_pending, {}
        sightings = [(record, source) for (_, source), record in batch.items()]
        try:
            await self._in_cache_thread(self._cache.put_many, sightings, time.time())
            self._count["check.cache_writes"] += len(sightings)
        except (SovereignDiscoveryError, OSError) as exc:
            self._count["check.cache_write_failed"] += 1
            _log.error("writing %d peer(s) to the cache failed: %s", len(sightings), exc)

    def _in_cache_thread(self, function, *args, **kwargs):
        loop = asyncio.get_running_loop()
        return loop.run_in_executor(self._cache_thread, lambda: function(*args, **kwargs))

    def _cache_stats(self) -> dict | None:
        if self._cache is None:
            return None
        stats: dict = dict(self._cache.stats())  # plain counters: safe to read from the loop's thread
        stats.update({"path": str(self._cache_path), "reseeded": self._reseeded,
                      "pending_writes": len(self._cache_pending),
                      "set_aside": str(self._cache.set_aside.moved_to) if self._cache.set_aside else None})
        return stats

    # --- local layers ----------------------------------------------------------------------------------

    def _choose_layers(self) -> list[LocalLayer]:
        local = self._config.local
        wanted = {"mdns": local.mdns, "ble": local.bluetooth}
        if self._explicit_layers is not None:
            layers = [layer for layer in self._explicit_layers if wanted.get(layer.name, True)]
            for name, on in wanted.items():
                if not on:
                    self._layer_state[name] = ("off", None)
            return layers
        layers = []
        for name, on in wanted.items():
            if not on:
                self._layer_state[name] = ("off", None)
                continue
            layer = _default_layer(name, self._config)
            if isinstance(layer, str):
                self._layer_state[name] = ("unavailable", layer)
                _log.info("%s layer unavailable: %s", name, layer)
                self._emit(LayerStateChanged(name, "unavailable", layer))
            else:
                layers.append(layer)
        return layers

    async def _start_layer(self, layer: LocalLayer) -> None:
        name = layer.name
        self._layer_state[name] = ("starting", None)
        try:
            await layer.start(_Context(self, name))
        except LayerUnavailable as exc:
            self._layer_state[name] = ("unavailable", exc.reason)
            _log.warning("%s", exc)
            self._emit(LayerStateChanged(name, "unavailable", exc.reason))
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._layer_state[name] = ("failed", f"{type(exc).__name__}: {exc}")
            _log.exception("%s layer failed to start", name)
            self._emit(LayerStateChanged(name, "failed", f"{type(exc).__name__}: {exc}"))
            return
        if self._state != "open":
            await layer.close()
            return
        self._layers[name] = layer
        self._layer_state[name] = ("running", None)
        self._emit(LayerStateChanged(name, "running"))

    # --- shutdown ------------------------------------------------------------------------------------

    async def _shutdown(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for name, layer in list(self._layers.items()):
            try:
                await asyncio.wait_for(layer.close(), 3.0)
            except Exception:
                _log.exception("closing the %s layer failed", name)
            self._layer_state[name] = ("off", "closed")
        self._layers.clear()
        if self._cache is not None:
            await self._flush_cache()
            try:
                await self._in_cache_thread(self._cache.close)
            except Exception:
                _log.exception("closing the peer cache failed")
        if self._cache_thread is not None:
            self._cache_thread.shutdown(wait=True)
        if self._node is not None:
            await self._node.close()
        for subscription in list(self._subscriptions):
            subscription.end()

    def _check_open(self) -> None:
        if self._state != "open":
            raise ClosedError("the coordinator is closed" if self._state == "closed"
                              else "the coordinator is not started: use 'async with PeerDiscoveryCoordinator(...)'")


class _Context(LayerContext):
    """The coordinator as one local layer sees it."""

    def __init__(self, coordinator: PeerDiscoveryCoordinator, layer: str) -> None:
        self._coordinator = coordinator
        self._layer = layer

    @property
    def identity(self) -> Identity:
        return self._coordinator._identity

    @property
    def own_record(self) -> PeerRecord | None:
        node = self._coordinator._node
        return node.record if node is not None and not node.closed else None

    def on_own_record_changed(self, callback: Callable[[PeerRecord], None]) -> None:
        if not callable(callback):
            raise ArgumentTypeError("callback must be callable")
        self._coordinator._own_record_callbacks.append(callback)
        if self._coordinator._own_record is not None:
            callback(self._coordinator._own_record)

    def peer_seen(self, record: PeerRecord, *, address: Address | None = None, rssi: int | None = None,
                  check_reachable: bool = True) -> None:
        self._coordinator._sighting(self._layer, record, address, rssi, bool(check_reachable))

    def peer_gone(self, node_id: bytes) -> None:
        self._coordinator._gone(self._layer, node_id)

    async def ping(self, record: PeerRecord, address: Address | None = None) -> bool:
        return await self._coordinator._ping_peer(self._layer, record, address)

    async def resolve_peer(self, peer_id: bytes, *, key_matches: Callable[[bytes], bool] | None = None,
                           lookup: bool = True, deadline_s: float = 5.0) -> ResolvedPeer | None:
        return await self._coordinator._resolve_peer(self._layer, peer_id, key_matches, lookup, deadline_s)

    def layer_state(self, state: str, reason: str | None = None) -> None:
        self._coordinator._layer_reported(self._layer, state, reason)

    @property
    def bound(self) -> list[tuple[str, int]]:
        node = self._coordinator._node
        return node.bound if node is not None and not node.closed else []

    def known_peer(self, node_id: bytes) -> PeerInfo | None:
        try:
            return self._coordinator._table.get(check_node_id("node_id", node_id))
        except SovereignDiscoveryError:
            return None

    def known_peers(self) -> list[PeerInfo]:
        return self._coordinator._table.peers()


def _unscoped_link_local(address: Address) -> bool:
    return address.version == 6 and address.ip.is_link_local and not address.ip.scope_id


def _default_layer(name: str, config: Config) -> LocalLayer | str:
    """The installation's layer ``name`` built from ``config.local``, or why there is none."""
    module_name = {"mdns": "mdns", "ble": "ble"}[name]
    try:
        import importlib

        module = importlib.import_module(f".{module_name}", __package__)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.endswith(f"sovereign_discovery.{module_name}"):
            return f"this version of sovereign_discovery has no {name} layer yet"
        return f"{exc.name} is not installed (pip install 'sovereign-discovery[{name}]')"
    return module.create_layer(config.local)
