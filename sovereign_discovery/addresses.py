"""UDP addresses of peers (IPv4 and IPv6): parsing, text form, IP groups, and the binary encoding
shared by peer records and (later) wire messages.

Encoding of one address: ``kind (1 byte) || ip (4 or 16 bytes) || port (2 bytes, big-endian)``,
with kind ``0x04`` = UDP over IPv4 and ``0x06`` = UDP over IPv6. Any other kind is rejected, as are
port 0, unspecified (``0.0.0.0``, ``::``) and multicast addresses: a peer cannot be reached there.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Union

from .errors import ArgumentTypeError, ArgumentValueError, DecodeError

__all__ = ["Address", "IPAddress", "KIND_UDP4", "KIND_UDP6", "decode_address", "interned_address"]

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

KIND_UDP4 = 0x04
KIND_UDP6 = 0x06
_IP_BYTES = {KIND_UDP4: 4, KIND_UDP6: 16}


def _check_reachable(ip: IPAddress, port: int) -> str | None:
    if not 1 <= port <= 65535:
        return f"port must be in 1..65535, not {port}"
    if ip.is_unspecified:
        return f"unspecified address {ip} is not reachable"
    if ip.is_multicast:
        return f"multicast address {ip} is not a peer address"
    return None


@dataclass(frozen=True, slots=True)
class Address:
    """A reachable UDP endpoint. ``Address("192.0.2.1", 4000)``, ``Address.parse("[::1]:4000")``.

    An IPv6 address may carry a zone (``fe80::1%eth0``) for local use; such an address cannot be
    put in a record, since a zone means nothing on another machine.
    """

    ip: IPAddress
    port: int
    # Cached: addresses key the session and rate tables and are encoded into every NODES answer,
    # and ipaddress hashes through a hex string. The hash uses ints only, so it is the same in
    # every process (an Address may be pickled across processes).
    _hash: int = field(init=False, repr=False, compare=False)
    _encoded: bytes | None = field(init=False, repr=False, compare=False)
    _loopback: bool | None = field(init=False, repr=False, compare=False)

    def __init__(self, ip: IPAddress | str, port: int) -> None:
        if isinstance(ip, str):
            try:
                ip = ipaddress.ip_address(ip)
            except ValueError as exc:
                raise ArgumentValueError(f"ip: not an IP address: {ip!r}") from exc
        elif not isinstance(ip, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
            raise ArgumentTypeError(f"ip must be a str or an ipaddress address, not {type(ip).__name__}")
        if not isinstance(port, int) or isinstance(port, bool):
            raise ArgumentTypeError(f"port must be an int, not {type(port).__name__}")
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # one form per endpoint: ::ffff:a.b.c.d is a.b.c.d
        problem = _check_reachable(ip, port)
        if problem:
            raise ArgumentValueError(problem)
        _init(self, ip, port)

    def __hash__(self) -> int:
        return self._hash

    @classmethod
    def parse(cls, text: str) -> "Address":
        """Read ``host:port`` (IPv4) or ``[host]:port`` (IPv6). Names are not resolved here."""
        if not isinstance(text, str):
            raise ArgumentTypeError(f"address must be a str, not {type(text).__name__}")
        if text.startswith("["):
            host, sep, port = text[1:].partition("]:")
        else:
            host, sep, port = text.rpartition(":")
            if ":" in host:
                raise ArgumentValueError(f"address: write IPv6 as [host]:port, got {text!r}")
        if not sep or not host or not (port.isascii() and port.isdigit()):
            raise ArgumentValueError(f"address must look like HOST:PORT or [HOST]:PORT, got {text!r}")
        return cls(host, int(port))

    @property
    def version(self) -> int:
        return self.ip.version

    @property
    def is_loopback(self) -> bool:
        """Whether the IP is a loopback address (cached: ipaddress's check costs microseconds,
        and the engine asks for every request it admits)."""
        loopback = self._loopback
        if loopback is None:
            loopback = self.ip.is_loopback
            object.__setattr__(self, "_loopback", loopback)
        return loopback

    def ip_group(self, ipv4_prefix_bits: int = 24, ipv6_prefix_bits: int = 48) -> tuple[int, int]:
        """``(version, network)`` of the address's /24 (IPv4) or /48 (IPv6) by default: the unit
        for diversity limits (one operator rarely holds many such prefixes)."""
        bits = ipv4_prefix_bits if self.ip.version == 4 else ipv6_prefix_bits
        width = 32 if self.ip.version == 4 else 128
        return self.ip.version, int(self.ip) >> (width - bits)

    def to_tuple(self) -> tuple[str, int]:
        """``(host, port)`` as asyncio and socket calls take it."""
        return str(self.ip), self.port

    def __str__(self) -> str:
        return f"[{self.ip}]:{self.port}" if self.ip.version == 6 else f"{self.ip}:{self.port}"

    def encode(self) -> bytes:
        encoded = self._encoded
        if encoded is None:
            if isinstance(self.ip, ipaddress.IPv6Address) and self.ip.scope_id:
                raise ArgumentValueError(f"address {self} has a zone; zoned addresses are local only")
            kind = KIND_UDP4 if self.ip.version == 4 else KIND_UDP6
            encoded = bytes((kind,)) + self.ip.packed + self.port.to_bytes(2, "big")
            object.__setattr__(self, "_encoded", encoded)
        return encoded

    @property
    def encoded_size(self) -> int:
        return 1 + len(self.ip.packed) + 2


def _init(address: Address, ip: IPAddress, port: int) -> None:
    object.__setattr__(address, "ip", ip)
    object.__setattr__(address, "port", port)
    object.__setattr__(address, "_hash", hash((ip.version, int(ip), port)))
    object.__setattr__(address, "_encoded", None)
    object.__setattr__(address, "_loopback", None)


def _raw_problem(kind: int, raw: bytes, port: int) -> str | None:
    """The checks of ``_check_reachable`` (and the IPv4-mapped rule) on packed bytes: decoding
    runs for every contact of every NODES message, and ``ipaddress``'s properties cost
    microseconds each."""
    if port == 0:
        return "port must be in 1..65535, not 0"
    if not any(raw):
        return "unspecified address is not reachable"
    if kind == KIND_UDP4:
        if 224 <= raw[0] <= 239:
            return "multicast address is not a peer address"
    else:
        if raw[0] == 0xFF:
            return "multicast address is not a peer address"
        if raw[:12] == _V4_MAPPED_PREFIX:
            return "IPv4-mapped IPv6 address must be encoded as IPv4"
    return None


_V4_MAPPED_PREFIX = bytes(10) + b"\xff\xff"


def decode_address(data: bytes, offset: int) -> tuple[Address, int]:
    """Decode one address at ``data[offset:]``; returns it and the offset after it. Raises only
    :class:`DecodeError`."""
    if offset >= len(data):
        raise DecodeError("truncated address: missing kind")
    kind = data[offset]
    ip_bytes = _IP_BYTES.get(kind)
    if ip_bytes is None:
        raise DecodeError(f"unknown address kind 0x{kind:02x}")
    end = offset + 1 + ip_bytes + 2
    if end > len(data):
        raise DecodeError("truncated address")
    raw = bytes(data[offset + 1 : offset + 1 + ip_bytes])
    port = int.from_bytes(data[end - 2 : end], "big")
    problem = _raw_problem(kind, raw, port)
    if problem:
        raise DecodeError(problem)
    encoded = bytes(data[offset:end])
    address = _interned.get(encoded)
    if address is None:
        address = object.__new__(Address)  # checked above: skip the constructor's second pass
        _init(address, ipaddress.IPv4Address(raw) if kind == KIND_UDP4 else ipaddress.IPv6Address(raw), port)
        object.__setattr__(address, "_encoded", encoded)
        _intern(encoded, address)
    return address, end


# --- one Address object per endpoint -------------------------------------------------------------
#
# Every NODES answer, record and datagram source names addresses the process already holds (a
# node's table, sessions and record store name the same few hundred peers again and again, and a
# process hosting many nodes names them once per node). An Address is immutable, so equal ones
# can be the same object: decoding and the UDP endpoint hand out the interned one. The table is
# per process and bounded; when full it starts again (a miss costs one parse, nothing else).

#: Addresses interned per process (by their encoding) before the table starts again.
MAX_INTERNED_ADDRESSES = 4096
_interned: dict[bytes, Address] = {}


def _intern(encoded: bytes, address: Address) -> None:
    if len(_interned) >= MAX_INTERNED_ADDRESSES:
        _interned.clear()
    _interned[encoded] = address


def interned_address(address: Address) -> Address:
    """The process's one Address equal to ``address`` (``address`` itself, now interned, if
    there was none). A zoned IPv6 address, which has no encoding, is returned as it is."""
    try:
        encoded = address.encode()
    except ArgumentValueError:
        return address
    held = _interned.get(encoded)
    if held is None:
        _intern(encoded, address)
        return address
    return held
