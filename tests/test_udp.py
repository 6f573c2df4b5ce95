"""UdpEndpoint over real sockets on loopback: port 0 only, every wait bounded in time."""

from __future__ import annotations

import asyncio
import socket

import pytest

from sovereign_discovery import Address
from sovereign_discovery.errors import ArgumentValueError, ClosedError, EndpointError
from sovereign_discovery.udp import UdpEndpoint

from .helpers import has_ipv6_loopback

TIMEOUT_S = 5.0




class Inbox:
    def __init__(self) -> None:
        self.items: list[tuple[bytes, Address]] = []
        self.changed = asyncio.Event()

    def __call__(self, data: bytes, source: Address) -> None:
        self.items.append((data, source))
        self.changed.set()

    async def wait_for(self, count: int) -> None:
        async def until() -> None:
            while len(self.items) < count:
                self.changed.clear()
                await self.changed.wait()
        await asyncio.wait_for(until(), TIMEOUT_S)


@pytest.mark.parametrize("host", ["127.0.0.1", pytest.param("::1", marks=pytest.mark.skipif(
    not has_ipv6_loopback(), reason="no IPv6 loopback here"))])
def test_two_endpoints_exchange_datagrams(host):
    async def main() -> None:
        inbox_a, inbox_b = Inbox(), Inbox()
        a = await UdpEndpoint.open(host, 0, inbox_a)
        b = await UdpEndpoint.open(host, 0, inbox_b)
        try:
            assert a.address.port != 0 and str(a.address.ip) == host
            assert a.send(b.address, b"hello")
            await inbox_b.wait_for(1)
            assert inbox_b.items == [(b"hello", a.address)]
            b.send(a.address, b"x" * 1280)  # the largest protocol datagram
            await inbox_a.wait_for(1)
            assert inbox_a.items[0][0] == b"x" * 1280
            assert a.stats["datagrams_out"] == 1 and b.stats["datagrams_in"] == 1
        finally:
            a.close()
            b.close()

    asyncio.run(main())


def test_a_burst_is_drained_in_batches():
    async def main() -> None:
        inbox = Inbox()
        receiver = await UdpEndpoint.open("127.0.0.1", 0, inbox, max_batch=8)
        granted = receiver.receive_buffer_bytes
        if granted < 600_000:  # 300 datagrams of 100 bytes need ~300 skbs of buffer
            pytest.skip(f"kernel granted only a {granted}-byte receive buffer (net.core.rmem_max)")
        sender = await UdpEndpoint.open("127.0.0.1", 0, Inbox())
        try:
            for i in range(300):
                sender.send(receiver.address, i.to_bytes(2, "big") * 50)
            await inbox.wait_for(300)
            assert [int.from_bytes(d[:2], "big") for d, _ in inbox.items] == list(range(300))
        finally:
            receiver.close()
            sender.close()

    asyncio.run(main())


def test_oversized_datagrams_are_dropped_and_counted():
    async def main() -> None:
        inbox = Inbox()
        endpoint = await UdpEndpoint.open("127.0.0.1", 0, inbox)
        raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            raw.sendto(b"y" * 1281, endpoint.address.to_tuple())
            raw.sendto(b"y" * 60000, endpoint.address.to_tuple())
            raw.sendto(b"ok", endpoint.address.to_tuple())
            await inbox.wait_for(1)
            assert [d for d, _ in inbox.items] == [b"ok"]
            assert endpoint.stats["dropped_oversize"] == 2
        finally:
            raw.close()
            endpoint.close()

    asyncio.run(main())


def test_handler_errors_do_not_stop_the_endpoint():
    async def main() -> None:
        inbox = Inbox()

        def flaky(data: bytes, source: Address) -> None:
            if data == b"boom":
                raise RuntimeError("handler bug")
            inbox(data, source)

        endpoint = await UdpEndpoint.open("127.0.0.1", 0, flaky)
        sender = await UdpEndpoint.open("127.0.0.1", 0, Inbox())
        try:
            sender.send(endpoint.address, b"boom")
            sender.send(endpoint.address, b"after")
            await inbox.wait_for(1)
            assert inbox.items[0][0] == b"after" and endpoint.stats["handler_errors"] == 1
        finally:
            endpoint.close()
            sender.close()

    asyncio.run(main())


def test_port_in_use_is_a_clear_error():
    async def main() -> None:
        first = await UdpEndpoint.open("127.0.0.1", 0, Inbox())
        try:
            with pytest.raises(EndpointError, match=f"127.0.0.1:{first.address.port}: address already in use"):
                await UdpEndpoint.open("127.0.0.1", first.address.port, Inbox())
        finally:
            first.close()

    asyncio.run(main())


def test_closed_endpoint_says_so_and_caller_mistakes_are_typed():
    async def main() -> None:
        endpoint = await UdpEndpoint.open("127.0.0.1", 0, Inbox())
        target = Address("127.0.0.1", 9)
        with pytest.raises(ArgumentValueError, match="exceeds"):
            endpoint.send(target, b"z" * 1281)
        endpoint.close()
        endpoint.close()  # idempotent
        assert endpoint.closed
        with pytest.raises(ClosedError, match="closed"):
            endpoint.send(target, b"late")
        with pytest.raises(ArgumentValueError, match="port"):
            await UdpEndpoint.open("127.0.0.1", 70000, Inbox())

    asyncio.run(main())
