"""The Bluetooth LE local layer (docs/local-discovery.md, "Bluetooth LE"; the coordinator loads it
with :func:`create_layer`).

What it does:

- **Advertises** the node's 20-byte payload (:mod:`~sovereign_discovery.ble_payload`: version and
  flags, capability bits, the stable peer hash or a rotating token, the record's seq mod 256)
  under the 16-bit service UUID, and **serves** the full signed record from a GATT
  characteristic. It re-advertises when the own record changes and, with ``rotating_token``, at
  every token window.
- **Scans** for the same UUID. A sighting is **resolved** without a radio connection when the peer
  table already holds a record whose key matches the advertised hash (or this window's token) and
  whose seq matches the hint; else through :meth:`~sovereign_discovery.layers.LayerContext.
  resolve_peer` (records other local layers verified, then the DHT: rate-limited, each bounded
  in time); otherwise, if the advertiser offers GATT, the layer connects and reads the record
  (nearest device first, by RSSI; rate-limited; bounded in size and time), checks its signature,
  expiry and bounds (``PeerRecord.decode``). Whatever the source, the record must match the
  advertised hash or token.
- **Reports** verified peers with ``peer_seen(record, rssi=...)``: a record with IP addresses is
  PINGed by the coordinator first (``check_reachable=True``); a BLE-only record is reported as is.
- **Loses** a peer none of whose devices was seen for ``lost_after_s`` (3 × ``scan_interval_s``
  by default): ``peer_gone``.

Every way BLE can be missing ends ``start()`` with one :class:`~sovereign_discovery.layers.
LayerUnavailable` ("ble", reason): a library not installed, no D-Bus system bus, no BlueZ, no
adapter (or not the named one), adapter powered off, or a backend failing to start.

**When BlueZ goes away later** (bluetoothd restarting drops every registration; BlueZ calls
``Release`` on an advertisement it drops; the adapter is removed or powered off; the system bus
goes), a watcher notices (``BleStack.watch``) and the layer reports ``unavailable`` with the reason
through :meth:`~sovereign_discovery.layers.LayerContext.layer_state`, then restarts its backends
(probe, scan, GATT application, advertisement) as soon as BlueZ is back, retrying with bounded
exponential backoff meanwhile, and reports ``running`` again.

Bad input (malformed service data, records that do not verify or do not match, oversized or slow
GATT answers, floods of devices) is dropped and counted by reason in ``stats()["dropped"]``,
logged at info the first time per reason and at debug afterwards; nothing from the air raises
out of the layer. Memory is bounded by ``max_tracked_devices`` and the fetch queue bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import Counter, OrderedDict
from collections.abc import Callable

from .ble_backends import (
    BleAdvertiser,
    BleScanner,
    BleSighting,
    BleStack,
    BlueZStack,
    GattFetchError,
    GattRecordFetcher,
    GattRecordServer,
    ProbeResult,
    describe_ble_error,
)
from .ble_payload import ID_BYTES, BlePayload, BlePayloadError, rotating_token, rotation_window
from .config import LocalConfig
from .errors import (
    ArgumentTypeError,
    ArgumentValueError,
    BadSignatureError,
    RecordExpiredError,
    RecordFromFutureError,
    RecordError,
    RecordTooLargeError,
)
from .layers import LayerContext, LayerTasks, LayerUnavailable
from .peer_table import PeerInfo
from .records import PeerRecord

__all__ = ["BleLayer", "create_layer", "MAX_GATT_RECORD_BYTES"]

_log = logging.getLogger(__name__)

#: The largest record served or accepted over GATT: the ATT maximum attribute value (Core v5.4,
#: Vol 3, Part F, §3.2.9). A larger own record is not served (the GATT flag is cleared).
MAX_GATT_RECORD_BYTES = 512
#: Devices tracked at once; beyond it the least recently seen unresolved one makes room.
DEFAULT_MAX_TRACKED_DEVICES = 256
#: GATT reads waiting for the radio; more are dropped (``fetch_queue_full``).
MAX_QUEUED_FETCHES = 32
#: One GATT read may take this long (connect + discovery + read), then it is abandoned.
DEFAULT_GATT_TIMEOUT_S = 10.0
#: GATT reads: a token bucket of this many, refilled at this rate (one connection at a time).
DEFAULT_FETCH_BURST = 4
DEFAULT_FETCHES_PER_S = 0.5
#: A device whose read failed (or whose record was stale) is not read again before this.
REFETCH_AFTER_S = 30.0
#: A resolved device's sightings reach the coordinator at most this often.
REPORT_EVERY_S = 1.0
#: The table index used to resolve hashes is rebuilt at most this often (floods stay cheap).
INDEX_EVERY_S = 1.0
#: Bound on each backend's start and stop.
BACKEND_TIMEOUT_S = 10.0
#: RSSI values outside this range are treated as unknown (a malformed report).
_RSSI_RANGE = range(-127, 21)
#: Resolutions through the context (other layers' records, the DHT) in flight at once; a device
#: beyond it goes straight to GATT (``resolve_busy``).
MAX_RESOLVES_IN_FLIGHT = 2
#: Each resolution through the context may take this long; then it falls through to GATT.
DEFAULT_RESOLVE_TIMEOUT_S = 5.0
#: Resolutions that may ask the DHT over the network: a token bucket of this many, refilled at
#: this rate; without a token the context answers from memory only (``resolve_local_only``).
DEFAULT_LOOKUP_BURST = 4
DEFAULT_LOOKUPS_PER_S = 0.2
#: An advertised (peer ID, seq hint) resolved through the context is not asked again before
#: this (a new seq hint may be); at most ``MAX_RESOLVES_REMEMBERED`` are remembered.
RERESOLVE_AFTER_S = 60.0
MAX_RESOLVES_REMEMBERED = 1024
#: Where a resolved record may come from (stats keys ``resolved_from_<source>``).
_RESOLVE_SOURCES = ("table", "mdns", "dht")
#: Restarting the backends after BlueZ went away: the first retry after this, doubling (with
#: jitter) up to the maximum; a "back" signal from the watcher retries at once.
RECOVER_FIRST_S = 0.5
RECOVER_MAX_S = 30.0


class _TokenBucket:
    """``burst`` tokens, refilled at ``rate`` per second (monotonic time)."""

    __slots__ = ("burst", "rate", "tokens", "at")

    def __init__(self, burst: int, rate: float) -> None:
        self.burst, self.rate = float(burst), float(rate)
        self.tokens = self.burst
        self.at = time.monotonic()

    def take(self) -> float:
        """0 if a token was taken now, else the seconds until one is there (none taken)."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class _Device:
    """One Bluetooth address seen advertising our UUID."""

    __slots__ = ("address", "sighting", "payload", "last_seen", "rssi", "record", "reported_at",
                 "next_fetch_at", "unresolvable_counted")

    def __init__(self, sighting: BleSighting, payload: BlePayload, now: float) -> None:
        self.address = sighting.address
        self.sighting = sighting
        self.payload = payload
        self.last_seen = now
        self.rssi: int | None = None
        self.record: PeerRecord | None = None
        self.reported_at = float("-inf")
        self.next_fetch_at = 0.0
        self.unresolvable_counted = False


class BleLayer:
    """The Bluetooth LE local layer (see the module docstring). ``config`` supplies
    ``ble_adapter``, ``scan_interval_s``, ``rotating_token``, ``token_rotation_s`` and ``mdns``
    (the payload's "also on mDNS" flag). ``stack`` is the backend source (default: BlueZ through
    bleak, bless and dbus-fast; tests pass a :class:`~sovereign_discovery.ble_backends.FakeStack`).
    The remaining arguments bound the work; their defaults are the module's constants."""

    name = "ble"

    def __init__(self, config: LocalConfig | None = None, *, stack: BleStack | None = None,
                 lost_after_s: float | None = None, gatt_timeout_s: float = DEFAULT_GATT_TIMEOUT_S,
                 max_tracked_devices: int = DEFAULT_MAX_TRACKED_DEVICES,
                 fetches_per_s: float = DEFAULT_FETCHES_PER_S, fetch_burst: int = DEFAULT_FETCH_BURST,
                 resolve_timeout_s: float = DEFAULT_RESOLVE_TIMEOUT_S,
                 lookups_per_s: float = DEFAULT_LOOKUPS_PER_S, lookup_burst: int = DEFAULT_LOOKUP_BURST,
                 wall_clock: Callable[[], float] = time.time) -> None:
        config = LocalConfig() if config is None else config
        if not isinstance(config, LocalConfig):
            raise ArgumentTypeError(f"config must be a LocalConfig, not {type(config).__name__}")
        lost_after_s = 3 * config.scan_interval_s if lost_after_s is None else lost_after_s
        for name, value in (("lost_after_s", lost_after_s), ("gatt_timeout_s", gatt_timeout_s),
                            ("fetches_per_s", fetches_per_s), ("resolve_timeout_s", resolve_timeout_s),
                            ("lookups_per_s", lookups_per_s)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ArgumentValueError(f"{name} must be a positive number, not {value!r}")
        for name, value in (("max_tracked_devices", max_tracked_devices), ("fetch_burst", fetch_burst),
                            ("lookup_burst", lookup_burst)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ArgumentValueError(f"{name} must be a positive int, not {value!r}")
        self.config = config
        self._stack = stack
        self._lost_after_s = float(lost_after_s)
        self._gatt_timeout_s = float(gatt_timeout_s)
        self._max_devices = max_tracked_devices
        self._wall = wall_clock
        self._context: LayerContext | None = None
        self._probe: ProbeResult | None = None
        self._scanner: BleScanner | None = None
        self._advertiser: BleAdvertiser | None = None
        self._server: GattRecordServer | None = None
        self._fetcher: GattRecordFetcher | None = None
        self._own: PeerRecord | None = None
        self._own_ids: set[bytes] = set()
        self._serving = False
        self._advertising = False
        self._devices: OrderedDict[str, _Device] = OrderedDict()  # least recently seen first
        self._peer_devices: dict[bytes, set[str]] = {}  # reported node ID -> its addresses
        self._pending: set[str] = set()  # addresses waiting for a GATT read
        self._fetch_wakeup = asyncio.Event()
        self._fetch_bucket = _TokenBucket(fetch_burst, fetches_per_s)
        self._resolve_timeout_s = float(resolve_timeout_s)
        self._lookup_bucket = _TokenBucket(lookup_burst, lookups_per_s)
        self._resolved_at: OrderedDict[tuple[bytes, int], float] = OrderedDict()  # (peer ID, seq hint)
        self._index: dict[bytes, PeerInfo] = {}
        self._index_at = float("-inf")
        self._index_window: int | None = None
        self._token_cache: dict[bytes, tuple[int, dict[bytes, int]]] = {}
        self._readvertise_lock = asyncio.Lock()
        self._watcher = None
        self._watched_adapter: str | None = None
        self._unavailable: str | None = None  # why BlueZ is unusable now (after start), else None
        self._needs_restart = False
        self._needs_readvertise = False
        self._recover_wakeup = asyncio.Event()
        self._rng = random.Random()
        self._count: Counter[str] = Counter()
        #: background tasks; keyed: the resolution of a device through the context, by address
        self._tasks = LayerTasks("ble", self._count)
        self._dropped: Counter[str] = Counter()
        self._state = "new"  # new, running, closed

    # --- life cycle ---------------------------------------------------------------------------------

    async def start(self, context: LayerContext) -> None:
        """Probe BLE, start scanning, and advertise and serve the own record (now if there is one,
        else when it comes). Raises LayerUnavailable (nothing left running) if BLE cannot run."""
        if self._state != "new":
            raise LayerUnavailable("ble", f"the layer is {self._state}; a layer starts once")
        adapter = self.config.ble_adapter
        stack = self._stack = self._stack if self._stack is not None else BlueZStack(adapter)
        try:
            self._probe = await asyncio.wait_for(stack.probe(), BACKEND_TIMEOUT_S)
            adapter = self._probe.adapter
            await self._start_watcher(adapter)
            self._fetcher = stack.record_fetcher(adapter)
            self._context = context
            self._state = "starting"  # sightings are tracked, reported once running
            scanner = stack.scanner(adapter)
            await asyncio.wait_for(scanner.start(self._on_sighting), BACKEND_TIMEOUT_S)
            self._scanner = scanner
            if self._probe.can_advertise:
                self._advertiser = stack.advertiser(adapter, self._on_released)
            if self._probe.can_serve_gatt:
                self._server = stack.record_server(adapter)
            own = context.own_record
            if own is not None:
                await self._advertise(own, raise_errors=True)
        except LayerUnavailable:
            await self._abandon_start()
            raise
        except Exception as exc:
            await self._abandon_start()
            raise LayerUnavailable("ble", describe_ble_error(exc, adapter)) from exc
        self._state = "running"
        context.on_own_record_changed(self._on_own_record)
        now = time.monotonic()
        for device in list(self._devices.values()):  # seen while starting
            self._resolve(device, now)
        self._tasks.spawn(self._sweep_loop(), "sweep")
        self._tasks.spawn(self._fetch_loop(), "fetch")
        self._tasks.spawn(self._recover_loop(), "recover")
        if self.config.rotating_token:
            self._tasks.spawn(self._rotate_loop(), "rotate")
        _log.info("BLE layer running on %s (advertising: %s, GATT record: %s)", adapter,
                  self._advertising, self._serving)

    async def close(self) -> None:
        """Stop advertising, serving and scanning; end every task. Idempotent."""
        if self._state == "closed":
            return
        self._state = "closed"
        await self._tasks.cancel_all()
        await self._stop_backends()
        await self._stop_watcher()
        self._devices.clear()
        self._pending.clear()

    async def _abandon_start(self) -> None:
        await self._stop_backends()
        await self._stop_watcher()
        self._state = "new"
        self._context = None
        self._devices.clear()
        self._pending.clear()

    async def _stop_backends(self) -> None:
        for part in (self._scanner, self._advertiser, self._server):
            if part is not None:
                try:
                    await asyncio.wait_for(part.stop(), BACKEND_TIMEOUT_S)
                except Exception as exc:
                    _log.debug("stopping %s failed: %s", type(part).__name__, exc)
        self._scanner = self._advertiser = self._server = None
        self._advertising = self._serving = False

    def stats(self) -> dict:
        """Counters (JSON-able). ``dropped`` counts refused input by reason."""
        return {
            "adapter": self._probe.adapter if self._probe else self.config.ble_adapter,
            "advertising": self._advertising,
            "serving_record": self._serving,
            "rotating_token": self.config.rotating_token,
            "bluez": "available" if self._unavailable is None else f"unavailable: {self._unavailable}",
            "tracked_devices": len(self._devices),
            "peers_seen": len(self._peer_devices),
            "pending_fetches": len(self._pending),
            "resolving": len(self._tasks),
            **dict(sorted(self._count.items())),
            "dropped": dict(sorted(self._dropped.items())),
        }

    # --- advertising the own record -------------------------------------------------------------------

    def _window(self, now: float | None = None) -> int:
        return rotation_window(self._wall() if now is None else now, self.config.token_rotation_s)

    def _on_own_record(self, record: PeerRecord) -> None:
        if self._state == "running" and (self._own is None or record.encode() != self._own.encode()):
            self._tasks.spawn(self._advertise(record), "advertise")

    async def _advertise(self, record: PeerRecord, *, raise_errors: bool = False) -> None:
        """(Re)start the GATT server and the advertisement for ``record``."""
        async with self._readvertise_lock:
            self._own = record
            self._own_ids = {bytes(record.node_id[:ID_BYTES])}
            encoded = record.encode()
            try:
                if self._server is not None and len(encoded) <= MAX_GATT_RECORD_BYTES:
                    if self._serving:
                        await asyncio.wait_for(self._server.update(encoded), BACKEND_TIMEOUT_S)
                    else:
                        await asyncio.wait_for(self._server.start(encoded), BACKEND_TIMEOUT_S)
                        self._serving = True
                elif self._server is not None:
                    self._count["own_record_too_large_for_gatt"] += 1
                    _log.warning("own record of %d bytes exceeds the GATT limit of %d: not served",
                                 len(encoded), MAX_GATT_RECORD_BYTES)
                if self._advertiser is None:
                    return
                window = self._window() if self.config.rotating_token else None
                payload = BlePayload.for_record(record, gatt=self._serving and len(encoded) <= MAX_GATT_RECORD_BYTES,
                                                mdns=self.config.mdns, rotating_window=window).encode()
                if window is not None:
                    self._own_ids = {payload[3:3 + ID_BYTES]}
                if self._advertising:
                    await asyncio.wait_for(self._advertiser.update(payload), BACKEND_TIMEOUT_S)
                else:
                    await asyncio.wait_for(self._advertiser.start(payload), BACKEND_TIMEOUT_S)
                    self._advertising = True
                self._count["advertisements"] += 1
            except Exception as exc:
                if raise_errors:
                    raise
                self._count["advertise_failed"] += 1
                _log.warning("BLE advertising failed: %s", describe_ble_error(exc, self._adapter))

    @property
    def _adapter(self) -> str | None:
        return self._probe.adapter if self._probe else self.config.ble_adapter

    async def _rotate_loop(self) -> None:
        """Re-advertise at every token window boundary."""
        period = self.config.token_rotation_s
        while self._state == "running":
            now = self._wall()
            await asyncio.sleep(max(0.05, (self._window(now) + 1) * period - now + 0.01))
            if self._own is not None:
                await self._advertise(self._own)

    # --- when BlueZ goes away and comes back ------------------------------------------------------------

    async def _start_watcher(self, adapter: str) -> None:
        """Watch BlueZ and the adapter (a stack without ``watch`` runs unwatched)."""
        await self._stop_watcher()
        watch = getattr(self._stack, "watch", None)
        if watch is not None:
            watcher = watch(adapter, self._on_bluez_change)
            await asyncio.wait_for(watcher.start(), BACKEND_TIMEOUT_S)
            self._watcher, self._watched_adapter = watcher, adapter

    async def _stop_watcher(self) -> None:
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            try:
                await asyncio.wait_for(watcher.stop(), BACKEND_TIMEOUT_S)
            except Exception as exc:
                _log.debug("stopping the BlueZ watcher failed: %s", exc)

    def _on_bluez_change(self, kind: str, reason: str) -> None:
        """The watcher saw BlueZ or the adapter go (``"lost"``: every registration is gone; the
        backends are restarted, at once, then with backoff while that fails) or come back
        (``"back"``: retry now if BLE is unavailable; nothing to do otherwise)."""
        if self._state != "running":
            return
        if kind == "lost":
            self._count["bluez_lost"] += 1
            self._set_unavailable(reason)
            self._needs_restart = True
        elif self._unavailable is None:
            return  # e.g. the adapter powered on while working: nothing was lost
        else:
            self._count["bluez_back"] += 1
        self._recover_wakeup.set()

    def _on_released(self) -> None:
        """BlueZ dropped our advertisement by itself (``LEAdvertisement1.Release``)."""
        if self._state != "running":
            return
        self._count["advertisement_released"] += 1
        _log.warning("BlueZ dropped the BLE advertisement (Release); registering it again")
        self._needs_readvertise = True
        self._recover_wakeup.set()

    def _set_unavailable(self, reason: str) -> None:
        if self._unavailable == reason:
            return
        self._unavailable = reason
        _log.warning("BLE unavailable: %s", reason)
        self._tell_state("unavailable", reason)

    def _set_available(self) -> None:
        if self._unavailable is None:
            return
        self._unavailable = None
        _log.info("BLE running again on %s", self._adapter)
        self._tell_state("running", None)
        self._fetch_wakeup.set()

    def _tell_state(self, state: str, reason: str | None) -> None:
        try:
            self._context.layer_state(state, reason)
        except Exception:  # an older context: the state is still in stats()
            _log.debug("the context does not take layer states", exc_info=True)

    async def _recover_loop(self) -> None:
        """Re-register what BlueZ dropped: the advertisement alone after a Release, everything
        (probe, scanner, GATT application, advertisement) after BlueZ or the adapter went away.
        A failed attempt is retried after RECOVER_FIRST_S, doubling to RECOVER_MAX_S (with
        jitter), or at once when the watcher says BlueZ is back."""
        delay = RECOVER_FIRST_S
        while self._state == "running":
            if not (self._needs_restart or self._needs_readvertise):
                delay = RECOVER_FIRST_S
                self._recover_wakeup.clear()
                await self._recover_wakeup.wait()
                continue
            self._recover_wakeup.clear()
            if self._needs_restart:
                self._needs_restart = self._needs_readvertise = False
                ok = await self._restart_backends()
            else:
                self._needs_readvertise = False
                ok = await self._readvertise()
            if ok:
                continue
            self._needs_restart = True
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._recover_wakeup.wait(), delay * self._rng.uniform(0.8, 1.2))
            delay = min(2 * delay, RECOVER_MAX_S)

    async def _readvertise(self) -> bool:
        own = self._own
        if own is None or self._advertiser is None:
            return True
        try:
            await self._advertise(own, raise_errors=True)
        except Exception as exc:
            self._count["readvertise_failed"] += 1
            _log.info("registering the BLE advertisement again failed: %s", describe_ble_error(exc, self._adapter))
            return False
        self._count["readvertised"] += 1
        return True

    async def _restart_backends(self) -> bool:
        """Stop every backend, probe again, and start them again; True if BLE runs again."""
        self._count["restart_attempts"] += 1
        adapter = self._adapter
        stack = self._stack
        try:
            async with self._readvertise_lock:
                await self._stop_backends()
                if self._watcher is None or not self._watcher.running:
                    await self._start_watcher(adapter)
                probe = await asyncio.wait_for(stack.probe(), BACKEND_TIMEOUT_S)
                self._probe, adapter = probe, probe.adapter
                if adapter != self._watched_adapter:  # no adapter named: the first one may be another now
                    await self._start_watcher(adapter)
                self._fetcher = stack.record_fetcher(adapter)
                scanner = stack.scanner(adapter)
                await asyncio.wait_for(scanner.start(self._on_sighting), BACKEND_TIMEOUT_S)
                self._scanner = scanner
                if probe.can_advertise:
                    self._advertiser = stack.advertiser(adapter, self._on_released)
                if probe.can_serve_gatt:
                    self._server = stack.record_server(adapter)
            own = self._own if self._own is not None else self._context.own_record
            if own is not None:
                await self._advertise(own, raise_errors=True)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            reason = exc.reason if isinstance(exc, LayerUnavailable) else describe_ble_error(exc, adapter)
            self._count["restart_failed"] += 1
            self._set_unavailable(reason)
            return False
        self._count["restarts"] += 1
        self._set_available()
        return True

    # --- scanning -------------------------------------------------------------------------------------

    def _drop(self, reason: str, detail: object = "") -> None:
        self._dropped[reason] += 1
        level = logging.INFO if self._dropped[reason] == 1 else logging.DEBUG
        _log.log(level, "BLE input dropped (%s) %s", reason, detail)

    def _on_sighting(self, sighting: BleSighting) -> None:
        """A backend saw an advertisement (called on the loop). Never raises."""
        try:
            self._sighted(sighting)
        except Exception:
            self._count["internal_errors"] += 1
            _log.exception("handling a BLE sighting failed")

    def _sighted(self, sighting: BleSighting) -> None:
        if self._state not in ("starting", "running"):
            return
        self._count["sightings"] += 1
        if not isinstance(sighting, BleSighting) or not isinstance(sighting.address, str):
            self._drop("bad_sighting")
            return
        if sighting.service_data is None:
            self._drop("no_service_data", sighting.address)
            return
        try:
            payload = BlePayload.decode(sighting.service_data)
        except BlePayloadError as exc:
            self._drop(exc.reason, f"from {sighting.address}: {exc}")
            return
        if payload.peer_id in self._own_ids:
            self._count["own_advertisements"] += 1
            return
        now = time.monotonic()
        device = self._devices.get(sighting.address)
        if device is None:
            if len(self._devices) >= self._max_devices and not self._make_room():
                self._drop("too_many_devices", sighting.address)
                return
            device = self._devices[sighting.address] = _Device(sighting, payload, now)
        else:
            self._devices.move_to_end(sighting.address)
            if device.payload != payload:
                record = device.record
                if record is not None and payload.matches(record.public_key, self._windows()) is None:
                    self._forget_record(device)  # another key at this address now
                device.payload = payload
                device.unresolvable_counted = False
        device.sighting = sighting
        device.last_seen = now
        rssi = sighting.rssi
        device.rssi = rssi if isinstance(rssi, int) and not isinstance(rssi, bool) and rssi in _RSSI_RANGE else None
        self._resolve(device, now)

    def _fresh(self, payload: BlePayload, record: PeerRecord) -> bool:
        """Whether ``payload`` names ``record``'s key and its seq hint matches ``record``."""
        window = payload.matches(record.public_key, self._windows())
        return window is not None and payload.unmasked(record.public_key, window).seq_hint == record.seq & 0xFF

    def _forget_record(self, device: _Device) -> None:
        record, device.record = device.record, None
        if record is not None:
            self._detach(device.address, bytes(record.node_id))

    def _make_room(self) -> bool:
        """Evict the least recently seen device that is neither resolved nor being resolved or read."""
        for address, device in self._devices.items():
            if device.record is None and address not in self._pending and address not in self._tasks:
                del self._devices[address]
                self._count["devices_evicted"] += 1
                return True
        return False

    def _windows(self) -> tuple[int, ...]:
        window = self._window()
        return (window, window - 1, window + 1)  # tolerate clocks a window apart

    def _resolve(self, device: _Device, now: float) -> None:
        """Use the record held for ``device`` if its seq matches the hint; else a newer one from
        the peer table; else, for a peer nothing here knows, ask the context (other layers'
        records, the DHT); else queue a GATT read (reporting an older record meanwhile: a stale
        one is read over GATT, the peer itself has the newest)."""
        payload, record = device.payload, device.record
        if record is None or not self._fresh(payload, record):
            known = self._from_table(payload)
            if known is not None and (record is None or known.seq > record.seq):
                device.record = record = known
                self._count["resolved_from_table"] += 1
            if record is None and self._state == "running" and self._resolve_elsewhere(device, now):
                return  # the resolution reports, or reads over GATT, itself
            if (record is None or not self._fresh(payload, record)) and self._state == "running":
                self._fall_through(device, now)
        if record is not None:
            self._report(device, now)

    def _fall_through(self, device: _Device, now: float) -> None:
        """Nothing else resolved ``device``: read it over GATT if it offers that."""
        if device.payload.gatt:
            self._queue_fetch(device, now)
        elif device.record is None and not device.unresolvable_counted:
            device.unresolvable_counted = True
            self._drop("unresolvable", f"{device.address} offers no GATT record and is unknown")

    def _resolve_elsewhere(self, device: _Device, now: float) -> bool:
        """Start resolving ``device`` through ``LayerContext.resolve_peer``; True if a resolution
        runs for it now (it falls through to GATT itself if it fails). Not again for the same
        (peer ID, seq hint) within RERESOLVE_AFTER_S; at most MAX_RESOLVES_IN_FLIGHT at once;
        the network (the DHT) only with a token of the lookup bucket."""
        address, payload = device.address, device.payload
        if address in self._tasks:
            return True
        key = (payload.peer_id, payload.seq_hint)
        tried = self._resolved_at.get(key)
        if tried is not None and now - tried < RERESOLVE_AFTER_S:
            return False
        if len(self._tasks) >= MAX_RESOLVES_IN_FLIGHT:
            self._count["resolve_busy"] += 1
            return False
        self._resolved_at[key] = now
        self._resolved_at.move_to_end(key)
        while len(self._resolved_at) > MAX_RESOLVES_REMEMBERED:
            self._resolved_at.popitem(last=False)
        lookup = self._lookup_bucket.take() == 0.0
        if not lookup:
            self._count["resolve_local_only"] += 1
        self._tasks.spawn_keyed(address, self._resolve_through_context(device, payload, lookup),
                                f"resolve {address}")
        return True

    async def _resolve_through_context(self, device: _Device, payload: BlePayload, lookup: bool) -> None:
        """Ask the context for the record ``payload`` names; check it like a GATT answer (a
        record object, unexpired, of the advertised key); then report it, and read over GATT
        if it is still unknown or stale."""
        windows = self._windows()
        key_matches = (lambda public_key: payload.matches(public_key, windows) is not None) \
            if payload.rotating else None  # a token names a key only the node may already know
        record = None
        try:
            found = await asyncio.wait_for(
                self._context.resolve_peer(payload.peer_id, key_matches=key_matches, lookup=lookup,
                                           deadline_s=self._resolve_timeout_s),
                self._resolve_timeout_s + 1.0)
        except (asyncio.TimeoutError, TimeoutError):
            self._count["resolve_timeout"] += 1
        except Exception as exc:  # a context's bug must not cost the sighting
            self._count["resolve_failed"] += 1
            _log.debug("BLE: resolving %s through the node failed: %s: %s", device.address,
                       type(exc).__name__, exc)
        else:
            record = self._check_resolved(found, payload)
        if self._state != "running" or self._devices.get(device.address) is not device \
                or device.payload.peer_id != payload.peer_id:
            return  # gone, or it advertises something else now; the next sighting resolves that
        held = device.record
        if record is not None and (held is None or held.public_key != record.public_key
                                   or record.supersedes(held)):
            if held is not None and held.public_key != record.public_key:
                self._forget_record(device)
            device.record = record
            device.reported_at = float("-inf")
        now = time.monotonic()
        if device.record is None or not self._fresh(device.payload, device.record):
            self._fall_through(device, now)
        self._report(device, now)

    def _check_resolved(self, found: object, payload: BlePayload) -> PeerRecord | None:
        """The record of a resolution if it is one for ``payload``; counted by outcome."""
        if found is None:
            self._count["resolve_not_found"] += 1
            return None
        record, source = getattr(found, "record", None), getattr(found, "source", None)
        if not isinstance(record, PeerRecord):
            self._count["resolve_failed"] += 1
            return None
        if record.is_expired(self._wall()):
            self._drop("record_expired", "from the node's resolution")
            return None
        if payload.matches(record.public_key, self._windows()) is None:
            self._drop("id_mismatch", "the node resolved a record of another key")
            return None
        self._count[f"resolved_from_{source if source in _RESOLVE_SOURCES else 'other'}"] += 1
        return record

    def _from_table(self, payload: BlePayload) -> PeerRecord | None:
        """A known, unexpired, verified record whose key ``payload`` names."""
        context = self._context
        if context is None:
            return None
        now = time.monotonic()
        window = self._window() if payload.rotating else None
        if now - self._index_at >= INDEX_EVERY_S or (payload.rotating and window != self._index_window):
            self._rebuild_index(window if window is not None else self._window())
            self._index_at = now
        peer = self._index.get(payload.peer_id)
        if peer is None or peer.record.is_expired(self._wall()):
            return None
        if payload.matches(peer.record.public_key, self._windows()) is None:
            return None
        return peer.record

    def _rebuild_index(self, window: int) -> None:
        """Map every known peer's hash, and its tokens of the windows around ``window``, to it.
        Tokens are cached per peer and window, so a rebuild costs HMACs only for new peers."""
        index: dict[bytes, PeerInfo] = {}
        cache = self._token_cache
        peers = self._context.known_peers()
        if len(cache) > 2 * len(peers) + 64:
            cache.clear()
        for peer in peers:
            key = bytes(peer.node_id)
            index[key[:ID_BYTES]] = peer
            cached = cache.get(key)
            if cached is None or cached[0] != window:
                cached = (window, {rotating_token(peer.record.public_key, w): w
                                   for w in (window - 1, window, window + 1)})
                cache[key] = cached
            for token in cached[1]:
                index[token] = peer
        self._index = index
        self._index_window = window

    def _report(self, device: _Device, now: float) -> None:
        record = device.record
        if record is None or self._state != "running" or now - device.reported_at < REPORT_EVERY_S:
            return
        if record.is_expired(self._wall()):
            self._forget_record(device)
            return
        device.reported_at = now
        key = bytes(record.node_id)
        self._peer_devices.setdefault(key, set()).add(device.address)
        self._count["reports"] += 1
        self._context.peer_seen(record, rssi=device.rssi, check_reachable=bool(record.addresses))

    # --- GATT reads -----------------------------------------------------------------------------------

    def _queue_fetch(self, device: _Device, now: float) -> None:
        if device.address in self._pending or now < device.next_fetch_at:
            return
        if len(self._pending) >= MAX_QUEUED_FETCHES:
            self._drop("fetch_queue_full", device.address)
            device.next_fetch_at = now + REFETCH_AFTER_S
            return
        self._pending.add(device.address)
        self._fetch_wakeup.set()

    async def _fetch_loop(self) -> None:
        """One GATT read at a time, nearest (strongest RSSI) device first, rate-limited."""
        while self._state == "running":
            if not self._pending or self._unavailable is not None:  # nothing to read, or no BlueZ
                self._fetch_wakeup.clear()
                await self._fetch_wakeup.wait()
                continue
            wait = self._fetch_bucket.take()
            if wait > 0:
                self._count["fetches_delayed"] += 1
                await asyncio.sleep(wait)
                continue
            devices = [self._devices[a] for a in self._pending if a in self._devices]
            self._pending.intersection_update(self._devices)
            if not devices:
                continue
            device = max(devices, key=lambda d: (d.rssi if d.rssi is not None else -1000, -d.last_seen))
            try:
                await self._fetch(device)
            finally:
                self._pending.discard(device.address)

    async def _fetch(self, device: _Device) -> None:
        payload, sighting = device.payload, device.sighting
        device.next_fetch_at = time.monotonic() + REFETCH_AFTER_S
        self._count["gatt_reads"] += 1
        try:
            data = await asyncio.wait_for(
                self._fetcher.fetch(sighting, max_bytes=MAX_GATT_RECORD_BYTES, timeout_s=self._gatt_timeout_s),
                self._gatt_timeout_s + 1.0)
        except GattFetchError as exc:
            self._drop(exc.reason, f"{sighting.address}: {exc}")
            return
        except (asyncio.TimeoutError, TimeoutError):
            self._drop("gatt_timeout", sighting.address)
            return
        except Exception as exc:  # a backend bug must not end the loop
            self._drop("gatt_failed", f"{sighting.address}: {type(exc).__name__}: {exc}")
            return
        if not isinstance(data, (bytes, bytearray)):
            self._drop("gatt_failed", f"{sighting.address}: not bytes")
            return
        if len(data) > MAX_GATT_RECORD_BYTES:
            self._drop("gatt_oversized", f"{len(data)} bytes from {sighting.address}")
            return
        try:
            record = PeerRecord.decode(bytes(data), now=self._wall())
        except RecordError as exc:
            self._drop(_record_reason(exc), f"from {sighting.address}: {exc}")
            return
        if payload.matches(record.public_key, self._windows()) is None:
            self._drop("id_mismatch", f"{sighting.address} advertised another key than its record's")
            return
        self._count["gatt_records"] += 1
        if self._state != "running" or self._devices.get(device.address) is not device:
            return
        if device.payload.peer_id != payload.peer_id:
            return  # it advertises something else now; the next sighting resolves that
        held = device.record
        if held is not None and held.public_key == record.public_key and not record.supersedes(held):
            return
        if held is not None and held.public_key != record.public_key:
            self._forget_record(device)
        device.record = record
        device.reported_at = float("-inf")
        self._report(device, time.monotonic())

    # --- losing peers -----------------------------------------------------------------------------------

    async def _sweep_loop(self) -> None:
        period = max(0.05, min(self.config.scan_interval_s, self._lost_after_s / 3))
        while self._state == "running":
            await asyncio.sleep(period)
            self.sweep()

    def sweep(self, now: float | None = None) -> int:
        """Forget devices not seen for ``lost_after_s`` (monotonic ``now``); report ``peer_gone``
        for peers left with no device. Returns how many peers were lost. Runs periodically; tests
        may call it with a later ``now``."""
        now = time.monotonic() if now is None else now
        lost = 0
        while self._devices:
            address, device = next(iter(self._devices.items()))
            if now - device.last_seen < self._lost_after_s:
                break
            del self._devices[address]
            self._pending.discard(address)
            if device.record is not None and self._detach(address, bytes(device.record.node_id)):
                lost += 1
        return lost

    def _detach(self, address: str, node_id: bytes) -> bool:
        """``address`` no longer speaks for ``node_id``; True (and peer_gone) if none is left."""
        addresses = self._peer_devices.get(node_id)
        if addresses is None:
            return False
        addresses.discard(address)
        if addresses:
            return False
        del self._peer_devices[node_id]
        self._count["peers_lost"] += 1
        if self._context is not None and self._state == "running":
            self._context.peer_gone(node_id)
        return True


def _record_reason(exc: RecordError) -> str:
    if isinstance(exc, BadSignatureError):
        return "bad_signature"
    if isinstance(exc, (RecordExpiredError, RecordFromFutureError)):
        return "record_expired"
    if isinstance(exc, RecordTooLargeError):
        return "record_too_large"
    return "record_malformed"


def create_layer(config: LocalConfig) -> BleLayer:
    """The coordinator's entry point: the BLE layer for ``config`` on BlueZ. Nothing is probed
    or imported until :meth:`BleLayer.start`, which reports why BLE cannot run here."""
    return BleLayer(config)
