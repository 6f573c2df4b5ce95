"""The keyspace kernel in pure Python: the executable specification of ``_keyspace.c``.

Both modules export the same four functions with the same argument checks, in the same order,
raising the same exception classes (from :mod:`sovereign_discovery.errors`) and giving the same
results. The differential tests hold them to that. Bits are numbered from the most significant
bit of byte 0; IDs compare as 160-bit big-endian unsigned integers, which is also ``bytes`` order.

Table layout used by :func:`closest_in_table` and :func:`find_in_bucket` (see ``routing.py``):
bucket ``b`` owns slots ``b * bucket_size .. b * bucket_size + sizes[b] - 1``; slot ``s`` holds
the object ``contacts[s]``, whose ID is its ``node_id`` attribute (20 bytes). Reading it may run
Python code (a property), which could change the list or ``sizes``: both kernels read ``sizes``
once, from a copy, and index ``contacts`` afresh at each use, so such code cannot make them
disagree or crash, only raise ``IndexError`` when it shrank the list.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right

from .errors import ArgumentTypeError, ArgumentValueError

ID_BYTES = 20
ID_BITS = 160
MAX_BUCKET_SIZE = 255

__all__ = ["bucket_index", "find_in_bucket", "closest_in_table", "closest_in_sorted"]


# --- argument checks (C mirrors these one by one, in this order) --------------------------------


def _check_id(value: object, name: str) -> bytes:
    if not isinstance(value, bytes):
        raise ArgumentTypeError(f"{name} must be bytes (a NodeId), not {type(value).__name__}")
    if len(value) != ID_BYTES:
        raise ArgumentValueError(f"{name} must be {ID_BYTES} bytes long, not {len(value)}")
    return value


def _check_buffer(value: object, name: str) -> None:
    if not isinstance(value, (bytes, bytearray)):
        raise ArgumentTypeError(f"{name} must be bytes or bytearray, not {type(value).__name__}")


def _check_list(value: object, name: str) -> None:
    if not isinstance(value, list):
        raise ArgumentTypeError(f"{name} must be a list, not {type(value).__name__}")


def _check_int(value: object, name: str) -> int:
    if not isinstance(value, int):
        raise ArgumentTypeError(f"{name} must be an int, not {type(value).__name__}")
    return value


def _check_count(value: object) -> int:
    count = _check_int(value, "count")
    if count < 0:
        raise ArgumentValueError(f"count must be >= 0, not {count}")
    return count


def _check_table(contacts: object, sizes: object, bucket_size: object) -> None:
    _check_list(contacts, "contacts")
    _check_buffer(sizes, "sizes")
    _check_int(bucket_size, "bucket_size")
    if not 1 <= bucket_size <= MAX_BUCKET_SIZE:  # type: ignore[operator]
        raise ArgumentValueError(f"bucket_size must be in 1..{MAX_BUCKET_SIZE}, not {bucket_size}")


def _check_capacity(contacts: list, sizes: bytes, bucket_size: int) -> None:
    slots = len(sizes) * bucket_size
    if len(contacts) < slots:
        raise ArgumentValueError(f"contacts holds {len(contacts)} items, the layout needs {slots}")
    for size in sizes:
        if size > bucket_size:
            raise ArgumentValueError(f"sizes has a bucket of {size} > bucket_size {bucket_size}")


def _check_prefixes(prefixes: object, nbuckets: int) -> bytes:
    """A copy of ``prefixes``: one prefix length per bucket, each below ID_BITS, non-decreasing,
    the last greater than every other (it holds all deeper prefixes). Checked in one pass."""
    _check_buffer(prefixes, "prefixes")
    prefixes = bytes(prefixes)  # type: ignore[arg-type]  # read once, like sizes
    if len(prefixes) != nbuckets:
        raise ArgumentValueError(f"prefixes has {len(prefixes)} entries but sizes has {nbuckets}")
    for bucket, prefix in enumerate(prefixes):
        if prefix >= ID_BITS:
            raise ArgumentValueError(f"prefixes[{bucket}] is {prefix}, not below {ID_BITS}")
        if bucket and prefix < prefixes[bucket - 1]:
            raise ArgumentValueError(
                f"prefixes must be non-decreasing: prefixes[{bucket}] is {prefix}"
                f" after {prefixes[bucket - 1]}"
            )
    if nbuckets > 1 and prefixes[-1] == prefixes[-2]:
        raise ArgumentValueError(
            f"the last bucket's prefix must be greater than every other's: prefixes[{nbuckets - 1}]"
            f" is {prefixes[-1]}, as is prefixes[{nbuckets - 2}]"
        )
    return prefixes


def _node_id_at(contacts: list, slot: int) -> bytes:
    """``contacts[slot].node_id``, which must be bytes of ID_BYTES."""
    contact = contacts[slot]
    try:
        node_id = contact.node_id
    except AttributeError:
        raise ArgumentTypeError(
            f"contacts[{slot}] has no node_id ({type(contact).__name__})"
        ) from None
    if not isinstance(node_id, bytes):
        raise ArgumentTypeError(
            f"contacts[{slot}].node_id must be bytes (a NodeId), not {type(node_id).__name__}"
        )
    if len(node_id) != ID_BYTES:
        raise ArgumentValueError(
            f"contacts[{slot}].node_id must be {ID_BYTES} bytes long, not {len(node_id)}"
        )
    return node_id


def _key_at(keys: list, index: int) -> bytes:
    key = keys[index]
    if not isinstance(key, bytes):
        raise ArgumentTypeError(f"keys[{index}] must be bytes, not {type(key).__name__}")
    if len(key) != ID_BYTES:
        raise ArgumentValueError(f"keys[{index}] must be {ID_BYTES} bytes long, not {len(key)}")
    return key


# --- the kernel --------------------------------------------------------------------------------


def _common_prefix_bits(a: bytes, b: bytes) -> int:
    x = int.from_bytes(a, "big") ^ int.from_bytes(b, "big")
    return ID_BITS - x.bit_length()


def bucket_index(local_id: bytes, node_id: bytes) -> int:
    """Length in bits of the common prefix of two IDs: 0..159, or 160 when they are equal.

    Kademlia puts a contact whose ID shares exactly ``i`` leading bits with the local ID into
    bucket ``i`` (paper §2.2, in the shared-prefix form used by libp2p and discv5).
    """
    _check_id(local_id, "local_id")
    _check_id(node_id, "node_id")
    return _common_prefix_bits(local_id, node_id)


def find_in_bucket(contacts: list, first_slot: int, slot_count: int, node_id: bytes) -> int:
    """The slot in ``first_slot .. first_slot + slot_count - 1`` whose contact's ``node_id`` is
    ``node_id``, or -1. Each contact read is checked, up to the match."""
    _check_list(contacts, "contacts")
    _check_int(first_slot, "first_slot")
    _check_int(slot_count, "slot_count")
    _check_id(node_id, "node_id")
    if first_slot < 0 or slot_count < 0 or first_slot + slot_count > len(contacts):
        raise ArgumentValueError(
            f"first_slot {first_slot} and slot_count {slot_count} exceed contacts"
            f" ({len(contacts)} items)"
        )
    for slot in range(first_slot, first_slot + slot_count):
        if _node_id_at(contacts, slot) == node_id:
            return slot
    return -1


def closest_in_table(
    contacts: list,
    sizes: bytes,
    bucket_size: int,
    local_id: bytes,
    target: bytes,
    count: int,
    prefixes: bytes | None = None,
) -> list:
    """The ``count`` occupied slots' objects closest to ``target`` by XOR, nearest first.

    The layout is a routing table's. Bucket ``i`` has a prefix length ``p(i)``: ``prefixes[i]``,
    or ``i`` when ``prefixes`` is None (one bucket per prefix length, as ``routing.py`` keeps
    them). Bucket ``i`` below the last holds IDs sharing exactly ``p(i)`` leading bits with
    ``local_id``, and the last bucket those sharing at least ``P = p(last)``. With ``prefixes``
    several consecutive buckets may share one prefix length (the sub-buckets of Kademlia's
    accelerated lookups, §4.2, keyed by the next bits), so ``prefixes`` must be non-decreasing,
    below 160, one per bucket, and the last greater than every other (it holds everything
    deeper); anything else is an ``ArgumentValueError``.

    Then, with ``j = min(common_prefix(local_id, target), P)``, the buckets fall into groups that
    are strictly ordered by distance from ``target`` (every member of a group is nearer than every
    member of the next):

    - if ``j < P``: the buckets of prefix ``j`` (they agree with the target up to bit ``j``), then
      every bucket of prefix ``> j`` together, the last included (they differ from the target
      first at bit ``j``), then the buckets of prefix ``j - 1``, ``j - 2`` … ``0`` (they differ
      first at bit ``p``, farther as ``p`` falls); a prefix length with no bucket is no group;
    - if ``j == P``: the last bucket, then prefix ``P - 1``'s buckets, … ``0``'s.

    A group is all the buckets of one prefix length, not one bucket: every ID of prefix ``p < j``
    agrees with the target on the same ``p`` leading bits and differs from it at bit ``p``, so its
    distance lies in ``[2^(159-p), 2^(160-p))`` whichever sub-bucket holds it, and the groups stay
    strictly ordered; but the sub-buckets are keyed by bits past ``p``, where the target's bits
    are arbitrary, so they are not ordered among themselves and are ranked together.

    So only the groups that the answer reaches are ranked: for a full table and ``count`` no larger
    than the bucket size, usually one bucket. Within a group, slots are ranked by (distance, slot);
    only the contacts of ranked groups are read (and checked), in slot order, and the chosen ones
    are taken from ``contacts`` at the end. For a well-formed layout the result equals a full scan
    sorted by distance (the tests' oracle); for any other layout it is still what this procedure
    gives, in both kernels. ``prefixes`` is checked after the other arguments.
    """
    _check_table(contacts, sizes, bucket_size)
    _check_id(local_id, "local_id")
    _check_id(target, "target")
    count = _check_count(count)
    _check_capacity(contacts, sizes, bucket_size)  # type: ignore[arg-type]
    sizes = bytes(sizes)  # read once: a node_id property could change a bytearray
    last = len(sizes) - 1
    if prefixes is None:
        prefix_of: bytes | range = range(last + 1)
    else:
        prefix_of = _check_prefixes(prefixes, last + 1)
    if last < 0:
        return []
    j = min(_common_prefix_bits(local_id, target), prefix_of[last])
    # prefixes are sorted, so the buckets of one prefix length are a range of indices
    near, far = bisect_left(prefix_of, j), bisect_right(prefix_of, j)
    groups = [range(near, far), range(far, last + 1)]
    while near > 0:  # then one group per prefix length below j, deepest first
        start = bisect_left(prefix_of, prefix_of[near - 1], 0, near)
        groups.append(range(start, near))
        near = start
    goal = int.from_bytes(target, "big")
    chosen: list[int] = []
    for group in groups:
        need = count - len(chosen)
        if need <= 0:
            break
        scored = []
        for bucket in group:
            first = bucket * bucket_size
            for slot in range(first, first + sizes[bucket]):
                node = int.from_bytes(_node_id_at(contacts, slot), "big")
                scored.append((node ^ goal, slot))
        scored.sort()
        chosen.extend(slot for _, slot in scored[:need])
    return [contacts[slot] for slot in chosen]


def closest_in_sorted(keys: list, values: list, target: bytes, count: int) -> list:
    """The ``count`` values whose keys are closest to ``target`` by XOR, nearest first.

    ``keys`` is a list of distinct 20-byte IDs in ascending order and ``values`` the parallel
    list. The keys closer to ``target`` than some bound form a subtree of the binary trie, and in
    sorted order every subtree is a contiguous range. So the search descends: in a range whose keys
    share their first ``d`` bits, the keys whose bit ``d`` equals the target's are all closer than
    the others; take that half whole if it is not enough, and go on in the other. Each level is one
    binary search, so a query costs O(log² n), not O(n). Only keys that the search reads are
    checked, so the caller (``keys.KeyspaceIndex``) keeps the list valid.
    """
    _check_list(keys, "keys")
    _check_list(values, "values")
    _check_id(target, "target")
    count = _check_count(count)
    if len(values) != len(keys):
        raise ArgumentValueError(f"values has {len(values)} items but keys has {len(keys)}")
    need = min(count, len(keys))
    chosen: list[int] = []
    lo, hi = 0, len(keys)
    while need > 0:
        if hi - lo <= need:
            chosen.extend(range(lo, hi))
            break
        first, last = _key_at(keys, lo), _key_at(keys, hi - 1)
        depth = _common_prefix_bits(first, last)
        if depth >= ID_BITS:
            raise ArgumentValueError(f"keys must be distinct (keys[{lo}] == keys[{hi - 1}])")
        byte, shift = depth >> 3, 7 - (depth & 7)
        # first index whose bit `depth` is 1; keys[lo] has it 0 and keys[hi - 1] has it 1
        left, right = lo + 1, hi - 1
        while left < right:
            middle = (left + right) >> 1
            if (_key_at(keys, middle)[byte] >> shift) & 1:
                right = middle
            else:
                left = middle + 1
        if (target[byte] >> shift) & 1:
            near, far = (left, hi), (lo, left)
        else:
            near, far = (lo, left), (left, hi)
        near_size = near[1] - near[0]
        if near_size >= need:
            lo, hi = near
        else:
            chosen.extend(range(*near))
            need -= near_size
            lo, hi = far
    goal = int.from_bytes(target, "big")
    chosen.sort(key=lambda index: int.from_bytes(_key_at(keys, index), "big") ^ goal)
    return [values[index] for index in chosen]
