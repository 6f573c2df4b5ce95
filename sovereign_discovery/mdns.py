"""The mDNS/DNS-SD local layer (DESIGN.md "Local layer"; docs/local-discovery.md).

The node announces the DNS-SD service ``local.service_name`` (``_sovereign._tcp.local.``) on the
configured interfaces and browses for the same service. What a peer publishes:

- **instance name**: its node ID in text form (32 characters of base32), so every node has a
  unique name and a browser recognises its own service without resolving it;
- **SRV**: the node's UDP (DHT) port, on a host name equal to the instance name, whose A/AAAA
  records are the addresses of the interfaces mDNS runs on;
- **TXT** (RFC 6763 §6): ``v=1`` and the node's compact signed
  :class:`~sovereign_discovery.records.PeerRecord` cut into ``r0=``, ``r1=``, … strings of at
  most 252 raw bytes each (every TXT string stays ≤ 255 bytes). The record carries the public
  key, protocol version, capabilities, addresses, sequence number, expiry and the signature, so
  the TXT needs nothing else and a reader trusts nothing unsigned but the address it saw.

A browsed service counts only when its TXT parses within hard bounds, the record inside verifies
(:meth:`PeerRecord.decode` at the current time), and the record's node ID is the instance name.
The layer then hands it to the coordinator with the address zeroconf saw
(:meth:`LayerContext.peer_seen`); the coordinator PINGs it over an authenticated session and
reports ``PeerDiscovered`` only if it answers. A goodbye (``Removed``) is
:meth:`LayerContext.peer_gone` at once. A crashed peer sends no goodbye and its mDNS records live
for minutes, so the layer checks each peer it vouches for with an authenticated PING through
:meth:`LayerContext.ping` and reports it gone when it has not answered for
``liveness_interval_s``. When the own record changes (new seq) the service is re-announced.

Bad input from the link (malformed, oversized TXT; bad signatures; expired records; a record
under another node's instance name; floods of instances) is dropped and counted per reason in
``stats()["dropped"]``; the first drop of each reason is logged at info, the rest at debug.
Memory is bounded (``max_services`` instances tracked or being resolved), and so is time (each
resolution has a timeout, and at most ``MAX_RESOLVES_IN_FLIGHT`` run at once). Nothing from the
network raises out of the layer.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import time
from collections import Counter
from dataclasses import dataclass

from .addresses import Address
from .config import LocalConfig
from .errors import (
    ArgumentTypeError,
    ArgumentValueError,
    BadSignatureError,
    ClosedError,
    DecodeError,
    RecordExpiredError,
    RecordFromFutureError,
    RecordTooLargeError,
)
from .keys import NodeId
from .layers import LayerContext, LayerTasks, LayerUnavailable
from .mdns_transport import (
    MdnsTransport,
    ResolvedService,
    ServiceAd,
    TransportUnavailable,
    ZeroconfTransport,
    default_interfaces,
)
from .records import PeerRecord

__all__ = [
    "MdnsLayer",
    "create_layer",
    "encode_txt",
    "decode_txt",
    "TxtError",
    "instance_name",
    "choose_address",
    "TXT_VERSION",
]

_log = logging.getLogger(__name__)

#: The value of the ``v=`` TXT key this version writes and reads.
TXT_VERSION = b"1"
#: Raw record bytes per ``rN=`` TXT string: 255 (RFC 1035 §3.3.14 string limit) - len("rN=").
TXT_CHUNK_BYTES = 252
#: The largest TXT rdata read: 4 chunks of a 1,000-byte record, ``v=1``, and room for a few
#: short keys a later version may add. Anything larger is dropped unread.
MAX_TXT_BYTES = 1300
#: TXT strings read before the TXT is dropped.
MAX_TXT_STRINGS = 16
_MAX_CHUNKS = 4  # ceil(MAX_RECORD_BYTES / TXT_CHUNK_BYTES)
#: Instances tracked and being resolved at once; more are dropped (``too_many_services``).
DEFAULT_MAX_SERVICES = 256
#: Resolutions in flight at once, and the time each may take (the notes measured ≤ 1.25 s for a
#: service that exists).
MAX_RESOLVES_IN_FLIGHT = 8
DEFAULT_RESOLVE_TIMEOUT_S = 3.0
#: Liveness PINGs in flight at once.
MAX_PINGS_IN_FLIGHT = 8
#: A peer reported gone by its liveness check is still PINGed now and then (it may have been a
#: network blip; its unchanged records would not be announced again) for this long: the default
#: TTL of zeroconf's SRV/TXT records, after which browsers drop it anyway.
LOST_RETENTION_S = 120.0
#: Addresses of one resolved service looked at.
MAX_SEEN_ADDRESSES = 16

_INSTANCE = re.compile(r"[a-z2-7]{32}")  # NodeId's text form (keys.NodeId.__str__)

_RECORD_DROP_REASONS = (
    (RecordTooLargeError, "record_too_large"),
    (BadSignatureError, "bad_signature"),
    (RecordExpiredError, "expired_record"),
    (RecordFromFutureError, "record_from_future"),
)


# --- the TXT encoding --------------------------------------------------------------------------------


class TxtError(DecodeError):
    """A TXT that cannot carry a record; ``reason`` is the drop counter's name."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def instance_name(node_id: bytes) -> str:
    """The DNS-SD instance label of a node: its node ID's text form."""
    return str(NodeId(node_id))


def encode_txt(record: PeerRecord) -> bytes:
    """The TXT rdata announcing ``record``: ``v=1``, then the record in ``rN=`` chunks."""
    if not isinstance(record, PeerRecord):
        raise ArgumentTypeError(f"record must be a PeerRecord, not {type(record).__name__}")
    raw = record.encode()
    strings = [b"v=" + TXT_VERSION]
    strings += [b"r%d=" % n + raw[start:start + TXT_CHUNK_BYTES]
                for n, start in enumerate(range(0, len(raw), TXT_CHUNK_BYTES))]
    return b"".join(bytes((len(s),)) + s for s in strings)


def _txt_strings(rdata: bytes) -> list[bytes]:
    if len(rdata) > MAX_TXT_BYTES:
        raise TxtError("txt_too_large", f"{len(rdata)} bytes")
    strings, offset = [], 0
    while offset < len(rdata):
        size = rdata[offset]
        value = rdata[offset + 1:offset + 1 + size]
        if len(value) != size:
            raise TxtError("malformed_txt", "a string runs past the end")
        if len(strings) == MAX_TXT_STRINGS:
            raise TxtError("txt_too_many_strings", f"more than {MAX_TXT_STRINGS}")
        strings.append(value)
        offset += 1 + size
    return strings


def decode_txt(rdata: bytes) -> bytes:
    """The record bytes inside a TXT rdata (not yet verified: pass them to ``PeerRecord.decode``).
    Keys are case-insensitive and only the first of a repeated key counts (RFC 6763 §6.4); keys
    this version does not know are ignored. Raises only :class:`TxtError`."""
    if not isinstance(rdata, (bytes, bytearray, memoryview)):
        raise TxtError("malformed_txt", f"not bytes: {type(rdata).__name__}")
    pairs: dict[bytes, bytes | None] = {}
    for string in _txt_strings(bytes(rdata)):
        key, eq, value = string.partition(b"=")
        key = key.lower()
        if key and key not in pairs:
            pairs[key] = value if eq else None
    version = pairs.get(b"v")
    if version is None:
        raise TxtError("missing_txt_version")
    if version != TXT_VERSION:
        raise TxtError("unsupported_txt_version", repr(version[:16]))
    chunks = []
    for n in range(_MAX_CHUNKS + 1):
        chunk = pairs.get(b"r%d" % n)
        if chunk is None:
            break
        if not chunk:
            raise TxtError("malformed_txt", f"empty r{n}")
        chunks.append(chunk)
    if not chunks:
        raise TxtError("missing_record")
    if len(chunks) > _MAX_CHUNKS:
        raise TxtError("record_too_large", f"more than {_MAX_CHUNKS} chunks")
    if any(re.fullmatch(rb"r[0-9]+", key) and int(key[1:]) >= len(chunks) for key in pairs if len(key) < 8):
        raise TxtError("malformed_txt", "record chunks are not contiguous")
    return b"".join(chunks)


# --- addresses -------------------------------------------------------------------------------------


def choose_address(seen: tuple[str, ...], port: int, record: PeerRecord) -> Address | None:
    """The address to reach the peer of ``record``, which mDNS saw at ``seen`` with SRV ``port``:
    a record address (signed, port included) whose IP was seen if there is one (a record's
    link-local address, which carries no zone, gets the zone it was seen with); otherwise a seen
    address with the SRV port — IPv4 first, then routable IPv6, then link-local IPv6 only with
    its zone (an unscoped ``fe80::`` is ambiguous on a multi-homed host and is ignored, whether
    seen or in the record). None if nothing usable was seen (the coordinator then tries the
    record's addresses)."""
    ips = []
    for text in seen[:MAX_SEEN_ADDRESSES]:
        try:
            ip = ipaddress.ip_address(text)
        except ValueError:
            continue
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if ip.is_unspecified or ip.is_multicast or (ip.version == 6 and ip.is_link_local and not ip.scope_id):
            continue
        ips.append(ip)
    for address in record.addresses:
        if address.ip in ips:
            return address
    for address in record.addresses:  # a signed link-local address has no zone: the seen one's, if any
        if address.version == 6 and address.ip.is_link_local:
            for ip in ips:
                if ip.version == 6 and ip.scope_id and ipaddress.IPv6Address(str(ip).split("%")[0]) == address.ip:
                    return Address(ip, address.port)
    if not 1 <= port <= 65535:
        return None
    ranked = sorted(ips, key=lambda ip: (ip.version, ip.version == 6 and ip.is_link_local))
    return Address(ranked[0], port) if ranked else None


# --- the layer ---------------------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class _Peer:
    """One instance the layer vouches for (or did, until its liveness check failed)."""

    record: PeerRecord
    address: Address | None
    last_alive: float  # monotonic: announced, resolved or answered a PING
    lost_at: float | None = None  # monotonic, while reported gone by the liveness check
    last_ping: float = 0.0
    pinging: int = 0  # PINGs in flight


class MdnsLayer:
    """The mDNS local layer (``name == "mdns"``); see the module docstring.

    ``local_config`` gives the service type, the interfaces (``mdns_interfaces``; empty: every
    private or link-local IPv4 interface, logged at warning — docs/local-discovery.md) and the
    liveness interval (``liveness_interval_s`` if the configuration has it, else
    ``scan_interval_s``); ``liveness_interval_s`` overrides it. ``transport`` replaces the
    python-zeroconf transport (tests pass a :class:`~sovereign_discovery.mdns_transport.
    MemoryMdnsTransport`). ``resolve_timeout_s`` bounds each resolution, ``max_services`` the
    instances tracked at once.
    """

    name = "mdns"

    def __init__(self, local_config: LocalConfig | None = None, *, transport: MdnsTransport | None = None,
                 liveness_interval_s: float | None = None,
                 resolve_timeout_s: float = DEFAULT_RESOLVE_TIMEOUT_S,
                 max_services: int = DEFAULT_MAX_SERVICES) -> None:
        config = LocalConfig() if local_config is None else local_config
        if not isinstance(config, LocalConfig):
            raise ArgumentTypeError(f"local_config must be a LocalConfig, not {type(config).__name__}")
        if transport is not None and not isinstance(transport, MdnsTransport):
            raise ArgumentTypeError(f"transport must be an MdnsTransport, not {type(transport).__name__}")
        if liveness_interval_s is None:
            liveness_interval_s = getattr(config, "liveness_interval_s", None) or config.scan_interval_s
        for name, value in (("liveness_interval_s", liveness_interval_s),
                            ("resolve_timeout_s", resolve_timeout_s)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ArgumentTypeError(f"{name} must be seconds (a number), not {type(value).__name__}")
            if not 0.05 <= value <= 3600:
                raise ArgumentValueError(f"{name} must be in 0.05..3600 seconds, not {value}")
        if isinstance(max_services, bool) or not isinstance(max_services, int):
            raise ArgumentTypeError(f"max_services must be an int, not {type(max_services).__name__}")
        if not 1 <= max_services <= 65536:
            raise ArgumentValueError(f"max_services must be in 1..65536, not {max_services}")
        self._config = config
        self._service_type = config.service_name
        self._transport = transport
        self._liveness_s = float(liveness_interval_s)
        self._resolve_timeout_s = float(resolve_timeout_s)
        self._max_services = max_services
        self._state = "new"  # new, starting, running, closed
        self._context: LayerContext | None = None
        self._own_instance = ""
        self._own_key = b""
        self._own: PeerRecord | None = None
        self._announced: ServiceAd | None = None
        self._announce_state = "waiting for the own record"
        self._announce_wanted = asyncio.Event()
        self._peers: dict[str, _Peer] = {}
        self._again: set[str] = set()
        self._resolve_slots = asyncio.Semaphore(MAX_RESOLVES_IN_FLIGHT)
        self._count: Counter[str] = Counter()
        #: background tasks; keyed: the resolution of each service instance
        self._tasks = LayerTasks("mdns", self._count)
        self._dropped: Counter[str] = Counter()
        self._liveness = "on"

    # --- life cycle ----------------------------------------------------------------------------------

    async def start(self, context: LayerContext) -> None:
        """Join the interfaces, browse, and announce the own record as soon as there is one.
        Raises :class:`LayerUnavailable` when mDNS cannot run here (zeroconf missing, an
        interface that cannot be joined)."""
        if not isinstance(context, LayerContext):
            raise ArgumentTypeError(f"context must be a LayerContext, not {type(context).__name__}")
        if self._state != "new":
            raise ClosedError(f"the mdns layer is {self._state}; a layer starts once")
        self._state = "starting"
        self._context = context
        self._own_key = context.identity.public_key
        self._own_instance = instance_name(context.identity.node_id)
        transport = self._transport
        try:
            if transport is None:
                interfaces = self._config.mdns_interfaces
                if not interfaces:
                    interfaces = default_interfaces()
                    if interfaces:
                        _log.warning("mDNS announces this node (its public key and addresses) on every"
                                     " private interface: %s; set local.mdns_interfaces to choose",
                                     ", ".join(interfaces))
                transport = self._transport = ZeroconfTransport(interfaces)
            await transport.start(self._service_type, self._on_change)
        except TransportUnavailable as exc:
            self._state = "closed"
            raise LayerUnavailable(self.name, exc.reason) from None
        if not callable(getattr(context, "ping", None)):
            self._liveness = "off: the coordinator offers no LayerContext.ping"
            _log.info("mdns liveness checks are %s; a crashed peer is lost only when its records expire",
                      self._liveness)
        self._state = "running"
        self._tasks.spawn(self._announcer(), "announcer")
        self._tasks.spawn(self._check_liveness(), "liveness")
        context.on_own_record_changed(self._own_record_changed)

    async def close(self) -> None:
        """Say goodbye (awaited, bounded) and stop every task. Idempotent."""
        if self._state == "closed":
            return
        self._state = "closed"
        await self._tasks.cancel_all()
        if self._transport is not None:
            try:
                await self._transport.close()
            except Exception:
                _log.exception("closing the mDNS transport failed")
        self._peers.clear()

    def stats(self) -> dict:
        """Counters (JSON-able): ``service``, ``instance``, ``interfaces``, ``announce``
        (state), ``announced_seq``, ``peers`` (vouched for), ``peers_lost`` (failed liveness,
        still PINGed), ``resolving``, ``liveness``, ``liveness_interval_s``, counters of what
        happened, and ``dropped`` by reason."""
        return {
            "service": self._service_type,
            "instance": self._own_instance,
            "interfaces": list(self._transport.interfaces) if self._transport is not None else [],
            "announce": self._announce_state,
            "announced_seq": self._own.seq if self._announced is not None and self._own is not None else None,
            "peers": sum(1 for p in self._peers.values() if p.lost_at is None),
            "peers_lost": sum(1 for p in self._peers.values() if p.lost_at is not None),
            "resolving": len(self._tasks),
            "liveness": self._liveness,
            "liveness_interval_s": self._liveness_s,
            **{k: v for k, v in sorted(self._count.items())},
            "dropped": dict(sorted(self._dropped.items())),
        }

    def _drop(self, reason: str, instance: str, detail: object = "") -> None:
        first = reason not in self._dropped
        self._dropped[reason] += 1
        _log.log(logging.INFO if first else logging.DEBUG, "mdns: dropped %.40s: %s %s",
                 instance, reason, detail)

    # --- announcing ------------------------------------------------------------------------------------

    def _own_record_changed(self, record: PeerRecord) -> None:
        self._own = record
        self._announce_wanted.set()

    def _ad_for(self, record: PeerRecord) -> ServiceAd | None:
        port = self._port_for(record)
        if port is None:
            return None
        return ServiceAd(self._own_instance, port, encode_txt(record))

    def _port_for(self, record: PeerRecord) -> int | None:
        """The SRV port: the port of the DHT socket of a family mDNS runs on, when the context
        tells it (``LayerContext.bound``: right behind a NAT, where the record may advertise a
        forwarded port, and for a wildcard-bound node whose record has no address yet); else the
        port of the record's first address of such a family, else of its first address."""
        families = {ipaddress.ip_address(i.split("%")[0]).version for i in self._transport.interfaces}
        bound: list = []
        with contextlib.suppress(Exception):  # an older context has no ``bound``
            bound = [(ipaddress.ip_address(host).version, int(port)) for host, port in self._context.bound]
        for version, port in sorted(bound, key=lambda b: b[0] not in families):
            if 1 <= port <= 65535:
                return port
        for address in sorted(record.addresses, key=lambda a: a.version not in families):
            return address.port
        return None

    async def _announcer(self) -> None:
        """Announce the latest own record, one announcement at a time (a registration probes for
        the name first and takes about 1.5 s); changes meanwhile coalesce."""
        while self._state == "running":
            await self._announce_wanted.wait()
            self._announce_wanted.clear()
            record = self._own
            ad = self._ad_for(record) if record is not None else None
            if ad is None:
                self._announce_state = "no UDP port to announce yet"
                self._count["announce_skipped_no_port"] += 1
                continue
            if ad == self._announced:
                continue
            self._announce_state = "announcing"
            try:
                await self._transport.announce(ad)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._announce_state = f"failed: {type(exc).__name__}: {exc}"
                self._count["announce_failed"] += 1
                _log.warning("mdns: announcing %s failed: %s: %s", self._own_instance,
                             type(exc).__name__, exc)
                continue
            self._announced = ad
            self._announce_state = "announced"
            self._count["announcements"] += 1

    # --- browsing --------------------------------------------------------------------------------------

    def _on_change(self, kind: str, instance: str) -> None:
        """The transport saw ``instance`` appear, change or leave. Never raises."""
        try:
            self._handle_change(kind, instance)
        except Exception:
            self._count["internal_errors"] += 1
            _log.exception("mdns: handling %s of %.40r failed", kind, instance)

    def _handle_change(self, kind: str, instance: str) -> None:
        if self._state != "running":
            return
        if instance == self._own_instance:
            self._count["own_service_seen"] += 1
            return
        if not isinstance(instance, str) or not _INSTANCE.fullmatch(instance):
            self._drop("bad_instance_name", repr(instance)[:40])
            return
        self._count[f"services_{kind}"] += 1
        if kind == "removed":
            self._forget(instance, goodbye=True)
            return
        if instance in self._tasks:
            self._again.add(instance)  # resolve again once the running one ends
            return
        if instance not in self._peers and len(self._peers) + len(self._tasks) >= self._max_services:
            self._drop("too_many_services", instance)
            return
        self._tasks.spawn_keyed(instance, self._resolve(instance), f"resolve {instance[:8]}",
                                on_done=self._resolved)

    def _resolved(self, instance: str) -> None:
        if instance in self._again:
            self._again.discard(instance)
            self._handle_change("updated", instance)

    async def _resolve(self, instance: str) -> None:
        async with self._resolve_slots:
            try:
                service = await asyncio.wait_for(self._transport.resolve(instance, self._resolve_timeout_s),
                                                 self._resolve_timeout_s + 1.0)
            except asyncio.TimeoutError:
                service = None
            except Exception as exc:  # zeroconf's own, on odd input: dropped like the input
                self._drop("resolve_failed", instance, exc)
                return
        if service is None:
            self._drop("resolve_timeout", instance)
            return
        if self._state == "running":
            self._accept(service)

    def _accept(self, service: ResolvedService) -> None:
        instance = service.instance
        try:
            record = PeerRecord.decode(decode_txt(service.txt), now=time.time())
        except TxtError as exc:
            self._drop(exc.reason, instance, exc)
            return
        except DecodeError as exc:
            reason = next((r for cls, r in _RECORD_DROP_REASONS if isinstance(exc, cls)), "malformed_record")
            self._drop(reason, instance, exc)
            return
        if record.public_key == self._own_key:
            self._count["own_service_seen"] += 1
            return
        if str(record.node_id) != instance:
            self._drop("instance_mismatch", instance, f"the record is {record.node_id.short()}…'s")
            return
        try:
            address = choose_address(service.addresses, service.port, record)
        except Exception as exc:  # odd addresses from the link: unusable, not fatal
            self._drop("bad_address", instance, exc)
            address = None
        now = time.monotonic()
        peer = self._peers.get(instance)
        if peer is not None:
            if record.seq < peer.record.seq:
                self._drop("stale_record", instance, f"seq {record.seq} < {peer.record.seq}")
                return
            if record.seq == peer.record.seq and address == peer.address and peer.lost_at is None:
                peer.last_alive = now
                self._count["unchanged"] += 1
                return
            peer.record, peer.address, peer.last_alive = record, address, now
            peer.lost_at = None
            self._count["updated"] += 1
        else:
            self._peers[instance] = _Peer(record, address, now)
            self._count["verified"] += 1
        self._context.peer_seen(record, address=address)

    def _forget(self, instance: str, *, goodbye: bool) -> None:
        self._tasks.cancel(instance)
        self._again.discard(instance)
        peer = self._peers.pop(instance, None)
        if peer is not None and peer.lost_at is None:
            self._count["goodbyes" if goodbye else "lost_liveness"] += 1
            self._context.peer_gone(peer.record.node_id)

    # --- liveness ----------------------------------------------------------------------------------------

    async def _check_liveness(self) -> None:
        """Every tenth of the liveness interval I: a peer silent (no announcement, resolution or
        PING answer) for 0.8 I is gone; a peer silent for 0.2 I is PINGed, again every 0.1 I
        while it stays silent (at most two PINGs in flight each, every PING bounded by the time
        left until 0.8 I), so one lost datagram or a slow answer does not lose a live peer. Its
        last sign of life is at or before a crash, so a crashed peer is reported gone at most
        0.9 I after it crashed (the rest of I is a margin for a busy loop). Peers reported gone
        are still PINGed, backing off (0.2 I, then half the time since they were lost), for
        LOST_RETENTION_S in case they come back."""
        interval = self._liveness_s
        period = interval / 10
        while self._state == "running":
            await asyncio.sleep(period)
            if not self._liveness.startswith("on"):
                continue
            now = time.monotonic()
            in_flight = sum(p.pinging for p in self._peers.values())
            for instance, peer in list(self._peers.items()):
                if peer.record.is_expired(time.time()):  # its owner stopped republishing
                    del self._peers[instance]
                    self._count["expired"] += 1
                    if peer.lost_at is None:
                        self._context.peer_gone(peer.record.node_id)
                    continue
                if peer.lost_at is None:
                    silent = now - peer.last_alive
                    if silent >= 0.8 * interval:
                        self._lose(peer)  # even with a PING in flight: the bound is the contract
                        continue
                    due = silent >= 2 * period and now - peer.last_ping >= period and peer.pinging < 2
                    timeout = max(period, 0.8 * interval - silent)
                elif now - peer.lost_at > LOST_RETENTION_S:
                    del self._peers[instance]
                    continue
                else:
                    # backing off: 0.2 I at first, then half the time since it was lost
                    wait = max(2 * period, (now - peer.lost_at) / 2)
                    due = now - peer.last_ping >= wait and not peer.pinging
                    timeout = 2 * period
                if due and in_flight < MAX_PINGS_IN_FLIGHT:
                    in_flight += 1
                    peer.pinging += 1
                    peer.last_ping = now
                    self._tasks.spawn(self._ping(peer, timeout), f"ping {instance[:8]}")

    def _lose(self, peer: _Peer) -> None:
        peer.lost_at = time.monotonic()
        self._count["lost_liveness"] += 1
        _log.info("mdns: %s stopped answering; reported gone", peer.record.node_id.short())
        self._context.peer_gone(peer.record.node_id)

    async def _ping(self, peer: _Peer, timeout_s: float) -> None:
        try:
            try:
                answered = await asyncio.wait_for(self._context.ping(peer.record, peer.address), timeout_s)
            except asyncio.TimeoutError:
                answered = False
            except NotImplementedError:
                self._liveness = "off: the coordinator offers no LayerContext.ping"
                return
            except Exception as exc:
                self._count["ping_errors"] += 1
                _log.debug("mdns: liveness PING of %s failed: %s", peer.record.node_id.short(), exc)
                answered = False
            self._count["pings"] += 1
            if self._state != "running" or self._peers.get(instance_name(peer.record.node_id)) is not peer:
                return
            if answered is True:
                peer.last_alive = time.monotonic()
                if peer.lost_at is not None:
                    peer.lost_at = None
                    self._count["recovered"] += 1
                self._context.peer_seen(peer.record, address=peer.address)  # refreshes last_seen
            else:
                self._count["pings_unanswered"] += 1
        finally:
            peer.pinging -= 1


def create_layer(local_config: LocalConfig) -> MdnsLayer:
    """The mDNS layer for ``local_config`` (what the coordinator runs when ``local.mdns`` is on).
    Never imports zeroconf: :meth:`MdnsLayer.start` reports a missing zeroconf as
    :class:`LayerUnavailable`."""
    return MdnsLayer(local_config)
