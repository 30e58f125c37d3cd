"""The DP partitioner equals brute force exactly; every plan it returns respects its constraints."""

from __future__ import annotations

import itertools
import random

import pytest

from hetserve.plan.partition import HostCosts, Objective, partition, stage_times, total_time

PRECISIONS = ["native", "int8", "int4"]


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


def brute_force(hosts, layers, quality, budget, objective):
    best = None
    k = len(hosts)
    for cuts in itertools.combinations(range(1, layers), k - 1):
        bounds = (0, *cuts, layers)
        for precs in itertools.product(PRECISIONS, repeat=layers):
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
            if fits:
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
    want = brute_force(hosts, layers, quality, budget, objective)
    got = partition(hosts, layers, PRECISIONS, quality, budget, objective)
    if want is None:
        assert got is None
        return
    assert got is not None and got.time_ms == pytest.approx(want, rel=1e-9, abs=1e-9)
    # The returned plan is what it claims: contiguous, complete, within memory and quality.
    assert got.stages[0].start == 0 and got.stages[-1].end == layers
    assert all(a.end == b.start and a.end > a.start for a, b in zip(got.stages, got.stages[1:]))
    assert all(s.memory_bytes <= h.capacity for s, h in zip(got.stages, hosts))
    precs = [p for s in got.stages for p in s.precisions]
    assert sum(quality[i][p] for i, p in enumerate(precs)) == got.quality_cost <= budget
    assert total_time([(s.prefill_ms, s.decode_ms) for s in got.stages], objective) == pytest.approx(got.time_ms)


def test_infeasible_returns_none():
    rng = random.Random(1)
    host = random_host(rng, "tiny")
    tiny = HostCosts(**{**host.__dict__, "capacity": 0.1})
    assert partition([tiny], 3, PRECISIONS, [{"native": 0, "int8": 0, "int4": 0}] * 3, 0, Objective(8, 1, 1)) is None
