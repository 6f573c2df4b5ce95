"""``benchmarks/rounds_model.py``, the Monte Carlo model of lookup rounds for b = 1, 2, 3 bits per
routing step (docs/benchmarks.md, "Why 4 rounds at 10⁶"): its routing tables are the ones its
docstring describes, its closest-set oracle is exact, and a small run prints consistent rows."""

from __future__ import annotations

import importlib.util
import json
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "rounds_model.py"
K = 20


@pytest.fixture(scope="module")
def model():
    spec = importlib.util.spec_from_file_location("rounds_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def net(model):
    return model.Network(3000, 5)


def _subtree(model, net, x: int, y: int, b: int) -> tuple[int, int, int]:
    """(level, digit, nodes) of the sibling sub-tree of ``x`` that holds ``y``, for b bits."""
    cpl = model.BITS - (x ^ y).bit_length()
    level = (cpl // b) * b
    width = min(b, model.BITS - level)
    shift = model.BITS - level - width
    digit = (y >> shift) & ((1 << width) - 1)
    lo = ((x >> (shift + width)) << (shift + width)) | (digit << shift)
    start, end = net.count(lo, lo + (1 << shift))
    return level, digit, end - start


@pytest.mark.parametrize("b", [1, 2, 3])
def test_every_bucket_holds_min_k_of_its_subtree_and_small_subtrees_are_known_whole(model, net, b):
    tables = model.Tables(net, K, b, 1)
    for i in random.Random(2).sample(range(net.n), 12):
        x, table = net.ids[i], tables.table(i)
        assert len(set(table)) == len(table) and i not in table
        held = Counter(_subtree(model, net, x, net.ids[j], b) for j in table)
        for (_, _, nodes), count in held.items():
            assert count == min(K, nodes)
        known = set(table)
        for j in range(net.n):
            if j != i and _subtree(model, net, x, net.ids[j], b)[2] <= K:
                assert j in known


def test_b1_tables_are_k_random_nodes_per_shared_prefix_length(model, net):
    tables = model.Tables(net, K, 1, 3)
    for i in random.Random(4).sample(range(net.n), 12):
        x = net.ids[i]
        per_prefix = Counter(model.BITS - (x ^ y).bit_length() for y in net.ids if y != x)
        held = Counter(model.BITS - (x ^ net.ids[j]).bit_length() for j in tables.table(i))
        assert held == Counter({p: min(K, m) for p, m in per_prefix.items()})


def test_true_closest_is_a_full_scan_sorted_by_xor(model, net):
    for target in (net.ids[123], net.ids[0] ^ 1, random.Random(6).getrandbits(model.BITS)):
        assert net.true_closest(target, 21) == sorted(range(net.n), key=lambda j: net.ids[j] ^ target)[:21]


def test_a_small_run_prints_consistent_rows():
    out = subprocess.run([sys.executable, str(SCRIPT), "--sizes", "2000", "--bs", "1,2", "--answers",
                          "find_value,find_node", "--lookups", "40", "--table-nodes", "30", "--seed", "3"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    rows = [json.loads(line) for line in out.splitlines()]
    assert [(r["b"], r["answers"]) for r in rows] == [(1, "find_value"), (1, "find_node"),
                                                     (2, "find_value"), (2, "find_node")]
    for row in rows:
        contacted = sum(row["rounds_to_target_counts"].values())
        assert contacted == round(row["target_contacted_rate"] * row["lookups"])
        assert row["table_min"] <= row["table_median"] <= row["table_max"]
    # b = 2 keeps a bucket per sibling of each 2-bit digit: more contacts than b = 1
    assert rows[2]["table_mean"] > rows[0]["table_mean"]
