"""The pinned-key bootstrap layer (DESIGN.md "Bootstrap layer", issue 4 item 2).

:class:`BootstrapLayer` joins a running :class:`~sovereign_discovery.aio.DhtNode` to the network
through the bootstrap peers of a :class:`~sovereign_discovery.config.BootstrapConfig`:

1. **A round** contacts every peer of the phase *in parallel*, each through its own authenticated
   exchange (``node.bootstrap([contact])``: a PING and a FIND_NODE over a session bound to the
   pinned key), each bounded by ``config.timeout_s``. Each peer's outcome is one of

   - *answered*: it proved the pinned key (the session layer delivered its answer, so the engine
     put it in the routing table at the pinned address);
   - *rejected*, reason ``"key mismatch"``: something at that address speaks the protocol but does
     not hold the pinned key (see "Detecting a key mismatch" below). Logged at WARNING, reported
     as :class:`BootstrapRejected`, never retried, and nothing from it enters the routing table;
   - *unreachable*: no answer at all within the attempt.

2. **Retries**: while no peer of the phase has answered, the unreachable ones are contacted again,
   up to ``config.retries`` more rounds, round ``r`` waiting ``config.backoff_delay(r, rng)``
   first (exponential backoff with jitter; each wait is reported as :class:`BootstrapRetry`).
3. **Fallback**: if no peer of ``config.peers`` answered, ``config.fallback_peers`` the same way.
4. **Handover**: a self-lookup (``node.find_closest(node.node_id)``) fills the routing table
   from what the bootstrap peers taught (also when nobody answered but the table holds peers from
   elsewhere, e.g. a peer cache); then :class:`BootstrapFinished` is reported and returned.

If no peer answered, :meth:`BootstrapLayer.run` does *not* raise: the finished event (and the
return value) says so with ``ok == False``, and the node keeps working from whatever its table
holds. Every step is bounded in time, and cancelling :meth:`run` cancels every attempt it started.

Detecting a key mismatch
------------------------
The initiator never learns the key of an impostor: the handshake (docs/protocol.md) binds our
HANDSHAKE packet to the *pinned* node ID, the impostor drops it (``session.bad_signature`` on its
side, invisible to us) and never answers. What the initiator does observe is the step before:
our first packet to the address was answered by a WHOAREYOU challenge, so we derived session keys
for the pinned key and sent a HANDSHAKE — the session layer then holds an *unconfirmed* session
for ``(pinned node ID, address)`` (:meth:`SessionLayer.has_session`). A peer that did not answer
within the attempt, although a session toward it was initiated, is classified as a key mismatch:
something at that address is alive and speaks the protocol, but cannot prove the pinned key.

Limits: it is a heuristic on the initiator's side. A genuine peer that answers the challenge and
then dies, or whose answers are all lost after the WHOAREYOU (heavy loss), or that is slower than
``timeout_s`` after its WHOAREYOU, is classified as a mismatch too (the conservative error: a
refused peer is only reported, never trusted). It cannot name the impostor's real key. The session
is read through the engine's session layer (``DhtEngine.session``).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .aio import DhtNode
from .config import BootstrapConfig
from .errors import ArgumentTypeError, BootstrapError, LookupTimeoutError
from .routing import Contact

__all__ = [
    "BootstrapLayer",
    "BootstrapEvent",
    "BootstrapAnswered",
    "BootstrapRejected",
    "BootstrapUnreachable",
    "BootstrapRetry",
    "BootstrapFinished",
    "KEY_MISMATCH",
]

_log = logging.getLogger(__name__)

#: The reason of a :class:`BootstrapRejected` for a peer that cannot prove its pinned key.
KEY_MISMATCH = "key mismatch"

#: How often an attempt looks at the routing table and the session layer.
_POLL_S = 0.02


# --- events ----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BootstrapEvent:
    """Base class of the bootstrap layer's events."""


@dataclass(frozen=True, slots=True)
class BootstrapAnswered(BootstrapEvent):
    """``contact`` proved its pinned key and answered (``phase``: "peers" or "fallback";
    ``attempt``: 1 for the first round)."""

    contact: Contact
    phase: str
    attempt: int


@dataclass(frozen=True, slots=True)
class BootstrapRejected(BootstrapEvent):
    """``contact`` was refused: something answers at its address but cannot prove the pinned key
    (``reason`` is :data:`KEY_MISMATCH`). Nothing from it enters the routing table."""

    contact: Contact
    reason: str


@dataclass(frozen=True, slots=True)
class BootstrapUnreachable(BootstrapEvent):
    """``contact`` gave no answer at all in attempt number ``attempt`` of ``phase``."""

    contact: Contact
    phase: str
    attempt: int


@dataclass(frozen=True, slots=True)
class BootstrapRetry(BootstrapEvent):
    """Retry number ``retry`` of ``phase`` starts after waiting ``delay_s`` (backoff with jitter),
    for ``contacts`` (the peers still unreachable)."""

    phase: str
    retry: int
    delay_s: float
    contacts: tuple[Contact, ...]


@dataclass(frozen=True, slots=True)
class BootstrapFinished(BootstrapEvent):
    """The bootstrap layer is done. ``answered`` / ``rejected`` / ``unreachable`` are the peers of
    each outcome (a peer unreachable at first that answered later counts as answered);
    ``table_size`` the routing table's size after the handover. ``ok`` is False when no peer at
    all answered (the node then works from whatever else it has, e.g. its peer cache)."""

    answered: tuple[Contact, ...]
    rejected: tuple[Contact, ...]
    unreachable: tuple[Contact, ...]
    table_size: int

    @property
    def ok(self) -> bool:
        return bool(self.answered)


# --- the layer ---------------------------------------------------------------------------------


class BootstrapLayer:
    """Join ``node`` through the pinned peers of ``config`` (see the module docstring).

    ``on_event`` is called with each :class:`BootstrapEvent` as it happens (it must not block; an
    exception it raises is logged and ignored). ``rng`` draws the backoff jitter (default: a fresh
    :class:`random.Random`); ``sleep`` waits the backoff delays (tests may inject a fake).
    """

    def __init__(
        self,
        node: DhtNode,
        config: BootstrapConfig,
        *,
        on_event: Callable[[BootstrapEvent], None] | None = None,
        rng: random.Random | None = None,
        sleep: Callable[[float], object] = asyncio.sleep,
    ) -> None:
        if not isinstance(node, DhtNode):
            raise ArgumentTypeError(f"node must be a DhtNode, not {type(node).__name__}")
        if not isinstance(config, BootstrapConfig):
            raise ArgumentTypeError(f"config must be a BootstrapConfig, not {type(config).__name__}")
        if on_event is not None and not callable(on_event):
            raise ArgumentTypeError("on_event must be callable")
        if rng is not None and not isinstance(rng, random.Random):
            raise ArgumentTypeError(f"rng must be a random.Random, not {type(rng).__name__}")
        if not callable(sleep):
            raise ArgumentTypeError("sleep must be callable")
        self._node = node
        self._config = config
        self._on_event = on_event
        self._rng = rng if rng is not None else random.Random()
        self._sleep = sleep
        self._answered: dict[Contact, None] = {}
        self._rejected: dict[Contact, None] = {}
        self._unreachable: dict[Contact, None] = {}
        self._finished: BootstrapFinished | None = None
        self._running = False

    @property
    def finished(self) -> BootstrapFinished | None:
        """The result of the last completed :meth:`run`, or None."""
        return self._finished

    async def run(self) -> BootstrapFinished:
        """Run the bootstrap (rounds, retries, fallback, handover) and return its result. Never
        raises because peers failed; ClosedError if the node is closed. Cancellable."""
        if self._running:
            raise RuntimeError("this BootstrapLayer is already running")
        self._running = True
        try:
            self._answered.clear()
            self._rejected.clear()
            self._unreachable.clear()
            if not await self._phase("peers", self._config.peers):
                await self._phase("fallback", self._config.fallback_peers)
            await self._handover()
            finished = BootstrapFinished(
                answered=tuple(self._answered), rejected=tuple(self._rejected),
                unreachable=tuple(c for c in self._unreachable if c not in self._answered),
                table_size=len(self._node.engine.table))
            if finished.ok:
                _log.info("bootstrap finished: %d answered, %d rejected, %d unreachable; %d peers in the table",
                          len(finished.answered), len(finished.rejected), len(finished.unreachable),
                          finished.table_size)
            elif self._config.peers or self._config.fallback_peers:
                _log.warning("bootstrap: no bootstrap peer answered (%d rejected, %d unreachable); "
                             "continuing with %d peers in the table", len(finished.rejected),
                             len(finished.unreachable), finished.table_size)
            self._finished = finished
            self._emit(finished)
            return finished
        finally:
            self._running = False

    # --- steps -------------------------------------------------------------------------------------

    async def _phase(self, phase: str, contacts: Sequence[Contact]) -> bool:
        """Rounds over ``contacts`` until one answers or the retries are spent; whether one did."""
        own = self._node.node_id
        todo = [c for c in dict.fromkeys(contacts) if c.node_id != own]
        attempt = 1
        while todo:
            outcomes = await self._round(phase, todo, attempt)
            if any(outcome == "answered" for outcome in outcomes):
                return True
            todo = [c for c, outcome in zip(todo, outcomes) if outcome == "unreachable"]
            if not todo or attempt > self._config.retries:
                return False
            delay = self._config.backoff_delay(attempt, self._rng)
            self._emit(BootstrapRetry(phase, attempt, delay, tuple(todo)))
            _log.info("bootstrap: no %s peer answered; retry %d of %d in %.3f s", phase, attempt,
                      self._config.retries, delay)
            await self._sleep(delay)
            attempt += 1
        return False

    async def _round(self, phase: str, contacts: list[Contact], attempt: int) -> list[str]:
        async with asyncio.TaskGroup() as group:  # cancelling the round cancels every attempt
            tasks = [group.create_task(self._attempt(c)) for c in contacts]
        outcomes = [t.result() for t in tasks]
        for contact, outcome in zip(contacts, outcomes):
            if outcome == "answered":
                self._answered[contact] = None
                _log.info("bootstrap: %s answered (pinned key proven)", contact.pinned)
                self._emit(BootstrapAnswered(contact, phase, attempt))
            elif outcome == "rejected":
                self._rejected[contact] = None
                _log.warning("bootstrap: refused %s: %s (something answers at %s but cannot prove the "
                             "pinned key: a man-in-the-middle or a misconfigured key)",
                             contact.pinned, KEY_MISMATCH, contact.address)
                self._emit(BootstrapRejected(contact, KEY_MISMATCH))
            else:
                self._unreachable[contact] = None
                _log.info("bootstrap: %s did not answer (attempt %d of %s)", contact.pinned, attempt, phase)
                self._emit(BootstrapUnreachable(contact, phase, attempt))
        return outcomes

    async def _attempt(self, contact: Contact) -> str:
        """One authenticated exchange with ``contact``, bounded by ``config.timeout_s``:
        "answered", "rejected" or "unreachable"."""
        node = self._node
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._config.timeout_s
        handshake_seen = False
        task = asyncio.ensure_future(node.bootstrap([contact], deadline_s=self._config.timeout_s))
        try:
            while True:
                if self._in_table(contact):
                    return "answered"
                handshake_seen = handshake_seen or self._handshake_started(contact)
                if task.done() or loop.time() >= deadline:
                    break
                await asyncio.wait({task}, timeout=min(_POLL_S, max(0.0, deadline - loop.time())))
        finally:
            if not task.done():
                task.cancel()
            try:
                await task
            except (asyncio.CancelledError, BootstrapError, LookupTimeoutError):
                # The inner call's end; if run() itself was cancelled, that CancelledError is
                # already propagating through this finally block and is not swallowed here.
                pass
        if self._in_table(contact):
            return "answered"
        if handshake_seen or self._handshake_started(contact):
            return "rejected"
        return "unreachable"

    async def _handover(self) -> None:
        node = self._node
        if len(node.engine.table) == 0:
            return
        try:
            await node.find_closest(node.node_id, deadline_s=self._config.timeout_s)
        except LookupTimeoutError:
            pass  # the table holds what it reached

    # --- helpers -----------------------------------------------------------------------------------

    def _in_table(self, contact: Contact) -> bool:
        entry = self._node.engine.table.get(contact.node_id)
        return entry is not None and entry.address == contact.address

    def _handshake_started(self, contact: Contact) -> bool:
        """Whether our session layer holds a session (confirmed or not) toward the pinned key at
        the contact's address: the address answered our first packet with a WHOAREYOU and we sent
        it a HANDSHAKE bound to the pinned key."""
        return self._node.engine.session.has_session(contact.node_id, contact.address)

    def _emit(self, event: BootstrapEvent) -> None:
        if self._on_event is None:
            return
        try:
            self._on_event(event)
        except Exception:
            _log.exception("bootstrap on_event callback raised on %r", event)
