"""SimulatedNetwork: delivery, the link model, timers, crashes, determinism, bounded runs."""

from __future__ import annotations

import pytest

from sovereign_discovery import Address
from sovereign_discovery.errors import ArgumentValueError
from sovereign_discovery.testing import LinkModel, SimulatedNetwork


class EchoHost:
    """Answers every datagram with b"re:" + data; can also send on a timer."""

    def __init__(self) -> None:
        self.outbox: list[tuple[Address, bytes]] = []
        self.received: list[tuple[bytes, Address, float]] = []
        self.deadline: float | None = None
        self.fired: list[float] = []

    def receive_datagram(self, data: bytes, source: Address, now: float) -> None:
        self.received.append((data, source, now))
        if not data.startswith(b"re:"):
            self.outbox.append((source, b"re:" + data))

    def handle_timer(self, now: float) -> None:
        self.fired.append(now)
        self.deadline = None

    def datagrams_to_send(self) -> list[tuple[Address, bytes]]:
        out, self.outbox = self.outbox, []
        return out

    def next_deadline(self) -> float | None:
        return self.deadline


def pair(**link):
    net = SimulatedNetwork(seed=7, link=LinkModel(**link))
    a, b = EchoHost(), EchoHost()
    return net, a, net.add_host(a), b, net.add_host(b)


def test_round_trip_with_constant_latency():
    net, a, addr_a, b, addr_b = pair(latency_median_s=0.02, latency_sigma=0)
    net.call(addr_a, lambda host, now: host.outbox.append((addr_b, b"ping")))
    net.run_until(10)
    assert [(d, s, round(t, 6)) for d, s, t in b.received] == [(b"ping", addr_a, 0.02)]
    assert [(d, round(t, 6)) for d, _, t in a.received] == [(b"re:ping", 0.04)]


def test_loss_and_duplication_rates_follow_the_model():
    net, a, addr_a, b, addr_b = pair(loss=0.2, duplicate=0.1)
    n = 5000
    net.call(addr_a, lambda host, now: host.outbox.extend((addr_b, b"x%d" % i) for i in range(n)))
    net.run_until(60)
    lost, duplicated = net.stats["lost"], net.stats["duplicated"]
    assert 0.17 < lost / net.stats["sent"] < 0.23
    assert 0.07 < duplicated / (net.stats["sent"] - lost) < 0.13
    unique_at_b = {d for d, _, _ in b.received}
    assert len(b.received) > len(unique_at_b)  # duplicates arrived


def test_jitter_reorders_and_same_seed_same_trace():
    def trace(seed: int) -> list[bytes]:
        net = SimulatedNetwork(seed=seed, link=LinkModel(latency_sigma=0.8))
        a, b = EchoHost(), EchoHost()
        addr_a, addr_b = net.add_host(a), net.add_host(b)
        net.call(addr_a, lambda host, now: host.outbox.extend((addr_b, bytes([i])) for i in range(50)))
        net.run_until(60)
        return [d for d, _, _ in b.received]

    first = trace(1)
    assert sorted(first) == [bytes([i]) for i in range(50)]
    assert first != sorted(first)  # reordered by jitter
    assert trace(1) == first and trace(2) != first


def test_timers_fire_at_their_deadline_and_rearm():
    net = SimulatedNetwork()
    host = EchoHost()
    host.deadline = 5.0
    address = net.add_host(host)
    net.run_until(4.0)
    assert host.fired == [] and net.now == 4.0
    net.run_until(10.0)
    assert host.fired == [5.0]
    net.call(address, lambda h, now: setattr(h, "deadline", 18.0))
    net.call(address, lambda h, now: setattr(h, "deadline", 17.5))  # sooner: moved, 18.0 is void
    net.call(address, lambda h, now: None)  # a call that leaves the deadline alone keeps it
    net.run_until(20.0)
    assert host.fired == [5.0, 17.5]
    # A later deadline does not move the armed timer (as the asyncio driver): it fires early,
    # the host finds nothing due and arms its timer again.
    net.call(address, lambda h, now: setattr(h, "deadline", 22.0))
    net.call(address, lambda h, now: setattr(h, "deadline", 26.0))
    net.run_until(30.0)
    assert host.fired == [5.0, 17.5, 22.0]
    assert len(net._heap) == 0  # one heap entry per armed timer, none left behind
    host.deadline = 3.0  # already past: fires at once, not in the past
    net.call(address, lambda h, now: None)
    net.run_until(40.0)
    assert host.fired == [5.0, 17.5, 22.0, 30.0]


def test_crashed_hosts_receive_nothing_and_can_restart():
    net, a, addr_a, b, addr_b = pair()
    net.crash(addr_b)
    net.call(addr_a, lambda host, now: host.outbox.append((addr_b, b"lost")))
    net.run_until(10)
    assert b.received == [] and net.stats["to_crashed"] == 1
    fresh = EchoHost()
    net.restart(addr_b, fresh)
    net.call(addr_a, lambda host, now: host.outbox.append((addr_b, b"back")))
    net.run_until(20)
    assert [d for d, _, _ in fresh.received] == [b"back"]


def test_runs_are_bounded():
    net, a, addr_a, b, addr_b = pair()

    class Chatty(EchoHost):
        def receive_datagram(self, data, source, now):
            self.outbox.append((source, b"again"))  # answers forever

    chatty = Chatty()
    addr_c = net.add_host(chatty)
    net.call(addr_c, lambda h, now: h.outbox.append((addr_c, b"start")))
    assert net.run_until(max_events=1000) == 1000
    assert net.run_until(until=lambda: True) == 0


def test_bad_settings_are_refused():
    for bad in (dict(loss=1.0), dict(duplicate=-0.1), dict(latency_median_s=0), dict(latency_sigma=-1)):
        with pytest.raises(ArgumentValueError):
            LinkModel(**bad)
    net = SimulatedNetwork()
    address = net.add_host(EchoHost())
    with pytest.raises(ArgumentValueError, match="taken"):
        net.add_host(EchoHost(), address)
