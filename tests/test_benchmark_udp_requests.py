"""Smoke test of ``benchmarks/udp_requests.py``: a short run prints one JSON object with the
figures the issue asks for, the counts are positive and consistent, and a failure exits non-zero
without leaving processes behind. Timings are reported by the benchmark, never asserted here."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "udp_requests.py"
SMALL = ["--duration", "0.5", "--repeat", "1", "--warmup", "0.1", "--timeout", "0.5",
         "--table-size", "40", "--window", "16", "--json"]
TIMEOUT_S = 120

KEYS = {
    "ours_ping_per_s",
    "ours_find_node_per_s",
    "kademlia_ping_per_s",
    "kademlia_find_node_per_s",
    "ratio_find_node_vs_kademlia_ping",
    "cpu_us_per_request",
    "table_size",
    "table_size_requested",
    "table_fill",
    "rate_limits",
    "window",
    "clients",
    "duration_s",
    "kernel",
    "python_version",
    "machine",
    "cpu_count",
    "kademlia",
    "measurements",
    "bottleneck",
    "targets",
    "notes",
}
MEASUREMENT_KEYS = {
    "rate_per_s",
    "sent",
    "answered",
    "answered_in_window",
    "lost",
    "late",
    "unexpected",
    "verified_full_decode",
    "window_s",
    "server_answered_in_window",
    "server_cpu_s",
    "server_cpu_us_per_request",
    "server_cpu_utilization",
    "client_cpu_utilization",
    "latency_ms",
    "bottleneck",
    "repeats",
    "rate_per_s_range",
    "server_cpu_us_per_request_median",
}


def _kademlia_installed() -> bool:
    return importlib.util.find_spec("kademlia") is not None


def _run(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=TIMEOUT_S, env=env)


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def _check_measurement(name: str, m: dict) -> None:
    missing = MEASUREMENT_KEYS - m.keys()
    assert not missing, (name, missing)
    assert _positive(m["rate_per_s"]), name
    assert 0 < m["answered_in_window"] <= m["answered"] <= m["sent"], name
    assert m["answered"] + m["lost"] <= m["sent"], name  # each request answered, lost, or neither
    # every datagram the client got answered a request in flight, or one already counted lost
    assert m["unexpected"] == 0, name
    assert 0 <= m["late"] <= m["lost"], name
    assert m["verified_full_decode"] >= 1, name
    assert _positive(m["window_s"]), name
    assert m["server_answered_in_window"] > 0, name
    assert _positive(m["server_cpu_us_per_request"]), name
    assert _positive(m["server_cpu_us_per_request_median"]), name
    assert len(m["repeats"]) == 2, name
    low, high = m["rate_per_s_range"]
    assert low <= m["rate_per_s"] <= high, name
    assert sorted(r["rate_per_s"] for r in m["repeats"]) == [low, high], name


def test_benchmark_runs_and_reports():
    done = _run([*SMALL, "--repeat", "2"])  # the last --repeat wins
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)  # exactly one JSON object, nothing else on stdout
    missing = KEYS - out.keys()
    assert not missing, missing
    assert out["table_size_requested"] == 40
    assert out["table_size"] == 40  # 40 contacts take a few hundred random identities
    assert "1e+09" in out["rate_limits"]  # the raised limits are stated
    kad = out["kademlia"]["available"]
    assert kad == _kademlia_installed()
    expected = {"ours_ping", "ours_find_node"}
    if kad:
        expected |= {"kademlia_ping", "kademlia_find_node"}
    assert set(out["measurements"]) == expected
    for name, m in out["measurements"].items():
        _check_measurement(name, m)
    ours = out["measurements"]["ours_find_node"]
    # FIND_NODE answers carry min(20, table) contacts (the client itself may have joined the table)
    assert ours["nodes_per_answer"] and all(20 >= int(n) >= 1 for n in ours["nodes_per_answer"])
    assert ours["server_drops_in_window"].get("rate_limited", 0) == 0
    assert _positive(out["ours_ping_per_s"]) and _positive(out["ours_find_node_per_s"])
    assert out["ours_find_node_per_s"] == ours["rate_per_s"]
    assert out["cpu_us_per_request"] == ours["server_cpu_us_per_request_median"]
    assert set(out["targets"]) == {"ours_find_node_per_s", "ratio_find_node_vs_kademlia_ping",
                                   "cpu_us_per_request"}
    for target in out["targets"].values():
        assert target["met"] in (True, False, None)
    if kad:
        assert _positive(out["kademlia_ping_per_s"])
        assert out["ratio_find_node_vs_kademlia_ping"] == pytest.approx(
            out["ours_find_node_per_s"] / out["kademlia_ping_per_s"], rel=0.01)
        assert out["kademlia_table_size"] == out["table_size"]  # the same contacts
    else:
        assert out["kademlia_ping_per_s"] is None
        assert out["ratio_find_node_vs_kademlia_ping"] is None
        assert any("sovereign-discovery[bench]" in note for note in out["notes"])


def test_benchmark_runs_without_kademlia():
    """kademlia missing: ours is measured, kademlia's figures are null and a note says why."""
    code = (
        "import runpy, sys\n"
        "sys.modules['kademlia'] = None\n"  # makes the import fail
        f"sys.argv = {[str(SCRIPT), *SMALL]!r}\n"
        f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["kademlia"]["available"] is False
    assert set(out["measurements"]) == {"ours_ping", "ours_find_node"}
    for key in ("kademlia_ping_per_s", "kademlia_find_node_per_s",
                "ratio_find_node_vs_kademlia_ping"):
        assert out[key] is None, key
    assert out["targets"]["ratio_find_node_vs_kademlia_ping"]["met"] is None
    assert any("sovereign-discovery[bench]" in note for note in out["notes"])
    assert _positive(out["ours_find_node_per_s"]) and _positive(out["cpu_us_per_request"])


def _processes_with(marker: str) -> list[int]:
    """PIDs of live processes whose environment holds ``marker`` (children inherit it)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if marker.encode() in environ:
            found.append(int(entry.name))
    return found


def assert_failed_and_left_nothing(done, benchmark: str, marker: str) -> None:
    """A benchmark run made to fail on purpose: exit 1, the reason on stderr, nothing on stdout,
    and no process left whose environment carries ``marker``."""
    assert done.returncode == 1, (done.returncode, done.stdout, done.stderr)
    assert f"{benchmark} benchmark failed" in done.stderr
    assert "failing on purpose" in done.stderr
    assert done.stdout == ""
    if Path("/proc/self/environ").exists():
        assert _processes_with(f"{marker}=1") == []


@pytest.mark.parametrize("where", ["server", "client"])
def test_failure_exits_non_zero_and_kills_children(where):
    """A server that dies before it is ready, or a client that dies mid-measurement (with the
    server running): the benchmark says so on stderr, exits 1, and leaves no process behind."""
    marker = f"UDP_BENCH_SMOKE_{os.getpid()}_{where}"
    env = {**os.environ, marker: "1"}
    done = _run([*SMALL, "--inject-failure", where], env)
    assert_failed_and_left_nothing(done, "udp_requests", marker)


def test_bad_arguments_exit_non_zero():
    for bad in (["--duration", "0"], ["--window", "0"], ["--table-size", "-1"]):
        done = _run([*SMALL, *bad])
        assert done.returncode == 2, (bad, done.stderr)
        assert "error" in done.stderr
