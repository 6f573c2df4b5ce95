"""Public testing helpers: a simulated network with virtual time that runs sans-IO hosts.

:class:`SimulatedNetwork` delivers datagrams between hosts through an event heap, with a seeded
link model (log-normal latency, loss, duplication; reordering follows from latency jitter), and
lets tests crash and restart hosts. Nothing here opens a socket or reads a clock, so a run is a
pure function of its seed and inputs: the same seed gives the same trace.

A host is anything with the engine's four methods (``docs/engine.md``)::

    receive_datagram(data: bytes, source: Address, now: float) -> None
    handle_timer(now: float) -> None
    datagrams_to_send() -> list[tuple[Address, bytes]]
    next_deadline() -> float | None

After every call into a host the network drains its datagrams and keeps its single timer armed
at ``next_deadline()``, moved only when the deadline comes sooner, exactly as the asyncio driver
does (a timer that fires early finds nothing due and is armed again), so the very same engine runs
under both, and the event heap holds about one timer per host rather than one per call.
"""

from __future__ import annotations

import asyncio
import heapq
import math
import random
from dataclasses import dataclass
from typing import Callable, Protocol

from .addresses import Address
from .errors import ArgumentTypeError, ArgumentValueError
from .identity import Identity
from .layers import LayerContext, ResolvedPeer, record_matches
from .peer_table import PeerInfo
from .records import PeerRecord

__all__ = ["SimulatedHost", "LinkModel", "SimulatedNetwork", "RecordingLayerContext"]


class SimulatedHost(Protocol):
    def receive_datagram(self, data: bytes, source: Address, now: float) -> None: ...

    def handle_timer(self, now: float) -> None: ...

    def datagrams_to_send(self) -> list[tuple[Address, bytes]]: ...

    def next_deadline(self) -> float | None: ...


@dataclass(frozen=True, slots=True)
class LinkModel:
    """How every link behaves. Latency is log-normal: ``latency_median_s`` is its median and
    ``latency_sigma`` the standard deviation of its logarithm (0 = constant latency, no
    reordering); 0.5 gives a p95 of about 2.3× the median, a common fit for wide-area round
    trips. ``loss`` and ``duplicate`` are independent per-datagram probabilities."""

    latency_median_s: float = 0.05
    latency_sigma: float = 0.5
    loss: float = 0.0
    duplicate: float = 0.0

    def __post_init__(self) -> None:
        if not self.latency_median_s > 0:
            raise ArgumentValueError(f"latency_median_s must be > 0, not {self.latency_median_s}")
        if not self.latency_sigma >= 0:
            raise ArgumentValueError(f"latency_sigma must be >= 0, not {self.latency_sigma}")
        for name in ("loss", "duplicate"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ArgumentValueError(f"{name} must be in [0, 1), not {value}")

    def latency(self, rng: random.Random) -> float:
        if self.latency_sigma == 0:
            return self.latency_median_s
        return self.latency_median_s * math.exp(rng.gauss(0.0, self.latency_sigma))


_DELIVER, _TIMER = 0, 1


class SimulatedNetwork:
    """Hosts at virtual addresses, one event heap, one seeded random generator.

    Addresses are virtual (``10.x.y.z`` by default): nothing is ever sent on a real network.
    """

    def __init__(self, *, seed: int = 0, link: LinkModel = LinkModel(), start_time: float = 0.0):
        if not isinstance(link, LinkModel):
            raise ArgumentTypeError(f"link must be a LinkModel, not {type(link).__name__}")
        self._rng = random.Random(seed)
        self._link = link
        self._now = float(start_time)
        self._heap: list[tuple[float, int, int, object]] = []
        self._seq = 0
        self._hosts: dict[Address, SimulatedHost] = {}
        self._crashed: set[Address] = set()
        self._timer_version: dict[Address, int] = {}
        self._armed: dict[Address, float] = {}  # when each host's one live timer entry fires
        self._next_index = 1
        self.stats: dict[str, int] = dict.fromkeys(
            ("sent", "delivered", "lost", "duplicated", "to_crashed", "to_unknown", "timers"), 0)

    @property
    def now(self) -> float:
        """Virtual time in seconds."""
        return self._now

    @property
    def link(self) -> LinkModel:
        return self._link

    @link.setter
    def link(self, model: LinkModel) -> None:
        """Change the link model from now on (datagrams in flight keep their fate)."""
        if not isinstance(model, LinkModel):
            raise ArgumentTypeError(f"link must be a LinkModel, not {type(model).__name__}")
        self._link = model

    def hosts(self) -> dict[Address, SimulatedHost]:
        return dict(self._hosts)

    def new_address(self) -> Address:
        """A fresh virtual address, 10.0.0.1:4000 onwards (16 million before it repeats)."""
        index = self._next_index
        self._next_index += 1
        return Address(f"10.{(index >> 16) & 255}.{(index >> 8) & 255}.{index & 255}", 4000)

    def add_host(self, host: SimulatedHost, address: Address | None = None) -> Address:
        """Attach ``host`` at ``address`` (a fresh one if omitted) and flush what it has to send."""
        address = address or self.new_address()
        if address in self._hosts and address not in self._crashed:
            raise ArgumentValueError(f"address {address} is taken")
        self._hosts[address] = host
        self._crashed.discard(address)
        self._after_call(address, host)
        return address

    def crash(self, address: Address) -> None:
        """The host stops: datagrams to it vanish, its timer never fires, it sends nothing."""
        if address not in self._hosts:
            raise ArgumentValueError(f"no host at {address}")
        self._crashed.add(address)
        self._timer_version[address] = self._timer_version.get(address, 0) + 1
        self._armed.pop(address, None)

    def is_crashed(self, address: Address) -> bool:
        return address in self._crashed

    def restart(self, address: Address, host: SimulatedHost) -> None:
        """Put a (new, state-less or restored) host back at a crashed host's address."""
        if address not in self._crashed:
            raise ArgumentValueError(f"host at {address} is not crashed")
        self.add_host(host, address)

    def call(self, address: Address, action: Callable[[SimulatedHost, float], object]) -> object:
        """Run ``action(host, now)`` (a command such as starting a lookup), then flush the host."""
        host = self._hosts[address]
        result = action(host, self._now)
        self._after_call(address, host)
        return result

    # --- running --------------------------------------------------------------------------------

    def step(self) -> bool:
        """Process one event. False when nothing is left to do."""
        while self._heap:
            when, _, kind, payload = heapq.heappop(self._heap)
            self._now = max(self._now, when)
            if kind == _TIMER:
                address, version = payload  # type: ignore[misc]
                if self._timer_version.get(address) != version or address in self._crashed:
                    continue  # re-armed or crashed since
                del self._armed[address]
                host = self._hosts[address]
                self.stats["timers"] += 1
                host.handle_timer(self._now)
                self._after_call(address, host)
                return True
            destination, source, data = payload  # type: ignore[misc]
            host = self._hosts.get(destination)
            if host is None:
                self.stats["to_unknown"] += 1
                continue
            if destination in self._crashed:
                self.stats["to_crashed"] += 1
                continue
            self.stats["delivered"] += 1
            host.receive_datagram(data, source, self._now)
            self._after_call(destination, host)
            return True
        return False

    def run_until(self, time: float | None = None, *, until: Callable[[], bool] | None = None,
                  max_events: int = 10_000_000) -> int:
        """Process events until virtual ``time``, until ``until()`` is true, or until nothing is
        left, but never more than ``max_events`` (so every run is bounded). Returns the number of
        events processed."""
        if not isinstance(max_events, int) or max_events < 1:
            raise ArgumentValueError(f"max_events must be an int >= 1, not {max_events!r}")
        done = 0
        while done < max_events:
            if until is not None and until():
                break
            if time is not None and (not self._heap or self._heap[0][0] > time):
                self._now = max(self._now, time)
                break
            if not self.step():
                break
            done += 1
        return done

    # --- plumbing -------------------------------------------------------------------------------

    def _push(self, when: float, kind: int, payload: object) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (when, self._seq, kind, payload))

    def _after_call(self, address: Address, host: SimulatedHost) -> None:
        out = host.datagrams_to_send()
        if out:
            self._deliver_later(address, out)
        deadline = host.next_deadline()
        if deadline is None:
            return  # an armed timer stays: firing early is harmless
        deadline = max(deadline, self._now)
        armed = self._armed.get(address)
        if armed is not None and armed <= deadline:
            return  # the armed timer comes first (or at the same time): it re-arms when it fires
        version = self._timer_version.get(address, 0) + 1
        self._timer_version[address] = version
        self._armed[address] = deadline
        self._push(deadline, _TIMER, (address, version))

    def _deliver_later(self, source: Address, out: list[tuple[Address, bytes]]) -> None:
        """Put each datagram on the heap at now + its drawn latency (or lose or duplicate it):
        the link model of :class:`LinkModel`, drawn in the same order from the same generator."""
        rng, link, stats = self._rng, self._link, self.stats
        for destination, data in out:
            stats["sent"] += 1
            if link.loss and rng.random() < link.loss:
                stats["lost"] += 1
                continue
            if type(data) is not bytes:
                data = bytes(data)
            copies = 1
            if link.duplicate and rng.random() < link.duplicate:
                stats["duplicated"] += 1
                copies = 2
            for _ in range(copies):
                self._push(self._now + link.latency(rng), _DELIVER, (destination, source, data))



class RecordingLayerContext(LayerContext):
    """A stand-in for the coordinator as a local layer sees it (:class:`~sovereign_discovery.
    layers.LayerContext`), to test a layer alone: it holds an own record (change it with
    :meth:`change_own_record`), answers ``known_peer(s)`` from the ``known`` records, and records
    what the layer reports: ``seen`` gets ``(record, address, rssi, check_reachable)`` per
    ``peer_seen``, ``gone`` a node ID per ``peer_gone``, ``states`` ``(state, reason)`` per
    ``layer_state``. It cannot PING (see ``LayerContext.ping``).

    ``resolve_peer`` answers like the coordinator, in its order: from ``known`` (source
    ``"table"``), from ``local`` (records another local layer verified, source ``"mdns"``), then,
    only when the layer allows a lookup, from ``dht`` (records the DHT would find, source
    ``"dht"``) after ``dht_delay_s`` (a slow lookup); ``dht_error`` makes that step raise it.
    ``resolves`` records each call as ``(peer_id, by_key, lookup)``."""

    def __init__(self, identity: Identity | None = None, own: PeerRecord | None = None,
                 known: tuple[PeerRecord, ...] = (), *, local: tuple[PeerRecord, ...] = (),
                 dht: tuple[PeerRecord, ...] = (), dht_delay_s: float = 0.0) -> None:
        self._identity = identity if identity is not None else Identity.generate()
        self.own = own
        self.known = {bytes(r.node_id): r for r in known}
        self.local = {bytes(r.node_id): r for r in local}
        self.dht = {bytes(r.node_id): r for r in dht}
        self.dht_delay_s = dht_delay_s
        self.dht_error: BaseException | None = None
        self.callbacks: list[Callable[[PeerRecord], None]] = []
        self.seen: list[tuple] = []
        self.gone: list[bytes] = []
        self.states: list[tuple[str, str | None]] = []
        self.resolves: list[tuple[bytes, bool, bool]] = []

    @property
    def identity(self) -> Identity:
        return self._identity

    @property
    def own_record(self) -> PeerRecord | None:
        return self.own

    def on_own_record_changed(self, callback: Callable[[PeerRecord], None]) -> None:
        self.callbacks.append(callback)
        if self.own is not None:
            callback(self.own)

    def change_own_record(self, record: PeerRecord) -> None:
        self.own = record
        for callback in self.callbacks:
            callback(record)

    def peer_seen(self, record, *, address=None, rssi=None, check_reachable=True) -> None:
        self.seen.append((record, address, rssi, check_reachable))

    def peer_gone(self, node_id: bytes) -> None:
        self.gone.append(bytes(node_id))

    def known_peer(self, node_id: bytes) -> PeerInfo | None:
        record = self.known.get(bytes(node_id))
        return None if record is None else PeerInfo(record.node_id, record, frozenset({"dht"}), 0.0, 0.0,
                                                   record.addresses)

    def known_peers(self) -> list[PeerInfo]:
        return [self.known_peer(key) for key in self.known]

    async def resolve_peer(self, peer_id: bytes, *, key_matches: Callable[[bytes], bool] | None = None,
                           lookup: bool = True, deadline_s: float = 5.0) -> ResolvedPeer | None:
        import time

        self.resolves.append((bytes(peer_id), key_matches is not None, bool(lookup)))
        sources = [("table", self.known), ("mdns", self.local)]
        if lookup:
            sources.append(("dht", self.dht))
        for source, records in sources:
            if source == "dht":
                await asyncio.sleep(self.dht_delay_s)
                if self.dht_error is not None:
                    raise self.dht_error
            for record in records.values():
                if record_matches(record, bytes(peer_id), key_matches, time.time()):
                    return ResolvedPeer(record, source)
        return None

    def layer_state(self, state: str, reason: str | None = None) -> None:
        self.states.append((state, reason))
