"""NodeId derivation and text form, XOR distance, KeyspaceIndex, and kernel selection."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sovereign_discovery import ArgumentTypeError, ArgumentValueError, keys
from sovereign_discovery.keys import KeyspaceIndex, NodeId, distance

from .helpers import id_near

ids = st.binary(min_size=20, max_size=20)


def test_node_id_is_first_160_bits_of_sha256_of_the_public_key():
    public_key = bytes(range(32))
    assert NodeId.from_public_key(public_key) == hashlib.sha256(public_key).digest()[:20]


@given(ids)
def test_text_form_round_trips_and_is_url_and_filename_safe(raw):
    node_id = NodeId(raw)
    text = str(node_id)
    assert len(text) == 32
    assert set(text) <= set("abcdefghijklmnopqrstuvwxyz234567")
    assert NodeId.parse(text) == node_id
    assert NodeId.parse(text.upper()) == node_id
    assert type(NodeId.parse(text)) is NodeId


@pytest.mark.parametrize("text", ["", "a" * 31, "a" * 33, "0" * 32, "a" * 31 + "!"])
def test_parse_rejects_bad_text(text):
    with pytest.raises(ArgumentValueError, match="node ID"):
        NodeId.parse(text)


def test_parse_rejects_non_str():
    with pytest.raises(ArgumentTypeError, match="text"):
        NodeId.parse(b"a" * 32)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad, error", [(b"x" * 19, ArgumentValueError), (b"x" * 21, ArgumentValueError),
                                        ("x" * 20, ArgumentTypeError), (20, ArgumentTypeError)])
def test_node_id_constructor_checks_length_and_type(bad, error):
    with pytest.raises(error, match="node_id"):
        NodeId(bad)


def test_public_key_length_is_checked():
    with pytest.raises(ArgumentValueError, match="public_key"):
        NodeId.from_public_key(b"k" * 31)


@given(ids, ids, ids)
def test_distance_is_a_metric(a, b, c):
    assert distance(a, a) == 0
    assert distance(a, b) == distance(b, a)
    assert distance(a, c) <= distance(a, b) + distance(b, c)
    assert distance(a, b) ^ distance(b, c) == distance(a, c)


@given(ids, st.integers(0, 2**160 - 1))
def test_int_round_trip(raw, value):
    assert NodeId.from_int(NodeId(raw).to_int()) == raw
    assert NodeId.from_int(value).to_int() == value


# --- KeyspaceIndex, with both kernels ----------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(base=ids, deltas=st.lists(st.integers(0, 2**40), min_size=0, max_size=80, unique=True),
       randoms=st.lists(ids, max_size=40, unique=True), target_delta=st.integers(0, 2**48),
       count=st.sampled_from([0, 1, 3, 20, 200]))
def test_keyspace_index_closest_equals_full_scan(kernel, base, deltas, randoms, target_delta, count):
    keys_ = {id_near(base, d) for d in deltas} | set(randoms)
    index = KeyspaceIndex(((k, k) for k in keys_), kernel=kernel)
    for target in (id_near(base, target_delta), base):
        expected = sorted(keys_, key=lambda k: distance(k, target))[:count]
        assert index.closest(target, count) == expected


def test_keyspace_index_add_remove_get(kernel):
    index = KeyspaceIndex(kernel=kernel)
    a, b = NodeId(b"\x01" * 20), NodeId(b"\x02" * 20)
    assert index.add(a, "a") and index.add(b, "b")
    assert not index.add(a, "A")
    assert index.get(a) == "A" and a in index and len(index) == 2
    assert index.remove(a) == "A" and a not in index and index.remove(a) is None
    assert index.closest(a, 5) == ["b"]


def test_keyspace_index_rejects_duplicates():
    with pytest.raises(ArgumentValueError, match="duplicate"):
        KeyspaceIndex([(b"\x01" * 20, 1), (b"\x01" * 20, 2)])


# --- kernel selection ----------------------------------------------------------------------------


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items()
                   if k not in (keys.PURE_PYTHON_ENV, keys.REQUIRE_C_ENV)}
    environment.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=environment, timeout=60)


def test_pure_python_can_be_forced():
    done = _run("import sovereign_discovery as s; print(s.KERNEL, '|', s.KERNEL_REASON)",
                **{keys.PURE_PYTHON_ENV: "1"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("python |") and keys.PURE_PYTHON_ENV in done.stdout


_HIDE_C = "import sys; sys.modules['sovereign_discovery._keyspace'] = None\n"


def test_missing_c_falls_back_loudly():
    done = _run(_HIDE_C + "import sovereign_discovery as s; print(s.KERNEL, '|', s.KERNEL_REASON)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("python |") and "unavailable" in done.stdout
    assert "KernelFallbackWarning" in done.stderr


def test_missing_c_is_an_error_when_required():
    done = _run(_HIDE_C + "import sovereign_discovery", **{keys.REQUIRE_C_ENV: "1"})
    assert done.returncode != 0
    assert "KernelUnavailableError" in done.stderr and keys.REQUIRE_C_ENV in done.stderr


def test_conflicting_flags_are_refused():
    done = _run("import sovereign_discovery", **{keys.REQUIRE_C_ENV: "1", keys.PURE_PYTHON_ENV: "1"})
    assert done.returncode != 0 and "both set" in done.stderr


def test_active_kernel_matches_the_environment():
    if keys._flag(keys.PURE_PYTHON_ENV):
        assert keys.KERNEL == "python"
    if keys._flag(keys.REQUIRE_C_ENV):
        assert keys.KERNEL == "c"
    assert keys.kernel_module() is keys.kernel_module(keys.KERNEL)
