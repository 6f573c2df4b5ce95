"""The Bluetooth LE backends behind :class:`~sovereign_discovery.ble.BleLayer`: four small
interfaces, their real implementations on BlueZ, and an in-memory radio for tests.

Interfaces (each started and stopped by the layer; every method is a coroutine unless noted):

- :class:`BleAdvertiser` ``start(payload)`` / ``update(payload)`` / ``stop()``: put the 20-byte
  service data (:mod:`~sovereign_discovery.ble_payload`) on the air, connectable.
- :class:`BleScanner` ``start(on_sighting)`` / ``stop()``: call ``on_sighting`` (a plain function,
  on the event loop) with a :class:`BleSighting` for every advertisement carrying our UUID.
- :class:`GattRecordServer` ``start(record)`` / ``update(record)`` / ``stop()``: serve the encoded
  signed record from the record characteristic.
- :class:`GattRecordFetcher` ``fetch(sighting, max_bytes=, timeout_s=)``: connect to a sighted
  device and read its record characteristic; raises only :class:`GattFetchError` (``reason`` is a
  stats key) and never waits longer than ``timeout_s``.

A :class:`BleStack` bundles them with ``probe()``, which checks that BLE can run here and raises
:class:`~sovereign_discovery.layers.LayerUnavailable` with a reason a user can act on, and
``watch(adapter, on_change)``, a :class:`BleWatcher` that calls ``on_change("lost", reason)`` when
BlueZ or the adapter goes away (bluetoothd stopped or restarting, the adapter removed or powered
off, the system bus gone) and ``on_change("back", reason)`` when it returns. An advertiser is
made with ``on_release``, called when BlueZ drops the advertisement by itself
(``LEAdvertisement1.Release``). The layer re-registers everything then
(docs/local-discovery.md, "When BlueZ goes away").

Real implementations (:class:`BlueZStack`; bleak, bless and dbus-fast are imported only when
used, so this module imports without them):

- :class:`BlueZAdvertiser`: our own ``org.bluez.LEAdvertisement1`` object exported with dbus-fast
  and registered with ``LEAdvertisingManager1.RegisterAdvertisement`` (bless cannot advertise
  service data).
- :class:`BleakBleScanner`: bleak's ``BleakScanner`` on the chosen adapter, filtered on our UUID,
  with BlueZ's duplicate filter off so that a present peer keeps being reported.
- :class:`BlessRecordServer`: a bless GATT application registered with ``GattManager1``, without
  bless's own advertisement (it would rename the adapter and hide ours).
- :class:`BleakRecordFetcher`: bleak's ``BleakClient`` connect, ``read_gatt_char``, disconnect.
- :class:`BlueZWatcher`: dbus-fast match rules on ``NameOwnerChanged`` of ``org.bluez``, the
  adapter's ``InterfacesAdded`` / ``InterfacesRemoved`` and its ``Powered`` property, and the bus
  connection itself.

Test implementations: :class:`FakeRadio` is the air between any number of :class:`FakeStack`\\ s
(one per simulated device); tests inject raw sightings, RSSI values, slow or oversized GATT
answers and unavailable stacks through it.

:func:`describe_ble_error` turns whatever a BLE library raised into the reason string of
``LayerUnavailable``: no D-Bus (a bare ``FileNotFoundError``), no BlueZ (``ServiceUnknown``), no
adapter, adapter powered off, a library not installed (docs/local-discovery.md, "BLE").
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from .ble_payload import RECORD_CHARACTERISTIC_UUID, RECORD_SERVICE_UUID, SERVICE_UUID
from .errors import SovereignDiscoveryError
from .layers import LayerUnavailable

__all__ = [
    "BleSighting",
    "BleAdvertiser",
    "BleScanner",
    "GattRecordServer",
    "GattRecordFetcher",
    "BleStack",
    "ProbeResult",
    "GattFetchError",
    "BleBackendError",
    "BlueZStack",
    "BlueZAdvertiser",
    "BleakBleScanner",
    "BlessRecordServer",
    "BleakRecordFetcher",
    "BleWatcher",
    "BlueZWatcher",
    "FakeRadio",
    "FakeStack",
    "describe_ble_error",
    "INSTALL_HINT",
]

INSTALL_HINT = "pip install 'sovereign-discovery[ble]'"
_BLUEZ = "org.bluez"
_ADAPTER_IFACE = "org.bluez.Adapter1"
_ADV_MANAGER_IFACE = "org.bluez.LEAdvertisingManager1"
_GATT_MANAGER_IFACE = "org.bluez.GattManager1"
_DEFAULT_SYSTEM_BUS = "unix:path=/var/run/dbus/system_bus_socket"
_paths = itertools.count(1)


@dataclass(frozen=True, slots=True)
class BleSighting:
    """One received advertisement: the sender's Bluetooth ``address``, ``rssi`` in dBm (None if
    unknown), the service data under our UUID (None if absent), and ``handle``, the backend's own
    device object that its fetcher connects to."""

    address: str
    rssi: int | None
    service_data: bytes | None
    handle: object = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """What :meth:`BleStack.probe` found: the adapter to use and what it can do."""

    adapter: str
    can_advertise: bool = True
    can_serve_gatt: bool = True


class GattFetchError(SovereignDiscoveryError):
    """A GATT record read failed; ``reason`` is the stats key (``gatt_timeout``,
    ``gatt_oversized``, ``gatt_no_record``, ``gatt_failed``)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class BleBackendError(SovereignDiscoveryError):
    """BlueZ refused a D-Bus call; the message carries the D-Bus error name and text."""


class BleAdvertiser(Protocol):
    async def start(self, payload: bytes) -> None: ...

    async def update(self, payload: bytes) -> None: ...

    async def stop(self) -> None: ...


class BleScanner(Protocol):
    async def start(self, on_sighting: Callable[[BleSighting], None]) -> None: ...

    async def stop(self) -> None: ...


class GattRecordServer(Protocol):
    async def start(self, record: bytes) -> None: ...

    async def update(self, record: bytes) -> None: ...

    async def stop(self) -> None: ...


class GattRecordFetcher(Protocol):
    async def fetch(self, sighting: BleSighting, *, max_bytes: int, timeout_s: float) -> bytes: ...


class BleWatcher(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    @property
    def running(self) -> bool: ...


#: ``on_change(kind, reason)``: kind is "lost" (BlueZ or the adapter went away) or "back".
ChangeCallback = Callable[[str, str], None]


class BleStack(Protocol):
    """A source of the backends, bound to one adapter after :meth:`probe`."""

    async def probe(self) -> ProbeResult: ...

    def advertiser(self, adapter: str, on_release: Callable[[], None] | None = None) -> BleAdvertiser: ...

    def watch(self, adapter: str, on_change: ChangeCallback) -> BleWatcher: ...

    def scanner(self, adapter: str) -> BleScanner: ...

    def record_server(self, adapter: str) -> GattRecordServer: ...

    def record_fetcher(self, adapter: str) -> GattRecordFetcher: ...


# --- why BLE is unavailable ----------------------------------------------------------------------


def _system_bus_address() -> str:
    return os.environ.get("DBUS_SYSTEM_BUS_ADDRESS") or _DEFAULT_SYSTEM_BUS


def describe_ble_error(exc: BaseException, adapter: str | None = None) -> str:
    """A user-facing reason for ``exc`` raised while starting BLE (see the module docstring)."""
    name = adapter or "the default adapter"
    text = str(exc)
    kind = type(exc).__name__
    if isinstance(exc, ImportError):
        missing = getattr(exc, "name", None) or text
        return f"{missing} is not installed ({INSTALL_HINT})"
    if "ServiceUnknown" in text or "NameHasNoOwner" in text or "org.bluez was not provided" in text:
        return "BlueZ is not running (no org.bluez service on the system D-Bus; start bluetoothd)"
    if kind == "BleakBluetoothNotAvailableError":
        reason = getattr(getattr(exc, "reason", None), "name", "") or ""
        if "POWERED_OFF" in reason or "powered" in text.lower():
            return f"Bluetooth adapter {name} is powered off (bluetoothctl power on)"
        if "NO_BLUETOOTH" in reason or "No Bluetooth adapters" in text:
            return "no Bluetooth adapter"
        return f"Bluetooth is not available: {text}"
    if text.startswith("No adapter named") or "Could not locate bluetooth adapter" in text \
            or "org.bluez.Error.NotFound" in text or "UnknownObject" in text:
        return f"no Bluetooth adapter named {name}"
    if "NotReady" in text or "powered off" in text.lower():
        return f"Bluetooth adapter {name} is powered off (bluetoothctl power on)"
    if isinstance(exc, (FileNotFoundError, ConnectionRefusedError, PermissionError)) or (
            isinstance(exc, OSError) and "bus" in text.lower()):
        return f"no D-Bus system bus at {_system_bus_address()} ({kind}: {text})"
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return "BlueZ did not answer in time"
    return f"{kind}: {text}" if text else kind


def _unavailable(exc: BaseException, adapter: str | None = None) -> LayerUnavailable:
    return LayerUnavailable("ble", describe_ble_error(exc, adapter))


# --- BlueZ over D-Bus -----------------------------------------------------------------------------


async def _system_bus():
    from dbus_fast import BusType
    from dbus_fast.aio import MessageBus

    return await MessageBus(bus_type=BusType.SYSTEM).connect()


async def _bluez_call(bus, path: str, interface: str, member: str, signature: str = "", body=()):
    """One method call to org.bluez; raises BleBackendError with the D-Bus error on failure."""
    from dbus_fast import Message, MessageType

    reply = await bus.call(Message(destination=_BLUEZ, path=path, interface=interface, member=member,
                                   signature=signature, body=list(body)))
    if reply.message_type == MessageType.ERROR:
        detail = reply.body[0] if reply.body else ""
        raise BleBackendError(f"[{reply.error_name}] {detail}")
    return reply.body


class BlueZStack:
    """The real backends on BlueZ. ``adapter`` is a BlueZ adapter name (``hci0``); None picks
    the first adapter BlueZ lists. ``timeout_s`` bounds the probe."""

    def __init__(self, adapter: str | None = None, *, timeout_s: float = 5.0) -> None:
        self.adapter = adapter
        self.timeout_s = timeout_s

    async def probe(self) -> ProbeResult:
        """Check, in order: the libraries are installed, the system bus answers, BlueZ owns
        org.bluez, an adapter (the named one) exists and is powered. Raises LayerUnavailable."""
        for module in ("dbus_fast", "bleak", "bless"):
            try:
                __import__(module)
            except ImportError as exc:
                raise _unavailable(exc) from exc
        try:
            bus = await asyncio.wait_for(_system_bus(), self.timeout_s)
        except Exception as exc:
            raise _unavailable(exc, self.adapter) from exc
        try:
            (objects,) = await asyncio.wait_for(
                _bluez_call(bus, "/", "org.freedesktop.DBus.ObjectManager", "GetManagedObjects"),
                self.timeout_s)
        except Exception as exc:
            raise _unavailable(exc, self.adapter) from exc
        finally:
            bus.disconnect()
        adapters = {path.rsplit("/", 1)[-1]: interfaces for path, interfaces in objects.items()
                    if _ADAPTER_IFACE in interfaces}
        if not adapters:
            raise LayerUnavailable("ble", "no Bluetooth adapter (BlueZ is running but has none)")
        name = self.adapter or sorted(adapters)[0]
        if name not in adapters:
            raise LayerUnavailable("ble", f"no Bluetooth adapter named {name}"
                                          f" (found: {', '.join(sorted(adapters))})")
        interfaces = adapters[name]
        powered = interfaces[_ADAPTER_IFACE].get("Powered")
        if powered is None or not powered.value:
            raise LayerUnavailable("ble", f"Bluetooth adapter {name} is powered off (bluetoothctl power on)")
        return ProbeResult(name, _ADV_MANAGER_IFACE in interfaces, _GATT_MANAGER_IFACE in interfaces)

    def advertiser(self, adapter: str, on_release: Callable[[], None] | None = None) -> "BlueZAdvertiser":
        return BlueZAdvertiser(adapter, on_release)

    def watch(self, adapter: str, on_change: ChangeCallback) -> "BlueZWatcher":
        return BlueZWatcher(adapter, on_change)

    def scanner(self, adapter: str) -> "BleakBleScanner":
        return BleakBleScanner(adapter)

    def record_server(self, adapter: str) -> "BlessRecordServer":
        return BlessRecordServer(adapter)

    def record_fetcher(self, adapter: str) -> "BleakRecordFetcher":
        return BleakRecordFetcher(adapter)


def _advertisement_class():
    """``org.bluez.LEAdvertisement1`` (BlueZ doc/org.bluez.LEAdvertisement.rst), built on first
    use so that dbus-fast is imported only when BLE runs."""
    from dbus_fast import Variant
    from dbus_fast.service import PropertyAccess, ServiceInterface, dbus_property, method

    class Advertisement(ServiceInterface):
        def __init__(self, payload: bytes, on_release: Callable[[], None]) -> None:
            super().__init__("org.bluez.LEAdvertisement1")
            self.payload = payload
            self._on_release = on_release

        @dbus_property(access=PropertyAccess.READ)
        def Type(self) -> "s":  # noqa: N802 - D-Bus names
            return "peripheral"  # connectable: the record is read over GATT

        @dbus_property(access=PropertyAccess.READ)
        def ServiceUUIDs(self) -> "as":  # noqa: N802, F722
            return [SERVICE_UUID]

        @dbus_property(access=PropertyAccess.READ)
        def ServiceData(self) -> "a{sv}":  # noqa: N802, F722
            return {SERVICE_UUID: Variant("ay", self.payload)}

        @dbus_property(access=PropertyAccess.READ)
        def Discoverable(self) -> "b":  # noqa: N802
            return True

        @method()
        def Release(self) -> "":  # noqa: N802
            self._on_release()

    return Advertisement


class BlueZAdvertiser:
    """Advertises the payload through ``LEAdvertisingManager1`` of ``adapter`` (dbus-fast).
    ``released`` turns True, and ``on_release`` is called, when BlueZ drops the advertisement by
    itself (adapter off, bluetoothd stopping): not when we unregister it."""

    def __init__(self, adapter: str, on_release: Callable[[], None] | None = None) -> None:
        self.adapter = adapter
        self.on_release = on_release
        self.released = False
        self._bus = None
        self._advertisement = None
        self._registered = False
        self._path = f"/org/sovereign_discovery/advertisement{next(_paths)}"

    async def start(self, payload: bytes) -> None:
        self._bus = await _system_bus()
        self._advertisement = _advertisement_class()(bytes(payload), self._released)
        self._bus.export(self._path, self._advertisement)
        await self._register()

    async def _register(self) -> None:
        await _bluez_call(self._bus, f"/org/bluez/{self.adapter}", _ADV_MANAGER_IFACE,
                          "RegisterAdvertisement", "oa{sv}", (self._path, {}))
        self._registered = True
        self.released = False

    async def _unregister(self) -> None:
        if self._registered:
            self._registered = False
            await _bluez_call(self._bus, f"/org/bluez/{self.adapter}", _ADV_MANAGER_IFACE,
                              "UnregisterAdvertisement", "o", (self._path,))

    def _released(self) -> None:
        if not self._registered:
            return  # the Release that answers our own UnregisterAdvertisement
        self._registered = False
        self.released = True
        if self.on_release is not None:
            self.on_release()

    async def update(self, payload: bytes) -> None:
        """BlueZ reads the properties at registration: register again with the new payload."""
        if self._advertisement is None:
            await self.start(payload)
            return
        self._advertisement.payload = bytes(payload)
        with contextlib.suppress(BleBackendError):
            await self._unregister()
        await self._register()

    async def stop(self) -> None:
        bus = self._bus
        if bus is None:
            return
        try:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._unregister(), 2.0)
        finally:
            self._bus = None
            with contextlib.suppress(Exception):
                bus.unexport(self._path)
            bus.disconnect()


class BleakBleScanner:
    """bleak's BleakScanner on ``adapter``, reporting advertisements that list our UUID.
    ``DuplicateData`` is switched on so that BlueZ reports every advertisement, not only changed
    ones: the layer's "lost" rule needs a present peer to keep showing up."""

    def __init__(self, adapter: str) -> None:
        self.adapter = adapter
        self._scanner = None

    async def start(self, on_sighting: Callable[[BleSighting], None]) -> None:
        from bleak import BleakScanner

        def detected(device, advertisement) -> None:
            on_sighting(BleSighting(device.address, advertisement.rssi,
                                    advertisement.service_data.get(SERVICE_UUID), device))

        # the callback goes to the constructor: BlueZ may signal a device only once, at start
        scanner = BleakScanner(detected, service_uuids=[SERVICE_UUID],
                               bluez={"adapter": self.adapter, "filters": {"DuplicateData": True}})
        await scanner.start()
        self._scanner = scanner

    async def stop(self) -> None:
        scanner, self._scanner = self._scanner, None
        if scanner is not None:
            await scanner.stop()


class BlessRecordServer:
    """A bless GATT application on ``adapter`` with one read-only characteristic holding the
    encoded record. bless's ``start()`` is not used: it also registers an advertisement of its own
    and renames the adapter (its Alias); the application is registered with ``GattManager1``
    directly. bless 0.3 ignores the ATT read offset, so a record must fit one read (the layer
    serves at most 512 bytes, the ATT attribute maximum, and BlueZ negotiates an MTU of up to 517)."""

    def __init__(self, adapter: str) -> None:
        self.adapter = adapter
        self.reads = 0
        self._value = b""
        self._server = None
        self._registered = False

    async def start(self, record: bytes) -> None:
        from bless import BlessServer, GATTAttributePermissions, GATTCharacteristicProperties

        self._value = bytes(record)
        server = BlessServer(name="sovereign_discovery", adapter=self.adapter)
        self._server = server
        server.read_request_func = self._read
        await server.setup_task  # connects to the bus, finds the adapter (raises if it cannot)
        await server.add_new_service(RECORD_SERVICE_UUID)
        await server.add_new_characteristic(
            RECORD_SERVICE_UUID, RECORD_CHARACTERISTIC_UUID, GATTCharacteristicProperties.read, None,
            GATTAttributePermissions.readable)
        server.bus.export(server.app.path, server.app)
        await server.app.register(server.adapter)
        self._registered = True

    def _read(self, characteristic, **kwargs) -> bytearray:
        self.reads += 1
        return bytearray(self._value)

    async def update(self, record: bytes) -> None:
        self._value = bytes(record)

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        try:
            if not server.setup_task.done():
                server.setup_task.cancel()
            with contextlib.suppress(BaseException):
                await server.setup_task
            if self._registered:
                self._registered = False
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(server.app.unregister(server.adapter), 2.0)
                with contextlib.suppress(Exception):
                    server.bus.unexport(server.app.path, server.app)
        finally:
            bus = getattr(server, "bus", None)
            if bus is not None:
                with contextlib.suppress(Exception):
                    bus.disconnect()


class BleakRecordFetcher:
    """Reads the record characteristic with bleak's BleakClient through ``adapter``."""

    def __init__(self, adapter: str) -> None:
        self.adapter = adapter

    async def fetch(self, sighting: BleSighting, *, max_bytes: int, timeout_s: float) -> bytes:
        from bleak import BleakClient
        from bleak.exc import BleakCharacteristicNotFoundError

        target = sighting.handle if sighting.handle is not None else sighting.address
        client = BleakClient(target, timeout=timeout_s, bluez={"adapter": self.adapter})
        try:
            async with asyncio.timeout(timeout_s):
                await client.connect()
                try:
                    data = await client.read_gatt_char(RECORD_CHARACTERISTIC_UUID)
                finally:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(client.disconnect(), 2.0)
        except TimeoutError as exc:
            raise GattFetchError("gatt_timeout", f"no record from {sighting.address} in {timeout_s} s") from exc
        except BleakCharacteristicNotFoundError as exc:
            raise GattFetchError("gatt_no_record", f"{sighting.address} serves no record") from exc
        except Exception as exc:
            raise GattFetchError("gatt_failed", f"{type(exc).__name__}: {exc}") from exc
        if len(data) > max_bytes:
            raise GattFetchError("gatt_oversized", f"{len(data)} bytes from {sighting.address}")
        return bytes(data)


_DBUS = "org.freedesktop.DBus"
_OBJECT_MANAGER = "org.freedesktop.DBus.ObjectManager"


class BlueZWatcher:
    """Tells ``on_change`` when BlueZ or ``adapter`` goes away and comes back, from signals on
    its own system-bus connection: ``NameOwnerChanged`` of ``org.bluez`` (bluetoothd stopped,
    or started: every registration of the old one is gone), ``InterfacesRemoved`` /
    ``InterfacesAdded`` of the adapter, its ``Powered`` property, and the bus connection itself
    (``running`` turns False when it drops; the layer starts a new watcher then)."""

    def __init__(self, adapter: str, on_change: ChangeCallback) -> None:
        self.adapter = adapter
        self.on_change = on_change
        self._path = f"/org/bluez/{adapter}"
        self._bus = None
        self._task: asyncio.Task | None = None

    @property
    def running(self) -> bool:
        return self._bus is not None and self._task is not None and not self._task.done()

    async def start(self) -> None:
        from dbus_fast import Message

        bus = await _system_bus()
        try:
            for rule in (f"type='signal',sender='{_DBUS}',interface='{_DBUS}',member='NameOwnerChanged',"
                         f"arg0='{_BLUEZ}'",
                         f"type='signal',sender='{_BLUEZ}',interface='{_OBJECT_MANAGER}',path='/'",
                         f"type='signal',sender='{_BLUEZ}',interface='org.freedesktop.DBus.Properties',"
                         f"member='PropertiesChanged',path='{self._path}'"):
                await bus.call(Message(destination=_DBUS, path="/org/freedesktop/DBus", interface=_DBUS,
                                       member="AddMatch", signature="s", body=[rule]))
            bus.add_message_handler(self._on_message)
        except BaseException:
            bus.disconnect()
            raise
        self._bus = bus
        self._task = asyncio.create_task(self._watch_connection(bus), name=f"BlueZ watcher {self.adapter}")

    async def _watch_connection(self, bus) -> None:
        with contextlib.suppress(Exception):
            await bus.wait_for_disconnect()
        if self._bus is bus:  # not our own stop()
            self._bus = None
            self.on_change("lost", f"the D-Bus system bus at {_system_bus_address()} went away")

    def _on_message(self, message) -> None:
        """A signal we matched (dbus-fast calls this for every message; never raises)."""
        try:
            self._signal(message.member, message.path, message.body)
        except Exception:  # a malformed signal tells us nothing
            return None
        return None

    def _signal(self, member: str, path: str, body: list) -> None:
        if member == "NameOwnerChanged" and body[0] == _BLUEZ:
            if body[1] and body[2]:  # replaced at once: the old one's registrations are gone all the same
                self.on_change("lost", "BlueZ restarted (org.bluez has a new owner)")
            if body[2]:
                self.on_change("back", "BlueZ (org.bluez) is on the system D-Bus again")
            else:
                self.on_change("lost", "BlueZ stopped (org.bluez left the system D-Bus; start bluetoothd)")
        elif member in ("InterfacesAdded", "InterfacesRemoved") and body[0] == self._path:
            interfaces = body[1]
            if _ADAPTER_IFACE in interfaces:
                if member == "InterfacesAdded":
                    self.on_change("back", f"Bluetooth adapter {self.adapter} is back")
                else:
                    self.on_change("lost", f"Bluetooth adapter {self.adapter} was removed")
        elif member == "PropertiesChanged" and path == self._path and body[0] == _ADAPTER_IFACE:
            powered = body[1].get("Powered")
            if powered is not None:
                if powered.value:
                    self.on_change("back", f"Bluetooth adapter {self.adapter} is powered on")
                else:
                    self.on_change("lost", f"Bluetooth adapter {self.adapter} is powered off"
                                           " (bluetoothctl power on)")

    async def stop(self) -> None:
        bus, self._bus = self._bus, None
        task, self._task = self._task, None
        if bus is not None:
            with contextlib.suppress(Exception):
                bus.remove_message_handler(self._on_message)
            bus.disconnect()
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


# --- in-memory radio for tests ----------------------------------------------------------------------


class FakeRadio:
    """The air between :class:`FakeStack`\\ s: an advertisement started on one stack reaches the
    running scanners of all the others at once (and again on :meth:`broadcast`); a GATT fetch
    reads the server registered at the address. Tests steer it through its attributes:
    ``rssi[address]``, ``gatt_delay_s[address]``, ``gatt_answer[address]`` (bytes served instead
    of the record), and :meth:`emit` for arbitrary sightings; ``fetches`` lists every GATT read
    as ``(reader address, device address)``."""

    def __init__(self) -> None:
        self.advertisements: dict[str, bytes] = {}
        self.records: dict[str, bytes] = {}
        self.scanners: dict[str, Callable[[BleSighting], None]] = {}
        self.rssi: dict[str, int] = {}
        self.gatt_delay_s: dict[str, float] = {}
        self.gatt_answer: dict[str, bytes] = {}
        self.fetches: list[tuple[str, str]] = []  # (reader, device read)
        self.stacks: dict[str, FakeStack] = {}

    def stack(self, address: str, *, unavailable: str | None = None, adapter: str = "hci0",
              fail_on: str | None = None) -> "FakeStack":
        """A device at ``address``. ``unavailable``: its probe raises LayerUnavailable with that
        reason. ``fail_on`` ("advertiser", "scanner", "server"): that backend's start raises."""
        stack = self.stacks[address] = FakeStack(self, address, unavailable, adapter, fail_on)
        return stack

    def stop_bluez(self, address: str, reason: str = "BlueZ stopped (org.bluez left the system D-Bus;"
                                                       " start bluetoothd)") -> None:
        """What bluetoothd stopping does to the device at ``address``: its advertisement, GATT
        record and scan are gone, its probe and backends fail, and its watchers hear ``lost``."""
        stack = self.stacks[address]
        stack.unavailable = reason
        for table in (self.advertisements, self.records, self.scanners):
            table.pop(address, None)
        for on_change in list(stack.watchers):
            on_change("lost", reason)

    def start_bluez(self, address: str) -> None:
        """bluetoothd runs again for ``address`` (with nothing registered); its watchers hear ``back``."""
        stack = self.stacks[address]
        stack.unavailable = None
        for on_change in list(stack.watchers):
            on_change("back", "BlueZ (org.bluez) is on the system D-Bus again")

    def release_advertisement(self, address: str) -> None:
        """BlueZ drops the advertisement of ``address`` by itself (``LEAdvertisement1.Release``)."""
        self.advertisements.pop(address, None)
        on_release = self.stacks[address].on_release
        if on_release is not None:
            on_release()

    def emit(self, sighting: BleSighting, *, exclude: str | None = None) -> None:
        for address, callback in list(self.scanners.items()):
            if address != exclude:
                callback(sighting)

    def broadcast(self) -> None:
        """Every current advertisement is received once more by every other scanner."""
        for address, payload in list(self.advertisements.items()):
            self._send(address, payload)

    def _send(self, address: str, payload: bytes) -> None:
        self.emit(BleSighting(address, self.rssi.get(address, -60), payload, address), exclude=address)


class _FakePublisher:
    """A fake advertiser (``table`` "advertisements": received at once by the scanners) or GATT
    record server (``table`` "records")."""

    def __init__(self, radio: FakeRadio, address: str, table: str) -> None:
        self._radio, self._address, self._table = radio, address, table

    async def start(self, data: bytes) -> None:
        self._radio.stacks[self._address].check_up()
        getattr(self._radio, self._table)[self._address] = bytes(data)
        if self._table == "advertisements":
            self._radio._send(self._address, bytes(data))

    update = start

    async def stop(self) -> None:
        getattr(self._radio, self._table).pop(self._address, None)


class _FakeScanner:
    def __init__(self, radio: FakeRadio, address: str) -> None:
        self._radio, self._address = radio, address

    async def start(self, on_sighting: Callable[[BleSighting], None]) -> None:
        self._radio.stacks[self._address].check_up()
        self._radio.scanners[self._address] = on_sighting
        for address, payload in list(self._radio.advertisements.items()):
            if address != self._address:
                on_sighting(BleSighting(address, self._radio.rssi.get(address, -60), payload, address))

    async def stop(self) -> None:
        self._radio.scanners.pop(self._address, None)


class _FakeFetcher:
    def __init__(self, radio: FakeRadio, address: str) -> None:
        self._radio, self._address = radio, address

    async def fetch(self, sighting: BleSighting, *, max_bytes: int, timeout_s: float) -> bytes:
        radio, address = self._radio, sighting.address
        radio.fetches.append((self._address, address))
        delay = radio.gatt_delay_s.get(address, 0.0)
        if delay > timeout_s:
            await asyncio.sleep(timeout_s)
            raise GattFetchError("gatt_timeout", f"no record from {address} in {timeout_s} s")
        await asyncio.sleep(delay)
        data = radio.gatt_answer.get(address, radio.records.get(address))
        if data is None:
            raise GattFetchError("gatt_failed", f"{address} does not answer")
        if len(data) > max_bytes:
            raise GattFetchError("gatt_oversized", f"{len(data)} bytes from {address}")
        return data


class _FakeWatcher:
    def __init__(self, stack: "FakeStack", on_change: ChangeCallback) -> None:
        self._stack, self._on_change = stack, on_change
        self.running = False

    async def start(self) -> None:
        self._stack.watchers.append(self._on_change)
        self.running = True

    async def stop(self) -> None:
        with contextlib.suppress(ValueError):
            self._stack.watchers.remove(self._on_change)
        self.running = False


class FakeStack:
    """One simulated device on a :class:`FakeRadio` (see :meth:`FakeRadio.stack`)."""

    def __init__(self, radio: FakeRadio, address: str, unavailable: str | None, adapter: str,
                 fail_on: str | None) -> None:
        self.radio = radio
        self.address = address
        self.unavailable = unavailable
        self.adapter = adapter
        self.fail_on = fail_on
        self.watchers: list[ChangeCallback] = []
        self.on_release: Callable[[], None] | None = None

    def check_up(self) -> None:
        """Raise what a D-Bus call to a BlueZ that is gone raises."""
        if self.unavailable is not None:
            raise BleBackendError(f"[org.freedesktop.DBus.Error.ServiceUnknown] {self.unavailable}")

    async def probe(self) -> ProbeResult:
        if self.unavailable is not None:
            raise LayerUnavailable("ble", self.unavailable)
        return ProbeResult(self.adapter)

    def _check(self, part: str) -> None:
        if self.fail_on == part:
            raise FileNotFoundError(2, "No such file or directory")  # what dbus-fast raises with no bus

    def advertiser(self, adapter: str, on_release: Callable[[], None] | None = None) -> BleAdvertiser:
        self._check("advertiser")
        self.on_release = on_release
        return _FakePublisher(self.radio, self.address, "advertisements")

    def watch(self, adapter: str, on_change: ChangeCallback) -> BleWatcher:
        return _FakeWatcher(self, on_change)

    def scanner(self, adapter: str) -> BleScanner:
        self._check("scanner")
        return _FakeScanner(self.radio, self.address)

    def record_server(self, adapter: str) -> GattRecordServer:
        self._check("server")
        return _FakePublisher(self.radio, self.address, "records")

    def record_fetcher(self, adapter: str) -> GattRecordFetcher:
        return _FakeFetcher(self.radio, self.address)
