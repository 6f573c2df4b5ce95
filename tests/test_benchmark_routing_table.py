"""Smoke test of ``benchmarks/routing_table.py``: it runs at small sizes with either fill
(``network``, the default, and ``full-buckets``) and with both, prints one JSON object, and our
results are exact. Timings are reported by the benchmark, never asserted here."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sovereign_discovery import keys

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "routing_table.py"
SMALL = ["--table-size", "120", "--global-size", "3000", "--queries", "50", "--memory-tables", "20"]
TIMEOUT_S = 120

KEYS = {
    "table_size",
    "fill",
    "network_size",
    "global_size",
    "queries",
    "seed",
    "kernel",
    "python_version",
    "machine",
    "entry_type",
    "c_closest_us",
    "python_closest_us",
    "kademlia_find_neighbors_us",
    "c_closest_p90_us",
    "python_closest_p90_us",
    "kademlia_find_neighbors_p90_us",
    "speedup_vs_kademlia",
    "c_exact_fraction",
    "python_exact_fraction",
    "kademlia_exact_fraction",
    "kademlia_table_size",
    "c_table_size",
    "python_table_size",
    "c_exact_fraction_bucket_targets",
    "python_exact_fraction_bucket_targets",
    "kademlia_exact_fraction_bucket_targets",
    "kademlia_mean_recall",
    "c_insert_us",
    "python_insert_us",
    "kademlia_insert_us",
    "c_global_closest_us",
    "python_global_closest_us",
    "global_exact_fraction",
    "bytes_per_contact",
    "projected_gib_for_1e6_nodes_400_contacts",
    "memory_fill",
    "targets",
}
# the per-fill figures (``by_fill`` with --both-fills)
FILL_KEYS = {
    "fill",
    "network_size",
    "inserted_ids",
    "c_table_size",
    "python_table_size",
    "kademlia_table_size",
    "c_closest_us",
    "python_closest_us",
    "kademlia_find_neighbors_us",
    "speedup_vs_kademlia",
    "c_exact_fraction",
    "python_exact_fraction",
    "kademlia_exact_fraction",
    "kademlia_mean_recall",
    "c_exact_fraction_bucket_targets",
    "python_exact_fraction_bucket_targets",
    "kademlia_exact_fraction_bucket_targets",
    "kademlia_mean_recall_bucket_targets",
}


def _c_built() -> bool:
    try:
        keys.kernel_module("c")
    except ImportError:
        return False
    return True


def _run(args: list[str], prelude: str = "", env: dict[str, str] | None = None) -> dict:
    """Run the benchmark in a fresh interpreter; ``prelude`` runs first (to hide modules)."""
    argv = [str(SCRIPT), *args, "--json"]
    code = (
        "import runpy, sys\n"
        f"{prelude}\n"
        f"sys.argv = {argv!r}\n"
        f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # exactly one JSON object, nothing else on stdout


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_fill(figures: dict, fill: str, requested: int, c_available: bool, kad: bool) -> None:
    """One fill's figures: ours exact, sizes consistent with the fill."""
    missing = FILL_KEYS - figures.keys()
    assert not missing, missing
    assert figures["fill"] == fill
    held = figures["python_table_size"]
    assert _is_int(held) and 0 < held <= figures["inserted_ids"]
    assert figures["python_exact_fraction"] == 1.0
    assert figures["python_exact_fraction_bucket_targets"] == 1.0
    if fill == "network":
        m = figures["network_size"]
        assert _is_int(m) and m > 0, m
        # a network of m nodes offers at most m IDs, and ours keeps at most 20 per prefix length
        assert figures["inserted_ids"] <= m
    else:
        assert figures["network_size"] is None
        assert held == requested == figures["inserted_ids"]
    if c_available:
        assert figures["c_table_size"] == held
        assert figures["c_exact_fraction"] == 1.0
        assert figures["c_exact_fraction_bucket_targets"] == 1.0
    else:
        assert figures["c_table_size"] is None and figures["c_exact_fraction"] is None
    if kad:
        assert 0 < figures["kademlia_table_size"] <= figures["inserted_ids"]
        for key in ("kademlia_exact_fraction", "kademlia_exact_fraction_bucket_targets"):
            assert 0.0 <= figures[key] <= 1.0, key
        if fill == "full-buckets":  # full buckets: kademlia's splits match ours, it holds all
            assert figures["kademlia_table_size"] == requested
    else:
        assert figures["kademlia_table_size"] is None


@pytest.mark.parametrize("fill", ["network", "full-buckets"])
def test_benchmark_runs_and_is_exact(fill):
    out = _run([*SMALL, "--fill", fill])
    missing = KEYS - out.keys()
    assert not missing, missing
    assert "by_fill" not in out
    assert out["fill"] == fill
    assert out["table_size"] == 120  # the requested size; the actual ones are reported apart
    _check_fill(out, fill, 120, out["kernel"]["c_available"], out["kademlia"]["available"])
    if fill == "network":
        assert 60 <= out["python_table_size"] <= 180  # about the requested size
    assert out["global_exact_fraction"] == 1.0
    assert out["memory_fill"] == "full-buckets"
    bpc = out["bytes_per_contact"]
    assert isinstance(bpc, (int, float)) and not isinstance(bpc, bool)
    assert math.isfinite(bpc) and bpc > 0
    assert set(out["targets"]) >= {
        "c_closest_us",
        "speedup_vs_kademlia",
        "c_exact_fraction",
        "c_global_closest_us",
        "projected_gib_for_1e6_nodes_400_contacts",
    }
    require_c = keys._flag(keys.REQUIRE_C_ENV)
    if out["kernel"]["c_available"]:
        assert out["c_global_exact_fraction"] == 1.0
    else:
        assert not require_c, f"{keys.REQUIRE_C_ENV}=1 but the benchmark found no C kernel"
        assert not _c_built()
        assert out["c_closest_us"] is None and out["c_exact_fraction"] is None


def test_benchmark_both_fills():
    """--both-fills: ``by_fill`` holds each fill's figures; the top level is the --fill one."""
    out = _run(
        ["--table-size", "60", "--global-size", "500", "--queries", "30", "--memory-tables", "3",
         "--both-fills"]
    )
    missing = KEYS - out.keys()
    assert not missing, missing
    assert out["fill"] == "network"  # the default
    assert set(out["by_fill"]) == {"network", "full-buckets"}
    c_available, kad = out["kernel"]["c_available"], out["kademlia"]["available"]
    for fill, figures in out["by_fill"].items():
        _check_fill(figures, fill, 60, c_available, kad)
    for key in ("network_size", "python_table_size", "c_exact_fraction", "kademlia_exact_fraction"):
        assert out[key] == out["by_fill"]["network"][key], key
    assert out["table_size"] == 60


def test_benchmark_runs_without_c_kernel_or_kademlia():
    """Both optional parts missing: the script still runs and reports them as null."""
    env = {k: v for k, v in os.environ.items() if k != keys.REQUIRE_C_ENV}
    prelude = (
        "sys.modules['sovereign_discovery._keyspace'] = None\n"  # makes the import fail
        "sys.modules['kademlia'] = None"
    )
    out = _run(
        ["--table-size", "40", "--global-size", "500", "--queries", "10", "--memory-tables", "3"],
        prelude,
        env,
    )
    assert out["kernel"]["c_available"] is False
    assert out["kademlia"]["available"] is False
    for key in ("c_closest_us", "c_exact_fraction", "kademlia_find_neighbors_us"):
        assert out[key] is None, key
    assert out["speedup_vs_kademlia"] is None
    assert any("sovereign-discovery[bench]" in note for note in out["notes"])
    assert out["python_exact_fraction"] == 1.0
    assert out["global_exact_fraction"] == 1.0
    assert out["bytes_per_contact"] > 0


@pytest.mark.skipif(not _c_built(), reason="C kernel not built")
def test_require_c_sees_the_c_kernel():
    """With SOVEREIGN_DISCOVERY_REQUIRE_C=1 the script loads, finds C, and C is exact."""
    tiny = ["--table-size", "20", "--global-size", "100", "--queries", "5", "--memory-tables", "2"]
    env = {k: v for k, v in os.environ.items() if k != keys.PURE_PYTHON_ENV}  # the two conflict
    out = _run(tiny, env={**env, keys.REQUIRE_C_ENV: "1"})
    assert out["kernel"]["c_available"] is True
    assert out["c_exact_fraction"] == 1.0
