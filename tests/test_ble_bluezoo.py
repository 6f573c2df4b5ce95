"""The BLE layer on real protocol stacks: bleak's BlueZ backend (scanner and GATT client), our
dbus-fast LEAdvertisement1 and bless's GATT server, against BlueZoo (a BlueZ D-Bus mock) on a
private system bus that each test starts and stops by PID (tests/bluezoo_lab.py). Skipped, with
the reason, where dbus-daemon, bluezoo or the BLE libraries are missing.

BlueZoo's limits (shared/notes/local-discovery.md §3c) shape what is asserted: RSSI is 0, the
31-byte budget is not enforced (test_ble.py asserts it), and a device is signalled once per
discovery, so each test gets a fresh lab."""

from __future__ import annotations

import asyncio
import time

import pytest

from sovereign_discovery import BootstrapConfig, Config, DhtSettings, Identity, LocalConfig
from sovereign_discovery.aio import DhtNode
from sovereign_discovery.ble import BleLayer
from sovereign_discovery.ble_backends import describe_ble_error
from sovereign_discovery.coordinator import PeerDiscovered, PeerDiscoveryCoordinator, PeerUpdated
from sovereign_discovery.layers import LayerUnavailable

from .bluezoo_lab import BluezooLab, missing_tools
from .helpers import run_bounded
from .test_ble import RecordingContext, eventually, identities_with_a_peer_outside_the_table, make_record

_why = missing_tools()
for _module in ("bleak", "bless", "dbus_fast"):
    try:
        __import__(_module)
    except ImportError:
        _why = _why or f"{_module} not installed (pip install 'sovereign-discovery[ble]')"
pytestmark = pytest.mark.skipif(_why is not None, reason=f"BlueZoo lab unavailable: {_why}")


def local(adapter: str, **kwargs) -> LocalConfig:
    return LocalConfig(mdns=False, ble_adapter=adapter, scan_interval_s=1.0, **kwargs)


@pytest.fixture
def lab(monkeypatch):
    """Start a lab (``lab(**BluezooLab kwargs)``); the environment points at its bus; every lab
    started is stopped, by PID, when the test ends."""
    started: list[BluezooLab] = []

    def start(**kwargs) -> BluezooLab:
        one = BluezooLab(**kwargs)
        started.append(one)
        one.start()
        monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", one.bus_address)
        return one

    yield start
    for one in started:
        one.stop()
        assert all(not _alive(pid) for pid in one.pids)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("rotating", [False, True], ids=["hash", "rotating"])
def test_layer_b_reads_and_verifies_layer_a_over_gatt(lab, rotating):
    environment = lab()
    record = make_record(capabilities=("relay", "store"))

    async def main() -> None:
        a = BleLayer(local("hci1", rotating_token=rotating))
        b = BleLayer(local("hci0", rotating_token=rotating), lost_after_s=1.0)
        b_context = RecordingContext()
        await a.start(RecordingContext(own=record))
        try:
            assert a.stats()["advertising"] and a.stats()["serving_record"]
            started = time.monotonic()
            await b.start(b_context)
            await eventually(lambda: b_context.seen, "B's verified report of A", timeout=8)
            print(f"advertisement to verified record over GATT: {1000 * (time.monotonic() - started):.0f} ms")
            assert b_context.seen[0] == (record, 0, False)  # BlueZoo's RSSI is 0; BLE-only: no PING
            stats = b.stats()
            assert stats["gatt_records"] == 1 and stats["dropped"] == {} and stats["adapter"] == "hci0"
            assert "Connecting device[00:AA:00:00:00:02] with adapter[0]" in environment.log_text()
            await a.close()  # its advertisement and GATT application are removed
            await eventually(lambda: b_context.gone == [bytes(record.node_id)], "the loss", timeout=5)
        finally:
            await a.close()
            await b.close()
        assert "Removing advertisement" in environment.log_text()

    run_bounded(main(), 30)


def test_a_peer_the_table_knows_is_resolved_without_connecting(lab):
    environment = lab()
    record = make_record()

    async def main() -> None:
        a = BleLayer(local("hci1"))
        b = BleLayer(local("hci0"))
        context = RecordingContext(known=(record,))
        await a.start(RecordingContext(own=record))
        try:
            await b.start(context)
            await eventually(lambda: context.seen, "B's report of A", timeout=8)
            assert context.seen[0][0] == record and b.stats()["resolved_from_table"] == 1
            assert b.stats().get("gatt_reads", 0) == 0
            assert "Connecting device" not in environment.log_text(tail=None)
        finally:
            await a.close()
            await b.close()

    run_bounded(main(), 30)


def test_two_coordinators_with_their_default_ble_layers_meet(lab):
    lab()

    def config(adapter: str) -> Config:
        return Config(local=local(adapter), bootstrap=BootstrapConfig(peers=()))

    async def main() -> None:
        events: list = []
        async with PeerDiscoveryCoordinator(Identity.generate(), config=config("hci1"), cache=None) as a, \
                PeerDiscoveryCoordinator(Identity.generate(), config=config("hci0"), cache=None,
                                         on_event=events.append) as b:
            # (A's layer also sees B and PINGs it, so B may learn A through the DHT first)
            await eventually(lambda: b.peer(a.node_id) is not None and "ble" in b.peer(a.node_id).sources,
                             "A in B's peer table, vouched for by BLE", timeout=15)
            # A re-signs its record when its first peer arrives (a bootstrap node's announcement); the
            # new seq hint in A's advertisement makes B read the record again
            await eventually(lambda: b.peer(a.node_id).record == a.node.record, "A's current record at B",
                             timeout=15)
            peer = b.peer(a.node_id)
            assert peer.rssi == 0
            assert a.node.address in peer.record.addresses
            assert any(isinstance(e, (PeerDiscovered, PeerUpdated)) and e.source == "ble"
                       and e.peer.node_id == a.node_id for e in events)
            assert b.stats()["layers"]["ble"]["state"] == "running"
            assert b.stats()["checks"]["pings"] >= 1  # A's record has a UDP address: PINGed

    run_bounded(main(), 40)


class Gated:
    """A local layer that starts ``layer`` only once ``gate`` is set."""

    def __init__(self, layer: BleLayer, gate: asyncio.Event) -> None:
        self.name, self.layer, self.gate = layer.name, layer, gate

    async def start(self, context) -> None:
        await self.gate.wait()
        await self.layer.start(context)

    async def close(self) -> None:
        await self.layer.close()

    def stats(self) -> dict:
        return self.layer.stats()


def test_a_node_whose_dht_can_find_the_peer_resolves_it_without_connecting(lab):
    """B's routing table (k = 1) holds the bootstrap node X, not A: B resolves A's advertised hash
    by a DHT lookup towards it and asks A for its record over UDP; no GATT connection."""
    environment = lab()
    x_identity, a_identity, b_identity = identities_with_a_peer_outside_the_table()

    def config(adapter: str, x: DhtNode, **dht) -> Config:
        return Config(local=local(adapter), dht=DhtSettings(**dht),
                      bootstrap=BootstrapConfig(peers=(x.contact.pinned,), timeout_s=2.0, retries=0))

    async def main() -> None:
        gate = asyncio.Event()
        b_layer = BleLayer(local("hci0"))
        async with DhtNode(x_identity) as x, \
                PeerDiscoveryCoordinator(a_identity, config=config("hci1", x), cache=None) as a:
            assert await a.joined(10)
            async with PeerDiscoveryCoordinator(b_identity, config=config("hci0", x, k=1), cache=None,
                                                local_layers=[Gated(b_layer, gate)]) as b:
                assert await b.joined(10)
                assert b.peer(a.node_id) is None and a.node_id not in b.node.engine.table  # the setup
                gate.set()  # B's BLE layer starts scanning once B is in the DHT
                await eventually(lambda: b.peer(a.node_id) is not None and "ble" in b.peer(a.node_id).sources,
                                 "A in B's peer table, vouched for by BLE", timeout=15)
                stats = b_layer.stats()
                assert stats["resolved_from_dht"] >= 1 and stats.get("gatt_reads", 0) == 0, stats
                assert b.peer(a.node_id).record.public_key == a_identity.public_key
                assert b.stats()["lookups"]["resolve_dht"] >= 1
        assert "Connecting device[00:AA:00:00:00:02] with adapter[0]" not in environment.log_text(tail=None)

    run_bounded(main(), 60)


def test_after_bluez_restarts_both_layers_register_again_and_b_sees_a_again(lab):
    """BlueZoo is stopped (by PID, like a crashing bluetoothd: every registration is gone) and
    started again on the same bus: each layer reports unavailable, then re-registers its
    advertisement and GATT application and scans again; B loses A, then reads and reports it again."""
    environment = lab()
    record = make_record()

    async def main() -> None:
        baseline = len(asyncio.all_tasks())
        a_context, b_context = RecordingContext(own=record), RecordingContext()
        a = BleLayer(local("hci1"))
        b = BleLayer(local("hci0"), lost_after_s=1.0)
        await a.start(a_context)
        try:
            await b.start(b_context)
            await eventually(lambda: b_context.seen, "B's first report of A", timeout=8)
            environment.stop_bluez()
            for context in (a_context, b_context):
                await eventually(lambda: context.states[:1] == [
                    ("unavailable", "BlueZ stopped (org.bluez left the system D-Bus; start bluetoothd)")],
                    "unavailable", timeout=5)
            await eventually(lambda: b_context.gone == [bytes(record.node_id)], "B loses A", timeout=5)
            seen = len(b_context.seen)
            environment.start_bluez()
            for context in (a_context, b_context):
                await eventually(lambda: context.states[-1:] == [("running", None)], "running again", timeout=15)
            await eventually(lambda: len(b_context.seen) > seen, "B sees A again", timeout=15)
            assert b_context.seen[-1][0] == record
            assert b.stats()["gatt_records"] == 2  # A's GATT application is registered again
            for layer in (a, b):
                stats = layer.stats()
                assert stats["restarts"] >= 1 and stats["bluez"] == "available", stats
                assert stats.get("internal_errors", 0) == 0 and layer._tasks.background_count <= 4
            assert a.stats()["advertising"] and a.stats()["serving_record"]
        finally:
            await a.close()
            await b.close()
        left = [t.get_name() for t in asyncio.all_tasks()]
        assert not [name for name in left if name.startswith(("ble ", "BlueZ watcher"))], left
        assert len(left) <= baseline + 1, left  # (bleak keeps one task of its own per loop)

    run_bounded(main(), 60)


def test_an_adapter_unplugged_and_plugged_in_again_is_used_again(lab):
    environment = lab()
    record = make_record()

    async def main() -> None:
        a_context, b_context = RecordingContext(own=record), RecordingContext()
        a = BleLayer(local("hci1"))
        b = BleLayer(local("hci0"))
        await a.start(a_context)
        try:
            await b.start(b_context)
            await eventually(lambda: b_context.seen, "B's first report of A", timeout=8)
            environment.remove_adapter(1)
            await eventually(lambda: a_context.states[:1] == [("unavailable", "Bluetooth adapter hci1 was removed")],
                             "A unavailable", timeout=5)
            environment.add_adapter(1)
            await eventually(lambda: a_context.states[-1:] == [("running", None)], "A running again", timeout=15)
            # BlueZoo keeps the device it reported on hci0, tied to the removed adapter object, and
            # signals it once: neither B's scan nor a GATT read through hci0 can show the return. So
            # look at hci1 itself: the advertisement and the GATT application are registered again.
            assert await asyncio.to_thread(environment.bluez_property, "/org/bluez/hci1",
                                           "org.bluez.LEAdvertisingManager1", "ActiveInstances") == "1"
            after = environment.log_text(tail=None).split("Removing adapter[1]", 1)[1]
            assert "Adding GATT application" in after and "Registering advertisement" in after, after
            assert b_context.states == []  # B's adapter never went away
            assert a.stats()["advertising"] and a.stats().get("internal_errors", 0) == 0
        finally:
            await a.close()
            await b.close()

    run_bounded(main(), 60)


# --- every way BLE can be missing -----------------------------------------------------------------


_LABS = {"no bluez": {"bluez": False}, "no adapter": {"adapters": 0}, "powered off": {"auto_enable": False},
         "wrong name": {}}


def prepare(setup: str, lab, monkeypatch, tmp_path) -> None:
    """Point the system bus at a missing socket ("no bus"), or start the lab for ``setup``."""
    if setup == "no bus":
        monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={tmp_path}/no_such_socket")
    else:
        lab(**_LABS[setup])


@pytest.mark.parametrize("setup, adapter, reason", [
    ("no bus", "hci0", "no D-Bus system bus at unix:path="),
    ("no bluez", "hci0", "BlueZ is not running"),
    ("no adapter", None, "no Bluetooth adapter (BlueZ is running but has none)"),
    ("powered off", "hci0", "Bluetooth adapter hci0 is powered off"),
    ("wrong name", "hci7", "no Bluetooth adapter named hci7 (found: hci0, hci1)"),
])
def test_each_missing_piece_is_one_clear_unavailable_reason(lab, monkeypatch, tmp_path, setup, adapter, reason):
    prepare(setup, lab, monkeypatch, tmp_path)
    layer = BleLayer(local(adapter) if adapter else LocalConfig(mdns=False))
    context = RecordingContext(own=make_record())
    with pytest.raises(LayerUnavailable) as info:
        run_bounded(layer.start(context), 15)
    assert info.value.layer == "ble" and info.value.reason.startswith(reason), info.value.reason
    assert context.callbacks == []


@pytest.mark.parametrize("setup, reason", [
    ("no bus", "no D-Bus system bus"),
    ("no bluez", "BlueZ is not running"),
    ("no adapter", "no Bluetooth adapter"),
    ("powered off", "Bluetooth adapter hci0 is powered off"),
])
def test_bleaks_own_errors_map_to_the_same_reasons(lab, monkeypatch, tmp_path, setup, reason):
    """The four failure modes of the notes (§3a), raised by bleak's real BlueZ backend."""
    from bleak import BleakScanner

    prepare(setup, lab, monkeypatch, tmp_path)

    async def main() -> BaseException:
        scanner = BleakScanner(lambda device, advertisement: None)
        try:
            await scanner.start()
        except BaseException as exc:  # noqa: BLE001 - the point is to see what bleak raises
            return exc
        await scanner.stop()
        raise AssertionError("bleak started scanning without Bluetooth")

    error = run_bounded(main(), 15)
    assert describe_ble_error(error, "hci0").startswith(reason), (type(error), error)


def test_bless_missing_adapter_error_maps_to_a_reason(lab):
    lab(adapters=0)
    from sovereign_discovery.ble_backends import BlessRecordServer

    async def main() -> BaseException:
        server = BlessRecordServer("hci0")
        try:
            await server.start(make_record().encode())
        except BaseException as exc:  # noqa: BLE001
            return exc
        finally:
            await server.stop()
        raise AssertionError("bless served without an adapter")

    error = run_bounded(main(), 15)
    assert describe_ble_error(error, "hci0") == "no Bluetooth adapter named hci0"
