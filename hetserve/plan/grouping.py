"""Planning in groups of G consecutive layers, as LLM-PQ's --group does: each group is one unit
of the partitioner (one host, one precision), so the exact DP solves a G-times smaller problem.

A group of G identical layers costs exactly G layers' time, memory and KV cache, and its quality
cost is the sum of its layers' (rounded up once: still within the target). What is lost is only
the freedom to cut or change precision inside a group. The baselines are computed on the layers
themselves, so speed-ups are not flattered by the coarser grid.
"""

from __future__ import annotations

from dataclasses import replace

from .device_profile import DeviceProfile
from .planner import HostInput, Plan, PlannedStage, Workload, baselines, default_precisions, make_plan, quality_units
from .quality import Sensitivity


def grouped_profile(profile: DeviceProfile, group: int) -> DeviceProfile:
    return replace(profile,
                   layer_bytes={p: b * group for p, b in profile.layer_bytes.items()},
                   layer_ms={phase: {p: [[ms * group for ms in row] for row in table] for p, table in by_p.items()}
                             for phase, by_p in profile.layer_ms.items()},
                   kv_bytes_per_token=profile.kv_bytes_per_token * group)


def grouped_sensitivity(sens: Sensitivity, group: int) -> Sensitivity:
    """A group's loss increase is its layers' summed as the plan's perplexity is predicted, negative
    (noise) ones counted as 0: summed with their signs, one layer's noise would hide another's cost
    and a grouped plan could pass the target its layers break."""
    return replace(sens, delta={p: [sum(max(0.0, x) for x in d[i:i + group]) for i in range(0, len(d), group)]
                                for p, d in sens.delta.items()})


def expanded(stage: PlannedStage, group: int) -> PlannedStage:
    return replace(stage, start=stage.start * group, end=stage.end * group,
                   precisions=[p for p in stage.precisions for _ in range(group)])


def make_grouped_plan(model: str, hosts: list[HostInput], sens: Sensitivity, workload: Workload, max_increase: float,
                      precisions: list[str] | None = None, group: int = 1, max_orders: int | None = None) -> Plan:
    precisions = precisions or default_precisions(hosts)
    layers = len(next(iter(sens.delta.values())))
    if layers % group:
        divisors = [g for g in range(1, layers + 1) if layers % g == 0]
        raise ValueError(f"--layer-group {group} does not divide the {layers} layers: use one of "
                         f"{', '.join(map(str, divisors))}")
    if group == 1:
        return make_plan(model, hosts, sens, workload, max_increase, precisions, max_orders)
    grouped = [replace(h, profile=grouped_profile(h.profile, group)) for h in hosts]
    plan = make_plan(model, grouped, grouped_sensitivity(sens, group), workload, max_increase, precisions, max_orders)
    quality, budget = quality_units(sens, precisions, max_increase)
    return replace(plan, stages=[expanded(s, group) for s in plan.stages],
                   baselines=baselines(hosts, precisions, quality, budget, workload, plan.prefill_microbatch))
