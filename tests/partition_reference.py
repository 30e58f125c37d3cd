"""The previous partitioner, kept as a reference: the exhaustive Pareto-frontier DP that
hetserve/plan/partition.py used before the bounded search (exact, tested against brute force,
but seconds to hours on mid-size instances). tests/test_partition.py and
benchmarks/solve_time.py compare the new one with it.

The sums are additive over stages but the maxima are not, so the DP keeps, per (host, layer)
state, the Pareto frontier of (quality used, weighted sum, max P, max D) over partial plans; a
dominated partial plan can never lead to a better complete plan. A stage's options are its count
vectors (how many layers at each precision), each with its least-quality assignment.
"""

from __future__ import annotations

from hetserve.plan.partition import HostCosts, Objective, Partition, stage_plans, stage_times


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
    return Partition(stage_plans(hosts, _unwind(best[2])), best[0], best[1])


def _unwind(trace) -> list[tuple[str, ...]]:
    """The trace linked list -> precisions per stage."""
    stages = []
    while trace is not None:
        trace, assignment = trace
        stages.append(assignment)
    return stages[::-1]
