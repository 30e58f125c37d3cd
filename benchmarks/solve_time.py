"""Solve time of the partitioner by problem size, with the previous exhaustive Pareto DP
(tests/partition_reference.py) side by side in the same run, and of a make_plan-style search over
host orders.

    .venv/bin/python benchmarks/solve_time.py [--limit 60] [--seeds 6]

Random host costs (the same generator as the brute-force tests), quality budget of 100 units,
N = 128 output tokens, m_p = 4, m_d = hosts. An instance that runs past --limit seconds is
reported as such.

1. One host order and micro-batch size (partition()): new and previous algorithm, and whether
   their T agree.
2. The 80 x 8 x 5 size over --seeds random instances: how much the time varies.
3. Every order of every subset of 4 hosts (64 orders, as planner.host_orders gives for 4 distinct
   hosts) at one micro-batch size: solving each order on its own, against planner.solve_pairs
   (best lower bound first, the incumbent as upper bound, stop when the bounds reach it).
"""

from __future__ import annotations

import argparse
import itertools
import random
import signal
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import partition_reference  # noqa: E402
from test_partition import random_host  # noqa: E402

from hetserve.plan.partition import HostCosts, Objective, partition  # noqa: E402
from hetserve.plan.planner import solve_pairs  # noqa: E402

SIZES = [(30, 2, 3), (30, 3, 3), (30, 4, 3), (48, 4, 3), (30, 2, 4), (30, 4, 4), (80, 8, 5)]
BYTES = {"native": 1.0, "int8": 0.5, "fp8": 0.5, "int4": 0.28, "w8a8": 0.5}
BUDGET = 100


def instance(layers: int, hosts: int, precisions: int, seed: int = 0):
    rng = random.Random(seed)
    names = ["native", "int8", "int4", "fp8", "w8a8"][:precisions]
    out = []
    for i in range(hosts):
        h = random_host(rng, f"h{i}")
        out.append(HostCosts(**{**h.__dict__, "capacity": 2.0 * layers / hosts,
                                "layer_pre": {p: h.layer_pre.get(p, 1.0) * rng.uniform(0.8, 1.2) for p in names},
                                "layer_dec": {p: h.layer_dec.get(p, 0.5) * rng.uniform(0.8, 1.2) for p in names},
                                "layer_bytes": {p: BYTES[p] for p in names}}))
    quality = [{p: 0 if p == "native" else rng.randint(0, 5) for p in names} for _ in range(layers)]
    return out, names, quality


class Timeout(Exception):
    pass


def timed(fn, limit: int):
    """(seconds, result), or (None, None) past limit."""
    signal.alarm(limit)
    start = time.perf_counter()
    try:
        result = fn()
        return time.perf_counter() - start, result
    except Timeout:
        return None, None
    finally:
        signal.alarm(0)


def one_order(limit: int) -> None:
    print(f"{'layers':>6} {'hosts':>5} {'precisions':>10} {'new s':>8} {'previous s':>10} {'same T':>6}")
    for layers, hosts, precisions in SIZES:
        costs, names, quality = instance(layers, hosts, precisions)
        objective = Objective(128, 4, hosts)
        new_s, new = timed(lambda: partition(costs, layers, names, quality, BUDGET, objective), limit)
        old_s, old = timed(lambda: partition_reference.partition(costs, layers, names, quality, BUDGET, objective),
                           limit)
        same = "-" if old is None or new is None else "yes" if abs(new.time_ms - old.time_ms) <= 1e-9 * old.time_ms \
            else "NO"
        print(f"{layers:>6} {hosts:>5} {precisions:>10} {fmt(new_s, limit):>8} {fmt(old_s, limit):>10} {same:>6}",
              flush=True)


def spread(seeds: int, limit: int) -> None:
    took = []
    for seed in range(seeds):
        costs, names, quality = instance(80, 8, 5, seed)
        took.append(timed(lambda: partition(costs, 80, names, quality, BUDGET, Objective(128, 4, 8)), limit)[0])
    done = [t for t in took if t is not None]
    print(f"80 x 8 x 5 over seeds 0-{seeds - 1}: " + ", ".join(fmt(t, limit) for t in took)
          + (f" s; median {statistics.median(done):.2f} s" if done else ""))


def order_search(limit: int) -> None:
    layers, names_n = 48, 3
    costs, names, quality = instance(layers, 4, names_n)
    orders = [list(p) for k in range(4, 0, -1) for s in itertools.combinations(costs, k) for p in itertools.permutations(s)]
    pairs = [(order, Objective(128, 4, len(order)), None) for order in orders]

    def each():
        return min(r.time_ms for r in (partition(o, layers, names, quality, BUDGET, obj) for o, obj, _ in pairs)
                   if r is not None)

    each_s, each_t = timed(each, limit)
    pairs_s, found = timed(lambda: solve_pairs(pairs, layers, names, quality, BUDGET), limit)
    solved = f"{found[1]} of {found[2]} solved" if found else ""
    same = "-" if each_t is None or found is None else "yes" if abs(found[0][0] - each_t) <= 1e-9 * each_t else "NO"
    print(f"{len(orders)} orders of {layers} layers x up to 4 hosts x {names_n} precisions: every order on its own "
          f"{fmt(each_s, limit)} s; solve_pairs {fmt(pairs_s, limit)} s ({solved}); same T: {same}")


def fmt(seconds: float | None, limit: int) -> str:
    return f"> {limit}" if seconds is None else f"{seconds:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--limit", type=int, default=60, help="seconds per instance and algorithm")
    parser.add_argument("--seeds", type=int, default=6, help="random 80 x 8 x 5 instances for the spread")
    args = parser.parse_args()
    signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(Timeout()))
    one_order(args.limit)
    spread(args.seeds, args.limit)
    order_search(args.limit)


if __name__ == "__main__":
    main()
