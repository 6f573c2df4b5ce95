"""The interface between the coordinator and a local discovery layer (mDNS, Bluetooth LE), so
that layers come and go without the coordinator knowing how they work (docs/coordinator.md,
"Writing a local layer").

A layer is an object with a ``name`` (its source name in the peer table: ``"mdns"`` or ``"ble"``)
and three methods::

    async def start(self, context: LayerContext) -> None   # running when it returns
    async def close(self) -> None                          # goodbyes sent, tasks ended; idempotent
    def stats(self) -> dict                                # counters, JSON-able

``start`` raises :class:`LayerUnavailable` with a reason a user can act on ("no Bluetooth
adapter", "python-zeroconf is not installed: pip install 'sovereign-discovery[mdns]'") when the
layer cannot run here; the coordinator reports it and the other layers keep running.

A layer reports what it sees through the :class:`LayerContext` the coordinator gives it:
:meth:`LayerContext.peer_seen` with a *verified* :class:`~sovereign_discovery.records.PeerRecord`
(decode untrusted bytes with ``PeerRecord.decode``; never build trust on an unverified field),
and :meth:`LayerContext.peer_gone` when the peer said goodbye or stopped answering
(:meth:`LayerContext.ping` checks that a peer still answers). The context also tells the layer
the node's own record, and when it changes (re-announce then), and the node's UDP sockets
(:attr:`LayerContext.bound`). A layer that sees only a short peer ID (BLE's hash or rotating
token) asks :meth:`LayerContext.resolve_peer` for the record before it connects to the peer; a
layer whose backend goes away and comes back after ``start`` (bluetoothd restarting) says so with
:meth:`LayerContext.layer_state`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Coroutine, Hashable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from .addresses import Address
from .errors import SovereignDiscoveryError
from .identity import Identity
from .peer_table import PeerInfo
from .records import PeerRecord

__all__ = ["LocalLayer", "LayerContext", "LayerUnavailable", "LayerTasks", "ResolvedPeer", "record_matches",
           "LAYER_STATES"]

_log = logging.getLogger(__name__)

#: The states a running layer may report through :meth:`LayerContext.layer_state`.
LAYER_STATES = ("running", "unavailable")


class LayerTasks:
    """The background tasks of a local layer: each named ``"<prefix> <name>"``; one that fails is
    counted in ``counts["internal_errors"]`` and logged with its traceback; :meth:`cancel_all`
    ends them together. Keyed tasks (at most one per key, e.g. a resolution per peer) can be
    looked up (``key in tasks``, ``len(tasks)``) and cancelled by key."""

    def __init__(self, prefix: str, counts: Counter) -> None:
        self._prefix = prefix
        self._counts = counts
        self._tasks: set[asyncio.Task] = set()
        self._keyed: dict[Hashable, asyncio.Task] = {}

    def spawn(self, coro: Coroutine, name: str) -> asyncio.Task:
        task = asyncio.create_task(coro, name=f"{self._prefix} {name}")
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def spawn_keyed(self, key: Hashable, coro: Coroutine, name: str,
                    on_done: Callable[[Hashable], None] | None = None) -> asyncio.Task:
        """Run ``coro`` as the task of ``key`` (the caller checks none runs); ``on_done(key)``
        after it ends, however it ends."""
        task = asyncio.create_task(coro, name=f"{self._prefix} {name}")
        self._keyed[key] = task

        def done(task: asyncio.Task) -> None:
            if self._keyed.get(key) is task:
                del self._keyed[key]
            self._report(task)
            if on_done is not None:
                on_done(key)

        task.add_done_callback(done)
        return task

    def __contains__(self, key: Hashable) -> bool:
        return key in self._keyed

    def __len__(self) -> int:
        """How many keyed tasks run."""
        return len(self._keyed)

    @property
    def background_count(self) -> int:
        """How many unkeyed tasks (the layer's loops, one-off jobs) run."""
        return len(self._tasks)

    def cancel(self, key: Hashable) -> None:
        task = self._keyed.pop(key, None)
        if task is not None:
            task.cancel()

    async def cancel_all(self) -> None:
        """Cancel every task and wait until they have ended."""
        tasks = [*self._tasks, *self._keyed.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._keyed.clear()

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        self._report(task)

    def _report(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            self._counts["internal_errors"] += 1
            _log.error("%s failed", task.get_name(), exc_info=task.exception())


class LayerUnavailable(SovereignDiscoveryError):
    """A layer cannot run on this machine; ``reason`` says why, in words a user can act on."""

    def __init__(self, layer: str, reason: str) -> None:
        super().__init__(f"{layer} unavailable: {reason}")
        self.layer = layer
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ResolvedPeer:
    """What :meth:`LayerContext.resolve_peer` found: a verified ``record`` and where it came from
    (``source``): ``"table"`` (the peer table), the name of the local layer that verified it
    (``"mdns"``), or ``"dht"`` (a routing-table contact's own record, or found by a lookup)."""

    record: PeerRecord
    source: str


def record_matches(record: PeerRecord, peer_id: bytes, key_matches: Callable[[bytes], bool] | None,
                   now: float) -> bool:
    """Whether the unexpired ``record`` is the one a short ``peer_id`` names: its node ID begins
    with ``peer_id``, or, with ``key_matches``, ``key_matches(record.public_key)`` holds (a
    callable that raises counts as no match)."""
    if record.is_expired(now):
        return False
    if key_matches is None:
        return bytes(record.node_id).startswith(peer_id)
    try:
        return bool(key_matches(record.public_key))
    except Exception:
        return False


@runtime_checkable
class LocalLayer(Protocol):
    name: str

    async def start(self, context: "LayerContext") -> None: ...

    async def close(self) -> None: ...

    def stats(self) -> dict: ...


class LayerContext(ABC):
    """What the coordinator offers a layer. Every method is called on the event loop's thread and
    never raises because of what the layer passes (mistakes are logged and counted)."""

    @property
    @abstractmethod
    def identity(self) -> Identity:
        """The node's identity (a layer may sign with it, e.g. a rotating BLE token)."""

    @property
    @abstractmethod
    def own_record(self) -> PeerRecord | None:
        """The node's current signed record (None until it has one)."""

    @abstractmethod
    def on_own_record_changed(self, callback: Callable[[PeerRecord], None]) -> None:
        """Call ``callback`` with the own record now (if there is one yet) and with each new one
        (a layer re-announces then)."""

    @abstractmethod
    def peer_seen(self, record: PeerRecord, *, address: Address | None = None, rssi: int | None = None,
                  check_reachable: bool = True) -> None:
        """The layer saw the peer of ``record`` (verified) at ``address`` (where it saw it, if it
        knows), with signal strength ``rssi`` (dBm, BLE). With ``check_reachable`` the coordinator
        first PINGs the peer over an authenticated session (at ``address``, else the record's
        addresses) and reports it only if it answers; the answer also puts it in the DHT routing
        table. Sightings are rate-limited per peer and bounded in number."""

    @abstractmethod
    def peer_gone(self, node_id: bytes) -> None:
        """The layer no longer sees the peer (goodbye, or failed liveness checks)."""

    @abstractmethod
    def known_peer(self, node_id: bytes) -> PeerInfo | None:
        """The peer table's entry for ``node_id`` (e.g. to resolve a BLE hash without a GATT read)."""

    @abstractmethod
    def known_peers(self) -> list[PeerInfo]:
        """Every peer-table entry, local first."""

    async def ping(self, record: PeerRecord, address: Address | None = None) -> bool:
        """Whether the peer of ``record`` answers an authenticated PING now: at ``address``
        first, then at the record's addresses (at most four tries, each taking at most about
        two request timeouts; bound it with ``asyncio.wait_for``). A layer's liveness check of
        a peer it vouches for: True or False, never an exception for what the layer passes.
        A context that cannot PING raises NotImplementedError (the layer then runs without
        liveness checks)."""
        raise NotImplementedError

    async def resolve_peer(self, peer_id: bytes, *, key_matches: Callable[[bytes], bool] | None = None,
                           lookup: bool = True, deadline_s: float = 5.0) -> ResolvedPeer | None:
        """A verified, unexpired record of the peer a short ``peer_id`` names, or None.

        Without ``key_matches``, ``peer_id`` (1 to 20 bytes) is a prefix of the node ID (BLE's
        16-byte hash). With it, ``peer_id`` is opaque (a rotating token) and a record matches when
        ``key_matches(public_key)`` is true: only keys the node already knows can match (the
        peer table, records other local layers verified, routing-table contacts), since a token
        cannot be looked up. Tried in order: the peer table, the records other local layers
        reported (verified, even if their PING has not been answered yet), then, only with
        ``lookup``, the DHT over the network (a routing-table contact whose ID or key matches is
        asked for its own record; for a prefix, a FIND_NODE towards it, then the record of a
        contact whose ID begins with it). Bounded by ``deadline_s``; never raises for what the
        layer passes (None then). The caller still checks the record against what it saw.
        This default answers from :meth:`known_peers` only."""
        now = time.time()
        for peer in self.known_peers():
            if record_matches(peer.record, bytes(peer_id), key_matches, now):
                return ResolvedPeer(peer.record, "table")
        return None

    def layer_state(self, state: str, reason: str | None = None) -> None:
        """The layer's state changed after ``start``: ``"unavailable"`` (with ``reason``) while
        its backend is gone (bluetoothd stopped, the adapter removed), ``"running"`` once it
        works again. The coordinator reports it (``LayerStateChanged``, ``stats()``). This
        default ignores it."""

    @property
    def bound(self) -> list[tuple[str, int]]:
        """``(host, port)`` of each UDP socket of the node (wildcards included): the port a layer
        announces when the own record has no address yet. Empty when unknown."""
        return []
