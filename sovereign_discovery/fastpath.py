"""The serving fast path: session ciphers and the responder, in C or in their pure-Python twin.

The C extension ``_fastpath`` is chosen by the same rules as the keyspace kernel
(:mod:`sovereign_discovery.keys`: ``SOVEREIGN_DISCOVERY_PURE_PYTHON=1`` forces the twin
``_fastpath_py``, ``SOVEREIGN_DISCOVERY_REQUIRE_C=1`` makes a missing build an error, otherwise a
missing build falls back with a warning). ``FASTPATH_KERNEL`` says which runs and
``FASTPATH_REASON`` why. The C module encrypts with the libsodium functions PyNaCl loaded
(:func:`sovereign_discovery.aead.function_addresses`).

- :class:`Cipher` holds one session's keys, send counter and replay window (the session layer
  keeps one per session, so the session layer and the responder seal and open with the same
  state);
- :class:`Responder` answers PING and FIND_NODE in established sessions straight from a socket
  (``docs/engine.md``, "The serving fast path"); the session layer indexes its sessions in it
  (:func:`index_key`), the engine gives it its hooks, the UDP endpoint calls
  :meth:`Responder.serve_batch`.
"""

from __future__ import annotations

from types import ModuleType

from . import _fastpath_py, aead
from .addresses import Address
from .errors import ArgumentValueError
from .keys import named_extension, select_extension

__all__ = ["Cipher", "Responder", "REPLAYED", "MAX_BATCH", "recv_batch", "send_batch", "index_key",
           "fastpath_module", "FASTPATH_KERNEL", "FASTPATH_REASON"]


def _prepared(module: ModuleType) -> ModuleType:
    if module is not _fastpath_py:
        addresses = aead.function_addresses()
        if addresses is None:  # pragma: no cover - a PyNaCl without the cffi handle
            raise ImportError("PyNaCl's libsodium functions are not reachable through cffi")
        module.use_aead(*addresses)
    return module


def _select() -> tuple[ModuleType, str, str]:
    module, kernel, reason = select_extension("_fastpath", _fastpath_py)
    try:
        return _prepared(module), kernel, reason
    except ImportError as exc:  # pragma: no cover - see _prepared
        return _fastpath_py, "python", f"C fast path unusable ({exc}); using its pure-Python twin"


_module, FASTPATH_KERNEL, FASTPATH_REASON = _select()

Cipher = _module.Cipher
Responder = _module.Responder
REPLAYED = _module.REPLAYED
MAX_BATCH = _module.MAX_BATCH
recv_batch = _module.recv_batch
send_batch = _module.send_batch


def fastpath_module(name: str | None = None) -> ModuleType:
    """The active module, or the one named ``"c"`` or ``"python"`` (tests run both)."""
    return _prepared(named_extension(name, "_fastpath", _fastpath_py, _module, "the C fast path"))


def index_key(node_id: bytes, address: Address) -> bytes | None:
    """The responder's key of a session with ``node_id`` at ``address``: node ID || IP || port.
    None for a zoned IPv6 address (such sessions stay on the session layer's own path)."""
    try:
        return bytes(node_id) + address.encode()[1:]
    except ArgumentValueError:
        return None
