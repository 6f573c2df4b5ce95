"""Node IDs, XOR distance, and the choice between the C keyspace kernel and its Python twin.

Which kernel runs is decided once, at import:

- ``SOVEREIGN_DISCOVERY_PURE_PYTHON=1`` forces the pure-Python twin (``_keyspace_py``);
- ``SOVEREIGN_DISCOVERY_REQUIRE_C=1`` makes a missing C extension an error
  (:class:`~sovereign_discovery.errors.KernelUnavailableError`) instead of a fallback;
- otherwise the C extension (``_keyspace``) is used when it was built, and a missing build falls
  back to Python with a :class:`~sovereign_discovery.errors.KernelFallbackWarning`: never silently.

``KERNEL`` is ``"c"`` or ``"python"``; ``KERNEL_REASON`` says why.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import hashlib
import importlib
import os
import warnings
from collections.abc import Iterable
from types import ModuleType
from typing import Generic, TypeVar

from . import _keyspace_py
from .constants import NODE_ID_BITS, NODE_ID_BYTES, PUBLIC_KEY_BYTES
from .errors import (
    ArgumentTypeError,
    ArgumentValueError,
    KernelFallbackWarning,
    KernelUnavailableError,
)

_sha256 = hashlib.sha256

__all__ = [
    "NodeId",
    "Distance",
    "distance",
    "bucket_index",
    "KeyspaceIndex",
    "KERNEL",
    "KERNEL_REASON",
    "kernel_module",
    "PURE_PYTHON_ENV",
    "REQUIRE_C_ENV",
    "select_extension",
    "named_extension",
]

PURE_PYTHON_ENV = "SOVEREIGN_DISCOVERY_PURE_PYTHON"
REQUIRE_C_ENV = "SOVEREIGN_DISCOVERY_REQUIRE_C"


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def select_extension(c_name: str, twin: ModuleType) -> tuple[ModuleType, str, str]:
    """The module to use for the C extension ``c_name`` of this package or its pure-Python
    ``twin``, by the rules in the module docstring: ``(module, "c" or "python", reason)``."""
    pure, require_c = _flag(PURE_PYTHON_ENV), _flag(REQUIRE_C_ENV)
    if pure and require_c:
        raise KernelUnavailableError(f"{PURE_PYTHON_ENV} and {REQUIRE_C_ENV} are both set; set one")
    if pure:
        return twin, "python", f"forced by {PURE_PYTHON_ENV}=1"
    try:
        module = importlib.import_module(f"{__package__}.{c_name}")
    except ImportError as exc:
        if require_c:
            raise KernelUnavailableError(
                f"{REQUIRE_C_ENV}=1 but the C extension {__package__}.{c_name} could not be"
                f" loaded ({exc}); reinstall with a C compiler and Python headers"
                " (pip install -e .)"
            ) from exc
        reason = f"C extension {c_name} unavailable ({exc}); using its pure-Python twin"
        warnings.warn(reason, KernelFallbackWarning, stacklevel=3)
        return twin, "python", reason
    return module, "c", "C extension loaded"


_kernel, KERNEL, KERNEL_REASON = select_extension("_keyspace", _keyspace_py)


def named_extension(name: str | None, c_name: str, twin: ModuleType, active: ModuleType,
                    what: str) -> ModuleType:
    """``active`` for None, the C extension ``c_name`` for ``"c"`` (KernelUnavailableError naming
    ``what`` if it was not built), ``twin`` for ``"python"``."""
    if name is None:
        return active
    if name == "python":
        return twin
    if name == "c":
        try:
            return importlib.import_module(f"{__package__}.{c_name}")
        except ImportError as exc:
            raise KernelUnavailableError(f"{what} is not built: {exc}") from exc
    raise ArgumentValueError(f"name must be 'c', 'python' or None, not {name!r}")


def kernel_module(name: str | None = None) -> ModuleType:
    """The active kernel module, or the one named ``"c"`` or ``"python"`` (tests use this to run
    both side by side). Raises :class:`KernelUnavailableError` if the C one is asked for but was
    not built."""
    return named_extension(name, "_keyspace", _keyspace_py, _kernel, "the C kernel")


# --- node IDs ----------------------------------------------------------------------------------

#: XOR distances are plain ints in 0 .. 2**160 - 1 (Kademlia paper §2.1).
Distance = int


class NodeId(bytes):
    """A 160-bit node identifier: the first 20 bytes of SHA-256(raw Ed25519 public key).

    A ``bytes`` subclass, so it hashes, compares and slices as its 20 bytes and the C kernel reads
    it without copying. Its text form (``str(node_id)``) is 32 characters of lowercase RFC 4648
    base32 without padding (``[a-z2-7]``): safe in URLs and file names, unambiguous on
    case-insensitive file systems; :meth:`parse` reads it back (and accepts upper case).
    """

    __slots__ = ()

    def __new__(cls, value: bytes | bytearray | memoryview) -> "NodeId":
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise ArgumentTypeError(f"node_id must be bytes, not {type(value).__name__}")
        if len(value) != NODE_ID_BYTES:
            raise ArgumentValueError(f"node_id must be {NODE_ID_BYTES} bytes long, not {len(value)}")
        return super().__new__(cls, value)

    @classmethod
    def from_public_key(cls, public_key: bytes) -> "NodeId":
        """Derive the ID of a raw 32-byte Ed25519 public key. IDs are always derived this way,
        never taken from the wire."""
        if not isinstance(public_key, (bytes, bytearray, memoryview)):
            raise ArgumentTypeError(f"public_key must be bytes, not {type(public_key).__name__}")
        if len(public_key) != PUBLIC_KEY_BYTES:
            raise ArgumentValueError(
                f"public_key must be {PUBLIC_KEY_BYTES} bytes long, not {len(public_key)}"
            )
        # 20 bytes by construction: skip __new__'s checks (this runs for every decoded contact)
        return bytes.__new__(cls, _sha256(public_key).digest()[:NODE_ID_BYTES])

    @classmethod
    def parse(cls, text: str) -> "NodeId":
        """Read the text form made by ``str()``."""
        if not isinstance(text, str):
            raise ArgumentTypeError(f"text must be str, not {type(text).__name__}")
        if len(text) != 32:
            raise ArgumentValueError(
                f"a node ID is 32 base32 characters, got {len(text)}: {text[:40]!r}"
            )
        try:
            raw = base64.b32decode(text.upper())
        except (binascii.Error, ValueError) as exc:
            raise ArgumentValueError(f"not a base32 node ID: {text!r}") from exc
        return cls(raw)

    @classmethod
    def from_int(cls, value: int) -> "NodeId":
        if not isinstance(value, int):
            raise ArgumentTypeError(f"value must be an int, not {type(value).__name__}")
        if not 0 <= value < 1 << NODE_ID_BITS:
            raise ArgumentValueError(f"value must be in 0 .. 2**{NODE_ID_BITS} - 1")
        return cls(value.to_bytes(NODE_ID_BYTES, "big"))

    def to_int(self) -> int:
        """The ID as an unsigned 160-bit integer. (Not ``__int__``: that would make CPython treat
        the ID as a number, and ``bytearray`` slice assignment refuses numbers.)"""
        return int.from_bytes(self, "big")

    def __str__(self) -> str:
        return base64.b32encode(self).decode("ascii").lower()

    def __repr__(self) -> str:
        return f"NodeId.parse({str(self)!r})"

    def short(self) -> str:
        """The first 8 text characters, for logs."""
        return str(self)[:8]

    def distance_to(self, other: bytes) -> Distance:
        return distance(self, other)


def check_node_id(name: str, value: object) -> NodeId:
    """``value`` as a NodeId, or a caller error naming ``name`` (for functions taking an ID)."""
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise ArgumentTypeError(f"{name} must be a NodeId (bytes), not {type(value).__name__}")
    if len(value) != NODE_ID_BYTES:
        raise ArgumentValueError(f"{name} must be {NODE_ID_BYTES} bytes long, not {len(value)}")
    return value if type(value) is NodeId else NodeId(value)


def _as_id(value: object, name: str) -> bytes:
    if not isinstance(value, bytes):
        raise ArgumentTypeError(f"{name} must be a NodeId (bytes), not {type(value).__name__}")
    if len(value) != NODE_ID_BYTES:
        raise ArgumentValueError(f"{name} must be {NODE_ID_BYTES} bytes long, not {len(value)}")
    return value


def distance(a: bytes, b: bytes) -> Distance:
    """XOR distance of two IDs as an int (Kademlia paper §2.1)."""
    _as_id(a, "a")
    _as_id(b, "b")
    return int.from_bytes(a, "big") ^ int.from_bytes(b, "big")


def bucket_index(local_id: bytes, node_id: bytes) -> int:
    """Common-prefix length in bits (0..159), 160 for equal IDs. Runs in the active kernel."""
    return _kernel.bucket_index(local_id, node_id)


# --- a global view of the keyspace -------------------------------------------------------------

V = TypeVar("V")


class KeyspaceIndex(Generic[V]):
    """A sorted set of IDs with one value each, answering exact closest-n queries in
    O(log² n) through the kernel's ``closest_in_sorted``.

    This is the structure for a *global* view (a simulator that knows every node, a benchmark's
    oracle), not a routing table. Memory: two list slots per entry plus the keys themselves.
    """

    __slots__ = ("_keys", "_values", "_kernel")

    def __init__(self, items: Iterable[tuple[bytes, V]] = (), *, kernel: ModuleType | None = None):
        pairs = sorted(((_as_id(k, "key"), v) for k, v in items), key=lambda kv: kv[0])
        for (a, _), (b, _) in zip(pairs, pairs[1:]):
            if a == b:
                raise ArgumentValueError(f"duplicate key {NodeId(a)}")
        self._keys: list[bytes] = [k for k, _ in pairs]
        self._values: list[V] = [v for _, v in pairs]
        self._kernel = kernel or _kernel

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, bytes):
            return False
        i = bisect.bisect_left(self._keys, key)
        return i < len(self._keys) and self._keys[i] == key

    def get(self, key: bytes) -> V | None:
        i = bisect.bisect_left(self._keys, _as_id(key, "key"))
        if i < len(self._keys) and self._keys[i] == key:
            return self._values[i]
        return None

    def add(self, key: bytes, value: V) -> bool:
        """Insert, or replace the value of an existing key. True if the key is new."""
        i = bisect.bisect_left(self._keys, _as_id(key, "key"))
        if i < len(self._keys) and self._keys[i] == key:
            self._values[i] = value
            return False
        self._keys.insert(i, bytes(key))
        self._values.insert(i, value)
        return True

    def remove(self, key: bytes) -> V | None:
        i = bisect.bisect_left(self._keys, _as_id(key, "key"))
        if i < len(self._keys) and self._keys[i] == key:
            del self._keys[i]
            return self._values.pop(i)
        return None

    def closest(self, target: bytes, count: int) -> list[V]:
        """The values of the ``count`` keys nearest ``target``, nearest first (exact)."""
        return self._kernel.closest_in_sorted(self._keys, self._values, target, count)

    def items(self) -> Iterable[tuple[bytes, V]]:
        return zip(self._keys, self._values)
