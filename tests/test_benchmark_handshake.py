"""Smoke test of ``benchmarks/handshake.py``: it runs, prints one JSON object whose round-trip
and datagram counts are the protocol's (1 round trip for 0-RTT, 2 for the WHOAREYOU handshake),
and refuses bad arguments in one line. Timings are printed, never asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "handshake.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_it_reports_both_first_contacts():
    done = _run("--count", "3", "--repeat", "1")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["count"] == 3 and out["repeat"] == 1
    first = out["first_request"]
    assert (first["zero_rtt"]["datagrams"], first["zero_rtt"]["round_trips"]) == (2, 1)
    assert (first["whoareyou"]["datagrams"], first["whoareyou"]["round_trips"]) == (4, 2)
    # the INITIATE is padded to 427 bytes so that a full answer fits the 3x rule
    assert first["zero_rtt"]["bytes"] > first["whoareyou"]["bytes"]
    assert all(value > 0 for value in out["microseconds"].values())


def test_bad_arguments_exit_non_zero():
    for bad in (["--count", "0"], ["--repeat", "x"]):
        done = _run(*bad)
        assert done.returncode == 2, (bad, done.stderr)
        assert "error" in done.stderr and "Traceback" not in done.stderr
