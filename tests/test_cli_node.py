"""``sovereign-discovery node`` end to end: real processes on 127.0.0.1 (port 0), driven through the
command line and watched through their status endpoints. A bootstrap node and several nodes find
each other's records and capability providers; a wrong pinned key is refused; a node restarted
after the bootstrap node stopped rejoins from its cache; SIGTERM shuts down cleanly; a node killed
with SIGKILL restarts on an intact cache. Every wait is bounded in count and time."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import sovereign_discovery as sd
from sovereign_discovery.status_http import fetch_json

from .test_cli import cli, one_line_error
from .test_examples import ROOT, _env, _first_line

STOP_TIMEOUT_S = 20


class NodeProcess:
    """One ``sovereign-discovery node`` process with its pinned line and status address."""

    def __init__(self, tmp: Path, name: str, *args: str, http: bool = True, key: Path | None = None) -> None:
        self.key = key or tmp / f"{name}.key"
        if not self.key.exists():
            sd.Identity.generate().save(self.key)
        self.identity = sd.Identity.load(self.key)
        command = [sys.executable, "-m", "sovereign_discovery.cli", "--log-level", "INFO", "node",
                   "--key", str(self.key), "--listen", "127.0.0.1:0", "--no-mdns", "--no-ble", *args]
        if http:
            command += ["--http", "127.0.0.1:0"]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                        env=_env(), cwd=ROOT)
        self.pinned = _first_line(self.process, 30)
        assert "@" in self.pinned, self.finish()
        # The first line pins this node's own key at the address it bound.
        assert sd.Contact.parse(self.pinned).public_key == self.identity.public_key, self.pinned
        self.http = None
        if http:
            status = _first_line(self.process, 10)
            assert status.startswith("status http://"), status
            host, _, port = status.removeprefix("status http://").rpartition(":")
            self.http = (host, int(port))

    @property
    def node_id(self) -> str:
        return str(self.identity.node_id)

    def peers(self, **query: str) -> list[dict]:
        path = "/peers" + ("?" + "&".join(f"{k}={v}" for k, v in query.items()) if query else "")
        return fetch_json(*self.http, path, timeout=5)["peers"]

    def wait_for_peers(self, expected: set[str], what: str, timeout: float = 20.0) -> list[dict]:
        peers: list[dict] = []
        for _ in range(int(timeout / 0.1)):
            peers = self.peers()
            if expected <= {p["node_id"] for p in peers}:
                return peers
            time.sleep(0.1)
        raise AssertionError(f"{what}: expected {expected}, got {[p['node_id'] for p in peers]}\n{self.finish()}")

    def stop(self, signum: int = signal.SIGTERM) -> tuple[int, str]:
        self.process.send_signal(signum)
        try:
            _, err = self.process.communicate(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, err = self.process.communicate()
            raise AssertionError(f"node did not stop within {STOP_TIMEOUT_S} s after signal {signum}:\n{err}")
        return self.process.returncode, err

    def finish(self) -> str:
        if self.process.poll() is None:
            self.process.kill()
        out, err = self.process.communicate()
        return f"exit {self.process.returncode}\n--- stdout\n{out}\n--- stderr\n{err}"

    def kill_if_running(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate()


def metric_samples(http: tuple[str, int]) -> dict:
    """``GET /metrics`` parsed by prometheus_client: {(name, sorted labels): value}."""
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    with urlopen("http://%s:%d/metrics" % http, timeout=5) as answer:
        text = answer.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.fixture
def nodes():
    started: list[NodeProcess] = []
    yield started
    for node in started:
        node.kill_if_running()


def test_nodes_find_each_others_records_and_providers_through_a_bootstrap_node(tmp_path, nodes):
    boot = NodeProcess(tmp_path, "boot")
    nodes.append(boot)
    members = []
    for n in range(3):
        member = NodeProcess(tmp_path, f"n{n}", "--bootstrap", boot.pinned, "--capability", "relay",
                             "--cache", str(tmp_path / f"n{n}.sqlite3"))
        nodes.append(member)
        members.append(member)
    everyone = {boot.node_id} | {m.node_id for m in members}
    for node in (boot, *members):
        node.wait_for_peers(everyone - {node.node_id}, f"{node.node_id[:8]}'s peers")
    first = members[0].peers()
    by_id = {p["node_id"]: p for p in first}
    assert "bootstrap" in by_id[boot.node_id]["sources"]
    assert by_id[members[1].node_id]["capabilities"] == ["relay"]
    relays = members[0].peers(capability="relay")
    assert {p["node_id"] for p in relays} == {members[1].node_id, members[2].node_id}
    # The one-shot commands find the records and the providers through the same bootstrap node.
    found = cli("lookup", members[2].node_id, "--bootstrap", boot.pinned, "--listen", "127.0.0.1:0", "--json")
    assert found.returncode == 0, found.stderr
    assert json.loads(found.stdout)["capabilities"] == ["relay"]
    providers = cli("find", "--capability", "relay", "--bootstrap", boot.pinned, "--listen", "127.0.0.1:0",
                    "--json")
    assert providers.returncode == 0, providers.stderr
    assert {p["node_id"] for p in json.loads(providers.stdout)} == {m.node_id for m in members}
    # A capability nobody offers: one line and exit status 3, whether the lookup completed empty or
    # ran into its deadline (the short-lived nodes above are gone but still in some tables).
    nobody = cli("find", "--capability", "nobody-offers-this", "--bootstrap", boot.pinned, "--listen",
                 "127.0.0.1:0", "--timeout", "1")
    assert nobody.returncode == 3 and "no provider of 'nobody-offers-this' found" in one_line_error(nobody), nobody
    listed = cli("peers", "--http", "%s:%d" % members[0].http)
    assert listed.returncode == 0 and members[1].node_id[:8] in listed.stdout
    as_json = cli("peers", "--http", "%s:%d" % members[0].http, "--json", "--source", "bootstrap")
    assert [p["node_id"] for p in json.loads(as_json.stdout)] == [boot.node_id]
    stats = fetch_json(*members[0].http, "/stats")
    assert stats["peers"] == 3 and stats["bootstrap"]["answered"] == 1
    # GET /metrics renders the real coordinator's stats (not only a test double's) for Prometheus.
    metrics = metric_samples(members[0].http)
    assert metrics[("sovereign_discovery_up", ())] == 1
    assert metrics[("sovereign_discovery_peers", ())] == 3
    assert metrics[("sovereign_discovery_peers_by_source", (("source", "bootstrap"),))] == 1
    assert fetch_json(*members[0].http, "/healthz")["ok"] is True


def test_a_wrong_pinned_key_is_refused_and_nothing_from_that_peer_is_trusted(tmp_path, nodes):
    real = NodeProcess(tmp_path, "real")
    nodes.append(real)
    impostor = sd.Contact(sd.Identity.generate().public_key, sd.Contact.parse(real.pinned).address).pinned
    key = tmp_path / "other.key"
    sd.Identity.generate().save(key)
    config = tmp_path / "fast.toml"
    config.write_text("[bootstrap]\ntimeout_s = 2.0\nretries = 0\n", encoding="utf-8")
    result = cli("--log-level", "WARNING", "node", "--key", str(key), "--listen", "127.0.0.1:0",
                 "--bootstrap", impostor, "--no-mdns", "--no-ble", "--config", str(config))
    assert result.returncode == 1, result
    line = one_line_error(result)
    assert "pinned key mismatch" in line and impostor in line
    assert real.peers() == []  # the refused handshake left nothing on the real node either


def test_sigterm_flushes_the_cache_and_a_restart_rejoins_from_it_with_the_bootstrap_node_gone(tmp_path, nodes):
    boot = NodeProcess(tmp_path, "boot")
    peer = NodeProcess(tmp_path, "peer", "--bootstrap", boot.pinned, "--capability", "relay")
    cache = tmp_path / "me.sqlite3"
    me = NodeProcess(tmp_path, "me", "--bootstrap", boot.pinned, "--cache", str(cache))
    nodes.extend([boot, peer, me])
    me.wait_for_peers({boot.node_id, peer.node_id}, "my peers")
    status, err = me.stop(signal.SIGTERM)
    assert status == 0 and "stopped cleanly" in err and "Traceback" not in err, err
    with sd.PeerCache.open(cache) as stored:  # flushed and closed: every peer is in the file
        assert {str(p.node_id) for p in stored.peers(time.time())} >= {boot.node_id, peer.node_id}
    boot.stop(signal.SIGTERM)
    again = NodeProcess(tmp_path, "me", "--bootstrap", boot.pinned, "--cache", str(cache), key=me.key)
    nodes.append(again)
    peers = again.wait_for_peers({peer.node_id}, "the peer, from the cache alone")
    assert "cache" in {p["node_id"]: p for p in peers}[peer.node_id]["sources"]
    assert fetch_json(*again.http, "/healthz")["table_size"] >= 1


def test_a_node_killed_with_sigkill_restarts_on_an_intact_cache(tmp_path, nodes):
    boot = NodeProcess(tmp_path, "boot")
    cache = tmp_path / "me.sqlite3"
    me = NodeProcess(tmp_path, "me", "--bootstrap", boot.pinned, "--cache", str(cache))
    nodes.extend([boot, me])
    me.wait_for_peers({boot.node_id}, "the bootstrap peer")
    for _ in range(100):  # until the batch with the bootstrap peer is committed (once a second)
        if fetch_json(*me.http, "/stats")["cache"]["pending_writes"] == 0:
            break
        time.sleep(0.1)
    time.sleep(0.2)
    status, _ = me.stop(signal.SIGKILL)
    assert status == -signal.SIGKILL
    again = NodeProcess(tmp_path, "me", "--bootstrap", boot.pinned, "--cache", str(cache), key=me.key)
    nodes.append(again)
    again.wait_for_peers({boot.node_id}, "the bootstrap peer after the restart")
    stats = fetch_json(*again.http, "/stats")
    assert stats["cache"]["set_aside"] is None and stats["cache"]["reseeded"] >= 1
    status, err = again.stop(signal.SIGINT)
    assert status == 0 and "stopped cleanly" in err and "not a valid cache" not in err


BAD_NODE_RUNS = [  # (files to write, arguments, extra environment, exit status, the line names)
    ({}, ["--listen", "127.0.0.1:0"], {}, 2, "--key"),
    ({}, ["--key", "k.key", "--bootstrap", "nokey@127.0.0.1:1"], {}, 2, "--bootstrap"),
    ({"bad.toml": "[dht]\nk = 0\n"}, ["--key", "k.key", "--config", "bad.toml"], {}, 2, "dht.k"),
    ({"broken.toml": "[dht\nk = 3\n"}, ["--key", "k.key", "--config", "broken.toml"], {}, 2, "broken.toml"),
    ({}, ["--key", "k.key"], {"SOVEREIGN_BOOTSTRAP_PEERS": "nokey@127.0.0.1:1"}, 2, "SOVEREIGN_BOOTSTRAP_PEERS"),
    ({}, ["--key", "loose.key", "--listen", "127.0.0.1:0"], {}, 1, "loose.key"),
    ({}, ["--key", "k.key", "--mdns-interface", "eth0"], {}, 2, "--mdns-interface"),
    ({}, ["--key", "k.key", "--ble-adapter", "no such adapter!"], {}, 2, "--ble-adapter"),
]


@pytest.mark.parametrize("files, args, environ, status, names", BAD_NODE_RUNS)
def test_bad_node_arguments_give_one_line(tmp_path, files, args, environ, status, names):
    for name in ("k.key", "loose.key"):
        sd.Identity.generate().save(tmp_path / name)
    (tmp_path / "loose.key").chmod(0o644)
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "sovereign_discovery.cli", "node", "--no-mdns", "--no-ble",
                             *args], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                            env={**_env(), **environ})
    assert result.returncode == status and names in one_line_error(result), result


def test_peers_from_a_node_that_does_not_answer_is_one_line():
    unreachable = cli("peers", "--http", "127.0.0.1:1")
    assert unreachable.returncode == 1 and "127.0.0.1:1" in one_line_error(unreachable)


def test_a_port_in_use_is_one_line(tmp_path, nodes):
    first = NodeProcess(tmp_path, "first")
    nodes.append(first)
    key = tmp_path / "second.key"
    sd.Identity.generate().save(key)
    taken = sd.Contact.parse(first.pinned).address
    result = cli("node", "--key", str(key), "--listen", f"127.0.0.1:{taken.port}", "--no-mdns", "--no-ble")
    assert result.returncode == 1 and str(taken.port) in one_line_error(result)
    # The status endpoint's port taken (the UDP one free): the same kind of line, after a clean stop.
    result = cli("node", "--key", str(key), "--listen", "127.0.0.1:0", "--no-mdns", "--no-ble",
                 "--http", "%s:%d" % first.http)
    assert result.returncode == 1
    assert one_line_error(result) == ("sovereign-discovery node: status endpoint cannot listen on "
                                      "%s:%d: address already in use" % first.http)


def test_a_corrupt_cache_is_set_aside_with_a_clear_message_and_never_trusted(tmp_path, nodes):
    cache = tmp_path / "me.sqlite3"
    cache.write_bytes(b"this is not an SQLite database" * 100)
    me = NodeProcess(tmp_path, "me", "--cache", str(cache))
    nodes.append(me)
    aside = list(tmp_path.glob("me.sqlite3.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes().startswith(b"this is not an SQLite database")
    assert fetch_json(*me.http, "/stats")["cache"]["set_aside"] == str(aside[0])
    status, err = me.stop()
    assert status == 0 and str(aside[0]) in err and "Traceback" not in err
