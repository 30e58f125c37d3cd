"""The partitioner: an exact dynamic program over contiguous layer ranges and per-layer precision.

For one pipeline order of hosts and fixed micro-batch sizes, it minimizes the time to serve one
batch of the workload (LLM-PQ's pipeline model, both phases):

    T = sum_s P_s + (m_p - 1) * max_s P_s  +  N * (sum_s D_s + (m_d - 1) * max_s D_s)

P_s / D_s: stage s's time for one prefill / decode micro-batch (its layers at their precisions,
its fixed per-step cost, the head on the last stage, and sending its activations over its link);
m_p / m_d: prefill / decode micro-batches per batch; N: output tokens. Constraints: each stage's
memory (weights at the chosen precisions + KV cache + embedding/head + reserve) and the quality
budget, a hard constraint on the sum of per-layer quality costs (integers: sensitivities rounded
up to a grid, so a plan within the integer budget is within the real one).

The sums are additive over stages but the maxima are not, so the DP keeps, per (host, layer)
state, the Pareto frontier of (quality used, weighted sum, max P, max D) over partial plans; a
dominated partial plan can never lead to a better complete plan, so the result is exactly optimal
(tests compare it with brute force). A stage's options are its count vectors (how many layers at
each precision), each with its least-quality assignment of precisions to layers. Pure functions.
"""

from __future__ import annotations

from dataclasses import dataclass


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


def _pareto(entries: list[tuple], dims: int) -> list[tuple]:
    """Entries not dominated (no worse in all of the first `dims` measures) by another."""
    entries = sorted(entries, key=lambda e: e[:dims])
    kept: list[tuple] = []
    for e in entries:
        if not any(all(k[d] <= e[d] for d in range(dims)) for k in kept):
            kept.append(e)
    return kept


def stage_options(host: HostCosts, quality: list[dict[str, int]], precisions: list[str], start: int,
                  first: bool, last: bool, budget: int):
    """For each end > start: the Pareto set of (quality, P, D, memory, precisions) of stage [start, end).

    Layers of one stage run on one host, so P, D and memory depend only on how many layers take
    each precision (the count vector); which layers take which is then chosen for least quality
    cost. Count vectors are grown one layer at a time: best[c] = (least quality, assignment).
    """
    best: dict[tuple[int, ...], tuple[int, tuple[str, ...]]] = {tuple(0 for _ in precisions): (0, ())}
    for end in range(start + 1, len(quality) + 1):
        layer = quality[end - 1]
        grown: dict[tuple[int, ...], tuple[int, tuple[str, ...]]] = {}
        for counts, (q, assignment) in best.items():
            for i, p in enumerate(precisions):
                nq = q + layer[p]
                if nq > budget:
                    continue
                key = counts[:i] + (counts[i] + 1,) + counts[i + 1:]
                if key not in grown or nq < grown[key][0]:
                    grown[key] = (nq, assignment + (p,))
        best = grown
        options = []
        for counts, (q, assignment) in best.items():
            pre, dec, mem = stage_times(host, {p: n for p, n in zip(precisions, counts) if n}, first, last)
            if mem <= host.capacity:
                options.append((q, pre, dec, mem, assignment))
        yield end, _pareto(options, 3)


def partition(hosts: list[HostCosts], num_layers: int, precisions: list[str], quality: list[dict[str, int]],
              budget: int, objective: Objective) -> Partition | None:
    """Exact optimum for hosts in this order, every host getting at least one layer.

    quality[l][p]: integer quality cost of layer l at precision p (0 for the native one).
    Returns None when no plan satisfies memory and quality.
    """
    k_hosts = len(hosts)
    if k_hosts == 0 or k_hosts > num_layers:
        return None
    n = objective.output_tokens
    # frontier[(k, i)]: partial plans of hosts < k covering layers [0, i), as Pareto-optimal
    # (quality, W = sum of P + N*D, max P, max D, trace); a dominated one can never finish better.
    frontier: dict[tuple[int, int], list[tuple]] = {(0, 0): [(0, 0.0, 0.0, 0.0, None)]}
    for k, host in enumerate(hosts):
        first, last = k == 0, k == k_hosts - 1
        for i in range(num_layers):
            entries = frontier.pop((k, i), None)
            if not entries:
                continue
            spare = budget - min(e[0] for e in entries)
            for end, options in stage_options(host, quality, precisions, i, first, last, spare):
                if (last and end != num_layers) or (not last and num_layers - end < k_hosts - k - 1):
                    continue
                bucket = frontier.setdefault((k + 1, end), [])
                for q, w, max_p, max_d, trace in entries:
                    for sq, pre, dec, _, assignment in options:
                        if q + sq <= budget:
                            bucket.append((q + sq, w + pre + n * dec, max(max_p, pre), max(max_d, dec),
                                           (trace, assignment)))
                frontier[(k + 1, end)] = _pareto(bucket, 4)
    best = None
    for q, w, max_p, max_d, trace in frontier.get((k_hosts, num_layers), []):
        t = w + (objective.prefill_microbatches - 1) * max_p + n * (objective.decode_microbatches - 1) * max_d
        if best is None or t < best[0]:
            best = (t, q, trace)
    if best is None:
        return None
    return Partition(_stages(hosts, _unwind(best[2])), best[0], best[1])


def _unwind(trace) -> list[tuple[str, ...]]:
    """The trace linked list -> precisions per stage."""
    stages = []
    while trace is not None:
        trace, assignment = trace
        stages.append(assignment)
    return stages[::-1]


def _stages(hosts: list[HostCosts], per_stage: list[list[str]]) -> tuple[StagePlan, ...]:
    out, start = [], 0
    for i, (host, precs) in enumerate(zip(hosts, per_stage)):
        counts: dict[str, int] = {}
        for p in precs:
            counts[p] = counts.get(p, 0) + 1
        pre, dec, mem = stage_times(host, counts, i == 0, i == len(hosts) - 1)
        out.append(StagePlan(host.name, start, start + len(precs), tuple(precs), pre, dec, mem))
        start += len(precs)
    return tuple(out)
