"""Smoke test of ``benchmarks/lookup_scaling.py`` at a tiny size (its output's shape, and every
lookup succeeding with no loss), and unit tests of what it relies on: the simulated session layer
(``sim_session.py``), ``DhtEngine(session_layer=...)`` and ``LookupFinished.rounds_to_target``.
Timings are reported by the benchmark, never asserted here."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from sovereign_discovery.addresses import Address
from sovereign_discovery.errors import ArgumentTypeError, ArgumentValueError
from sovereign_discovery.events import LookupFinished, RecordFound
from sovereign_discovery.identity import Identity
from sovereign_discovery.keys import KERNEL
from sovereign_discovery.node import DhtEngine
from sovereign_discovery.routing import Contact
from sovereign_discovery.session import DROP_REASONS as REAL_DROP_REASONS
from sovereign_discovery.session import SessionLayer, SessionLimits
from sovereign_discovery.sim_session import (
    DROP_REASONS,
    SimulatedDirectory,
    SimulatedSessionLayer,
)
from sovereign_discovery.testing import SimulatedNetwork
from sovereign_discovery.wire import Ping, decode_message, encode_message

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "lookup_scaling.py"
TIMEOUT_S = 120

REQUIRED = {
    "nodes", "condition", "success_rate", "median_rounds_to_target", "median_rounds",
    "median_requests", "p50_ms", "p95_ms", "p99_ms", "bytes_per_node", "joined_by_protocol",
    "wall_s", "latency_model", "sessions", "memory_method", "target_in_closest_rate",
    "target_contacted_rate", "lookups", "lookups_unfinished",
}
CONDITIONS = ["no_loss", "loss_10", "crashed_20_no_refresh", "crashed_20_after_refresh"]


def _run(*args: str) -> list[dict]:
    done = subprocess.run([sys.executable, str(SCRIPT), *args, "--json", "--no-progress"],
                          capture_output=True, text=True, timeout=TIMEOUT_S, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def test_tiny_run_prints_one_object_per_condition_and_every_no_loss_lookup_succeeds():
    rows = _run("--sizes", "50", "--lookups", "20", "--seed", "3")
    assert [r["condition"] for r in rows] == CONDITIONS
    for row in rows:
        assert REQUIRED <= row.keys(), REQUIRED - row.keys()
        assert row["nodes"] == 50 and row["lookups"] == 20
        assert row["joined_by_protocol"] is True and row["joined"] == 50
        assert row["sessions"] == "simulated"
        assert row["latency_model"]["median_ms"] == 50.0
        assert row["memory_method"] == "rss_delta" and row["bytes_per_node"] > 0
        assert row["kernel"] == KERNEL  # the child runs the kernel this process runs
        assert 0.0 <= row["success_rate"] <= 1.0
        assert row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
        assert row["median_rounds_to_target"] <= row["median_rounds"]
    no_loss = rows[0]
    assert no_loss["success_rate"] == 1.0
    assert no_loss["lookups_unfinished"] == 0
    assert no_loss["target_contacted_rate"] == 1.0
    # the owner answering ends a record lookup: fewer requests than the k = 20 a full lookup asks
    assert 1 <= no_loss["median_requests"] < 20
    assert rows[1]["loss"] == 0.1 and rows[2]["crashed_fraction"] == 0.2


def test_global_view_formation_says_so_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "scaling.png"
    rows = _run("--sizes", "40,60", "--lookups", "10", "--join", "global", "--conditions", "no_loss",
                "--plot", str(png))
    assert [r["nodes"] for r in rows] == [40, 60]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    row = rows[1]
    assert row["joined_by_protocol"] is False and row["records"] == "global_view"
    assert row["datagrams_formation"] == 0  # nothing was sent to form it
    assert row["success_rate"] == 1.0


def test_more_bits_per_step_fill_more_buckets_and_still_find_every_record():
    rows = {bits: _run("--sizes", "400", "--lookups", "20", "--join", "global", "--conditions", "no_loss",
                       "--bucket-bits", str(bits), "--alpha", "4")[0] for bits in (1, 2)}
    for bits, row in rows.items():
        assert row["bucket_bits"] == bits and row["alpha"] == 4
        assert row["success_rate"] == 1.0
        assert sum(row["rounds_to_target_counts"].values()) == round(row["target_contacted_rate"] * 20)
    assert rows[2]["table_size_median"] > rows[1]["table_size_median"]


def test_join_refresh_closest_is_passed_to_every_engine_and_shortens_the_join():
    rows = {n: _run("--sizes", "300", "--lookups", "20", "--join", "protocol", "--conditions", "no_loss",
                    "--join-refresh-closest", str(n))[0] for n in (5, 20)}
    for n, row in rows.items():
        assert row["join_refresh_closest"] == n and row["joined_by_protocol"] is True
        assert row["success_rate"] == 1.0
    # The same joins and announces; refresh lookups that end at 5 closest send fewer requests.
    assert rows[5]["datagrams_formation"] < rows[20]["datagrams_formation"]


def test_the_frozen_collector_changes_no_figure_only_how_often_the_heap_is_traversed():
    rows = {mode: _run("--sizes", "300", "--lookups", "20", "--join", "protocol", "--conditions",
                       "no_loss", "--gc", mode)[0] for mode in ("frozen", "default")}
    frozen, default = rows["frozen"], rows["default"]
    assert frozen["gc"] == "frozen" and default["gc"] == "default"
    for key in ("datagrams_formation", "success_rate", "rounds_to_target_counts", "median_requests",
                "p50_ms", "table_size_median", "datagrams"):
        assert frozen[key] == default[key], key  # the same run, datagram for datagram
    # sweeps at batch boundaries and two audits instead of a collection every 700 allocations
    assert 0 < frozen["gc_collections"] < default["gc_collections"]
    for row in rows.values():
        assert row["gc_collected"] >= 0 and row["gc_s"] >= row["gc_formation_s"] >= 0


def test_bad_arguments_are_refused():
    done = subprocess.run([sys.executable, str(SCRIPT), "--conditions", "no_such"],
                          capture_output=True, text=True, timeout=TIMEOUT_S, cwd=ROOT)
    assert done.returncode == 2 and "no_such" in done.stderr
    for args, named in ((["--bucket-bits", "5"], "--bucket-bits"), (["--alpha", "0"], "--alpha"),
                        (["--join-refresh-closest", "0"], "--join-refresh-closest"),
                        (["--gc", "never"], "--gc")):
        done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                              timeout=TIMEOUT_S, cwd=ROOT)
        assert done.returncode == 2 and named in done.stderr


# --- the simulated session layer ----------------------------------------------------------------


def _identity(seed: int) -> Identity:
    return Identity.from_seed(random.Random(seed).randbytes(32))


A_ADDR, B_ADDR, C_ADDR = Address("10.0.0.1", 4000), Address("10.0.0.2", 4000), Address("10.0.0.3", 4000)


@pytest.fixture
def pair():
    directory = SimulatedDirectory()
    a, b = _identity(1), _identity(2)
    directory.register(Contact(a.public_key, A_ADDR))
    directory.register(Contact(b.public_key, B_ADDR))
    return directory, (a, SimulatedSessionLayer(a, directory)), (b, SimulatedSessionLayer(b, directory))


def test_sim_session_delivers_from_the_registered_sender(pair):
    directory, (a, layer_a), (b, layer_b) = pair
    message = encode_message(Ping(b"\x01" * 8, 7))
    out = layer_a.send(Contact(b.public_key, B_ADDR), message, 0.0)
    assert len(out) == 1 and out[0].address == B_ADDR
    received = layer_b.receive(out[0].datagram, A_ADDR, 0.0)
    assert received.outgoing == ()
    [delivered] = received.delivered
    assert delivered.peer.node_id == a.node_id and delivered.peer.address == A_ADDR
    assert decode_message(delivered.message) == decode_message(message)
    assert layer_b.stats["delivered"] == 1 and layer_a.stats["packets_out"] == 1
    assert layer_a.has_session(b.node_id, B_ADDR) and not layer_a.has_session(a.node_id, B_ADDR)


def test_sim_session_drops_frames_from_unknown_or_lying_senders(pair):
    directory, (a, layer_a), (b, layer_b) = pair
    frame = layer_a.send(Contact(b.public_key, B_ADDR), b"hello", 0.0)[0].datagram
    # from an address the directory does not know
    assert layer_b.receive(frame, C_ADDR, 0.0).delivered == ()
    # from a registered address, but naming another node ID (a forged sender)
    mallory = _identity(3)
    directory.register(Contact(mallory.public_key, C_ADDR))
    assert layer_b.receive(frame, C_ADDR, 0.0).delivered == ()
    assert layer_b.stats["unknown_peer"] == 2 and layer_b.stats["delivered"] == 0


@pytest.mark.parametrize("datagram, reason", [
    (b"", "malformed"),
    (b"xx\x01\x7f" + bytes(30), "bad_magic"),
    (b"sd\x09\x7f" + bytes(30), "unknown_version"),
    (b"sd\x01\x00" + bytes(30), "unknown_kind"),  # a real session MESSAGE is not a simulated frame
    (bytes(2000), "too_large"),
])
def test_sim_session_never_raises_on_bad_input(pair, datagram, reason):
    _, _, (b, layer_b) = pair
    assert layer_b.receive(datagram, A_ADDR, 0.0).delivered == ()
    assert layer_b.stats[reason] == 1


def test_sim_session_has_the_real_layers_interface_and_counters(pair):
    _, (a, layer_a), _ = pair
    real = SessionLayer(a)
    for name in ("send", "receive", "expire", "has_session", "stats", "node_id", "limits"):
        assert hasattr(layer_a, name) and hasattr(real, name)
    assert set(REAL_DROP_REASONS) <= set(layer_a.stats) and "unknown_peer" in DROP_REASONS
    assert layer_a.stats["sessions"] == 0 and layer_a.node_id == real.node_id
    with pytest.raises(ArgumentTypeError):
        layer_a.send(Contact(a.public_key, A_ADDR), "text", 0.0)
    with pytest.raises(ArgumentValueError):
        layer_a.send(Contact(a.public_key, A_ADDR), bytes(5000), 0.0)
    with pytest.raises(ArgumentTypeError):
        SimulatedSessionLayer(a, {})


# --- the engine with a simulated session layer ----------------------------------------------------


def _engine(identity: Identity, address: Address, **kwargs) -> DhtEngine:
    r = random.Random(bytes(identity.node_id))
    return DhtEngine(identity, random_bytes=r.randbytes, rng=r, now=0.0, unix_offset=1.8e9,
                     advertised_address=address, **kwargs)


def test_engine_refuses_a_session_layer_of_another_identity_or_with_limits(pair):
    directory, (a, layer_a), (b, _) = pair
    with pytest.raises(ArgumentValueError):
        _engine(b, B_ADDR, session_layer=layer_a)
    with pytest.raises(ArgumentValueError):
        _engine(a, A_ADDR, session_layer=layer_a, session_limits=SessionLimits())
    with pytest.raises(ArgumentTypeError):
        _engine(a, A_ADDR, session_layer=object())
    assert _engine(a, A_ADDR, session_layer=layer_a).session is layer_a


def test_engines_with_simulated_sessions_find_a_record_and_report_rounds_to_target():
    net = SimulatedNetwork(seed=4)
    directory = SimulatedDirectory()
    engines, addresses = [], []
    for i in range(30):
        identity, address = _identity(100 + i), net.new_address()
        engine = _engine(identity, address, session_layer=SimulatedSessionLayer(identity, directory))
        directory.register(engine.contact(address))
        net.add_host(engine, address)
        engines.append(engine)
        addresses.append(address)
    for i in range(1, 30):
        net.call(addresses[i], lambda e, now: e.bootstrap([engines[0].contact(addresses[0])], now))
        net.run_until(net.now + 0.1)
    for i in range(30):
        net.call(addresses[i], lambda e, now: e.announce_record(now))
    net.run_until(net.now + 20.0)
    for engine in engines:
        engine.events()
    target = engines[17]
    query = net.call(addresses[3], lambda e, now: e.find_record(target.node_id, now, quorum=0))
    net.run_until(net.now + 20.0)
    events = [e for e in engines[3].events() if getattr(e, "query", None) == query]
    finished = next(e for e in events if isinstance(e, LookupFinished))
    found = next(e for e in events if isinstance(e, RecordFound))
    assert found.record is not None and found.record.encoded == target.own_record.encoded
    assert finished.rounds_to_target is not None and 1 <= finished.rounds_to_target <= finished.rounds
    assert all(e.session.stats["unknown_peer"] == 0 for e in engines)
    assert engines[3].stats()["sessions"] == 0  # no per-peer session state


def test_rounds_to_target_is_none_when_the_target_is_never_contacted():
    identity = _identity(9)
    engine = _engine(identity, A_ADDR)
    query = engine.find_node(_identity(10).node_id, 0.0)  # empty table: ends at once
    [finished] = [e for e in engine.events() if isinstance(e, LookupFinished) and e.query == query]
    assert finished.rounds_to_target is None and finished.requests == 0
    legacy = LookupFinished(1, identity.node_id, (), False, 0, 0)  # the field is optional
    assert legacy.rounds_to_target is None
