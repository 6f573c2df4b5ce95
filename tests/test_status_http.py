"""The status endpoint (sovereign_discovery/status_http.py): real servers on 127.0.0.1 port 0, fed
by a real PeerTable of signed records; happy paths through fetch_json, bad input through raw
sockets. Every test is bounded in time."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import socket
import sys
import time

import pytest

from sovereign_discovery.addresses import Address
from sovereign_discovery.errors import ArgumentTypeError, ArgumentValueError, ClosedError
from sovereign_discovery.identity import Identity
from sovereign_discovery.peer_table import PeerTable
from sovereign_discovery.records import PeerRecord
from sovereign_discovery.status_http import StatusClientError, StatusServer, fetch_json, format_peers

from .helpers import has_ipv6_loopback, run_bounded

BOUND_S = 20.0


def _record(capabilities: list[str], port: int) -> PeerRecord:
    return PeerRecord.create(Identity.generate(), addresses=[Address("127.0.0.1", port)],
                             capabilities=capabilities, seq=1, expires_at=int(time.time()) + 3600)


class FakeSource:
    """A StatusSource over a real PeerTable: a DHT peer (relay), a local mDNS peer (relay, store)
    and one both layers vouch for (no capabilities). ``failing`` names a method that raises."""

    def __init__(self) -> None:
        now = time.time()
        self.table = PeerTable()
        self.table.observe(_record(["relay"], 4000), "dht", now - 30)
        self.table.observe(_record(["relay", "store"], 4001), "mdns", now - 5,
                           address=Address("192.168.1.7", 4001))
        both = _record([], 4002)
        self.table.observe(both, "dht", now - 60)
        self.table.observe(both, "mdns", now)
        self.ok = True
        self.failing: str | None = None

    def _check(self, method: str) -> None:
        if self.failing == method:
            raise RuntimeError(f"{method} is broken")

    def peers(self, *, capability=None, source=None):
        self._check("peers")
        return self.table.peers(capability=capability, source=source)

    def stats(self) -> dict:
        self._check("stats")
        return {
            "dht": {"drops": {"rate_limited": 3, "session.bad_mac": 1}, "table_size": 12,
                    "messages_in": {"PING": 5, "FIND_NODE": 2}, "store": {"records": 2}},
            "peers_by_source": self.table.count_by_source(),
            "udp": {"127.0.0.1:4000": {"datagrams_in": 7, "bytes_in": 700}},
            "layers": {"mdns": {"state": "running", "reason": None, "announced": 4},
                       "ble": {"state": "off", "reason": "no Bluetooth adapter"}},
            "running": True, "name": "node-a", "last_error": None, "rtts": [1, 2], "uptime_s": 1.5,
        }

    def health(self) -> dict:
        self._check("health")
        return {"ok": self.ok, "peers": len(self.table)}


def serve(scenario, source=None, **options):
    """Run ``scenario(server, source)`` against a fresh server on 127.0.0.1 port 0."""
    source = source or FakeSource()

    async def main():
        async with StatusServer(source, host=options.pop("host", "127.0.0.1"), port=0, **options) as server:
            return await scenario(server, source)

    return run_bounded(main(), BOUND_S)


async def get(server: StatusServer, path: str) -> dict:
    return await asyncio.to_thread(fetch_json, *server.bound, path, timeout=5.0)


async def raw(server: StatusServer, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``data``, read the whole answer (the server closes), return status, headers, body."""
    reader, writer = await asyncio.open_connection(*server.bound)
    writer.write(data)
    answer = await reader.read()
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


async def until(predicate) -> None:
    """Wait for ``predicate()`` to hold (polling, bounded by the test's own time bound)."""
    while not predicate():
        await asyncio.sleep(0.01)


def request(target: str, method: str = "GET", extra: str = "") -> bytes:
    return f"{method} {target} HTTP/1.1\r\nHost: localhost\r\n{extra}\r\n".encode()


# --- the endpoints -------------------------------------------------------------------------------


def test_peers_lists_every_peer_as_its_dict_local_first():
    async def scenario(server, source):
        return await get(server, "/peers"), source.table.peers()

    answer, peers = serve(scenario)
    assert answer["count"] == 3
    assert answer["peers"] == json.loads(json.dumps([p.as_dict() for p in peers]))
    assert [p["local"] for p in answer["peers"]] == [True, True, False]


@pytest.mark.parametrize("query, expected", [
    ("capability=relay", {("relay",), ("relay", "store")}),
    ("capability=store", {("relay", "store")}),
    ("source=mdns", {("relay", "store"), ()}),
    ("source=dht&capability=relay", {("relay",)}),
    ("source=ble", set()),
])
def test_peers_filters_by_capability_and_source(query, expected):
    async def scenario(server, source):
        return await get(server, "/peers?" + query)

    answer = serve(scenario)
    assert {tuple(p["capabilities"]) for p in answer["peers"]} == expected
    assert answer["count"] == len(answer["peers"])


@pytest.mark.parametrize("query, named", [
    ("capability=Not%20Valid!", "capability"),
    ("source=carrier-pigeon", "source"),
    ("colour=red", "colour"),
    ("source=dht&source=mdns", "source"),
    ("capability=relay&capability=store", "capability"),
    ("capability", "query string"),
])
def test_bad_or_unknown_or_repeated_filters_get_400_naming_the_parameter(query, named):
    async def scenario(server, source):
        with pytest.raises(StatusClientError) as caught:
            await get(server, "/peers?" + query)
        return caught.value

    error = serve(scenario)
    assert error.status == 400
    assert named in str(error)


def test_a_filter_the_source_refuses_gets_400():
    class Refusing(FakeSource):
        def peers(self, *, capability=None, source=None):
            raise ArgumentValueError("capability 'relay' is not served here")

    async def scenario(server, source):
        return await raw(server, request("/peers?capability=relay"))

    status, _, body = serve(scenario, Refusing())
    assert status == 400
    assert json.loads(body) == {"error": "capability 'relay' is not served here"}


def test_stats_answers_the_source_stats():
    async def scenario(server, source):
        return await get(server, "/stats"), source.stats()

    answer, stats = serve(scenario)
    assert answer == stats


def test_healthz_is_200_when_ok_and_503_with_the_same_body_when_not():
    async def scenario(server, source):
        healthy = await raw(server, request("/healthz"))
        source.ok = False
        sick = await raw(server, request("/healthz"))
        with pytest.raises(StatusClientError) as caught:
            await get(server, "/healthz")
        return healthy, sick, caught.value

    (ok_status, _, ok_body), (sick_status, _, sick_body), error = serve(scenario)
    assert (ok_status, json.loads(ok_body)) == (200, {"ok": True, "peers": 3})
    assert (sick_status, json.loads(sick_body)) == (503, {"ok": False, "peers": 3})
    assert error.status == 503


def test_metrics_flattens_stats_into_labelled_families():
    from prometheus_client.exposition import CONTENT_TYPE_LATEST
    from prometheus_client.parser import text_string_to_metric_families

    async def scenario(server, source):
        await get(server, "/stats")  # so the http family has a 200 already
        return await raw(server, request("/metrics"))

    status, headers, body = serve(scenario)
    assert status == 200
    assert headers["Content-Type"] == CONTENT_TYPE_LATEST
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in families.values() for s in f.samples}
    prefix = "sovereign_discovery_"
    assert samples[(prefix + "up", ())] == 1
    assert families[prefix + "up"].type == "gauge"
    assert samples[(prefix + "dht_drops", (("reason", "rate_limited"),))] == 3
    assert samples[(prefix + "dht_drops", (("reason", "session.bad_mac"),))] == 1
    assert samples[(prefix + "dht_messages_in", (("type", "PING"),))] == 5
    assert samples[(prefix + "dht_table_size", ())] == 12
    assert samples[(prefix + "dht_store_records", ())] == 2
    assert samples[(prefix + "peers_by_source", (("source", "mdns"),))] == 2
    assert samples[(prefix + "peers_by_source", (("source", "ble"),))] == 0
    assert samples[(prefix + "udp_bytes_in", (("socket", "127.0.0.1:4000"),))] == 700
    assert samples[(prefix + "layers_announced", (("layer", "mdns"),))] == 4
    assert len(families[prefix + "layers_announced"].samples) == 1  # ble has no number; states are text
    assert samples[(prefix + "running", ())] == 1
    assert samples[(prefix + "uptime_s", ())] == 1.5
    assert samples[(prefix + "http_responses_by_status", (("status", "200"),))] == 1
    assert not {prefix + "name", prefix + "last_error", prefix + "rtts"} & set(families)
    assert len(families[prefix + "dht_drops"].samples) == 2  # one family, two labelled samples


def test_metrics_without_prometheus_client_is_501_and_the_rest_keeps_working(monkeypatch):
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # makes the import fail

    async def scenario(server, source):
        return await raw(server, request("/metrics")), await get(server, "/peers")

    (status, headers, body), peers = serve(scenario)
    assert status == 501
    assert headers["Content-Type"].startswith("text/plain")
    assert body == b"GET /metrics needs prometheus_client: pip install 'sovereign-discovery[http]'\n"
    assert peers["count"] == 3


# --- HTTP rules ------------------------------------------------------------------------------------


def test_unknown_path_is_404_json_and_other_methods_are_405_with_allow():
    async def scenario(server, source):
        return (await raw(server, request("/nowhere")), await raw(server, request("/peers", "POST")),
                await raw(server, request("/stats", "DELETE")))

    (s404, _, b404), (s405, h405, b405), (s405b, _, _) = serve(scenario)
    assert s404 == 404 and "/nowhere" in json.loads(b404)["error"]
    assert (s405, s405b) == (405, 405)
    assert h405["Allow"] == "GET, HEAD"
    assert "POST" in json.loads(b405)["error"]


def test_head_answers_the_get_headers_without_a_body():
    async def scenario(server, source):
        return await raw(server, request("/stats", "HEAD")), await raw(server, request("/stats"))

    (head_status, head_headers, head_body), (_, get_headers, get_body) = serve(scenario)
    assert head_status == 200 and head_body == b""
    assert head_headers["Content-Length"] == get_headers["Content-Length"] == str(len(get_body))
    assert head_headers["Connection"] == get_headers["Connection"] == "close"


@pytest.mark.parametrize("data, status", [
    (b"GET /stats\r\n\r\n", 400),                                      # no version
    (b"GET  /stats HTTP/1.1\r\nHost: x\r\n\r\n", 400),                  # two spaces
    (b"GET /stats HTTP/1.1\r\nHost : x\r\n\r\n", 400),                  # space before the colon
    (b"GET /stats HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n", 400),        # obs-fold
    (b"GET /stats HTTP/1.1\r\nHost: a\x00b\r\n\r\n", 400),              # NUL in a value
    (b"GET /stats HTTP/1.1\r\n\r\n", 400),                              # no Host
    (b"GET /stats HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),        # two Hosts
    (b"GET /st\xe4ts HTTP/1.1\r\nHost: x\r\n\r\n", 400),                # not ASCII
    (b"GET /stats HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello", 400),
    (b"GET /stats HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    (b"GET /stats?verbose=1 HTTP/1.1\r\nHost: x\r\n\r\n", 400),         # /stats takes no parameter
    (b"GET /stats HTTP/2.0\r\nHost: x\r\n\r\n", 505),
    (b"GET /stats HTTP/1.0\r\n\r\n", 200),                              # 1.0 needs no Host
    (b"\r\nGET /stats HTTP/1.1\nHost: x\n\n", 200),                     # empty line first, bare LF
    (b"GET http://localhost/stats HTTP/1.1\r\nHost: localhost\r\n\r\n", 200),  # absolute-form
])
def test_malformed_requests_get_an_error_status_and_well_formed_ones_200(data, status):
    async def scenario(server, source):
        return await raw(server, data)

    answer_status, headers, body = serve(scenario)
    assert answer_status == status
    assert headers["Content-Length"] == str(len(body))
    if status != 200:
        assert json.loads(body)["error"]


def test_oversized_request_line_is_414_and_oversized_headers_431():
    async def scenario(server, source):
        long_line = await raw(server, request("/peers?capability=" + "a" * 9000))
        many = "".join(f"X-Filler-{i}: {'b' * 100}\r\n" for i in range(100))
        big_headers = await raw(server, request("/peers", extra=many))
        return long_line[0], big_headers[0], server.stats()

    line_status, headers_status, stats = serve(scenario)
    assert (line_status, headers_status) == (414, 431)
    assert stats["responses_by_status"] == {"414": 1, "431": 1}


def test_a_client_that_sends_no_complete_head_in_time_is_dropped():
    async def scenario(server, source):
        reader, writer = await asyncio.open_connection(*server.bound)
        writer.write(b"GET /peers HTTP/1.1\r\n")  # and then nothing
        answer = await reader.read()  # the server answers 408 and closes
        writer.close()
        return answer, server.stats()

    answer, stats = serve(scenario, header_timeout_s=0.2)
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert stats["dropped_by_reason"]["header_timeout"] == 1


def test_connections_beyond_the_limit_get_503_and_the_slots_free_again():
    async def scenario(server, source):
        idle = [await asyncio.open_connection(*server.bound) for _ in range(2)]
        await until(lambda: server.stats()["connections_open"] == 2)
        refused = await raw(server, request("/stats"))
        for _, writer in idle:
            writer.close()
        await until(lambda: server.stats()["connections_open"] == 0)
        return refused, await raw(server, request("/stats")), server.stats()

    (status, headers, _), (after, _, _), stats = serve(scenario, max_connections=2, header_timeout_s=30)
    assert status == 503 and headers["Retry-After"] == "1"
    assert after == 200
    assert stats["dropped_by_reason"]["too_many_connections"] == 1
    assert stats["dropped_by_reason"]["client_closed"] == 2


@pytest.mark.parametrize("method", ["peers", "stats", "health"])
def test_a_source_that_raises_gets_500_logged_and_the_server_keeps_serving(method, caplog):
    path = {"peers": "/peers", "stats": "/stats", "health": "/healthz"}[method]

    async def scenario(server, source):
        source.failing = method
        broken = await raw(server, request(path))
        again = await raw(server, request(path))
        source.failing = None
        return broken, again, await raw(server, request(path)), server.stats()

    with caplog.at_level(logging.DEBUG, logger="sovereign_discovery.status_http"):
        (status, _, body), (again, _, _), (healed, _, _), stats = serve(scenario)
    assert (status, again, healed) == (500, 500, 200)
    assert "RuntimeError" in json.loads(body)["error"]
    assert stats["responses_by_status"] == {"200": 1, "500": 2}
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and f"{method} is broken" in caplog.text  # logged once, with traceback


def test_metrics_of_a_raising_source_is_500():
    async def scenario(server, source):
        source.failing = "stats"
        return await raw(server, request("/metrics"))

    assert serve(scenario)[0] == 500


# --- binding, lifecycle ----------------------------------------------------------------------------


def test_binding_beyond_loopback_warns_that_it_reveals_the_peers(caplog):
    async def scenario(server, source):
        return server.bound

    with caplog.at_level(logging.WARNING, logger="sovereign_discovery.status_http"):
        host, port = serve(scenario, host="0.0.0.0")
    assert host == "0.0.0.0" and port > 0
    assert f"0.0.0.0:{port} is reachable from the network" in caplog.text


def test_loopback_binding_does_not_warn(caplog):
    async def scenario(server, source):
        return server.url

    with caplog.at_level(logging.WARNING, logger="sovereign_discovery.status_http"):
        url = serve(scenario)
    assert url.startswith("http://127.0.0.1:")
    assert not caplog.records


def test_a_port_in_use_raises_oserror_naming_the_address():
    async def scenario(server, source):
        port = server.bound[1]
        with pytest.raises(OSError) as caught:
            await StatusServer(source, port=port).start()
        return port, caught.value

    port, error = serve(scenario)
    assert str(error) == f"status endpoint cannot listen on 127.0.0.1:{port}: address already in use"
    assert error.errno == errno.EADDRINUSE  # the one line for people, the errno for code


@pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback here")
def test_ipv6_loopback_url_is_bracketed_and_answers():
    async def scenario(server, source):
        return server.url, await get(server, "/healthz")

    url, health = serve(scenario, host="::1")
    assert url.startswith("http://[::1]:")
    assert health["ok"] is True


def test_lifecycle_close_is_idempotent_and_drops_open_connections():
    async def main():
        server = StatusServer(FakeSource(), header_timeout_s=60)
        with pytest.raises(ClosedError):
            server.bound
        await server.start()
        assert await server.start() is server
        reader, writer = await asyncio.open_connection(*server.bound)
        writer.write(b"GET /peers HTTP/1.1\r\n")
        await writer.drain()
        await server.close()
        await server.close()
        try:  # dropped (closed or reset), not left hanging
            assert await reader.read() == b""
        except ConnectionResetError:
            pass
        assert server.stats()["connections_open"] == 0
        writer.close()
        with pytest.raises(ClosedError):
            await server.start()

    run_bounded(main(), BOUND_S)


def test_constructor_checks_its_arguments():
    with pytest.raises(ArgumentTypeError, match="health"):
        StatusServer(object())
    with pytest.raises(ArgumentValueError, match="port"):
        StatusServer(FakeSource(), port=70000)
    with pytest.raises(ArgumentValueError, match="max_connections"):
        StatusServer(FakeSource(), max_connections=0)
    with pytest.raises(ArgumentValueError, match="header_timeout_s"):
        StatusServer(FakeSource(), header_timeout_s=0)


# --- the client ------------------------------------------------------------------------------------


def test_fetch_json_on_a_closed_port_says_connection_refused():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(StatusClientError, match=f"connection refused at 127.0.0.1:{port}") as caught:
        fetch_json("127.0.0.1", port, "/peers", timeout=2.0)
    assert caught.value.status is None


async def _other_server(answer: bytes | None, handlers: list):
    """A server that answers ``answer`` to anything, or never answers (None); its connection
    tasks go to ``handlers``."""
    async def handle(reader, writer):
        handlers.append(asyncio.current_task())
        try:
            await reader.readuntil(b"\r\n\r\n")
            if answer is None:
                await reader.read()  # until the client gives up
            else:
                writer.write(answer)
                await writer.drain()
        finally:
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


@pytest.mark.parametrize("answer, message", [
    (b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 6\r\n\r\n<html>", "did not answer a JSON object"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n[]", "did not answer a JSON object"),
    (b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 12\r\n\r\nupstream sad", "answered 502: upstream sad"),
    (None, "no answer from 127.0.0.1:"),
])
def test_fetch_json_reports_non_json_error_statuses_and_timeouts_in_one_line(answer, message):
    async def main():
        handlers: list = []
        server = await _other_server(answer, handlers)
        port = server.sockets[0].getsockname()[1]
        try:
            with pytest.raises(StatusClientError) as caught:
                await asyncio.to_thread(fetch_json, "127.0.0.1", port, "/peers", timeout=0.5)
        finally:
            server.close()
            await asyncio.gather(*handlers, return_exceptions=True)
        return caught.value

    error = run_bounded(main(), BOUND_S)
    assert message in str(error)
    assert "\n" not in str(error)


def test_format_peers_shows_one_line_a_peer():
    source = FakeSource()
    peers = [p.as_dict() for p in source.table.peers()]
    now = max(p["last_seen"] for p in peers)
    text = format_peers(peers, now=now)
    lines = text.splitlines()
    assert lines[0].split() == ["NODE", "SOURCES", "LOCAL", "SEEN", "ADDRESSES", "CAPABILITIES"]
    assert lines[-1] == "3 peers"
    first = lines[1]  # the local peer seen last (mDNS and DHT)
    assert first.startswith(peers[0]["node_id"][:8]) and "dht,mdns" in first and "0s ago" in first
    assert "yes" in first and "127.0.0.1:4002" in first
    assert "192.168.1.7:4001, 127.0.0.1:4001" in lines[2] and "relay,store" in lines[2]
    assert "30s ago" in lines[3] and lines[3].split()[2] == "-"
    assert format_peers([]) == "no peers"
