"""The partitioner: exact layer ranges and per-layer precisions for one pipeline order of hosts.

For one pipeline order of hosts and fixed micro-batch sizes, it minimizes the time to serve one
batch of the workload (LLM-PQ's pipeline model, both phases):

    T = sum_s P_s + (m_p - 1) * max_s P_s  +  N * (sum_s D_s + (m_d - 1) * max_s D_s)

P_s / D_s: stage s's time for one prefill / decode micro-batch (its layers at their precisions,
its fixed per-step cost, the head on the last stage, and sending its activations over its link);
m_p / m_d: prefill / decode micro-batches per batch; N: output tokens. Constraints: each stage's
memory (weights at the chosen precisions + KV cache + embedding/head + reserve) and the quality
budget, a hard constraint on the sum of per-layer quality costs (integers: sensitivities rounded
up to a grid, so a plan within the integer budget is within the real one).

The result is exactly optimal (tests compare it with brute force and with the earlier exhaustive
Pareto DP). How it gets there fast, each step exact:
1. positions.py drops precisions a host cannot run or that another beats on every count.
2. bounds.py and dual.py give lower bounds on what finishing a partial plan costs: a layer-by-layer
   DP ignoring memory and the maxima, and its Lagrangian version that prices the maxima with
   per-stage weights tuned by supergradient ascent (this one sees pipeline balance).
3. search.py is a DP over (stage, first layer) whose partial plans are pruned by dominance and by
   those bounds against an upper bound.
4. The upper bound: a narrow search (BEAM entries per state) below guesses rising from the lower
   bound finds a first plan; the exact search then only looks for something better. A caller
   with a plan in hand (another host order) passes its T as upper_bound.
Pure functions.
"""

from __future__ import annotations

import gc
import math
from contextlib import contextmanager
from dataclasses import dataclass

from .bounds import RestTable, maxima_tables
from .dual import tune
from .positions import positions
from .search import Search, unwind

FIRST_STEP = 0.01  # the first guess for a plan is this fraction above the lower bound
BEAM = 8  # entries per state of the narrow search for a first plan


@dataclass(frozen=True)
class HostCosts:
    """One host's numbers for a fixed workload and micro-batch sizes (ms and bytes)."""

    name: str
    capacity: float  # bytes available to the stage (memory minus reserve)
    layer_pre: dict[str, float]  # precision -> ms per layer, one prefill micro-batch
    layer_dec: dict[str, float]  # precision -> ms per layer, one decode micro-batch
    layer_bytes: dict[str, float]  # precision -> weight bytes per layer
    kv_bytes_per_layer: float  # KV cache of the whole batch for one layer
    fixed_pre: float = 0.0  # per-step cost of a stage (mask, rotary, dispatch)
    fixed_dec: float = 0.0
    head_pre: float = 0.0  # norm + lm_head when last
    head_dec: float = 0.0
    embed_bytes: float = 0.0  # when first
    head_bytes: float = 0.0  # when last
    send_pre: float = 0.0  # activations of a prefill micro-batch over its link to the next stage
    send_dec: float = 0.0


@dataclass(frozen=True)
class Objective:
    output_tokens: int  # N
    prefill_microbatches: int  # m_p
    decode_microbatches: int  # m_d


@dataclass(frozen=True)
class StagePlan:
    host: str
    start: int
    end: int
    precisions: tuple[str, ...]
    prefill_ms: float
    decode_ms: float
    memory_bytes: float


@dataclass(frozen=True)
class Partition:
    stages: tuple[StagePlan, ...]
    time_ms: float  # T above, for one batch
    quality_cost: int


def stage_times(host: HostCosts, counts: dict[str, int], first: bool, last: bool) -> tuple[float, float, float]:
    """(P, D, memory) of a stage with `counts[p]` layers at precision p."""
    layers = sum(counts.values())
    pre = host.fixed_pre + sum(n * host.layer_pre[p] for p, n in counts.items())
    dec = host.fixed_dec + sum(n * host.layer_dec[p] for p, n in counts.items())
    mem = sum(n * host.layer_bytes[p] for p, n in counts.items()) + layers * host.kv_bytes_per_layer
    if first:
        mem += host.embed_bytes
    if last:
        pre, dec, mem = pre + host.head_pre, dec + host.head_dec, mem + host.head_bytes
    else:
        pre, dec = pre + host.send_pre, dec + host.send_dec
    return pre, dec, mem


def total_time(stages: list[tuple[float, float]], objective: Objective) -> float:
    pre = [p for p, _ in stages]
    dec = [d for _, d in stages]
    return (sum(pre) + (objective.prefill_microbatches - 1) * max(pre)
            + objective.output_tokens * (sum(dec) + (objective.decode_microbatches - 1) * max(dec)))


def lower_bound(hosts: list[HostCosts], num_layers: int, precisions: list[str], quality: list[dict[str, int]],
                budget: int, objective: Objective) -> float:
    """A quick lower bound on partition()'s T (inf when no plan exists): the least weighted sum of
    stage times, ignoring memory and balance, plus the maxima at their floors. Milliseconds to
    compute; the planner orders and skips host orders by it."""
    tables = _tables(hosts, num_layers, precisions, quality, budget, objective)
    if tables is None:
        return math.inf
    _, plain, max_p, max_d = tables
    a, b = _weights(objective)
    return float(plain.rest[0, 0, budget]) + a * max_p[0][0] + b * max_d[0][0]


def _weights(objective: Objective) -> tuple[int, int]:
    """(a, b): T = W + a * max P + b * max D."""
    return (objective.prefill_microbatches - 1,
            objective.output_tokens * (objective.decode_microbatches - 1))


def _tables(hosts, num_layers, precisions, quality, budget, objective):
    """(positions, plain RestTable, minimax of P, minimax of D), or None when no plan exists."""
    if not hosts or len(hosts) > num_layers:
        return None
    pos = positions(hosts, precisions, quality, objective)
    if not all(p.precisions for p in pos):
        return None
    plain = RestTable(pos, precisions, quality, budget)
    max_p, max_d = maxima_tables(pos, num_layers)
    if math.isinf(plain.rest[0, 0, budget]) or math.isinf(max_p[0][0]) or math.isinf(max_d[0][0]):
        return None
    return pos, plain, max_p, max_d


def partition(hosts: list[HostCosts], num_layers: int, precisions: list[str], quality: list[dict[str, int]],
              budget: int, objective: Objective, upper_bound: float | None = None) -> Partition | None:
    """Exact optimum for hosts in this order, every host getting at least one layer.

    quality[l][p]: integer quality cost of layer l at precision p (0 for the native one).
    Returns None when no plan satisfies memory and quality, or when none is faster than
    `upper_bound` (a plan already in hand, e.g. for another host order).
    """
    with _no_cyclic_gc():
        return _solve(hosts, num_layers, precisions, quality, budget, objective, upper_bound)


@contextmanager
def _no_cyclic_gc():
    """The search allocates millions of short-lived tuples and makes no reference cycles (freed
    by reference counting alone); the cyclic collector's passes over them cost about a third of
    the time, so it is paused while solving."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _solve(hosts, num_layers, precisions, quality, budget, objective, upper_bound):
    """partition() itself: tables, bounds, a first plan from the narrow search, the exact search."""
    tables = _tables(hosts, num_layers, precisions, quality, budget, objective)
    if tables is None:
        return None
    pos, plain, max_p, max_d = tables
    a, b = _weights(objective)
    ub = math.inf if upper_bound is None else upper_bound

    def layer_plan(path: list[tuple[int, int]]) -> list[tuple[str, ...]]:
        per_stage: list[list[str]] = [[] for _ in hosts]
        for k, t in path:
            per_stage[k].append(precisions[t])
        return [tuple(s) for s in per_stage]

    def evaluate(path: list[tuple[int, int]]) -> float:
        stages = stage_plans(hosts, layer_plan(path))
        if any(s.memory_bytes > h.capacity for s, h in zip(stages, hosts)):
            return math.inf
        return total_time([(s.prefill_ms, s.decode_ms) for s in stages], objective)

    dual, found, path = tune(pos, precisions, quality, budget, a, b, evaluate, ub)
    search = Search(pos, quality, budget, a, b, plain, dual, max_p, max_d)
    ub = min(ub, found)
    lower = max(dual.rest[0, 0, budget], plain.rest[0, 0, budget] + a * max_p[0][0] + b * max_d[0][0])
    step = FIRST_STEP
    while step < 1 and lower * (1 + step) < ub:
        first = search.run(lower * (1 + step), beam=BEAM)
        if first is not None:
            ub = min(ub, first[0] * (1 + 1e-9))  # the exact search finds this one again, or better
            break
        step *= 2
    best = search.run(ub)
    if best is not None:
        stages = stage_plans(hosts, unwind(best[2], pos))
    elif path is not None:
        stages = stage_plans(hosts, layer_plan(path))
    else:
        return None
    q = sum(quality[i][p] for i, p in enumerate(p for s in stages for p in s.precisions))
    return Partition(stages, total_time([(s.prefill_ms, s.decode_ms) for s in stages], objective), q)


def stage_plans(hosts: list[HostCosts], per_stage: list[list[str]]) -> tuple[StagePlan, ...]:
    """Precisions per stage, in pipeline order -> StagePlans with their ranges, times and memory."""
    out, start = [], 0
    for i, (host, precs) in enumerate(zip(hosts, per_stage)):
        counts: dict[str, int] = {}
        for p in precs:
            counts[p] = counts.get(p, 0) + 1
        pre, dec, mem = stage_times(host, counts, i == 0, i == len(hosts) - 1)
        out.append(StagePlan(host.name, start, start + len(precs), tuple(precs), pre, dec, mem))
        start += len(precs)
    return tuple(out)
