"""Run a bootstrap node: a DHT node with no bootstrap contacts of its own, for others to join through.

    python examples/bootstrap_node.py                          # 127.0.0.1, a free port, a fresh key
    python examples/bootstrap_node.py --host 192.0.2.7 --port 4000 --key boot.key --create-key
    python examples/bootstrap_node.py --host 127.0.0.1 --host ::1 --port 4000     # dual stack

The first line of standard output is the node's pinned line, ``<public key>@<host>:<port>``,
flushed at once so that scripts can read it (``head -n 1``) and hand it to ``DhtNode.bootstrap``
or to ``examples/find_peers.py --bootstrap``. Peers that join with it check that whoever answers
at that address holds that key. The node then serves until SIGINT (Ctrl-C) or SIGTERM, closes its
sockets, prints a short summary (table size, records held, messages in and out, drops) and exits
with status 0.

A bootstrap node is an ordinary node: it answers PING, FIND_NODE, STORE, FIND_VALUE, ANNOUNCE and
GET_PROVIDERS, and its routing table fills with the peers that talk to it. Keep its key in a file
(``--key``) so that its pinned line survives restarts. See docs/dht-node.md.

Exit status: 0 after a signal, 1 when the node cannot start (key file, address in use, …),
2 for bad arguments. Errors are one line on standard error.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import signal
import sys
import time

import sovereign_discovery as sd


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage block
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _port(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"port must be a number in 0..65535, not {text!r}")
    return int(text)


def _address(text: str) -> sd.Address:
    try:
        return sd.Address.parse(text)
    except sd.ArgumentValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = _Parser(
        prog="bootstrap_node.py",
        description="Run a sovereign_discovery bootstrap node (a DHT node with no bootstrap "
                    "contacts). Prints its pinned line PUBLIC_KEY@HOST:PORT as the first line of "
                    "stdout, serves until SIGINT/SIGTERM, then prints a summary.")
    parser.add_argument("--host", action="append", metavar="IP",
                        help="IP address to bind (default 127.0.0.1); give it twice, an IPv4 and "
                             "an IPv6 address, for dual stack")
    parser.add_argument("--port", type=_port, default=0,
                        help="UDP port (default 0: the system picks a free one)")
    parser.add_argument("--key", metavar="FILE",
                        help="load the node's identity from this key file (mode 0600) instead of "
                             "generating a fresh one, so the pinned line survives restarts")
    parser.add_argument("--create-key", action="store_true",
                        help="with --key: create FILE with a new identity if it does not exist")
    parser.add_argument("--advertise", type=_address, metavar="HOST:PORT",
                        help="the address peers should use (in the pinned line and the node's "
                             "record), e.g. a public address forwarded to the bound one")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="report peers entering and leaving the routing table on stderr")
    args = parser.parse_args(argv)
    if args.create_key and not args.key:
        parser.error("--create-key needs --key FILE")
    args.host = args.host or ["127.0.0.1"]
    if args.advertise is None and any(_is_wildcard(host) for host in args.host):
        parser.error("a wildcard --host (0.0.0.0, ::) needs --advertise HOST:PORT: the pinned "
                     "line must name an address peers can reach")
    return args


def _is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False  # DhtNode reports the bad address


def load_identity(args: argparse.Namespace) -> sd.Identity:
    """The identity from ``--key`` (created first with ``--create-key``), else a fresh one.
    Raises KeyFileError (InsecureKeyFileError for a file others can read) with the reason."""
    if not args.key:
        return sd.Identity.generate()
    if not args.create_key and not os.path.lexists(args.key):
        raise sd.KeyFileError(f"key file {args.key} does not exist (add --create-key to create it)")
    if args.create_key:
        try:
            sd.Identity.generate().save(args.key)  # mode 0600; refuses to overwrite
            print(f"created key file {args.key}", file=sys.stderr)
        except sd.KeyFileError:
            pass  # it exists (or cannot be made): load it below, which says what is wrong
    return sd.Identity.load(args.key)


def _n(count: int, one: str, many: str | None = None) -> str:
    return f"{count} {one if count == 1 else many or one + 's'}"


def summary(stats: dict, uptime_s: float, reason: str) -> list[str]:
    """Two lines: the table and store, then messages in/out and the drops that happened."""
    store = stats["store"]
    received = sum(stats["messages_in"].values())
    sent = sum(stats["messages_out"].values())
    top_in = ", ".join(f"{name} {count}" for name, count in
                       sorted(stats["messages_in"].items(), key=lambda item: -item[1]) if count)
    drops = {name: count for name, count in stats["drops"].items() if count}
    drop_text = ", ".join(f"{name} {count}" for name, count in sorted(drops.items(), key=lambda item: -item[1]))
    return [
        f"stopped by {reason} after {uptime_s:.1f} s: table {_n(stats['table_size'], 'peer')}, "
        f"{_n(stats['sessions'], 'session')}, {_n(store['records'], 'record')} and "
        f"{_n(store['providers'], 'provider entry', 'provider entries')} held",
        f"messages in {received}" + (f" ({top_in})" if top_in else "") + f", out {sent}; "
        f"drops {sum(drops.values())}" + (f" ({drop_text})" if drop_text else ""),
    ]


async def serve(args: argparse.Namespace, identity: sd.Identity) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    received: list[str] = []

    def on_signal(name: str) -> None:
        received.append(name)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig.name)

    holder: list[sd.DhtNode] = []

    def on_event(event: sd.Event) -> None:
        if not holder:
            return
        size = len(holder[0].engine.table)
        if isinstance(event, sd.ContactAdded):
            print(f"+ {event.contact.node_id.short()}… at {event.contact.address} (table {size})",
                  file=sys.stderr, flush=True)
        elif isinstance(event, sd.ContactRemoved):
            print(f"- {event.node_id.short()}… left the table (table {size})", file=sys.stderr, flush=True)

    node = sd.DhtNode(identity, host=args.host, port=args.port, advertised_address=args.advertise,
                      on_event=on_event if args.verbose else None)
    await node.start()
    holder.append(node)
    started = time.monotonic()
    try:
        reachable = args.advertise or node.address
        print(sd.Contact(identity.public_key, reachable).pinned, flush=True)
        for address in node.addresses:
            if address != reachable:
                print(f"also listening on {sd.Contact(identity.public_key, address).pinned}",
                      file=sys.stderr)
        print(f"bootstrap node {identity.node_id} serving; stop with Ctrl-C or SIGTERM",
              file=sys.stderr, flush=True)
        await stop.wait()
        stats = node.stats()
    finally:
        await node.close()
    try:
        for line in summary(stats, time.monotonic() - started, received[0] if received else "request"):
            print(line, flush=True)
    except BrokenPipeError:  # whoever read the pinned line is gone: the node still stopped cleanly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        identity = load_identity(args)
        return asyncio.run(serve(args, identity))
    except (sd.KeyFileError, sd.EndpointError, sd.ArgumentValueError, sd.ArgumentTypeError) as exc:
        print(f"bootstrap_node.py: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a signal before the handlers were installed
        return 130


if __name__ == "__main__":
    sys.exit(main())
