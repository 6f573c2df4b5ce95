"""The whole exception tree of sovereign_discovery.

Every exception the library raises on purpose derives from :class:`SovereignDiscoveryError`.

Caller mistakes
    :class:`ArgumentTypeError` (also a :class:`TypeError`) and :class:`ArgumentValueError` (also a
    :class:`ValueError`) name the parameter that was wrong. The C kernel and its pure-Python twin
    raise the same classes for the same mistakes.

Bytes from the network
    :class:`DecodeError` (also a :class:`ValueError`) and its subclasses. Decoding untrusted bytes
    raises nothing else, whatever the bytes. A record that decodes but fails a check raises a
    :class:`RecordError` subclass, which is a :class:`DecodeError` too, so one ``except
    DecodeError`` covers everything that can be wrong with network input.

Key files
    :class:`KeyFileError` for a missing, unreadable or malformed file;
    :class:`InsecureKeyFileError` when group or others may read or write a private key file
    (refused, as ssh does).

Running nodes
    :class:`ClosedError` (also a :class:`RuntimeError`) when a closed node or endpoint is used;
    :class:`EndpointError` (also an :class:`OSError`) when a UDP address cannot be bound (in use,
    not local, …), naming the address and the reason. :class:`LookupTimeoutError` (also a
    :class:`TimeoutError`) when a lookup's deadline cut it short with no result; its ``closest``
    holds the best partial result. :class:`BootstrapError` when no bootstrap contact answered.

The peer cache
    :class:`PeerCacheError` (also an :class:`OSError`) when the cache file or its directory
    cannot be used (permissions, missing directory, disk full, locked by another process); its
    ``path`` names it. A *corrupt* cache raises nothing: it is set aside and replaced.
    :class:`WrongThreadError` (also a :class:`RuntimeError`) when a cache is used from a thread
    other than the one that opened it.

The C kernel
    :class:`KernelUnavailableError` (also an :class:`ImportError`) when the C extension is required
    by ``SOVEREIGN_DISCOVERY_REQUIRE_C=1`` but cannot be loaded. :class:`KernelFallbackWarning` (a
    warning, not an error) when it is missing and the pure-Python kernel runs instead.
"""

from __future__ import annotations

__all__ = [
    "SovereignDiscoveryError",
    "ArgumentTypeError",
    "ArgumentValueError",
    "DecodeError",
    "RecordError",
    "MalformedRecordError",
    "RecordTooLargeError",
    "BadSignatureError",
    "RecordExpiredError",
    "RecordFromFutureError",
    "KeyFileError",
    "InsecureKeyFileError",
    "KernelUnavailableError",
    "KernelFallbackWarning",
    "ClosedError",
    "EndpointError",
    "LookupTimeoutError",
    "BootstrapError",
    "PeerCacheError",
    "WrongThreadError",
]


class SovereignDiscoveryError(Exception):
    """Base class of every exception this library raises on purpose."""


# --- caller mistakes ---------------------------------------------------------------------------


class ArgumentTypeError(SovereignDiscoveryError, TypeError):
    """A caller passed a value of the wrong type; the message names the parameter."""


class ArgumentValueError(SovereignDiscoveryError, ValueError):
    """A caller passed a value of the right type but outside its allowed range or length; the
    message names the parameter."""


# --- untrusted bytes ---------------------------------------------------------------------------


class DecodeError(SovereignDiscoveryError, ValueError):
    """Bytes (usually from the network) could not be decoded. The only exception family that
    decoding untrusted input may raise."""


class RecordError(DecodeError):
    """A peer record is unacceptable. Subclasses say why."""


class MalformedRecordError(RecordError):
    """The bytes are not a canonical encoding of a peer record: truncated, trailing garbage, an
    out-of-range field, an unknown version or address kind, or non-canonical ordering."""


class RecordTooLargeError(RecordError):
    """The encoded record is larger than ``MAX_RECORD_BYTES``."""


class BadSignatureError(RecordError):
    """The signature does not verify for the record's public key (forged or tampered)."""


class RecordExpiredError(RecordError):
    """The record's expiry time has passed."""


class RecordFromFutureError(RecordError):
    """The record's expiry lies further ahead than ``MAX_RECORD_LIFETIME_S`` allows."""


# --- key files ---------------------------------------------------------------------------------


class KeyFileError(SovereignDiscoveryError):
    """A private key file is missing, unreadable, already exists, or is not a key file."""


class InsecureKeyFileError(KeyFileError):
    """A private key file may be read or written by group or others; it is refused. Fix it with
    ``chmod 600 FILE``."""


# --- running nodes -----------------------------------------------------------------------------


class ClosedError(SovereignDiscoveryError, RuntimeError):
    """The node or endpoint was closed; it cannot be used any more."""


class EndpointError(SovereignDiscoveryError, OSError):
    """A UDP endpoint could not be opened; the message names the address and the reason."""


class LookupTimeoutError(SovereignDiscoveryError, TimeoutError):
    """A lookup reached its deadline with nothing to return. ``closest`` holds the peers closest
    to the target that answered before it (nearest first): the best partial result."""

    def __init__(self, message: str, *, closest: tuple = ()) -> None:
        super().__init__(message)
        self.closest = tuple(closest)


class BootstrapError(SovereignDiscoveryError):
    """No bootstrap contact answered (unreachable, or not holding the pinned key)."""


# --- the peer cache ----------------------------------------------------------------------------


class PeerCacheError(SovereignDiscoveryError, OSError):
    """The peer cache file or its directory cannot be used: permissions, a missing directory, a
    directory where the file should be, disk full, an I/O error, or another process holding the
    cache. ``path`` names the file (or directory) at fault. Never raised for a *corrupt* file:
    that is set aside and replaced by an empty cache."""

    def __init__(self, message: str, *, path: object) -> None:
        super().__init__(message)
        self.path = path


class WrongThreadError(SovereignDiscoveryError, RuntimeError):
    """A peer cache was used from a thread other than the one that opened it (its SQLite
    connection belongs to that thread)."""


# --- the C kernel ------------------------------------------------------------------------------


class KernelUnavailableError(SovereignDiscoveryError, ImportError):
    """``SOVEREIGN_DISCOVERY_REQUIRE_C=1`` is set but the C extension could not be loaded."""


class KernelFallbackWarning(RuntimeWarning):
    """The C extension is not built, so the (slower) pure-Python kernel is running. Emitted once, at
    import; ``sovereign_discovery.KERNEL_REASON`` repeats the reason."""
