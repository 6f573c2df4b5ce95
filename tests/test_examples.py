"""The examples run: each is started as a user would start it (a subprocess on 127.0.0.1) and its
output and exit status are checked. The demo is the README's main command."""

from __future__ import annotations

import asyncio
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import sovereign_discovery as sd

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
TIMEOUT_S = 60

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="uses POSIX signals")


def _env() -> dict:
    env = dict(os.environ)  # keeps SOVEREIGN_DISCOVERY_PURE_PYTHON / _REQUIRE_C from CI
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True,
                          text=True, timeout=TIMEOUT_S, env=_env(), cwd=ROOT)


def _explain(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"


def test_demo_network_finds_every_record_and_provider():
    result = _run("demo_network.py")
    assert result.returncode == 0, _explain(result)
    out = result.stdout
    assert "8/8 records found" in out, _explain(result)
    assert "3/3 provider lookups complete (8/8 providers)" in out, _explain(result)
    assert "wrong pinned key refused: yes" in out, _explain(result)
    assert "across processes" in out, _explain(result)  # some lookups crossed to the 2nd process
    assert "Traceback" not in result.stderr, _explain(result)


def test_find_peers_standalone():
    result = _run("find_peers.py", "--nodes", "4")
    assert result.returncode == 0, _explain(result)
    assert "started a bootstrap node here" in result.stdout
    assert "4/4 records found, 4/4 provider lookups complete: OK" in result.stdout, _explain(result)


def _first_line(process: subprocess.Popen, timeout_s: float) -> str:
    ready, _, _ = select.select([process.stdout], [], [], timeout_s)
    assert ready, "bootstrap_node.py printed nothing in time"
    return process.stdout.readline().strip()


async def _join(pinned: str) -> list[sd.Contact]:
    async with sd.DhtNode(sd.Identity.generate(), host="127.0.0.1") as node:
        return await node.bootstrap([pinned], deadline_s=10)


def test_bootstrap_node_prints_a_pinned_line_serves_and_stops_cleanly(tmp_path):
    key = tmp_path / "boot.key"
    identity = sd.Identity.generate()
    identity.save(key)
    process = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "bootstrap_node.py"), "--key", str(key)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT)
    try:
        pinned = _first_line(process, 20)
        contact = sd.Contact.parse(pinned)
        assert contact.public_key == identity.public_key  # the key file's identity
        assert str(contact.address.ip) == "127.0.0.1" and contact.address.port > 0

        closest = asyncio.run(_join(pinned))
        assert [c.node_id for c in closest] == [identity.node_id]

        peers = _run("find_peers.py", "--bootstrap", pinned, "--nodes", "3")
        assert peers.returncode == 0, _explain(peers)
        assert "3/3 records found" in peers.stdout

        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, f"exit {process.returncode}\n{out}\n{err}"
    assert "Traceback" not in err, err
    assert "stopped by SIGTERM" in out, out
    table = re.search(r"table (\d+) peers?", out)
    assert table and 3 <= int(table.group(1)) <= 4, out  # the 3 nodes, and the probe unless evicted
    assert re.search(r"^messages in \d+ .*, out \d+; drops \d+", out, re.MULTILINE), out


def test_bootstrap_node_stops_on_sigint_too():
    process = subprocess.Popen([sys.executable, str(EXAMPLES / "bootstrap_node.py")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=_env(), cwd=ROOT)
    try:
        sd.Contact.parse(_first_line(process, 20))
        time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, err
    assert "stopped by SIGINT" in out and "Traceback" not in err


@pytest.mark.parametrize("script, args", [
    ("bootstrap_node.py", ["--port", "70000"]),
    ("bootstrap_node.py", ["--host", "not-an-ip"]),
    ("bootstrap_node.py", ["--key", "/nonexistent/dir/boot.key"]),
    ("bootstrap_node.py", ["--unknown"]),
    ("find_peers.py", ["--bootstrap", "nokey@127.0.0.1:4000"]),
    ("find_peers.py", ["--nodes", "zero"]),
    ("demo_network.py", ["--nodes", "1"]),
])
def test_bad_arguments_give_one_line_and_a_nonzero_exit(script, args):
    result = _run(script, *args)
    assert result.returncode != 0, _explain(result)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{script}: error: "), _explain(result)
    assert result.stdout == ""


@pytest.mark.parametrize("script", ["bootstrap_node.py", "find_peers.py", "demo_network.py"])
def test_help(script):
    result = _run(script, "--help")
    assert result.returncode == 0 and "usage:" in result.stdout, _explain(result)


def test_dht_node_guide_lists_every_setting_and_drop_reason():
    """docs/dht-node.md documents every DhtConfig field and every drop reason: a new one must be
    added there too."""
    from dataclasses import fields

    from sovereign_discovery import node, session

    guide = (ROOT / "docs" / "dht-node.md").read_text(encoding="utf-8")
    config = sd.DhtConfig()
    for f in fields(sd.DhtConfig):
        default = getattr(config, f.name)
        assert f"| `{f.name}` | {default} |" in guide, f"DhtConfig.{f.name} (default {default}) not in the guide"
    for reason in node.DROP_REASONS + session.DROP_REASONS:
        assert f"| `{reason}` |" in guide, f"drop reason {reason} not in the guide"


def test_coordinator_example_discovers_peers_and_providers():
    result = _run("coordinator.py")
    assert result.returncode == 0, _explain(result)
    out = result.stdout
    assert "joined: True" in out and "2 provider(s) of 'relay'" in out, _explain(result)
    assert "signature verified" in out and out.count("event: discovered") == 3, _explain(result)
