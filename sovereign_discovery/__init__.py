"""sovereign_discovery: fully decentralised peer discovery.

Peers are Ed25519 keys; contact information is a signed, self-certifying :class:`PeerRecord`; the
Kademlia :class:`RoutingTable` finds the peers closest to any ID, its hot path in a C kernel with a
pure-Python twin. :class:`PeerDiscoveryCoordinator` is what an application runs: the bootstrap,
local and DHT layers merged into one peer table. :class:`DhtNode` is the asyncio DHT node over authenticated UDP; it runs the
sans-IO :class:`DhtEngine`, which :class:`sovereign_discovery.testing.SimulatedNetwork` runs too. ``KERNEL`` says which kernel is active (``"c"`` or ``"python"``) and
``KERNEL_REASON`` why. Exceptions are listed in :mod:`sovereign_discovery.errors`.
"""

from __future__ import annotations

from .addresses import Address
from .aio import DhtNode
from .constants import DEFAULT_BUCKET_SIZE, MAX_DATAGRAM_BYTES, MAX_RECORD_BYTES
from .errors import (
    ArgumentTypeError,
    ArgumentValueError,
    BadSignatureError,
    BootstrapError,
    ClosedError,
    DecodeError,
    EndpointError,
    InsecureKeyFileError,
    KernelFallbackWarning,
    KernelUnavailableError,
    KeyFileError,
    LookupTimeoutError,
    MalformedRecordError,
    PeerCacheError,
    RecordError,
    RecordExpiredError,
    RecordFromFutureError,
    RecordTooLargeError,
    SovereignDiscoveryError,
    WrongThreadError,
)
from .identity import (
    Identity,
    SignaturePurpose,
    encode_public_key,
    parse_public_key,
    verify_signature,
)
from .events import (
    ContactAdded,
    ContactRemoved,
    Event,
    ExternalAddressChanged,
    LookupFinished,
    PingFinished,
    ProvidersFound,
    RecordAnnounced,
    RecordFound,
)
from .keys import KERNEL, KERNEL_REASON, Distance, KeyspaceIndex, NodeId, bucket_index, distance
from .node import DhtConfig, DhtEngine
from .records import PeerRecord
from .routing import (
    Contact,
    DiversityLimits,
    Full,
    Cached,
    Inserted,
    InsertResult,
    Pending,
    Rejected,
    Removed,
    RoutingTable,
    Updated,
)

# The layers a long-running node uses (configuration, bootstrap layer, peer cache) load on first
# use (PEP 562): a script that only looks up records does not pay for tomllib, sqlite3 and them.
_LAZY = {
    **dict.fromkeys(("BootstrapLayer", "BootstrapEvent", "BootstrapAnswered", "BootstrapRejected",
                     "BootstrapUnreachable", "BootstrapRetry", "BootstrapFinished"), "bootstrap"),
    **dict.fromkeys(("Config", "NodeConfig", "BootstrapConfig", "LocalConfig", "DhtSettings",
                     "ConfigError", "ConfigTypeError"), "config"),
    **dict.fromkeys(("PeerCache", "CachedPeer", "PutResult", "SetAside"), "peer_cache"),
    **dict.fromkeys(("PeerDiscoveryCoordinator", "DiscoveryEvent", "PeerDiscovered", "PeerUpdated",
                     "PeerLost", "LayerStateChanged"), "coordinator"),
    **dict.fromkeys(("PeerInfo", "PeerTable"), "peer_table"),
    **dict.fromkeys(("LocalLayer", "LayerContext", "LayerUnavailable", "ResolvedPeer"), "layers"),
    **dict.fromkeys(("StatusServer", "StatusClientError"), "status_http"),
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'sovereign_discovery' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__version__ = "0.1.0"

__all__ = [
    "__version__",
    "KERNEL",
    "KERNEL_REASON",
    # identities and records
    "Identity",
    "SignaturePurpose",
    "verify_signature",
    "encode_public_key",
    "parse_public_key",
    "NodeId",
    "Distance",
    "distance",
    "bucket_index",
    "Address",
    "PeerRecord",
    # the peer cache
    "PeerCache",
    "CachedPeer",
    "PutResult",
    "SetAside",
    # routing
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
    "KeyspaceIndex",
    # the DHT
    "DhtNode",
    "DhtConfig",
    "DhtEngine",
    "Event",
    "LookupFinished",
    "RecordFound",
    "ProvidersFound",
    "RecordAnnounced",
    "PingFinished",
    "ContactAdded",
    "ContactRemoved",
    "ExternalAddressChanged",
    # the coordinator
    "PeerDiscoveryCoordinator",
    "PeerInfo",
    "PeerTable",
    "DiscoveryEvent",
    "PeerDiscovered",
    "PeerUpdated",
    "PeerLost",
    "LayerStateChanged",
    "LocalLayer",
    "LayerContext",
    "LayerUnavailable",
    "ResolvedPeer",
    "StatusServer",
    "StatusClientError",
    # the bootstrap layer
    "BootstrapLayer",
    "BootstrapEvent",
    "BootstrapAnswered",
    "BootstrapRejected",
    "BootstrapUnreachable",
    "BootstrapRetry",
    "BootstrapFinished",
    # configuration
    "Config",
    "NodeConfig",
    "BootstrapConfig",
    "LocalConfig",
    "DhtSettings",
    "ConfigError",
    "ConfigTypeError",
    # limits
    "DEFAULT_BUCKET_SIZE",
    "MAX_DATAGRAM_BYTES",
    "MAX_RECORD_BYTES",
    # errors
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
    "ClosedError",
    "EndpointError",
    "LookupTimeoutError",
    "BootstrapError",
    "PeerCacheError",
    "WrongThreadError",
    "KernelUnavailableError",
    "KernelFallbackWarning",
]
