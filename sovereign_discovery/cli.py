"""The ``sovereign-discovery`` command line (issue 4, item 5; docs/cli.md).

Subcommands: ``keygen``, ``id``, ``node`` (a long-running node: the coordinator, its peer cache
and status endpoint), ``lookup``, ``find``, and ``peers`` (asks a running node's status endpoint).

Every problem a user can cause (a malformed ``--bootstrap`` line, an unreadable or group-readable
key file, a pinned key that does not match, a record not found) ends with one line on stderr naming
it and a non-zero exit, never a traceback: 1 for a failed operation, 2 for bad arguments (argparse's
convention), 3 for "not found".
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import ipaddress
import json
import logging
import signal
import sys
from collections.abc import Sequence

from .aio import DhtNode
from .bootstrap import BootstrapLayer
from .config import BootstrapConfig, Config, ConfigError
from .errors import LookupTimeoutError, SovereignDiscoveryError
from .identity import Identity, encode_public_key
from .keys import NodeId
from .records import PeerRecord, check_capability
from .routing import Contact

__all__ = ["main"]

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3


class _Fail(Exception):
    """One line for stderr, and the exit status."""

    def __init__(self, message: str, status: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.status = status


# --- argument types (argparse turns their ValueErrors into one usage line) ---------------------------


def _contact(text: str) -> Contact:
    try:
        return Contact.parse(text)
    except SovereignDiscoveryError as exc:
        raise argparse.ArgumentTypeError(f"not a pinned peer PUBLIC_KEY@HOST:PORT ({exc})") from None


def _node_id(text: str) -> NodeId:
    try:
        return NodeId.parse(text)
    except SovereignDiscoveryError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _capability(text: str) -> str:
    try:
        check_capability(text)
    except SovereignDiscoveryError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text!r}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 1 <= value <= 1000:
        raise argparse.ArgumentTypeError(f"must be in 1..1000, not {value}")
    return value


# --- output ----------------------------------------------------------------------------------------


def _record_dict(record: PeerRecord) -> dict:
    return {
        "node_id": str(record.node_id),
        "public_key": encode_public_key(record.public_key),
        "seq": record.seq,
        "expires_at": record.expires_at,
        "addresses": [str(a) for a in record.addresses],
        "capabilities": list(record.capabilities),
    }


def _record_text(record: PeerRecord) -> str:
    d = _record_dict(record)
    return (f"node {d['node_id']}\n  public key   {d['public_key']}\n"
            f"  addresses    {', '.join(d['addresses']) or '(none)'}\n"
            f"  capabilities {', '.join(d['capabilities']) or '(none)'}\n"
            f"  seq {d['seq']}, expires at {d['expires_at']} (Unix time); signature verified")


# --- subcommands -------------------------------------------------------------------------------------


def _keygen(args: argparse.Namespace) -> int:
    identity = Identity.generate()
    path = identity.save(args.out)
    print(f"wrote {path} (mode 0600): node {identity.node_id}")
    return 0


def _id(args: argparse.Namespace) -> int:
    identity = Identity.load(args.key)
    out = {"node_id": str(identity.node_id), "public_key": encode_public_key(identity.public_key)}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"node id    {out['node_id']}\npublic key {out['public_key']}")
    return 0


async def _joined_node(args: argparse.Namespace) -> tuple[DhtNode, BootstrapLayer]:
    """A node on --listen, joined through the pinned --bootstrap peers (refusing mismatches)."""
    host, _, port = args.listen.rpartition(":")
    node = DhtNode(Identity.generate(), host=host.strip("[]"), port=int(port))
    await node.start()
    config = BootstrapConfig(peers=tuple(args.bootstrap), timeout_s=min(args.timeout, 5.0), retries=1,
                             backoff_initial_s=0.2, backoff_max_s=1.0)
    layer = BootstrapLayer(node, config)
    finished = await layer.run()
    if not finished.ok:
        await node.close()
        if finished.rejected:
            keys = ", ".join(c.pinned for c in finished.rejected)
            raise _Fail(f"pinned key mismatch: the peer at the address did not prove the pinned key ({keys})")
        raise _Fail(f"no bootstrap peer answered ({', '.join(str(c.address) for c in finished.unreachable)})")
    return node, layer


async def _lookup(args: argparse.Namespace) -> int:
    node, _ = await _joined_node(args)
    try:
        record = await node.find_record(args.node_id, deadline_s=args.timeout, quorum=0)  # an inspection: the newest
    except LookupTimeoutError:
        raise _Fail(f"no record of node {args.node_id} found within {args.timeout:g} s (the lookup timed out)",
                    EXIT_NOT_FOUND) from None
    except SovereignDiscoveryError as exc:
        raise _Fail(f"lookup of {args.node_id} failed: {exc}", EXIT_NOT_FOUND) from None
    finally:
        await node.close()
    if record is None:
        raise _Fail(f"no record of node {args.node_id} found", EXIT_NOT_FOUND)
    print(json.dumps(_record_dict(record)) if args.json else _record_text(record))
    return 0


async def _find(args: argparse.Namespace) -> int:
    node, _ = await _joined_node(args)
    try:
        records = await node.find_providers(args.capability, count=args.count, deadline_s=args.timeout)
    except LookupTimeoutError:
        raise _Fail(f"no provider of {args.capability!r} found within {args.timeout:g} s (the lookup timed out)",
                    EXIT_NOT_FOUND) from None
    except SovereignDiscoveryError as exc:
        raise _Fail(f"provider lookup of {args.capability!r} failed: {exc}", EXIT_NOT_FOUND) from None
    finally:
        await node.close()
    if args.json:
        print(json.dumps([_record_dict(r) for r in records]))
    else:
        print(f"{len(records)} provider(s) of {args.capability!r}")
        for record in records:
            print(_record_text(record))
    if not records:
        raise _Fail(f"no provider of {args.capability!r} found", EXIT_NOT_FOUND)
    return 0


# --- node ----------------------------------------------------------------------------------------------


def _node_config(args: argparse.Namespace) -> Config:
    """Defaults < --config FILE (or $SOVEREIGN_CONFIG) < SOVEREIGN_* variables < the flags."""
    overrides: dict[str, object] = {}
    names: dict[str, str] = {}

    def flag(setting: str, value: object, name: str) -> None:
        overrides[setting] = value
        names[setting] = name

    if args.key is not None:
        flag("node.key_file", args.key, "--key")
    if args.listen is not None:
        host, _, port = args.listen.rpartition(":")
        flag("dht.listen_host", host.strip("[]"), "--listen")
        flag("dht.listen_port", port, "--listen")
    if args.bootstrap:
        flag("bootstrap.peers", ",".join(args.bootstrap), "--bootstrap")
    if args.cache is not None:
        flag("node.cache_file", args.cache, "--cache")
    if args.http is not None:
        flag("node.http", args.http, "--http")
    if args.capability:
        flag("node.capabilities", ",".join(args.capability), "--capability")
    if args.mdns_interface:
        flag("local.mdns_interfaces", ",".join(args.mdns_interface), "--mdns-interface")
    if args.ble_adapter is not None:
        flag("local.ble_adapter", args.ble_adapter, "--ble-adapter")
    if args.no_mdns:
        flag("local.mdns", False, "--no-mdns")
    if args.no_ble:
        flag("local.bluetooth", False, "--no-ble")
    config = Config.load(args.config, overrides=overrides, override_names=names)
    if config.node.key_file is None:
        raise _Fail("a key file is needed: --key FILE (create one with 'sovereign-discovery keygen --out FILE')",
                    EXIT_USAGE)
    return config


def _event_line(event: object) -> str | None:
    """A log line for the peer-table events (the layers log their own: bootstrap outcomes, layers
    unavailable)."""
    from .coordinator import PeerDiscovered, PeerLost

    if isinstance(event, PeerDiscovered):
        caps = ", ".join(event.peer.record.capabilities) or "no capabilities"
        return f"discovered {event.peer.node_id} via {event.source} ({caps})"
    if isinstance(event, PeerLost):
        return f"lost {event.peer.node_id} ({event.reason})"
    return None


async def _node(args: argparse.Namespace) -> int:
    from .coordinator import PeerDiscoveryCoordinator

    config = _node_config(args)
    logging.getLogger().setLevel(args.log_level or config.node.log_level)
    identity = Identity.load(config.node.key_file)
    log = logging.getLogger("sovereign_discovery.node")

    from .bootstrap import BootstrapRejected

    refused: list[str] = []

    def on_event(event: object) -> None:
        if isinstance(event, BootstrapRejected):
            refused.append(event.contact.pinned)
        line = _event_line(event)
        if line is not None:
            log.info("%s", line)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    coordinator = PeerDiscoveryCoordinator(identity, config=config, on_event=on_event)
    await coordinator.start()
    server = None
    try:
        print(coordinator.node.contact.pinned, flush=True)
        if config.node.http is not None:
            from .status_http import StatusServer

            server = StatusServer(coordinator, host=config.node.http.host, port=config.node.http.port)
            await server.start()
            print(f"status {server.url}", flush=True)
        watch = asyncio.create_task(coordinator.joined())
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({watch, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if watch.done() and _refused_by_all(coordinator, refused):
            stopping.cancel()
            raise _Fail(f"pinned key mismatch: every bootstrap peer failed to prove its pinned key and no "
                        f"other peer is known; nothing from them was trusted ({', '.join(refused)})")
        await stopping
        watch.cancel()
        log.info("stopping: closing the layers and flushing the peer cache")
    finally:
        if server is not None:
            await server.close()
        await coordinator.close()
    log.info("stopped cleanly")
    return 0


def _refused_by_all(coordinator, refused: list[str]) -> bool:
    """Every bootstrap peer was refused for a key mismatch and nothing else filled the routing
    table: a misconfiguration or a man in the middle, not a network problem — stop and say so."""
    bootstrap = coordinator.stats()["bootstrap"]
    return (bool(refused) and bootstrap["answered"] == 0 and bootstrap["unreachable"] == 0
            and coordinator.health().get("table_size") == 0)


# --- peers ---------------------------------------------------------------------------------------------


def _peers(args: argparse.Namespace) -> int:
    from urllib.parse import urlencode

    from .status_http import fetch_json, format_peers

    query = {k: v for k, v in (("capability", args.capability), ("source", args.source)) if v}
    path = "/peers" + (f"?{urlencode(query)}" if query else "")
    answer = fetch_json(args.http.host, args.http.port, path, timeout=args.timeout)
    peers = answer.get("peers", [])
    print(json.dumps(peers) if args.json else format_peers(peers))
    return 0


# --- parser ------------------------------------------------------------------------------------------


def _pinned_text(text: str) -> str:
    _contact(text)
    return text


def _http_address(text: str):
    from .config import HostPort

    try:
        return HostPort.parse(text, setting="--http")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _listen(text: str) -> str:
    """``IP:PORT`` or ``[IPv6]:PORT`` (names are not resolved: a node binds an address)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isascii() or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"must look like HOST:PORT or [HOST]:PORT, not {text!r}")
    try:
        ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{host!r} is not an IP address (names are not resolved)") from None
    return text


def _add_log_level(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument("--log-level", default=default, type=str.upper,
                        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
                        help="logging level on stderr (node: node.log_level of the configuration, INFO;"
                             " the other commands: WARNING)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sovereign-discovery",
        description="Decentralised peer discovery: keys, lookups and providers on the DHT.")
    _add_log_level(parser, None)
    # The same flag after the subcommand; SUPPRESS keeps a value given before it.
    common = argparse.ArgumentParser(add_help=False)
    _add_log_level(common, argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_parser = functools.partial(sub.add_parser, parents=[common])

    p = add_parser("keygen", help="create a private key file (mode 0600)")
    p.add_argument("--out", required=True, metavar="FILE", help="where to write it (never overwritten)")
    p.set_defaults(run=_keygen)

    p = add_parser("id", help="print the node ID and public key of a key file")
    p.add_argument("--key", required=True, metavar="FILE")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.set_defaults(run=_id)

    p = add_parser("node", help="run a node until SIGINT or SIGTERM (a bootstrap node: no --bootstrap)",
                   description="Runs the coordinator: bootstrap, local and DHT layers, the peer cache "
                               "and the status endpoint. Prints its pinned line PUBLIC_KEY@HOST:PORT "
                               "first (and 'status URL' with --http). Flags override --config and "
                               "SOVEREIGN_* variables (docs/configuration.md).")
    p.add_argument("--key", metavar="FILE", help="private key file (node.key_file)")
    p.add_argument("--listen", type=_listen, metavar="HOST:PORT",
                   help="UDP address to bind (dht.listen_host/listen_port; 127.0.0.1:0)")
    p.add_argument("--bootstrap", action="append", type=_pinned_text, metavar="PK@HOST:PORT",
                   help="a pinned bootstrap peer (repeatable; bootstrap.peers)")
    p.add_argument("--config", metavar="FILE", help="TOML configuration file")
    p.add_argument("--cache", metavar="FILE", help="SQLite peer cache (node.cache_file)")
    p.add_argument("--http", metavar="HOST:PORT", help="status endpoint address (node.http; loopback only "
                                                          "unless you mean it)")
    p.add_argument("--capability", action="append", type=_capability, metavar="NAME",
                   help="a capability to announce (repeatable; node.capabilities)")
    p.add_argument("--mdns-interface", action="append", metavar="ADDR",
                   help="IP address of an interface mDNS announces and browses on (repeatable; "
                        "local.mdns_interfaces)")
    p.add_argument("--ble-adapter", metavar="NAME", help="Bluetooth adapter, e.g. hci0 (local.ble_adapter)")
    p.add_argument("--no-mdns", action="store_true", help="switch the mDNS layer off")
    p.add_argument("--no-ble", action="store_true", help="switch the Bluetooth LE layer off")
    p.set_defaults(run=_node)

    p = add_parser("peers", help="list the peers of a running node (its --http status endpoint)")
    p.add_argument("--http", required=True, type=_http_address, metavar="HOST:PORT")
    p.add_argument("--capability", type=_capability, metavar="NAME", help="only providers of NAME")
    p.add_argument("--source", choices=["bootstrap", "cache", "dht", "mdns", "ble"],
                   help="only peers this layer vouches for")
    p.add_argument("--timeout", type=_positive, default=5.0, metavar="S", help="seconds (5)")
    p.add_argument("--json", action="store_true", help="JSON output")
    p.set_defaults(run=_peers)

    for name, helptext in (("lookup", "find a node's verified record by node ID"),
                           ("find", "find verified providers of a capability")):
        p = add_parser(name, help=helptext)
        if name == "lookup":
            p.add_argument("node_id", type=_node_id, metavar="NODE_ID")
        else:
            p.add_argument("--capability", required=True, type=_capability, metavar="NAME")
            p.add_argument("--count", type=_count, default=20, metavar="N", help="at most this many (20)")
        p.add_argument("--bootstrap", required=True, action="append", type=_contact,
                       metavar="PK@HOST:PORT", help="a pinned bootstrap peer (repeatable)")
        p.add_argument("--listen", type=_listen, default="0.0.0.0:0", metavar="HOST:PORT",
                       help="where this short-lived node listens (0.0.0.0:0)")
        p.add_argument("--timeout", type=_positive, default=10.0, metavar="S",
                       help="deadline of the lookup in seconds (10)")
        p.add_argument("--json", action="store_true", help="JSON output")
        p.set_defaults(run=_lookup if name == "lookup" else _find)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level or "WARNING", format="%(levelname)s %(name)s: %(message)s")
    try:
        result = args.run(args)
        if asyncio.iscoroutine(result):
            result = asyncio.run(result)
        return result
    except _Fail as exc:
        print(f"sovereign-discovery {args.command}: {exc}", file=sys.stderr)
        return exc.status
    except ConfigError as exc:  # a bad setting in the file, the environment or a flag
        print(f"sovereign-discovery {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (SovereignDiscoveryError, OSError) as exc:  # key files, binding, …: one line
        print(f"sovereign-discovery {args.command}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # python -m sovereign_discovery.cli
    sys.exit(main())
