"""Smoke test of ``benchmarks/network_vs_kademlia.py``: a small network (24 nodes in 2 processes)
of ours and of the PyPI ``kademlia`` package over real UDP on 127.0.0.1, the same lookups on
both; the output's shape and internal consistency, every lookup of ours succeeding on an idle
network, and a failed worker making the run exit non-zero without leaving processes behind.
Timings are reported by the benchmark, never asserted here."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from sovereign_discovery.keys import KERNEL

from .test_benchmark_udp_requests import assert_failed_and_left_nothing

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "network_vs_kademlia.py"
TIMEOUT_S = 120
NODES = 24
LOOKUPS = 40
SMALL = ["--nodes", str(NODES), "--processes", "2", "--lookups", str(LOOKUPS), "--seed", "5",
         "--json", "--no-progress"]

pytestmark = pytest.mark.skipif(importlib.util.find_spec("kademlia") is None,
                                reason="the PyPI kademlia package is not installed (it is in the"
                                " 'test' extra: pip install -e '.[test]')")

REQUIRED = {
    "nodes", "processes", "lookups", "ours_p50_ms", "kademlia_p50_ms", "p50_ratio",
    "ours_p95_ms", "kademlia_p95_ms", "ours_success", "kademlia_success", "ours_bytes_per_node",
    "kademlia_bytes_per_node", "ours_join_s", "kademlia_join_s", "ours_requests_per_lookup",
    "kademlia_requests_per_lookup", "memory_method", "settings", "targets", "machine",
    "loadavg_before", "loadavg_after", "ours", "kademlia", "notes",
}
PHASE = {
    "implementation", "processes", "joined", "join_failures", "join_s", "join_cpu_s",
    "announce_s", "bytes_per_node", "lookups", "success", "failed_lookups", "p50_ms", "p95_ms",
    "p99_ms", "max_ms", "requests_per_lookup_mean", "requests_per_lookup_median",
    "datagrams_per_lookup", "messages_per_lookup", "cpu_ms_per_lookup", "table_size_mean",
    "join_idle", "announce_idle",
}


def _run(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=TIMEOUT_S, env=env)


def _check_phase(phase: dict, impl: str) -> None:
    missing = PHASE - phase.keys()
    assert not missing, (impl, missing)
    assert phase["implementation"] == impl
    assert phase["joined"] == NODES - 1 and phase["join_failures"] == 0, impl
    assert phase["join_idle"] and phase["announce_idle"], impl
    assert phase["lookups"] == LOOKUPS
    assert 0.0 <= phase["success"] <= 1.0
    assert phase["failed_lookups"] == round(LOOKUPS * (1 - phase["success"]))
    assert 0 <= phase["p50_ms"] <= phase["p95_ms"] <= phase["p99_ms"] <= phase["max_ms"], impl
    assert phase["bytes_per_node"] > 0, impl
    assert phase["join_s"] > 0 and phase["join_cpu_s"] > 0, impl
    assert phase["table_size_mean"] > 0, impl
    # requests counted by the source are among the datagrams every node sent
    assert phase["datagrams_per_lookup"] >= phase["requests_per_lookup_mean"] >= 0, impl
    assert phase["cpu_ms_per_lookup"] > 0, impl


def test_small_network_reports_both_and_is_consistent():
    done = _run(SMALL)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert len(lines) == 1  # one JSON object per size, nothing else on stdout
    row = json.loads(lines[0])
    missing = REQUIRED - row.keys()
    assert not missing, missing
    assert row["nodes"] == NODES and row["processes"] == 2 and row["lookups"] == LOOKUPS
    assert row["memory_method"] == "rss_delta"
    assert row["machine"]["kernel"] == KERNEL  # the workers run the kernel this process runs
    assert row["machine"]["kademlia"]["version"] == "2.2.3"
    ours, kad = row["ours"], row["kademlia"]
    _check_phase(ours, "ours")
    _check_phase(kad, "kademlia")
    assert ours["kernel"] == KERNEL
    # the flat figures are the phases' own
    for key in ("p50_ms", "p95_ms", "success", "bytes_per_node", "join_s"):
        assert row[f"ours_{key}"] == ours[key], key
        assert row[f"kademlia_{key}"] == kad[key], key
    assert row["p50_ratio"] == pytest.approx(ours["p50_ms"] / kad["p50_ms"], rel=1e-2)
    # on an idle network of 24 every record lookup of ours finds the announced record
    assert ours["success"] == 1.0, ours["lookup_errors"]
    assert ours["announce_median_stored_at"] >= 1
    assert ours["rate_limited"] == 0  # the default limits refuse nothing here (settings say so)
    assert row["settings"]["ours_dht_config_changed"] == {}
    # a record lookup of ours asks at most the k closest it reaches: the whole table of 23
    assert NODES - 1 >= ours["requests_per_lookup_median"] >= 0
    assert ours["messages_per_lookup"]["find_value"] == pytest.approx(
        ours["requests_per_lookup_mean"], rel=1e-2)
    # both stop at the first valid value (ours: record quorum 1); with k = 20 of 24 nodes holding
    # each value many lookups are answered from the source's own storage, with no request at all
    for phase in (ours, kad):
        assert LOOKUPS >= phase["local_hits"] >= 1
        assert phase["p50_ms_without_local_hits"] is None or phase["p50_ms_without_local_hits"] > 0
    assert ours["failed_lookup_details"] == []  # a post-mortem only for failed lookups
    assert set(row["targets"]) == {"p50_ratio", "ours_success", "ours_bytes_per_node_vs_kademlia"}
    for name, target in row["targets"].items():
        assert target["met"] in (True, False), name


def _benchmark_module():
    spec = importlib.util.spec_from_file_location("network_vs_kademlia", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_failed_lookup_gets_a_post_mortem():
    # Ranks are XOR ranks from the target (0 = the target); the workers' answers are stubbed.
    bench = _benchmark_module()
    args = SimpleNamespace(processes=2)
    phase = bench.Phase("ours", args, 6, [b""] * 6, None, False)
    node_ids = [bytes([0] * 31 + [i]) for i in (0, 1, 2, 4, 8, 16)]  # node i at distance 2^(i-1)
    pairs = [(5, 0), (5, 1)]
    hexes = [n.hex() for n in node_ids]
    results = [{"ok": False, "error": "not_found", "timed_out": False, "requests": 3, "rounds": 2,
                "ms": 1.5, "ended_at": [hexes[4], hexes[3]]},
               {"ok": True}]
    replies = [{"in_table": [hexes[1]], "holding": [hexes[1], hexes[2]], "target_table_size": 2,
                "closer_known": {hexes[3]: 1, hexes[4]: 0}},
               {"in_table": [hexes[2]], "holding": [], "target_table_size": None,
                "closer_known": {}}]
    asked = []
    phase._all = lambda command, timeout_s: asked.append(command) or replies
    details = phase._post_mortem(pairs, node_ids, results)
    assert asked == [{"op": "inspect", "target": hexes[0]}]  # only the failed lookup's target
    (one,) = details
    assert one["ended_at_ranks"] == [3, 4] and one["ended_at_closer_known"] == [1, 0]
    assert one["in_table_ranks"] == [1, 2] and one["in_tables"] == 2
    assert one["holding_ranks"] == [1, 2] and one["target_table_size"] == 2
    assert one["source_rank"] == 5 and one["error"] == "not_found"


def test_plot_from_saved_lines(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [{"nodes": n, "ours_p50_ms": 10.0 * n, "ours_p95_ms": 20.0 * n,
             "kademlia_p50_ms": 5.0 * n, "kademlia_p95_ms": 9.0 * n,
             "ours_bytes_per_node": 1000 * n, "kademlia_bytes_per_node": 500 * n}
            for n in (200, 500)]
    saved = tmp_path / "rows.jsonl"
    saved.write_text("".join(json.dumps(r) + "\n" for r in rows))
    png = tmp_path / "plot.png"
    done = _run(["--plot", str(png), "--plot-from", str(saved)])
    assert done.returncode == 0, done.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("impl", ["ours", "kademlia"])
def test_a_failed_worker_exits_non_zero_and_kills_the_others(impl):
    marker = f"NETBENCH_SMOKE_{os.getpid()}_{impl}"
    tiny = ["--nodes", "6", "--processes", "2", "--lookups", "3", "--json", "--no-progress"]
    done = _run([*tiny, "--inject-failure", impl], {**os.environ, marker: "1"})
    assert_failed_and_left_nothing(done, "network_vs_kademlia", marker)


def test_skip_kademlia_runs_ours_alone_and_says_so():
    done = _run(["--nodes", "6", "--processes", "2", "--lookups", "3", "--json", "--no-progress",
                 "--skip-kademlia"])
    assert done.returncode == 0, done.stderr
    row = json.loads(done.stdout)
    assert row["kademlia"] is None and row["p50_ratio"] is None
    assert row["ours"]["lookups"] == 3 and row["ours_success"] is not None
    assert any("--skip-kademlia" in note for note in row["notes"])


def test_dht_settings_are_checked_and_reported():
    done = _run(["--nodes", "6", "--processes", "2", "--lookups", "3", "--json", "--no-progress",
                 "--skip-kademlia", "--dht", "join_refresh_closest=3", "--dht", "parallelism=2"])
    assert done.returncode == 0, done.stderr
    row = json.loads(done.stdout)
    assert row["settings"]["ours_dht_config_changed"] == {"join_refresh_closest": 3, "parallelism": 2}
    assert row["settings"]["ours"].startswith("DhtNode, k=20, alpha=2")
    assert row["ours_success"] == 1.0


def test_bad_arguments_exit_non_zero():
    for bad in (["--nodes", "1"], ["--nodes", "x"], ["--processes", "0"], ["--lookups", "0"],
                ["--plot-from", "rows.jsonl"], ["--dht", "no_such_setting=1"],
                ["--dht", "join_refresh_closest=0"], ["--dht", "parallelism"],
                ["--dht", "parallelism=x"]):
        done = _run(bad)
        assert done.returncode == 2, (bad, done.stderr)
        assert "error" in done.stderr
