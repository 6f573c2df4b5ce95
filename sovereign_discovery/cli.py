"""The ``sovereign-discovery`` command line (issue 4, item 5; docs/cli.md).

Subcommands so far: ``keygen``, ``id``, ``lookup`` and ``find``. ``node`` and ``peers`` come with
the coordinator and the status endpoint.

Every problem a user can cause (a malformed ``--bootstrap`` line, an unreadable or group-readable
key file, a pinned key that does not match, a record not found) ends with one line on stderr naming
it and a non-zero exit, never a traceback: 1 for a failed operation, 2 for bad arguments (argparse's
convention), 3 for "not found".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Sequence

from .aio import DhtNode
from .bootstrap import BootstrapLayer
from .config import BootstrapConfig
from .errors import SovereignDiscoveryError
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
        record = await node.find_record(args.node_id, deadline_s=args.timeout)
    except SovereignDiscoveryError as exc:  # LookupTimeoutError
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
    return 0 if records else EXIT_NOT_FOUND


# --- parser ------------------------------------------------------------------------------------------


def _listen(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isascii() or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"must look like HOST:PORT or [HOST]:PORT, not {text!r}")
    return text


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sovereign-discovery",
        description="Decentralised peer discovery: keys, lookups and providers on the DHT.")
    parser.add_argument("--log-level", default="WARNING",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
                        help="logging level on stderr (WARNING)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("keygen", help="create a private key file (mode 0600)")
    p.add_argument("--out", required=True, metavar="FILE", help="where to write it (never overwritten)")
    p.set_defaults(run=_keygen)

    p = sub.add_parser("id", help="print the node ID and public key of a key file")
    p.add_argument("--key", required=True, metavar="FILE")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.set_defaults(run=_id)

    for name, helptext in (("lookup", "find a node's verified record by node ID"),
                           ("find", "find verified providers of a capability")):
        p = sub.add_parser(name, help=helptext)
        if name == "lookup":
            p.add_argument("node_id", type=_node_id, metavar="NODE_ID")
        else:
            p.add_argument("--capability", required=True, type=_capability, metavar="NAME")
            p.add_argument("--count", type=_count, default=20, help="at most this many (20)")
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
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = args.run(args)
        if asyncio.iscoroutine(result):
            result = asyncio.run(result)
        return result
    except _Fail as exc:
        print(f"sovereign-discovery {args.command}: {exc}", file=sys.stderr)
        return exc.status
    except (SovereignDiscoveryError, OSError) as exc:  # key files, binding, …: one line
        print(f"sovereign-discovery {args.command}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # python -m sovereign_discovery.cli
    sys.exit(main())
