"""Configuration: frozen, validated dataclasses, loaded from code, a TOML file and environment
variables (docs/configuration.md is the reference of every setting).

Shape::

    Config
      node       NodeConfig       key_file, cache_file, http, log_level
      bootstrap  BootstrapConfig  enabled, peers, fallback_peers, timeout_s, retries, backoff_*, jitter
      local      LocalConfig      mdns, bluetooth, scan_interval_s, service_name, mdns_interfaces,
                                  ble_adapter, rotating_token, token_rotation_s
      dht        DhtSettings      k, alpha, bucket_bits, record_ttl_s, lookup_timeout_s, record_quorum, listen_host, listen_port,
                                  advertised_address  (DhtSettings.to_dht_config() -> DhtConfig)

Every setting has one dotted name (``dht.k``), which is its TOML key (``k`` in the ``[dht]``
table), and one environment variable, ``SOVEREIGN_<SECTION>_<KEY>`` upper-cased
(``SOVEREIGN_DHT_K``). Sources, lowest precedence first, each replacing what the one before set
(lists are replaced, not merged)::

    defaults  <  TOML file  <  environment  <  explicit overrides (command-line flags)

:meth:`Config.load` applies them all; :meth:`Config.from_toml`, :meth:`Config.from_file`,
:meth:`Config.from_env`, :meth:`Config.from_dict` and :meth:`Config.with_overrides` apply one.
Constructing the dataclasses from code validates them too.

Errors. Every invalid input raises :class:`ConfigError` (a
:class:`~sovereign_discovery.errors.ArgumentValueError`, so a ``ValueError``); a value of the
wrong type raises its subclass :class:`ConfigTypeError` (also an ``ArgumentTypeError``, so a
``TypeError``). The message is one line naming the setting as the user wrote it (``dht.k``, prefixed
by the file, or ``SOVEREIGN_DHT_K``, or the command-line flag) and the bad value; the attributes
``setting``, ``value``, ``source``, ``line`` and ``column`` carry the same facts. Unknown TOML keys
and unknown ``SOVEREIGN_<SECTION>_*`` variables are errors (with a "did you mean"), never ignored.
Loading untrusted text raises nothing but :class:`ConfigError`, whatever the text.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import random
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar

from .addresses import Address
from .constants import (
    DEFAULT_BUCKET_SIZE,
    DEFAULT_PARALLELISM,
    DEFAULT_RECORD_TTL_S,
    MAX_BUCKET_BITS,
    MAX_BUCKET_SIZE,
    MAX_RECORD_LIFETIME_S,
)
from .errors import ArgumentTypeError, ArgumentValueError
from .node import DhtConfig
from .routing import Contact
from .records import check_capability

__all__ = [
    "Config",
    "NodeConfig",
    "BootstrapConfig",
    "LocalConfig",
    "DhtSettings",
    "HostPort",
    "Setting",
    "ConfigError",
    "ConfigTypeError",
    "all_settings",
    "env_var_name",
    "ENV_PREFIX",
    "CONFIG_FILE_ENV",
    "DEFAULT_SERVICE_NAME",
    "LOG_LEVELS",
    "MIN_RECORD_TTL_S",
]

#: Every setting's environment variable is ``ENV_PREFIX + SECTION + "_" + KEY``, upper-cased.
ENV_PREFIX = "SOVEREIGN_"
#: Names the TOML file :meth:`Config.load` reads when it is given no path.
CONFIG_FILE_ENV = "SOVEREIGN_CONFIG"
#: The DNS-SD service type of the local layer (DESIGN.md).
DEFAULT_SERVICE_NAME = "_sovereign._tcp.local."
#: Accepted ``node.log_level`` values (case-insensitive; stored upper-case).
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
#: The own record is republished at half its TTL (Kademlia §2.5), so a shorter TTL would have a
#: node re-storing its record at its k closest peers more often than every 5 s.
MIN_RECORD_TTL_S = 10.0

_UNSET: Any = object()
_MAX_SHOWN = 80  # characters of a bad value quoted in a message


# --- errors --------------------------------------------------------------------------------------


class ConfigError(ArgumentValueError):
    """A configuration value, key or file is invalid. ``setting`` is the name as the user wrote it
    (``"dht.k"``, ``"SOVEREIGN_DHT_K"``, a command-line flag; ``None`` for a file-level problem),
    ``value`` the offending value (``None`` if there is none), ``source`` where it came from (the
    file's path, ``"environment"``, ``"override"``, or ``None`` for code), and ``line``/``column``
    the 1-based position of a TOML syntax error."""

    def __init__(self, message: str, *, setting: str | None = None, value: object = None,
                 source: str | None = None, line: int | None = None, column: int | None = None) -> None:
        super().__init__(message)
        self.setting = setting
        self.value = value
        self.source = source
        self.line = line
        self.column = column


class ConfigTypeError(ConfigError, ArgumentTypeError):
    """A configuration value has the wrong type (a string where a number belongs, …). Also a
    ``TypeError``; catch :class:`ConfigError` for every configuration problem."""


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 3] + "..."


@dataclass(frozen=True, slots=True)
class _Where:
    """Where a value came from, to name it in an error."""

    setting: str  # as the user wrote it: "dht.k", "SOVEREIGN_DHT_K", "--listen"
    source: str | None = None  # file path, "environment", "override"; None for code
    in_file: bool = False  # prefix messages with the file path
    base_dir: Path | None = None  # relative paths in a file are relative to the file

    def error(self, problem: str, value: object = _UNSET,
              cls: type[ConfigError] = ConfigError) -> ConfigError:
        prefix = f"{self.source}: " if self.in_file else ""
        got = "" if value is _UNSET else f", got {_show(value)}"
        return cls(f"{prefix}{self.setting}: {problem}{got}", setting=self.setting,
                   value=None if value is _UNSET else value, source=self.source)

    def type_error(self, expected: str, value: object) -> ConfigError:
        return self.error(f"must be {expected}, not {_type_name(value)}", value, ConfigTypeError)


def _type_name(value: object) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a float", str: "a string", list: "an array",
             tuple: "an array", dict: "a table"}
    return names.get(type(value)) or ("a table" if isinstance(value, Mapping) else type(value).__name__)


def _key_text(key: str) -> str:
    """A TOML key or variable name as it can appear in a one-line message: bare if it is a bare
    key, else quoted with escapes; cut to 60 characters."""
    shown = key if re.fullmatch(r"[A-Za-z0-9_.-]{1,60}", key, re.ASCII) else _toml_string(key)
    return shown if len(shown) <= 60 else shown[:57] + "..."


def _check_text(text: str, where: _Where) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise where.error("is not valid Unicode text (it holds a lone surrogate)", text) from None
    if "\x00" in text:
        raise where.error("must not contain a NUL character", text)
    return text


# --- value specifications --------------------------------------------------------------------------


class _Spec:
    """How one setting is read from a native value (code, TOML) and from text (environment),
    checked, and written back (TOML-native, ``None`` for unset)."""

    kind = ""  # the type and range, for docs

    def native(self, value: object, where: _Where) -> object:
        raise NotImplementedError

    def text(self, raw: str, where: _Where) -> object:
        raw = raw.strip()
        if not raw:
            return self.empty(where)
        return self.parse_text(raw, where)

    def parse_text(self, raw: str, where: _Where) -> object:
        return self.native(raw, where)

    def empty(self, where: _Where) -> object:
        raise where.error("is empty; unset it to use the default", "")

    def export(self, value: object) -> object:
        return value


class _Bool(_Spec):
    kind = "boolean"
    _WORDS = {"1": True, "true": True, "yes": True, "on": True,
              "0": False, "false": False, "no": False, "off": False}

    def native(self, value, where):
        if not isinstance(value, bool):
            raise where.type_error("a boolean (true or false)", value)
        return value

    def parse_text(self, raw, where):
        try:
            return self._WORDS[raw.lower()]
        except KeyError:
            raise where.error("must be a boolean: 1/0, true/false, yes/no or on/off", raw) from None


class _Int(_Spec):
    def __init__(self, low: int, high: int) -> None:
        self.low, self.high = low, high
        self.kind = f"integer, {low}..{high}"

    def native(self, value, where, shown: object = _UNSET):
        if isinstance(value, bool) or not isinstance(value, int):
            raise where.type_error("an integer", value)
        if not self.low <= value <= self.high:
            raise where.error(f"must be in {self.low}..{self.high}", value if shown is _UNSET else shown)
        return value

    def parse_text(self, raw, where):
        if not re.fullmatch(r"[+-]?[0-9]+", raw):
            raise where.error("must be an integer", raw)
        if len(raw.lstrip("+-").lstrip("0")) > 18:
            raise where.error(f"must be in {self.low}..{self.high}", raw)
        return self.native(int(raw), where, raw)


_FLOAT_TEXT = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?")


class _Float(_Spec):
    """A finite number in ``[low, high]`` (``low`` excluded when ``open_low``)."""

    def __init__(self, low: float, high: float = math.inf, *, open_low: bool = False,
                 unit: str = "") -> None:
        self.low, self.high, self.open_low = low, high, open_low
        lower = f"> {low:g}" if open_low else f">= {low:g}"
        upper = "" if high == math.inf else f" and <= {high:g}"
        self.range = f"{lower}{upper}"
        self.kind = f"{unit or 'number'}, {self.range}, finite"

    def native(self, value, where, shown: object = _UNSET):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise where.type_error("a number", value)
        shown = value if shown is _UNSET else shown
        if isinstance(value, int) and abs(value) > 10**300:
            raise where.error(f"must be {self.range}", shown)
        number = float(value)
        if not math.isfinite(number):
            raise where.error("must be a finite number", shown)
        too_low = number <= self.low if self.open_low else number < self.low
        if too_low or number > self.high:
            raise where.error(f"must be {self.range}", shown)
        return number

    def parse_text(self, raw, where):
        if not _FLOAT_TEXT.fullmatch(raw):
            raise where.error("must be a number", raw)
        return self.native(float(raw), where, raw)  # an overflow becomes inf: "must be finite"


class _Text(_Spec):
    def __init__(self, check: Callable[[str], str | None], kind: str) -> None:
        self.check, self.kind = check, kind

    def native(self, value, where):
        if not isinstance(value, str):
            raise where.type_error("a string", value)
        _check_text(value, where)
        problem = self.check(value)
        if problem:
            raise where.error(problem, value)
        return value


class _Choice(_Spec):
    def __init__(self, choices: tuple[str, ...]) -> None:
        self.choices = choices
        self.kind = "one of " + ", ".join(choices) + " (any case)"

    def native(self, value, where):
        if not isinstance(value, str):
            raise where.type_error("a string", value)
        if not value.isascii() or value.upper() not in self.choices:
            raise where.error("must be one of " + ", ".join(self.choices), value)
        return value.upper()


class _Optional(_Spec):
    """``None`` (code), or an empty string (TOML, environment), means unset."""

    def __init__(self, inner: _Spec) -> None:
        self.inner = inner
        self.kind = inner.kind + "; empty = not set"

    def native(self, value, where):
        if value is None or value == "":
            return None
        return self.inner.native(value, where)

    def parse_text(self, raw, where):
        return self.inner.parse_text(raw, where)

    def empty(self, where):
        return None

    def export(self, value):
        return None if value is None else self.inner.export(value)


class _PathSpec(_Spec):
    kind = "path (~ expanded; relative paths in a file are relative to the file's directory)"

    def native(self, value, where):
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not isinstance(value, str):
            raise where.type_error("a path string", value)
        _check_text(value, where)
        path = Path(os.path.expanduser(value))
        if where.base_dir is not None and not path.is_absolute():
            path = where.base_dir / path
        return path

    def export(self, value):
        return str(value)


class _HostPortSpec(_Spec):
    kind = "HOST:PORT, [IPv6]:PORT or PORT (127.0.0.1), port 0..65535"

    def native(self, value, where):
        if isinstance(value, HostPort):
            return value
        if not isinstance(value, str):
            raise where.type_error("a string HOST:PORT", value)
        return HostPort.parse(value, setting=where.setting, _where=where)

    def export(self, value):
        return str(value)


class _AddressSpec(_Spec):
    kind = "HOST:PORT or [IPv6]:PORT, an IP address (no name) and port 1..65535"

    def native(self, value, where):
        if isinstance(value, Address):
            return value
        if not isinstance(value, str):
            raise where.type_error("a string IP:PORT", value)
        _check_text(value, where)
        if not value.isascii():
            raise where.error("must be ASCII IP:PORT", value)
        try:
            return Address.parse(value.strip())
        except (ArgumentValueError, ArgumentTypeError, ValueError) as exc:
            raise where.error(f"is not a reachable IP:PORT address ({exc})", value) from None

    def export(self, value):
        return str(value)


class _List(_Spec):
    """A list: a TOML array, or comma-separated text in the environment."""

    def __init__(self, item: Callable[[object, _Where, int], object],
                 export_item: Callable[[Any], object], kind: str, *,
                 check_all: Callable[[tuple, _Where], None] | None = None,
                 single_str: bool = False) -> None:
        self.item, self.export_item, self.kind = item, export_item, kind
        self.check_all, self.single_str = check_all, single_str

    def native(self, value, where):
        if self.single_str and isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise where.type_error("an array", value)
        items = tuple(self.item(v, where, n) for n, v in enumerate(value, 1))
        if self.check_all:
            self.check_all(items, where)
        return items

    def parse_text(self, raw, where):
        parts = [part.strip() for part in raw.split(",")]
        for n, part in enumerate(parts, 1):
            if not part:
                raise where.error(f"entry {n} of the comma-separated list is empty", raw)
        return self.native(parts, where)

    def empty(self, where):
        return self.native([], where)

    def export(self, value):
        return [self.export_item(v) for v in value]


def _contact_item(value: object, where: _Where, n: int) -> Contact:
    if isinstance(value, Contact):
        return value
    if not isinstance(value, str):
        raise where.type_error(f"an array of strings PUBLIC_KEY@HOST:PORT (entry {n} is not)", value)
    _check_text(value, where)
    if not value.isascii():
        raise where.error(f"entry {n} is not a pinned contact PUBLIC_KEY@HOST:PORT"
                          " (non-ASCII characters)", value)
    try:
        return Contact.parse(value.strip())
    except (ArgumentValueError, ArgumentTypeError, ValueError) as exc:
        raise where.error(f"entry {n} is not a pinned contact PUBLIC_KEY@HOST:PORT ({exc})",
                          value) from None


def _ip_item(value: object, where: _Where, n: int) -> str:
    if not isinstance(value, str):
        raise where.type_error(f"an array of IP address strings (entry {n} is not)", value)
    _check_text(value, where)
    if not value.isprintable() or any(c.isspace() for c in value):
        raise where.error(f"entry {n} is not an IP address", value)
    try:
        ip = ipaddress.ip_address(value)
    except ValueError:
        raise where.error(f"entry {n} is not an IP address (names are not resolved)", value) from None
    if ip.is_multicast:
        raise where.error(f"entry {n} is a multicast address", value)
    return str(ip)


def _capability_item(value: object, where: _Where, n: int) -> str:
    if not isinstance(value, str):
        raise where.type_error(f"an array of capability names (entry {n} is not)", value)
    try:
        return check_capability(value)
    except (ArgumentValueError, ArgumentTypeError) as exc:
        raise where.error(f"entry {n} is not a capability name ({exc})", value) from None


def _check_listen_hosts(hosts: tuple, where: _Where) -> None:
    if not hosts:
        raise where.error("needs at least one address to bind (0.0.0.0 or :: for every interface)", [])
    versions = [ipaddress.ip_address(h).version for h in hosts]
    if len(set(versions)) != len(versions):
        raise where.error("takes at most one address per family (one IPv4, one IPv6)", list(hosts))


def _check_unique(items: tuple, where: _Where) -> None:
    if len(set(items)) != len(items):
        raise where.error("lists an address twice", list(items))


_SERVICE_LABEL = re.compile(r"_([A-Za-z0-9-]{1,15})\._(tcp|udp)\.local\.", re.ASCII)


def _service_problem(text: str) -> str | None:
    # RFC 6763 §7 and §7.2: _<name>._tcp|_udp.local., the name 1..15 letters, digits and hyphens,
    # starting and ending with a letter or digit, with no double hyphen and at least one letter.
    match = _SERVICE_LABEL.fullmatch(text)
    name = match.group(1) if match else ""
    if (not match or name[0] == "-" or name[-1] == "-" or "--" in name
            or not any(c.isalpha() for c in name)):
        return ("must be a DNS-SD service type _NAME._tcp.local. or _NAME._udp.local. "
                "(NAME: 1..15 letters, digits, inner hyphens)")
    return None


def _adapter_problem(text: str) -> str | None:
    if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", text, re.ASCII):
        return "must be an adapter name such as hci0 (1..64 letters, digits, _ . : -)"
    return None


# --- HostPort ------------------------------------------------------------------------------------


_HOSTNAME = re.compile(r"(?=.{1,253}\Z)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)"
                       r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?", re.ASCII)


def _host_problem(host: str) -> str | None:
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    if not _HOSTNAME.fullmatch(host) or host.rstrip(".").rsplit(".", 1)[-1].isdigit():
        return "host must be an IP address or a host name"
    return None


@dataclass(frozen=True, slots=True)
class HostPort:
    """A host (IP address or name) and a port 0..65535 to bind, e.g. the HTTP status endpoint.
    Unlike :class:`~sovereign_discovery.addresses.Address` it allows port 0 (any free port), names
    and wildcards. ``str()`` gives ``host:port`` (``[host]:port`` for IPv6), which :meth:`parse`
    reads."""

    host: str
    port: int

    def __post_init__(self) -> None:
        where = _Where("address")
        if not isinstance(self.host, str):
            raise where.type_error("a host string", self.host)
        if isinstance(self.port, bool) or not isinstance(self.port, int):
            raise where.type_error("an integer port", self.port)
        problem = _host_problem(self.host)
        if problem:
            raise where.error(problem, self.host)
        if not 0 <= self.port <= 65535:
            raise where.error("port must be in 0..65535", self.port)

    @classmethod
    def parse(cls, text: str, *, setting: str = "address", _where: _Where | None = None) -> "HostPort":
        """Read ``HOST:PORT``, ``[IPv6]:PORT``, or ``PORT`` alone (meaning ``127.0.0.1:PORT``).
        Raises :class:`ConfigError` naming ``setting`` (e.g. ``"--http"``)."""
        where = _where or _Where(setting)
        if not isinstance(text, str):
            raise where.type_error("a string HOST:PORT", text)
        _check_text(text, where)
        raw = text.strip()
        if raw.startswith("["):
            host, sep, port = raw[1:].partition("]:")
            if not sep:
                raise where.error("must look like [IPv6]:PORT", text)
        elif raw.count(":") > 1:
            raise where.error("write an IPv6 address as [HOST]:PORT", text)
        elif ":" in raw:
            host, _, port = raw.partition(":")
        else:
            host, port = "127.0.0.1", raw
        if not re.fullmatch(r"[0-9]{1,5}", port) or int(port) > 65535:
            raise where.error("must be HOST:PORT with a port in 0..65535", text)
        problem = _host_problem(host) if host.isascii() else "host must be an IP address or a host name"
        if problem:
            raise where.error(problem, text)
        if raw.startswith("[") and ":" not in host:
            raise where.error("brackets are for IPv6 addresses", text)
        return cls(host, int(port))

    def to_tuple(self) -> tuple[str, int]:
        """``(host, port)`` as asyncio and socket calls take it."""
        return self.host, self.port

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


# --- the sections --------------------------------------------------------------------------------


def _setting(default: object, spec: _Spec, doc: str) -> Any:
    return field(default=default, metadata={"spec": spec, "doc": doc})


def _validate(section: Any) -> None:
    for f in fields(section):
        where = _Where(f"{section.SECTION}.{f.name}")
        object.__setattr__(section, f.name, f.metadata["spec"].native(getattr(section, f.name), where))


def _to_dict(section: Any) -> dict[str, object]:
    return {f.name: f.metadata["spec"].export(getattr(section, f.name)) for f in fields(section)}


_SECONDS = _Float(0.0, open_low=True, unit="seconds")


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeConfig:
    """Node-level settings the command-line tool needs (TOML table ``[node]``)."""

    SECTION: ClassVar[str] = "node"

    key_file: Path | None = _setting(None, _Optional(_PathSpec()), (
        "The node's Ed25519 private key file (created by `sovereign-discovery keygen`; mode 0600, "
        "a group- or world-readable file is refused). Not set: the CLI requires `--key`."))
    cache_file: Path | None = _setting(None, _Optional(_PathSpec()), (
        "SQLite peer cache: verified records of peers seen, re-seeding the routing table on restart. "
        "Not set: no cache (the node forgets its peers when it stops)."))
    http: HostPort | None = _setting(None, _Optional(_HostPortSpec()), (
        "Address of the HTTP status endpoint (/peers, /stats, /metrics, /healthz). A bare PORT "
        "binds 127.0.0.1. Not set: no endpoint."))
    log_level: str = _setting("INFO", _Choice(LOG_LEVELS), "Logging threshold of the command-line tool.")
    capabilities: tuple[str, ...] = _setting((), _List(
        _capability_item, str, "list of capability names", check_all=_check_unique), (
        "Capabilities the node announces (its record lists them; others find it with "
        "`find --capability`)."))

    def __post_init__(self) -> None:
        _validate(self)

    def to_dict(self) -> dict[str, object]:
        return _to_dict(self)


@dataclass(frozen=True, slots=True, kw_only=True)
class BootstrapConfig:
    """The pinned-key bootstrap layer (TOML table ``[bootstrap]``).

    Intended use by the bootstrap layer: a round contacts every peer of ``peers`` in parallel,
    each given ``timeout_s`` to prove its pinned key and answer. If none does, the round is repeated
    up to ``retries`` more times, waiting :meth:`backoff_delay` before each; then the same with
    ``fallback_peers``; then the node carries on from its peer cache. With no peers at all the
    node is a bootstrap node."""

    SECTION: ClassVar[str] = "bootstrap"

    enabled: bool = _setting(True, _Bool(), "Run the bootstrap layer.")
    peers: tuple[Contact, ...] = _setting((), _List(
        _contact_item, lambda c: c.pinned, "list of pinned contacts PUBLIC_KEY@HOST:PORT"), (
        "Bootstrap peers, each pinned by its public key: `<public key>@<host>:<port>` "
        "(`[IPv6]:port`; IP addresses only, names are not resolved). Contacted in parallel. "
        "Empty: this is a bootstrap node."))
    fallback_peers: tuple[Contact, ...] = _setting((), _List(
        _contact_item, lambda c: c.pinned, "list of pinned contacts PUBLIC_KEY@HOST:PORT"),
        "Tried, the same way, once every round with `peers` has failed.")
    timeout_s: float = _setting(5.0, _SECONDS,
                                "How long one attempt waits for a bootstrap peer to prove its key"
                                " and answer.")
    retries: int = _setting(5, _Int(0, 100),
                            "Further rounds after a first round in which no peer answered.")
    backoff_initial_s: float = _setting(1.0, _SECONDS, "Wait before the first retry.")
    backoff_max_s: float = _setting(60.0, _SECONDS,
                                    "Longest wait between retries; must be >= backoff_initial_s.")
    backoff_multiplier: float = _setting(2.0, _Float(1.0, 1000.0),
                                         "Each retry waits this many times longer than the one before.")
    jitter: float = _setting(0.5, _Float(0.0, 1.0), (
        "Random fraction taken off each wait (0: none; 1: \"full jitter\", anywhere between 0 and "
        "the wait), so that nodes restarted together do not retry in lockstep."))

    def __post_init__(self) -> None:
        _validate(self)
        _check_backoff(self.backoff_initial_s, self.backoff_max_s,
                       _Where("bootstrap.backoff_max_s"), "bootstrap.backoff_initial_s")

    def backoff_delay(self, retry: int, rng: random.Random | None = None) -> float:
        """Seconds to wait before retry number ``retry`` (1 = the first retry):
        ``min(backoff_max_s, backoff_initial_s * backoff_multiplier ** (retry - 1))``, less a
        random fraction ``jitter * rng.random()`` of it (no jitter when ``rng`` is None)."""
        if isinstance(retry, bool) or not isinstance(retry, int):
            raise ArgumentTypeError(f"retry must be an int, not {type(retry).__name__}")
        if retry < 1:
            raise ArgumentValueError(f"retry must be >= 1, not {retry}")
        if rng is not None and not isinstance(rng, random.Random):
            raise ArgumentTypeError(f"rng must be a random.Random, not {type(rng).__name__}")
        growth = (retry - 1) * math.log(self.backoff_multiplier)
        if growth >= math.log(self.backoff_max_s / self.backoff_initial_s):
            delay = self.backoff_max_s
        else:
            growth_factor = self.backoff_multiplier ** (retry - 1)
            delay = min(self.backoff_max_s, self.backoff_initial_s * growth_factor)
        if rng is not None:
            delay *= 1.0 - self.jitter * rng.random()
        return delay

    def to_dict(self) -> dict[str, object]:
        return _to_dict(self)


def _check_backoff(initial: float, maximum: float, where_max: _Where, initial_name: str) -> None:
    if maximum < initial:
        raise where_max.error(f"must be >= {initial_name} ({initial:g})", maximum)


@dataclass(frozen=True, slots=True, kw_only=True)
class LocalConfig:
    """The local layer: mDNS/DNS-SD and Bluetooth LE (TOML table ``[local]``)."""

    SECTION: ClassVar[str] = "local"

    mdns: bool = _setting(True, _Bool(), (
        "Announce and browse the DNS-SD service on the local network (python-zeroconf)."))
    bluetooth: bool = _setting(True, _Bool(), (
        "Advertise and scan over Bluetooth LE (bleak). Without bleak or an adapter the layer "
        "reports why and the other layers keep running."))
    scan_interval_s: float = _setting(10.0, _SECONDS, (
        "How often the local layer processes BLE scan results (mDNS queries follow RFC 6762's "
        "schedule)."))
    liveness_interval_s: float = _setting(10.0, _SECONDS, (
        "A local peer that stops answering authenticated PINGs is reported lost within this "
        "time (a crashed peer sends no goodbye, and its mDNS records live for minutes)."))
    service_name: str = _setting(DEFAULT_SERVICE_NAME, _Text(_service_problem, "DNS-SD service type"),
                                 "DNS-SD service type announced and browsed.")
    mdns_interfaces: tuple[str, ...] = _setting((), _List(
        _ip_item, str, "list of IP addresses", check_all=_check_unique), (
        "IP addresses of the interfaces mDNS runs on. Empty: every interface with a private or "
        "link-local IPv4 address (never loopback or a public address), logged at warning."))
    ble_adapter: str | None = _setting(None, _Optional(_Text(_adapter_problem, "adapter name")),
                                       "Bluetooth adapter (BlueZ name such as hci0). Not set: the"
                                       " system default.")
    rotating_token: bool = _setting(False, _Bool(), (
        "Advertise a rotating token instead of a fixed short hash of the peer ID over BLE, so a "
        "passive observer cannot track the device; peers then fetch the signed record to learn who"
        " it is."))
    token_rotation_s: float = _setting(900.0, _SECONDS, (
        "How often the rotating BLE token changes (with rotating_token)."))

    def __post_init__(self) -> None:
        _validate(self)

    def to_dict(self) -> dict[str, object]:
        return _to_dict(self)


@dataclass(frozen=True, slots=True, kw_only=True)
class DhtSettings:
    """The Kademlia DHT layer (TOML table ``[dht]``). Not named ``DhtConfig``: that is the
    engine's full settings object, which :meth:`to_dht_config` produces."""

    SECTION: ClassVar[str] = "dht"

    enabled: bool = _setting(True, _Bool(), (
        "Take part in the DHT: announce the own record, look up peers the table does not hold, "
        "list routing-table peers. Off: the node only answers, and finds peers through the "
        "bootstrap and local layers."))
    k: int = _setting(DEFAULT_BUCKET_SIZE, _Int(1, MAX_BUCKET_SIZE),
                      "Kademlia's k (paper §2.2): bucket size, and how many closest peers a lookup"
                      " seeks and a record is stored at.")
    alpha: int = _setting(DEFAULT_PARALLELISM, _Int(1, MAX_BUCKET_SIZE),
                          "Kademlia's α (paper §2.3): lookup requests in flight.")
    bucket_bits: int = _setting(1, _Int(1, MAX_BUCKET_BITS), (
        "Kademlia's b (paper §4.2): bits of the target gained per routing step. b > 1 keeps a "
        "bucket per value of the bits after each shared prefix up to its b-bit digit: a larger "
        "table, fewer lookup rounds."))
    record_ttl_s: float = _setting(float(DEFAULT_RECORD_TTL_S), _Float(
        MIN_RECORD_TTL_S, MAX_RECORD_LIFETIME_S, unit="seconds"), (
        "Lifetime of the node's own signed record; it is republished at half of it. At most a "
        "week: peers refuse records that claim to live longer."))
    lookup_timeout_s: float = _setting(10.0, _SECONDS, "Overall deadline of one lookup.")
    record_quorum: int = _setting(1, _Int(0, MAX_BUCKET_SIZE), (
        "A record lookup ends once this many valid records are in hand (the node's own stored "
        "copy counting as one), the highest seq winning; the owner's own answer ends it at once. "
        "1: the first valid record (Kademlia §2.3); 0: run until the k closest have answered."))
    listen_host: tuple[str, ...] = _setting(("127.0.0.1",), _List(
        _ip_item, str, "IP address, or list of at most one IPv4 and one IPv6 address",
        check_all=_check_listen_hosts, single_str=True), (
        "IP address(es) the UDP socket(s) bind: one, or one per family for dual stack. "
        "0.0.0.0 / :: bind every interface."))
    listen_port: int = _setting(0, _Int(0, 65535), (
        "UDP port to bind; 0 lets the system choose. A bootstrap node needs a fixed one."))
    advertised_address: Address | None = _setting(None, _Optional(_AddressSpec()), (
        "The address the signed record gives to others (a forwarded port, a public address). "
        "Not set: the bound address, or the one the node's peers report."))

    def __post_init__(self) -> None:
        _validate(self)

    def to_dht_config(self, base: DhtConfig | None = None) -> DhtConfig:
        """The engine's :class:`~sovereign_discovery.node.DhtConfig`: ``base`` (default
        ``DhtConfig()``) with bucket_size = k, parallelism = alpha, bucket_bits, record_ttl_s,
        lookup_deadline_s = lookup_timeout_s and record_quorum."""
        if base is not None and not isinstance(base, DhtConfig):
            raise ArgumentTypeError(f"base must be a DhtConfig, not {type(base).__name__}")
        return replace(base or DhtConfig(), bucket_size=self.k, parallelism=self.alpha,
                       bucket_bits=self.bucket_bits, record_ttl_s=self.record_ttl_s, lookup_deadline_s=self.lookup_timeout_s,
                       record_quorum=self.record_quorum)

    def dht_node_kwargs(self, base: DhtConfig | None = None) -> dict[str, object]:
        """Keyword arguments for :class:`~sovereign_discovery.aio.DhtNode`: ``host``, ``port``,
        ``config`` and ``advertised_address``."""
        host: object = self.listen_host[0] if len(self.listen_host) == 1 else self.listen_host
        return {"host": host, "port": self.listen_port, "config": self.to_dht_config(base),
                "advertised_address": self.advertised_address}

    def to_dict(self) -> dict[str, object]:
        return _to_dict(self)


_SECTIONS: dict[str, type] = {"node": NodeConfig, "bootstrap": BootstrapConfig, "local": LocalConfig,
                              "dht": DhtSettings}


def env_var_name(setting: str) -> str:
    """The environment variable of a dotted setting: ``"dht.k"`` -> ``"SOVEREIGN_DHT_K"``."""
    return ENV_PREFIX + setting.replace(".", "_").upper()


def _specs() -> dict[str, _Spec]:
    return {f"{name}.{f.name}": f.metadata["spec"]
            for name, cls in _SECTIONS.items() for f in fields(cls)}


_SPECS = _specs()
_ENV_NAMES = {env_var_name(path): path for path in _SPECS}


@dataclass(frozen=True, slots=True)
class Setting:
    """One setting, for references and ``--help`` texts: its dotted TOML name, environment
    variable, type and range, default (as TOML writes it; ``None`` = not set) and meaning."""

    name: str
    env_var: str
    kind: str
    default: object
    doc: str


def all_settings() -> tuple[Setting, ...]:
    """Every setting, in section and field order."""
    out = []
    for section, cls in _SECTIONS.items():
        for f in fields(cls):
            name = f"{section}.{f.name}"
            spec = f.metadata["spec"]
            out.append(Setting(name, env_var_name(name), spec.kind, spec.export(f.default),
                               f.metadata["doc"]))
    return tuple(out)


# --- the whole configuration -------------------------------------------------------------------------


# Working state while layering sources: dotted name -> (normalised value, where it was set).
_State = dict[str, tuple[object, _Where]]


def _suggest(path: str) -> str:
    match = difflib.get_close_matches(path, list(_SPECS), n=1, cutoff=0.6)
    if not match:
        key = path.rpartition(".")[2]
        by_key = {p.rpartition(".")[2]: p for p in _SPECS}
        close = difflib.get_close_matches(key, list(by_key), n=1, cutoff=0.75)
        match = [by_key[close[0]]] if close else []
    return f" (did you mean {match[0]}?)" if match else ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """The whole configuration: one frozen, validated object per section. See the module
    docstring for the sources and their precedence, and docs/configuration.md."""

    node: NodeConfig = field(default_factory=NodeConfig)
    bootstrap: BootstrapConfig = field(default_factory=BootstrapConfig)
    local: LocalConfig = field(default_factory=LocalConfig)
    dht: DhtSettings = field(default_factory=DhtSettings)

    def __post_init__(self) -> None:
        for name, cls in _SECTIONS.items():
            value = getattr(self, name)
            if not isinstance(value, cls):
                raise _Where(name).type_error(f"a {cls.__name__}", value)

    # --- loading ---------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, *, environ: Mapping[str, str] | None = None,
             overrides: Mapping[str, object] | None = None,
             override_names: Mapping[str, str] | None = None) -> "Config":
        """Defaults < the TOML file at ``path`` < ``environ`` < ``overrides``.

        ``path`` None: the file named by ``SOVEREIGN_CONFIG`` in ``environ``, if set; else no file.
        ``environ`` None: ``os.environ`` (pass ``{}`` to ignore the environment). ``overrides``
        maps dotted names to values as :meth:`with_overrides` takes them; ``override_names`` says
        how the user wrote each (``{"bootstrap.peers": "--bootstrap"}``), for error messages."""
        env = os.environ if environ is None else environ
        if not isinstance(env, Mapping):
            raise _Where("environ").type_error("a mapping", env)
        from_env = False
        if path is None and env.get(CONFIG_FILE_ENV, "").strip():
            path, from_env = env[CONFIG_FILE_ENV].strip(), True
        state = cls()._state()
        if path is not None:
            _file_layer(path, state, via=CONFIG_FILE_ENV if from_env else None)
        _env_layer(env, state)
        if overrides:
            _override_layer(overrides, override_names or {}, state)
        return _build(state)

    @classmethod
    def from_toml(cls, text: str, *, source: str = "<toml>",
                  base_dir: str | os.PathLike | None = None) -> "Config":
        """Defaults < the TOML document ``text``. ``source`` names it in errors; relative paths
        in it are taken relative to ``base_dir`` (None: kept relative, i.e. to the working
        directory)."""
        state = cls()._state()
        _toml_layer(text, source, None if base_dir is None else Path(base_dir), state)
        return _build(state)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Config":
        """Defaults < the TOML file ``path`` (UTF-8). Relative paths in it are relative to its
        directory."""
        state = cls()._state()
        _file_layer(path, state)
        return _build(state)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Config":
        """Defaults < the ``SOVEREIGN_<SECTION>_<KEY>`` variables of ``environ`` (None:
        ``os.environ``)."""
        state = cls()._state()
        _env_layer(os.environ if environ is None else environ, state)
        return _build(state)

    @classmethod
    def from_dict(cls, data: Mapping[str, object], *, source: str | None = None) -> "Config":
        """Defaults < ``data``, shaped like the TOML document (``{"dht": {"k": 20}}``) or
        :meth:`to_dict`'s output (``None`` = not set)."""
        state = cls()._state()
        _mapping_layer(data, _Where("", source, in_file=source is not None), state)
        return _build(state)

    def with_overrides(self, overrides: Mapping[str, object], *,
                       names: Mapping[str, str] | None = None) -> "Config":
        """A copy with ``overrides`` applied on top: dotted name -> value. A ``str`` is read like
        an environment variable's text (so a flag's text can be passed as is: ``"8"``, ``"off"``,
        ``"pk@host:port,pk@host:port"``); any other value like a TOML value (``8``, ``False``,
        a list). ``names`` maps a dotted name to how the user wrote it, e.g. ``"--bootstrap"``."""
        state = self._state()
        _override_layer(overrides, names or {}, state)
        return _build(state)

    # --- export ----------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, dict[str, object]]:
        """The effective configuration as TOML/JSON-ready values: ``{section: {key: value}}``,
        pinned contacts and addresses as text, paths as strings, ``None`` for a setting not set.
        :meth:`from_dict` reads it back."""
        return {name: getattr(self, name).to_dict() for name in _SECTIONS}

    def to_toml(self) -> str:
        """The effective configuration as a TOML document that :meth:`from_toml` reads back to an
        equal ``Config`` (a setting not set is written as ``""``)."""
        lines: list[str] = []
        for section, values in self.to_dict().items():
            if lines:
                lines.append("")
            lines.append(f"[{section}]")
            for key, value in values.items():
                lines.append(f"{key} = {_toml_value('' if value is None else value)}")
        return "\n".join(lines) + "\n"

    def _state(self) -> _State:
        return {f"{s}.{f.name}": (getattr(getattr(self, s), f.name), _Where(f"{s}.{f.name}"))
                for s, cls in _SECTIONS.items() for f in fields(cls)}


def _build(state: _State) -> Config:
    value = {path: v for path, (v, _) in state.items()}
    _check_backoff(value["bootstrap.backoff_initial_s"], value["bootstrap.backoff_max_s"],
                   state["bootstrap.backoff_max_s"][1], state["bootstrap.backoff_initial_s"][1].setting)
    sections = {}
    for name, cls in _SECTIONS.items():
        sections[name] = cls(**{f.name: value[f"{name}.{f.name}"] for f in fields(cls)})
    return Config(**sections)


# --- the sources ---------------------------------------------------------------------------------


def _file_layer(path: str | os.PathLike, state: _State, via: str | None = None) -> None:
    where = _Where(via or "config file", via)
    if not isinstance(path, (str, os.PathLike)):
        raise where.type_error("a path", path)
    shown = os.fspath(path)
    if isinstance(shown, bytes):
        raise where.type_error("a str path", path)
    origin = f" (named by {via})" if via else ""
    try:
        with open(shown, "rb") as f:
            data = f.read()
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"cannot read configuration file {shown!r}{origin}: {reason}",
                          setting=via, value=shown, source=shown) from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{shown}: not UTF-8 text (line {line}, byte {exc.start})",
                          source=shown, line=line) from None
    _toml_layer(text, shown, Path(os.path.abspath(shown)).parent, state)


_POSITION = re.compile(r"\s*\(at line (\d+), column (\d+)\)\Z")


def _toml_layer(text: str, source: str, base_dir: Path | None, state: _State) -> None:
    if not isinstance(text, str):
        raise _Where("TOML document", source).type_error("a str", text)
    try:
        data = tomllib.loads(text)
    except RecursionError:
        raise ConfigError(f"{source}: invalid TOML: arrays or tables nested too deeply",
                          source=source) from None
    except ValueError as exc:  # TOMLDecodeError, and an integer too long to convert
        message = str(exc)
        line = column = None
        match = _POSITION.search(message)
        if match:
            line, column = int(match.group(1)), int(match.group(2))
            message = message[: match.start()]
        elif message.endswith("(at end of document)"):
            message = message[: -len("(at end of document)")].rstrip()
            line = text.count("\n") + 1
            column = len(text.rpartition("\n")[2]) + 1
        at = f" at line {line}, column {column}" if line is not None else ""
        raise ConfigError(f"{source}: invalid TOML{at}: {message}", source=source,
                          line=line, column=column) from None
    _mapping_layer(data, _Where("", source, in_file=True, base_dir=base_dir), state)


def _mapping_layer(data: object, context: _Where, state: _State) -> None:
    def at(setting: str) -> _Where:
        return replace(context, setting=setting)

    if not isinstance(data, Mapping):
        raise at("configuration").type_error("a table of sections", data)
    for section, table in data.items():
        if not isinstance(section, str):
            raise at(_show(section)).type_error("a string key", section)
        if section not in _SECTIONS:
            shown = _key_text(section)
            if isinstance(table, Mapping):
                hint = difflib.get_close_matches(section, list(_SECTIONS), n=1, cutoff=0.6)
                suggestion = f" (did you mean [{hint[0]}]?)" if hint else ""
                raise at(shown).error(f"unknown section [{shown}]{suggestion}; sections are "
                                      + ", ".join(f"[{s}]" for s in _SECTIONS))
            raise at(shown).error(f"unknown setting: settings belong in a section{_suggest(section)}")
        if not isinstance(table, Mapping):
            raise at(section).type_error(f"a table [{section}]", table)
        for key, value in table.items():
            if not isinstance(key, str):
                raise at(f"{section}.{_show(key)}").type_error("a string key", key)
            path = f"{section}.{key}"
            spec = _SPECS.get(path)
            if spec is None:
                raise at(f"{section}.{_key_text(key)}").error(f"unknown setting{_suggest(path)}")
            where = at(path)
            state[path] = (spec.native(value, where), where)


def _env_layer(environ: Mapping[str, str], state: _State) -> None:
    if not isinstance(environ, Mapping):
        raise _Where("environ").type_error("a mapping", environ)
    prefixes = tuple(f"{ENV_PREFIX}{s.upper()}_" for s in _SECTIONS)
    for name in sorted(k for k in environ if isinstance(k, str)):
        if not name.startswith(prefixes):
            continue  # other variables, SOVEREIGN_CONFIG and SOVEREIGN_DISCOVERY_* included
        path = _ENV_NAMES.get(name)
        where = _Where(name if path else _key_text(name), "environment")
        if path is None:
            hint = difflib.get_close_matches(name, list(_ENV_NAMES), n=1, cutoff=0.6)
            raise where.error("unknown setting" + (f" (did you mean {hint[0]}?)" if hint else ""))
        raw = environ[name]
        if not isinstance(raw, str):
            raise where.type_error("a string", raw)
        _check_text(raw, where)
        state[path] = (_SPECS[path].text(raw, where), where)


def _override_layer(overrides: Mapping[str, object], names: Mapping[str, str], state: _State) -> None:
    if not isinstance(overrides, Mapping):
        raise _Where("overrides").type_error("a mapping", overrides)
    if not isinstance(names, Mapping):
        raise _Where("names").type_error("a mapping", names)
    for path, value in overrides.items():
        if not isinstance(path, str) or path not in _SPECS:
            shown = _key_text(path) if isinstance(path, str) else _show(path)
            raise _Where(shown, "override").error(f"unknown setting{_suggest(shown)}")
        label = names.get(path, path)
        where = _Where(label if isinstance(label, str) and label.isprintable() else path, "override")
        spec = _SPECS[path]
        if isinstance(value, str):
            _check_text(value, where)
            normalised = spec.text(value, where)
        else:
            normalised = spec.native(value, where)
        state[path] = (normalised, where)


# --- TOML output ---------------------------------------------------------------------------------


_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _toml_string(text: str) -> str:
    out = []
    for ch in text:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)  # finite: validated; repr of a float is valid TOML
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list):
        if not value:
            return "[]"
        if len(value) == 1:
            return f"[{_toml_value(value[0])}]"
        return "[\n" + "".join(f"    {_toml_value(v)},\n" for v in value) + "]"
    raise AssertionError(f"no TOML form for {type(value).__name__}")  # pragma: no cover
