"""The sans-IO Kademlia engine (docs/engine.md): datagrams, ``now`` and commands in; datagrams,
events and one timer deadline out. It opens no socket, reads no clock and draws randomness only
from the injected ``random_bytes`` (keys, nonces) and ``rng`` (request IDs).

It composes the tested parts: :class:`~sovereign_discovery.session.SessionLayer` (authenticated
packets), :mod:`~sovereign_discovery.wire` (messages),
:class:`~sovereign_discovery.routing.RoutingTable`, :class:`~sovereign_discovery.lookup.Lookup`
and :class:`~sovereign_discovery.record_store.RecordStore`. Simulations may pass
``session_layer=`` a :class:`~sovereign_discovery.sim_session.SimulatedSessionLayer` (same
interface, no cryptography; never on a real network). The shape is aioquic's and h11's::

    engine = DhtEngine(identity, now=monotonic_now, unix_offset=time.time() - monotonic_now)
    engine.receive_datagram(data, source, now)      # never raises
    engine.handle_timer(now)                        # at engine.next_deadline() or later
    query = engine.find_record(node_id, now)        # commands return a query ID at once
    engine.datagrams_to_send(); engine.events(); engine.next_deadline(); engine.stats()

Rules (docs/engine.md, "Rules"):

- **Entering the table.** Only a peer whose message the session layer delivered (it completed a
  handshake) is inserted, with the address it was heard from. ``Pending(check=c)`` makes the
  engine PING ``c``: its PONG calls ``touch``, its timeout ``remove`` (Kademlia §2.2). The table
  asks for such a check only if ``c`` was not heard from within ``liveness_recent_s`` (BEP 5's
  "good" nodes), one per bucket at a time; ``stats()["liveness_checks"]`` counts them. Contacts
  from NODES answers are lookup candidates only.
- **Requests.** Random 8-byte request IDs from ``rng``; the outstanding table is capped
  (``max_outstanding_requests``); an answer is accepted only from the peer asked (node ID and
  address, i.e. the session), with the matching ID and an expected type, else dropped as
  ``unsolicited_response``. NODES/PROVIDERS parts are collected until ``total`` or the request's
  deadline (then the parts in hand count).
- **Timeouts** adapt per peer (RFC 6298): RTO = SRTT + 4·RTTVAR clamped to [0.25 s, 5 s], 1 s
  before any sample; the estimator table is an LRU of ``max_rtt_entries``. An unanswered request
  is sent once more (same ID) at its RTO and given up at twice the RTO (lookups too).
- **Serving** PING, FIND_NODE, STORE, FIND_VALUE, ANNOUNCE, GET_PROVIDERS as docs/engine.md says.
  Requests are admitted by a token bucket per source IP and a global one (``rate_limited``).
- **Lookups** are ``lookup.Lookup`` seeded from ``table.closest``. FIND_VALUE lookups run to the
  end and return the highest valid ``seq`` (a VALUE answer is a success for the lookup).

Network input never raises: whatever :meth:`DhtEngine.receive_datagram` is given, a problem is
counted under its reason in :meth:`DhtEngine.stats` (``drops``) and logged (the first of each
reason at INFO, later ones at DEBUG); a bug is counted as ``internal_error`` with a traceback.

Upkeep (docs/engine.md, "Upkeep"), run from :meth:`DhtEngine.handle_timer`: expiry of sessions
and stored records; bucket refresh (Kademlia §2.3: a lookup of a random ID in every bucket idle for
``refresh_interval_s``, and right after the join's self-lookup in every empty bucket farther
than the nearest neighbour plus at most ``join_refresh_buckets`` others, the farthest not full,
each ending at its ``join_refresh_closest`` closest);
forgetting per-peer state that no longer matters; republishing the own record and announcements
at half their TTL (§2.5); re-replicating stored records hourly (§2.5); eviction of table contacts
that fail ``evict_after_failures`` requests in a row; the external address from PONG votes
(discv5).

Not yet: disjoint-path lookups (S/Kademlia).
"""

from __future__ import annotations

import heapq
import logging
import math
import os
import random
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields, replace
from functools import partial

from .addresses import Address
from .constants import (DEFAULT_BUCKET_SIZE, DEFAULT_PARALLELISM, DEFAULT_RECORD_TTL_S, MAX_BUCKET_BITS,
                        MAX_BUCKET_SIZE)
from .counters import Counters
from .errors import ArgumentTypeError, ArgumentValueError, DecodeError
from .events import (
    ContactAdded,
    ContactRemoved,
    Event,
    ExternalAddressChanged,
    LookupFinished,
    PingFinished,
    ProvidersFound,
    QueryId,
    RecordAnnounced,
    RecordFound,
)
from .fastpath import FASTPATH_KERNEL, Responder
from .identity import Identity
from .keys import NodeId, bucket_index, check_node_id
from .lookup import Lookup, LookupParams
from .lookup import check_now as _check_now
from .record_store import RecordStore
from .records import PeerRecord, check_capability
from .routing import Contact, Inserted, Pending, RoutingTable
from .session import DROP_REASONS as SESSION_DROP_REASONS
from .session import SessionLayer, SessionLimits
from .wire import (
    Announce,
    FindNode,
    FindValue,
    GetProviders,
    MessageType,
    Nodes,
    Ping,
    Pong,
    Providers,
    Store,
    StoreResult,
    StoreStatus,
    Value,
    capability_key,
    MAX_NODES_PER_MESSAGE,
    decode_message,
    encode_message,
    encode_nodes_answer,
    split_nodes,
    split_providers,
)

__all__ = ["DhtEngine", "DhtConfig", "DROP_REASONS", "MIN_RTO_S", "MAX_RTO_S", "INITIAL_RTO_S"]

_log = logging.getLogger(__name__)

#: RFC 6298 adaptive timeout bounds (docs/engine.md): 1 s before any sample, then
#: SRTT + 4·RTTVAR clamped to [0.25 s, 5 s].
MIN_RTO_S = 0.25
MAX_RTO_S = 5.0
INITIAL_RTO_S = 1.0
#: A request waits this many times its RTO for an answer; at the RTO itself it is sent once more
#: with the same ID (discv5 retries requests too): a message lost, or lost in a session
#: re-handshake (the session layer carries only the last message again), gets a second chance.
#: Lookups get the same total timeout, so a peer stays IN_FLIGHT through its retry (a lookup
#: counts a timed-out peer neither for nor against termination, so ending the wait at the first
#: RTO let lookups finish without one of the true k closest). Karn's rule: a retried request
#: gives no round-trip sample.
_ATTEMPTS = 2.0

#: Every reason the engine drops a message, each a key of ``stats()["drops"]`` (the session
#: layer's reasons are merged in with a ``session.`` prefix).
DROP_REASONS = (
    "undecodable",  # the session delivered bytes that wire.decode_message refused
    "unsolicited_response",  # no outstanding request with that ID, from that peer, of that type
    "duplicate_response",  # from the peer asked, for a request already answered (e.g. retried)
    "late_response",  # from the peer asked, for a request already given up
    "rate_limited",  # a request over its source IP's or the global token bucket
    "invalid_record_received",  # a STORE, ANNOUNCE, VALUE or PROVIDERS record that does not verify
    # (or, in an answer, does not fit the key asked for)
    "outstanding_full",  # a request not sent: max_outstanding_requests reached
    "lookups_full",  # a lookup not started: max_lookups reached
    "no_route",  # a request not sent: the peer's address family has no socket (it fails at once)
    "unproven_address",  # a known contact heard at a new address its session has not proven (0-RTT):
    # the request is served, the table keeps the old address
    "internal_error",  # a bug: the input raised inside the engine (logged with a traceback)
)

#: A peer re-enters the table (moves to its bucket's most-recently-seen end) at most this often.
_REENTER_S = 1.0

#: Stats key of each message type ("find_node", ...).
_NAMES = {cls: cls.TYPE.name.lower() for cls in (Ping, Pong, FindNode, Nodes, Store, StoreResult, FindValue,
                                                 Value, Announce, GetProviders, Providers)}

#: Immutable per-engine values equal across engines (family sets, lookup parameters), kept once:
#: a simulation holds up to a million engines. At most _SHARED_MAX distinct values are kept.
_SHARED: dict = {}
_SHARED_MAX = 64
_NO_CAPABILITIES: frozenset[str] = frozenset()
_MESSAGE_NAMES = tuple(t.name.lower() for t in MessageType)  # the messages_in/_out counters


class _NoEntries(OrderedDict):
    """The one empty table every engine starts its per-peer tables with (finished requests,
    RTT estimators, rate-limit buckets, failure counts, address votes): 5 OrderedDicts, 640
    bytes an engine, that most of a million simulated engines never fill. Reading, ``pop`` with
    a default and a bounded ``while table:`` work on it; adding raises, so a write site that
    forgot to take its own table (``DhtEngine._own``) fails loudly instead of sharing entries."""

    __slots__ = ()

    def __setitem__(self, key, value) -> None:
        raise TypeError("the shared empty table is read-only: take the engine's own first")


_NO_ENTRIES = _NoEntries()


def _shared(value):
    """The one kept instance equal to the immutable ``value`` (``value`` itself if it is new)."""
    held = _SHARED.get(value)
    if held is not None:
        return held
    if len(_SHARED) < _SHARED_MAX:
        _SHARED[value] = value
    return value


#: Decoded messages are of these exact classes (a set: one lookup for a response too).
_REQUEST_TYPES = frozenset((Ping, FindNode, Store, FindValue, Announce, GetProviders))
_RESPONSE_TYPES = (Pong, Nodes, StoreResult, Value, Providers)


# --- configuration -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DhtConfig:
    """Settings of a :class:`DhtEngine`. Validated at construction: a wrong type or value raises
    :class:`~sovereign_discovery.errors.ArgumentTypeError` / ``ArgumentValueError`` naming the
    setting."""

    #: Kademlia's k (paper §2.2): bucket size, and the number of closest peers a lookup seeks and
    #: a record is stored at.
    bucket_size: int = DEFAULT_BUCKET_SIZE
    #: Kademlia's α (paper §2.3): lookup requests in flight.
    parallelism: int = DEFAULT_PARALLELISM
    #: Kademlia's b (paper §4.2, "accelerated lookups"), 1..4: bits of the target gained per
    #: routing step. With b > 1 each shared-prefix length has one bucket per value of the bits
    #: after it up to the end of its b-bit digit (2^b - 1 buckets per digit): a larger table
    #: (~1.45x at b = 2), fewer rounds (docs/routing-table.md). Local: the wire does not change.
    bucket_bits: int = 1
    #: Lifetime of the own record (Unix seconds after signing).
    record_ttl_s: float = float(DEFAULT_RECORD_TTL_S)
    #: Overall deadline of one lookup.
    lookup_deadline_s: float = 10.0
    #: A record lookup ends once this many peers (the node's own store counting as one) have
    #: answered with a valid record of the target, the highest ``seq`` among them winning; 0 = run
    #: until the k closest have answered (libp2p's ``Quorum(0)``). The target's own answer ends
    #: it at once: it signs every seq, so nothing newer exists. 1 is Kademlia §2.3 (FIND_VALUE
    #: halts at the first value); a stale copy can be told by the peer's PONG, which carries its
    #: current seq (as discv5's ENR seq). ``find_record(quorum=...)`` overrides.
    record_quorum: int = 1
    #: Outstanding requests (awaiting an answer) at most; beyond, a request is not sent.
    max_outstanding_requests: int = 1024
    #: Lookups running at most; beyond, a lookup command finishes at once with no result (counted
    #: as ``lookups_full``).
    max_lookups: int = 256
    #: Peers whose round-trip estimates are kept (LRU).
    max_rtt_entries: int = 4096
    #: Token bucket per source IP for requests: refill rate (requests/s) and burst size.
    rate_per_ip_per_s: float = 50.0
    burst_per_ip: float = 100.0
    #: The global token bucket for requests from anyone.
    rate_global_per_s: float = 2000.0
    burst_global: float = 4000.0
    #: Source IPs whose token buckets are kept (LRU; one forgotten starts again with a full
    #: bucket, which the global bucket bounds).
    max_rate_limited_ips: int = 10_000
    #: How often the session layer, the store and the rate buckets are expired.
    upkeep_interval_s: float = 1.0
    #: A bucket with no lookup through it for this long is refreshed with a lookup of a random ID
    #: in it (Kademlia §2.3 uses an hour; go-libp2p 10 minutes).
    refresh_interval_s: float = 600.0
    #: Right after the join's self-lookup every bucket farther than the nearest neighbour that is
    #: still empty is refreshed (a node with an empty bucket is a dead end for lookups into it),
    #: and of the other buckets that are not full, at most this many, the farthest first (0 =
    #: none). The rest fill from the traffic that reaches the node, and any still idle after
    #: ``refresh_interval_s`` are refreshed then (docs/engine.md, "Upkeep": Kademlia §2.3
    #: refreshes every such bucket at once; geth adds 3 random lookups; go-libp2p-kad-dht skips
    #: buckets refreshed recently and stops after gaps).
    join_refresh_buckets: int = 1
    #: The join's refresh lookups (above) end once this many of the closest peers to their
    #: random target have answered, rather than k (capped at ``bucket_size``). A join refresh is
    #: there to put contacts into an empty part of the table and the newcomer into the tables
    #: there; the k nearest of a random point are not otherwise wanted. The lookup's first
    #: answers already come from that part of the keyspace, so fewer closest cost fewer requests
    #: for about the same result (docs/engine.md, "Upkeep"; docs/benchmarks.md, "Join refresh
    #: depth"). The periodic refresh and every other lookup still seek k.
    join_refresh_closest: int = 5
    #: A full bucket PINGs its least-recently-seen entry for a newcomer only if that entry was not
    #: heard from within this many seconds (BEP 5: a node that answered in the last 15 minutes is
    #: "good" and is not pinged); the newcomer waits in the replacement cache meanwhile.
    liveness_recent_s: float = 900.0
    #: Stored records not re-published for this long are sent to the k closest again (Kademlia
    #: §2.5: hourly), at most ``max_replications_per_upkeep`` per upkeep.
    replication_interval_s: float = 3600.0
    max_replications_per_upkeep: int = 4
    #: A table contact that failed this many requests in a row (each already retried once) is
    #: removed, and the newest replacement promoted (geth removes after 4 failed FINDNODEs).
    evict_after_failures: int = 2
    #: External address (discv5's IP vote): PONGs report the address a peer saw; voters are counted
    #: once per /24 (/48 for IPv6), votes last ``address_vote_ttl_s``, and an address wins when at
    #: least ``min_address_votes`` voters, and more than half of those voting, report it.
    min_address_votes: int = 3
    address_vote_ttl_s: float = 600.0
    max_address_voters: int = 64

    def __post_init__(self) -> None:
        ints = {"bucket_size", "parallelism", "bucket_bits", "max_outstanding_requests", "max_lookups",
                "max_rtt_entries", "max_rate_limited_ips", "max_replications_per_upkeep",
                "evict_after_failures", "min_address_votes", "max_address_voters",
                "join_refresh_buckets", "join_refresh_closest", "record_quorum"}
        may_be_zero = {"join_refresh_buckets", "liveness_recent_s", "record_quorum"}
        for f in fields(self):
            name, value = f.name, getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ArgumentTypeError(f"{name} must be a number, not {type(value).__name__}")
            if name in ints and not isinstance(value, int):
                raise ArgumentTypeError(f"{name} must be an int, not {type(value).__name__}")
            if name in may_be_zero:
                if not (math.isfinite(value) and value >= 0):
                    raise ArgumentValueError(f"{name} must be >= 0 and finite, not {value!r}")
            elif not (math.isfinite(value) and value > 0):
                raise ArgumentValueError(f"{name} must be positive and finite, not {value!r}")
        if self.bucket_size > MAX_BUCKET_SIZE:
            raise ArgumentValueError(f"bucket_size must be in 1..{MAX_BUCKET_SIZE}, not {self.bucket_size}")
        if self.bucket_bits > MAX_BUCKET_BITS:
            raise ArgumentValueError(f"bucket_bits must be in 1..{MAX_BUCKET_BITS}, not {self.bucket_bits}")
        if self.burst_per_ip < 1 or self.burst_global < 1:
            raise ArgumentValueError("burst_per_ip and burst_global must be >= 1 (one request)")


# --- internal state ------------------------------------------------------------------------------


class _Request:
    """One outstanding request: answered only by ``peer`` (node ID and address), with
    ``request_id`` and a type in ``expected``."""

    __slots__ = ("request_id", "peer", "expected", "sent_at", "deadline", "on_done", "parts",
                 "total", "kind", "message", "retry_at")

    def __init__(self, request_id: bytes, peer: Contact, expected: tuple[type, ...], sent_at: float,
                 deadline: float, on_done: Callable[[list | None, float], None]) -> None:
        self.request_id = request_id
        self.peer = peer
        self.expected = expected
        self.sent_at = sent_at
        self.deadline = deadline
        self.on_done = on_done  # called with the answer's parts, or None on timeout
        self.parts: list = []
        self.total = 0
        self.kind: type | None = None  # the type of the first part: later parts must match
        self.message = None  # the request, for its one retry
        self.retry_at = math.inf  # when to send it again (inf: already retried, or answered)


class _Query:
    __slots__ = ("id", "kind", "target", "lookup", "best", "providers", "count", "capability",
                 "pending", "stored", "record", "answered", "learned", "deadline_s", "quorum",
                 "copies")

    def __init__(self, query_id: QueryId, kind: str, target: NodeId) -> None:
        self.id = query_id
        self.kind = kind  # find_node, find_record, find_providers, announce_record,
        # announce_capability, bootstrap
        self.target = target
        self.lookup: Lookup | None = None
        self.best: PeerRecord | None = None  # find_record: highest seq seen
        self.providers: dict[bytes, PeerRecord] = {}  # find_providers: by node ID
        self.count = 0
        self.capability = ""
        self.pending = 0  # bootstrap requests, or STORE/ANNOUNCE requests, awaiting an answer
        self.stored = 0
        self.record: PeerRecord | None = None  # announce: the record sent
        self.answered = False  # bootstrap: some contact answered
        self.learned: list[Contact] = []  # bootstrap: contacts from NODES answers
        self.deadline_s: float | None = None  # bootstrap: the self-lookup's deadline
        self.quorum = 0  # find_record: valid records that end the lookup (0: run to the end)
        #: find_record: the valid records received, as (who held it, its seq); None: our own store
        self.copies: list[tuple[Contact | None, int]] = []


class _TokenBucket:
    __slots__ = ("tokens", "last")

    def __init__(self, tokens: float, now: float) -> None:
        self.tokens = tokens
        self.last = now

    def take(self, rate: float, burst: float, now: float) -> bool:
        if now > self.last:
            self.tokens = min(burst, self.tokens + (now - self.last) * rate)
            self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


def _check_contact(value: object) -> Contact:
    if not isinstance(value, Contact):
        raise ArgumentTypeError(f"contact must be a Contact, not {type(value).__name__}")
    return value


def _check_deadline(value: object) -> float | None:
    if value is None:
        return None
    value = _check_now(value, "deadline_s")
    if value <= 0:
        raise ArgumentValueError(f"deadline_s must be positive, not {value}")
    return value


def _ignore_answer(parts: list | None, now: float) -> None:
    """For fire-and-forget requests: their answers (or timeouts) are counted, nothing else."""


def _check_quorum(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArgumentTypeError(f"quorum must be an int, not {type(value).__name__}")
    if value < 0:
        raise ArgumentValueError(f"quorum must be >= 0 (0: run the lookup to its end), not {value}")
    return value


# --- the engine ----------------------------------------------------------------------------------


class DhtEngine:
    """The sans-IO DHT engine of one identity. See the module docstring and docs/engine.md."""

    # Slots, not an instance dictionary (over 30 attributes, CPython's key-sharing dictionary
    # does not apply: ~1.7 KB per engine); a simulation holds up to a million engines.
    __slots__ = ("_advertised", "_capabilities", "_config", "_done", "_drops", "_entered", "_events",
                 "_failures", "_families", "_global_bucket", "_id", "_identity", "_in", "_ip_buckets",
                 "_learn_address", "_liveness_failed", "_lookup_params", "_next_query", "_next_upkeep",
                 "_out", "_own_record", "_published", "_queries", "_republish_at", "_requests",
                 "_responder", "_rng", "_rtt", "_sent", "_session", "_stats_evicted", "_stats_corrected", "_stats_retries",
                 "_store", "_table", "_timer_seq", "_timers", "_unix_offset", "_votes",
                 "_lookup_deadlines")

    def __init__(
        self,
        identity: Identity,
        *,
        config: DhtConfig = DhtConfig(),
        random_bytes: Callable[[int], bytes] = os.urandom,
        rng: random.Random | None = None,
        now: float,
        unix_offset: float,
        advertised_address: Address | None = None,
        learn_address: bool = True,
        session_limits: SessionLimits | None = None,
        families: Iterable[int] = (4, 6),
        session_layer: SessionLayer | None = None,
    ) -> None:
        if not isinstance(identity, Identity):
            raise ArgumentTypeError(f"identity must be an Identity, not {type(identity).__name__}")
        if not isinstance(config, DhtConfig):
            raise ArgumentTypeError(f"config must be a DhtConfig, not {type(config).__name__}")
        if not callable(random_bytes):
            raise ArgumentTypeError("random_bytes must be callable")
        if rng is not None and not isinstance(rng, random.Random):
            raise ArgumentTypeError(f"rng must be a random.Random, not {type(rng).__name__}")
        if advertised_address is not None and not isinstance(advertised_address, Address):
            raise ArgumentTypeError(
                f"advertised_address must be an Address, not {type(advertised_address).__name__}")
        now = _check_now(now)
        self._unix_offset = _check_now(unix_offset, "unix_offset")
        self._identity = identity
        self._id = identity.node_id
        self._config = config
        self._rng = rng if rng is not None else random.Random(random_bytes(32))
        self._advertised = advertised_address
        self._learn_address = bool(learn_address)
        self._families = frozenset(families)
        if not self._families or not self._families <= {4, 6}:
            raise ArgumentValueError(f"families must be a non-empty set of 4 and/or 6, not {families!r}")
        self._families = _shared(self._families)
        if session_limits is not None and not isinstance(session_limits, SessionLimits):
            raise ArgumentTypeError(
                f"session_limits must be a SessionLimits, not {type(session_limits).__name__}")
        if session_layer is None:
            # The engine's Unix clock, for the 0-RTT freshness window (session.py).
            self._session = SessionLayer(identity, random_bytes=random_bytes,
                                         limits=session_limits or SessionLimits(),
                                         unix_offset=self._unix_offset)
        else:
            # Simulations only (sim_session.SimulatedSessionLayer): a layer with the same
            # interface, built for this identity.
            if not all(callable(getattr(session_layer, name, None)) for name in ("send", "receive", "expire")):
                raise ArgumentTypeError("session_layer must have send, receive and expire methods")
            if session_limits is not None:
                raise ArgumentValueError("give session_limits or session_layer, not both")
            if getattr(session_layer, "node_id", None) != self._id:
                raise ArgumentValueError("session_layer must be built for this identity")
            self._session = session_layer
        self._table = RoutingTable(self._id, bucket_size=config.bucket_size, now=now,
                                   liveness_recent_s=config.liveness_recent_s, bucket_bits=config.bucket_bits)
        self._store = RecordStore()
        params = LookupParams(bucket_size=config.bucket_size, parallelism=config.parallelism,
                              deadline_s=config.lookup_deadline_s)
        self._lookup_params = _shared(params)
        self._out: list[tuple[Address, bytes]] = []
        self._events: list[Event] = []
        self._requests: dict[bytes, _Request] = {}
        #: (when, request ID) of every request's retry and deadline, a heap; entries of requests
        #: answered or already retried are dropped when they reach the top (or on a rebuild)
        self._timers: list[tuple[float, int, bytes]] = []
        #: (overall deadline, query ID) of every lookup started; entries of lookups that ended
        #: are dropped when they reach the top (next_deadline)
        self._lookup_deadlines: list[tuple[float, int]] = []
        self._timer_seq = 0
        #: request ID -> ((peer ID, address), drop reason, forget at) of requests recently
        #: finished, oldest first: bounded in count and kept past the deadline as long as the request had
        self._done: OrderedDict[bytes, tuple[Contact, str, float]] = _NO_ENTRIES
        self._queries: dict[QueryId, _Query] = {}
        self._next_query = 1
        #: node ID -> complex(srtt, rttvar): one 32-byte object per peer, not a list and two floats
        self._rtt: OrderedDict[bytes, complex] = _NO_ENTRIES
        self._ip_buckets: OrderedDict[object, _TokenBucket] = _NO_ENTRIES
        self._global_bucket = _TokenBucket(config.burst_global, now)
        self._next_upkeep = now + config.upkeep_interval_s
        self._own_record: PeerRecord | None = None
        self._capabilities: frozenset[str] = _NO_CAPABILITIES  # replaced when one is added
        self._published = False  # announce_record was called: keep the record published
        self._republish_at = math.inf
        self._failures: OrderedDict[bytes, int] = _NO_ENTRIES  # table contact -> failed requests in a row
        #: voter's IP group -> (address reported, when), oldest first
        self._votes: OrderedDict[tuple[int, int], tuple[Address, float]] = _NO_ENTRIES
        self._stats_evicted = 0
        self._liveness_failed = 0
        #: (node ID, address) -> when it last entered the table (cleared when full)
        self._entered: dict[tuple[bytes, Address], float] = {}
        self._drops = Counters(DROP_REASONS)  # counters are created on first use
        self._stats_retries = 0
        self._stats_corrected = 0  # stale record copies sent the newest after a record lookup
        self._in = Counters(_MESSAGE_NAMES)
        self._responder = None  # the serving fast path (make_responder), if the driver uses one
        self._sent = Counters(_MESSAGE_NAMES)

    # --- inspection ---------------------------------------------------------------------------------

    @property
    def node_id(self) -> NodeId:
        return self._id

    @property
    def config(self) -> DhtConfig:
        return self._config

    @property
    def table(self) -> RoutingTable:
        """The routing table (read it; the engine alone changes it)."""
        return self._table

    @property
    def session(self) -> SessionLayer:
        """The session layer (read it: ``has_session``, ``stats``; the engine alone drives it)."""
        return self._session

    @property
    def store(self) -> RecordStore:
        return self._store

    @property
    def own_record(self) -> PeerRecord | None:
        return self._own_record

    @property
    def advertised_address(self) -> Address | None:
        """The address the own record advertises (learned from PONGs unless fixed)."""
        return self._advertised

    @property
    def capabilities(self) -> frozenset[str]:
        return frozenset(self._capabilities)

    def contact(self, address: Address) -> Contact:
        """This node as a contact reachable at ``address`` (for others to bootstrap from)."""
        return Contact(self._identity.public_key, address)

    def rto(self, node_id: bytes) -> float:
        """The current request timeout for ``node_id`` (RFC 6298, clamped)."""
        entry = self._rtt.get(node_id if isinstance(node_id, bytes) else bytes(node_id))
        if entry is None:
            return INITIAL_RTO_S
        return min(MAX_RTO_S, max(MIN_RTO_S, entry.real + 4.0 * entry.imag))

    def stats(self) -> dict:
        """Messages in and out by type, drops by reason (the session layer's prefixed with
        ``session.``), and the sizes of every table."""
        session = self._session.stats
        drops = self._drops.full()
        for reason in SESSION_DROP_REASONS:
            drops["session." + reason] = session[reason]
        messages_in, messages_out = self._in.full(), self._sent.full()
        responder = self._responder
        if responder is not None:  # what the serving fast path answered
            fast = responder.counters()
            messages_in["ping"] += fast["ping_in"]
            messages_in["find_node"] += fast["find_node_in"]
            messages_out["pong"] += fast["pong_out"]
            messages_out["nodes"] += fast["nodes_out"]
        return {
            "messages_in": messages_in,
            "messages_out": messages_out,
            "drops": drops,
            "table_size": len(self._table),
            "sessions": session["sessions"],
            "outstanding_requests": len(self._requests),
            "requests_retried": self._stats_retries,
            "stale_copies_corrected": self._stats_corrected,
            "contacts_evicted": self._stats_evicted,
            "liveness_checks": self._liveness_stats(),
            "address_voters": len(self._votes),
            "lookups_running": sum(1 for q in self._queries.values()
                                   if q.lookup is not None and not q.lookup.finished),
            "queries_running": len(self._queries),
            "rtt_entries": len(self._rtt),
            "rate_limited_ips": len(self._ip_buckets),
            "store": self._store.stats,
            "session": session,
            "fast_path": None if responder is None else {
                "kernel": FASTPATH_KERNEL, "sessions_indexed": responder.indexed(), **fast},
        }

    # --- host interface ------------------------------------------------------------------------------

    def receive_datagram(self, data: bytes, source: Address, now: float) -> None:
        """Network input. Never raises: every problem is dropped and counted."""
        try:
            received = self._session.receive(data, source, now)
            self._queue_out(received.outgoing)
            for delivered in received.delivered:
                self._on_message(delivered.peer, delivered.message, now)
        except Exception:  # a bug: never let network input crash the engine
            self._drop("internal_error", "datagram from %s raised", source, exc_info=True)

    def receive_message(self, peer: Contact, data: bytes, now: float) -> None:
        """A message the serving fast path decrypted in a session with ``peer`` and left to the
        engine (docs/engine.md, "The serving fast path"). Never raises."""
        try:
            self._on_message(peer, data, now)
        except Exception:  # a bug: never let network input crash the engine
            self._drop("internal_error", "message from %s raised", peer, exc_info=True)

    def make_responder(self):
        """The serving fast path for this engine (a :class:`~.fastpath.Responder`, C or its
        twin) with its sessions indexed, or None when the session layer is not a
        :class:`SessionLayer` (a simulation's). The driver calls its ``serve_batch`` on its
        sockets; one responder per engine (docs/engine.md, "The serving fast path")."""
        if self._responder is not None:
            raise ArgumentValueError("the engine has a responder already")
        session = self._session
        if not isinstance(session, SessionLayer):
            return None
        responder = Responder(self._id, self._admit, self._enter_table, self._table.closest,
                              self._own_seq, self._serve_admitted, self._config.bucket_size,
                              session.limits.session_lifetime_s, _REENTER_S)
        session.attach_responder(responder)
        self._responder = responder
        return responder

    def handle_timer(self, now: float) -> None:
        """Apply request and lookup timeouts and run upkeep. Call at :meth:`next_deadline`."""
        now = _check_now(now)
        due = []
        timers = self._timers
        while timers and timers[0][0] <= now:
            when, _, rid = heapq.heappop(timers)
            request = self._requests.get(rid)
            if request is not None and when in (request.deadline, request.retry_at):
                due.append(request)
        for request in due:
            if request.deadline <= now:
                if self._requests.pop(request.request_id, None) is not None:
                    self._remember_done(request, "duplicate_response" if request.parts else "late_response")
                    if not request.parts:
                        self._note_failure(request.peer, now)
                    request.on_done(request.parts or None, now)
            elif request.retry_at <= now and request.request_id in self._requests:
                request.retry_at = math.inf
                self._retry(request, now)
        for query in list(self._queries.values()):
            if query.lookup is not None and not query.lookup.finished \
                    and query.id in self._queries:
                self._drive(query, now)
        if now >= self._next_upkeep:
            self._upkeep(now)

    def datagrams_to_send(self) -> list[tuple[Address, bytes]]:
        out, self._out = self._out, []
        return out

    def events(self) -> list[Event]:
        out, self._events = self._events, []
        return out

    def next_deadline(self) -> float | None:
        """The one time :meth:`handle_timer` is due: the earliest request deadline, lookup
        deadline (per-peer timeout or overall), or upkeep."""
        deadline = self._next_upkeep
        timers, requests = self._timers, self._requests
        while timers:  # drop entries of requests answered, given up or already retried
            when, _, rid = timers[0]
            request = requests.get(rid)
            if request is not None and when in (request.deadline, request.retry_at):
                break
            heapq.heappop(timers)
        if timers and timers[0][0] < deadline:
            deadline = timers[0][0]
        # A lookup's per-peer timeouts are its requests' deadlines (``_lookup_timeout`` is the
        # deadline ``_request`` sets, from the same ``now`` and RTO), already on ``timers``; only
        # each lookup's overall deadline needs a heap of its own.
        lookups, queries = self._lookup_deadlines, self._queries
        while lookups:
            when, query_id = lookups[0]
            query = queries.get(query_id)
            if query is not None and query.lookup is not None and not query.lookup.finished:
                if when < deadline:
                    deadline = when
                break
            heapq.heappop(lookups)
        return deadline

    # --- commands ------------------------------------------------------------------------------------

    def bootstrap(self, contacts: Iterable[Contact], now: float, *, deadline_s: float | None = None) -> QueryId:
        """PING and FIND_NODE(own ID) each contact (none enters the table before it answers);
        once one answers, a self-lookup runs (its deadline ``deadline_s``, default
        ``config.lookup_deadline_s``). Ends with :class:`LookupFinished`."""
        now = _check_now(now)
        deadline_s = _check_deadline(deadline_s)
        if isinstance(contacts, (bytes, str)) or not isinstance(contacts, Iterable):
            raise ArgumentTypeError(f"contacts must be an iterable of Contact, not {type(contacts).__name__}")
        contacts = list(contacts)
        for c in contacts:
            if not isinstance(c, Contact):
                raise ArgumentTypeError(f"contacts must hold Contact objects, not {type(c).__name__}")
        query = self._new_query("bootstrap", self._id)
        query.deadline_s = deadline_s
        for contact in contacts:
            if contact.node_id == self._id:
                continue
            for message_type, expected in ((Ping, (Pong,)), (FindNode, (Nodes,))):
                rid = self._request_id()
                message = Ping(rid, self._own_seq()) if message_type is Ping else FindNode(rid, self._id)
                if self._request(contact, message, expected, now,
                                 partial(self._on_bootstrap_answer, query.id), self.rto(contact.node_id)):
                    query.pending += 1
        if query.pending == 0:
            self._finish_bootstrap_failed(query)
        return query.id

    def ping(self, contact: Contact, now: float) -> QueryId:
        """PING ``contact`` over an authenticated session (one request and its retry). An answer
        proves the contact holds its key at its address, and puts it in the routing table, as
        any accepted answer does. Ends with :class:`PingFinished`."""
        contact = _check_contact(contact)
        now = _check_now(now)
        query = self._new_query("ping", contact.node_id)
        if contact.node_id == self._id or not self._request(
                contact, Ping(self._request_id(), self._own_seq()), (Pong,), now,
                partial(self._on_ping_answer, query.id, contact, now), self.rto(contact.node_id)):
            self._queries.pop(query.id, None)
            self._events.append(PingFinished(query.id, contact, False, None, None))
        return query.id

    def fetch_record(self, contact: Contact, now: float) -> QueryId:
        """Ask ``contact`` itself for its own record: one FIND_VALUE of its node ID sent to it
        (a node keeps its own signed record in its store). Cheaper than :meth:`find_record` when
        the peer is known; the answer must be a valid record of that very key. Ends with
        :class:`RecordFound` alone (no lookup runs); its record is None if the peer sent none."""
        contact = _check_contact(contact)
        now = _check_now(now)
        query = self._new_query("fetch_record", contact.node_id)
        if contact.node_id == self._id:
            self._queries.pop(query.id, None)
            self._events.append(RecordFound(query.id, contact.node_id, self._own_record))
        elif not self._request(contact, FindValue(self._request_id(), contact.node_id), (Value, Nodes), now,
                               partial(self._on_fetch_answer, query.id, contact), self.rto(contact.node_id)):
            self._queries.pop(query.id, None)
            self._events.append(RecordFound(query.id, contact.node_id, None))
        return query.id

    def find_node(self, target: bytes, now: float, *, deadline_s: float | None = None) -> QueryId:
        """Look up the k closest peers of ``target``. Ends with :class:`LookupFinished`.
        ``deadline_s`` overrides ``config.lookup_deadline_s`` for this lookup."""
        target = check_node_id("target", target)
        now = _check_now(now)
        deadline_s = _check_deadline(deadline_s)
        query = self._new_query("find_node", target)
        self._start_lookup(query, now, deadline_s=deadline_s)
        return query.id

    def find_record(self, node_id: bytes, now: float, *, deadline_s: float | None = None,
                    quorum: int | None = None) -> QueryId:
        """FIND_VALUE lookup of ``node_id``'s record: the highest valid ``seq`` among the first
        ``quorum`` valid records received (``config.record_quorum`` by default; 0 = every record
        until the lookup ends), the node's own stored copy counting as one; the target's own
        answer ends it at once. Ends with :class:`LookupFinished` then :class:`RecordFound`."""
        node_id = check_node_id("node_id", node_id)
        now = _check_now(now)
        deadline_s = _check_deadline(deadline_s)
        quorum = self._config.record_quorum if quorum is None else _check_quorum(quorum)
        query = self._new_query("find_record", node_id)
        query.quorum = quorum
        query.best = self._store.get(node_id, self._unix(now))
        if query.best is not None:
            query.copies.append((None, query.best.seq))
        # A quorum met by the own store needs no request (libp2p's GetValue counts its local
        # record; the kademlia package's get answers from its storage).
        self._start_lookup(query, now, deadline_s=deadline_s, no_requests=0 < quorum <= len(query.copies))
        return query.id

    def find_providers(self, capability: str, now: float, count: int = DEFAULT_BUCKET_SIZE, *,
                       deadline_s: float | None = None) -> QueryId:
        """GET_PROVIDERS lookup of ``capability``: stops once ``count`` verified providers are in
        hand. Ends with :class:`LookupFinished` then :class:`ProvidersFound`."""
        check_capability(capability)
        now = _check_now(now)
        if isinstance(count, bool) or not isinstance(count, int):
            raise ArgumentTypeError(f"count must be an int, not {type(count).__name__}")
        if count < 1:
            raise ArgumentValueError(f"count must be >= 1, not {count}")
        deadline_s = _check_deadline(deadline_s)
        key = capability_key(capability)
        query = self._new_query("find_providers", key)
        query.capability = capability
        query.count = count
        for record in self._store.providers(key, self._unix(now), count):
            query.providers[record.node_id] = record
        self._start_lookup(query, now, deadline_s=deadline_s)
        return query.id

    def announce_record(self, now: float, *, deadline_s: float | None = None) -> QueryId:
        """Sign a new own record (seq = max(previous + 1, Unix ms)), keep it locally, look up the
        own ID and STORE it at the k closest. Ends with :class:`LookupFinished` then
        :class:`RecordAnnounced`."""
        now = _check_now(now)
        deadline_s = _check_deadline(deadline_s)
        self._published = True
        return self._announce("announce_record", self._id, self._sign_record(now), now,
                              deadline_s=deadline_s)

    def announce_capability(self, name: str, now: float, *, deadline_s: float | None = None) -> QueryId:
        """Add ``name`` to the own record's capabilities (re-signed), and ANNOUNCE it at the k
        closest of ``capability_key(name)``. Ends with :class:`LookupFinished` then
        :class:`RecordAnnounced`."""
        check_capability(name)
        now = _check_now(now)
        deadline_s = _check_deadline(deadline_s)
        self._capabilities = self._capabilities | {name}
        record = self._sign_record(now)
        if self._published:  # the copies under the own ID would lack the capability
            self._announce("announce_record", self._id, record, now)
        return self._announce_capability(name, record, now, deadline_s)

    def refresh(self, now: float, *, force: bool = False) -> list[QueryId]:
        """Kademlia §2.3 bucket refresh: a lookup of a random ID in each bucket no lookup went
        through for ``config.refresh_interval_s`` (each bucket, with ``force``). Upkeep calls it;
        call it yourself to refresh at once. Each lookup ends with :class:`LookupFinished`."""
        now = _check_now(now)
        table = self._table
        if len(table) == 0:
            return []
        due = range(table.bucket_count) if force else table.buckets_due_for_refresh(
            now, self._config.refresh_interval_s)
        started = []
        for index in due:
            query = self._new_query("refresh", table.random_id_in_bucket(index, self._rng))
            self._start_lookup(query, now)
            started.append(query.id)
        return started

    def _announce(self, kind: str, key: bytes, record: PeerRecord, now: float, capability: str = "",
                  deadline_s: float | None = None) -> QueryId:
        """Look up ``key``, then STORE (records) or ANNOUNCE (providers) ``record`` at the k closest."""
        query = self._new_query(kind, key)
        query.record = record
        query.capability = capability
        self._start_lookup(query, now, deadline_s=deadline_s)
        return query.id

    def _announce_capability(self, name: str, record: PeerRecord, now: float,
                             deadline_s: float | None = None) -> QueryId:
        key = capability_key(name)
        self._store.add_provider(key, record, None, self._unix(now))
        return self._announce("announce_capability", key, record, now, name, deadline_s)

    def _republish(self, now: float) -> None:
        """Owners republish before expiry (Kademlia §2.5), and when the record changes: a new
        signed record STOREd at the k closest of the own ID and ANNOUNCEd for each capability."""
        record = self._sign_record(now)
        if self._published:
            self._announce("announce_record", self._id, record, now)
        for name in sorted(self._capabilities):
            self._announce_capability(name, record, now)

    # --- receiving -----------------------------------------------------------------------------------

    def _decoded(self, peer: Contact, data: bytes):
        """The message in ``data`` (counted in ``messages_in``), or None (dropped, counted)."""
        try:
            message = decode_message(data)
        except DecodeError as exc:
            self._drop("undecodable", "message from %s: %s", peer, exc)
            return None
        self._in[_NAMES[type(message)]] += 1
        return message

    def _on_message(self, peer: Contact, data: bytes, now: float) -> None:
        message = self._decoded(peer, data)
        if message is None:
            return
        is_request = type(message) in _REQUEST_TYPES
        if is_request and not self._admit(peer.address, now):
            self._drop("rate_limited", "request from %s", peer.address)
            return
        if is_request:
            self._enter_table(peer, now)
            self._serve(peer, message, now)
        else:
            self._on_response(peer, message, now)  # enters the table only if it is accepted

    def _serve_admitted(self, peer: Contact, data: bytes, now: float) -> None:
        """A request the fast path admitted (and entered in the table) but leaves to the engine
        to answer, e.g. when its answer spans several NODES messages."""
        message = self._decoded(peer, data)
        if message is not None:
            self._serve(peer, message, now)

    def _admit(self, source: Address, now: float) -> bool:
        """Token buckets: the source IP's, then the global one (docs/engine.md, Serving)."""
        config = self._config
        if source.is_loopback:  # local processes (tests, demos, many nodes on one host): global bucket only
            return self._global_bucket.take(config.rate_global_per_s, config.burst_global, now)
        ip = source.ip
        buckets = self._ip_buckets
        bucket = buckets.get(ip)
        if bucket is None:
            if buckets is _NO_ENTRIES:
                buckets = self._own("_ip_buckets")
            while len(buckets) >= config.max_rate_limited_ips:
                buckets.popitem(last=False)
            bucket = buckets[ip] = _TokenBucket(config.burst_per_ip, now)
        else:
            buckets.move_to_end(ip)
        if not bucket.take(config.rate_per_ip_per_s, config.burst_per_ip, now):
            return False
        return self._global_bucket.take(config.rate_global_per_s, config.burst_global, now)

    def _enter_table(self, peer: Contact, now: float) -> None:
        # A peer heard from within the last second keeps its place: the LRU order of a bucket
        # needs no finer grain, and a busy peer would otherwise pay a table update per message.
        key = (peer.node_id, peer.address)
        entered = self._entered
        last = entered.get(key)
        if last is not None and now - last < _REENTER_S:
            return
        if not self._session.address_proven(peer.node_id, peer.address):
            held = self._table.get(peer.node_id)
            if held is not None and held.address != peer.address:
                # A 0-RTT first message from an address not yet proven does not move a contact
                # (a copy raced from elsewhere could; docs/security.md, "0-RTT first contact").
                self._drop("unproven_address", "%s kept at %s, not moved", held, held.address)
                return
        if len(entered) >= self._config.max_rtt_entries:
            entered.clear()
        entered[key] = now
        result = self._table.insert(peer, now)
        if isinstance(result, Inserted):
            self._events.append(ContactAdded(peer))
        elif isinstance(result, Pending):
            check = result.check
            rid = self._request_id()
            self._request(check, Ping(rid, self._own_seq()), (Pong,), now,
                          partial(self._on_liveness, check), self.rto(check.node_id))

    def _on_liveness(self, check: Contact, parts: list | None, now: float) -> None:
        """Kademlia §2.2: the least-recently-seen entry answered (stays) or not (goes)."""
        if parts is not None:
            self._table.touch(check.node_id, now)
            return
        self._liveness_failed += 1
        self._remove_contact(check.node_id, now)

    def _liveness_stats(self) -> dict[str, int]:
        """Liveness checks of full buckets (Kademlia §2.2): ``started`` (PINGs sent to a bucket's
        oldest entry), ``skipped_recent`` (none needed: the oldest was heard from within
        ``liveness_recent_s``, BEP 5), ``coalesced`` (one already under way for that bucket),
        ``failed`` (the oldest did not answer and was removed)."""
        table = self._table.insert_counts
        return {"started": table["pending"], "skipped_recent": table["cached"],
                "coalesced": table["full"], "failed": self._liveness_failed}

    def _remove_contact(self, node_id: bytes, now: float) -> None:
        self._failures.pop(node_id, None)
        held = self._table.get(node_id)
        if held is not None:
            self._entered.pop((node_id, held.address), None)
        removed = self._table.remove(node_id, now)
        if removed is not None and removed.contact.node_id == node_id:
            self._events.append(ContactRemoved(removed.contact.node_id))
            if removed.promoted is not None:
                self._events.append(ContactAdded(removed.promoted))

    def _note_failure(self, peer: Contact, now: float) -> None:
        """A request to ``peer`` went unanswered (after its retry). A table contact that fails
        ``evict_after_failures`` requests in a row leaves the table (its replacement moves in)."""
        held = self._table.get(peer.node_id)
        if held is None or held.address != peer.address:
            return
        failures = self._failures if self._failures is not _NO_ENTRIES else self._own("_failures")
        count = failures.pop(peer.node_id, 0) + 1
        if count >= self._config.evict_after_failures:
            self._stats_evicted += 1
            self._remove_contact(peer.node_id, now)
            return
        while len(failures) >= self._config.max_rtt_entries:
            failures.popitem(last=False)
        failures[peer.node_id] = count

    def _vote(self, voter: Contact, observed: Address, now: float) -> None:
        """discv5's IP vote: a PONG reports the address the peer saw us at. One vote per voter
        /24 (/48), kept ``address_vote_ttl_s``; an address reported by at least
        ``min_address_votes`` voters and by a majority of them becomes the advertised one."""
        if not self._learn_address:
            return
        config = self._config
        votes = self._votes if self._votes is not _NO_ENTRIES else self._own("_votes")
        group = voter.address.ip_group()
        votes.pop(group, None)
        votes[group] = (observed, now)
        while len(votes) > config.max_address_voters:
            votes.popitem(last=False)
        cutoff = now - config.address_vote_ttl_s
        while votes and next(iter(votes.values()))[1] < cutoff:
            votes.popitem(last=False)
        tally: dict[Address, int] = {}
        for address, _ in votes.values():
            tally[address] = tally.get(address, 0) + 1
        address, count = max(tally.items(), key=lambda item: item[1])
        if count >= config.min_address_votes and 2 * count > len(votes) and address != self._advertised:
            self._advertised = address
            self._events.append(ExternalAddressChanged(address))
            if self._own_record is not None:
                self._republish(now)

    def _on_response(self, peer: Contact, message, now: float) -> None:
        request = self._requests.get(message.request_id)
        if request is None:
            done = self._done.get(message.request_id)
            if done is not None and done[0].node_id == peer.node_id and done[0].address == peer.address:
                self._drop(done[1], "%s from %s", message.TYPE.name, peer)
                return
        if (request is None or request.peer.node_id != peer.node_id
                or request.peer.address != peer.address
                or not isinstance(message, request.expected)
                or (request.kind is not None and type(message) is not request.kind)):
            self._drop("unsolicited_response", "%s from %s", message.TYPE.name, peer)
            return
        self._enter_table(peer, now)
        if request.kind is None:
            if self._failures:
                self._failures.pop(peer.node_id, None)
            if type(message) is Pong:
                self._vote(peer, message.observed, now)
            request.kind = type(message)
            if request.retry_at != math.inf:  # Karn: no sample from a retried request
                self._sample_rtt(peer.node_id, now - request.sent_at)
            request.retry_at = math.inf
        request.parts.append(message)
        total = getattr(message, "total", 1)
        if request.total == 0:
            request.total = total
        if len(request.parts) >= request.total:
            del self._requests[request.request_id]
            self._remember_done(request, "duplicate_response")
            request.on_done(request.parts, now)

    # --- serving -------------------------------------------------------------------------------------

    def _serve(self, peer: Contact, message, now: float) -> None:
        rid = message.request_id
        k = self._config.bucket_size
        if isinstance(message, Ping):
            self._send(peer, Pong(rid, self._own_seq(), peer.address), now)
        elif isinstance(message, FindNode):
            self._send_nodes(peer, rid, message.target, now)
        elif isinstance(message, Store):
            status = self._accept(peer, message.record, now, lambda record, unix: self._store.put(
                message.key, record, peer.node_id, unix))
            self._send(peer, StoreResult(rid, status), now)
        elif isinstance(message, FindValue):
            record = self._store.get(message.key, self._unix(now))
            if record is not None:
                self._send(peer, Value(rid, record.encoded), now)
            else:
                self._send_nodes(peer, rid, message.key, now)
        elif isinstance(message, Announce):
            status = self._accept(peer, message.record, now, lambda record, unix: self._store.add_provider(
                message.capability_key, record, peer.node_id, unix))
            self._send(peer, StoreResult(rid, status), now)
        elif isinstance(message, GetProviders):
            records = [r.encoded for r in self._store.providers(message.capability_key, self._unix(now), k)]
            if not records:
                self._send_nodes(peer, rid, message.capability_key, now)
                return
            for n in range(len(records), 0, -1):  # as many as fit one response
                try:
                    pieces = split_providers(rid, records[:n])
                except ArgumentValueError:
                    continue
                for piece in pieces:
                    self._send(peer, piece, now)
                return

    def _accept(self, peer: Contact, raw: bytes, now: float,
                put: Callable[[PeerRecord, float], StoreStatus]) -> StoreStatus:
        unix = self._unix(now)
        try:
            record = PeerRecord.decode(raw, now=unix)
        except DecodeError as exc:
            self._drop("invalid_record_received", "STORE/ANNOUNCE record from %s: %s", peer, exc)
            return StoreStatus.INVALID_RECORD
        return put(record, unix)

    def _send_nodes(self, peer: Contact, rid: bytes, target: bytes, now: float) -> None:
        contacts = self._table.closest(target, self._config.bucket_size)
        if len(contacts) <= MAX_NODES_PER_MESSAGE:  # k <= 20: one message, the hot path
            self._sent["nodes"] += 1
            self._queue_out(self._session.send(peer, encode_nodes_answer(rid, contacts), now))
            return
        for piece in split_nodes(rid, contacts):
            self._send(peer, piece, now)

    # --- requests ------------------------------------------------------------------------------------

    def _request(self, peer: Contact, message, expected: tuple[type, ...], now: float,
                 on_done: Callable[[list | None, float], None], timeout_s: float) -> bool:
        """Send a request, again at ``now + timeout_s`` if unanswered, and await its answer until
        ``now + 2 × timeout_s``. False (and nothing sent) when the outstanding table is full."""
        if len(self._requests) >= self._config.max_outstanding_requests:
            self._drop("outstanding_full", "request to %s not sent", peer)
            return False
        if peer.address.version not in self._families:
            self._drop("no_route", "request to %s not sent: no IPv%d socket", peer, peer.address.version)
            return False
        request = _Request(message.request_id, peer, expected, now,
                           now + _ATTEMPTS * timeout_s, on_done)
        request.message = message
        request.retry_at = now + timeout_s
        self._requests[message.request_id] = request
        timers = self._timers
        if len(timers) > 4 * len(self._requests) + 64:  # mostly stale entries: rebuild
            timers[:] = [(w, i, r.request_id) for i, r in enumerate(self._requests.values())
                         for w in (r.deadline, r.retry_at) if w != math.inf]
            heapq.heapify(timers)
        self._timer_seq += 1  # ties go in the order the requests were made
        heapq.heappush(timers, (request.retry_at, self._timer_seq, message.request_id))
        heapq.heappush(timers, (request.deadline, self._timer_seq, message.request_id))
        self._send(peer, message, now)
        return True

    def _remember_done(self, request: _Request, reason: str) -> None:
        """Remember a finished request past its deadline for as long again as the request had
        (twice its RTO: a second answer, to the retry, comes within about one RTT of the first),
        so that a late or second answer is counted as ``late_response`` / ``duplicate_response``
        rather than as unsolicited; then forget it (per-peer state must not grow with the peers a
        node ever talked to: a fixed 10 s kept ~140 entries, ~30 KB, per node after a join)."""
        done = self._done if self._done is not _NO_ENTRIES else self._own("_done")
        self._forget_done(request.sent_at)  # now >= sent_at: whatever expired by then goes
        while len(done) >= self._config.max_outstanding_requests:
            done.popitem(last=False)
        done[request.request_id] = (request.peer, reason, 2 * request.deadline - request.sent_at)

    def _forget_done(self, now: float) -> None:
        """Drop the finished requests remembered long enough (oldest first; entries finish in
        nearly deadline order, so the scan stops at the first one still kept)."""
        done = self._done
        while done:
            first = next(iter(done.values()))
            if first[2] > now:
                break
            done.popitem(last=False)

    def _request_id(self) -> bytes:
        while True:
            rid = self._rng.getrandbits(64).to_bytes(8, "big")
            if rid not in self._requests and rid not in self._done:
                return rid

    def _send(self, peer: Contact, message, now: float) -> None:
        self._sent[_NAMES[type(message)]] += 1
        self._queue_out(self._session.send(peer, encode_message(message), now))

    def _retry(self, request: _Request, now: float) -> None:
        """Send an unanswered request once more (the session layer retries its handshake too)."""
        self._stats_retries += 1
        self._sent[_NAMES[type(request.message)]] += 1
        self._queue_out(self._session.send(request.peer, encode_message(request.message), now))

    def _queue_out(self, outgoing) -> None:
        for item in outgoing:
            self._out.append((item.address, item.datagram))

    def _own(self, name: str) -> OrderedDict:
        """The engine's own table ``name`` in place of the shared empty one, on its first entry."""
        table: OrderedDict = OrderedDict()
        setattr(self, name, table)
        return table

    def _sample_rtt(self, node_id: bytes, sample: float) -> None:
        """RFC 6298 §2: SRTT/RTTVAR from one round-trip sample."""
        table = self._rtt
        entry = table.get(node_id)
        if entry is None:
            if table is _NO_ENTRIES:
                table = self._own("_rtt")
            while len(table) >= self._config.max_rtt_entries:
                table.popitem(last=False)
            table[node_id] = complex(sample, sample / 2.0)
            return
        table.move_to_end(node_id)
        srtt, rttvar = entry.real, entry.imag
        table[node_id] = complex(0.875 * srtt + 0.125 * sample, 0.75 * rttvar + 0.25 * abs(srtt - sample))

    # --- lookups -------------------------------------------------------------------------------------

    def _new_query(self, kind: str, target: NodeId) -> _Query:
        query = _Query(self._next_query, kind, target)
        self._next_query += 1
        self._queries[query.id] = query
        return query

    def _start_lookup(self, query: _Query, now: float, extra_seeds: Iterable[Contact] = (),
                      deadline_s: float | None = None, no_requests: bool = False,
                      closest: int | None = None) -> None:
        """Start ``query``'s lookup from the table's closest and ``extra_seeds``; with
        ``no_requests`` (already answered locally) it has no seeds and ends at once. ``closest``
        (at most k) ends it once that many closest have answered instead of k."""
        running = sum(1 for q in self._queries.values() if q.lookup is not None and not q.lookup.finished)
        seeds: list[Contact] = []
        if running >= self._config.max_lookups and not no_requests:
            self._drop("lookups_full", "lookup for %s not started", query.target)
        elif not no_requests:
            seeds = self._table.closest(query.target, self._config.bucket_size)
            known = {c.node_id for c in seeds}
            seeds += [c for c in extra_seeds if c.node_id not in known and c.node_id != self._id]
        if query.target != self._id:
            self._table.mark_bucket_active(self._table.bucket_index(query.target), now)
        params = self._lookup_params
        if deadline_s is not None:
            params = replace(params, deadline_s=deadline_s)
        if closest is not None and closest < params.bucket_size:
            params = replace(params, bucket_size=closest)  # max_candidates stays
        query.lookup = Lookup(self._id, query.target, seeds, params=params, now=now,
                              request_timeout_s=self._lookup_timeout)
        heapq.heappush(self._lookup_deadlines, (query.lookup.deadline, query.id))
        self._drive(query, now)

    def _lookup_timeout(self, contact: Contact) -> float:
        return _ATTEMPTS * self.rto(contact.node_id)

    def _drive(self, query: _Query, now: float) -> None:
        """Poll the lookup, send a request per peer it picks, and finish the query when it ends."""
        lookup = query.lookup
        assert lookup is not None
        while True:
            failed = False
            for contact in lookup.poll(now):
                if not self._send_lookup_request(query, contact, now):
                    lookup.on_failure(contact.node_id, now)
                    failed = True
            if not failed or lookup.finished:
                break
        if lookup.finished:
            self._lookup_finished(query, now)

    def _send_lookup_request(self, query: _Query, contact: Contact, now: float) -> bool:
        rid = self._request_id()
        if query.kind == "find_record":
            message, expected = FindValue(rid, query.target), (Value, Nodes)
        elif query.kind == "find_providers":
            message, expected = GetProviders(rid, query.target), (Providers, Nodes)
        else:
            message, expected = FindNode(rid, query.target), (Nodes,)
        return self._request(contact, message, expected, now,
                             partial(self._on_lookup_answer, query.id, contact), self.rto(contact.node_id))

    def _on_lookup_answer(self, query_id: QueryId, contact: Contact, parts: list | None, now: float) -> None:
        query = self._queries.get(query_id)
        if query is None or query.lookup is None or query.lookup.finished:
            return
        lookup = query.lookup
        if parts is None:
            lookup.on_failure(contact.node_id, now)
        elif isinstance(parts[0], Nodes):
            closer = [c for part in parts for c in part.contacts]
            lookup.on_success(contact.node_id, closer, now)
        elif isinstance(parts[0], Value):
            record = self._verify(parts[0].record, now)
            if record is None or record.node_id != query.target:
                if record is not None:
                    self._drop("invalid_record_received", "VALUE for another key from %s", contact)
                lookup.on_failure(contact.node_id, now)
            else:
                if query.best is None or record.seq > query.best.seq:
                    query.best = record
                query.copies.append((contact, record.seq))
                lookup.on_success(contact.node_id, (), now)
                if contact.node_id == query.target or 0 < query.quorum <= len(query.copies):
                    # The owner signs every seq of its record and answers with its newest: nothing
                    # newer can be found elsewhere. Otherwise the lookup halts at the quorum
                    # (Kademlia §2.3 halts FIND_VALUE at the first value; for mutable values the
                    # highest seq among the answers wins, cf. BEP 44; DhtConfig.record_quorum).
                    lookup.finish()
        else:  # PROVIDERS
            for part in parts:
                for raw in part.records:
                    record = self._verify(raw, now)
                    if record is None:
                        continue
                    if capability_key_matches(record, query.target):
                        held = query.providers.get(record.node_id)
                        if held is None or record.seq > held.seq:
                            query.providers[record.node_id] = record
                    else:
                        self._drop("invalid_record_received", "provider record off key from %s", contact)
            lookup.on_success(contact.node_id, (), now)
            if len(query.providers) >= query.count:
                lookup.finish()
        self._drive(query, now)

    def _verify(self, raw: bytes, now: float) -> PeerRecord | None:
        try:
            return PeerRecord.decode(raw, now=self._unix(now))
        except DecodeError as exc:
            self._drop("invalid_record_received", "record: %s", exc)
            return None

    def _lookup_finished(self, query: _Query, now: float) -> None:
        lookup = query.lookup
        assert lookup is not None
        closest = tuple(lookup.closest())
        self._events.append(LookupFinished(query.id, query.target, closest, lookup.timed_out,
                                           lookup.rounds, lookup.requests_sent,
                                           lookup.rounds_to_target))
        kind = query.kind
        if kind == "find_record":
            self._events.append(RecordFound(query.id, query.target, query.best))
            self._correct_stale_copies(query, now)
        elif kind == "find_providers":
            records = sorted(query.providers.values(), key=lambda r: r.node_id)[: query.count]
            self._events.append(ProvidersFound(query.id, query.capability, tuple(records)))
        elif kind in ("announce_record", "announce_capability", "replicate_record", "replicate_provider"):
            self._replicate(query, closest, now)
            return
        self._queries.pop(query.id, None)
        if kind == "bootstrap" and closest:
            self._refresh_after_join(now)

    def _refresh_after_join(self, now: float) -> list[QueryId]:
        """The join's bucket refresh, bounded (docs/engine.md, "Upkeep"). Kademlia §2.3 refreshes
        every bucket farther than the nearest neighbour right after the self-lookup: about
        log2(n/k) lookups of k answers each, most of a join's cost. Here:

        - every such bucket that is still **empty** is refreshed: a node with an empty bucket is
          a dead end for lookups into that part of the keyspace (it can name no one closer), and
          the refresh also puts the newcomer into the tables of the nodes there, whose own bucket
          for the newcomer's side may be empty (early joiners). Without it, 6 of 300 record
          lookups at 2,000 real nodes ended at 20 nodes that knew no one closer to the target
          (docs/benchmarks.md). BEP 5 can join with the self-lookup alone because its tables also
          take the nodes named in answers; ours take only peers that completed a handshake.
        - of the others that are not full, at most ``join_refresh_buckets``, the farthest first
          (they cover most of the keyspace, so most lookups start there); the rest fill from
          the traffic that reaches the node (paper §2.3: "buckets are generally kept fresh by the
          traffic of requests traveling through nodes") and from the periodic refresh of buckets
          still idle after ``refresh_interval_s`` (§2.3; go-libp2p-kad-dht's rule too).

        Each of these lookups ends once ``join_refresh_closest`` (5) of the closest to its random
        target have answered, not k: its answers come from the prefix it refreshes from the
        first hop on, and the k nearest of a random point are not otherwise wanted."""
        table, budget = self._table, self._config.join_refresh_buckets
        # Counted by common-prefix length, not by the table's buckets: a table of exactly k
        # contacts has not split yet, and its one bucket would hide every empty prefix length.
        held = Counter(bucket_index(self._id, contact.node_id) for contact in table)
        started: list[QueryId] = []
        for prefix in range(max(held, default=0)):  # farther than the nearest neighbour
            count = held[prefix]
            if count >= table.bucket_size:
                continue
            if count:
                if budget <= 0:
                    continue
                budget -= 1
            refresh = self._new_query("refresh", table.random_id_with_prefix(prefix, self._rng))
            self._start_lookup(refresh, now, closest=self._config.join_refresh_closest)
            started.append(refresh.id)
        return started

    # --- announcing ----------------------------------------------------------------------------------

    def _replicate(self, query: _Query, closest: tuple[Contact, ...], now: float) -> None:
        """Second phase of an announcement: STORE (or ANNOUNCE) to the k closest found."""
        record = query.record
        assert record is not None
        for contact in closest:
            rid = self._request_id()
            if query.kind in ("announce_record", "replicate_record"):
                message = Store(rid, query.target, record.encoded)
            else:
                message = Announce(rid, query.target, record.encoded)
            if self._request(contact, message, (StoreResult,), now,
                             partial(self._on_store_answer, query.id), self.rto(contact.node_id)):
                query.pending += 1
        if query.pending == 0:
            self._announced(query)

    def _correct_stale_copies(self, query: _Query, now: float) -> None:
        """Send the newest record found to the holders that answered with an older seq
        (DESIGN.md's quorum reads: stale holders corrected; libp2p's GetValue does the same).
        Fire and forget: their answers are counted like any STORE_RESULT."""
        best = query.best
        for contact, seq in query.copies:
            if seq >= best.seq:
                continue
            if contact is None:  # the own store's copy
                self._store.put(query.target, best, None, self._unix(now))
                self._stats_corrected += 1
            elif self._request(contact, Store(self._request_id(), query.target, best.encoded),
                               (StoreResult,), now, _ignore_answer, self.rto(contact.node_id)):
                self._stats_corrected += 1

    def _on_store_answer(self, query_id: QueryId, parts: list | None, now: float) -> None:
        query = self._queries.get(query_id)
        if query is None:
            return
        query.pending -= 1
        if parts is not None and parts[0].status is StoreStatus.STORED:
            query.stored += 1
        if query.pending == 0:
            self._announced(query)

    def _announced(self, query: _Query) -> None:
        self._events.append(RecordAnnounced(query.id, query.stored))
        self._queries.pop(query.id, None)

    def _sign_record(self, now: float) -> PeerRecord:
        unix = self._unix(now)
        previous = self._own_record.seq if self._own_record is not None else -1
        seq = max(previous + 1, int(unix * 1000))
        record = PeerRecord.create(
            self._identity,
            addresses=[self._advertised] if self._advertised is not None else [],
            capabilities=sorted(self._capabilities),
            seq=seq,
            expires_at=int(unix + self._config.record_ttl_s),
        )
        self._own_record = record
        self._store.put(self._id, record, None, unix)
        self._republish_at = now + self._config.record_ttl_s / 2
        return record

    def _own_seq(self) -> int:
        return self._own_record.seq if self._own_record is not None else 0

    # --- direct requests -----------------------------------------------------------------------------

    def _on_ping_answer(self, query_id: QueryId, contact: Contact, sent_at: float,
                        parts: list | None, now: float) -> None:
        if self._queries.pop(query_id, None) is None:
            return
        if parts is None:
            self._events.append(PingFinished(query_id, contact, False, None, None))
        else:
            self._events.append(PingFinished(query_id, contact, True, now - sent_at, parts[0].record_seq))

    def _on_fetch_answer(self, query_id: QueryId, contact: Contact, parts: list | None, now: float) -> None:
        if self._queries.pop(query_id, None) is None:
            return
        record = None
        if parts is not None and isinstance(parts[0], Value):
            record = self._verify(parts[0].record, now)
            if record is not None and record.node_id != contact.node_id:
                self._drop("invalid_record_received", "VALUE for another key from %s", contact)
                record = None
        self._events.append(RecordFound(query_id, contact.node_id, record))

    # --- bootstrap -----------------------------------------------------------------------------------

    def _on_bootstrap_answer(self, query_id: QueryId, parts: list | None, now: float) -> None:
        query = self._queries.get(query_id)
        if query is None:
            return
        query.pending -= 1
        if parts is not None:
            if isinstance(parts[0], Nodes):
                query.learned.extend(c for part in parts for c in part.contacts)
            if not query.answered:
                query.answered = True
                # Kademlia §2.3: join by looking up the own ID. Seeds: the table (the contacts
                # that answered are in it now) and what the answer taught us.
                self._start_lookup(query, now, query.learned, deadline_s=query.deadline_s)
                return
        if query.pending == 0 and not query.answered:
            self._finish_bootstrap_failed(query)

    def _finish_bootstrap_failed(self, query: _Query) -> None:
        self._events.append(LookupFinished(query.id, self._id, (), True, 0, 0))
        self._queries.pop(query.id, None)

    # --- upkeep and helpers --------------------------------------------------------------------------

    def _upkeep(self, now: float) -> None:
        config = self._config
        unix = self._unix(now)
        self._session.expire(now)
        self._store.expire(unix)
        self._expire_peer_state(now)
        self._next_upkeep = now + config.upkeep_interval_s
        if now >= self._republish_at and (self._published or self._capabilities):
            self._republish(now)
        self.refresh(now)
        # Kademlia §2.5: re-publish stored entries hourly to the k closest of their key (the own
        # record and own announcements have their own clock, above).
        budget = config.max_replications_per_upkeep
        for key, record in self._store.due_for_replication(unix, config.replication_interval_s, budget):
            self._store.mark_replicated(key, unix)
            if key != self._id:
                self._announce("replicate_record", key, record, now)
        budget = config.max_replications_per_upkeep
        for key, record in self._store.providers_due_for_replication(unix, config.replication_interval_s, budget):
            self._store.mark_provider_replicated(key, record.node_id, unix)
            if record.node_id != self._id:
                self._announce("replicate_provider", key, record, now)

    def _expire_peer_state(self, now: float) -> None:
        """Forget per-peer state that no longer changes what the engine does, so that memory
        follows the peers a node talks to now, not every peer it ever talked to: finished
        requests past their keep time; token buckets full again (idle for ``burst / rate``
        seconds: a forgotten bucket starts full, so forgetting it changes nothing); table
        re-entry times older than ``_REENTER_S`` (they no longer suppress anything)."""
        self._forget_done(now)
        config = self._config
        buckets = self._ip_buckets  # least recently used first
        refill_s = config.burst_per_ip / config.rate_per_ip_per_s
        while buckets:
            first = next(iter(buckets.values()))
            if now - first.last < refill_s:  # the least recently used is not surely full again
                break
            buckets.popitem(last=False)
        entered = self._entered
        if entered:
            stale = [key for key, when in entered.items() if now - when >= _REENTER_S]
            for key in stale:
                del entered[key]

    def _unix(self, now: float) -> float:
        return now + self._unix_offset

    def _drop(self, reason: str, fmt: str, *args: object, exc_info: bool = False) -> None:
        self._drops[reason] += 1
        if reason == "internal_error":
            _log.error("dht engine: " + fmt + "; dropped", *args, exc_info=exc_info)
        elif self._drops[reason] == 1:
            _log.info("dht engine: first drop as %s: " + fmt, reason, *args)
        else:
            _log.debug("dht engine: dropped as %s: " + fmt, reason, *args)


def capability_key_matches(record: PeerRecord, key: bytes) -> bool:
    """Whether ``record`` lists a capability whose key is ``key``."""
    return any(capability_key(name) == key for name in record.capabilities)
