"""The pinned-key bootstrap layer over real UDP on loopback: port 0 only, short timeouts and
backoff, every test bounded by ``asyncio.wait_for``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import time

import pytest

from sovereign_discovery import Address, BootstrapConfig, Contact, DhtNode, Identity
from sovereign_discovery.bootstrap import (
    KEY_MISMATCH,
    BootstrapAnswered,
    BootstrapFinished,
    BootstrapLayer,
    BootstrapRejected,
    BootstrapRetry,
    BootstrapUnreachable,
)

from .helpers import run_bounded

#: Bound of one test.
TIMEOUT_S = 8.0
#: One attempt's deadline: far above a loopback round trip, far below the 1 s initial RTO.
ATTEMPT_S = 0.4


def run(coro, timeout: float = TIMEOUT_S):
    return run_bounded(coro, timeout)


def dead_contact() -> Contact:
    """A pinned contact at a loopback port where nothing listens (bound, then closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return Contact(Identity.generate().public_key, Address.parse(f"127.0.0.1:{port}"))


def config(peers=(), fallback=(), **overrides) -> BootstrapConfig:
    settings = dict(timeout_s=ATTEMPT_S, retries=0, backoff_initial_s=0.05, backoff_max_s=1.0,
                    backoff_multiplier=2.0, jitter=0.5)
    settings.update(overrides)
    return BootstrapConfig(peers=tuple(peers), fallback_peers=tuple(fallback), **settings)


@contextlib.asynccontextmanager
async def network(count: int):
    """``count`` started nodes, all but the first bootstrapped from the first. Closed on exit."""
    async with contextlib.AsyncExitStack() as stack:
        nodes = [await stack.enter_async_context(DhtNode(Identity.generate())) for _ in range(count)]
        for node in nodes[1:]:
            await node.bootstrap([nodes[0].contact])
        yield nodes


def table_addresses(node: DhtNode) -> set:
    return {c.address for c in node.engine.table}


class FakeSleep:
    """Records the backoff delays instead of waiting them."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        await asyncio.sleep(0)


def test_two_good_peers_answer_in_parallel_and_the_handover_fills_the_table():
    async def main():
        async with network(5) as nodes, DhtNode(Identity.generate()) as me:
            a, b = nodes[0], nodes[1]
            events = []
            lookups = []
            find_closest = me.find_closest

            async def recording_find_closest(target, **kwargs):
                lookups.append((bytes(target), len(me.engine.table)))
                return await find_closest(target, **kwargs)

            me.find_closest = recording_find_closest
            layer = BootstrapLayer(me, config([a.contact, b.contact]), on_event=events.append)
            finished = await layer.run()
            # The handover is one self-lookup, started once the bootstrap peers were in the table.
            assert len(lookups) == 1 and lookups[0][0] == bytes(me.node_id) and lookups[0][1] >= 2
            assert isinstance(finished, BootstrapFinished) and finished.ok
            assert set(finished.answered) == {a.contact, b.contact}
            assert finished.rejected == () and finished.unreachable == ()
            answered = [e for e in events if isinstance(e, BootstrapAnswered)]
            assert {e.contact for e in answered} == {a.contact, b.contact}
            assert all(e.attempt == 1 and e.phase == "peers" for e in answered)  # one parallel round
            assert not any(isinstance(e, BootstrapRetry) for e in events)
            assert events[-1] is finished and layer.finished is finished
            # The handover's self-lookup found the peers the bootstrap peers know of.
            table = me.engine.table
            assert all(n.node_id in table for n in nodes)
            assert finished.table_size == len(table) == len(nodes)
    run(main())


def test_attempts_of_one_round_run_in_parallel():
    async def main():
        async with DhtNode(Identity.generate()) as me:
            peers = [dead_contact() for _ in range(4)]
            start = time.monotonic()
            finished = await BootstrapLayer(me, config(peers)).run()
            elapsed = time.monotonic() - start
            assert set(finished.unreachable) == set(peers)
            assert elapsed < 2 * ATTEMPT_S  # serial attempts would take 4 x ATTEMPT_S
    run(main())


def test_a_wrong_pinned_key_is_refused_and_nothing_of_it_enters_the_table(caplog):
    async def main():
        async with network(3) as nodes, DhtNode(Identity.generate()) as impostor, \
                DhtNode(Identity.generate()) as me:
            good = nodes[0].contact
            # The pinned key is not the one the node at that address holds.
            wrong = Contact(Identity.generate().public_key, impostor.address)
            events = []
            layer = BootstrapLayer(me, config([wrong, good], retries=2), on_event=events.append,
                                   sleep=FakeSleep())
            with caplog.at_level(logging.WARNING, logger="sovereign_discovery.bootstrap"):
                finished = await layer.run()
            assert finished.ok and finished.answered == (good,)
            assert finished.rejected == (wrong,) and finished.unreachable == ()
            rejected = [e for e in events if isinstance(e, BootstrapRejected)]
            assert rejected == [BootstrapRejected(wrong, KEY_MISMATCH)]
            assert not any(isinstance(e, BootstrapUnreachable) for e in events)
            warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
            assert any(KEY_MISMATCH in r.getMessage() and wrong.pinned in r.getMessage() for r in warnings)
            # Nothing of the refused peer: neither the pinned ID, nor the real one, nor its address.
            table = me.engine.table
            assert wrong.node_id not in table and impostor.node_id not in table
            assert impostor.address not in table_addresses(me)
            assert good.node_id in table and len(table) == len(nodes)
            # The impostor saw our handshake toward a key it does not hold, and dropped it.
            assert impostor.stats()["drops"]["session.bad_signature"] >= 1
    run(main())


def test_only_a_wrong_key_gives_no_answer_and_no_table_entry(caplog):
    async def main():
        async with DhtNode(Identity.generate()) as impostor, DhtNode(Identity.generate()) as me:
            wrong = Contact(Identity.generate().public_key, impostor.address)
            with caplog.at_level(logging.WARNING, logger="sovereign_discovery.bootstrap"):
                finished = await BootstrapLayer(me, config([wrong], retries=3), sleep=FakeSleep()).run()
            assert not finished.ok and finished.rejected == (wrong,)
            assert len(me.engine.table) == 0 and finished.table_size == 0
            assert any("no bootstrap peer answered" in r.getMessage() for r in caplog.records)
    run(main())


def test_an_unreachable_peer_is_retried_with_growing_delays_then_the_fallback_is_used():
    async def main():
        async with network(3) as nodes, DhtNode(Identity.generate()) as me:
            dead = dead_contact()
            fallback = nodes[0].contact
            cfg = config([dead], [fallback], retries=3, backoff_initial_s=0.1, backoff_multiplier=3.0,
                         jitter=0.2)
            sleep = FakeSleep()
            events = []
            finished = await BootstrapLayer(me, cfg, on_event=events.append, rng=random.Random(7),
                                            sleep=sleep).run()
            expected_rng = random.Random(7)
            expected = [cfg.backoff_delay(r, expected_rng) for r in (1, 2, 3)]
            assert sleep.delays == pytest.approx(expected)
            assert sleep.delays[0] < sleep.delays[1] < sleep.delays[2]  # exponential, jitter <= 20 %
            retries = [e for e in events if isinstance(e, BootstrapRetry)]
            assert [(e.phase, e.retry, e.contacts) for e in retries] == [("peers", r, (dead,)) for r in (1, 2, 3)]
            assert [e.delay_s for e in retries] == sleep.delays
            unreachable = [e for e in events if isinstance(e, BootstrapUnreachable)]
            assert [(e.contact, e.attempt) for e in unreachable] == [(dead, a) for a in (1, 2, 3, 4)]
            # Then the fallback, which answered at once.
            answered = [e for e in events if isinstance(e, BootstrapAnswered)]
            assert [(e.contact, e.phase, e.attempt) for e in answered] == [(fallback, "fallback", 1)]
            assert events.index(answered[0]) > events.index(unreachable[-1])
            assert finished.ok and finished.answered == (fallback,) and finished.unreachable == (dead,)
            assert all(n.node_id in me.engine.table for n in nodes)
            assert dead.node_id not in me.engine.table
    run(main())


def test_real_backoff_waits_are_slept():
    async def main():
        async with DhtNode(Identity.generate()) as me:
            cfg = config([dead_contact()], retries=2, timeout_s=0.1, backoff_initial_s=0.2,
                         backoff_multiplier=2.0, jitter=0.0)
            start = time.monotonic()
            finished = await BootstrapLayer(me, cfg).run()
            elapsed = time.monotonic() - start
            assert not finished.ok
            assert elapsed >= 3 * 0.1 + 0.2 + 0.4 - 0.05  # three attempts, two waits
    run(main())


def test_every_peer_gone_is_reported_without_raising(caplog):
    async def main():
        async with DhtNode(Identity.generate()) as me:
            peers = [dead_contact(), dead_contact()]
            fallback = [dead_contact()]
            events = []
            with caplog.at_level(logging.WARNING, logger="sovereign_discovery.bootstrap"):
                finished = await BootstrapLayer(me, config(peers, fallback, retries=1), on_event=events.append,
                                                sleep=FakeSleep()).run()
            assert finished.ok is False and finished.answered == () and finished.rejected == ()
            assert set(finished.unreachable) == set(peers + fallback)
            assert finished.table_size == 0
            assert events[-1] == finished
            assert [(e.phase, e.retry) for e in events if isinstance(e, BootstrapRetry)] == [
                ("peers", 1), ("fallback", 1)]
            assert any("no bootstrap peer answered" in r.getMessage() for r in caplog.records)
            # The node still works: it answers and can be bootstrapped from.
            async with DhtNode(Identity.generate()) as other:
                await other.bootstrap([me.contact])
                assert me.node_id in other.engine.table
    run(main())


def test_no_bootstrap_peers_is_a_bootstrap_node(caplog):
    async def main():
        async with DhtNode(Identity.generate()) as me:
            with caplog.at_level(logging.WARNING, logger="sovereign_discovery.bootstrap"):
                finished = await BootstrapLayer(me, config()).run()
            assert finished == BootstrapFinished((), (), (), 0) and not finished.ok
            assert not caplog.records
    run(main())


@pytest.mark.parametrize("when", ["attempt", "backoff"])
def test_cancelling_run_leaves_nothing_running(when):
    async def main():
        async with DhtNode(Identity.generate()) as me:
            events = []
            cfg = config([dead_contact(), dead_contact()], retries=5, timeout_s=5.0 if when == "attempt" else 0.1,
                         backoff_initial_s=30.0, backoff_max_s=30.0)
            before = asyncio.all_tasks()
            task = asyncio.create_task(BootstrapLayer(me, cfg, on_event=events.append).run())
            if when == "attempt":
                await asyncio.sleep(0.2)
            else:
                while not any(isinstance(e, BootstrapRetry) for e in events):
                    await asyncio.sleep(0.02)
            assert not task.done()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.sleep(0)  # let cancelled children run their cancellation
            assert asyncio.all_tasks() == before
            assert not any(isinstance(e, BootstrapFinished) for e in events)
    run(main())


def test_arguments_are_checked():
    async def main():
        async with DhtNode(Identity.generate()) as me:
            with pytest.raises(TypeError):
                BootstrapLayer(object(), config())
            with pytest.raises(TypeError):
                BootstrapLayer(me, {"peers": []})
            with pytest.raises(TypeError):
                BootstrapLayer(me, config(), rng=42)
            with pytest.raises(TypeError):
                BootstrapLayer(me, config(), on_event="no")
    run(main())
