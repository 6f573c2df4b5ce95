"""The ``sovereign-discovery`` command line, end to end: real processes on 127.0.0.1 (a bootstrap
node from examples/bootstrap_node.py, nodes announcing in this process, the CLI as a subprocess)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

import sovereign_discovery as sd
from sovereign_discovery.cli import main as cli_main

from .test_examples import EXAMPLES, ROOT, _env, _first_line

TIMEOUT_S = 60


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sovereign_discovery.cli", *args], capture_output=True,
                          text=True, timeout=TIMEOUT_S, env=_env(), cwd=ROOT)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines, result
    return lines[-1]


def test_keygen_then_id(tmp_path):
    key = tmp_path / "node.key"
    made = cli("keygen", "--out", str(key))
    assert made.returncode == 0, made.stderr
    identity = sd.Identity.load(key)
    shown = cli("id", "--key", str(key), "--json", "--log-level", "debug")  # the flag after the command too
    assert json.loads(shown.stdout) == {"node_id": str(identity.node_id),
                                        "public_key": sd.encode_public_key(identity.public_key)}
    assert str(identity.node_id) in cli("id", "--key", str(key)).stdout
    again = cli("keygen", "--out", str(key))  # never overwritten
    assert again.returncode == 1 and str(key) in one_line_error(again)


def test_bad_key_files_give_one_line(tmp_path):
    missing = cli("id", "--key", str(tmp_path / "nope.key"))
    assert missing.returncode == 1 and "nope.key" in one_line_error(missing)
    key = tmp_path / "open.key"
    sd.Identity.generate().save(key)
    key.chmod(0o640)
    loose = cli("id", "--key", str(key))
    assert loose.returncode == 1 and "open.key" in one_line_error(loose)


VALID = sd.Contact(sd.Identity.generate().public_key, sd.Address("127.0.0.1", 1)).pinned


@pytest.mark.parametrize("args, mentions", [
    (["lookup", "abc", "--bootstrap", VALID], "NODE_ID"),
    (["lookup", "a" * 32, "--bootstrap", "nokey@127.0.0.1:1"], "--bootstrap"),
    (["lookup", "a" * 32, "--bootstrap", VALID.replace("127.0.0.1:1", "127.0.0.1")], "--bootstrap"),
    (["lookup", "a" * 32], "--bootstrap"),
    (["find", "--capability", "Bad Name", "--bootstrap", VALID], "--capability"),
    (["find", "--capability", "relay", "--count", "0", "--bootstrap", VALID], "--count"),
    (["lookup", "a" * 32, "--bootstrap", VALID, "--timeout", "-1"], "--timeout"),
    (["lookup", "a" * 32, "--bootstrap", VALID, "--listen", "nowhere"], "--listen"),
    (["find", "--capability", "relay", "--bootstrap", VALID, "--listen", "nowhere.example:0"], "--listen"),
    (["id", "--key", "k.key", "--log-level", "LOUD"], "--log-level"),
])
def test_bad_arguments_give_a_usage_line(args, mentions):
    result = cli(*args)
    assert result.returncode == 2
    assert mentions in one_line_error(result)


def test_the_console_script_is_declared_and_points_at_main():
    import importlib
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    module, _, function = scripts["sovereign-discovery"].partition(":")
    assert getattr(importlib.import_module(module), function) is cli_main


def test_help_everywhere():
    for args in ([], ["keygen"], ["id"], ["lookup"], ["find"], ["node"], ["peers"]):
        result = cli(*args, "--help")
        assert result.returncode == 0 and "usage: sovereign-discovery" in result.stdout


@pytest.fixture(scope="module")
def network():
    """A bootstrap node in its own process, and two nodes that announced records and a capability
    (kept running in a thread-free way: the test drives them from its own event loop)."""
    process = subprocess.Popen([sys.executable, str(EXAMPLES / "bootstrap_node.py")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=_env(), cwd=ROOT)
    try:
        yield _first_line(process, 20)
    finally:
        process.kill()
        process.communicate()


async def _announce_and_query(pinned: str, run_cli) -> tuple:
    async with sd.DhtNode(sd.Identity.generate()) as a, sd.DhtNode(sd.Identity.generate()) as b:
        for node in (a, b):
            await node.bootstrap([pinned], deadline_s=10)
            await node.announce_capability("relay")
            await node.announce()
        loop = asyncio.get_running_loop()
        results = await loop.run_in_executor(None, run_cli, a, b)
        return a.record, b.record, results


def test_lookup_and_find_through_a_pinned_bootstrap_node(network):
    def run_cli(a, b):
        return (cli("lookup", str(a.node_id), "--bootstrap", network, "--listen", "127.0.0.1:0", "--json"),
                cli("lookup", str(b.node_id), "--bootstrap", network, "--listen", "127.0.0.1:0"),
                cli("find", "--capability", "relay", "--bootstrap", network, "--listen", "127.0.0.1:0",
                    "--json"),
                cli("lookup", "a" * 32, "--bootstrap", network, "--listen", "127.0.0.1:0",
                    "--timeout", "3"))

    record_a, record_b, (found, found_text, providers, absent) = asyncio.run(
        asyncio.wait_for(_announce_and_query(network, run_cli), TIMEOUT_S))
    assert found.returncode == 0, found.stderr
    assert json.loads(found.stdout)["node_id"] == str(record_a.node_id)
    assert json.loads(found.stdout)["capabilities"] == ["relay"]
    assert found_text.returncode == 0 and str(record_b.node_id) in found_text.stdout
    assert "signature verified" in found_text.stdout
    assert providers.returncode == 0, providers.stderr
    assert {p["node_id"] for p in json.loads(providers.stdout)} == {str(record_a.node_id),
                                                                     str(record_b.node_id)}
    assert absent.returncode == 3 and "no record" in one_line_error(absent)


def test_a_wrong_pinned_key_is_refused_with_a_clear_message(network):
    real = sd.Contact.parse(network)
    impostor_line = sd.Contact(sd.Identity.generate().public_key, real.address).pinned
    result = cli("lookup", "a" * 32, "--bootstrap", impostor_line, "--listen", "127.0.0.1:0",
                 "--timeout", "3")
    assert result.returncode == 1
    line = one_line_error(result)
    assert "pinned key mismatch" in line and impostor_line in line


def test_no_bootstrap_peer_answering_is_a_clear_failure():
    import socket
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        line = sd.Contact(sd.Identity.generate().public_key,
                          sd.Address("127.0.0.1", silent.getsockname()[1])).pinned
        result = cli("lookup", "a" * 32, "--bootstrap", line, "--listen", "127.0.0.1:0", "--timeout", "1")
    assert result.returncode == 1 and "no bootstrap peer answered" in one_line_error(result)
