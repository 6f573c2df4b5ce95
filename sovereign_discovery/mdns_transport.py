"""mDNS transports: the small interface the mDNS layer (:mod:`sovereign_discovery.mdns`) runs on,
its python-zeroconf implementation, and an in-memory fake for tests (docs/local-discovery.md).

A transport does four things for one DNS-SD service type, and nothing else:

- **browse**: from :meth:`MdnsTransport.start` on, it calls ``on_change(kind, instance)`` for
  every service instance of the type that appears (``"added"``), changes (``"updated"``) or says
  goodbye (``"removed"``) — the node's own instance included, as zeroconf reports it;
- **announce** one own service (:class:`ServiceAd`: instance label, port, TXT rdata) and replace
  it when the ad changes; **withdraw** it (a goodbye);
- **resolve** an instance to its port, TXT rdata and addresses (:class:`ResolvedService`),
  bounded by a timeout.

Transports move bytes and names; they check nothing. The layer decides what is trusted: every
TXT is parsed with hard bounds and the record inside is verified there.

This is the only module that imports zeroconf (and ifaddr, its dependency), and it imports them
only when a :class:`ZeroconfTransport` starts, so the package imports without them.

Exceptions: :class:`TransportUnavailable` from ``start`` (zeroconf missing, an interface that
cannot be joined); ``announce`` and ``withdraw`` may raise whatever the backend raises (the
layer counts and logs it); ``resolve`` returns None rather than raising for a peer that does not
answer in time.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = [
    "MdnsTransport",
    "ServiceAd",
    "ResolvedService",
    "TransportUnavailable",
    "ZeroconfTransport",
    "MemoryMdnsNetwork",
    "MemoryMdnsTransport",
    "default_interfaces",
    "NOT_INSTALLED",
]

_log = logging.getLogger(__name__)

#: What a user reads when python-zeroconf is missing.
NOT_INSTALLED = "python-zeroconf is not installed: pip install 'sovereign-discovery[mdns]'"
#: How long ``close`` waits for the goodbye to go out before it gives up on it.
GOODBYE_TIMEOUT_S = 2.0

#: ``on_change(kind, instance)``: kind is "added", "updated" or "removed".
ChangeCallback = Callable[[str, str], None]


class TransportUnavailable(Exception):
    """mDNS cannot run here; ``reason`` says why in words a user can act on."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ServiceAd:
    """The own service: instance label (one DNS label), UDP port (the SRV port) and TXT rdata
    (length-prefixed strings, RFC 6763 §6)."""

    instance: str
    port: int
    txt: bytes


@dataclass(frozen=True, slots=True)
class ResolvedService:
    """What the link says about an instance: untrusted until the layer has checked it.
    ``addresses`` are IP address texts; an IPv6 link-local address carries its zone
    (``fe80::1%2``) when the transport knows the interface it came from."""

    instance: str
    port: int
    txt: bytes
    addresses: tuple[str, ...]


class MdnsTransport(ABC):
    """Announce, browse and resolve one DNS-SD service type (see the module docstring)."""

    #: The interface addresses the transport runs on (known after ``start``).
    interfaces: tuple[str, ...] = ()

    @abstractmethod
    async def start(self, service_type: str, on_change: ChangeCallback) -> None:
        """Join the interfaces and start browsing ``service_type``. Raises
        :class:`TransportUnavailable`."""

    @abstractmethod
    async def announce(self, ad: ServiceAd) -> None:
        """Publish ``ad`` (the first call registers it, probing for the name first; later calls
        replace its records); returns when the announcement went out."""

    @abstractmethod
    async def withdraw(self) -> None:
        """Say goodbye for the own service (no-op if none is published)."""

    @abstractmethod
    async def resolve(self, instance: str, timeout_s: float) -> ResolvedService | None:
        """Port, TXT and addresses of ``instance``; None if they did not arrive in ``timeout_s``."""

    @abstractmethod
    async def close(self) -> None:
        """Withdraw (the goodbye is awaited, bounded), stop browsing, leave. Idempotent."""


# --- interfaces ------------------------------------------------------------------------------------


def _assigned_addresses() -> set[str]:
    """Every IP address assigned to an interface of this machine (ifaddr, zeroconf's dependency)."""
    try:
        import ifaddr
    except ImportError:
        raise TransportUnavailable(NOT_INSTALLED) from None
    found = set()
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            text = ip.ip if isinstance(ip.ip, str) else ip.ip[0]
            found.add(str(ipaddress.ip_address(text.split("%")[0])))
    return found


def default_interfaces() -> tuple[str, ...]:
    """The interfaces mDNS uses when none are configured: every IPv4 address of this machine
    that is private or link-local (RFC 1918, RFC 3927) and not loopback, sorted. Public
    addresses are never chosen implicitly: a node on a server's public interface does not
    announce itself to its provider's segment unless told to (docs/local-discovery.md)."""
    chosen = []
    for text in _assigned_addresses():
        ip = ipaddress.ip_address(text)
        if ip.version == 4 and ip.is_private and not ip.is_loopback and not ip.is_unspecified:
            chosen.append(ip)
    return tuple(str(ip) for ip in sorted(chosen))


def _check_interfaces(interfaces: Sequence[str]) -> tuple[str, ...]:
    if not interfaces:
        raise TransportUnavailable(
            "no private or link-local IPv4 interface found to run mDNS on; list the addresses in"
            " local.mdns_interfaces (node --mdns-interface ADDR)")
    assigned = _assigned_addresses()
    for text in interfaces:
        if str(ipaddress.ip_address(text.split("%")[0])) not in assigned:
            raise TransportUnavailable(f"{text} is not the address of any interface that is up on this"
                                       " machine (local.mdns_interfaces)")
    return tuple(interfaces)


# --- python-zeroconf -------------------------------------------------------------------------------


class ZeroconfTransport(MdnsTransport):
    """The real transport: python-zeroconf's asyncio API on exactly ``interfaces`` (IP addresses;
    never ``InterfaceChoice.All``). Questions are QM (multicast answers): on one host QU answers
    go by unicast to whichever process the kernel picks, which may not be the asker (RFC 6762
    §15; measured in docs/local-discovery.md)."""

    def __init__(self, interfaces: Sequence[str]) -> None:
        self.interfaces = tuple(interfaces)
        self._type = ""
        self._azc = None
        self._browser = None
        self._info = None  # the registered AsyncServiceInfo
        self._zc_module = None
        self._closed = False

    async def start(self, service_type: str, on_change: ChangeCallback) -> None:
        try:
            import zeroconf
            from zeroconf.asyncio import AsyncServiceBrowser, AsyncZeroconf
        except ImportError:
            raise TransportUnavailable(NOT_INSTALLED) from None
        self._zc_module = zeroconf
        self.interfaces = _check_interfaces(self.interfaces)
        versions = {ipaddress.ip_address(i.split("%")[0]).version for i in self.interfaces}
        ip_version = (zeroconf.IPVersion.All if len(versions) == 2
                      else zeroconf.IPVersion.V6Only if versions == {6} else zeroconf.IPVersion.V4Only)
        self._type = service_type
        try:
            self._azc = AsyncZeroconf(interfaces=list(self.interfaces), ip_version=ip_version)
            await asyncio.wait_for(self._azc.zeroconf.async_wait_for_start(), 5.0)
        except (OSError, RuntimeError, ValueError, asyncio.TimeoutError) as exc:
            await self._close_zeroconf()
            hint = " (is the interface up?)" if isinstance(exc, OSError) else ""
            raise TransportUnavailable(f"cannot join mDNS on {', '.join(self.interfaces)}: "
                                       f"{exc or type(exc).__name__}{hint}") from exc
        suffix = "." + service_type.lower()
        changes = {zeroconf.ServiceStateChange.Added: "added", zeroconf.ServiceStateChange.Updated: "updated",
                   zeroconf.ServiceStateChange.Removed: "removed"}

        def handler(zeroconf, service_type, name, state_change) -> None:  # zeroconf passes keywords
            if name.lower().endswith(suffix):
                on_change(changes[state_change], name[: -len(suffix)])

        self._browser = AsyncServiceBrowser(self._azc.zeroconf, [service_type], handlers=[handler],
                                            question_type=zeroconf.DNSQuestionType.QM)

    def _info_for(self, ad: ServiceAd):
        from zeroconf.asyncio import AsyncServiceInfo

        return AsyncServiceInfo(self._type, f"{ad.instance}.{self._type}", port=ad.port, properties=ad.txt,
                                server=f"{ad.instance}.local.",
                                parsed_addresses=[i.split("%")[0] for i in self.interfaces])

    async def announce(self, ad: ServiceAd) -> None:
        info = self._info_for(ad)
        if self._info is not None and self._info.name != info.name:
            await self.withdraw()
        if self._info is None:
            # The returned task finishes after probing and the announcements (about 1.5 s). The
            # info is kept from the start, so that a close meanwhile still sends the goodbye.
            self._info = info
            try:
                await (await self._azc.async_register_service(info, allow_name_change=False))
            except Exception:
                self._info = None
                raise
        else:
            await (await self._azc.async_update_service(info))
            self._info = info

    async def withdraw(self) -> None:
        info, self._info = self._info, None
        if info is not None and self._azc is not None:
            # Without the second await no goodbye is sent (docs/local-discovery.md).
            await (await self._azc.async_unregister_service(info))

    async def resolve(self, instance: str, timeout_s: float) -> ResolvedService | None:
        from zeroconf.asyncio import AsyncServiceInfo

        if self._azc is None:
            return None
        info = AsyncServiceInfo(self._type, f"{instance}.{self._type}")
        ok = await asyncio.wait_for(
            info.async_request(self._azc.zeroconf, timeout_s * 1000,
                               question_type=self._zc_module.DNSQuestionType.QM), timeout_s + 0.5)
        if not ok or info.port is None:
            return None
        return ResolvedService(instance, int(info.port), bytes(info.text or b""),
                               tuple(info.parsed_scoped_addresses()))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await asyncio.wait_for(self.withdraw(), GOODBYE_TIMEOUT_S)
        except Exception as exc:  # a goodbye that cannot go out must not stop the close
            _log.info("mDNS goodbye failed: %s", exc)
        if self._browser is not None:
            browser, self._browser = self._browser, None
            try:
                await browser.async_cancel()
            except Exception:
                _log.debug("cancelling the mDNS browser failed", exc_info=True)
        await self._close_zeroconf()

    async def _close_zeroconf(self) -> None:
        azc, self._azc = self._azc, None
        if azc is not None:
            try:
                await azc.async_close()
            except Exception:
                _log.debug("closing zeroconf failed", exc_info=True)


# --- the in-memory fake ----------------------------------------------------------------------------


class MemoryMdnsNetwork:
    """One simulated link for tests: every started transport sees every announcement (its own
    too, like zeroconf), on the next loop iteration. What a crashed node published stays
    visible (no goodbye: caches keep it until its TTL), exactly the case liveness checks exist
    for. :meth:`publish` / :meth:`unpublish` put arbitrary services on the link (malformed TXT,
    floods) as a hostile neighbour would."""

    def __init__(self) -> None:
        self.services: dict[str, ResolvedService] = {}
        self._transports: list[MemoryMdnsTransport] = []
        #: Instances whose resolution never answers (the resolve times out).
        self.silent: set[str] = set()
        #: Resolutions asked for, in order (to assert what the layer did).
        self.resolved: list[str] = []

    def transport(self, addresses: Sequence[str] = ("192.0.2.1",), *,
                  unavailable: str | None = None) -> "MemoryMdnsTransport":
        """A transport on this link whose services carry ``addresses``; with ``unavailable``
        its ``start`` raises :class:`TransportUnavailable` with that reason."""
        return MemoryMdnsTransport(self, tuple(addresses), unavailable)

    def publish(self, instance: str, *, txt: bytes, port: int = 9,
                addresses: Sequence[str] = ("192.0.2.99",)) -> None:
        """Put (or replace) a service on the link and tell every browser."""
        kind = "updated" if instance in self.services else "added"
        service = ResolvedService(instance, port, txt, tuple(addresses))
        if self.services.get(instance) == service:
            return
        self.services[instance] = service
        self._notify(kind, instance)

    def unpublish(self, instance: str) -> None:
        """The service says goodbye."""
        if self.services.pop(instance, None) is not None:
            self._notify("removed", instance)

    def _notify(self, kind: str, instance: str) -> None:
        for transport in list(self._transports):
            transport._deliver_soon(kind, instance)


class MemoryMdnsTransport(MdnsTransport):
    """A transport on a :class:`MemoryMdnsNetwork`."""

    def __init__(self, network: MemoryMdnsNetwork, addresses: tuple[str, ...],
                 unavailable: str | None) -> None:
        self.network = network
        self.interfaces = addresses
        self._unavailable = unavailable
        self._on_change: ChangeCallback | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._own: str | None = None
        self.announced: list[ServiceAd] = []
        self.closed = False

    async def start(self, service_type: str, on_change: ChangeCallback) -> None:
        if self._unavailable is not None:
            raise TransportUnavailable(self._unavailable)
        self._loop = asyncio.get_running_loop()
        self._on_change = on_change
        self.network._transports.append(self)
        for instance in list(self.network.services):  # what the cache of a fresh browser fills with
            self._deliver_soon("added", instance)

    def _deliver_soon(self, kind: str, instance: str) -> None:
        if self._on_change is not None and not self.closed:
            self._loop.call_soon(self._deliver, kind, instance)

    def _deliver(self, kind: str, instance: str) -> None:
        if self._on_change is not None and not self.closed:
            self._on_change(kind, instance)

    async def announce(self, ad: ServiceAd) -> None:
        if self._own is not None and self._own != ad.instance:
            await self.withdraw()
        self._own = ad.instance
        self.announced.append(ad)
        self.network.publish(ad.instance, txt=ad.txt, port=ad.port, addresses=self.interfaces)

    async def withdraw(self) -> None:
        own, self._own = self._own, None
        if own is not None:
            self.network.unpublish(own)

    async def resolve(self, instance: str, timeout_s: float) -> ResolvedService | None:
        self.network.resolved.append(instance)
        if instance in self.network.silent:
            await asyncio.sleep(timeout_s)
            return None
        await asyncio.sleep(0)
        return self.network.services.get(instance)

    async def close(self) -> None:
        if self.closed:
            return
        await self.withdraw()
        self._stop()

    def crash(self) -> None:
        """Stop as a killed process would: no goodbye, the service stays on the link."""
        self._own = None
        self._stop()

    def _stop(self) -> None:
        self.closed = True
        if self in self.network._transports:
            self.network._transports.remove(self)
