"""The iterative-lookup state machine of Kademlia (paper §2.3): per-peer state, no I/O, no clock.

A :class:`Lookup` walks toward ``target``: it says which peers to ask (:meth:`Lookup.poll`), and is
told what they answered (:meth:`Lookup.on_success`) or that they did not
(:meth:`Lookup.on_failure`, or a request timeout that :meth:`Lookup.poll` applies itself). The
engine owns the requests (FIND_NODE, FIND_VALUE, GET_PROVIDERS): the lookup only tracks peers.
The model is rust-libp2p's ``ClosestPeersIter`` (``protocols/kad/src/query/peers/closest.rs``).

Per-peer state (:class:`PeerState`)::

    WAITING_TO_SEND --poll--> IN_FLIGHT --on_success--> SUCCEEDED
                                  |  \\--on_failure--> FAILED (final)
                                  \\--poll past its timeout--> FAILED (unresponsive)
                                                                 |--on_success--> SUCCEEDED (late)
                                                                 \\--on_failure--> FAILED (final)

Rules, with their sources:

- Candidates are kept sorted by XOR distance to ``target`` (paper §2.3: "the k closest nodes it
  has seen"). The local ID and contacts already known are not added again; a candidate not yet
  contacted takes the address of its latest report. At most ``max_candidates`` are kept: the
  farthest *not yet contacted* ones are dropped, a peer that was contacted never is (its state is
  what keeps it from being asked twice). Hence a lookup sends at most ``max_candidates`` requests.
- At most ``parallelism`` (α) requests are in flight (paper §2.3); each :meth:`Lookup.poll`
  sends to the closest candidates not yet contacted. A request past its timeout no longer counts
  toward α, but its late answer is still accepted (paper §2.3: unresponsive nodes are "removed
  from consideration until and unless they do respond"; libp2p's ``Unresponsive``). libp2p's
  "stalled" burst (up to k requests at once, the paper's "resend to all of the k closest") is not
  used: α is a hard limit here.
- Termination (libp2p ``ClosestPeersIter::next``; paper §2.3 "queried and gotten responses from
  the k closest nodes it has seen"): the lookup is finished when the ``bucket_size`` closest
  candidates that have not failed have all succeeded; or when nothing is left to ask and nothing
  is in flight; or on :meth:`Lookup.finish` (e.g. FIND_VALUE found the value); or when the overall
  deadline passes (then ``timed_out`` is True and :meth:`Lookup.closest` is the best partial
  result).
- Rounds (hops): seeds are round 1; a candidate learned from the answer of a round-``r`` peer is
  round ``r + 1`` (the smallest, if several peers reported it before it was contacted).

Network input never raises: an answer from a peer that was never asked, or already answered, is
ignored and counted. Caller mistakes (wrong types or values, contacts that are not
:class:`~sovereign_discovery.routing.Contact` objects) raise
:class:`~sovereign_discovery.errors.ArgumentTypeError` /
:class:`~sovereign_discovery.errors.ArgumentValueError` naming the parameter.

Cost: candidates live in a list sorted by distance (``bisect``) plus a dict node ID → peer; a
poll walks only past the peers already finished with, to the first few to ask, so every call is
O(``max_candidates``) at worst and accessors are O(1) (``closest`` walks the sorted list).
"""

from __future__ import annotations

import bisect
import enum
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .constants import DEFAULT_BUCKET_SIZE, DEFAULT_PARALLELISM, MAX_BUCKET_SIZE, NODE_ID_BYTES
from .errors import ArgumentTypeError, ArgumentValueError
from .keys import NodeId
from .routing import Contact

__all__ = [
    "PeerState",
    "LookupParams",
    "LookupStats",
    "Lookup",
    "DEFAULT_LOOKUP_DEADLINE_S",
    "DEFAULT_REQUEST_TIMEOUT_S",
    "MAX_CANDIDATES_FACTOR",
]

#: Overall deadline of one lookup (libp2p's query timeout is 60 s; a UDP lookup of ~log2(n)/α
#: round trips needs far less, and the engine can pass a longer one).
DEFAULT_LOOKUP_DEADLINE_S = 10.0
#: A per-request timeout for when the engine has no round-trip estimate yet (discv5 uses 1 s
#: per request; libp2p 10 s per peer over TCP).
DEFAULT_REQUEST_TIMEOUT_S = 1.0
#: Default ``max_candidates`` = this many times ``bucket_size``.
MAX_CANDIDATES_FACTOR = 8


class PeerState(enum.Enum):
    """Where a candidate stands in one lookup."""

    #: Known, not yet asked (libp2p ``NotContacted``).
    WAITING_TO_SEND = "waiting-to-send"
    #: Asked, answer not yet in, timeout not yet passed: counts toward α (libp2p ``Waiting``).
    IN_FLIGHT = "in-flight"
    #: Answered; a result candidate (libp2p ``Succeeded``).
    SUCCEEDED = "succeeded"
    #: Gave up: reported by :meth:`Lookup.on_failure` (final) or timed out in :meth:`Lookup.poll`
    #: (libp2p ``Unresponsive``: a late answer still turns it into SUCCEEDED).
    FAILED = "failed"


def _positive_int(name: str, value: object, maximum: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ArgumentTypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < 1 or (maximum is not None and value > maximum):
        bound = f"1..{maximum}" if maximum is not None else ">= 1"
        raise ArgumentValueError(f"{name} must be {bound}, not {value}")
    return value


def _seconds(name: str, value: object) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ArgumentTypeError(f"{name} must be a number of seconds, not {type(value).__name__}")
    value = float(value)
    if not (value > 0 and math.isfinite(value)):
        raise ArgumentValueError(f"{name} must be a finite number of seconds > 0, not {value}")
    return value


def check_now(value: object, name: str = "now") -> float:
    """``value`` as a float of monotonic seconds; a caller error naming ``name`` if it is not a
    finite number (the lookup and the engine take ``now`` this way)."""
    if type(value) is float and -math.inf < value < math.inf:  # the common case, checked fast
        return value
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ArgumentTypeError(
            f"{name} must be a number (monotonic seconds), not {type(value).__name__}"
        )
    value = float(value)
    if not math.isfinite(value):
        raise ArgumentValueError(f"{name} must be finite, not {value}")
    return value


def _node_id(name: str, value: object) -> bytes:
    if not isinstance(value, bytes):
        raise ArgumentTypeError(f"{name} must be a NodeId (bytes), not {type(value).__name__}")
    if len(value) != NODE_ID_BYTES:
        raise ArgumentValueError(f"{name} must be {NODE_ID_BYTES} bytes long, not {len(value)}")
    return value


@dataclass(frozen=True, slots=True)
class LookupParams:
    """Parameters of one lookup.

    ``bucket_size`` (k) results are sought with ``parallelism`` (α) requests in flight. At most
    ``max_candidates`` peers are tracked (``None`` = ``MAX_CANDIDATES_FACTOR * bucket_size``; at
    least ``bucket_size``), which also caps the requests one lookup sends. ``deadline_s`` bounds
    the whole lookup. ``disjoint_paths`` is reserved for the S/Kademlia mode (d disjoint paths,
    no peer shared) and must be 1 for now.
    """

    bucket_size: int = DEFAULT_BUCKET_SIZE
    parallelism: int = DEFAULT_PARALLELISM
    max_candidates: int | None = None
    deadline_s: float = DEFAULT_LOOKUP_DEADLINE_S
    disjoint_paths: int = 1

    def __post_init__(self) -> None:
        _positive_int("bucket_size", self.bucket_size, MAX_BUCKET_SIZE)
        _positive_int("parallelism", self.parallelism)
        if self.max_candidates is None:
            object.__setattr__(self, "max_candidates", MAX_CANDIDATES_FACTOR * self.bucket_size)
        else:
            _positive_int("max_candidates", self.max_candidates)
            if self.max_candidates < self.bucket_size:
                raise ArgumentValueError(
                    f"max_candidates must be >= bucket_size ({self.bucket_size}),"
                    f" not {self.max_candidates}"
                )
        object.__setattr__(self, "deadline_s", _seconds("deadline_s", self.deadline_s))
        _positive_int("disjoint_paths", self.disjoint_paths)
        if self.disjoint_paths != 1:
            raise ArgumentValueError(
                "disjoint_paths must be 1: disjoint-path lookups are not implemented yet"
            )


@dataclass(frozen=True, slots=True)
class LookupStats:
    """Progress of a lookup. ``requests_sent == successes + failures + in_flight`` always holds
    (a late success moves a peer from ``failures`` to ``successes``)."""

    requests_sent: int
    in_flight: int
    #: Peers now SUCCEEDED (late ones included).
    successes: int
    #: Peers now FAILED (timed out and not answered since, or reported by ``on_failure``).
    failures: int
    #: Requests that passed their timeout (whether or not a late answer followed).
    timeouts: int
    #: Answers accepted after their request had timed out.
    late_successes: int
    #: Answers from peers never asked, or after a final ``on_failure``: ignored.
    unsolicited: int
    #: Second answers from a peer that had already answered: ignored.
    duplicates: int
    #: The largest round of any contacted peer (0 before the first request).
    rounds: int
    #: The round at which a peer whose ID is the target was contacted, or None.
    rounds_to_target: int | None
    #: Contacts admitted as new candidates (seeds included; one dropped by the cap and learned
    #: again counts again).
    candidates_seen: int
    #: Candidates dropped by the ``max_candidates`` cap.
    candidates_dropped: int
    #: Candidates tracked now.
    candidates: int


class _Peer:
    __slots__ = ("contact", "distance", "state", "round", "deadline", "unresponsive")

    def __init__(self, contact: Contact, distance: int, round_: int) -> None:
        self.contact = contact
        self.distance = distance
        self.state = PeerState.WAITING_TO_SEND
        self.round = round_
        self.deadline = math.inf  # request timeout, while IN_FLIGHT
        self.unresponsive = False  # FAILED by timeout: a late answer is accepted


_CONTACT_TYPE = {Contact}
_WAITING = PeerState.WAITING_TO_SEND
_IN_FLIGHT = PeerState.IN_FLIGHT
_SUCCEEDED = PeerState.SUCCEEDED
_FAILED = PeerState.FAILED


class Lookup:
    """One iterative lookup toward ``target``. See the module docstring for the rules.

    ``request_timeout_s`` is a number of seconds, or a callable giving it for a contact at the
    moment the request is sent (so the engine can adapt it to measured round trips). ``now`` is
    monotonic seconds; the overall deadline is ``now + params.deadline_s``.
    """

    __slots__ = (
        "_local",
        "_target",
        "_target_int",
        "_params",
        "_k",
        "_alpha",
        "_cap",
        "_timeout",
        "_deadline",
        "_distances",
        "_order",
        "_peers",
        "_in_flight",
        "finished",
        "timed_out",
        "_requests_sent",
        "_successes",
        "_failures",
        "_timeouts",
        "_late_successes",
        "_unsolicited",
        "_duplicates",
        "_rounds",
        "_rounds_to_target",
        "_candidates_seen",
        "_candidates_dropped",
    )

    def __init__(
        self,
        local_id: bytes,
        target: bytes,
        seeds: Iterable[Contact],
        *,
        params: LookupParams | None = None,
        now: float,
        request_timeout_s: Callable[[Contact], float] | float = DEFAULT_REQUEST_TIMEOUT_S,
    ) -> None:
        self._local = NodeId(_node_id("local_id", local_id))
        self._target = NodeId(_node_id("target", target))
        self._target_int = int.from_bytes(target, "big")
        if params is None:
            params = LookupParams()
        elif not isinstance(params, LookupParams):
            raise ArgumentTypeError(f"params must be LookupParams, not {type(params).__name__}")
        self._params = params
        self._k = params.bucket_size
        self._alpha = params.parallelism
        self._cap: int = params.max_candidates  # type: ignore[assignment]
        if callable(request_timeout_s):
            self._timeout: Callable[[Contact], float] | float = request_timeout_s
        else:
            self._timeout = _seconds("request_timeout_s", request_timeout_s)
        now = check_now(now)
        self._deadline = now + params.deadline_s
        # Candidates, nearest first: distances (for bisect) and peers, index for index.
        self._distances: list[int] = []
        self._order: list[_Peer] = []
        self._peers: dict[bytes, _Peer] = {}
        self._in_flight: dict[bytes, _Peer] = {}
        #: True once the lookup is over (see the module docstring for when).
        self.finished = False
        #: True if it ended because the overall deadline passed.
        self.timed_out = False
        self._requests_sent = self._successes = self._failures = self._timeouts = 0
        self._late_successes = self._unsolicited = self._duplicates = 0
        self._rounds = 0
        self._rounds_to_target: int | None = None
        self._candidates_seen = self._candidates_dropped = 0
        if isinstance(seeds, (bytes, str)) or not isinstance(seeds, Iterable):
            raise ArgumentTypeError(
                f"seeds must be an iterable of Contact, not {type(seeds).__name__}"
            )
        seeds = list(seeds)
        self._check_contacts("seeds", seeds)
        self._add_candidates(seeds, 1)

    # --- inspection -----------------------------------------------------------------------------

    @property
    def local_id(self) -> NodeId:
        return self._local

    @property
    def target(self) -> NodeId:
        return self._target

    @property
    def params(self) -> LookupParams:
        return self._params

    @property
    def deadline(self) -> float:
        """When the whole lookup times out (monotonic seconds)."""
        return self._deadline

    @property
    def in_flight(self) -> int:
        """Requests counting toward α now (≤ ``parallelism``); after the end, those left
        unanswered."""
        return len(self._in_flight)

    def in_flight_peers(self) -> list[Contact]:
        """The peers whose answer is awaited (after the end: the requests the engine may cancel)."""
        return [peer.contact for peer in self._in_flight.values()]

    @property
    def requests_sent(self) -> int:
        return self._requests_sent

    @property
    def rounds(self) -> int:
        return self._rounds

    @property
    def rounds_to_target(self) -> int | None:
        return self._rounds_to_target

    @property
    def stats(self) -> LookupStats:
        return LookupStats(
            requests_sent=self._requests_sent,
            in_flight=len(self._in_flight),
            successes=self._successes,
            failures=self._failures,
            timeouts=self._timeouts,
            late_successes=self._late_successes,
            unsolicited=self._unsolicited,
            duplicates=self._duplicates,
            rounds=self._rounds,
            rounds_to_target=self._rounds_to_target,
            candidates_seen=self._candidates_seen,
            candidates_dropped=self._candidates_dropped,
            candidates=len(self._order),
        )

    def __len__(self) -> int:
        """Candidates tracked now (≤ ``max_candidates``)."""
        return len(self._order)

    def state_of(self, node_id: bytes) -> PeerState | None:
        """The state of candidate ``node_id``, or None if it is not tracked."""
        peer = self._peers.get(node_id) if isinstance(node_id, bytes) else None
        return peer.state if peer is not None else None

    def round_of(self, node_id: bytes) -> int | None:
        """The round of candidate ``node_id`` (see the module docstring), or None."""
        peer = self._peers.get(node_id) if isinstance(node_id, bytes) else None
        return peer.round if peer is not None else None

    def candidates(self) -> list[tuple[Contact, PeerState]]:
        """Every tracked candidate with its state, nearest ``target`` first (a copy)."""
        return [(p.contact, p.state) for p in self._order]

    def closest(self, count: int | None = None) -> list[Contact]:
        """The result: the SUCCEEDED peers nearest ``target`` first, at most ``count`` (default
        ``bucket_size``). Meaningful at any time; after a timeout, the best partial result."""
        count = self._k if count is None else _positive_int("count", count)
        result = []
        for peer in self._order:
            if peer.state is _SUCCEEDED:
                result.append(peer.contact)
                if len(result) == count:
                    break
        return result

    def next_deadline(self) -> float | None:
        """When :meth:`poll` should be called next if nothing else happens: the earliest request
        timeout, or the overall deadline. None once finished."""
        if self.finished:
            return None
        deadline = self._deadline
        for peer in self._in_flight.values():
            if peer.deadline < deadline:
                deadline = peer.deadline
        return deadline

    # --- driving --------------------------------------------------------------------------------

    def poll(self, now: float) -> list[Contact]:
        """Apply timeouts and the deadline, and return the peers to send a request to *now*
        (they are IN_FLIGHT from here on; ≤ α are in flight in all). Call it after every event
        and at :meth:`next_deadline`. Empty once finished."""
        now = check_now(now)
        if self._expired(now):
            return []
        for node_id, peer in list(self._in_flight.items()):
            if now >= peer.deadline:
                # Unresponsive: frees its slot for α, stays open for a late answer (libp2p).
                del self._in_flight[node_id]
                peer.state = _FAILED
                peer.unresponsive = True
                self._failures += 1
                self._timeouts += 1
        return self._advance(now, send=True)

    def on_success(self, peer_id: bytes, closer: Iterable[Contact], now: float) -> None:
        """``peer_id`` answered; the contacts it returned become candidates. An answer from a peer
        that was never asked (or after the end) is ignored and counted, never raised."""
        peer_id = _node_id("peer_id", peer_id)
        if isinstance(closer, (bytes, str)) or not isinstance(closer, Iterable):
            raise ArgumentTypeError(
                f"closer must be an iterable of Contact, not {type(closer).__name__}"
            )
        closer = list(closer)
        self._check_contacts("closer", closer)
        now = check_now(now)
        if self._expired(now):
            return
        peer = self._peers.get(peer_id)
        if peer is None or peer.state is _WAITING or (
            peer.state is _FAILED and not peer.unresponsive
        ):
            self._unsolicited += 1
            return
        if peer.state is _SUCCEEDED:
            self._duplicates += 1
            return
        if peer.state is _IN_FLIGHT:
            del self._in_flight[peer_id]
        else:  # unresponsive: a late answer counts (paper §2.3 "until and unless they do respond")
            self._failures -= 1
            self._late_successes += 1
            peer.unresponsive = False
        peer.state = _SUCCEEDED
        self._successes += 1
        self._add_candidates(closer, peer.round + 1)
        self._advance(now, send=False)

    def on_failure(self, peer_id: bytes, now: float) -> None:
        """The engine gave up on ``peer_id`` (a timeout it measured, an error, an undecodable
        answer). Final: a later answer from it is ignored. No effect on a peer not in flight or
        unresponsive."""
        peer_id = _node_id("peer_id", peer_id)
        now = check_now(now)
        if self._expired(now):
            return
        peer = self._peers.get(peer_id)
        if peer is None:
            return
        if peer.state is _IN_FLIGHT:
            del self._in_flight[peer_id]
            peer.state = _FAILED
            self._failures += 1
            self._advance(now, send=False)
        elif peer.state is _FAILED:
            peer.unresponsive = False

    def finish(self) -> None:
        """Stop now (e.g. FIND_VALUE found the value). ``timed_out`` stays False."""
        self._end()

    # --- internals ------------------------------------------------------------------------------

    def _expired(self, now: float) -> bool:
        """True if the lookup is over, ending it first if the overall deadline has passed."""
        if self.finished:
            return True
        if now >= self._deadline:
            self.timed_out = True
            self._end()
            return True
        return False

    def _end(self) -> None:
        # Peers still IN_FLIGHT stay so (see in_flight_peers): their answers are ignored now.
        self.finished = True

    def _request_timeout(self, contact: Contact) -> float:
        timeout = self._timeout
        if callable(timeout):
            value = timeout(contact)
            if type(value) is float and 0.0 < value < math.inf:  # the common case, checked fast
                return value
            return _seconds("request_timeout_s (the value the callable returned)", value)
        return timeout

    def _advance(self, now: float, *, send: bool) -> list[Contact]:
        """Walk the candidates nearest first (libp2p ``ClosestPeersIter::next``): count the
        SUCCEEDED ones before the first one not yet done with, pick WAITING ones while below α
        (if ``send``), and decide whether the lookup is finished."""
        chosen: list[_Peer] = []
        free = self._alpha - len(self._in_flight) if send else 0
        counting = True  # every non-failed candidate so far has succeeded
        succeeded = 0
        k = self._k
        for peer in self._order:
            state = peer.state
            if state is _SUCCEEDED:
                if counting:
                    succeeded += 1
                    if succeeded >= k:  # the k closest not failed have all answered
                        self._end()  # (nothing chosen: choosing stops the counting)
                        return []
            elif state is _IN_FLIGHT:
                counting = False
            elif state is _WAITING:
                if len(chosen) >= free:
                    break  # something is left to do: not finished
                chosen.append(peer)
                counting = False
            # FAILED: skipped; it counts neither for nor against termination
        else:
            if not chosen and not self._in_flight:  # nothing left to ask, nothing in flight
                self._end()
        if not chosen:
            return []
        # Ask for every timeout before changing any state, so that a bad value from the
        # engine's callable raises with nothing half-sent.
        deadlines = [now + self._request_timeout(peer.contact) for peer in chosen]
        for peer, deadline in zip(chosen, deadlines):
            self._send(peer, deadline)
        return [peer.contact for peer in chosen]

    def _send(self, peer: _Peer, deadline: float) -> None:
        contact = peer.contact
        peer.deadline = deadline
        peer.state = _IN_FLIGHT
        self._in_flight[contact.node_id] = peer
        self._requests_sent += 1
        if peer.round > self._rounds:
            self._rounds = peer.round
        if self._rounds_to_target is None and contact.node_id == self._target:
            self._rounds_to_target = peer.round

    @staticmethod
    def _check_contacts(name: str, contacts: list) -> None:
        if set(map(type, contacts)) <= _CONTACT_TYPE:  # the common case, one pass in C
            return
        for contact in contacts:
            if not isinstance(contact, Contact):
                raise ArgumentTypeError(
                    f"{name} must hold Contact objects, not {type(contact).__name__}"
                )

    def _add_candidates(self, contacts: list[Contact], round_: int) -> None:
        peers, distances, order = self._peers, self._distances, self._order
        target, local = self._target_int, self._local
        added = False
        for contact in contacts:
            node_id = contact.node_id
            known = peers.get(node_id)
            if known is not None:
                if known.state is _WAITING:
                    known.contact = contact  # latest report of a not-yet-contacted address
                    if round_ < known.round:
                        known.round = round_
                continue
            if node_id == local:
                continue
            distance = int.from_bytes(node_id, "big") ^ target
            peer = _Peer(contact, distance, round_)
            index = bisect.bisect_left(distances, distance)
            distances.insert(index, distance)
            order.insert(index, peer)
            peers[node_id] = peer
            self._candidates_seen += 1
            added = True
        if added and len(order) > self._cap:
            self._trim()

    def _trim(self) -> None:
        """Drop the farthest WAITING_TO_SEND candidates down to the cap. Only those: a contacted
        peer's state must stay known. Every addition is a WAITING one, so this always succeeds."""
        order, distances, peers = self._order, self._distances, self._peers
        excess = len(order) - self._cap
        index = len(order) - 1
        while excess > 0 and index >= 0:
            peer = order[index]
            if peer.state is _WAITING:
                del order[index]
                del distances[index]
                del peers[peer.contact.node_id]
                self._candidates_dropped += 1
                excess -= 1
            index -= 1

    def __repr__(self) -> str:
        status = "timed out" if self.timed_out else "finished" if self.finished else "running"
        return (
            f"Lookup(target={self._target.short()}…, {status}, {len(self._order)} candidates,"
            f" {len(self._in_flight)} in flight, {self._requests_sent} sent)"
        )
