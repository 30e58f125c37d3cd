"""Pure pieces of laying the pipeline out: which slices hosts already hold, which plan ranges are
valid, and which hosts lack the disk room for their slice. The leader (daemon.py) decides when."""

from __future__ import annotations

import logging

from ..config import LeaderSettings
from ..model.stage import StageSpec, stage_tensor_names
from ..plan.planner import Plan
from ..plan.split import PlanError
from ..wire.messages import Manifest
from .hosts import HostRecord

log = logging.getLogger(__name__)

Layout = tuple[list[HostRecord], list[tuple[int, int]], list[list[str]]]  # order, layer ranges, precisions


def disk_shortfalls(order: list[HostRecord], ranges: list[tuple[int, int]], manifest: Manifest,
                    config) -> dict[str, str]:
    """Hosts whose cache cannot take the weights of their slice: name -> why.

    A host with its own copy (--model) needs no room. For the others the slice's stored bytes,
    less what the host already caches of this model, must fit the room it reported."""
    tensors = {e.name: e.size for e in manifest.entries if e.kind == "tensor"}
    out = {}
    for i, (host, (start, end)) in enumerate(zip(order, ranges)):
        room = host.inventory.disk_free_bytes
        if room < 0:
            continue
        spec = StageSpec(start, end, first=i == 0, last=i == len(order) - 1)
        need = sum(tensors[n] for n in set(stage_tensor_names(config, tensors, spec).values()))
        need -= host.inventory.cached_weights.get(manifest.model_hash, 0)
        if need > room:
            out[host.name] = (f"its slice (layers {start}-{end - 1}) needs {need / 2**20:.1f} MiB of weights "
                              f"on disk, it has room for {room / 2**20:.1f} MiB")
    return out


def adoptable(hosts: list[HostRecord], model_hash: str, num_layers: int, settings: LeaderSettings) -> Layout | None:
    """The layout the live hosts already hold (they rejoined a restarted leader), when it is
    a whole pipeline of this model and these limits: adopting it reloads nothing."""
    held = [h.current for h in hosts]
    if not hosts or any(a is None for a in held):
        return None
    pairs = sorted(zip(held, hosts), key=lambda p: p[0].stage)
    bounds = [(a.start, a.end) for a, _ in pairs]
    limits = settings.limits
    if ([a.stage for a, _ in pairs] != list(range(len(pairs))) or any(a.num_stages != len(pairs) for a, _ in pairs)
            or bounds[0][0] != 0 or bounds[-1][1] != num_layers
            or any(x[1] != y[0] for x, y in zip(bounds, bounds[1:]))
            or any((a.model_hash, a.dtype, a.max_seqs, a.max_context) !=
                   (model_hash, settings.dtype, limits.max_seqs, limits.max_context) for a in held)):
        return None
    log.info("adopting the layout the hosts hold: %s", ", ".join(f"{h.name} {a.start}-{a.end - 1}" for a, h in pairs))
    return [h for _, h in pairs], bounds, [list(a.precisions) for a, _ in pairs]


def plan_layout(plan: Plan, hosts: dict[str, HostRecord], num_layers: int) -> Layout:
    """The plan's host order, ranges and precisions; PlanError when its hosts did not join or its
    ranges do not cover the model."""
    missing = [st.host for st in plan.stages if st.host not in hosts]
    if missing:
        raise PlanError(f"the plan is for hosts {[st.host for st in plan.stages]}, but {sorted(hosts)} joined")
    bounds = [(st.start, st.end) for st in plan.stages]
    if bounds[0][0] != 0 or bounds[-1][1] != num_layers or any(
            a[1] != b[0] or a[0] >= a[1] for a, b in zip(bounds, bounds[1:] + [(num_layers, 0)])):
        raise PlanError(f"the plan's layer ranges {bounds} do not cover layers 0-{num_layers - 1} contiguously")
    return [hosts[st.host] for st in plan.stages], bounds, [st.precisions for st in plan.stages]
