"""The mDNS layer between separate processes on real python-zeroconf: on the host's 127.0.0.1
(no privilege needed), and across a veth pair between two network namespaces created for the
test (root only; skipped with the reason otherwise, and the namespaces are deleted afterwards),
over IPv4 and over IPv6 alone (unique local addresses: mDNS on ff02::fb, the DHT's PING over IPv6).
Each runs one round of ``benchmarks/mdns_latency.py`` (an observer process, two peers started
cold, a late observer, a goodbye and a crash) and checks what happened. The bounds asserted are
generous correctness bounds — a goodbye or a crash noticed in seconds, not at the records' TTL of
minutes — the latency targets are the benchmark's to report. Also: an interface that is down is a
clear ``LayerUnavailable``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("zeroconf")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "mdns_latency.py"
LIVENESS_S = 1.5
PER_PEER = ("cold_discovery_ms", "warm_discovery_ms", "warm_from_start_ms")  # two peers a round
PER_ROUND = ("goodbye_to_lost_ms", "crash_to_lost_ms")


def netns_problem() -> str | None:
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        from mdns_latency import Lab
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return Lab.netns_problem()


def one_round(mode: str) -> dict:
    result = subprocess.run([sys.executable, str(SCRIPT), "--mode", mode, "--rounds", "1", "--liveness",
                             str(LIVENESS_S), "--json"], capture_output=True, text=True, timeout=90)
    assert result.stdout, result.stderr[-2000:]
    return json.loads(result.stdout)


def check_round(result: dict) -> None:
    assert result["failures"] == []
    for name in (*PER_PEER, *PER_ROUND):
        assert len(result[name]["samples"]) == (2 if name in PER_PEER else 1), name
    assert result["cold_discovery_ms"]["max"] < 5000  # probing takes ~1.2 s; a lost announcement ~2 s more
    assert result["goodbye_to_lost_ms"]["max"] < 1500  # the goodbye, not the 120 s TTL
    assert result["crash_to_lost_ms"]["max"] < LIVENESS_S * 1000 + 1000  # liveness, not the TTL


def test_processes_on_loopback_discover_each_other_and_notice_goodbyes_and_crashes():
    result = one_round("loopback")
    assert result["mode"] == "loopback" and result["link"] == ["127.0.0.1"]
    check_round(result)


@pytest.mark.parametrize("mode, name, prefix", [("netns", "netns-veth", "169.254.77."),
                                                 ("netns6", "netns-veth-ipv6", "[fd5d:77::")])
def test_processes_in_two_namespaces_over_a_veth_pair(mode, name, prefix):
    problem = netns_problem()
    if problem:
        pytest.skip(f"no veth lab: {problem}")
    result = one_round(mode)
    assert result["mode"] == name
    check_round(result)
    # the observer reached both peers (verified record, authenticated PING answered) on this link
    assert len(result["seen_at"]) == 2 and all(a.startswith(prefix) for a in result["seen_at"]), result["seen_at"]
    assert result["observer_checks"]["pings"] >= 2
    leftover = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    assert "sdmA" not in leftover and "sdmB" not in leftover


def test_an_interface_that_is_down_makes_the_layer_unavailable_with_the_reason():
    """A fresh network namespace's lo is down (so its address is not listed as up)."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    probe = subprocess.run(["unshare", "-rn", "true"], capture_output=True, timeout=10)
    if probe.returncode != 0:
        reason = probe.stderr.decode(errors="replace").strip()
        pytest.skip(f"cannot create a network namespace here: {reason}")
    code = textwrap.dedent("""
        import asyncio
        from sovereign_discovery import Identity, LocalConfig
        from sovereign_discovery.layers import LayerUnavailable
        from sovereign_discovery.mdns import create_layer
        from tests.test_mdns import FakeContext

        async def main():
            layer = create_layer(LocalConfig(mdns_interfaces=("127.0.0.1",)))
            try:
                await layer.start(FakeContext(Identity.generate()))
            except LayerUnavailable as exc:
                print("unavailable:", exc.reason)
            else:
                print("started")
            await layer.close()

        asyncio.run(asyncio.wait_for(main(), 20))
    """)
    result = subprocess.run(["unshare", "-rn", sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, cwd=ROOT)
    assert result.stdout == ("unavailable: 127.0.0.1 is not the address of any interface that is up on this"
                             " machine (local.mdns_interfaces)\n"), result.stdout + result.stderr[-2000:]
