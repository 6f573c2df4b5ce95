"""The Kademlia routing table: k-buckets by shared-prefix length, least-recently-seen order, a
replacement cache per bucket, the liveness-check rule for full buckets, and optional diversity
limits per IP prefix. No I/O and no clock: ``now`` is passed in, and a needed liveness check is
*returned* (:class:`Pending`) for the engine to perform.

Rules, with their sources:

- Bucket ``i`` holds contacts whose ID shares exactly ``i`` leading bits with the local ID
  (Kademlia paper §2.2 in the prefix form of libp2p). Buckets are unfolded on demand as
  go-libp2p-kbucket does: the *last* bucket holds every contact with a common prefix of at least
  its index, and it is split when it is full and a new contact belongs to it. The contents are
  exactly those of a table with one bucket per prefix length (the model in the stateful test),
  while a table of ``n`` contacts stores only about ``log2(n)`` buckets.
- Within a bucket, entries are kept least-recently-seen first (paper §2.2). A contact heard from
  again moves to the tail.
- A new contact for a full bucket does not evict anyone: it waits in the bucket's replacement
  cache, and the least-recently-seen entry must fail a liveness check first (paper §2.2, §4.1:
  long-lived contacts are preferred). The table returns ``Pending(check=oldest)``; the engine pings
  and reports back with :meth:`RoutingTable.touch` (alive) or :meth:`RoutingTable.remove` (failed),
  which promotes the most recently seen replacement. At most one check per bucket is under way
  (``Full`` while it runs), and none is asked for while the oldest entry was heard from within
  ``liveness_recent_s`` (``Cached``): BEP 5 keeps a full bucket of "good" nodes (heard from in the
  last 15 minutes) and pings only a questionable one, which also stops the chain of checks a
  check's own PING would set off at its recipient. Each entry's last-seen time is kept for that.
- ``closest`` is exact: it equals a full scan sorted by XOR distance (the oracle of the tests).

Storage is flat so that the C kernel can scan it: bucket ``b`` owns ``bucket_size`` fixed slots
in one ``list`` of contacts, with ``sizes[b]`` saying how many are used, and the kernel reads each
slot's ID from its contact's ``node_id`` (no second copy of the IDs). Per slot that is 8 bytes for
the list item and 4 for the last-seen time (a 32-bit float), plus per-table overhead, beyond the
contact objects themselves (see docs/routing-table.md for the measured bytes per contact).
"""

from __future__ import annotations

import functools
import math
import random
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from types import ModuleType

from . import keys
from .addresses import Address
from .constants import (
    DEFAULT_BUCKET_SIZE,
    MAX_BUCKET_BITS,
    DEFAULT_REPLACEMENT_CACHE_SIZE,
    MAX_BUCKET_SIZE,
    MAX_REPLACEMENT_CACHE_SIZE,
    NODE_ID_BITS,
    NODE_ID_BYTES,
    PUBLIC_KEY_BYTES,
)
from .errors import ArgumentTypeError, ArgumentValueError
from .identity import encode_public_key, parse_public_key
from .keys import NodeId

__all__ = [
    "Contact",
    "RoutingTable",
    "DiversityLimits",
    "InsertResult",
    "Inserted",
    "Updated",
    "Pending",
    "Full",
    "Cached",
    "Rejected",
    "Removed",
]

_ID = NODE_ID_BYTES
_SEEN, _SEEN_BYTES = "f", 4  # the last-seen times: array typecode (32-bit float) and its size


def _digit(prefix: int, bits: int) -> tuple[int, int]:
    """(first bit, width) of the ``bits``-bit digit that holds bit ``prefix`` (the last digit of
    an ID may be narrower)."""
    level = prefix - prefix % bits
    return level, min(bits, NODE_ID_BITS - level)


def _sub_buckets(prefix: int, bits: int) -> int:
    """Buckets of the contacts sharing exactly ``prefix`` bits with the local ID, with ``bits``
    bits per routing step (Kademlia §4.2): one per value of the bits after bit ``prefix`` up to
    the end of its digit."""
    level, width = _digit(prefix, bits)
    return 1 << (level + width - 1 - prefix)


@functools.lru_cache(maxsize=None)
def _first_buckets(bits: int) -> tuple[int, ...]:
    """``[p]``: the index of the first bucket of prefix length ``p`` (all shorter prefixes have
    all their buckets before it), for p in 0..160."""
    firsts = [0]
    for prefix in range(NODE_ID_BITS):
        firsts.append(firsts[-1] + _sub_buckets(prefix, bits))
    return tuple(firsts)


@functools.lru_cache(maxsize=None)
def _unfolding(bits: int) -> tuple[tuple[int, int, int], ...]:
    """``[p]``: (first bucket of prefix ``p``, shift, mask): an ID of prefix ``p`` is in bucket
    first + ((ID >> shift) & mask), the bits after bit ``p`` up to the end of its digit."""
    firsts, out = _first_buckets(bits), []
    for prefix in range(NODE_ID_BITS):
        level, width = _digit(prefix, bits)
        out.append((firsts[prefix], NODE_ID_BITS - (level + width), _sub_buckets(prefix, bits) - 1))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class Contact:
    """A peer as the routing table knows it: its public key, where it was reached, and the node ID
    *derived* from the key (never taken from the wire)."""

    public_key: bytes
    address: Address
    node_id: NodeId = field(init=False, compare=False)
    _encoded: bytes | None = field(init=False, compare=False, repr=False)

    def __init__(self, public_key: bytes, address: Address) -> None:
        if not isinstance(public_key, bytes):
            raise ArgumentTypeError(f"public_key must be bytes, not {type(public_key).__name__}")
        if len(public_key) != PUBLIC_KEY_BYTES:
            raise ArgumentValueError(
                f"public_key must be {PUBLIC_KEY_BYTES} bytes long, not {len(public_key)}"
            )
        if not isinstance(address, Address):
            raise ArgumentTypeError(f"address must be an Address, not {type(address).__name__}")
        object.__setattr__(self, "public_key", bytes(public_key))
        object.__setattr__(self, "address", address)
        object.__setattr__(self, "node_id", NodeId.from_public_key(public_key))
        object.__setattr__(self, "_encoded", None)

    def encode(self) -> bytes:
        """``public key || address`` as NODES messages carry it (docs/protocol.md), cached: a
        table's contacts are sent in many answers. Raises ArgumentValueError for a zoned address."""
        encoded = self._encoded
        if encoded is None:
            encoded = self.public_key + self.address.encode()
            object.__setattr__(self, "_encoded", encoded)
        return encoded

    @classmethod
    def parse(cls, text: str) -> "Contact":
        """Read a pinned contact line ``<public key>@<host>:<port>`` (``[host]:port`` for IPv6):
        the public key in the 52-character base32 of :func:`~sovereign_discovery.identity.encode_public_key`."""
        if not isinstance(text, str):
            raise ArgumentTypeError(f"contact must be a str, not {type(text).__name__}")
        key, sep, address = text.strip().partition("@")
        if not sep:
            raise ArgumentValueError(f"contact must look like PUBLIC_KEY@HOST:PORT, got {text!r}")
        return cls(parse_public_key(key), Address.parse(address))

    @property
    def pinned(self) -> str:
        """The line :meth:`parse` reads: ``<public key>@<host>:<port>``."""
        return f"{encode_public_key(self.public_key)}@{self.address}"

    def __repr__(self) -> str:
        return f"Contact({self.node_id.short()}… at {self.address})"


# --- results -----------------------------------------------------------------------------------


class InsertResult:
    """What :meth:`RoutingTable.insert` did. Match on the subclass."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class Inserted(InsertResult):
    """The contact is new and took a free slot."""

    contact: Contact


@dataclass(frozen=True, slots=True)
class Updated(InsertResult):
    """The contact was already in the table: it moved to the most-recently-seen end of its bucket,
    and its address is the one given now."""

    contact: Contact


@dataclass(frozen=True, slots=True)
class Pending(InsertResult):
    """The bucket is full. ``contact`` waits in the replacement cache, and the engine should now
    check whether ``check`` (the least-recently-seen entry) is alive, then report with
    :meth:`RoutingTable.touch` or :meth:`RoutingTable.remove`."""

    contact: Contact
    check: Contact


@dataclass(frozen=True, slots=True)
class Full(InsertResult):
    """The bucket is full and a liveness check of ``checking`` is already under way; ``contact``
    waits in the replacement cache (if the cache has room for it)."""

    contact: Contact
    checking: Contact


@dataclass(frozen=True, slots=True)
class Cached(InsertResult):
    """The bucket is full and its least-recently-seen entry was heard from within the table's
    ``liveness_recent_s``, so no liveness check is due (BEP 5: a bucket full of good nodes);
    ``contact`` waits in the replacement cache (if the cache has room for it)."""

    contact: Contact


@dataclass(frozen=True, slots=True)
class Rejected(InsertResult):
    """Not admitted: ``reason`` is ``"own-id"`` or ``"diversity-bucket"`` /
    ``"diversity-table"`` (too many contacts from one IP prefix)."""

    contact: Contact
    reason: str


@dataclass(frozen=True, slots=True)
class Removed:
    """What :meth:`RoutingTable.remove` took out, and the replacement promoted into the bucket in
    its place (``None`` if the cache had none)."""

    contact: Contact
    promoted: Contact | None


@dataclass(frozen=True, slots=True)
class DiversityLimits:
    """At most ``max_per_bucket`` contacts of one IP group in a bucket and ``max_per_table`` in
    the table (``None`` = no limit). A group is an IPv4 /24 or an IPv6 /48 by default
    (go-libp2p-kad-dht applies such filters per bucket and per table). Off unless the engine
    switches it on, since a test network on one host is all one group."""

    max_per_bucket: int | None = 2
    max_per_table: int | None = 10
    ipv4_prefix_bits: int = 24
    ipv6_prefix_bits: int = 48

    def __post_init__(self) -> None:
        for name in ("max_per_bucket", "max_per_table"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ArgumentValueError(f"{name} must be None or an int >= 1, not {value!r}")
        if not 1 <= self.ipv4_prefix_bits <= 32:
            raise ArgumentValueError(f"ipv4_prefix_bits must be in 1..32, not {self.ipv4_prefix_bits}")
        if not 1 <= self.ipv6_prefix_bits <= 128:
            raise ArgumentValueError(f"ipv6_prefix_bits must be in 1..128, not {self.ipv6_prefix_bits}")

    def group(self, contact: Contact) -> tuple[int, int]:
        return contact.address.ip_group(self.ipv4_prefix_bits, self.ipv6_prefix_bits)


# --- the table ---------------------------------------------------------------------------------


def _check_contact(contact: object) -> Contact:
    """Any object with a 20-byte ``node_id`` (and an ``address`` if diversity limits are on) can
    be an entry: the engine stores :class:`Contact`, tests and simulators lighter stand-ins."""
    node_id = getattr(contact, "node_id", None)
    if not isinstance(node_id, bytes) or len(node_id) != _ID:
        raise ArgumentTypeError(
            f"contact must be a Contact (an object with a {_ID}-byte node_id),"
            f" not {type(contact).__name__}"
        )
    return contact  # type: ignore[return-value]


def _check_now(now: object) -> float:
    if not isinstance(now, (int, float)) or isinstance(now, bool):
        raise ArgumentTypeError(f"now must be a number (monotonic seconds), not {type(now).__name__}")
    return float(now)


class RoutingTable:
    """A Kademlia routing table for ``local_id``. See the module docstring for the rules."""

    __slots__ = (
        "_local",
        "_k",
        "_cache_size",
        "_kernel",
        "_slots",
        "_sizes",
        "_activity",
        "_replacements",
        "_checking",
        "_seen",
        "_recent_s",
        "_n_pending",
        "_n_cached",
        "_n_full",
        "_count",
        "_diversity",
        "_groups",
        "_bits",
        "_tail",
        "_prefixes",
    )

    def __init__(
        self,
        local_id: bytes,
        *,
        bucket_size: int = DEFAULT_BUCKET_SIZE,
        replacement_cache_size: int = DEFAULT_REPLACEMENT_CACHE_SIZE,
        diversity: DiversityLimits | None = None,
        now: float = 0.0,
        kernel: ModuleType | None = None,
        liveness_recent_s: float = 0.0,
        bucket_bits: int = 1,
    ) -> None:
        if not isinstance(local_id, bytes):
            raise ArgumentTypeError(f"local_id must be a NodeId, not {type(local_id).__name__}")
        if len(local_id) != NODE_ID_BYTES:
            raise ArgumentValueError(f"local_id must be {NODE_ID_BYTES} bytes long, not {len(local_id)}")
        if not isinstance(bucket_size, int) or not 1 <= bucket_size <= MAX_BUCKET_SIZE:
            raise ArgumentValueError(f"bucket_size must be an int in 1..{MAX_BUCKET_SIZE}, not {bucket_size!r}")
        if not isinstance(replacement_cache_size, int) or not (
            0 <= replacement_cache_size <= MAX_REPLACEMENT_CACHE_SIZE
        ):
            raise ArgumentValueError(
                f"replacement_cache_size must be an int in 0..{MAX_REPLACEMENT_CACHE_SIZE},"
                f" not {replacement_cache_size!r}"
            )
        if isinstance(liveness_recent_s, bool) or not isinstance(liveness_recent_s, (int, float)) \
                or not liveness_recent_s >= 0:
            raise ArgumentValueError(f"liveness_recent_s must be a number >= 0, not {liveness_recent_s!r}")
        if isinstance(bucket_bits, bool) or not isinstance(bucket_bits, int) \
                or not 1 <= bucket_bits <= MAX_BUCKET_BITS:
            raise ArgumentValueError(f"bucket_bits must be an int in 1..{MAX_BUCKET_BITS}, not {bucket_bits!r}")
        self._bits = bucket_bits
        #: the last bucket holds every contact sharing at least this many bits with the local ID
        self._tail = 0
        #: each bucket's prefix length, for the kernel's closest (None with one bucket per prefix
        #: length: bucket i is prefix i)
        self._prefixes: bytearray | None = bytearray(1) if bucket_bits > 1 else None
        self._recent_s = float(liveness_recent_s)
        self._local = NodeId(local_id)
        self._k = bucket_size
        self._cache_size = replacement_cache_size
        self._kernel = kernel or keys.kernel_module()
        self._slots: list[Contact | None] = [None] * bucket_size
        self._sizes = bytearray(1)
        self._activity: list[float] = [_check_now(now)]
        self._replacements: list[list[Contact] | None] = [None]
        self._checking: list[Contact | None] = [None]
        #: when each slot's contact was last heard from (inserted, updated or touched), in step
        #: with ``_slots``; -inf for a promoted replacement (not heard from since it was cached).
        #: 32-bit floats (4 bytes a slot, not 8: ~1.5 KB per table at 10^6 nodes): ~7 significant
        #: digits, i.e. better than 0.1 s below ~10^6 s of monotonic time, far finer than the
        #: liveness rule's 900 s.
        self._seen = array(_SEEN, bytes(_SEEN_BYTES * bucket_size))
        self._n_pending = self._n_cached = self._n_full = 0
        self._count = 0
        self._diversity: DiversityLimits | None = None
        self._groups: dict[tuple[int, int], int] = {}
        self.diversity = diversity

    # --- inspection -----------------------------------------------------------------------------

    @property
    def local_id(self) -> NodeId:
        return self._local

    @property
    def bucket_size(self) -> int:
        return self._k

    @property
    def bucket_bits(self) -> int:
        """Bits per routing step (Kademlia §4.2): each shared-prefix length ``p`` has one bucket
        per value of the bits after bit ``p`` up to the end of its ``bucket_bits``-bit digit."""
        return self._bits

    @property
    def bucket_count(self) -> int:
        """Buckets unfolded so far (the last one holds every deeper prefix)."""
        return len(self._sizes)

    def __len__(self) -> int:
        return self._count

    def __contains__(self, node_id: object) -> bool:
        return isinstance(node_id, bytes) and len(node_id) == _ID and self.get(node_id) is not None

    def __iter__(self) -> Iterator[Contact]:
        """Every contact, bucket by bucket, least recently seen first within a bucket."""
        for bucket in range(len(self._sizes)):
            yield from self.bucket(bucket)

    def bucket_index(self, node_id: bytes) -> int:
        """The bucket ``node_id`` belongs in now. Raises for the local ID itself."""
        prefix = self._kernel.bucket_index(self._local, node_id)
        if prefix >= NODE_ID_BITS:
            raise ArgumentValueError("node_id is the local ID, which has no bucket")
        return self._bucket_of(prefix, node_id)

    def _bucket_of(self, prefix: int, node_id: bytes) -> int:
        """The bucket of an ID sharing ``prefix`` (< 160) bits with the local ID."""
        if prefix >= self._tail:
            return len(self._sizes) - 1
        return self._unfolded(prefix, node_id)

    def _unfolded_of(self, node_id: bytes) -> int:
        return self._unfolded(self._kernel.bucket_index(self._local, node_id), node_id)

    def _unfolded(self, prefix: int, node_id: bytes) -> int:
        """The bucket of an ID sharing ``prefix`` bits with the local ID in the table unfolded
        down to that prefix: its prefix's first bucket, plus the bits after bit ``prefix`` up to
        the end of the digit."""
        if self._bits == 1:
            return prefix
        first, shift, mask = _unfolding(self._bits)[prefix]
        return first + ((int.from_bytes(node_id, "big") >> shift) & mask) if mask else first

    def bucket(self, index: int) -> list[Contact]:
        """The contacts of bucket ``index``, least recently seen first."""
        self._check_bucket(index)
        first = index * self._k
        return self._slots[first : first + self._sizes[index]]  # type: ignore[return-value]

    def bucket_sizes(self) -> list[int]:
        return list(self._sizes)

    def replacements(self, index: int) -> list[Contact]:
        """Bucket ``index``'s replacement cache, most recently seen last."""
        self._check_bucket(index)
        return list(self._replacements[index] or ())

    def checking(self, index: int) -> Contact | None:
        """The entry of bucket ``index`` whose liveness check is under way, if any."""
        self._check_bucket(index)
        return self._checking[index]

    def last_seen(self, node_id: bytes) -> float | None:
        """When ``node_id`` was last heard from (inserted, updated or touched); ``-inf`` for a
        promoted replacement not heard from since; None if it is not in the table."""
        bucket, slot = self._locate(node_id)
        return self._seen[slot] if slot >= 0 else None

    @property
    def insert_counts(self) -> dict[str, int]:
        """How many inserts into a full bucket returned ``Pending`` (a liveness check asked
        for), ``Cached`` (none needed: the oldest entry was heard from recently) and ``Full``
        (one already under way for that bucket)."""
        return {"pending": self._n_pending, "cached": self._n_cached, "full": self._n_full}

    @property
    def liveness_recent_s(self) -> float:
        """A full bucket asks for no liveness check while its oldest entry was heard from within
        this many seconds (0: always check)."""
        return self._recent_s

    def get(self, node_id: bytes) -> Contact | None:
        bucket, slot = self._locate(node_id)
        return self._slots[slot] if slot >= 0 else None

    def closest(self, target: bytes, count: int = DEFAULT_BUCKET_SIZE) -> list[Contact]:
        """The ``count`` contacts nearest ``target`` by XOR distance, nearest first. Exact."""
        if self._prefixes is None:
            return self._kernel.closest_in_table(self._slots, self._sizes, self._k, self._local, target, count)
        return self._kernel.closest_in_table(self._slots, self._sizes, self._k, self._local, target, count,
                                             self._prefixes)

    # --- changes --------------------------------------------------------------------------------

    def insert(self, contact: Contact, now: float) -> InsertResult:
        """Record that ``contact`` was seen (it proved its key). See :class:`InsertResult`."""
        _check_contact(contact)
        now = _check_now(now)
        node_id = contact.node_id
        if node_id == self._local:
            return Rejected(contact, "own-id")
        bucket, slot = self._locate(node_id)
        if slot >= 0:
            self._replace_in_slot(slot, contact)
            self._move_to_tail(bucket, slot, now)
            self._clear_check(bucket, node_id)
            self._activity[bucket] = now
            return Updated(contact)
        while self._sizes[bucket] == self._k and bucket == len(self._sizes) - 1 and self._tail < NODE_ID_BITS - 1:
            self._split_last()
            bucket = self.bucket_index(node_id)
        refusal = self._diversity_refusal(contact, bucket)
        if refusal:
            return Rejected(contact, refusal)
        self._activity[bucket] = now
        if self._sizes[bucket] < self._k:
            self._drop_replacement(bucket, node_id)
            self._append(bucket, contact, now)
            return Inserted(contact)
        self._remember_replacement(bucket, contact)
        checking = self._checking[bucket]
        if checking is not None:
            self._n_full += 1
            return Full(contact, checking)
        head = bucket * self._k
        if now - self._seen[head] < self._recent_s:  # BEP 5: the oldest is still a good node
            self._n_cached += 1
            return Cached(contact)
        self._n_pending += 1
        oldest = self._slots[head]
        assert oldest is not None
        self._checking[bucket] = oldest
        return Pending(contact, oldest)

    def load(self, contacts: Iterable[Contact], now: float) -> int:
        """Fill an empty table in one pass with exactly what :meth:`insert` would make of
        ``contacts`` inserted in this order at ``now``, when no prefix length has more than
        ``bucket_size`` of them (so no insert meets a full bucket): a simulator's global view,
        built for a million tables without a million times ~300 inserts. Returns how many were
        loaded. Raises ArgumentValueError when the table is not empty, a contact is the local ID
        or comes twice, or more than ``bucket_size`` share a prefix length, and when diversity
        limits are on (they decide contact by contact: use :meth:`insert`)."""
        now = _check_now(now)
        if self._count or len(self._sizes) > 1:
            raise ArgumentValueError("load() fills an empty table; this one holds contacts")
        if self._diversity is not None:
            raise ArgumentValueError("load() does not apply diversity limits; insert() one by one")
        contacts = [_check_contact(c) for c in contacts]
        k, local, index = self._k, self._local, self._kernel.bucket_index
        prefixes = [index(local, c.node_id) for c in contacts]
        per_prefix = [0] * (NODE_ID_BITS + 1)
        for prefix in prefixes:
            per_prefix[prefix] += 1
        if per_prefix[NODE_ID_BITS]:
            raise ArgumentValueError("load() was given the local ID")
        unfolded = prefixes if self._bits == 1 else [
            self._unfolded(prefix, c.node_id) for c, prefix in zip(contacts, prefixes)]
        per_bucket = per_prefix if self._bits == 1 else list(Counter(unfolded).values())
        if max(per_bucket, default=0) > k:
            raise ArgumentValueError(f"load() takes at most bucket_size ({k}) contacts per prefix length"
                                     " (per bucket of it, with bucket_bits > 1)")
        if len({c.node_id for c in contacts}) != len(contacts):
            raise ArgumentValueError("load() was given a node ID twice")
        # insert() splits the last bucket, of prefix P and deeper, only when it holds k contacts
        # and one more of prefix >= P comes: P is the first with at most k contacts of prefix >= P.
        tail, deeper = 0, len(contacts)
        while deeper > k and tail < NODE_ID_BITS - 1:
            deeper -= per_prefix[tail]
            tail += 1
        buckets = _first_buckets(self._bits)[tail] + 1
        self._tail = tail
        self._sizes = bytearray(buckets)
        if self._prefixes is not None:
            self._prefixes = bytearray(p for p in range(tail) for _ in range(_sub_buckets(p, self._bits)))
            self._prefixes.append(tail)
        by_bucket: list[list[Contact]] = [[] for _ in range(buckets)]
        last = buckets - 1
        for contact, prefix, bucket in zip(contacts, prefixes, unfolded):
            by_bucket[last if prefix >= tail else bucket].append(contact)
        self._slots = [None] * (k * buckets)
        self._seen = array(_SEEN, bytes(_SEEN_BYTES * k * buckets))
        for bucket, members in enumerate(by_bucket):
            self._write_bucket(bucket, members, lambda contact: now)
        self._activity = [now] * buckets if contacts else self._activity * buckets
        self._replacements = [None] * buckets
        self._checking = [None] * buckets
        self._count = len(contacts)
        return len(contacts)

    def touch(self, node_id: bytes, now: float) -> bool:
        """``node_id`` answered (e.g. passed its liveness check): move it to the most-recently-seen
        end. False if it is not in the table."""
        now = _check_now(now)
        bucket, slot = self._locate(node_id)
        if slot < 0:
            return False
        self._move_to_tail(bucket, slot, now)
        self._clear_check(bucket, node_id)
        self._activity[bucket] = now
        return True

    def remove(self, node_id: bytes, now: float) -> Removed | None:
        """Take ``node_id`` out (it failed its liveness check, or must go for another reason) and
        promote the most recently seen acceptable replacement. Also forgets it as a replacement.
        ``None`` if it was in neither."""
        now = _check_now(now)
        bucket, slot = self._locate(node_id)
        if slot < 0:
            dropped = self._drop_replacement(bucket, node_id)
            return Removed(dropped, None) if dropped is not None else None
        contact = self._slots[slot]
        assert contact is not None
        self._delete_slot(bucket, slot)
        self._clear_check(bucket, node_id)
        promoted = self._promote_replacement(bucket)
        if promoted is not None:
            self._activity[bucket] = now
        return Removed(contact, promoted)

    # --- refresh (paper §2.3: refresh buckets with no lookup in the last interval) ------------------

    def mark_bucket_active(self, index: int, now: float) -> None:
        """A lookup went through bucket ``index`` (it counts as refreshed)."""
        self._check_bucket(index)
        self._activity[index] = _check_now(now)

    def buckets_due_for_refresh(self, now: float, interval_s: float) -> list[int]:
        """Buckets with no activity for ``interval_s`` seconds."""
        now = _check_now(now)
        return [i for i, last in enumerate(self._activity) if now - last >= interval_s]

    def last_activity(self, index: int) -> float:
        self._check_bucket(index)
        return self._activity[index]

    def random_id_in_bucket(self, index: int, rng: random.Random) -> NodeId:
        """A random ID that this table puts in bucket ``index``: the target of a refresh lookup
        for that bucket (for the last bucket, one sharing exactly its prefix length)."""
        self._check_bucket(index)
        if index == len(self._sizes) - 1:
            return self.random_id_with_prefix(self._tail, rng)
        prefix = index if self._prefixes is None else self._prefixes[index]
        value = self.random_id_with_prefix(prefix, rng).to_int()
        if self._bits > 1:  # the bits after the prefix's up to the digit's end name the bucket
            first, shift, mask = _unfolding(self._bits)[prefix]
            value = (value & ~(mask << shift)) | ((index - first) << shift)
        return NodeId.from_int(value)

    def random_id_with_prefix(self, prefix: int, rng: random.Random) -> NodeId:
        """A random ID that shares exactly ``prefix`` leading bits with the local ID."""
        if isinstance(prefix, bool) or not isinstance(prefix, int) or not 0 <= prefix < NODE_ID_BITS:
            raise ArgumentValueError(f"prefix must be in 0..{NODE_ID_BITS - 1}, not {prefix!r}")
        local = self._local.to_int()
        flip = 1 << (NODE_ID_BITS - 1 - prefix)
        low = rng.getrandbits(NODE_ID_BITS - 1 - prefix) if prefix < NODE_ID_BITS - 1 else 0
        keep = local >> (NODE_ID_BITS - prefix) << (NODE_ID_BITS - prefix) if prefix else 0
        value = keep | ((local & flip) ^ flip) | low
        return NodeId.from_int(value)

    # --- diversity ------------------------------------------------------------------------------

    @property
    def diversity(self) -> DiversityLimits | None:
        return self._diversity

    @diversity.setter
    def diversity(self, limits: DiversityLimits | None) -> None:
        """Switch diversity limits on (or off with ``None``). Contacts already in the table stay;
        the limits apply to what comes next."""
        if limits is not None and not isinstance(limits, DiversityLimits):
            raise ArgumentTypeError(f"diversity must be DiversityLimits or None, not {type(limits).__name__}")
        self._diversity = limits
        self._groups = {}
        if limits is not None:
            for contact in self:
                group = limits.group(contact)
                self._groups[group] = self._groups.get(group, 0) + 1

    def _diversity_refusal(self, contact: Contact, bucket: int) -> str | None:
        limits = self._diversity
        if limits is None:
            return None
        group = limits.group(contact)
        if limits.max_per_table is not None and self._groups.get(group, 0) >= limits.max_per_table:
            return "diversity-table"
        if limits.max_per_bucket is not None:
            members = self.bucket(bucket)
            if bucket == len(self._sizes) - 1:
                # The last bucket aggregates deeper prefixes: count the contact's own bucket
                # only, as a table unfolded all the way would.
                own = self._unfolded_of(contact.node_id)
                members = [c for c in members if self._unfolded_of(c.node_id) == own]
            same = sum(1 for c in members if limits.group(c) == group)
            if same >= limits.max_per_bucket:
                return "diversity-bucket"
        return None

    def _count_group(self, contact: Contact, delta: int) -> None:
        if self._diversity is not None:
            group = self._diversity.group(contact)
            left = self._groups.get(group, 0) + delta
            if left > 0:
                self._groups[group] = left
            else:
                self._groups.pop(group, None)

    # --- slot mechanics -------------------------------------------------------------------------

    def _check_bucket(self, index: int) -> None:
        if not isinstance(index, int) or not 0 <= index < len(self._sizes):
            raise ArgumentValueError(f"index must be a bucket in 0..{len(self._sizes) - 1}, not {index!r}")

    def _locate(self, node_id: bytes) -> tuple[int, int]:
        """(bucket, slot) of ``node_id``; slot is -1 when absent. Bucket is -1 for the local ID."""
        prefix = self._kernel.bucket_index(self._local, node_id)
        if prefix >= NODE_ID_BITS:
            return -1, -1
        # one bucket per prefix length (the default): the hot path needs no call
        bucket = min(prefix, len(self._sizes) - 1) if self._prefixes is None else self._bucket_of(prefix, node_id)
        first = bucket * self._k
        return bucket, self._kernel.find_in_bucket(self._slots, first, self._sizes[bucket], node_id)

    def _append(self, bucket: int, contact: Contact, seen: float) -> None:
        slot = bucket * self._k + self._sizes[bucket]
        self._slots[slot] = contact
        self._seen[slot] = seen
        self._sizes[bucket] += 1
        self._count += 1
        self._count_group(contact, +1)

    def _replace_in_slot(self, slot: int, contact: Contact) -> None:
        old = self._slots[slot]
        assert old is not None
        if self._diversity is not None and old.address != contact.address:
            self._count_group(old, -1)
            self._count_group(contact, +1)
        self._slots[slot] = contact

    def _move_to_tail(self, bucket: int, slot: int, now: float) -> None:
        end = bucket * self._k + self._sizes[bucket]
        seen = self._seen
        if slot == end - 1:
            seen[slot] = now
            return
        slots = self._slots
        slots[slot:end] = slots[slot + 1 : end] + [slots[slot]]
        seen[slot : end - 1] = seen[slot + 1 : end]
        seen[end - 1] = now

    def _delete_slot(self, bucket: int, slot: int) -> None:
        end = bucket * self._k + self._sizes[bucket]
        slots = self._slots
        contact = slots[slot]
        slots[slot:end] = slots[slot + 1 : end] + [None]
        seen = self._seen
        seen[slot : end - 1] = seen[slot + 1 : end]
        seen[end - 1] = 0.0
        self._sizes[bucket] -= 1
        self._count -= 1
        assert contact is not None
        self._count_group(contact, -1)

    def _clear_check(self, bucket: int, node_id: bytes) -> None:
        checking = self._checking[bucket]
        if checking is not None and checking.node_id == node_id:
            self._checking[bucket] = None

    def _remember_replacement(self, bucket: int, contact: Contact) -> None:
        if self._cache_size == 0:
            return
        cache = self._replacements[bucket]
        if cache is None:
            cache = self._replacements[bucket] = []
        for i, waiting in enumerate(cache):
            if waiting.node_id == contact.node_id:
                del cache[i]
                break
        cache.append(contact)
        if len(cache) > self._cache_size:
            del cache[0]

    def _drop_replacement(self, bucket: int, node_id: bytes) -> Contact | None:
        cache = self._replacements[bucket] if bucket >= 0 else None
        if cache:
            for i, waiting in enumerate(cache):
                if waiting.node_id == node_id:
                    return cache.pop(i)
        return None

    def _promote_replacement(self, bucket: int) -> Contact | None:
        cache = self._replacements[bucket]
        while cache:
            candidate = cache.pop()
            if self._diversity_refusal(candidate, bucket) is None:
                self._append(bucket, candidate, -math.inf)
                return candidate
        return None

    def _split_last(self) -> None:
        """Unfold: the last bucket, of prefix ``P`` and deeper, becomes the buckets of prefix
        exactly ``P`` (one, or one per value of the next bits of the digit) and a new last bucket
        of every deeper contact, each in the same least-recently-seen order. The table's contents
        do not change, so neither do its counts."""
        last, tail, k = len(self._sizes) - 1, self._tail, self._k
        subs = _sub_buckets(tail, self._bits)
        first = last * k
        members = self._slots[first : first + self._sizes[last]]
        seen = dict(zip((c.node_id for c in members), self._seen[first : first + len(members)]))
        seen_of = lambda contact: seen[contact.node_id]  # noqa: E731
        # New exact-size arrays rather than extend(): growing in place over-allocates ~1/8 that
        # stays for the table's life (~1 KB per table at 10^6 nodes); a table splits ~log2(n) times.
        self._slots = self._slots + [None] * (k * subs)
        self._seen = self._seen + array(_SEEN, bytes(_SEEN_BYTES * k * subs))
        self._sizes.extend(bytes(subs))
        self._activity.extend([self._activity[last]] * subs)
        self._replacements.extend([None] * subs)
        self._checking.extend([None] * subs)
        if self._prefixes is not None:
            self._prefixes[last:] = bytes([tail] * subs + [tail + 1])
        self._tail = tail + 1
        index, local = self._kernel.bucket_index, self._local
        place = lambda contact: self._bucket_of(index(local, contact.node_id), contact.node_id)  # noqa: E731
        parts: list[list[Contact]] = [[] for _ in range(subs + 1)]
        for contact in members:
            parts[place(contact) - last].append(contact)
        for offset, part in enumerate(parts):
            self._write_bucket(last + offset, part, seen_of)
        cache = self._replacements[last]
        if cache:
            parts = [[] for _ in range(subs + 1)]
            for contact in cache:
                parts[place(contact) - last].append(contact)
            for offset, part in enumerate(parts):
                self._replacements[last + offset] = part or None
        checking = self._checking[last]
        if checking is not None:
            self._checking[last] = None
            self._checking[place(checking)] = checking

    def _write_bucket(self, bucket: int, contacts: list[Contact],
                      seen_of: Callable[[Contact], float]) -> None:
        """Lay ``contacts`` out as bucket ``bucket``'s slots, in order (``seen_of``: a contact's
        last-seen time)."""
        k = self._k
        first = bucket * k
        self._slots[first : first + k] = contacts + [None] * (k - len(contacts))
        self._seen[first : first + k] = array(_SEEN, [seen_of(c) for c in contacts] + [0.0] * (k - len(contacts)))
        self._sizes[bucket] = len(contacts)

    def __repr__(self) -> str:
        return f"RoutingTable({self._local.short()}…, {self._count} contacts in {len(self._sizes)} buckets)"
