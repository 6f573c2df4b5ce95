"""The C keyspace kernel against its executable specification (``_keyspace_py``) and brute force.

``closest_in_table`` ranks the buckets in groups ordered by distance from the target (see the
spec). Two properties are tested. On a *well-formed* layout, as a routing table keeps it (bucket
``b`` below the last, ``L``, holds IDs sharing exactly ``b`` leading bits with ``local_id``, bucket
``L`` those sharing at least ``L``), each kernel gives what a full scan sorted by (XOR distance,
slot) gives. On *any* layout (random IDs in random slots, a local ID unrelated to them) each kernel
gives what the procedure gives, written out again here, so the C kernel gives exactly what the
Python one does (same objects, same order). IDs are drawn uniformly at random and also as ``base
XOR small`` and Kademlia-shaped, because random IDs never share long prefixes. Errors: for a
battery of bad inputs both kernels raise the same class with the same message, an
``ArgumentTypeError``/``ArgumentValueError`` that names the parameter, and a contact whose
``node_id`` is missing or not 20 bytes gets the same typed error from both. Plus huge counts,
keyword calls, signatures, reference counts, no finalizer running inside a C call's own
allocations, and ``node_id`` getters that run Python code (changing the list or ``sizes``).
"""

from __future__ import annotations

import gc
import inspect
import random
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sovereign_discovery import _keyspace_py as spec
from sovereign_discovery.errors import ArgumentTypeError, ArgumentValueError
from sovereign_discovery.keys import NodeId

ID_BYTES = 20
ID_BITS = 160
FUNCTIONS = ("bucket_index", "find_in_bucket", "closest_in_table", "closest_in_sorted")
# The fixtures are plain module lookups, so sharing them across examples is safe.
SETTINGS = settings(
    deadline=None, max_examples=120, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
FEW_EXAMPLES = settings(SETTINGS, max_examples=60)


def to_id(value: int) -> bytes:
    return value.to_bytes(ID_BYTES, "big")


def as_int(node_id: bytes) -> int:
    return int.from_bytes(node_id, "big")


def prefix_bits(a: int, b: int) -> int:
    return ID_BITS - (a ^ b).bit_length()


class Entry:
    """A table slot's object as the kernels read it: its ID is ``node_id``."""

    __slots__ = ("node_id", "slot")

    def __init__(self, node_id, slot=None):
        self.node_id = node_id
        self.slot = slot

    def __repr__(self) -> str:
        return f"Entry({self.slot})"


class NoId:
    """A free slot's filler that a kernel must never read (it has no ``node_id``)."""

    __slots__ = ()


class _Property:
    """An entry whose ``node_id`` is a property: ``get`` runs (Python code) at every read."""

    def __init__(self, get):
        self._get = get

    @property
    def node_id(self):
        return self._get()


def id_with_prefix(rng: random.Random, local: int, p: int) -> int:
    """A random ID sharing exactly ``p`` leading bits with ``local`` (its bucket ``p``); ``local``
    itself for ``p == 160``."""
    if p >= ID_BITS:
        return local
    flip = 1 << (ID_BITS - 1 - p)
    return ((local ^ flip) & ~(flip - 1)) | rng.getrandbits(ID_BITS - 1 - p)


def deep_prefix(rng: random.Random, at_least: int) -> int:
    """A prefix length ``>= at_least`` (<= 160) for the last bucket: mostly just past
    ``at_least``, often 100..159, now and then 160 (the local ID itself)."""
    choices = [at_least + rng.randrange(4), rng.randint(max(at_least, 100), max(at_least, 159))]
    return min(rng.choices(choices + [ID_BITS], weights=[12, 7, 1])[0], ID_BITS)


# --- strategies ---------------------------------------------------------------------------------

ids = st.integers(0, (1 << ID_BITS) - 1)
# How many low bits may differ from a base ID: few (deep levels, equal high words), around the
# 64-bit word boundaries, and many.
small_bits = st.sampled_from([1, 2, 3, 5, 8, 13, 31, 32, 63, 64, 65, 96, 127, 128, 129, 159])
bucket_sizes = st.sampled_from([1, 2, 3, 7, 20, 20, 20, 24, 255])
fills = st.sampled_from(["full", "random", "sparse"])


@st.composite
def id_pairs(draw):
    shape = draw(st.sampled_from(["random", "equal", "near"]))
    a = draw(ids)
    if shape == "random":
        b = draw(ids)
    elif shape == "equal":
        b = a
    else:
        b = a ^ draw(st.integers(1, (1 << draw(small_bits)) - 1))
    wrap = draw(st.sampled_from([bytes, NodeId]))
    return wrap(to_id(a)), wrap(to_id(b))


class Table:
    """A layout as ``closest_in_table`` reads it, with the IDs of the occupied slots as ints.

    ``make_id(bucket)`` gives the ID for each occupied slot of ``bucket``; with ``repeats``, some
    slots instead repeat an ID already in the same bucket (ties then break by slot). ``prefixes``
    (each bucket's prefix length, the 7th argument) is None unless set afterwards."""

    prefixes: bytes | bytearray | None = None

    def __init__(self, rng, bucket_size, sizes, local, make_id, repeats=False):
        self.bucket_size = bucket_size
        self.local = local
        self.local_id = to_id(local) if rng.random() < 0.5 else NodeId(to_id(local))
        slots = len(sizes) * bucket_size
        spare = rng.choice([0, 0, 1, 5])  # the list may be longer than the layout needs
        # free slots hold None (as a routing table's do), junk IDs or objects without one
        self.contacts = [
            rng.choice([None, Entry(rng.randbytes(ID_BYTES), slot), NoId()])
            for slot in range(slots + spare)
        ]
        self.occupied: dict[int, int] = {}
        self.by_bucket: list[list[int]] = []
        for bucket, size in enumerate(sizes):
            first = bucket * bucket_size
            for slot in range(first, first + size):
                if repeats and slot > first and rng.random() < 0.15:
                    value = self.occupied[rng.randrange(first, slot)]
                else:
                    value = make_id(bucket)
                node_id = to_id(value)
                wrap = bytes if rng.random() < 0.5 else NodeId
                self.contacts[slot] = Entry(wrap(node_id), slot)
                self.occupied[slot] = value
            self.by_bucket.append(list(range(first, first + size)))
        self.sizes = bytes(sizes) if rng.random() < 0.5 else bytearray(sizes)

    def args(self, target: bytes, count: int) -> tuple:
        args = self.contacts, self.sizes, self.bucket_size, self.local_id, target, count
        return args if self.prefixes is None else (*args, self.prefixes)

    def prefix_of(self, bucket: int) -> int:
        return bucket if self.prefixes is None else self.prefixes[bucket]

    def _ranked(self, slots, target: bytes) -> list[int]:
        goal = as_int(target)
        return sorted(slots, key=lambda slot: (self.occupied[slot] ^ goal, slot))

    def brute(self, target: bytes, count: int) -> list:
        """The oracle for well-formed layouts: a full scan sorted by (distance, slot)."""
        return [self.contacts[slot] for slot in self._ranked(self.occupied, target)[:count]]

    def grouped(self, target: bytes, count: int) -> list:
        """The spec's procedure, written out again: with ``P`` the last bucket's prefix length,
        the buckets of prefix ``j``, then those of prefix ``> j`` together, then those of prefix
        ``j-1`` … ``0``, each group ranked by (distance, slot), until ``count`` are chosen.
        Without ``prefixes`` bucket ``b`` has prefix ``b``: bucket ``j``, then ``j+1 .. L``, then
        ``j-1`` … ``0``."""
        buckets = range(len(self.by_bucket))
        if not buckets:
            return []
        j = min(prefix_bits(self.local, as_int(target)), self.prefix_of(buckets[-1]))
        of_prefix: dict[int, list[int]] = {}
        for b in buckets:
            of_prefix.setdefault(self.prefix_of(b), []).append(b)
        groups = [of_prefix.get(j, []), [b for b in buckets if self.prefix_of(b) > j]]
        groups += [of_prefix.get(p, []) for p in range(j - 1, -1, -1)]
        chosen: list[int] = []
        for group in groups:
            slots = [slot for b in group for slot in self.by_bucket[b]]
            chosen += self._ranked(slots, target)[: max(0, count - len(chosen))]
        return [self.contacts[slot] for slot in chosen]

    def members(self) -> list[int]:
        return list(self.occupied.values())


def fill_sizes(rng: random.Random, fill: str, bucket_size: int, nbuckets: int) -> list[int]:
    if fill == "full":
        return [bucket_size] * nbuckets
    if fill == "random":
        return [rng.randint(0, bucket_size) for _ in range(nbuckets)]
    return [rng.choice([0, 0, 0, 1, bucket_size]) for _ in range(nbuckets)]


def well_formed(rng, bucket_size, sizes, local, repeats=False) -> Table:
    """A routing table's layout: bucket ``b < L`` holds IDs sharing exactly ``b`` bits with
    ``local`` (``b == 160``: ``local`` itself; ``b > 160``: nothing), bucket ``L`` IDs sharing at
    least ``L`` (``L > 160``: nothing)."""
    last = len(sizes) - 1
    sizes = [size if b <= ID_BITS else 0 for b, size in enumerate(sizes)]

    def make_id(bucket: int) -> int:
        p = bucket if bucket < last else deep_prefix(rng, bucket)
        return id_with_prefix(rng, local, p)

    return Table(rng, bucket_size, sizes, local, make_id, repeats)


def local_ids(rng: random.Random, kind: str) -> int:
    return {"zero": 0, "ones": (1 << ID_BITS) - 1}.get(kind, rng.getrandbits(ID_BITS))


@st.composite
def well_formed_tables(draw):
    """Shallow tables (up to 40 buckets, any fill) and deep ones (100..166 buckets, so IDs share
    100..160 bits with the local ID, and buckets past 160 stay empty)."""
    rng = draw(st.randoms(use_true_random=False))
    if draw(st.sampled_from(["shallow", "shallow", "deep"])) == "shallow":
        bucket_size = draw(bucket_sizes)
        nbuckets = draw(st.integers(0, min(40, 900 // bucket_size)))
    else:
        bucket_size = draw(st.sampled_from([1, 3, 8]))
        nbuckets = draw(st.integers(100, 166))
    sizes = fill_sizes(rng, draw(fills), bucket_size, nbuckets)
    local = local_ids(rng, draw(st.sampled_from(["random", "random", "zero", "ones"])))
    return well_formed(rng, bucket_size, sizes, local, repeats=draw(st.booleans()))


@st.composite
def any_tables(draw):
    """Layouts that need not be well-formed: random IDs, IDs near a base, Kademlia-shaped around
    a base, or in random buckets; the local ID is the base, near it, or unrelated."""
    rng = draw(st.randoms(use_true_random=False))
    bucket_size = draw(bucket_sizes)
    nbuckets = draw(st.integers(0, min(40, 900 // bucket_size)))
    sizes = fill_sizes(rng, draw(fills), bucket_size, nbuckets)
    base, bits = rng.getrandbits(ID_BITS), draw(small_bits)
    shape = draw(st.sampled_from(["random", "prefix", "kademlia", "misplaced"]))
    local = {
        "base": base,
        "near": base ^ rng.getrandbits(draw(small_bits)),
        "random": rng.getrandbits(ID_BITS),
    }[draw(st.sampled_from(["base", "near", "random"]))]

    def make_id(bucket: int) -> int:
        if shape == "random":
            return rng.getrandbits(ID_BITS)
        if shape == "prefix":
            return base ^ rng.getrandbits(bits)
        if shape == "kademlia":
            return id_with_prefix(rng, base, bucket)
        return id_with_prefix(rng, base, rng.randrange(nbuckets + 2))

    table = Table(rng, bucket_size, sizes, local, make_id, repeats=draw(st.booleans()))
    if draw(st.booleans()):
        table.prefixes = random_prefixes(rng, nbuckets)
    return table


def random_prefixes(rng: random.Random, nbuckets: int) -> bytes:
    """Valid ``prefixes`` for ``nbuckets`` buckets: non-decreasing, below 160, the last greater
    than every other; from a narrow range now and then, so that many buckets share a prefix."""
    top = rng.choice([2, 5, 30, 159])
    values = sorted(rng.randrange(top) for _ in range(nbuckets - 1))
    tail = rng.randint(values[-1] + 1 if values else 0, ID_BITS - 1)
    return bytes(values + [tail][:nbuckets])


@st.composite
def sub_bucketed_tables(draw):
    """Well-formed layouts with ``prefixes``: the contacts of each prefix length ``p`` below the
    tail ``P`` (if it has buckets at all) split over 1..4 sub-buckets of at most ``bucket_size``,
    at random or in ID order (keyed by the next bits, as Kademlia's §4.2 buckets are); the last
    bucket holds the IDs sharing at least ``P`` bits. Shallow (``P`` < 31, less for big buckets),
    deep (``P`` 100..159, few prefixes with buckets) and many buckets (every prefix from 20 on
    split, so that the C kernel's copies of sizes and prefixes often do not fit on its stack).
    Drawn from a seed: the many random calls would exceed what hypothesis lets one example draw."""
    rng = random.Random(draw(st.integers(0, 2**64)))
    depth = draw(st.sampled_from(["shallow", "shallow", "deep", "many"]))
    first = 20 if depth == "many" else 0  # the first prefix that may have buckets
    if depth == "shallow":
        bucket_size = draw(bucket_sizes)
        tail, keep = rng.randint(0, min(30, 300 // bucket_size)), 0.8
    elif depth == "deep":
        bucket_size, tail, keep = draw(st.sampled_from([1, 3, 8])), rng.randint(100, 159), 0.1
    else:
        bucket_size, tail, keep = draw(st.sampled_from([1, 2])), rng.randint(140, 159), 1.0
    fill = draw(fills)
    local = local_ids(rng, draw(st.sampled_from(["random", "random", "zero", "ones"])))
    prefixes: list[int] = []
    sizes: list[int] = []
    members: list[int] = []
    for p in range(tail):
        if p < first or rng.random() >= keep:
            continue
        split = fill_sizes(rng, fill, bucket_size, rng.randint(1, 4))
        ids = [id_with_prefix(rng, local, p) for _ in range(sum(split))]
        if rng.random() < 0.5:
            ids.sort()
        members += ids
        prefixes += [p] * len(split)
        sizes += split
    size = fill_sizes(rng, fill, bucket_size, 1)[0]
    members += [id_with_prefix(rng, local, deep_prefix(rng, tail)) for _ in range(size)]
    prefixes.append(tail)
    sizes.append(size)
    ids = iter(members)
    table = Table(rng, bucket_size, sizes, local, lambda bucket: next(ids))
    table.prefixes = bytes(prefixes) if rng.random() < 0.5 else bytearray(prefixes)
    return table


@st.composite
def table_targets(draw, table: Table):
    """Random; the local ID, near it, or in one of its buckets (up to two past the last); a
    member, or near one."""
    members = table.members()
    kinds = ["random", "local", "near local", "in bucket"]
    kinds += ["member", "near member"] if members else []
    kind = draw(st.sampled_from(kinds))
    if kind == "random":
        return to_id(draw(ids))
    if kind == "in bucket":  # a prefix length up to two past the last bucket's
        tail = table.prefix_of(len(table.by_bucket) - 1) if table.by_bucket else -1
        prefix = draw(st.integers(0, min(tail + 2, ID_BITS)))
        return to_id(id_with_prefix(random.Random(draw(ids)), table.local, prefix))
    small = draw(st.integers(0, (1 << draw(small_bits)) - 1))
    if kind in ("local", "near local"):
        return to_id(table.local if kind == "local" else table.local ^ small)
    member = members[draw(st.integers(0, len(members) - 1))]
    return to_id(member if kind == "member" else member ^ small)


@st.composite
def targets_for(draw, members: list[int], base: int):
    """Random, equal to a member, a member XOR a small int, or the base XOR a small int."""
    kinds = ["random", "base"] + (["member", "near member"] if members else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "random":
        return to_id(draw(ids))
    small = draw(st.integers(0, (1 << draw(small_bits)) - 1))
    if kind == "base":
        return to_id(base ^ small)
    member = members[draw(st.integers(0, len(members) - 1))]
    return to_id(member if kind == "member" else member ^ small)


def counts_for(total: int, bucket_size: int = 20):
    return st.sampled_from(
        [0, 1, 2, 4, 5, 19, 20, 21, 64, 65, 100, bucket_size, total, total + 1, 2**70]
    ) | st.integers(0, total + 2)


@st.composite
def sorted_keys(draw):
    rng = draw(st.randoms(use_true_random=False))
    size = draw(st.sampled_from([0, 1, 2, 3, 20, 21, 64, 65, 300, 2000]) | st.integers(0, 40))
    shape = draw(st.sampled_from(["random", "prefix", "prefix"]))
    base, bits = rng.getrandbits(ID_BITS), draw(small_bits)
    values = set()
    for _ in range(size):
        values.add(rng.getrandbits(ID_BITS) if shape == "random" else base ^ rng.getrandbits(bits))
    keys = [to_id(v) for v in sorted(values)]
    if draw(st.booleans()):
        keys = [NodeId(k) for k in keys]
    return keys, base


def brute_sorted(keys: list, values: list, target: bytes, count: int) -> list:
    goal = as_int(target)
    order = sorted(range(len(keys)), key=lambda i: as_int(keys[i]) ^ goal)
    return [values[i] for i in order[:count]]


def outcome(function, *args, **kwargs):
    """("ok", result) or ("raised", exception class)."""
    try:
        return "ok", function(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - comparing what the kernels raise is the point
        return "raised", type(exc)


# --- results ------------------------------------------------------------------------------------


def test_c_module_shape(both_kernels):
    py, c = both_kernels
    assert c.__doc__ and "_keyspace_py" in c.__doc__
    assert sorted(c.__all__) == sorted(py.__all__) == sorted(FUNCTIONS)
    for name in FUNCTIONS:
        assert callable(getattr(c, name)) and getattr(c, name).__doc__
    constants = ("ID_BYTES", "ID_BITS", "MAX_BUCKET_SIZE")
    assert [getattr(c, n) for n in constants] == [getattr(py, n) for n in constants]


def test_signatures_match(both_kernels):
    py, c = both_kernels
    for name in FUNCTIONS:
        c_params = inspect.signature(getattr(c, name)).parameters.values()
        py_params = inspect.signature(getattr(py, name)).parameters.values()
        assert [(p.name, p.default) for p in c_params] == [(p.name, p.default) for p in py_params]
    assert inspect.signature(c.closest_in_table).parameters["prefixes"].default is None


@SETTINGS
@given(pair=id_pairs())
def test_bucket_index(kernel, pair):
    a, b = pair
    expected = ID_BITS - (as_int(a) ^ as_int(b)).bit_length()
    assert kernel.bucket_index(a, b) == expected
    assert kernel.bucket_index(b, a) == expected
    assert spec.bucket_index(a, b) == expected


@SETTINGS
@given(
    rng=st.randoms(use_true_random=False),
    slots=st.integers(0, 30),
    data=st.data(),
)
def test_find_in_bucket(kernel, rng, slots, data):
    base = rng.getrandbits(ID_BITS)
    values = [base ^ rng.getrandbits(data.draw(small_bits)) for _ in range(slots)]  # may repeat
    wrap = data.draw(st.sampled_from([bytes, NodeId]))
    contacts = [Entry(wrap(to_id(v)), s) for s, v in enumerate(values)]
    contacts += [None] * data.draw(st.sampled_from([0, 1, 3]))  # beyond the range: never read
    first = data.draw(st.integers(0, slots))
    count = data.draw(st.integers(0, slots - first))
    pool = values + [base, rng.getrandbits(ID_BITS)]
    node_id = to_id(pool[data.draw(st.integers(0, len(pool) - 1))])
    expected = next((s for s in range(first, first + count) if to_id(values[s]) == node_id), -1)
    assert kernel.find_in_bucket(contacts, first, count, node_id) == expected
    assert kernel.find_in_bucket(contacts, first, count, NodeId(node_id)) == expected
    if kernel is not spec:
        assert spec.find_in_bucket(contacts, first, count, node_id) == expected


def check_full_scan(kernel, table: Table, data) -> None:
    total = len(table.occupied)
    for _ in range(4):
        target = data.draw(table_targets(table))
        count = data.draw(counts_for(total, table.bucket_size))
        expected = table.brute(target, count)
        assert table.grouped(target, count) == expected  # the procedure is exact here
        got = kernel.closest_in_table(*table.args(target, count))
        assert got == expected
        assert all(g is e for g, e in zip(got, expected))  # the very objects, not copies
        if kernel is not spec:
            assert spec.closest_in_table(*table.args(target, count)) == expected


@FEW_EXAMPLES
@given(table=well_formed_tables(), data=st.data())
def test_closest_in_table_well_formed_is_the_full_scan(kernel, table, data):
    check_full_scan(kernel, table, data)


@SETTINGS
@given(table=sub_bucketed_tables(), data=st.data())
def test_closest_in_table_sub_buckets_is_the_full_scan(kernel, table, data):
    """With ``prefixes``: several buckets per prefix length, any split of its contacts between
    them, and a last bucket of any depth; the result is still the full scan's."""
    check_full_scan(kernel, table, data)


@FEW_EXAMPLES
@given(table=well_formed_tables(), data=st.data())
def test_prefixes_none_is_the_six_argument_call(kernel, table, data):
    """``prefixes=None`` (positional or by keyword) is the call without it, and so is
    ``prefixes=bytes(range(n))`` (bucket ``b`` has prefix ``b``) where it is valid (n <= 160)."""
    nbuckets = len(table.by_bucket)
    for _ in range(3):
        target = data.draw(table_targets(table))
        count = data.draw(counts_for(len(table.occupied), table.bucket_size))
        args = table.args(target, count)
        expected = kernel.closest_in_table(*args)
        assert kernel.closest_in_table(*args, None) == expected
        assert kernel.closest_in_table(*args, prefixes=None) == expected
        if nbuckets <= ID_BITS:
            assert kernel.closest_in_table(*args, bytes(range(nbuckets))) == expected


@FEW_EXAMPLES
@given(table=any_tables(), data=st.data())
def test_closest_in_table_any_layout_follows_the_procedure(kernel, table, data):
    """On a layout that is not well-formed the result need not be a full scan's, but it is the
    procedure's, in both kernels."""
    total = len(table.occupied)
    for _ in range(4):
        target = data.draw(table_targets(table))
        count = data.draw(counts_for(total, table.bucket_size))
        expected = table.grouped(target, count)
        assert len(expected) == min(count, total)
        got = kernel.closest_in_table(*table.args(target, count))
        assert got == expected
        assert all(g is e for g, e in zip(got, expected))
        if kernel is not spec:
            assert spec.closest_in_table(*table.args(target, count)) == expected


@FEW_EXAMPLES
@given(keys_base=sorted_keys(), data=st.data())
def test_closest_in_sorted(kernel, keys_base, data):
    keys, base = keys_base
    values = [("value", i) for i in range(len(keys))]
    members = [as_int(k) for k in keys]
    for _ in range(4):
        target = data.draw(targets_for(members, base))
        count = data.draw(counts_for(len(keys)))
        expected = brute_sorted(keys, values, target, count)
        got = kernel.closest_in_sorted(keys, values, target, count)
        assert got == expected
        assert all(g is e for g, e in zip(got, expected))
        if kernel is not spec:
            assert spec.closest_in_sorted(keys, values, target, count) == expected


@FEW_EXAMPLES
@given(keys_base=sorted_keys(), data=st.data())
def test_closest_in_sorted_same_traversal(both_kernels, keys_base, data):
    """Off-spec input the search does not reject (unsorted keys, a duplicate it never compares)
    still gives the same answer, or the same exception, from both kernels: same traversal."""
    py, c = both_kernels
    keys, base = keys_base
    keys = list(keys)
    rng = data.draw(st.randoms(use_true_random=False))
    if keys and data.draw(st.booleans()):
        keys.insert(rng.randrange(len(keys) + 1), rng.choice(keys))
    if data.draw(st.booleans()):
        rng.shuffle(keys)
    values = [("value", i) for i in range(len(keys))]
    target = data.draw(targets_for([as_int(k) for k in keys], base))
    count = data.draw(counts_for(len(keys)))
    assert outcome(c.closest_in_sorted, keys, values, target, count) == outcome(
        py.closest_in_sorted, keys, values, target, count
    )


def test_closest_in_table_misplaced_ids_follow_the_procedure(both_kernels):
    """Local ID 0, target 0, so j = L = 1: bucket 1 is ranked first, though the ID in bucket 0
    (which belongs far deeper) is the nearer. Both kernels give the procedure's answer."""
    near, far = Entry(to_id(1), "near"), Entry(to_id(1 << (ID_BITS - 1)), "far")
    layout = ([near, far], bytes([1, 1]), 1, to_id(0), to_id(0))
    for kernel in both_kernels:
        assert kernel.closest_in_table(*layout, 2) == [far, near]
        assert kernel.closest_in_table(*layout, 1) == [far]


def test_sub_buckets_of_one_prefix_are_ranked_together(both_kernels):
    """Prefix 0 has two sub-buckets; the target shares no bit with the local ID, so they are the
    first group, ranked together: the nearest is in the second sub-bucket, and a bad contact
    there is read (and raises) even when the first sub-bucket alone holds ``count`` contacts.
    Treating a sub-bucket as a group of its own would give ``far`` and no error."""
    top = 1 << (ID_BITS - 1)
    far, near = Entry(to_id(top), "far"), Entry(to_id(top | 1), "near")
    deep = Entry(to_id(1), "deep")  # the last bucket, prefix 1.. (shares >= 1 bit with 0)
    target = to_id(top | 1)
    layout = (bytes([1, 1, 1]), 1, to_id(0), target)
    for kernel in both_kernels:
        assert kernel.closest_in_table([far, near, deep], *layout, 1, bytes([0, 0, 1])) == [near]
        got = kernel.closest_in_table([far, near, deep], *layout, 3, bytes([0, 0, 1]))
        assert got == [near, far, deep]
        with pytest.raises(ArgumentTypeError, match=r"contacts\[1\]"):
            kernel.closest_in_table([far, NoId(), deep], *layout, 1, bytes([0, 0, 1]))
        # without prefixes bucket 1 has prefix 1, in the second group: bucket 0 alone suffices
        assert kernel.closest_in_table([far, NoId(), deep], *layout, 1) == [far]


def test_closest_in_table_deep_ties(kernel):
    """A last bucket of 255 IDs whose first 64 bits equal the local ID's, so high words tie, plus
    exact duplicates, which rank by slot; groups past 64 entries (sorted, not ranked by insertion);
    a target in bucket 0, whose second group is buckets 1 and 2 together."""
    rng = random.Random(5)
    local = rng.getrandbits(ID_BITS)
    near = iter([local ^ rng.getrandbits(96) for _ in range(255)])

    def make_id(bucket: int) -> int:
        return next(near) if bucket == 2 else id_with_prefix(rng, local, bucket)

    table = Table(rng, 255, [255, 100, 255], local, make_id)
    dup_slot, other = 2 * 255 + 3, 2 * 255 + 47
    table.occupied[other] = table.occupied[dup_slot]
    table.contacts[other] = Entry(to_id(table.occupied[dup_slot]), other)
    targets = [local, table.occupied[dup_slot], local ^ (1 << 100), id_with_prefix(rng, local, 0)]
    for target in map(to_id, targets):
        for count in (1, 5, 20, 64, 65, 254, 255, 256, 355, 356, 609, 610, 611):
            expected = table.brute(target, count)
            assert kernel.closest_in_table(*table.args(target, count)) == expected


# --- huge and odd counts ------------------------------------------------------------------------


@pytest.mark.parametrize("count", [2**70, 2**64, 2**63, 2**63 - 1, sys.maxsize, 10**30])
def test_huge_count_returns_everything(both_kernels, count):
    rng = random.Random(count % 1000)
    table = well_formed(rng, 20, [20, 7, 0, 20, 3], rng.getrandbits(ID_BITS))
    target = to_id(rng.getrandbits(ID_BITS))
    everything = table.brute(target, len(table.occupied))
    keys = sorted(to_id(rng.getrandbits(ID_BITS)) for _ in range(500))
    values = list(range(len(keys)))
    for kernel in both_kernels:
        assert kernel.closest_in_table(*table.args(target, count)) == everything
        assert kernel.closest_in_sorted(keys, values, target, count) == brute_sorted(
            keys, values, target, len(keys)
        )


def test_bool_counts_like_python(both_kernels):
    rng = random.Random(3)
    table = well_formed(rng, 4, [4, 4], rng.getrandbits(ID_BITS))
    target = to_id(rng.getrandbits(ID_BITS))
    for kernel in both_kernels:
        assert kernel.closest_in_table(*table.args(target, True)) == table.brute(target, 1)
        assert kernel.closest_in_table(*table.args(target, False)) == []
        assert kernel.find_in_bucket(table.contacts, False, True, to_id(table.occupied[0])) == 0


def test_keyword_arguments(both_kernels):
    py, c = both_kernels
    rng = random.Random(4)
    table = well_formed(rng, 3, [3, 2], rng.getrandbits(ID_BITS))
    target = to_id(rng.getrandbits(ID_BITS))
    kwargs = {"contacts": table.contacts, "sizes": table.sizes}
    kwargs.update(bucket_size=3, local_id=table.local_id)
    for kernel in (py, c):
        assert kernel.closest_in_table(target=target, count=3, **kwargs) == table.brute(target, 3)
        for prefixes in (None, bytes([0, 1]), bytearray([0, 1])):
            got = kernel.closest_in_table(target=target, count=3, prefixes=prefixes, **kwargs)
            assert got == table.brute(target, 3)
        assert kernel.bucket_index(node_id=target, local_id=target) == ID_BITS
    for call in (
        lambda k: k.closest_in_table(target=target, count=3, colour=1, **kwargs),
        lambda k: k.closest_in_table(table.contacts, target=target, count=3, **kwargs),
        lambda k: k.closest_in_table(*table.args(target, 3)[:-1]),
        lambda k: k.closest_in_table(*table.args(target, 3)[:3], target, 3),  # no local_id
        lambda k: k.closest_in_table(*table.args(target, 3), None, None),  # 8 arguments
        lambda k: k.closest_in_table(*table.args(target, 3), None, prefixes=None),
        lambda k: k.closest_in_table(prefixes=None, **kwargs),  # no target, count
        lambda k: k.closest_in_sorted([], [], target),
        lambda k: k.bucket_index(target, target, target),
    ):
        assert outcome(call, c)[1] is TypeError and outcome(call, py)[1] is TypeError


# --- errors -------------------------------------------------------------------------------------

GOOD = to_id(1)
KEYS = [to_id(v) for v in (1, 2, 3, 5, 8, 13, 21)]
VALUES = list(range(len(KEYS)))
ONE = [Entry(GOOD, 0)]  # a one-slot contacts list
TABLE = ([Entry(to_id(v), s) for s, v in enumerate((2, 3, 4, 5))] + [None, None], bytes([3, 1]), 3)


def table_call(**changes):
    args = dict(zip(("contacts", "sizes", "bucket_size"), TABLE))
    args.update(local_id=GOOD, target=GOOD, count=2)
    args.update(changes)
    return "closest_in_table", tuple(args.values())


def sorted_call(keys=KEYS, values=None, target=GOOD, count=2):
    values = VALUES[: len(keys)] if values is None else values
    return "closest_in_sorted", (keys, values, target, count)


def with_bad(*bad) -> list:
    """TABLE's contacts with ``bad`` (slot, object) pairs put in. TABLE's local ID and target are
    GOOD, so ``closest_in_table(..., count=2)`` reads slot 3 (bucket 1), then slots 0, 1, 2."""
    contacts = list(TABLE[0])
    for slot, entry in bad:
        contacts[slot] = entry
    return contacts


def replaced(position: int, key) -> list:
    keys = list(KEYS)
    keys[position] = key
    return keys


# (name, arguments, the parameter the message must name, expected class)
BAD_CALLS = [
    ("bucket_index", (None, GOOD), "local_id", ArgumentTypeError),
    ("bucket_index", (bytearray(GOOD), GOOD), "local_id", ArgumentTypeError),
    ("bucket_index", (memoryview(GOOD), GOOD), "local_id", ArgumentTypeError),
    ("bucket_index", (GOOD.hex(), GOOD), "local_id", ArgumentTypeError),
    ("bucket_index", (GOOD[:19], GOOD), "local_id", ArgumentValueError),
    ("bucket_index", (GOOD + b"\0", GOOD), "local_id", ArgumentValueError),
    ("bucket_index", (GOOD, 1), "node_id", ArgumentTypeError),
    ("bucket_index", (GOOD, b""), "node_id", ArgumentValueError),
    ("bucket_index", (b"", None), "local_id", ArgumentValueError),  # checked in order
    ("find_in_bucket", ("contacts", 0, 1, GOOD), "contacts", ArgumentTypeError),
    ("find_in_bucket", (tuple(ONE), 0, 1, GOOD), "contacts", ArgumentTypeError),
    ("find_in_bucket", (GOOD, 0, 1, GOOD), "contacts", ArgumentTypeError),
    ("find_in_bucket", (ONE, 0.0, 1, GOOD), "first_slot", ArgumentTypeError),
    ("find_in_bucket", (ONE, "0", 1, GOOD), "first_slot", ArgumentTypeError),
    ("find_in_bucket", (ONE, 0, None, GOOD), "slot_count", ArgumentTypeError),
    ("find_in_bucket", (ONE, 0, 1, bytearray(GOOD)), "node_id", ArgumentTypeError),
    ("find_in_bucket", (ONE, 0, 1, GOOD[:10]), "node_id", ArgumentValueError),
    ("find_in_bucket", (ONE, -1, 1, GOOD), "first_slot", ArgumentValueError),
    ("find_in_bucket", (ONE, 0, -1, GOOD), "slot_count", ArgumentValueError),
    ("find_in_bucket", (ONE, 1, 1, GOOD), "first_slot", ArgumentValueError),
    ("find_in_bucket", (ONE, 0, 2, GOOD), "slot_count", ArgumentValueError),
    ("find_in_bucket", (ONE * 3, 2, 2, GOOD), "slot_count", ArgumentValueError),
    ("find_in_bucket", (ONE, 2**70, 0, GOOD), "first_slot", ArgumentValueError),
    ("find_in_bucket", (ONE, 0, 2**70, GOOD), "slot_count", ArgumentValueError),
    ("find_in_bucket", (ONE, -(2**70), 2**70, GOOD), "first_slot", ArgumentValueError),
    ("find_in_bucket", (ONE, 2**63 - 1, 2**63 - 1, GOOD), "slot_count", ArgumentValueError),
    ("find_in_bucket", (None, None, None, None), "contacts", ArgumentTypeError),
    ("find_in_bucket", (ONE, -1, 0, b""), "node_id", ArgumentValueError),  # id before range
    # a contact read in the range whose node_id is missing or not 20 bytes of bytes
    ("find_in_bucket", ([NoId()], 0, 1, GOOD), "contacts[0]", ArgumentTypeError),
    ("find_in_bucket", ([None], 0, 1, GOOD), "contacts[0]", ArgumentTypeError),
    ("find_in_bucket", ([Entry(None)], 0, 1, GOOD), "contacts[0].node_id", ArgumentTypeError),
    ("find_in_bucket", ([Entry(bytearray(GOOD))], 0, 1, GOOD), "contacts[0]", ArgumentTypeError),
    ("find_in_bucket", ([Entry(GOOD.hex())], 0, 1, GOOD), "contacts[0]", ArgumentTypeError),
    ("find_in_bucket", ([Entry(1)], 0, 1, GOOD), "contacts[0]", ArgumentTypeError),
    ("find_in_bucket", ([Entry(GOOD[:19])], 0, 1, GOOD), "contacts[0]", ArgumentValueError),
    ("find_in_bucket", ([Entry(GOOD + b"\0")], 0, 1, GOOD), "contacts[0]", ArgumentValueError),
    ("find_in_bucket", ([Entry(b"")], 0, 1, GOOD), "contacts[0]", ArgumentValueError),
    ("find_in_bucket", ([None, Entry(to_id(2)), None], 1, 2, GOOD), "contacts[2]",
     ArgumentTypeError),
    (*table_call(contacts=None), "contacts", ArgumentTypeError),
    (*table_call(contacts=bytes(6 * ID_BYTES)), "contacts", ArgumentTypeError),
    (*table_call(contacts=tuple(TABLE[0])), "contacts", ArgumentTypeError),
    (*table_call(sizes=[3, 1]), "sizes", ArgumentTypeError),
    (*table_call(sizes="ab"), "sizes", ArgumentTypeError),
    (*table_call(bucket_size=3.0), "bucket_size", ArgumentTypeError),
    (*table_call(bucket_size=None), "bucket_size", ArgumentTypeError),
    (*table_call(bucket_size=0), "bucket_size", ArgumentValueError),
    (*table_call(bucket_size=256), "bucket_size", ArgumentValueError),
    (*table_call(bucket_size=-1), "bucket_size", ArgumentValueError),
    (*table_call(bucket_size=2**70), "bucket_size", ArgumentValueError),
    (*table_call(bucket_size=-(2**70)), "bucket_size", ArgumentValueError),
    (*table_call(local_id=None), "local_id", ArgumentTypeError),
    (*table_call(local_id=bytearray(GOOD)), "local_id", ArgumentTypeError),
    (*table_call(local_id=memoryview(GOOD)), "local_id", ArgumentTypeError),
    (*table_call(local_id=GOOD.hex()), "local_id", ArgumentTypeError),
    (*table_call(local_id=as_int(GOOD)), "local_id", ArgumentTypeError),
    (*table_call(local_id=b""), "local_id", ArgumentValueError),
    (*table_call(local_id=GOOD[:19]), "local_id", ArgumentValueError),
    (*table_call(local_id=GOOD + b"\0"), "local_id", ArgumentValueError),
    (*table_call(target="x" * 20), "target", ArgumentTypeError),
    (*table_call(target=bytearray(GOOD)), "target", ArgumentTypeError),
    (*table_call(target=GOOD * 2), "target", ArgumentValueError),
    (*table_call(count=2.0), "count", ArgumentTypeError),
    (*table_call(count=None), "count", ArgumentTypeError),
    (*table_call(count=-1), "count", ArgumentValueError),
    (*table_call(count=-(2**70)), "count", ArgumentValueError),
    (*table_call(contacts=TABLE[0][:-1]), "contacts", ArgumentValueError),
    (*table_call(contacts=[]), "contacts", ArgumentValueError),
    (*table_call(sizes=bytes([3, 4])), "sizes", ArgumentValueError),
    (*table_call(sizes=bytearray([255])), "sizes", ArgumentValueError),
    (*table_call(sizes=bytes(10**6)), "contacts", ArgumentValueError),  # huge, no overflow
    (*table_call(sizes=bytes(10**6), bucket_size=255), "contacts", ArgumentValueError),
    # the first failing check wins
    (*table_call(bucket_size=0, target=None), "bucket_size", ArgumentValueError),
    (*table_call(bucket_size=0, local_id=None), "bucket_size", ArgumentValueError),
    (*table_call(sizes=[1], local_id=None), "sizes", ArgumentTypeError),
    (*table_call(local_id=None, target=None), "local_id", ArgumentTypeError),
    (*table_call(local_id=GOOD[:5], target=b""), "local_id", ArgumentValueError),
    (*table_call(local_id=b"", count=-1), "local_id", ArgumentValueError),
    (*table_call(local_id=None, contacts=[]), "local_id", ArgumentTypeError),  # before capacity
    (*table_call(local_id=GOOD, target=None), "target", ArgumentTypeError),
    (*table_call(count=-1, contacts=[]), "count", ArgumentValueError),
    (*table_call(target=b"", count=None), "target", ArgumentValueError),
    (*table_call(contacts=[None] * 5), "contacts", ArgumentValueError),
    (*table_call(contacts=[], sizes=bytes([9, 9])), "contacts", ArgumentValueError),
    # a contact read while ranking whose node_id is missing or not 20 bytes of bytes; the
    # groups are read in order (slot 3, then 0, 1, 2) and the first bad one wins
    (*table_call(contacts=with_bad((3, NoId()))), "contacts[3]", ArgumentTypeError),
    (*table_call(contacts=with_bad((1, None))), "contacts[1]", ArgumentTypeError),
    (*table_call(contacts=with_bad((0, Entry(bytearray(GOOD))))), "contacts[0]", ArgumentTypeError),
    (*table_call(contacts=with_bad((2, Entry(b"")))), "contacts[2]", ArgumentValueError),
    (*table_call(contacts=with_bad((0, Entry(GOOD * 2)))), "contacts[0]", ArgumentValueError),
    (*table_call(contacts=with_bad((0, None), (3, Entry(b"")))), "contacts[3]", ArgumentValueError),
    (*table_call(contacts=with_bad((0, Entry(b"")), (2, None))), "contacts[0]", ArgumentValueError),
    (*table_call(contacts=with_bad((3, Entry(b""))), count=-1), "count", ArgumentValueError),
    # prefixes, the optional 7th argument, checked after the others (there, the parameter column
    # holds the words that name the problem)
    (*table_call(prefixes=[0, 1]), "prefixes must be bytes or bytearray", ArgumentTypeError),
    (*table_call(prefixes="ab"), "prefixes must be bytes", ArgumentTypeError),
    (*table_call(prefixes=memoryview(b"\0\1")), "prefixes must be bytes", ArgumentTypeError),
    (*table_call(prefixes=1), "prefixes must be bytes", ArgumentTypeError),
    (*table_call(prefixes=b"\0"), "prefixes has 1 entries but sizes has 2", ArgumentValueError),
    (*table_call(prefixes=bytearray(3)), "prefixes has 3 entries but sizes has 2",
     ArgumentValueError),
    (*table_call(contacts=[], sizes=b"", prefixes=b"\0"), "prefixes has 1 entries but sizes has 0",
     ArgumentValueError),
    (*table_call(prefixes=bytes([1, 0])), "non-decreasing: prefixes[1] is 0 after 1",
     ArgumentValueError),
    (*table_call(prefixes=bytes([0, 160])), "prefixes[1] is 160, not below 160",
     ArgumentValueError),
    (*table_call(prefixes=bytearray([255, 255])), "prefixes[0] is 255", ArgumentValueError),
    (*table_call(prefixes=bytes([7, 7])), "the last bucket's prefix must be greater",
     ArgumentValueError),
    (*table_call(sizes=bytes([1, 1, 1]), bucket_size=2, prefixes=bytes([0, 1, 1])),
     "prefixes[2] is 1, as is prefixes[1]", ArgumentValueError),
    (*table_call(sizes=bytes([1, 1, 1]), bucket_size=2, prefixes=bytes([0, 5, 3])),
     "prefixes[2] is 3 after 5", ArgumentValueError),
    # one pass: the first bad entry wins; checked even when count is 0 or the table is empty
    (*table_call(sizes=bytes([1, 1, 1]), bucket_size=2, prefixes=bytes([4, 3, 200])),
     "prefixes[1] is 3 after 4", ArgumentValueError),
    (*table_call(sizes=bytes([1, 1, 1]), bucket_size=2, prefixes=bytes([4, 200, 3])),
     "prefixes[1] is 200", ArgumentValueError),
    (*table_call(count=0, prefixes=bytes([1, 0])), "non-decreasing", ArgumentValueError),
    (*table_call(sizes=bytes(2), prefixes=bytes([3, 3])), "the last bucket", ArgumentValueError),
    (*table_call(count=-1, prefixes=[0]), "count", ArgumentValueError),
    (*table_call(target=None, prefixes=b"\0"), "target", ArgumentTypeError),
    (*table_call(contacts=[], prefixes=[0]), "contacts", ArgumentValueError),
    (*table_call(sizes=bytes([3, 4]), prefixes=b"\0"), "sizes", ArgumentValueError),
    # with prefixes [0, 1] the groups are TABLE's default ones: slot 3, then 0, 1, 2
    (*table_call(contacts=with_bad((1, None)), prefixes=bytes([0, 1])), "contacts[1]",
     ArgumentTypeError),
    (*sorted_call(keys=tuple(KEYS)), "keys", ArgumentTypeError),
    (*sorted_call(values=tuple(VALUES)), "values", ArgumentTypeError),
    (*sorted_call(target=None), "target", ArgumentTypeError),
    (*sorted_call(target=GOOD[1:]), "target", ArgumentValueError),
    (*sorted_call(count="2"), "count", ArgumentTypeError),
    (*sorted_call(count=-1), "count", ArgumentValueError),
    (*sorted_call(values=VALUES[:-1]), "values", ArgumentValueError),
    (*sorted_call(values=VALUES + [7]), "values", ArgumentValueError),
    (*sorted_call(values=VALUES[:-1], count=-1), "count", ArgumentValueError),
    # keys the search reads: keys[lo], keys[hi - 1], and the bisection's midpoints
    (*sorted_call(keys=replaced(0, None)), "keys", ArgumentTypeError),
    (*sorted_call(keys=replaced(0, bytearray(KEYS[0]))), "keys", ArgumentTypeError),
    (*sorted_call(keys=replaced(0, KEYS[0].hex())), "keys", ArgumentTypeError),
    (*sorted_call(keys=replaced(6, 21)), "keys", ArgumentTypeError),
    (*sorted_call(keys=replaced(6, KEYS[6][:19])), "keys", ArgumentValueError),
    (*sorted_call(keys=replaced(0, KEYS[0] + b"\0")), "keys", ArgumentValueError),
    (*sorted_call(keys=replaced(3, None)), "keys", ArgumentTypeError),
    (*sorted_call(keys=replaced(3, b"")), "keys", ArgumentValueError),
    (*sorted_call(keys=[KEYS[0]] * 3, count=1), "keys", ArgumentValueError),  # duplicates
    (*sorted_call(keys=[KEYS[0], KEYS[1], KEYS[0]], count=1), "keys", ArgumentValueError),
    (*sorted_call(keys=[None, None], count=1), "keys", ArgumentTypeError),
]


@pytest.mark.parametrize(
    "name, args, parameter, expected",
    BAD_CALLS,
    ids=[f"{call[0]}-{i}" for i, call in enumerate(BAD_CALLS)],
)
def test_error_parity(both_kernels, name, args, parameter, expected):
    raised = []
    for kernel in both_kernels:
        with pytest.raises((TypeError, ValueError)) as info:
            getattr(kernel, name)(*args)
        raised.append(info.value)
    py_error, c_error = raised
    assert type(c_error) is type(py_error) is expected
    assert str(c_error) == str(py_error)
    assert issubclass(expected, TypeError if expected is ArgumentTypeError else ValueError)
    assert parameter in str(py_error) and parameter in str(c_error)


def test_bad_key_where_the_search_reads_it(both_kernels):
    """Every position the search reads is checked, in the search's order: plant a bad key at each
    index of a longer list and compare what the kernels do (raise the same, or agree)."""
    rng = random.Random(11)
    keys = sorted(to_id(rng.getrandbits(ID_BITS)) for _ in range(200))
    values = list(range(len(keys)))
    target = to_id(rng.getrandbits(ID_BITS))
    py, c = both_kernels
    expected = py.closest_in_sorted(keys, values, target, 5)
    assert c.closest_in_sorted(keys, values, target, 5) == expected
    read = 0
    for index in range(len(keys)):
        for bad in (None, keys[index][:19]):
            broken = keys[:index] + [bad] + keys[index + 1 :]
            py_result, c_result = (
                outcome(k.closest_in_sorted, broken, values, target, 5) for k in (py, c)
            )
            checked = (ArgumentTypeError, ArgumentValueError)
            if py_result[0] == "raised" and issubclass(py_result[1], checked):
                read += 1
                assert c_result == py_result
            elif py_result[0] == "ok" and index not in expected:  # not read, not chosen
                assert c_result == py_result
    assert 20 < read < len(keys)  # a few hundred reads at most, yet more than a handful


def test_every_chosen_key_is_checked(kernel):
    """Keys that are only ranked, never compared by the search (here: all of them, as count covers
    the list), are still checked when ranked: a bad one raises, naming it, in both kernels (C must,
    for memory safety; the spec does the same so that they agree)."""
    target = to_id(0)
    with pytest.raises(ArgumentValueError, match=r"keys\[1\]"):
        kernel.closest_in_sorted([KEYS[0], KEYS[1][:19], KEYS[2]], [0, 1, 2], target, 3)
    with pytest.raises(ArgumentTypeError, match=r"keys\[2\]"):
        kernel.closest_in_sorted([KEYS[0], KEYS[1], None], [0, 1, 2], target, 3)


# --- references and re-entry ---------------------------------------------------------------------


def test_no_reference_leaks(both_kernels):
    rng = random.Random(9)
    table = well_formed(rng, 20, [20] * 30, rng.getrandbits(ID_BITS))  # 600 slots
    marker = Entry(to_id(rng.getrandbits(ID_BITS)))
    table.contacts = [marker] * len(table.contacts)
    keys = sorted(to_id(rng.getrandbits(ID_BITS)) for _ in range(1000))
    values = [marker] * len(keys)
    targets = [to_id(rng.getrandbits(ID_BITS)), table.local_id]  # a shallow and the deepest group
    bad_keys = [None] + keys[1:]
    local_id = table.local_id
    short, wrong = Entry(marker.node_id[:19]), Entry(bytearray(marker.node_id))  # bad node_ids
    bad_tables = [[marker] * 5 + [entry] + [marker] * 594 for entry in (short, wrong, NoId())]
    getter = _Property(lambda: marker.node_id)  # read through PyObject_GetAttr in C
    getter_table = [getter] * 600
    # sub-buckets in pairs (and the last deeper), as bytes and bytearray; and bad ones
    pairs = bytes([b // 2 for b in range(29)] + [20])
    good_prefixes = (pairs, bytearray(pairs), None)
    bad_prefixes = (bytes([1, 0] * 15), bytes(30), bytes(29), list(pairs), bytes([200] * 30))
    watched = (marker, marker.node_id, short, short.node_id, wrong, wrong.node_id, local_id, getter)
    watched += good_prefixes[:2] + bad_prefixes

    def table_calls(kernel, count, target):  # a function: its locals go when it returns
        for prefixes in good_prefixes:
            kernel.closest_in_table(*table.args(target, count), prefixes)

    def bad_prefix_calls(kernel):
        for prefixes in bad_prefixes:
            with pytest.raises((ArgumentTypeError, ArgumentValueError)):
                kernel.closest_in_table(*table.args(targets[0], 3), prefixes)

    for kernel in both_kernels:
        for count in (3, 20, 100, 2**70):  # stack and heap buffers, one group and several
            for target in targets:
                kernel.closest_in_table(*table.args(target, count))
                table_calls(kernel, count, target)
                kernel.closest_in_sorted(keys, values, target, count)
        gc.collect()
        before = [sys.getrefcount(o) for o in (*watched, *targets, keys[5])]
        for _ in range(100):
            for count in (3, 20, 100, 2**70):
                for target in targets:
                    kernel.closest_in_table(*table.args(target, count))
                    table_calls(kernel, count, target)
                    kernel.closest_in_sorted(keys, values, target, count)
            bad_prefix_calls(kernel)
            with pytest.raises(ArgumentTypeError):  # a bad contact read, with prefixes
                kernel.closest_in_table(bad_tables[2], *table.args(targets[0], 2**70)[1:], pairs)
            assert kernel.find_in_bucket(table.contacts, 40, 20, marker.node_id) == 40
            assert kernel.find_in_bucket(table.contacts, 40, 20, targets[0]) == -1
            assert kernel.find_in_bucket(getter_table, 40, 20, targets[0]) == -1
            assert len(kernel.closest_in_table(getter_table, *table.args(targets[0], 30)[1:])) == 30
            for contacts in bad_tables:
                with pytest.raises((ArgumentTypeError, ArgumentValueError)):
                    kernel.find_in_bucket(contacts, 0, 20, targets[0])
                with pytest.raises((ArgumentTypeError, ArgumentValueError)):
                    kernel.closest_in_table(contacts, *table.args(targets[0], 2**70)[1:])
            with pytest.raises(ArgumentTypeError):
                kernel.closest_in_sorted(bad_keys, values, targets[0], 20)
            with pytest.raises(ArgumentValueError):
                kernel.closest_in_table(*table.args(targets[0], -1))
            with pytest.raises(ArgumentTypeError):
                kernel.closest_in_table(*table.args(targets[0], 3)[:3], None, targets[0], 3)
        gc.collect()
        after = [sys.getrefcount(o) for o in (*watched, *targets, keys[5])]
        assert after == before


_INSIDE = [False]  # set around each kernel call
_FINALIZED_INSIDE: list[bool] = []  # one entry per finalizer run: was it inside a call?


class _Finalizer:
    """Cyclic garbage whose finalizer notes whether it ran inside a kernel call."""

    def __init__(self) -> None:
        self.cycle = self

    def __del__(self) -> None:
        _FINALIZED_INSIDE.append(_INSIDE[0])


def test_no_finalizer_runs_inside_a_c_call(both_kernels):
    """Creating the result list may start a garbage collection (at once, in CPython 3.11, when
    no freed list is at hand to reuse), and a finalizer could then resize the lists and
    bytearrays the C kernel is reading. The kernel pauses the collector meanwhile: with a
    collection due at every allocation and no freed lists, no finalizer runs inside a call."""
    _, c = both_kernels
    rng = random.Random(13)
    table = well_formed(rng, 20, [20] * 20, rng.getrandbits(ID_BITS))
    table.sizes = bytearray(table.sizes)
    keys = sorted(to_id(rng.getrandbits(ID_BITS)) for _ in range(300))
    values = list(range(len(keys)))
    contacts, sizes, local_id = table.contacts, table.sizes, table.local_id
    target = to_id(rng.getrandbits(ID_BITS))
    expected_table = table.brute(target, 20)
    expected_sorted = brute_sorted(keys, values, target, 20)
    inside, ran = _INSIDE, _FINALIZED_INSIDE
    ran.clear()
    thresholds = gc.get_threshold()
    gc.collect()
    try:
        gc.set_threshold(1)
        for _ in range(50):
            hold = [[] for _ in range(200)]  # use up the freed lists kept for reuse
            _Finalizer()
            inside[0] = True
            got_table = c.closest_in_table(contacts, sizes, 20, local_id, target, 20)
            inside[0] = False
            _Finalizer()
            inside[0] = True
            got_sorted = c.closest_in_sorted(keys, values, target, 20)
            inside[0] = False
            del hold
            assert got_table == expected_table and got_sorted == expected_sorted
    finally:
        inside[0] = False
        gc.set_threshold(*thresholds)
        gc.collect()
    assert ran and not any(ran)


# --- node_id read from the contacts -------------------------------------------------------------


def _raise(exc):
    raise exc


def _emptied() -> Entry:
    """An Entry whose node_id slot was deleted (C reads slots directly: it must see the gap)."""
    entry = Entry(GOOD)
    del entry.node_id
    return entry


class _Intercepted(Entry):
    """A slotted entry whose __getattribute__ answers node_id itself (C must not read the slot)."""

    __slots__ = ()

    def __getattribute__(self, name):
        return b"short" if name == "node_id" else object.__getattribute__(self, name)


@pytest.mark.parametrize(
    "bad, expected",
    [
        (NoId(), ArgumentTypeError),
        (_emptied(), ArgumentTypeError),
        (_Intercepted(GOOD), ArgumentValueError),
        (None, ArgumentTypeError),
        (Entry(None), ArgumentTypeError),
        (Entry(bytearray(20)), ArgumentTypeError),
        (Entry(memoryview(bytes(20))), ArgumentTypeError),
        (Entry("x" * 20), ArgumentTypeError),
        (Entry(b""), ArgumentValueError),
        (Entry(bytes(19)), ArgumentValueError),
        (Entry(NodeId(bytes(20)) + b"\0"), ArgumentValueError),
        (_Property(lambda: _raise(AttributeError("gone"))), ArgumentTypeError),
        (_Property(lambda: bytes(21)), ArgumentValueError),
        (_Property(lambda: _raise(RuntimeError("boom"))), RuntimeError),  # not ours: passed on
    ],
)
def test_bad_node_id_same_typed_error_from_both_kernels(both_kernels, bad, expected):
    """A contact read whose node_id is missing or not 20 bytes of bytes: both kernels raise the
    same class with the same message, naming the slot; find_in_bucket stops at a match before
    it, and closest_in_table reads only the groups it ranks."""
    rng = random.Random(21)
    table = well_formed(rng, 4, [4, 4, 4], rng.getrandbits(ID_BITS))
    slot = 5  # bucket 1
    table.contacts[slot] = bad
    in_bucket_0 = to_id(id_with_prefix(rng, table.local, 0))
    raised = []
    for kernel in both_kernels:
        with pytest.raises(expected) as find_info:
            kernel.find_in_bucket(table.contacts, 4, 4, in_bucket_0)
        with pytest.raises(expected) as closest_info:
            kernel.closest_in_table(*table.args(in_bucket_0, 5))  # bucket 0 is not enough
        raised.append((str(find_info.value), str(closest_info.value)))
        assert kernel.find_in_bucket(table.contacts, 4, 1, in_bucket_0) == -1  # slot 5 unread
        assert kernel.find_in_bucket(table.contacts, 4, 4, table.contacts[4].node_id) == 4
        assert kernel.closest_in_table(*table.args(in_bucket_0, 4)) == table.brute(in_bucket_0, 4)
    assert raised[0] == raised[1]
    if expected is not RuntimeError:
        assert all(f"contacts[{slot}]" in message for message in raised[0])


def test_node_id_getters_that_change_the_table(both_kernels):
    """A node_id property runs Python code inside a call. One that empties the contacts list
    makes both kernels raise IndexError (C must not read freed items); one that empties the
    sizes bytearray changes nothing (both read sizes once); one that replaces a list item gives
    the item in the list at the end, in both."""
    rng = random.Random(22)
    table = well_formed(rng, 4, [4, 4, 4], rng.getrandbits(ID_BITS))
    target = to_id(id_with_prefix(rng, table.local, 0))  # bucket 0 is ranked first
    expected = table.brute(target, 12)
    first, last = table.contacts[0], table.contacts[11]
    stranger = Entry(last.node_id, "stranger")  # same ID, another object
    for kernel in both_kernels:
        contacts = list(table.contacts)
        contacts[0] = _Property(lambda: (contacts.clear(), first.node_id)[1])
        with pytest.raises(IndexError):
            kernel.closest_in_table(contacts, bytearray(table.sizes), 4, table.local_id, target, 12)
        contacts = [None, first]
        contacts[0] = _Property(lambda: (contacts.clear(), GOOD)[1])
        with pytest.raises(IndexError):
            kernel.find_in_bucket(contacts, 0, 2, target)

        contacts, sizes = list(table.contacts), bytearray(table.sizes)
        getter = contacts[0] = _Property(lambda: (sizes.clear(), first.node_id)[1])
        got = kernel.closest_in_table(contacts, sizes, 4, table.local_id, target, 12)
        assert sizes == b"" and got == [getter if e is first else e for e in expected]

        sizes, prefixes = bytearray(table.sizes), bytearray([0, 1, 2])  # read once too
        getter = contacts[0] = _Property(
            lambda: (sizes.clear(), prefixes.__setitem__(slice(None), bytes(3)), first.node_id)[2]
        )
        got = kernel.closest_in_table(contacts, sizes, 4, table.local_id, target, 12, prefixes)
        assert prefixes == bytes(3) and got == [getter if e is first else e for e in expected]

        contacts = list(table.contacts)
        getter = contacts[0] = _Property(
            lambda: (contacts.__setitem__(11, stranger), first.node_id)[1]
        )
        got = kernel.closest_in_table(contacts, table.sizes, 4, table.local_id, target, 12)
        assert got == [{first: getter, last: stranger}.get(e, e) for e in expected]
