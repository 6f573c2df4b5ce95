#!/usr/bin/env python3
"""Monte Carlo model: Kademlia lookup rounds until the target is first contacted, for b = 1
(one k-bucket per shared-prefix length) and the accelerated lookups of Kademlia §4.2 (b = 2, 3).

Network: N random 64-bit IDs, sorted (a prefix sub-tree is a contiguous range, found by bisect).

Routing table of node x (sampled lazily, memoised; identical to a full sampling):
  for each level L = 0, b, 2b, ...: x's digit d = bits [L, L+b) of x; for each digit value v != d
  the sub-tree "x[0:L] + v" holds m nodes; its bucket gets min(k, m) of them uniformly at random
  (all of them when m <= k). Stop after the level at which x's own sub-tree "x[0:L] + d" holds only
  x. With b = 1 this is exactly "k random nodes per shared-prefix length" (what
  benchmarks/lookup_scaling.py's fill_from_global_view lays out). Below the level where x's own
  sub-tree holds <= k others every sibling sub-tree holds <= k nodes, so everyone there is known.

Lookup (a copy of sovereign_discovery/lookup.py's Lookup + DhtEngine._start_lookup/_drive):
  seeds = the source table's k closest to the target (round 1); candidates sorted by XOR distance,
  at most 8k kept (the farthest not-yet-contacted dropped); alpha requests in flight, always to the
  closest not-yet-contacted; a contact learnt from a round-r answer has round r+1 (the smallest if
  reported several times before it was contacted); the lookup ends when the k closest candidates
  have all answered, when nothing is left to ask, or (FIND_VALUE) when the target answers.
  Answers: --answers find_node: every responder returns its table's k closest to the target.
           --answers find_value (the engine's find_record(quorum=0), the default): the target's k
           true closest nodes hold its record and answer FIND_VALUE with the record only (no
           contacts: DhtEngine._serve), the others with their k closest.
  Latency: --latency engine (default): each datagram one way log-normal, median 50 ms, sigma 0.5
           (the benchmark's LinkModel), so a round trip is the sum of two draws;
           --latency rtt: the round trip is one log-normal draw, median 100 ms, sigma 0.5.
  No loss, no timeouts (the engine's first request timeout is 2 s, far above any round trip here).

Output: per (N, b, answers): counts of rounds_to_target, median, median requests sent up to and
including the one to the target, median requests of the whole lookup, target-contacted rate,
and the routing-table size (contacts per node) over --table-nodes random nodes.
"""

from __future__ import annotations

import argparse
import bisect
import heapq
import json
import math
import random
import statistics
import sys
import time
from collections import Counter

BITS = 64
WAITING, IN_FLIGHT, SUCCEEDED = 0, 1, 2


class Network:
    def __init__(self, n: int, seed: int):
        rng = random.Random(seed)
        ids = set()
        while len(ids) < n:
            ids.add(rng.getrandbits(BITS))
        self.ids = sorted(ids)
        self.n = n

    def count(self, lo: int, hi: int) -> tuple[int, int]:
        """Index range [s, e) of the IDs in [lo, hi)."""
        ids = self.ids
        return bisect.bisect_left(ids, lo), bisect.bisect_left(ids, hi)

    def true_closest(self, t: int, count: int) -> list[int]:
        """Indices of the `count` IDs nearest `t` by XOR (exact)."""
        ids = self.ids
        # deepest prefix sub-tree of t holding >= count nodes: the `count` closest are inside it
        s, e = 0, self.n
        for length in range(1, BITS + 1):
            shift = BITS - length
            lo = (t >> shift) << shift
            s2, e2 = self.count(lo, lo + (1 << shift))
            if e2 - s2 < count:
                break
            s, e = s2, e2
        return sorted(range(s, e), key=lambda j: ids[j] ^ t)[:count]


class Tables:
    """Routing tables of one network for one (k, b), sampled lazily and memoised."""

    def __init__(self, net: Network, k: int, b: int, seed: int):
        self.net, self.k, self.b = net, k, b
        self.rng = random.Random(seed)
        self.memo: dict[int, list[int]] = {}

    def build(self, i: int, rng: random.Random) -> list[int]:
        net, k, b = self.net, self.k, self.b
        x = net.ids[i]
        contacts: list[int] = []
        level = 0
        while level < BITS:
            width = min(b, BITS - level)
            shift = BITS - level - width
            digit = (x >> shift) & ((1 << width) - 1)
            base = (x >> (shift + width)) << (shift + width)  # x's first `level` bits
            for v in range(1 << width):
                if v == digit:
                    continue
                lo = base | (v << shift)
                s, e = net.count(lo, lo + (1 << shift))
                if e - s <= k:
                    contacts.extend(range(s, e))
                else:
                    contacts.extend(rng.sample(range(s, e), k))
            own = base | (digit << shift)
            s, e = net.count(own, own + (1 << shift))
            if e - s <= 1:  # x's own sub-tree at the next level holds only x: nothing deeper
                break
            level += width
        return contacts

    def table(self, i: int) -> list[int]:
        t = self.memo.get(i)
        if t is None:
            t = self.memo[i] = self.build(i, self.rng)
        return t

    def closest(self, i: int, target: int, count: int) -> list[int]:
        ids = self.net.ids
        return heapq.nsmallest(count, self.table(i), key=lambda j: ids[j] ^ target)


def lookup(tables: Tables, src: int, tgt: int, alpha: int, answers: str, latency: str,
           lat_rng: random.Random, cap_factor: int = 8) -> dict:
    net, k = tables.net, tables.k
    ids = net.ids
    t = ids[tgt]
    cap = cap_factor * k
    holders = set(net.true_closest(t, k + 1)) - {tgt} if answers == "find_value" else set()

    dist: list[int] = []       # sorted XOR distances of the candidates
    order: list[int] = []      # candidate node indices, same order
    state: dict[int, int] = {}
    rnd: dict[int, int] = {}
    in_flight = 0
    sent = 0
    max_round = 0
    result = {"rounds_to_target": None, "requests_to_target": None}
    finished = False
    events: list[tuple[float, int, int]] = []  # (answer arrival time, seq, node)
    seq = 0

    def add(contacts, r):
        added = False
        for j in contacts:
            st = state.get(j)
            if st is not None:
                if st == WAITING and r < rnd[j]:
                    rnd[j] = r
                continue
            if j == src:
                continue
            d = ids[j] ^ t
            pos = bisect.bisect_left(dist, d)
            dist.insert(pos, d)
            order.insert(pos, j)
            state[j] = WAITING
            rnd[j] = r
            added = True
        if added and len(order) > cap:
            excess = len(order) - cap
            idx = len(order) - 1
            while excess > 0 and idx >= 0:
                j = order[idx]
                if state[j] == WAITING:
                    del order[idx], dist[idx], state[j], rnd[j]
                    excess -= 1
                idx -= 1

    def rtt():
        if latency == "engine":
            return 0.05 * math.exp(0.5 * lat_rng.gauss(0, 1)) + 0.05 * math.exp(0.5 * lat_rng.gauss(0, 1))
        return 0.1 * math.exp(0.5 * lat_rng.gauss(0, 1))

    def advance(now, send):
        """Lookup._advance: returns the nodes to send to; may end the lookup."""
        nonlocal finished
        free = alpha - in_flight if send else 0
        chosen = []
        counting = True
        succeeded = 0
        broke = False
        for j in order:
            st = state[j]
            if st == SUCCEEDED:
                if counting:
                    succeeded += 1
                    if succeeded >= k:
                        finished = True
                        return []
            elif st == IN_FLIGHT:
                counting = False
            else:
                if len(chosen) >= free:
                    broke = True
                    break
                chosen.append(j)
                counting = False
        if not broke and not chosen and in_flight == 0:
            finished = True
        return chosen

    def poll(now):
        nonlocal in_flight, sent, max_round, seq
        if finished:
            return
        for j in advance(now, True):
            state[j] = IN_FLIGHT
            in_flight += 1
            sent += 1
            max_round = max(max_round, rnd[j])
            if j == tgt and result["rounds_to_target"] is None:
                result["rounds_to_target"] = rnd[j]
                result["requests_to_target"] = sent
            seq += 1
            heapq.heappush(events, (now + rtt(), seq, j))

    add(tables.closest(src, t, k), 1)
    poll(0.0)
    now = 0.0
    while events and not finished:
        now, _, j = heapq.heappop(events)
        in_flight -= 1
        state[j] = SUCCEEDED
        if j == tgt or j in holders:
            contacts = []  # VALUE: the record, no contacts
        else:
            contacts = tables.closest(j, t, k)
        add(contacts, rnd[j] + 1)
        advance(now, False)
        if j == tgt and answers == "find_value":
            finished = True  # the owner's own record: nothing newer exists (lookup.finish())
        poll(now)
    result.update(requests=sent, rounds=max_round, latency_ms=now * 1000,
                  target_contacted=result["rounds_to_target"] is not None)
    return result


def median(xs):
    return statistics.median(xs) if xs else None


def run(n, b, args, net, pairs, answers):
    tables = Tables(net, args.k, b, args.seed * 7919 + n * 10 + b)
    lat_rng = random.Random(args.seed * 104729 + n + b)
    t0 = time.process_time()
    res = [lookup(tables, s, g, args.alpha, answers, args.latency, lat_rng) for s, g in pairs]
    rtt = [r["rounds_to_target"] for r in res if r["target_contacted"]]
    req_t = [r["requests_to_target"] for r in res if r["target_contacted"]]
    # table size: full tables of random nodes, sampled with their own RNG (independent of memo)
    trng = random.Random(args.seed * 31 + n + b)
    sizes = [len(tables.build(i, trng)) for i in trng.sample(range(n), args.table_nodes)]
    return {
        "N": n, "b": b, "k": args.k, "alpha": args.alpha, "answers": answers,
        "latency": args.latency, "lookups": len(pairs), "seed": args.seed,
        "rounds_to_target_counts": dict(sorted(Counter(rtt).items())),
        "median_rounds_to_target": median(rtt),
        "mean_rounds_to_target": round(statistics.fmean(rtt), 3) if rtt else None,
        "target_contacted_rate": len(rtt) / len(res),
        "median_requests_to_target": median(req_t),
        "median_requests_whole_lookup": median([r["requests"] for r in res]),
        "mean_requests_whole_lookup": round(statistics.fmean([r["requests"] for r in res]), 2),
        "median_rounds_whole_lookup": median([r["rounds"] for r in res]),
        "median_latency_ms": round(median([r["latency_ms"] for r in res]), 1),
        "p95_latency_ms": round(sorted(r["latency_ms"] for r in res)[max(0, math.ceil(0.95 * len(res)) - 1)], 1),
        "table_mean": round(statistics.fmean(sizes), 1), "table_median": median(sizes),
        "table_min": min(sizes), "table_max": max(sizes),
        "cpu_s": round(time.process_time() - t0, 1),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="10000,100000,1000000")
    p.add_argument("--bs", default="1,2,3")
    p.add_argument("--answers", default="find_value,find_node",
                   help="comma list of find_value (engine's find_record) and/or find_node")
    p.add_argument("--lookups", type=int, default=500)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--alpha", type=int, default=3)
    p.add_argument("--latency", choices=("engine", "rtt"), default="engine")
    p.add_argument("--table-nodes", type=int, default=300)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", default=None, help="also append JSON lines to this file")
    args = p.parse_args(argv)
    out = open(args.out, "a") if args.out else None
    for n in map(int, args.sizes.split(",")):
        t0 = time.time()
        net = Network(n, args.seed * 1_000_003 + n)
        prng = random.Random(args.seed * 65537 + n)
        pairs = [tuple(prng.sample(range(n), 2)) for _ in range(args.lookups)]
        print(f"# N={n}: ids in {time.time() - t0:.1f}s", file=sys.stderr)
        for b in map(int, args.bs.split(",")):
            for answers in args.answers.split(","):
                row = run(n, b, args, net, pairs, answers)
                line = json.dumps(row)
                print(line, flush=True)
                if out:
                    out.write(line + "\n")
                    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
