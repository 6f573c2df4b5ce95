"""When a 0-RTT first packet (``session.KIND_INITIATE``) may be accepted: :class:`InitiateGuard`.

An INITIATE carries no answer to a challenge of ours, so nothing ties it to this moment but its
timestamp. The guard decides, before any cryptography, whether one may be accepted at all, and
remembers the ephemeral keys of those accepted. The rules (``docs/protocol.md``, "0-RTT first
contact"; ``docs/security.md``) are those of TLS 1.3's 0-RTT anti-replay (RFC 8446 §8: a freshness
window on the client's clock, §8.3, plus a bounded record of what was seen within it, §8.2), with
WireGuard's rule that a timestamp predating what the receiver can vouch for is refused (its
TAI64N timestamp, §5.1 of the WireGuard paper) applied to the guard's own start:

- the timestamp must be at most ``window_ms`` old and at most ``ahead_ms`` ahead of our Unix
  clock;
- it must not predate our start by less than ``ahead_ms``: a restarted node has an empty record,
  and its previous run may have accepted INITIATEs stamped up to ``ahead_ms`` past the moment it
  stopped, so "not before our start" alone would let those be replayed to us. Hence the
  asymmetric window: the tolerance for a sender's clock running ahead is also how long after a
  restart we accept no INITIATE (``ahead_ms``, 5 s by default);
- its ephemeral key must not be in the record of keys seen; an entry leaves the record only once
  its timestamp has left the window, so a replay never finds it gone and still passes the clock;
- the record is bounded (``max_seen``): when full nothing is evicted, new INITIATEs are refused;
- at most ``per_s`` INITIATEs a second reach the signature check (a token bucket on ``now``), as
  a QUIC server under load validates addresses with Retry first (RFC 9000 §8.1.2).

A refused INITIATE costs its sender the old round trip (a WHOAREYOU), never the message; a
replay within the window is dropped unanswered. Sans-IO: the caller passes both clocks.
"""

from __future__ import annotations

import heapq

__all__ = ["InitiateGuard", "FRESH", "STALE", "REPLAYED", "CACHE_FULL", "RATE_LIMITED"]

#: verdicts of :meth:`InitiateGuard.check` (each but FRESH a ``session`` drop reason)
FRESH = "fresh"
STALE = "initiate_stale"
REPLAYED = "initiate_replayed"
CACHE_FULL = "initiate_cache_full"
RATE_LIMITED = "initiate_rate_limited"


class InitiateGuard:
    """Freshness window, start time, record of ephemeral keys seen, and rate of one node."""

    __slots__ = ("_window_ms", "_ahead_ms", "_max_seen", "_per_s", "_started_ms", "_clock_ms", "_seen",
                 "_expiry", "_tokens", "_tokens_at")

    def __init__(self, window_ms: int, ahead_ms: int, max_seen: int, per_s: float) -> None:
        self._window_ms = window_ms
        self._ahead_ms = ahead_ms
        self._max_seen = max_seen
        self._per_s = per_s
        self._started_ms: int | None = None  # our Unix clock at first use: the record's birth
        self._clock_ms = 0  # the latest Unix time seen: the clock never goes back here
        self._seen: set[bytes] = set()  # ephemeral keys accepted
        self._expiry: list[tuple[int, bytes]] = []  # heap: (timestamp + window, key)
        self._tokens = float(per_s)  # one second of burst
        self._tokens_at: float | None = None

    def start(self, unix_ms: int) -> None:
        """Our start: nothing stamped earlier is accepted. Only the first call counts."""
        if self._started_ms is None:
            self._started_ms = unix_ms
            self._clock_ms = unix_ms

    def check(self, timestamp_ms: int, ephemeral: bytes, unix_ms: int, now: float) -> str:
        """The verdict on an INITIATE stamped ``timestamp_ms`` carrying ``ephemeral``, at our Unix
        time ``unix_ms`` and monotonic ``now``. FRESH spends one token of the rate."""
        self.start(unix_ms)
        self.expire(unix_ms)  # a clock set back never reopens the window: the latest time counts
        clock = self._clock_ms
        # RFC 8446 §8.3 (freshness window); WireGuard §5.1 (nothing older than we can vouch for)
        if (not clock - self._window_ms <= timestamp_ms <= clock + self._ahead_ms
                or timestamp_ms < self._started_ms + self._ahead_ms):
            return STALE
        if ephemeral in self._seen:  # RFC 8446 §8.2: seen within the window
            return REPLAYED
        if len(self._seen) >= self._max_seen:  # bounded; never evict a live entry (RFC 8446 §8.2)
            return CACHE_FULL
        if self._tokens_at is None:
            self._tokens_at = now
        self._tokens = min(float(self._per_s), self._tokens + max(0.0, now - self._tokens_at) * self._per_s)
        self._tokens_at = max(self._tokens_at, now)
        if self._tokens < 1.0:  # RFC 9000 §8.1.2: under load, validate the address first
            return RATE_LIMITED
        self._tokens -= 1.0
        return FRESH

    def remember(self, timestamp_ms: int, ephemeral: bytes) -> None:
        """Record an INITIATE that verified (whether or not it was delivered) until its timestamp
        leaves the window. ``check`` returned FRESH for it just before, so there is room."""
        if ephemeral not in self._seen:
            self._seen.add(ephemeral)
            heapq.heappush(self._expiry, (timestamp_ms + self._window_ms, ephemeral))

    def expire(self, unix_ms: int) -> None:
        """Forget the keys whose timestamps have left the window (a replay of them is STALE)."""
        expiry, seen = self._expiry, self._seen
        clock = self._clock_ms = max(self._clock_ms, unix_ms)
        while expiry and expiry[0][0] < clock:
            seen.discard(heapq.heappop(expiry)[1])

    def __len__(self) -> int:
        return len(self._seen)
