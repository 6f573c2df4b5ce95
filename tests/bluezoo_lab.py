"""A private Bluetooth lab for tests: a ``dbus-daemon`` of type "system" on a socket in a temporary
directory, and BlueZoo (PyPI ``bluezoo``, a BlueZ D-Bus mock; GPL-2.0, run as a separate process,
never imported) owning ``org.bluez`` on it with virtual adapters hci0, hci1, …

Both processes are started with ``subprocess.Popen`` and stopped by their PIDs (SIGTERM, then
SIGKILL after a grace period, always reaped); the directory is removed. Nothing touches the real
system bus: the tests point ``DBUS_SYSTEM_BUS_ADDRESS`` at :attr:`BluezooLab.bus_address`.

See shared/notes/local-discovery.md §3c for what BlueZoo does and does not model (RSSI is 0,
no AD sizing, a device is signalled once per discovery: start a fresh lab per test).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_type="method_return"/>
    <allow send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="signal"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
  </policy>
</busconfig>
"""

ADAPTER_ADDRESSES = ("00:AA:00:00:00:01", "00:AA:00:00:00:02")


def bluezoo_command() -> list[str] | None:
    """How to run BlueZoo here, or None if it is not installed."""
    found = shutil.which("bluezoo")
    if found:
        return [found]
    try:
        import importlib.util

        if importlib.util.find_spec("bluezoo") is not None:
            return [sys.executable, "-c", "import sys; from bluezoo.bluezoo import main; sys.exit(main())"]
    except (ImportError, ValueError):
        pass
    return None


def missing_tools() -> str | None:
    """Why the lab cannot run here (for pytest.skip), or None."""
    if shutil.which("dbus-daemon") is None:
        return "dbus-daemon not found (Debian: apt-get install dbus)"
    if bluezoo_command() is None:
        return "bluezoo not installed (pip install bluezoo)"
    return None


class BluezooLab:
    """``with BluezooLab(adapters=2) as lab:`` — a private system bus, with BlueZoo on it unless
    ``bluez=False`` (a bus without BlueZ). ``auto_enable=False`` leaves the adapters powered off.
    Every wait is bounded by ``timeout_s``."""

    def __init__(self, *, adapters: int = 2, bluez: bool = True, auto_enable: bool = True,
                 scan_interval_s: int = 1, timeout_s: float = 10.0) -> None:
        self.adapters = adapters
        self.bluez = bluez
        self.auto_enable = auto_enable
        self.scan_interval_s = scan_interval_s
        self.timeout_s = timeout_s
        self.directory = Path(tempfile.mkdtemp(prefix="bzlab-"))  # short: a socket path has ≤ 107 bytes
        self.socket = self.directory / "system_bus_socket"
        self.bus_address = f"unix:path={self.socket}"
        self.log = self.directory / "bluezoo.log"
        self._processes: list[subprocess.Popen] = []
        self._bluezoo: subprocess.Popen | None = None
        self._old_logs: list[Path] = []

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._processes]

    def env(self) -> dict[str, str]:
        return {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": self.bus_address}

    def start(self) -> "BluezooLab":
        try:
            config = self.directory / "system.conf"
            config.write_text(_CONFIG.format(socket=self.socket))
            self._processes.append(subprocess.Popen(
                ["dbus-daemon", "--nofork", "--nopidfile", f"--config-file={config}"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            self._wait(lambda: self.socket.exists(), "the dbus-daemon socket")
            if self.bluez:
                self.start_bluez()
        except BaseException:
            self.stop()
            raise
        return self

    def start_bluez(self) -> None:
        """Start BlueZoo on the lab's bus (again, after :meth:`stop_bluez`: a bluetoothd restart,
        with nothing registered) and wait until it owns org.bluez with its adapters."""
        command = [*bluezoo_command(), "--scan-interval", str(self.scan_interval_s)]
        if self.auto_enable:
            command.append("--auto-enable")
        for address in ADAPTER_ADDRESSES[: self.adapters]:
            command += ["-a", address]
        if self.log.exists():  # keep the earlier run's log: log_text(tail=None) reads them all
            self.log.rename(self.directory / f"bluezoo.{len(self._old_logs)}.log")
            self._old_logs.append(self.directory / f"bluezoo.{len(self._old_logs)}.log")
        with open(self.log, "wb") as log:
            self._bluezoo = subprocess.Popen(command, env=self.env(), stdin=subprocess.DEVNULL, stdout=log,
                                             stderr=log)
        self._processes.append(self._bluezoo)
        self._wait(self._bluez_ready, "BlueZoo to own org.bluez with its adapters")

    def stop_bluez(self) -> None:
        """Stop BlueZoo (by its PID: SIGTERM, which it does not handle, so it ends at once like a
        crashed bluetoothd, unregistering nothing); the bus stays. Waits until org.bluez has no owner."""
        process, self._bluezoo = self._bluezoo, None
        if process is None:
            return
        self._end(process)
        self._processes.remove(process)
        self._wait(lambda: self._dbus_send("/org/freedesktop/DBus", "org.freedesktop.DBus.NameHasOwner",
                                           "string:org.bluez", dest="org.freedesktop.DBus") == "false",
                   "org.bluez to lose its owner")

    def remove_adapter(self, index: int) -> None:
        """Unplug adapter hci<index> (BlueZoo's own ``org.bluezoo.Manager1.RemoveAdapter``)."""
        if self._dbus_send("/org/bluezoo", "org.bluezoo.Manager1.RemoveAdapter", f"byte:{index}") is None:
            raise RuntimeError(f"BlueZoo could not remove hci{index}: {self.log_text()}")

    def add_adapter(self, index: int) -> None:
        """Plug adapter hci<index> in again, with its address (powered on with auto_enable)."""
        if self._dbus_send("/org/bluezoo", "org.bluezoo.Manager1.AddAdapter", f"byte:{index}",
                           f"string:{ADAPTER_ADDRESSES[index]}") is None:
            raise RuntimeError(f"BlueZoo could not add hci{index}: {self.log_text()}")

    def bluez_property(self, path: str, interface: str, name: str) -> str | None:
        """A BlueZ property as dbus-send prints its value's last word (``true``, ``1``), or None."""
        return self._dbus_send(path, "org.freedesktop.DBus.Properties.Get", f"string:{interface}", f"string:{name}")

    def _bluez_ready(self) -> bool:
        if not self.adapters:
            return self._dbus_send("/org/freedesktop/DBus", "org.freedesktop.DBus.NameHasOwner",
                                   "string:org.bluez", dest="org.freedesktop.DBus") == "true"
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        if f"Adding adapter[{self.adapters - 1}]" not in text:
            return False
        if not self.auto_enable:
            return True
        return self.bluez_property(f"/org/bluez/hci{self.adapters - 1}", "org.bluez.Adapter1", "Powered") == "true"

    def _dbus_send(self, path: str, method: str, *args: str, dest: str = "org.bluez") -> str | None:
        """The last word of dbus-send's reply (``true``), or None on an error."""
        result = subprocess.run(["dbus-send", f"--bus={self.bus_address}", "--print-reply", f"--dest={dest}",
                                 path, method, *args], capture_output=True, text=True, timeout=5)
        words = result.stdout.split()
        return words[-1] if result.returncode == 0 and words else None

    def _wait(self, predicate, what: str) -> None:
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            for process in self._processes:
                if process.poll() is not None:
                    raise RuntimeError(f"lab process {process.args[0]} exited ({process.returncode})"
                                       f" while waiting for {what}: {self.log_text()}")
            if predicate():
                return
            time.sleep(0.02)
        raise TimeoutError(f"timed out after {self.timeout_s} s waiting for {what}: {self.log_text()}")

    def log_text(self, tail: int | None = 2000) -> str:
        """BlueZoo's log: its last ``tail`` characters (for error messages), or all of it (None:
        to assert that something never happened)."""
        text = "".join(log.read_text(errors="replace") for log in (*self._old_logs, self.log) if log.exists())
        return text[-tail:] if tail is not None else text

    def stop(self) -> None:
        """Stop every process by its PID (BlueZoo first), reap them, remove the directory."""
        for process in reversed(self._processes):
            self._end(process)
        self._processes.clear()
        self._bluezoo = None
        shutil.rmtree(self.directory, ignore_errors=True)

    @staticmethod
    def _end(process: subprocess.Popen) -> None:
        """SIGTERM, SIGKILL after 3 s, always reaped."""
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=3)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=3)

    def __enter__(self) -> "BluezooLab":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
