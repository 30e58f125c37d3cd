"""From hosts' profiles, a quality target and a workload to a Plan: which host runs which layers at
which precision, with which prefill and decode micro-batch sizes; plus the baselines.

Around the exact partitioner (partition.py) this tries every distinct pipeline order of every
non-empty subset of the hosts, so a host that does not pay is left out (hosts with the same
profile and memory are interchangeable, so their orders are tried once), and every prefill
micro-batch size that divides the batch. The decode micro-batch is ceil(batch / stages): the
scheduler keeps one decode micro-batch per stage in flight.

Search over (order, size) pairs (search_orders): each pair gets a quick lower bound
(partition.lower_bound); pairs are solved best bound first, each with the best T so far as an
upper bound (partition returns None when it cannot beat it), and the search stops once the next
bound reaches that T. The result is the exact optimum over the pairs, usually after solving a
few of them.

Exact for small device counts, a stated heuristic with a bound for large: past
MAX_EXACT_ORDERS distinct orders (or --max-orders), only the k hosts of most memory for each k,
largest first and the reverse, are tried (each solved exactly). The plan then states its
optimality gap: its T over an order-free lower bound (order_bound.py, a relaxation that forgets order and contiguity), in
Plan.optimality_gap and in its notes. With every order searched the gap is 0.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..model.precision import PRECISIONS
from .cost import CostModel
from .device_profile import DeviceProfile
from .order_bound import Relaxation, order_free_bound
from .partition import HostCosts, Objective, lower_bound, partition, stage_times, total_time
from .quality import Sensitivity
from .split import contiguous_split

QUALITY_BINS = 200  # the quality budget is split into this many integer units (costs round up)
MAX_EXACT_ORDERS = 120  # distinct host orders tried exhaustively; beyond, the heuristic
RESERVE = 0.10  # share of each host's memory kept back for activations and the runtime
INF = float("inf")
GiB = 1 << 30


class PlanningError(Exception):
    """No plan meets the constraints; the message says why and what would."""


@dataclass(frozen=True)
class HostInput:
    name: str
    memory_bytes: int
    profile: DeviceProfile
    link_gbps: float = 10.0  # bandwidth of the link to the next stage
    link_ms: float = 0.2  # latency of that link


@dataclass(frozen=True)
class Workload:
    prompt_tokens: int = 256
    output_tokens: int = 128
    batch: int = 8  # requests served together
    kv_tokens: int = 0  # KV-cache tokens per layer the hosts allocate; 0 = batch x (prompt + output + 1)

    @property
    def kv_tokens_per_layer(self) -> int:
        return self.kv_tokens or self.batch * (self.prompt_tokens + self.output_tokens + 1)


@dataclass(frozen=True)
class PlannedStage:
    host: str
    start: int
    end: int
    precisions: list[str]
    prefill_ms: float
    decode_ms: float
    memory_bytes: int
    capacity_bytes: int


@dataclass(frozen=True)
class Plan:
    model: str
    dtype: str
    workload: Workload
    max_ppl_increase: float  # the target, as a fraction (0.02 = 2 %)
    base_ppl: float
    predicted_ppl: float
    stages: list[PlannedStage]
    prefill_microbatch: int
    decode_microbatch: int
    predicted_tokens_per_s: float
    baselines: dict[str, float] = field(default_factory=dict)  # name -> predicted tokens/s
    solve_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)  # what is predicted rather than measured, and from what
    # At most this far (T_plan / T_best - 1) from the best plan over every host order: 0 when all
    # were searched, else from an order-free lower bound (order_bound.py).
    optimality_gap: float = 0.0

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> "Plan":
        data = json.loads(Path(path).read_text())
        data["workload"] = Workload(**data["workload"])
        data["stages"] = [PlannedStage(**s) for s in data["stages"]]
        return cls(**data)


def host_costs(host: HostInput, precisions: list[str], workload: Workload, prefill_mb: int, decode_mb: int) -> HostCosts:
    cost = CostModel(host.profile)
    prof = host.profile
    prompt, context = workload.prompt_tokens, workload.prompt_tokens + workload.output_tokens / 2
    itemsize = 4 if prof.dtype == "float32" else 2
    link = host.link_gbps * 1e9 / 8 / 1000  # bytes per ms

    def per_precision(phase: str, batch: int, tokens: float) -> dict[str, float]:
        return {p: cost.layer_ms(p, phase, batch, tokens) if p in prof.layer_bytes else INF for p in precisions}

    return HostCosts(
        name=host.name, capacity=host.memory_bytes * (1 - RESERVE),
        layer_pre=per_precision("prefill", prefill_mb, prompt), layer_dec=per_precision("decode", decode_mb, context),
        layer_bytes={p: prof.layer_bytes.get(p, INF) for p in precisions},
        kv_bytes_per_layer=workload.kv_tokens_per_layer * prof.kv_bytes_per_token,
        fixed_pre=cost.fixed_ms("prefill", prefill_mb, prompt), fixed_dec=cost.fixed_ms("decode", decode_mb, context),
        head_pre=cost.head_ms("prefill", prefill_mb), head_dec=cost.head_ms("decode", decode_mb),
        embed_bytes=prof.embed_bytes, head_bytes=prof.head_bytes,
        send_pre=prefill_mb * prompt * prof.hidden_size * itemsize / link + host.link_ms,
        send_dec=decode_mb * prof.hidden_size * itemsize / link + host.link_ms,
    )


def quality_units(sens: Sensitivity, precisions: list[str], max_increase: float) -> tuple[list[dict[str, int]], int]:
    """Per-layer integer quality costs and the integer budget for a relative ppl increase."""
    budget_loss = math.log1p(max_increase)
    unit = budget_loss / QUALITY_BINS if budget_loss > 0 else 1.0
    layers = len(next(iter(sens.delta.values())))
    costs = []
    for i in range(layers):
        # Negative measured deltas are noise: planning never counts on a free improvement.
        costs.append({p: 0 if p == "native" else math.ceil(max(0.0, sens.delta[p][i]) / unit - 1e-9)
                      if p in sens.delta else QUALITY_BINS + 1 for p in precisions})
    return costs, QUALITY_BINS if budget_loss > 0 else 0


def host_orders(hosts: list[HostInput], max_orders: int | None = None) -> list[list[HostInput]]:
    """Pipeline orders to try: every distinct order of every non-empty subset of the hosts (a host
    is used only where it pays), when there are at most max_orders (MAX_EXACT_ORDERS) of them;
    otherwise the heuristic, the k hosts of most memory for every k, largest first and the reverse."""
    return order_search(hosts, max_orders)[0]


def largest_first_orders(hosts: list[HostInput]) -> list[list[HostInput]]:
    """The k hosts of most memory for every k, each way round: a plan on fewer hosts than there are
    (more hosts than layers, hosts too small to pay) stays in reach."""
    by_memory = sorted(hosts, key=lambda h: -h.memory_bytes)
    return [o for k in range(len(hosts), 0, -1) for o in (by_memory[:k], by_memory[:k][::-1])]


def order_search(hosts: list[HostInput], max_orders: int | None = None) -> tuple[list[list[HostInput]], bool]:
    """(host_orders, whether they are every distinct order of every subset)."""
    max_orders = MAX_EXACT_ORDERS if max_orders is None else max_orders
    # Hosts alike in all the planner reads are interchangeable: one order of them stands for all.
    # The profile by content, not by device name (every 2-thread x86 CPU is named alike).
    profiles: dict[int, str] = {}
    for h in hosts:
        profiles.setdefault(id(h.profile), json.dumps(asdict(h.profile), sort_keys=True))

    def signature(h: HostInput):
        return (profiles[id(h.profile)], h.memory_bytes, h.link_gbps, h.link_ms)

    # Every distinct order of every subset is a non-empty sequence of classes of alike hosts, each
    # class used at most as often as it has hosts: made directly, so 8 alike hosts are 8 orders
    # (examining all 8! permutations of them gave up into the heuristic).
    classes: dict = {}
    for h in hosts:
        classes.setdefault(signature(h), []).append(h)
    groups = list(classes.values())
    orders: list[list[HostInput]] = []
    used = [0] * len(groups)

    def extend(prefix: list[HostInput]) -> bool:
        for g, group in enumerate(groups):
            if used[g] == len(group):
                continue
            order = prefix + [group[used[g]]]
            orders.append(order)
            if len(orders) > max_orders:
                return False
            used[g] += 1
            whole = extend(order)
            used[g] -= 1
            if not whole:
                return False
        return True

    if not extend([]):
        return largest_first_orders(hosts), False
    # Larger subsets first, as before; within a size the order differs from the permutations', so
    # two equally fast plans may resolve the other way (the LLM-PQ plans in plans/ did not move).
    return sorted(orders, key=len, reverse=True), True


def decode_microbatch(batch: int, stages: int) -> int:
    return math.ceil(batch / stages)


def default_precisions(hosts: list[HostInput]) -> list[str]:
    """Every precision some host runs, in a fixed order."""
    return sorted({p for h in hosts for p in h.profile.layer_bytes}, key=PRECISIONS.index)


def prefill_sizes(workload: Workload) -> list[int]:
    return [b for b in range(1, workload.batch + 1) if workload.batch % b == 0]


def objective_for(workload: Workload, p_mb: int, stages: int) -> Objective:
    d_mb = decode_microbatch(workload.batch, stages)
    return Objective(workload.output_tokens, workload.batch // p_mb, math.ceil(workload.batch / d_mb))


def search_orders(orders: list[list[HostInput]], precisions: list[str], quality: list[dict[str, int]], budget: int,
                  workload: Workload):
    """The best partition over these host orders and every prefill micro-batch size:
    ((T, partition, order, prefill mb, decode mb) or None, pairs solved, pairs in all).

    Every (order, size) pair gets a quick lower bound first; pairs are solved in ascending order
    of it, each with the best T so far as its upper bound, and the rest are skipped once the
    bound reaches that T: good candidates first, and pairs that cannot win never solved."""
    cache: dict[tuple[int, int, int], HostCosts] = {}

    def costs_of(h: HostInput, p_mb: int, d_mb: int) -> HostCosts:
        key = (id(h), p_mb, d_mb)
        if key not in cache:
            cache[key] = host_costs(h, precisions, workload, p_mb, d_mb)
        return cache[key]

    pairs = []
    for order in orders:
        d_mb = decode_microbatch(workload.batch, len(order))
        for p_mb in prefill_sizes(workload):
            pairs.append(([costs_of(h, p_mb, d_mb) for h in order], objective_for(workload, p_mb, len(order)),
                          (order, p_mb, d_mb)))
    best, tried, bounded = solve_pairs(pairs, len(quality), precisions, quality, budget)
    return (None if best is None else (best[0], best[1], *best[2])), tried, bounded


def solve_pairs(pairs: list[tuple[list[HostCosts], Objective, object]], layers: int, precisions: list[str],
                quality: list[dict[str, int]], budget: int):
    """The best partition over (host costs in pipeline order, objective, tag) candidates:
    ((T, partition, tag) or None, candidates solved, candidates with a plan possible), solving
    them in ascending order of partition.lower_bound with the best T so far as upper bound."""
    ranked = []
    for n, (costs, objective, tag) in enumerate(pairs):
        bound = lower_bound(costs, layers, precisions, quality, budget, objective)
        if bound < INF:
            ranked.append((bound, n, costs, objective, tag))
    ranked.sort(key=lambda x: x[:2])
    best, tried = None, 0
    for bound, _, costs, objective, tag in ranked:
        if best is not None and bound >= best[0]:
            break
        tried += 1
        result = partition(costs, layers, precisions, quality, budget, objective,
                           upper_bound=None if best is None else best[0])
        if result is not None and (best is None or result.time_ms < best[0]):
            best = (result.time_ms, result, tag)
    return best, tried, len(ranked)


def order_gap(hosts: list[HostInput], precisions: list[str], quality: list[dict[str, int]], budget: int,
              workload: Workload, time_ms: float) -> float:
    """How far a plan of this T can be from the best over every order and subset of the hosts
    (T / order-free lower bound - 1), over every prefill micro-batch size and stage count."""
    relaxations = [Relaxation([host_costs(h, precisions, workload, p_mb, decode_microbatch(workload.batch, stages))
                               for h in hosts], precisions, quality, budget, objective_for(workload, p_mb, stages),
                              stages)
                   for p_mb in prefill_sizes(workload) for stages in range(1, min(len(hosts), len(quality)) + 1)]
    bound = order_free_bound(relaxations, time_ms)
    return time_ms / bound - 1 if bound > 0 else math.inf


def make_plan(model: str, hosts: list[HostInput], sens: Sensitivity, workload: Workload, max_increase: float,
              precisions: list[str] | None = None, max_orders: int | None = None) -> Plan:
    started = time.perf_counter()
    precisions = precisions or default_precisions(hosts)
    quality, budget = quality_units(sens, precisions, max_increase)
    layers = len(quality)
    short = memory_shortfall(hosts, layers, precisions, workload)
    if short:
        raise PlanningError(short)
    orders, exact = order_search(hosts, max_orders)
    best, tried, candidates = search_orders(orders, precisions, quality, budget, workload)
    if best is None:
        raise PlanningError(_infeasible_reason(hosts, sens, workload, precisions, max_increase))
    if exact:
        gap, notes = 0.0, [f"search: exact over all {len(orders)} distinct host orders of every subset and every "
                           f"prefill micro-batch size ({tried} of {candidates} (order, size) pairs solved, "
                           f"{candidates - tried} ruled out by a lower bound)"]
    else:
        gap = order_gap(hosts, precisions, quality, budget, workload, best[0])
        notes = [f"search: heuristic host orders (the k of {len(hosts)} hosts with most memory for every k, largest "
                 "first and the reverse: "
                 f"more than {MAX_EXACT_ORDERS if max_orders is None else max_orders} distinct orders), each solved "
                 f"exactly; an order-free lower bound puts the plan within {gap:.1%} of the best over every order "
                 "and subset"]
    time_ms, result, order, p_mb, d_mb = best
    chosen = [p for s in result.stages for p in s.precisions]
    plan_stages = [PlannedStage(s.host, s.start, s.end, list(s.precisions), round(s.prefill_ms, 3),
                                round(s.decode_ms, 3), int(s.memory_bytes), int(h.memory_bytes * (1 - RESERVE)))
                   for s, h in zip(result.stages, order)]
    tokens_per_s = workload.batch * workload.output_tokens / (time_ms / 1000)
    return Plan(model=model, dtype=hosts[0].profile.dtype, workload=workload, max_ppl_increase=max_increase,
                base_ppl=round(sens.base_ppl, 4), predicted_ppl=round(sens.predicted_ppl(chosen), 4), stages=plan_stages,
                prefill_microbatch=p_mb, decode_microbatch=d_mb, predicted_tokens_per_s=round(tokens_per_s, 3),
                baselines=baselines(hosts, precisions, quality, budget, workload, p_mb),
                solve_seconds=round(time.perf_counter() - started, 3), notes=notes, optimality_gap=round(gap, 4))


def evaluate(order: list[HostInput], bounds: list[tuple[int, int]], precision: str, precisions: list[str],
             workload: Workload, p_mb: int) -> float | None:
    """Predicted tokens/s of a uniform-precision plan, None when it does not fit."""
    d_mb = decode_microbatch(workload.batch, len(order))
    stages = []
    for i, (h, (start, end)) in enumerate(zip(order, bounds)):
        costs = host_costs(h, precisions, workload, p_mb, d_mb)
        pre, dec, mem = stage_times(costs, {precision: end - start}, i == 0, i == len(order) - 1)
        if mem > costs.capacity or math.isinf(pre + dec):
            return None
        stages.append((pre, dec))
    t = total_time(stages, objective_for(workload, p_mb, len(order)))
    return workload.batch * workload.output_tokens / (t / 1000)


def baselines(hosts: list[HostInput], precisions: list[str], quality: list[dict[str, int]], budget: int,
              workload: Workload, p_mb: int) -> dict[str, float]:
    """Uniform precision with an even split, and a memory-proportional split at one precision:
    for each, the fastest precision that meets the quality budget and fits. With more hosts than
    layers, over the `layers` hosts of most memory (a split gives every host at least one layer)."""
    layers = len(quality)
    if len(hosts) > layers:
        hosts = sorted(hosts, key=lambda h: -h.memory_bytes)[:layers]
    allowed = [p for p in precisions if sum(q[p] for q in quality) <= budget]
    splits = {"uniform precision, even split": contiguous_split(layers, [1.0] * len(hosts)),
              "memory-proportional split": contiguous_split(layers, [h.memory_bytes for h in hosts])}
    out = {}
    for name, bounds in splits.items():
        speeds = {p: evaluate(hosts, bounds, p, precisions, workload, p_mb) for p in allowed}
        feasible = {p: v for p, v in speeds.items() if v is not None}
        if feasible:
            p = max(feasible, key=feasible.get)
            out[f"{name} ({p})"] = round(feasible[p], 3)
        else:
            out[f"{name}"] = 0.0  # does not fit at any precision within the quality target
    return out


def memory_shortfall(hosts: list[HostInput], layers: int, precisions: list[str], workload: Workload) -> str | None:
    """Why the model cannot fit these hosts at any precision, however its layers are split, with the
    nearest feasible option (the largest batch that would fit, or the memory to add); else None."""
    def layer_bytes(p: str) -> float:
        return min(h.profile.layer_bytes.get(p, INF) for h in hosts)

    cheapest = min(precisions, key=layer_bytes)
    capacity = sum(h.memory_bytes * (1 - RESERVE) for h in hosts)
    # The smallest layers, embedding, head and KV entries anywhere: a lower bound on any plan's need.
    weights = layers * layer_bytes(cheapest) + min(h.profile.embed_bytes + h.profile.head_bytes for h in hosts)
    kv_per_token = layers * min(h.profile.kv_bytes_per_token for h in hosts)
    kv = kv_per_token * workload.kv_tokens_per_layer
    if weights + kv <= capacity:
        return None
    message = (f"the model does not fit these hosts at any precision: it needs at least {(weights + kv) / GiB:.1f} GiB "
               f"(weights at {cheapest} {weights / GiB:.1f} GiB + KV cache {kv / GiB:.1f} GiB) but the hosts offer "
               f"{capacity / GiB:.1f} GiB after the {RESERVE:.0%} reserve")
    per_request = kv_per_token * (workload.prompt_tokens + workload.output_tokens + 1)
    fit_batch = int((capacity - weights) // per_request) if capacity > weights and not workload.kv_tokens else 0
    if fit_batch >= 1:
        return message + (f"; nearest option: --batch {fit_batch} at most (the memory bound), or add "
                          f"{(weights + kv - capacity) / GiB:.1f} GiB")
    return message + f"; nearest option: add at least {(weights + kv - capacity) / GiB:.1f} GiB of host memory"


def _infeasible_reason(hosts, sens, workload, precisions, max_increase) -> str:
    """Why no plan exists, and the nearest feasible quality target if one exists."""
    for target in (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0):
        if target <= max_increase:
            continue
        quality, budget = quality_units(sens, precisions, target)
        for order in host_orders(hosts):  # those the search tried: subsets, and small hosts in the middle
            d_mb = decode_microbatch(workload.batch, len(order))
            costs = [host_costs(h, precisions, workload, 1, d_mb) for h in order]
            if partition(costs, len(quality), precisions, quality, budget, Objective(1, 1, 1)) is not None:
                return (f"no plan keeps perplexity within +{max_increase:.1%} on these hosts' memory; "
                        f"the nearest feasible target is +{target:.1%} (--max-ppl-increase {target:.1%})")
    return ("the model does not fit these hosts at any precision: add hosts or memory, or lower the batch "
            f"({workload.batch}) or context ({workload.prompt_tokens + workload.output_tokens})")
