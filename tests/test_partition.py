"""The partitioner equals brute force exactly, and the previous exhaustive DP (partition_reference.py)
on larger instances; every plan it returns respects its constraints."""

from __future__ import annotations

import itertools
import math
import random
import sys
from pathlib import Path

import pytest

import partition_reference
from hetserve.plan.partition import HostCosts, Objective, lower_bound, partition, stage_times, total_time

PRECISIONS = ["native", "int8", "int4"]
NAMES = ["native", "int8", "int4", "fp8", "w8a8"]
BYTES = {"native": 1.0, "int8": 0.5, "int4": 0.28, "fp8": 0.5, "w8a8": 0.55}


def random_host(rng: random.Random, name: str) -> HostCosts:
    base_pre, base_dec = rng.uniform(1, 5), rng.uniform(0.2, 1)
    return HostCosts(
        name=name, capacity=rng.uniform(2.5, 8),
        layer_pre={"native": base_pre, "int8": base_pre * rng.uniform(0.7, 1.6), "int4": base_pre * rng.uniform(0.8, 3)},
        layer_dec={"native": base_dec, "int8": base_dec * rng.uniform(0.5, 1.5), "int4": base_dec * rng.uniform(0.3, 1.5)},
        layer_bytes={"native": 1.0, "int8": 0.5, "int4": 0.28}, kv_bytes_per_layer=rng.uniform(0, 0.3),
        fixed_pre=rng.uniform(0, 1), fixed_dec=rng.uniform(0, 0.3), head_pre=rng.uniform(0, 2),
        head_dec=rng.uniform(0, 0.5), embed_bytes=rng.uniform(0, 1), head_bytes=rng.uniform(0, 1),
        send_pre=rng.uniform(0, 1), send_dec=rng.uniform(0, 0.2),
    )


def brute_force(hosts, layers, quality, budget, objective, names=PRECISIONS):
    best = None
    k = len(hosts)
    for cuts in itertools.combinations(range(1, layers), k - 1):
        bounds = (0, *cuts, layers)
        for precs in itertools.product(names, repeat=layers):
            q = sum(quality[i][p] for i, p in enumerate(precs))
            if q > budget:
                continue
            stages, fits = [], True
            for s, host in enumerate(hosts):
                counts = {}
                for p in precs[bounds[s]:bounds[s + 1]]:
                    counts[p] = counts.get(p, 0) + 1
                pre, dec, mem = stage_times(host, counts, s == 0, s == k - 1)
                fits &= mem <= host.capacity
                stages.append((pre, dec))
            if fits and not any(math.isinf(p + d) for p, d in stages):
                t = total_time(stages, objective)
                if best is None or t < best - 1e-12:
                    best = t
    return best


@pytest.mark.parametrize("seed", range(40))
def test_dp_equals_brute_force(seed):
    rng = random.Random(seed)
    layers, k = rng.randint(2, 5), rng.randint(1, 3)
    k = min(k, layers)
    hosts = [random_host(rng, f"h{i}") for i in range(k)]
    quality = [{"native": 0, "int8": rng.randint(0, 2), "int4": rng.randint(1, 5)} for _ in range(layers)]
    budget = rng.randint(0, 8)
    objective = Objective(output_tokens=rng.randint(1, 64), prefill_microbatches=rng.randint(1, 4),
                          decode_microbatches=rng.randint(1, 3))
    assert_equals_brute_force(hosts, layers, PRECISIONS, quality, budget, objective)


def assert_equals_brute_force(hosts, layers, names, quality, budget, objective):
    """partition() finds brute force's optimum (or, like it, none), and its plan checks out."""
    want = brute_force(hosts, layers, quality, budget, objective, names)
    got = partition(hosts, layers, names, quality, budget, objective)
    if want is None:
        assert got is None
        return None
    assert got is not None and got.time_ms == pytest.approx(want, rel=1e-9, abs=1e-9)
    check_plan(got, hosts, layers, quality, budget, objective)
    return got


def check_plan(got, hosts, layers, quality, budget, objective):
    """The returned plan is what it claims: contiguous, complete, within memory and quality."""
    assert got.stages[0].start == 0 and got.stages[-1].end == layers
    assert all(a.end == b.start and a.end > a.start for a, b in zip(got.stages, got.stages[1:]))
    assert all(s.memory_bytes <= h.capacity for s, h in zip(got.stages, hosts))
    precs = [p for s in got.stages for p in s.precisions]
    assert sum(quality[i][p] for i, p in enumerate(precs)) == got.quality_cost <= budget
    assert total_time([(s.prefill_ms, s.decode_ms) for s in got.stages], objective) == pytest.approx(got.time_ms)
    assert not any(math.isinf(s.prefill_ms + s.decode_ms) for s in got.stages)


def test_infeasible_returns_none():
    rng = random.Random(1)
    host = random_host(rng, "tiny")
    tiny = HostCosts(**{**host.__dict__, "capacity": 0.1})
    assert partition([tiny], 3, PRECISIONS, [{"native": 0, "int8": 0, "int4": 0}] * 3, 0, Objective(8, 1, 1)) is None


def varied_instance(rng: random.Random, layers: int, k: int, names: list[str]):
    """Hosts with up to five precisions, some missing one (inf time and bytes, as planner.host_costs
    gives for a precision a device lacks), memory from tight to loose, budgets from 0 to loose."""
    hosts = []
    for i in range(k):
        h = random_host(rng, f"h{i}")
        pre = {p: h.layer_pre.get(p, rng.uniform(0.5, 5)) for p in names}
        dec = {p: h.layer_dec.get(p, rng.uniform(0.1, 1)) for p in names}
        byt = {p: BYTES[p] for p in names}
        if len(names) > 1 and rng.random() < 0.3:
            lacks = rng.choice(names[1:])
            pre[lacks] = dec[lacks] = byt[lacks] = math.inf
        capacity = rng.uniform(0.3, 1.5) * layers / k + rng.uniform(0, 1)
        hosts.append(HostCosts(**{**h.__dict__, "layer_pre": pre, "layer_dec": dec, "layer_bytes": byt,
                                  "capacity": capacity}))
    quality = [{p: 0 if p == "native" else rng.randint(0, 5) for p in names} for _ in range(layers)]
    budget = rng.choice([0, rng.randint(0, layers), rng.randint(0, 3 * layers)])
    objective = Objective(rng.randint(1, 64), rng.randint(1, 4), rng.randint(1, 4))
    return hosts, quality, budget, objective


@pytest.mark.parametrize("seed", range(60))
def test_equals_brute_force_with_more_precisions_and_hosts(seed):
    rng = random.Random(1000 + seed)
    names = NAMES[:rng.randint(1, 5)]
    layers = rng.randint(2, 6 if len(names) <= 3 else 5)
    k = min(layers, rng.randint(1, 4))
    hosts, quality, budget, objective = varied_instance(rng, layers, k, names)
    got = assert_equals_brute_force(hosts, layers, names, quality, budget, objective)
    if got is not None:
        assert lower_bound(hosts, layers, names, quality, budget, objective) <= got.time_ms * (1 + 1e-12)


@pytest.mark.parametrize("seed", range(30))
def test_equals_the_previous_exhaustive_dp(seed):
    rng = random.Random(2000 + seed)
    names = NAMES[:rng.randint(2, 5)]
    layers = rng.randint(6, 12)
    k = min(layers, rng.randint(2, 4))
    hosts, quality, budget, objective = varied_instance(rng, layers, k, names)
    want = partition_reference.partition(hosts, layers, names, quality, budget, objective)
    got = partition(hosts, layers, names, quality, budget, objective)
    if want is None:
        assert got is None
        return
    assert got is not None and got.time_ms == pytest.approx(want.time_ms, rel=1e-9)
    check_plan(got, hosts, layers, quality, budget, objective)


def test_upper_bound_prunes_only_what_is_not_better():
    rng = random.Random(7)
    hosts, quality, budget, objective = varied_instance(rng, 10, 3, NAMES)
    best = partition(hosts, 10, NAMES, quality, budget, objective)
    assert best is not None
    above = partition(hosts, 10, NAMES, quality, budget, objective, upper_bound=best.time_ms * 1.001)
    assert above is not None and above.time_ms == pytest.approx(best.time_ms, rel=1e-12)
    assert partition(hosts, 10, NAMES, quality, budget, objective, upper_bound=best.time_ms * 0.999) is None
    assert partition(hosts, 10, NAMES, quality, budget, objective, upper_bound=best.time_ms) is None


def test_a_precision_a_host_lacks_is_never_planned_there():
    rng = random.Random(3)
    hosts, quality, _, objective = varied_instance(rng, 12, 3, NAMES)
    fast = {p: 0.01 for p in NAMES}
    # int4 is free and fast everywhere, but h1 cannot run it.
    hosts = [HostCosts(**{**h.__dict__, "layer_pre": fast, "layer_dec": fast, "capacity": 100.0}) for h in hosts]
    hosts[1] = HostCosts(**{**hosts[1].__dict__, "layer_pre": {**fast, "int4": math.inf}})
    quality = [{**q, "int4": 0} for q in quality]
    got = partition(hosts, 12, NAMES, quality, 0, objective)
    assert got is not None and "int4" not in got.stages[1].precisions


def benchmark_instance(layers: int, hosts: int, precisions: int):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from solve_time import instance

    return instance(layers, hosts, precisions)


@pytest.mark.parametrize("layers, hosts, precisions", [(30, 2, 3), (24, 3, 3), (16, 3, 4)])
def test_benchmark_instances_equal_the_previous_dp(layers, hosts, precisions):
    """Instances of benchmarks/solve_time.py small enough for the previous DP (about a second each)."""
    costs, names, quality = benchmark_instance(layers, hosts, precisions)
    objective = Objective(128, 4, hosts)
    want = partition_reference.partition(costs, layers, names, quality, 100, objective)
    got = partition(costs, layers, names, quality, 100, objective)
    assert got is not None and got.time_ms == pytest.approx(want.time_ms, rel=1e-9)
    check_plan(got, costs, layers, quality, 100, objective)


# T of the 20 layers x 3 hosts x 4 precisions instance of benchmarks/solve_time.py by the previous
# DP (partition_reference.partition), which took 8.7 s to compute (30 x 4 x 4 did not finish in 21
# minutes); the new search takes about 0.02 s.
REFERENCE_20X3X4 = 1964.5715148492463


def test_mid_size_instance_equals_the_previous_dp():
    costs, names, quality = benchmark_instance(20, 3, 4)
    got = partition(costs, 20, names, quality, 100, Objective(128, 4, 3))
    assert got is not None and got.time_ms == pytest.approx(REFERENCE_20X3X4, rel=1e-9)
    check_plan(got, costs, 20, quality, 100, Objective(128, 4, 3))
