"""Smoke test of ``benchmarks/node_memory.py`` at a tiny size: the shape and consistency of its
output (figures are reported by the benchmark, never asserted here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "node_memory.py"


def test_a_tiny_run_reports_both_measurements():
    out = subprocess.run([sys.executable, str(SCRIPT), "--nodes", "6", "--wait", "0.5", "--top", "2",
                          "--json"], capture_output=True, text=True, timeout=120, check=True).stdout
    row = json.loads(out)
    assert row["nodes"] == 6 and row["went_idle"] is True
    for phase in ("after_join", "after_wait"):
        m = row[phase]
        assert m["live_bytes_per_node"] > 0 and len(m["top"]) == 2
        assert all(line["bytes_per_node"] > 0 and ":" in line["where"] for line in m["top"])
        # every node met the others through node 0, and holds at most one session per peer
        assert 1 <= m["sessions_per_node"] <= 5 and 1 <= m["table_per_node"] <= 5
        assert 0 <= m["unvalidated_sessions_per_node"] <= m["sessions_per_node"]


def test_bad_arguments_are_refused():
    for args in (["--nodes", "1"], ["--wait", "-1"], ["--top", "-1"]):
        result = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and "must be" in result.stderr
