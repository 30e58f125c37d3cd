"""Pure pieces of laying the pipeline out: which slices hosts already hold, which plan ranges are
valid, which hosts lack the disk room for their slice, the layout itself (a plan's, a live plan,
or a split by memory) and the Assign each stage gets. The leader (daemon.py) decides when."""

from __future__ import annotations

import logging
from pathlib import Path

from ..config import LeaderSettings, Limits
from ..model.precision import ACTIVATIONS_QUANTIZED, GPU_ONLY, PRECISIONS
from ..model.stage import StageSpec, stage_tensor_names
from ..plan.planner import HostInput, Plan, Workload, make_plan
from ..plan.quality import sensitivity
from ..plan.split import ModelShape, PlanError, memory_split
from ..wire.messages import Assign, Manifest
from .hosts import HostRecord

log = logging.getLogger(__name__)

Layout = tuple[list[HostRecord], list[tuple[int, int]], list[list[str]]]  # order, layer ranges, precisions


def disk_shortfalls(order: list[HostRecord], ranges: list[tuple[int, int]], manifest: Manifest,
                    config) -> dict[str, str]:
    """Hosts whose cache cannot take the weights of their slice: name -> why.

    A host with its own copy (--model) needs no room. For the others the slice's stored bytes,
    less what the host already caches of this model, must fit the room it reported plus what it
    caches of other models (it removes those to make room: weights.store.make_room)."""
    tensors = {e.name: e.size for e in manifest.entries if e.kind == "tensor"}
    out = {}
    for i, (host, (start, end)) in enumerate(zip(order, ranges)):
        if host.inventory.disk_free_bytes < 0:
            continue
        room = host.inventory.disk_free_bytes + sum(size for model, size in host.inventory.cached_weights.items()
                                                    if model != manifest.model_hash)
        spec = StageSpec(start, end, first=i == 0, last=i == len(order) - 1)
        need = sum(tensors[n] for n in set(stage_tensor_names(config, tensors, spec).values()))
        need -= host.inventory.cached_weights.get(manifest.model_hash, 0)
        if need > room:
            out[host.name] = (f"its slice (layers {start}-{end - 1}) needs {need / 2**20:.1f} MiB of weights "
                              f"on disk, it has room for {room / 2**20:.1f} MiB")
    return out


def covers(bounds: list[tuple[int, int]], num_layers: int) -> bool:
    """Do these [start, end) ranges cover layers 0 .. num_layers - 1 in order, none empty?"""
    return bool(bounds) and bounds[0][0] == 0 and bounds[-1][1] == num_layers and all(
        a[1] == b[0] for a, b in zip(bounds, bounds[1:])) and all(start < end for start, end in bounds)


def known_precisions(precisions, layers: int) -> bool:
    """One known precision for each of `layers` layers, or none (all native)."""
    return len(precisions) in (0, layers) and set(precisions) <= set(PRECISIONS)


def adoptable(hosts: list[HostRecord], model_hash: str, num_layers: int, settings: LeaderSettings) -> Layout | None:
    """The layout the live hosts already hold (they rejoined a restarted leader), when it is
    a whole pipeline of this model and these limits: adopting it reloads nothing. What a host
    says it holds is its word: slices that are not a valid layout are not adopted."""
    held = [h.current for h in hosts]
    if not hosts or any(a is None for a in held):
        return None
    pairs = sorted(zip(held, hosts), key=lambda p: p[0].stage)
    bounds = [(a.start, a.end) for a, _ in pairs]
    limits = settings.limits
    if ([a.stage for a, _ in pairs] != list(range(len(pairs))) or any(a.num_stages != len(pairs) for a, _ in pairs)
            or not covers(bounds, num_layers)
            or not all(known_precisions(a.precisions, a.end - a.start) for a in held)
            or any((a.model_hash, a.dtype, a.max_seqs, a.max_context) !=
                   (model_hash, settings.dtype, limits.max_seqs, limits.max_context) for a in held)):
        return None
    log.info("adopting the layout the hosts hold: %s", ", ".join(f"{h.name} {a.start}-{a.end - 1}" for a, h in pairs))
    return [h for _, h in pairs], bounds, [list(a.precisions) for a, _ in pairs]


def plan_layout(plan: Plan, hosts: dict[str, HostRecord], num_layers: int) -> Layout:
    """The plan's host order, ranges and precisions; PlanError when its hosts did not join, its
    ranges do not cover the model, a stage's precisions are not one known precision a layer (or
    none: native), or a stage needs more memory than its host offers (it would fail or run out of
    memory loading)."""
    if not plan.stages:
        raise PlanError("the plan has no stages")
    missing = [st.host for st in plan.stages if st.host not in hosts]
    if missing:
        raise PlanError(f"the plan is for hosts {[st.host for st in plan.stages]}, but {sorted(hosts)} joined")
    bounds = [(st.start, st.end) for st in plan.stages]
    if not covers(bounds, num_layers):
        raise PlanError(f"the plan's layer ranges {bounds} do not cover layers 0-{num_layers - 1} contiguously")
    for st in plan.stages:
        if not known_precisions(st.precisions, st.end - st.start):
            raise PlanError(f"the plan's stage on {st.host} needs one of {', '.join(PRECISIONS)} for each of its "
                            f"{st.end - st.start} layers (or none: all native), not {st.precisions}")
        usable = hosts[st.host].inventory.usable_bytes
        if st.memory_bytes > usable:
            raise PlanError(f"the plan's stage on {st.host} needs {st.memory_bytes / 2**30:.2f} GiB, the host offers "
                            f"{usable / 2**30:.2f} GiB")
    return [hosts[st.host] for st in plan.stages], bounds, [st.precisions for st in plan.stages]


def choose_layout(plan: Plan | None, planned_live: bool, served: bool, hosts: dict[str, HostRecord],
                  candidates: list[HostRecord], shape: ModelShape, num_layers: int, limits: Limits) -> Layout:
    """Pipeline order, layer ranges and per-layer precisions: the plan's (--plan, or planned live
    over the candidates), else the candidates in order split by memory. Once serving, a --plan
    whose hosts are not all alive falls back to the split; PlanError when a plan does not fit."""
    if plan is not None and not planned_live and served and \
            any(hosts.get(st.host) not in candidates for st in plan.stages):
        log.warning("the plan's hosts are not all alive: splitting by memory over the live ones")
    elif plan is not None:
        return plan_layout(plan, hosts, num_layers)
    return memory_layout(candidates, shape, limits.max_seqs * (limits.max_context + 1))


def memory_layout(candidates: list[HostRecord], shape: ModelShape, kv_tokens: int) -> Layout:
    """The candidates in order, layers split by memory. Where that split fails, the hosts of least
    memory are left out one at a time: a host too small for a layer, or one more than there are
    layers, joining a serving cluster must not break it (it stays unused). PlanError, the full
    set's, where no subset fits either."""
    by_memory = sorted(candidates, key=lambda h: -h.inventory.usable_bytes)
    first_error = None
    for count in range(len(candidates), 0, -1):
        kept = {id(h) for h in by_memory[:count]}
        used = [h for h in candidates if id(h) in kept]
        try:
            ranges = memory_split(shape, [h.inventory.usable_bytes for h in used], kv_tokens)
        except PlanError as exc:
            first_error = first_error or exc
            continue
        if count < len(candidates):
            left = [h.name for h in candidates if id(h) not in kept]
            log.warning("hosts %s left out: %s", ", ".join(left), first_error)
        return used, ranges, [[] for _ in used]
    raise first_error or PlanError("no hosts")


def plan_live(settings: LeaderSettings, hosts: list[HostRecord], model_dir: Path) -> Plan:
    """Plan over hosts that sent their profiles (and whose links were measured, else
    --link-gbps): the quality budget's sensitivity measured on the leader's copy (cached), the
    plan solved for the KV cache the hosts will allocate. Raises PlanningError where none fits."""
    p = settings.planner
    inputs = [HostInput(h.name, h.inventory.usable_bytes, h.profile, h.link.gbps, h.link.latency_ms) if h.link
              else HostInput(h.name, h.inventory.usable_bytes, h.profile, p.link_gbps) for h in hosts]
    # Sensitivity is measured on this CPU, where quanto's fp8 cannot run: GPU-only precisions are
    # left out (no measured quality cost, so the planner never picks them), as `hetserve plan` does.
    quantized = sorted({q for h in inputs for q in h.profile.layer_bytes if q != "native" and q not in GPU_ONLY})
    log.info("planning for +%.1f%% perplexity: measuring layer sensitivity (cached after the first time)",
             p.max_ppl_increase * 100)
    limits = settings.limits
    workload = Workload(p.prompt_tokens, p.output_tokens, p.batch, limits.max_seqs * (limits.max_context + 1))
    sens = sensitivity(model_dir, quantized, p.calibration_tokens, progress=False)
    plan = make_plan(settings.model, inputs, sens, workload, p.max_ppl_increase)
    log.info("plan: predicted %.1f tokens/s, perplexity %.3f (base %.3f), solved in %.2f s; baselines %s",
             plan.predicted_tokens_per_s, plan.predicted_ppl, plan.base_ppl, plan.solve_seconds, plan.baselines)
    if p.save_to:
        plan.save(Path(p.save_to))
    return plan


def stage_assigns(layout: Layout, settings: LeaderSettings, num_layers: int, model_hash: str, epoch: int,
                  results_addr: str, weights_addrs: list[str], own_key: str, scales: list[dict]) -> list[Assign]:
    """Each stage's Assign, in pipeline order: its slice and precisions, where its output goes (the
    next stage, the leader's results socket for the last), whose keys it admits on each side (the
    leader's own at the ends) and, for w8a8 layers, their input scales (`scales`, by layer)."""
    order, ranges, precisions = layout
    limits = settings.limits
    assigns = []
    for i, (host, (start, end), precs) in enumerate(zip(order, ranges, precisions)):
        last = i + 1 == len(order)
        assigns.append(Assign(
            stage=i, num_stages=len(order), start=start, end=end, model=settings.model, num_layers=num_layers,
            dtype=settings.dtype, max_seqs=limits.max_seqs, max_context=limits.max_context,
            downstream=results_addr if last else order[i + 1].data_addr, precisions=precs, model_hash=model_hash,
            weights_addr=weights_addrs[i], epoch=epoch, upstream_key=order[i - 1].public_key if i else own_key,
            downstream_key=own_key if last else order[i + 1].public_key,
            input_scales=[scales[start + j] if p in ACTIVATIONS_QUANTIZED else {} for j, p in enumerate(precs)]))
    return assigns
