"""Solve time of the exact DP partitioner (one host order, one micro-batch size) by problem size.

    .venv/bin/python benchmarks/solve_time.py [--limit 60]

Random host costs (the same generator as the brute-force tests), quality budget of 100 units.
An instance that runs past --limit seconds is reported as such.
"""

from __future__ import annotations

import argparse
import random
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_partition import random_host  # noqa: E402

from hetserve.plan.partition import HostCosts, Objective, partition  # noqa: E402

SIZES = [(30, 2, 3), (30, 3, 3), (30, 4, 3), (48, 4, 3), (30, 2, 4), (80, 8, 5)]
BYTES = {"native": 1.0, "int8": 0.5, "fp8": 0.5, "int4": 0.28, "w8a8": 0.5}


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--limit", type=int, default=60)
    args = parser.parse_args()
    signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(Timeout()))
    print(f"{'layers':>6} {'hosts':>5} {'precisions':>10} {'solve s':>9}")
    for layers, hosts, precisions in SIZES:
        costs, names, quality = instance(layers, hosts, precisions)
        signal.alarm(args.limit)
        start = time.perf_counter()
        try:
            partition(costs, layers, names, quality, 100, Objective(128, 4, hosts))
            took = f"{time.perf_counter() - start:9.2f}"
        except Timeout:
            took = f"> {args.limit}"
        finally:
            signal.alarm(0)
        print(f"{layers:>6} {hosts:>5} {precisions:>10} {took:>9}")


if __name__ == "__main__":
    main()
