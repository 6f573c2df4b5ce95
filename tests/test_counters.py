"""Counters created on first use (sovereign_discovery.counters) and the engine's fixed part."""

import pytest

from sovereign_discovery.counters import Counters
from sovereign_discovery.identity import Identity
from sovereign_discovery.node import DROP_REASONS, DhtEngine
from sovereign_discovery.wire import MessageType


def test_counters_start_empty_read_zero_and_refuse_unknown_names():
    counters = Counters(("a", "b", "c"))
    assert dict(counters) == {}  # nothing stored before first use
    counters["b"] += 2
    counters["a"] += 1
    assert counters["c"] == 0 and dict(counters) == {"b": 2, "a": 1}
    assert list(counters.full().items()) == [("a", 1), ("b", 2), ("c", 0)]  # in the names' order
    with pytest.raises(KeyError):
        counters["misspelled"] += 1


def test_a_fresh_engine_has_no_instance_dict_and_reports_every_counter():
    engine = DhtEngine(Identity.from_seed(bytes(32)), now=0.0, unix_offset=1.8e9)
    assert not hasattr(engine, "__dict__")  # slots: ~1.7 KB less per engine
    stats = engine.stats()
    names = [t.name.lower() for t in MessageType]
    assert stats["messages_in"] == dict.fromkeys(names, 0) == stats["messages_out"]
    assert list(stats["drops"])[: len(DROP_REASONS)] == list(DROP_REASONS)
    assert stats["session"]["packets_in"] == 0
