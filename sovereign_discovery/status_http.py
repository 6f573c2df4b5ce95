"""The node's status endpoint: a small read-only HTTP/1.1 server on the asyncio loop
(docs/status-endpoint.md), and the blocking client the CLI reads it with.

``GET /peers`` (filters ``capability=`` and ``source=``), ``GET /stats``, ``GET /healthz`` and
``GET /metrics`` (the Prometheus text exposition format, made by ``prometheus_client``: the
``http`` extra). All of it is read from a :class:`StatusSource` (the coordinator), whose methods
are called on the event loop and must not block.

HTTP rules followed (RFC 9110 semantics, RFC 9112 HTTP/1.1 message syntax):

- One request per connection. Every response has ``Content-Length`` and ``Connection: close``;
  then the server half-closes and reads what the client still sends for up to :data:`LINGER_S`,
  so that unread request bytes do not become a TCP reset that destroys the response (RFC 9112
  §9.6).
- Request line ``method SP request-target SP HTTP-version`` (RFC 9112 §3), origin-form or
  absolute-form target (§3.2.1, §3.2.2); one empty line before it is ignored, and a bare LF ends
  a line as CRLF does (§2.2). A version other than HTTP/1.x gets 505.
- A header field is ``name ":" OWS value OWS`` with a token name and no whitespace before the
  colon, else 400 (RFC 9112 §5.1); obs-fold is rejected (§5.2), as are CR, LF and NUL in values
  (RFC 9110 §5.5). An HTTP/1.1 request without exactly one Host gets 400 (RFC 9112 §3.2).
- Bodies are refused: a non-zero ``Content-Length`` or any ``Transfer-Encoding`` gets 400 (a GET
  body has no defined meaning, RFC 9110 §9.3.1, and this server never reads one).
- ``HEAD`` answers as ``GET`` without the body (RFC 9110 §9.3.2); other methods get 405 with
  ``Allow: GET, HEAD`` (§15.5.6). A request line over 8 KiB gets 414 (§15.5.15), header fields
  over 8 KiB in all 431 (RFC 6585 §5), no complete head within ``header_timeout_s`` 408 (RFC 9110
  §15.5.9), a connection beyond ``max_connections`` 503 at once; each is then closed.

Nothing a client sends raises: each problem is answered, counted in :meth:`StatusServer.stats`
(responses by status, dropped connections by reason) and logged (the first of each kind at INFO,
later ones at DEBUG). A source method that raises gets 500 and is logged with its traceback (the
first of each kind at ERROR); the server keeps serving.
"""

from __future__ import annotations

import asyncio
import errno
import http.client
import ipaddress
import json
import logging
import os
import re
import time
import urllib.error
import urllib.request
from collections import Counter
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlsplit

from .errors import ArgumentTypeError, ArgumentValueError, ClosedError, EndpointError, SovereignDiscoveryError
from .peer_table import SOURCES, PeerInfo
from .records import check_capability

__all__ = ["StatusServer", "StatusSource", "StatusClientError", "fetch_json", "format_peers",
           "LABELLED_STATS", "METRIC_PREFIX"]

_log = logging.getLogger(__name__)

MAX_REQUEST_LINE_BYTES = 8192  #: a longer request line gets 414
MAX_HEADER_BYTES = 8192        #: more header bytes in all get 431
MAX_HEADER_FIELDS = 64         #: more header fields get 431
SEND_TIMEOUT_S = 30.0          #: a client that does not read its response for this long is dropped
LINGER_S = 1.0                 #: how long to read what a client still sends after the response
METRIC_PREFIX = "sovereign_discovery"
#: Stats dicts whose keys are label values, not names: ``{"drops": {"rate_limited": 3}}`` becomes
#: ``…_drops{reason="rate_limited"} 3``. A dict named ``<x>_by_<label>`` is labelled ``<label>``.
LABELLED_STATS = {"drops": "reason", "messages_in": "type", "messages_out": "type", "udp": "socket",
                  "events": "type", "layers": "layer"}
DROP_REASONS = ("header_timeout", "too_many_connections", "client_closed", "send_failed", "internal_error")

_JSON = "application/json"
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")        # RFC 9110 §5.6.2
_VERSION = re.compile(r"HTTP/(\d)\.(\d)")                   # RFC 9112 §2.3
_BAD_VALUE_CHARS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # RFC 9110 §5.5 (HTAB is allowed)
_BY_LABEL = re.compile(r".+_by_([a-z][a-z0-9_]*)")
_NAME_UNSAFE = re.compile(r"[^a-zA-Z0-9_]")
_MAX_DEPTH = 8
_MAX_CLIENT_BYTES = 64 * 1024 * 1024
_NO_PROMETHEUS = b"GET /metrics needs prometheus_client: pip install 'sovereign-discovery[http]'\n"

_Answer = tuple[int, bytes, str]  # status, body, content type


class StatusSource(Protocol):
    """What the endpoint reads (the coordinator implements it). Called on the event loop."""

    def peers(self, *, capability: str | None = None, source: str | None = None) -> list[PeerInfo]:
        """The peers, filtered; may raise ArgumentValueError for a bad filter (answered 400)."""

    def stats(self) -> dict:
        """Nested dict of str -> int/float/str/bool/None/dict/list (JSON-able)."""

    def health(self) -> dict:
        """``{"ok": bool, ...}``: ``ok`` decides 200 or 503 on ``/healthz``."""


class StatusClientError(SovereignDiscoveryError):
    """:func:`fetch_json` failed: refused, timed out, not JSON, or an HTTP error status (in
    ``status``; None when no answer came). The message is one line naming the address."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class _HttpError(Exception):
    """A request answered with an error ``status`` and a one-line reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def _is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host.partition("%")[0]).is_loopback
    except ValueError:
        return False


def _show(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode() + b"\n"


def _check_number(name: str, value: object, low: float, high: float, kinds: tuple[type, ...]) -> None:
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise ArgumentTypeError(f"{name} must be a number, not {type(value).__name__}")
    if not low <= value <= high:
        raise ArgumentValueError(f"{name} must be in {low}..{high}, not {value}")


class StatusServer:
    """The status endpoint: ``async with StatusServer(coordinator, port=8080) as server:``, or
    ``await server.start()`` … ``await server.close()`` (idempotent). Listens on ``host`` only
    (loopback by default) and warns when that is reachable from the network."""

    def __init__(self, source: StatusSource, *, host: str = "127.0.0.1", port: int = 0,
                 header_timeout_s: float = 5.0, max_connections: int = 32) -> None:
        missing = [m for m in ("peers", "stats", "health") if not callable(getattr(source, m, None))]
        if missing:
            raise ArgumentTypeError(f"source must have peers(), stats() and health(); "
                                    f"{type(source).__name__} lacks {', '.join(missing)}")
        if not isinstance(host, str) or not host:
            raise ArgumentTypeError(f"host must be a non-empty str, not {host!r}")
        _check_number("port", port, 0, 65535, (int,))
        _check_number("header_timeout_s", header_timeout_s, 0.001, 3600, (int, float))
        _check_number("max_connections", max_connections, 1, 10_000, (int,))
        self._source = source
        self._host, self._port = host, port
        self._header_timeout_s = float(header_timeout_s)
        self._max_connections = max_connections
        self._server: asyncio.Server | None = None
        self._closed = False
        self._open: dict[asyncio.Task, asyncio.StreamWriter] = {}
        self._active = self._connections = 0
        self._responses: Counter[int] = Counter()
        self._dropped = dict.fromkeys(DROP_REASONS, 0)
        self._logged: set[str] = set()
        self._routes = {"/peers": (self._get_peers, frozenset({"capability", "source"})),
                        "/stats": (self._get_stats, frozenset()),
                        "/healthz": (self._get_health, frozenset()),
                        "/metrics": (self._get_metrics, frozenset())}

    async def __aenter__(self) -> StatusServer:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> StatusServer:
        """Listen (once; again is a no-op). Raises EndpointError, an OSError naming host:port, if
        it cannot, and ClosedError after :meth:`close`."""
        if self._closed:
            raise ClosedError("this status server was closed; make a new one")
        if self._server is None:
            try:
                self._server = await asyncio.start_server(self._serve, self._host, self._port,
                                                          limit=MAX_REQUEST_LINE_BYTES)
            except OSError as exc:
                # One line as the UDP endpoint words it (no "[Errno 98]", no asyncio's long
                # strerror); the errno stays available to code.
                reason = "address already in use" if exc.errno == errno.EADDRINUSE else (
                    os.strerror(exc.errno) if exc.errno else str(exc))
                error = EndpointError(f"status endpoint cannot listen on {_show(self._host, self._port)}: {reason}")
                error.errno = exc.errno
                raise error from exc
            if not _is_loopback(self._host):
                _log.warning("status endpoint on %s is reachable from the network: it reveals your "
                             "peers (docs/status-endpoint.md)", _show(*self.bound))
            _log.info("status endpoint listening on %s", self.url)
        return self

    async def close(self) -> None:
        """Stop listening and drop the open connections. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._server is not None:
            self._server.close()
        for writer in self._open.values():  # not task.cancel(): Python 3.11 streams log that as an error
            writer.transport.abort()  # every read and drain of the handler ends at once
        await asyncio.gather(*self._open, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    @property
    def bound(self) -> tuple[str, int]:
        """``(host, port)`` listened on (the first socket's). ClosedError when not listening."""
        if self._server is None or self._closed or not self._server.sockets:
            raise ClosedError("the status server is not listening")
        host, port = self._server.sockets[0].getsockname()[:2]
        return host, port

    @property
    def url(self) -> str:
        return "http://" + _show(*self.bound)

    def stats(self) -> dict:
        """Connections accepted and open, responses by status, dropped connections by reason."""
        return {"connections": self._connections, "connections_open": self._active,
                "responses_by_status": {str(s): n for s, n in sorted(self._responses.items())},
                "dropped_by_reason": dict(self._dropped)}

    # --- one connection ----------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._open[task] = writer
        self._connections += 1
        try:
            if self._closed:
                return
            if self._active >= self._max_connections:
                self._drop("too_many_connections", "refused a connection: %d open", self._active)
                await self._send(reader, writer, (503, _json({"error": "too many connections"}), _JSON),
                                 extra=("Retry-After: 1",))
                return
            self._active += 1
            try:
                await self._handle(reader, writer)
            finally:
                self._active -= 1
        except Exception:  # a bug here must not kill the server: count it, log it, drop the client
            self._drop("internal_error", "internal error serving a connection", exc_info=True)
        finally:
            writer.close()
            del self._open[task]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        method = ""
        try:
            async with asyncio.timeout(self._header_timeout_s):
                method, target = await _read_head(reader)
            answer = self._route(method, target)
        except TimeoutError:
            self._drop("header_timeout", "no complete request within %gs", self._header_timeout_s)
            answer = 408, _json({"error": "no complete request in time"}), _JSON
        except (asyncio.IncompleteReadError, ConnectionError):
            self._drop("client_closed", "client closed before a complete request")
            return
        except _HttpError as exc:
            self._note(f"http.{exc.status}", logging.INFO, "answered %d: %s", exc.status, exc)
            answer = exc.status, _json({"error": str(exc)}), _JSON
        extra = ("Allow: GET, HEAD",) if answer[0] == 405 else ()
        await self._send(reader, writer, answer, head=method == "HEAD", extra=extra)

    def _route(self, method: str, target: str) -> _Answer:
        if target.startswith(("http://", "https://")):  # absolute-form, RFC 9112 §3.2.2
            split = urlsplit(target)
            path, query = split.path or "/", split.query
        else:
            path, _, query = target.partition("?")
        route = self._routes.get(path)
        if route is None:
            raise _HttpError(404, f"no such path {path[:80]!r}; try {', '.join(self._routes)}")
        if method not in ("GET", "HEAD"):
            raise _HttpError(405, f"{path} answers GET and HEAD, not {method}")
        handler, allowed = route
        params = _query(query, allowed)
        try:
            return handler(params)
        except _HttpError:
            raise
        except Exception as exc:
            kind = type(exc).__name__
            self._note(f"500.{path}.{kind}", logging.ERROR, "GET %s failed", path, exc_info=True)
            return 500, _json({"error": f"internal error serving {path} ({kind}); see the node's log"}), _JSON

    async def _send(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, answer: _Answer,
                    *, head: bool = False, extra: tuple[str, ...] = ()) -> None:
        status, body, content_type = answer
        self._responses[status] += 1
        lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", f"Date: {formatdate(usegmt=True)}",
                 f"Content-Type: {content_type}", f"Content-Length: {len(body)}", "Connection: close",
                 "Cache-Control: no-store", "X-Content-Type-Options: nosniff", *extra]
        try:
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head else body))
            async with asyncio.timeout(SEND_TIMEOUT_S):
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except (ConnectionError, TimeoutError):
            self._drop("send_failed", "client gone or not reading its response")
            return
        try:  # RFC 9112 §9.6: read until the client closes, so that unread bytes cause no reset
            async with asyncio.timeout(LINGER_S):
                while await reader.read(65536):
                    pass
        except (ConnectionError, TimeoutError):
            pass

    def _drop(self, reason: str, message: str, *args: object, exc_info: bool = False) -> None:
        self._dropped[reason] += 1
        level = logging.ERROR if reason == "internal_error" else logging.INFO
        self._note(f"drop.{reason}", level, message, *args, exc_info=exc_info)

    def _note(self, key: str, level: int, message: str, *args: object, exc_info: bool = False) -> None:
        """Log the first of each kind at ``level``, later ones at DEBUG."""
        if key in self._logged:
            level = logging.DEBUG
        self._logged.add(key)
        _log.log(level, "status endpoint: " + message, *args, exc_info=exc_info)

    # --- the endpoints -----------------------------------------------------------------------

    def _get_peers(self, params: dict[str, str]) -> _Answer:
        capability, source = params.get("capability"), params.get("source")
        try:
            if capability is not None:
                check_capability(capability)
            if source is not None and source not in SOURCES:
                known = ", ".join(sorted(SOURCES))
                raise ArgumentValueError(f"source must be one of {known}, not {source!r}")
            peers = self._source.peers(capability=capability, source=source)
        except ArgumentValueError as exc:
            raise _HttpError(400, str(exc)) from None
        listed = [peer.as_dict() for peer in peers]
        return 200, _json({"peers": listed, "count": len(listed)}), _JSON

    def _get_stats(self, params: dict[str, str]) -> _Answer:
        return 200, _json(self._source.stats()), _JSON

    def _get_health(self, params: dict[str, str]) -> _Answer:
        health = self._source.health()
        if not isinstance(health, dict) or not isinstance(health.get("ok"), bool):
            raise TypeError(f"health() must return a dict with a bool 'ok', not {health!r:.80}")
        return (200 if health["ok"] else 503), _json(health), _JSON

    def _get_metrics(self, params: dict[str, str]) -> _Answer:
        try:
            from prometheus_client import CollectorRegistry, generate_latest
            from prometheus_client.core import GaugeMetricFamily, UnknownMetricFamily
            from prometheus_client.exposition import CONTENT_TYPE_LATEST
        except ImportError:
            return 501, _NO_PROMETHEUS, "text/plain; charset=utf-8"
        up = f"{METRIC_PREFIX}_up"
        flat = _flatten(self._source.stats(), {up})
        flat.update(_flatten({"http": self.stats()}, {up, *flat}))
        families = [GaugeMetricFamily(up, "1 while the node is running", value=1)]
        for name, (dotted, label, samples) in flat.items():
            family = UnknownMetricFamily(name, f"stats {dotted}", labels=[label] if label else None)
            for label_value, value in samples:
                family.add_metric([label_value] if label else [], value)
            families.append(family)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(families))
        return 200, generate_latest(registry), CONTENT_TYPE_LATEST


class _Collector:
    """A prometheus_client custom collector: the families made for one ``GET /metrics``."""

    def __init__(self, families: list) -> None:
        self._families = families

    def collect(self) -> list:
        return self._families


async def _read_line(reader: asyncio.StreamReader, too_long: _HttpError) -> str:
    try:
        raw = await reader.readuntil(b"\n")
    except asyncio.LimitOverrunError:
        raise too_long from None
    return (raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]).decode("latin-1")


async def _read_head(reader: asyncio.StreamReader) -> tuple[str, str]:
    """Read and check a request head; return (method, target). Headers are checked, then dropped."""
    too_long = _HttpError(414, "request line too long")
    line = await _read_line(reader, too_long) or await _read_line(reader, too_long)  # RFC 9112 §2.2
    parts = line.split(" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or not parts[1].startswith(("/", "http")) \
            or not (line.isascii() and line.isprintable()):
        raise _HttpError(400, "malformed request line")
    method, target, version = parts
    match = _VERSION.fullmatch(version)
    if not match:
        raise _HttpError(400, "malformed HTTP version")
    if match[1] != "1":
        raise _HttpError(505, f"{version} is not supported; use HTTP/1.1")
    too_large = _HttpError(431, "header fields too large")
    headers: dict[str, list[str]] = {}
    size = count = 0
    while line := await _read_line(reader, too_large):
        size, count = size + len(line) + 2, count + 1
        if size > MAX_HEADER_BYTES or count > MAX_HEADER_FIELDS:
            raise too_large
        name, colon, value = line.partition(":")
        if not colon or not _TOKEN.fullmatch(name) or _BAD_VALUE_CHARS.search(value):
            raise _HttpError(400, "malformed header field")  # obs-fold too: its name starts with SP
        headers.setdefault(name.lower(), []).append(value.strip(" \t"))
    if match[2] != "0" and len(headers.get("host", ())) != 1:
        raise _HttpError(400, "an HTTP/1.1 request needs exactly one Host header")
    if "transfer-encoding" in headers or set(headers.get("content-length", ())) - {"0"}:
        raise _HttpError(400, "request bodies are not accepted")
    return method, target


def _query(query: str, allowed: frozenset[str]) -> dict[str, str]:
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True, max_num_fields=16)
    except ValueError:  # UnicodeDecodeError too
        raise _HttpError(400, "malformed query string") from None
    params: dict[str, str] = {}
    for name, value in pairs:
        if name not in allowed:
            known = f"known: {', '.join(sorted(allowed))}" if allowed else "this path takes none"
            raise _HttpError(400, f"unknown query parameter {name[:40]!r} ({known})")
        if name in params:
            raise _HttpError(400, f"query parameter {name!r} given more than once")
        params[name] = value
    return params


def _flatten(stats: dict, taken: set[str]) -> dict[str, tuple[str, str | None, list[tuple[str, float]]]]:
    """Stats -> metric families ``{name: (dotted path, label name or None, [(label value, value)])}``.
    Numbers and bools (0/1) become samples; strings, None and lists are left out. A labelled dict
    (:data:`LABELLED_STATS`, or named ``<x>_by_<label>``) becomes one family, its keys the label's
    values; where its values are dicts, one family per inner key. Names are sanitized to
    ``[a-zA-Z0-9_]``; a name met again, or in ``taken``, is left out (the first wins)."""
    families: dict[str, tuple[str, str | None, list[tuple[str, float]]]] = {}

    def add(name: str, dotted: str, label: str | None, label_value: str, value: object) -> None:
        held = families.get(name)
        if not isinstance(value, (int, float)) or name in taken or (held and (not label or held[1] != label)):
            return
        families.setdefault(name, (dotted, label, []))[2].append((label_value, float(value)))

    def walk(prefix: str, path: str, node: dict, depth: int) -> None:
        for key, value in node.items():
            key = str(key)
            name, dotted = f"{prefix}_{_NAME_UNSAFE.sub('_', key)}", f"{path}.{key}".lstrip(".")
            by = _BY_LABEL.fullmatch(key)
            label = LABELLED_STATS.get(key) or (by[1] if by else None)
            if not isinstance(value, dict):
                add(name, dotted, None, "", value)
            elif label:
                for label_value, inner in value.items():
                    for sub, number in (inner.items() if isinstance(inner, dict) else [("", inner)]):
                        inner_name = f"{name}_{_NAME_UNSAFE.sub('_', str(sub))}" if sub else name
                        add(inner_name, f"{dotted}.*.{sub}" if sub else dotted, label, str(label_value), number)
            elif depth < _MAX_DEPTH:
                walk(name, dotted, value, depth + 1)

    walk(METRIC_PREFIX, "", stats if isinstance(stats, dict) else {}, 0)
    return families


# --- the client (the CLI's ``peers --http``) -------------------------------------------------


def fetch_json(host: str, port: int, path: str, *, timeout: float = 5.0) -> dict:
    """GET ``path`` (e.g. ``/peers?source=mdns``) from a status endpoint; return its JSON object.
    Proxies are bypassed. Raises StatusClientError, one line naming host:port, on any failure
    (an HTTP error status included, with the server's error text)."""
    where = _show(host, port)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(f"http://{where}{path}", headers={"Accept": _JSON})
    try:
        with opener.open(request, timeout=timeout) as answer:
            data = answer.read(_MAX_CLIENT_BYTES + 1)
    except urllib.error.HTTPError as exc:
        message, status = f"{where}{path} answered {exc.code}: {_error_text(exc)}", exc.code
        raise StatusClientError(message, status=status) from None
    except (OSError, ValueError, http.client.HTTPException) as exc:  # URLError is an OSError
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        if isinstance(reason, ConnectionRefusedError):
            message = f"connection refused at {where} (is the node running with --http?)"
        elif isinstance(reason, TimeoutError):
            message = f"no answer from {where} within {timeout:g}s"
        else:
            message = f"cannot read {where}{path}: {reason}"
        raise StatusClientError(message) from None
    try:
        value = json.loads(data) if len(data) <= _MAX_CLIENT_BYTES else None
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise StatusClientError(f"{where}{path} did not answer a JSON object (is it a status endpoint?)")
    return value


def _error_text(exc: urllib.error.HTTPError) -> str:
    """The server's ``{"error": ...}`` text, else the first line of its body, else the reason."""
    try:
        body = exc.read(65536)
    except OSError:
        body = b""
    try:
        return str(json.loads(body)["error"])
    except (ValueError, KeyError, TypeError):
        return body.decode("utf-8", "replace").strip().partition("\n")[0][:200] or str(exc.reason)


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def format_peers(peers: list[dict], *, now: float | None = None) -> str:
    """``GET /peers`` entries (``PeerInfo.as_dict()``) as a table for people, one line a peer:
    short node ID, sources, local, last seen (age at ``now``, Unix seconds), addresses,
    capabilities; then the count."""
    if not peers:
        return "no peers"
    now = time.time() if now is None else now
    rows = [("NODE", "SOURCES", "LOCAL", "SEEN", "ADDRESSES", "CAPABILITIES")]
    for peer in peers:
        addresses = list(peer.get("addresses") or [])
        shown = ", ".join(addresses[:2]) + (f" +{len(addresses) - 2}" if len(addresses) > 2 else "")
        seen = peer.get("last_seen")
        rows.append((str(peer.get("node_id", "?"))[:8], ",".join(peer.get("sources") or []) or "-",
                     "yes" if peer.get("local") else "-",
                     f"{_age(now - seen)} ago" if isinstance(seen, (int, float)) else "?",
                     shown or "-", ",".join(peer.get("capabilities") or []) or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1] for row in rows]
    return "\n".join(lines + [f"{len(peers)} peer{'s' if len(peers) != 1 else ''}"])
